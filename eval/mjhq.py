"""MJHQ-30K: FID and CLIP score per category (shared/specs/evaluation.md §3).

FID exactly as clean-fid 0.1.35 ``fid.compute_fid(real_dir, fake_dir)`` (mode "clean"), which FastVAR/NOVA's
``mjhq30k_fid_clip.py`` calls: every image file under the folder (recursive, clean-fid's extensions), RGB uint8 ->
per channel PIL bicubic resize to 299x299 of the float image (no uint8 rounding, clipped to 0..255) -> NVIDIA's
TorchScript Inception (``inception-2015-12-05.pt``) through its ``layers`` sub-module on ``(x - 128) / 128``, i.e.
the 2048-d pool3 features (NOT the module's default ``forward``, which returns the 1008-way softmax) -> mean and
covariance (``np.cov``, float64) -> Fréchet distance. ``resize: legacy_tensorflow`` is clean-fid's other mode: the
original-size image through ``net(x, return_features=True)`` (the network resizes inside, StyleGAN's FID).
The matrix square root is clean-fid's (``cleanfid/fid.py`` ``frechet_distance``): ``scipy.linalg.sqrtm(s1 @ s2)``;
if that is not finite, again with eps = 1e-6 added to both diagonals; a complex result whose diagonal has an imaginary
part above 1e-3 is an error, otherwise its real part is taken (issue 25: the eigenvalue route we used before differs
by 3.6e-4 at n=300 on a rank-deficient covariance). clean-fid passes ``disp=False``, which SciPy 1.17 deprecates and
1.18 removes; the root is the same without it (the flag only chooses whether the error estimate is returned).
CLIP score: transformers ``CLIPModel`` (openai/clip-vit-large-patch14), 100 x max(cos, 0) averaged over images, with
prompts tokenised with truncation to 77 tokens that **keeps the end-of-text token** (torchmetrics' CLIPScore slices
the ids and drops it, so its pooled text feature sits on an ordinary token for long prompts), after the text cleaning
OpenAI's ``clip.tokenize`` applies (``clip/simple_tokenizer.py`` ``basic_clean``/``whitespace_clean``, the same in
open_clip's ``tokenizer.py``): ``ftfy.fix_text``, ``html.unescape`` twice, strip, runs of whitespace -> one space,
lower case. HF's CLIP tokenizers skip the unescaping (and the fast one ftfy too), so ``&amp;``, ``&#39;``, curly
quotes and ligatures would tokenise differently.
"""
from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

from eval.datasets import data_dir, need
from varbench.errors import UserError
from varbench.weights import resolve_files, weights_dir

# clean-fid's EXTENSIONS (fid.py) less .npy, compared case-insensitively
IMAGE_EXTS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
RESIZE_MODES = ("clean", "legacy_tensorflow")


def clean_resize(img, size: int = 299) -> np.ndarray:
    """clean-fid "clean": per channel, PIL bicubic resize of the float image (mode F), no uint8 rounding."""
    from PIL import Image

    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    chans = [np.asarray(Image.fromarray(arr[..., c], mode="F").resize((size, size), Image.BICUBIC)) for c in range(3)]
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.float32)


