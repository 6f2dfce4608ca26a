"""Fidelity of an image to the unpruned image of the same prompt and seed: MSE, PSNR and SSIM (torchmetrics).

All on RGB in [0, 1], data range 1; SSIM with torchmetrics' defaults (Gaussian window 11, sigma 1.5). A run's PSNR
is ``psnr_of_mse(mean MSE over its images)``: identical images contribute MSE 0 (no capped or infinite per-image
value enters a mean); the share of bit-identical images is reported beside it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def load_rgb(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def psnr_ssim(img: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """[1,3,H,W] in [0,1] each -> (PSNR dB, SSIM). Identical images give PSNR = inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    mse = torch.mean((img - ref) ** 2).item()
    psnr = float("inf") if mse == 0 else float(peak_signal_noise_ratio(img, ref, data_range=1.0))
    ssim = float(structural_similarity_index_measure(img, ref, data_range=1.0))
    return psnr, ssim


def psnr_of_mse(mse: float) -> float | None:
    """PSNR (dB, data range 1) of a mean squared error; None where it is 0 (every image identical: undefined)."""
    return None if mse <= 0 else 10 * math.log10(1.0 / mse)


def fidelity_per_image(image_dir: Path, ref_dir: Path, relpaths: list[str]) -> list[dict]:
    """Per image: ``mse``, ``psnr`` (None for identical images), ``ssim``, ``identical`` (pixels equal)."""
    out = []
    for rel in relpaths:
        a, b = image_dir / rel, ref_dir / rel
        if a.exists() and b.exists():
            x, y = load_rgb(a), load_rgb(b)
            mse = torch.mean((x - y) ** 2).item()
            _, s = psnr_ssim(x, y)
            out.append({"image": rel, "mse": mse, "psnr": psnr_of_mse(mse), "ssim": s, "identical": mse == 0})
    return out
