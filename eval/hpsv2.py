"""HPSv2.1 (tgxs002/HPSv2 @866735e): OpenCLIP ViT-H-14 hosting the HPS v2.1 weights (shared/specs/evaluation.md §5).

  * model: ``open_clip.create_model("ViT-H-14")`` without pretrained weights, then the ``state_dict`` of
    ``HPS_v2.1_compressed.pt`` (HF repo xswu/HPSv2) loaded strictly — open_clip 3.x's ViT-H-14 has exactly the
    vendored model's keys, so the ``hpsv2`` package (which pins pytest 7.2 and lacks its BPE file) is not needed;
  * preprocessing (HPS's eval transform): RGB -> tensor in [0, 1] -> resize so the LONGER side is 224 (bicubic, tensor
    resize: antialias follows the installed torchvision, recorded in meta.json) -> zero-pad to 224x224 (left/top get
    the floor half) -> CLIP mean/std;
  * score = 100 x cos(image, text); per style: the mean over consecutive chunks of 80 prompts of the chunk means
    (= the plain mean when all 800 exist); overall = the mean over all images;
  * images: ``<root>/<style>/<idx:05d>.jpg`` (jpg only, as the official evaluation).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from eval.cache import ScoreCache
from eval.datasets import data_dir, need
from varbench.errors import UserError
from varbench.weights import resolve_files, weights_dir

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def hps_preprocess(img, size: int = 224) -> torch.Tensor:
    """PIL image -> [3, size, size] (HPS's ResizeMaxSize(size) + Normalize)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    x = TF.to_tensor(img.convert("RGB"))
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        x = TF.resize(x, [nh, nw], InterpolationMode.BICUBIC)
        ph, pw = size - nh, size - nw
        x = TF.pad(x, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
    return TF.normalize(x, MEAN, STD)


class HPSv21:
    def __init__(self, ckpt: str | Path | None, device: str = "cpu", model=None, tokenizer=None,
                 arch: str = "ViT-H-14", trust_pickle: bool = False):
        try:
            import open_clip
        except ImportError:
            raise UserError("HPSv2.1 needs open_clip: pip install -e '.[eval]'") from None
        if model is None:
            model = open_clip.create_model(arch, pretrained=None)
            try:
                sd = torch.load(ckpt, map_location="cpu", weights_only=not trust_pickle)
            except Exception as e:  # noqa: BLE001
                raise UserError(f"could not read {ckpt} with weights_only=True ({type(e).__name__}); "
                                "if you trust the file, set bench.hpsv2.trust_pickle=true") from None
            missing, unexpected = model.load_state_dict(sd.get("state_dict", sd), strict=False)
            if missing or unexpected:
                raise UserError(f"{ckpt} does not fit {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.model, self.device = model.to(device).eval(), device
        self.tok = tokenizer or open_clip.get_tokenizer(arch)

    @torch.no_grad()
    def __call__(self, images, prompts: list[str]) -> list[float]:
        x = torch.stack([hps_preprocess(im) for im in images]).to(self.device)
        i = F.normalize(self.model.encode_image(x).float(), dim=-1)
        t = F.normalize(self.model.encode_text(self.tok(prompts).to(self.device)).float(), dim=-1)
        return (100 * (i * t).sum(-1)).tolist()


def style_score(scores: list[float], chunk: int = 80) -> float:
    """Mean over consecutive chunks of ``chunk`` prompts of the chunk means (the official per-style number)."""
    means = [sum(scores[s:s + chunk]) / len(scores[s:s + chunk]) for s in range(0, len(scores), chunk)]
    return sum(means) / len(means)


def check(bench: dict) -> dict[str, Path]:
    """The files the ``hpsv2`` metric needs (the HPS v2.1 checkpoint, the style prompt files), checked before the
    first image is generated."""
    h = bench.get("hpsv2") or {}
    paths = resolve_files({k: dict(v) for k, v in h["files"].items()}, weights_dir(h.get("weights_dir")),
                          "bench.hpsv2.weights_dir")
    root = data_dir(bench.get("data_dir"))
    return paths | {s: need("hpsv2", f"{s}.json", root) for s in bench.get("styles", ["anime", "concept-art",
                                                                                       "paintings", "photo"])}


def run(bench: dict, image_dir: Path, out_dir: Path, device: str = "cpu") -> dict[str, float]:
    import json

    from PIL import Image

    h = bench.get("hpsv2") or {}
    paths = check(bench)
    scorer = HPSv21(paths["checkpoint"], device, trust_pickle=bool(h.get("trust_pickle", False)))

    cache = ScoreCache(out_dir / "hpsv2_cache.jsonl", image_dir)
    root, out, every = data_dir(bench.get("data_dir")), {}, []
    for style in bench.get("styles", ["anime", "concept-art", "paintings", "photo"]):
        prompts = json.loads(need("hpsv2", f"{style}.json", root).read_text())
        scores = []
        for j, p in enumerate(prompts):
            f = Path(image_dir) / style / f"{j:05d}.jpg"
            if f.exists():
                v = cache.get(f)
                if v is None:
                    v = scorer([Image.open(f)], [p])[0]
                    cache.put(f, v)
                scores.append(v)
        if scores:
            out[f"hps_{style.replace('-', '_')}"] = style_score(scores)
            every += scores
    if every:
        out["hps_overall"] = sum(every) / len(every)
    return out
