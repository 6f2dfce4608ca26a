"""ShapesEval's exact detector and scorer: foreground segmentation -> connected components -> shape and colour ->
GenEval's rules and summary (``eval/geneval/rules.py``) with the detected colours.

Objects: pixels farther than ``fg_tol`` (L2 in RGB) from white, split into 4-connected components (the world never
lets two objects touch: they keep a 2-px gap; ``label4``, numpy only). Texture-invariant by construction: the world's
background textures stay within 26·√3 ≈ 45.0 of white and every textured object pixel stays > 150 from it, so ground truth is
segmented exactly whatever its textures (``tests/test_shapes.py`` renders every background x fill family). A component counts as an object only
if it is object-sized and solid, which is what the world draws: its box side is between ``min_side`` and
``max_side`` of the image side (the world draws 0.24-0.32), roughly square (aspect within ``max_aspect``: every
object of the world has a square box), filled at least ``min_fill``. Everything else is noise: without these rules
the speckle of an untrained model reads as many small "objects" and scores far above chance.

Shape: nearest prototype in a 5-number description of the component in its box (occupancy of the four corner
patches, a quarter of the box each way, and the overall fill), prototypes measured on the world's own renders
(square ~ all corners full; circle ~ corners a quarter full; triangle, apex up ~ top corners empty). This survives
the soft edges and rounded corners of generated images, where a fill ratio alone confuses squares and circles.
Colour: the per-channel median of the component's pixels (fill textures are zero-median around the colour), named by the nearest of the world's colours when within
``color_tol``, else unnamed (it still counts for tags that name no colour).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from eval.geneval.rules import Det, Options, evaluate, keep_detections, summarize
from eval.shapes.world import COLORS, SHAPES, Obj, render
from varbench.errors import UserError


def describe(mask: np.ndarray) -> np.ndarray:
    """[corner TL, TR, BL, BR occupancy, fill] of a component's box mask (bool HxW)."""
    h, w = mask.shape
    qh, qw = max(1, round(h / 4)), max(1, round(w / 4))
    m = mask.astype(np.float32)
    return np.array([m[:qh, :qw].mean(), m[:qh, -qw:].mean(), m[-qh:, :qw].mean(), m[-qh:, -qw:].mean(), m.mean()])


@lru_cache(maxsize=1)
def prototypes() -> dict[str, np.ndarray]:
    """Each shape's description, measured on the world's renders (64 px, side 20)."""
    out = {}
    for s in SHAPES:
        img = np.asarray(render([Obj(s, "blue", (20, 20, 40, 40))], 64))
        fg = _foreground(img, 60.0)
        ys, xs = np.nonzero(fg)
        out[s] = describe(fg[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    return out


def _foreground(img: np.ndarray, fg_tol: float) -> np.ndarray:
    return np.linalg.norm(img.astype(np.float32) - 255.0, axis=-1) > fg_tol


def label4(mask: np.ndarray) -> tuple[np.ndarray, list[tuple[slice, slice]]]:
    """4-connected components of a bool mask, numbered 1.. in raster order of their first pixel (as
    ``scipy.ndimage.label``), and each one's bounding slices (as ``find_objects``). numpy + a flood fill."""
    h, w = mask.shape
    lab = np.zeros((h, w), np.int32)
    boxes = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if lab[y0, x0]:
            continue
        n = len(boxes) + 1
        lab[y0, x0] = n
        stack, ys, xs = [(y0, x0)], [y0], [x0]
        while stack:
            y, x = stack.pop()
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not lab[yy, xx]:
                    lab[yy, xx] = n
                    stack.append((yy, xx))
                    ys.append(yy)
                    xs.append(xx)
        boxes.append((slice(min(ys), max(ys) + 1), slice(min(xs), max(xs) + 1)))
    return lab, boxes


def classify(mask: np.ndarray, max_dist: float = 0.7) -> str | None:
    d = describe(mask)
    dist = {s: float(np.linalg.norm(d - p)) for s, p in prototypes().items()}
    best = min(dist, key=dist.get)
    return best if dist[best] <= max_dist else None


def name_color(rgb: np.ndarray, color_tol: float = 70.0) -> str | None:
    dist = {n: float(np.linalg.norm(rgb - np.asarray(c, np.float32))) for n, c in COLORS.items()}
    best = min(dist, key=dist.get)
    return best if dist[best] <= color_tol else None


def detect(img: np.ndarray, fg_tol: float = 60.0, min_side: float = 0.15, max_side: float = 0.5,
           max_aspect: float = 1.6, min_fill: float = 0.35) -> dict[str, list[Det]]:
    """uint8 HxWx3 -> {shape: [Det(box, 1.0, mask)]}, each Det carrying its colour name (or None) in ``.color``."""
    out: dict[str, list[Det]] = {}
    size = min(img.shape[:2])
    px = img.astype(np.float32)
    lab, boxes = label4(_foreground(img, fg_tol))
    for i, sl in enumerate(boxes, start=1):
        comp = lab[sl] == i
        h, w = comp.shape
        if (min(h, w) < min_side * size or max(h, w) > max_side * size or max(h, w) > max_aspect * min(h, w)
                or comp.mean() < min_fill):
            continue
        shape = classify(comp)
        if shape is None:
            continue
        full = lab == i
        d = Det((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop), 1.0, full)
        d.color = name_color(np.median(px[full], axis=0))
        out.setdefault(shape, []).append(d)
    return out


def score_image(img: np.ndarray, meta: dict, opt: Options = Options()) -> tuple[bool, str]:
    objs = keep_detections(detect(img), meta["tag"], opt)
    return evaluate(meta, objs, lambda dets, cls: [d.color for d in dets], opt.position_threshold)


def run(bench: dict, image_dir: Path, out_dir: Path, device: str = "cpu") -> dict[str, float]:
    """The ``shapes`` metric over a GenEval-layout folder of ShapesEval prompts: per-tag accuracy and overall."""
    from PIL import Image

    results = []
    for folder in sorted(p for p in Path(image_dir).iterdir() if p.is_dir() and p.name.isdigit()):
        meta = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
        for f in sorted(f for f in (folder / "samples").iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg")):
            ok, why = score_image(np.asarray(Image.open(f).convert("RGB")), meta)
            results.append({"filename": str(f), "tag": meta["tag"], "correct": ok, "reason": why})
    if not results:
        raise UserError(f"ShapesEval found no images (png/jpg in <prompt>/samples/) under {image_dir}")
    (out_dir / "shapes_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    return {f"shapes_{k}": v for k, v in summarize(results).items()}
