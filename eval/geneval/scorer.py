"""GenEval scorer: detector -> GenEval filtering and rules -> per-tag summary (shared/specs/evaluation.md §1).

Detector backend ``hf``: transformers' ``Mask2FormerForUniversalSegmentation`` from a local folder / HF cache
(e.g. facebook/mask2former-swin-small-coco-instance), with **mmdet's** instance post-processing re-implemented
(not transformers'): softmax over classes without the no-object column, top-``max_per_image`` (query, class) pairs,
mask logits upsampled bilinearly to the padded input, cropped, upsampled to the image, binarised at 0, mask score =
mean sigmoid inside the mask, score = class prob x mask score, box = tight box (right/bottom exclusive).
Pre-processing as mmdet's test pipeline: keep-ratio resize to fit (1333, 800) (bilinear, rounded to uint8 like
mmcv.imresize's cv2 output), pad to a multiple of 32 with grey 128 (pad_cfg), then ImageNet mean/std.
Detector weights: ``detector: mmdet`` = the official GenEval checkpoint, OpenMMLab's
mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth, loaded into the transformers class by the key map of
``eval/geneval/mmdet_map.py``; ``detector: hf`` = Meta's weights from the HF hub (a different training run: rows are
"GenEval (HF detector)", expect a few points per tag, more on counting).
Colour: open_clip ViT-L-14 (openai weights, QuickGELU forced) zero-shot over 10 colours with GenEval's three templates, on the object
composited over #999999 through its mask and cropped to its box.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eval.cache import ScoreCache
from eval.datasets import data_dir, need
from eval.geneval.mmdet_map import load_mmdet_mask2former
from eval.geneval.rules import COLORS, Det, Options, evaluate, keep_detections, summarize
from eval.imagereward import openai_clip
from varbench.errors import UserError
from varbench.weights import resolve_files, weights_dir

PAPER_COLUMNS = {"two_object": "geneval_two_obj", "position": "geneval_position", "color_attr": "geneval_color_attr",
                 "overall": "geneval_overall", "single_object": "geneval_single_object",
                 "counting": "geneval_counting", "colors": "geneval_colors"}
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def mmdet_preprocess(img: np.ndarray, scale=(1333, 800), divisor: int = 32):
    """uint8 HxWx3 RGB -> (pixel tensor [1,3,Hp,Wp], resized (h, w))."""
    H, W = img.shape[:2]
    f = min(max(scale) / max(H, W), min(scale) / min(H, W))
    h, w = int(H * f + 0.5), int(W * f + 0.5)
    x = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).round().clamp(0, 255)
    hp, wp = -(-h // divisor) * divisor, -(-w // divisor) * divisor
    x = F.pad(x, (0, wp - w, 0, hp - h), value=128.0)          # mmdet Pad(size_divisor=32, pad_val img=128)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1), (h, w)


def mmdet_instances(cls_logits: torch.Tensor, mask_logits: torch.Tensor, padded_hw, resized_hw, image_hw,
                    max_per_image: int = 100):
    """One image: cls_logits [Q, C+1], mask_logits [Q, h, w] -> (labels, scores, boxes [N,4], masks [N,H,W] bool)."""
    Q, C1 = cls_logits.shape
    scores = cls_logits.softmax(-1)[:, :-1]
    top, idx = scores.flatten().topk(min(max_per_image, scores.numel()))
    labels, q = idx % (C1 - 1), idx // (C1 - 1)
    m = F.interpolate(mask_logits[q][None], size=padded_hw, mode="bilinear", align_corners=False)
    m = m[..., : resized_hw[0], : resized_hw[1]]
    m = F.interpolate(m, size=image_hw, mode="bilinear", align_corners=False)[0]
    binary = m > 0
    mask_score = (m.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    boxes = torch.zeros(len(q), 4)
    for i, b in enumerate(binary):
        ys, xs = torch.nonzero(b, as_tuple=True)
        if len(xs):
            boxes[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float)
    return labels, top * mask_score, boxes, binary


class HFMask2Former:
    """transformers Mask2Former (HF folder, or ``model=`` e.g. from ``mmdet_map.load_mmdet_mask2former``) + mmdet's
    pre/post-processing."""

    def __init__(self, path: str, device: str = "cpu", model=None):
        from transformers import Mask2FormerForUniversalSegmentation

        self.model = (model or Mask2FormerForUniversalSegmentation.from_pretrained(path)).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, img: np.ndarray, classnames: list[str]) -> dict[str, list[Det]]:
        x, rhw = mmdet_preprocess(img)
        out = self.model(pixel_values=x.to(self.device))
        labels, scores, boxes, masks = mmdet_instances(out.class_queries_logits[0].float().cpu(),
                                                       out.masks_queries_logits[0].float().cpu(), x.shape[-2:],
                                                       rhw, img.shape[:2])
        dets: dict[str, list[Det]] = {}
        for lab, s, b, m in zip(labels.tolist(), scores.tolist(), boxes.tolist(), masks):
            dets.setdefault(classnames[lab], []).append(Det(tuple(b), s, m.numpy()))
        return dets


class ClipColor:
    """Zero-shot colour head per object class (GenEval's templates), open_clip ViT-L-14 openai."""

    TEMPLATES = ("a photo of a {c} {o}", "a photo of a {c}-colored {o}", "a photo of a {c} object")

    def __init__(self, model_name="ViT-L-14", pretrained="openai", device="cpu", model=None, preprocess=None,
                 tokenizer=None):
        if model is None:  # QuickGELU forced: open_clip 2.20's ViT-L-14 + "openai", as the official scorer
            model, preprocess, tokenizer = openai_clip(pretrained, model_name, device)
        self.model, self.preprocess, self.tok, self.device = model.eval(), preprocess, tokenizer, device
        self.heads: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def head(self, obj: str) -> torch.Tensor:
        if obj not in self.heads:
            ws = []
            for c in COLORS:
                t = self.model.encode_text(self.tok([tp.format(c=c, o=obj) for tp in self.TEMPLATES]).to(self.device))
                t = F.normalize(t.float(), dim=-1).mean(0)
                ws.append(F.normalize(t, dim=-1))
            self.heads[obj] = torch.stack(ws, 1)
        return self.heads[obj]

    @torch.no_grad()
    def __call__(self, image, dets: list[Det], obj: str) -> list[str]:
        from PIL import Image

        grey = Image.new("RGB", image.size, color="#999999")
        crops = []
        for d in dets:
            im = Image.composite(image, grey, Image.fromarray(d.mask)) if d.mask is not None else image
            crops.append(self.preprocess(im.crop(tuple(d.box[:4]))))
        f = F.normalize(self.model.encode_image(torch.stack(crops).to(self.device)).float(), dim=-1)
        return [COLORS[i] for i in (f @ self.head(obj)).argmax(1).tolist()]


def score_folder(image_dir: Path, detector, color, classnames: list[str], opt: Options = Options(),
                 out_jsonl: Path | None = None, cache=None) -> tuple[list[dict], dict]:
    """Score a GenEval-layout folder (ours or anyone's): <idx>/metadata.jsonl + <idx>/samples/<k>.png|jpg (the
    file names Infinity/FastVAR's evaluate_images.py accepts: digits + .png or .jpg; the original GenEval script
    accepts only .png). ``cache`` (eval.cache.ScoreCache) makes a rerun skip images already scored."""
    import re

    from PIL import Image

    results = []
    for folder in sorted(p for p in Path(image_dir).iterdir() if p.is_dir() and p.name.isdigit()):
        meta = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
        for img_path in sorted((folder / "samples").iterdir()):
            if not re.fullmatch(r"\d+\.(png|jpg)", img_path.name):
                continue
            hit = cache.get(img_path) if cache is not None else None
            if hit is not None:
                results.append(hit)
                continue
            image = Image.open(img_path).convert("RGB")
            raw = detector(np.asarray(image), classnames)
            objs = keep_detections(raw, meta["tag"], opt)
            ok, why = evaluate(meta, objs, lambda d, o: color(image, d, o), opt.position_threshold)  # noqa: B023 (called at once, inside the loop)
            results.append({"filename": str(img_path), "tag": meta["tag"], "prompt": meta["prompt"], "correct": ok,
                            "reason": why})
            if cache is not None:
                cache.put(img_path, results[-1])
    if out_jsonl is not None:
        out_jsonl.write_text("".join(json.dumps(r) + "\n" for r in results))
    return results, summarize(results)


def check(bench: dict) -> dict[str, Path]:
    """The files the ``geneval`` metric needs (detector, colour model, class names), resolved without loading
    anything: the harness calls this before the first image is generated (one line per missing file)."""
    g = bench.get("geneval") or {}
    kind = g.get("detector", "mmdet")
    if kind not in ("mmdet", "hf"):
        raise UserError(f"bench.geneval.detector must be mmdet (official OpenMMLab weights) or hf, got {kind!r}")
    files = {"detector": dict(g["files"]["detector_mmdet" if kind == "mmdet" else "detector"]),
             "clip": dict(g["files"]["clip"])}
    paths = resolve_files(files, weights_dir(g.get("weights_dir")), "bench.geneval.weights_dir")
    return paths | {"object_names": need("geneval", "object_names.txt", data_dir(bench.get("data_dir")))}


def run(bench: dict, image_dir: Path, out_dir: Path, device: str = "cpu") -> dict[str, float]:
    """The ``geneval`` metric of a bench config: resolve weights (one-line error if missing), score, summarise."""
    g = bench.get("geneval") or {}
    kind = g.get("detector", "mmdet")
    paths = check(bench)
    classnames = paths["object_names"].read_text().split("\n")
    classnames = [c.strip() for c in classnames if c.strip()]
    if kind == "mmdet":
        det = HFMask2Former("", device, model=load_mmdet_mask2former(paths["detector"], device,
                                                                     bool(g.get("trust_pickle", False))))
    else:
        det = HFMask2Former(str(paths["detector"]), device)
    color = ClipColor("ViT-L-14", str(paths["clip"]), device)
    opt = Options(**{k: g[k] for k in ("threshold", "counting_threshold", "max_objects", "max_overlap",
                                       "position_threshold") if k in g})

    cache = ScoreCache(out_dir / "geneval_cache.jsonl", image_dir)
    _, summary = score_folder(image_dir, det, color, classnames, opt, out_dir / "geneval_results.jsonl", cache)
    return {PAPER_COLUMNS.get(k, f"geneval_{k}"): v for k, v in summary.items()}
