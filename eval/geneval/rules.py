"""GenEval's decision rules, re-implemented from djghosh13/geneval @af4902f (``evaluation/evaluate_images.py``,
``summary_scores.py``) as pure functions; spec ``shared/specs/evaluation.md`` §1.

Detections are per class name: a list of ``Det(box=(x1, y1, x2, y2), score, mask)`` (mask: bool HxW or None).
``color_of(dets, classname) -> list[str]`` is the colour classifier (CLIP in the scorer, anything in tests).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]


@dataclass
class Det:
    box: tuple
    score: float
    mask: object = None


@dataclass
class Options:
    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0          # 1.0: no NMS (official default)
    position_threshold: float = 0.1


def iou_plus_one(a, b) -> float:
    """IoU with the +1 pixel-area convention of the official NMS."""
    area = lambda x: max(x[2] - x[0] + 1, 0) * max(x[3] - x[1] + 1, 0)  # noqa: E731
    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def keep_detections(raw: dict[str, list[Det]], tag: str, opt: Options = Options()) -> dict[str, list[Det]]:
    """Per class: score > threshold (0.9 for counting), by descending score, at most max_objects, optional NMS.

    As ``evaluate_image`` in evaluate_images.py @af4902f: ``ordering = np.argsort(scores)[::-1]`` on the detector's
    float32 scores in its own order (ties: the reversed argsort's order, the later detection first for small
    arrays), then ``scores[ordering] > threshold``, a float32 array against a Python float, i.e. compared in float32
    (a score of exactly float32(0.3) is not kept). ``raw`` lists each class's detections in the detector's order."""
    thr = np.float32(opt.counting_threshold if tag == "counting" else opt.threshold)
    out = {}
    for cls, dets in raw.items():
        scores = np.asarray([d.score for d in dets], dtype=np.float32)
        ordering = np.argsort(scores)[::-1]
        ordering = ordering[scores[ordering] > thr][: opt.max_objects]
        order = [dets[i] for i in ordering.tolist()]
        kept = []
        while order:
            best = order.pop(0)
            kept.append(best)
            if opt.max_overlap != 1:
                order = [d for d in order if iou_plus_one(best.box, d.box) < opt.max_overlap]
        if kept:
            out[cls] = kept
    return out


def relative_position(a: Det, b: Det, threshold: float = 0.1) -> set[str]:
    """Relations of A to B: centre offset shrunk by threshold x (sum of sizes) per axis, over the offset's norm."""
    ba, bb = np.asarray(a.box[:4], float).reshape(2, 2), np.asarray(b.box[:4], float).reshape(2, 2)
    ca, cb = ba.mean(0), bb.mean(0)
    da, db = np.abs(ba[1] - ba[0]), np.abs(bb[1] - bb[0])
    off = ca - cb
    shrunk = np.maximum(np.abs(off) - threshold * (da + db), 0) * np.sign(off)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(off)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def evaluate(meta: dict, objects: dict[str, list[Det]], color_of: Callable[[list[Det], str], list[str]],
             position_threshold: float = 0.1) -> tuple[bool, str]:
    """Include clauses ANDed (count, then colour, then position against an earlier matched clause), exclude ORed."""
    correct, reasons, groups = True, [], []
    for req in meta.get("include", []):
        cls, n = req["class"], req["count"]
        found = objects.get(cls, [])[:n]
        matched = len(found) >= n
        if not matched:
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        if matched and "color" in req:
            colors = color_of(found, cls)
            if colors.count(req["color"]) < n:
                matched = False
                reasons.append(f"expected {req['color']} {cls}>={n}, found {colors.count(req['color'])}")
        if matched and "position" in req:
            rel, target = req["position"]
            if groups[target] is None:
                matched = False
                reasons.append(f"no target for {cls} to be {rel}")
            elif not all(rel in relative_position(o, t, position_threshold) for o in found for t in groups[target]):
                matched = False
                reasons.append(f"expected {cls} {rel} target")
        correct &= matched
        groups.append(found if matched else None)
    for req in meta.get("exclude", []):
        if len(objects.get(req["class"], [])) >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {len(objects[req['class']])}")
    return correct, "\n".join(reasons)


def summarize(results: list[dict]) -> dict[str, float]:
    """Per-tag mean of per-image correctness; overall = unweighted mean of the tag means (summary_scores.py)."""
    by_tag: dict[str, list[float]] = {}
    for r in results:
        by_tag.setdefault(r["tag"], []).append(float(r["correct"]))
    out = {t: sum(v) / len(v) for t, v in by_tag.items()}
    if out:
        out["overall"] = sum(out.values()) / len(out)
    return out
