"""ShapesEval's exact detector and scorer: colour segmentation -> connected components -> shape by fill ratio ->
GenEval's rules and summary (``eval/geneval/rules.py``) with the detected colours.

A pixel belongs to a named colour when it is within ``tol`` (L2 in RGB) of it; components smaller than
``min_area`` are noise. Shape from the fill ratio of the component in its box and the box's aspect:
square ≈ 1, circle ≈ π/4 ≈ 0.79, triangle ≈ 0.5.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from eval.geneval.rules import Det, Options, evaluate, keep_detections, summarize
from eval.shapes.world import COLORS


def detect(img: np.ndarray, tol: float = 60.0, min_area: int = 12) -> dict[str, list[Det]]:
    """uint8 HxWx3 -> {shape: [Det(box, 1.0, mask)]}, each Det carrying its colour name in ``.color``."""
    from scipy import ndimage

    out: dict[str, list[Det]] = {}
    px = img.astype(np.float32)
    for name, rgb in COLORS.items():
        mask = np.linalg.norm(px - np.asarray(rgb, np.float32), axis=-1) < tol
        lab, n = ndimage.label(mask)
        for i, sl in enumerate(ndimage.find_objects(lab), start=1):
            comp = lab[sl] == i
            area = int(comp.sum())
            if area < min_area:
                continue
            h, w = comp.shape
            fill = area / float(h * w)
            shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
            d = Det((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop), 1.0, lab == i)
            d.color = name
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
        for f in sorted((folder / "samples").glob("*.png")):
            ok, why = score_image(np.asarray(Image.open(f).convert("RGB")), meta)
            results.append({"filename": str(f), "tag": meta["tag"], "correct": ok, "reason": why})
    (out_dir / "shapes_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    return {f"shapes_{k}": v for k, v in summarize(results).items()}
