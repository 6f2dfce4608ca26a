"""MJHQ-30K: FID and CLIP score per category (shared/specs/evaluation.md §3).

FID: torchmetrics' ``FrechetInceptionDistance`` on features of the Inception-v3 TorchScript file that clean-fid
uses (NVIDIA's ``inception-2015-12-05.pt``, pool3, 2048-d), loaded with ``torch.jit.load`` (no torchvision needed).
Resizing to 299 is a config choice: ``resize: clean`` = clean-fid's "clean" mode (PIL bicubic on float, no
quantisation: parity with FastVAR/NOVA's published numbers, which call clean-fid) or ``resize: bilinear`` (torch
bilinear with antialias, torchmetrics/torch-fidelity's default). Statistics: the category's real images vs ours.
CLIP score: transformers ``CLIPModel`` (openai/clip-vit-large-patch14), 100 x max(cos, 0) averaged over images, with
prompts tokenised with truncation to 77 tokens that **keeps the end-of-text token** (torchmetrics' CLIPScore slices
the ids and drops it, so its pooled text feature sits on an ordinary token for long prompts).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from varbench.errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def clean_resize(img, size: int = 299) -> np.ndarray:
    """clean-fid "clean": per channel, PIL bicubic resize of the float image (mode F), no uint8 rounding."""
    from PIL import Image

    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    chans = [np.asarray(Image.fromarray(arr[..., c], mode="F").resize((size, size), Image.BICUBIC)) for c in range(3)]
    return np.clip(np.stack(chans, -1), 0, 255)


class InceptionFeatures(nn.Module):
    """uint8 [N,3,H,W] -> features, through a TorchScript feature extractor taking float 0..255 at 299x299."""

    def __init__(self, jit_path: str | Path, resize: str = "clean", size: int = 299):
        super().__init__()
        self.net = torch.jit.load(str(jit_path), map_location="cpu").eval()
        self.resize, self.size = resize, size

    def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        if self.resize == "clean":
            imgs = [clean_resize(Image.fromarray(im.permute(1, 2, 0).cpu().numpy()), self.size) for im in x_uint8]
            x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
        else:
            x = F.interpolate(x_uint8.float(), size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)
        with torch.no_grad():
            f = self.net(x)
        return f.reshape(f.shape[0], -1).double()


def _images(folder: Path):
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS)


def fid(real_dir: Path, fake_dir: Path, features: nn.Module, batch: int = 32) -> float:
    from PIL import Image
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=features, normalize=False)
    for folder, real in ((real_dir, True), (fake_dir, False)):
        files = _images(folder)
        if len(files) < 2:
            raise UserError(f"FID needs at least 2 images in {folder}, found {len(files)}")
        for s in range(0, len(files), batch):
            x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                             for p in files[s:s + batch]])
            metric.update(x, real=real)
    return float(metric.compute())


def _tensor(out) -> torch.Tensor:
    """transformers < 5 returns the projected features; 5.x a ModelOutput whose pooler_output holds them."""
    return out if torch.is_tensor(out) else out.pooler_output


class ClipScorer:
    """100 x max(cos(image, text), 0) with HF CLIP; text truncated to 77 tokens keeping the end-of-text token."""

    def __init__(self, path: str, device: str = "cpu", model=None, processor=None):
        from transformers import CLIPModel, CLIPProcessor

        self.model = (model or CLIPModel.from_pretrained(path)).to(device).eval()
        self.proc = processor or CLIPProcessor.from_pretrained(path)
        self.device = device

    @torch.no_grad()
    def __call__(self, images, prompts: list[str]) -> list[float]:
        tok = self.proc.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        pix = self.proc.image_processor(images=images, return_tensors="pt")["pixel_values"]
        t = F.normalize(_tensor(self.model.get_text_features(**tok.to(self.device))).float(), dim=-1)
        i = F.normalize(_tensor(self.model.get_image_features(pixel_values=pix.to(self.device))).float(), dim=-1)
        return (100 * (t * i).sum(-1).clamp(min=0)).tolist()


def run(bench: dict, image_dir: Path, out_dir: Path, device: str = "cpu") -> dict[str, float]:
    """The ``mjhq`` metric: per category, FID against the real images and the CLIP score of our images."""
    import json

    from PIL import Image

    from eval.datasets import data_dir, need
    from varbench.weights import resolve_files, weights_dir

    m = bench.get("mjhq") or {}
    paths = resolve_files({k: dict(v) for k, v in m["files"].items()}, weights_dir(m.get("weights_dir")),
                          "bench.mjhq.weights_dir")
    root = data_dir(bench.get("data_dir"))
    meta = json.loads(need("mjhq30k", "meta_data.json", root).read_text())
    real_root = Path(m.get("real_images") or root / "mjhq30k" / "mjhq30k_imgs")
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
