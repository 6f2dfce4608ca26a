"""Fidelity of an image to the unpruned image of the same prompt and seed: PSNR and SSIM (torchmetrics).

Both on RGB in [0, 1], data range 1; SSIM with torchmetrics' defaults (Gaussian window 11, sigma 1.5).
"""
from __future__ import annotations

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


def fidelity_per_image(image_dir: Path, ref_dir: Path, relpaths: list[str]) -> list[dict]:
    out = []
    for rel in relpaths:
        a, b = image_dir / rel, ref_dir / rel
        if a.exists() and b.exists():
            p, s = psnr_ssim(load_rgb(a), load_rgb(b))
            out.append({"image": rel, "psnr": p, "ssim": s})
    return out