class InceptionFeatures(nn.Module):
    """uint8 [N,3,H,W] -> float32 pool3 features [N, 2048] of NVIDIA's TorchScript Inception, as clean-fid calls it."""

    def __init__(self, jit_path: str | Path, resize: str = "clean", size: int = 299):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise UserError(f"bench.mjhq.resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
        self.net = torch.jit.load(str(jit_path), map_location="cpu").eval()
        self.resize, self.size = resize, size

    @torch.no_grad()
    def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        n = x_uint8.shape[0]
        if self.resize == "clean":
            imgs = [clean_resize(Image.fromarray(im.permute(1, 2, 0).cpu().numpy()), self.size) for im in x_uint8]
            x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
            f = self.net.layers.forward((x - 128) / 128)         # pool3, [N, 2048, 1, 1]
        else:
            f = self.net(x_uint8.float(), return_features=True)  # resized inside the network
        return f.reshape(n, -1).float()


def _images(folder: Path):
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def folder_features(folder: Path, features: nn.Module, batch: int = 32) -> np.ndarray:
    from PIL import Image

    files = _images(folder)
    if len(files) < 2:
        raise UserError(f"FID needs at least 2 images in {folder}, found {len(files)}")
    out = []
    for s in range(0, len(files), batch):
        x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                         for p in files[s:s + batch]])
        out.append(features(x).cpu().numpy())
    return np.concatenate(out)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2)), the square root as clean-fid 0.1.35 takes it."""
    mu1, mu2, sigma1, sigma2 = np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"FID: feature statistics of different sizes ({mu1.shape} vs {mu2.shape})")
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():     # a nearly singular product: eps on both diagonals, as clean-fid
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise UserError(f"FID: the matrix square root has an imaginary component "
                            f"{np.max(np.abs(covmean.imag)):.3g} (clean-fid stops here too)")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def fid(real_dir: Path, fake_dir: Path, features: nn.Module, batch: int = 32) -> float:
    return frechet_distance(*stats(folder_features(real_dir, features, batch)),
                            *stats(folder_features(fake_dir, features, batch)))


def clip_clean(text: str) -> str:
    """OpenAI CLIP's text cleaning before BPE: ftfy.fix_text, html.unescape twice, strip, whitespace runs -> " ",
    lower case (``whitespace_clean(basic_clean(text)).lower()`` in clip/simple_tokenizer.py)."""
    try:
        import ftfy
    except ImportError:
        raise UserError("the MJHQ CLIP score needs ftfy (OpenAI CLIP's text cleaning): pip install ftfy, or "
                        "pip install -e '.[eval]'") from None
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def _tensor(out) -> torch.Tensor:
    """transformers < 5 returns the projected features; 5.x a ModelOutput whose pooler_output holds them."""
    return out if torch.is_tensor(out) else out.pooler_output


class ClipScorer:
    """100 x max(cos(image, text), 0) with HF CLIP; text cleaned as OpenAI's clip.tokenize does, then truncated to
    77 tokens keeping the end-of-text token."""

    def __init__(self, path: str, device: str = "cpu", model=None, processor=None):
        from transformers import CLIPModel, CLIPProcessor

        self.model = (model or CLIPModel.from_pretrained(path)).to(device).eval()
        self.proc = processor or CLIPProcessor.from_pretrained(path)
        self.device = device

    @torch.no_grad()
    def __call__(self, images, prompts: list[str]) -> list[float]:
        prompts = [clip_clean(p) for p in prompts]
        tok = self.proc.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        pix = self.proc.image_processor(images=images, return_tensors="pt")["pixel_values"]
        t = F.normalize(_tensor(self.model.get_text_features(**tok.to(self.device))).float(), dim=-1)
        i = F.normalize(_tensor(self.model.get_image_features(pixel_values=pix.to(self.device))).float(), dim=-1)
        return (100 * (t * i).sum(-1).clamp(min=0)).tolist()


def check(bench: dict) -> dict[str, Path]:
    """The files the ``mjhq`` metric needs (Inception, CLIP, the metadata, the real images of every category asked
    for), checked before the first image is generated."""
    import json

    m = bench.get("mjhq") or {}
    paths = resolve_files({k: dict(v) for k, v in m["files"].items()}, weights_dir(m.get("weights_dir")),
                          "bench.mjhq.weights_dir")
    root = data_dir(bench.get("data_dir"))
    paths["meta"] = need("mjhq30k", "meta_data.json", root)
    real_root = Path(m.get("real_images") or root / "mjhq30k" / "mjhq30k_imgs")
    for cat in bench.get("categories") or sorted({v["category"] for v in json.loads(paths["meta"].read_text()).values()}):
        if not (real_root / cat).exists():
            raise UserError(f"missing MJHQ-30K real images {real_root / cat} (unzip mjhq30k_imgs.zip from "
                            f"huggingface.co/datasets/playgroundai/MJHQ-30K, or set bench.mjhq.real_images)")
    return paths | {"real_root": real_root}


def run(bench: dict, image_dir: Path, out_dir: Path, device: str = "cpu") -> dict[str, float]:
    """The ``mjhq`` metric: per category, FID against the real images and the CLIP score of our images."""
    import json

    from PIL import Image

    m = bench.get("mjhq") or {}
    paths = check(bench)
    meta = json.loads(paths["meta"].read_text())
    real_root = paths["real_root"]
    feats = InceptionFeatures(paths["inception"], m.get("resize", "clean"))
    clip = ClipScorer(str(paths["clip"]), device)
    out = {}
    for cat in bench.get("categories") or sorted({v["category"] for v in meta.values()}):
        fake = image_dir / cat
        if not fake.exists():
            continue
        if not (real_root / cat).exists():
            raise UserError(f"missing MJHQ-30K real images {real_root / cat} (unzip mjhq30k_imgs.zip from "
                            f"huggingface.co/datasets/playgroundai/MJHQ-30K, or set bench.mjhq.real_images)")
        out[f"{cat}_fid"] = fid(real_root / cat, fake, feats)
        files = _images(fake)
        scores = []
        for s in range(0, len(files), 16):
            chunk = files[s:s + 16]
            scores += clip([Image.open(p).convert("RGB") for p in chunk], [meta[p.stem]["prompt"] for p in chunk])
        out[f"{cat}_clip"] = sum(scores) / len(scores)
    return out
