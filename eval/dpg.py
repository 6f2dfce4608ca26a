"""DPG-Bench (ELLA, TencentQQGYLab @3c228f1): VQA on each tile of a 2x2 grid, dependency-aware scoring, categories.

Re-implemented from the official ``dpg_bench/compute_dpg_bench.py`` behaviour (shared/specs/evaluation.md §2):
  * a grid image ``<item_id>.png`` of 4 tiles of R px; every question of the item is asked on every tile; score 1
    iff the answer is exactly "yes";
  * per tile, in question order, a question is zeroed if a parent in its dependency list (0 = none) scores 0 —
    **in place**, so zeros cascade down the dependency chain as in the official loop; tile score = mean;
    image score = mean of the tiles; DPG overall = 100 x mean image score;
  * category scores (L1 = text before " - " of ``tuple``, L2 = text before "("): 100 x mean of per-question scores.
``official_quirks=True`` reproduces the official script: categories use the scores **before** dependency zeroing
and of the **last tile only**, and the CSV's first data row is skipped. ``False``: all tiles, after zeroing, all rows.
VQA backends: ``mplug`` (official, ModelScope ``damo/mplug_visual-question-answering_coco_large_en``) or ``blip``
(transformers ``BlipForQuestionAnswering``; not official: numbers shift).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from varbench.errors import UserError


@dataclass
class Item:
    item_id: str
    questions: dict[int, str] = field(default_factory=dict)       # proposition id -> question
    dependency: dict[int, list[int]] = field(default_factory=dict)
    category: dict[int, str] = field(default_factory=dict)        # proposition id -> "L1 - L2"


def load_csv(path: Path, official_quirks: bool = True) -> dict[str, Item]:
    items: dict[str, Item] = {}
    with Path(path).open(newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if official_quirks and i == 0:
                continue  # the official loader skips the first data row
            it = items.setdefault(row["item_id"], Item(row["item_id"]))
            qid = int(row["proposition_id"])
            it.questions[qid] = row["question_natural_language"]
            it.dependency[qid] = [int(x) for x in str(row["dependency"]).split(",") if x.strip()]
            it.category[qid] = row["tuple"].split("(")[0].strip()
    return items


def tile_scores(answers: dict[int, str], dependency: dict[int, list[int]]) -> tuple[dict[int, float], dict[int, float]]:
    """(scores before zeroing, scores after the official in-place, question-order dependency zeroing)."""
    scores = {q: float(a == "yes") for q, a in answers.items()}
    orig = dict(scores)
    for q, parents in dependency.items():
        if q in scores and any(p != 0 and scores.get(p) == 0 for p in parents):
            scores[q] = 0.0
    return orig, scores


def score_image(image, item: Item, vqa, pic_num: int = 4) -> tuple[float, list[tuple[dict, dict]]]:
    """Mean over tiles of the mean dependency-filtered score; also every tile's (orig, filtered) scores."""
    R = image.width // 2
    boxes = [(0, 0, R, R), (R, 0, 2 * R, R), (0, R, R, 2 * R), (R, R, 2 * R, 2 * R)][:pic_num]
    tiles, means = [], []
    for b in boxes:
        tile = image.crop(b)
        answers = {q: vqa(tile, text) for q, text in item.questions.items()}
        orig, filt = tile_scores(answers, item.dependency)
        tiles.append((orig, filt))
        means.append(sum(filt.values()) / max(1, len(filt)))
    return sum(means) / len(means), tiles


def summarize(per_image: list[tuple[Item, float, list]], official_quirks: bool = True) -> dict[str, float]:
    cats: dict[str, list[float]] = {}
    for item, _, tiles in per_image:
        use = [tiles[-1][0]] if official_quirks else [t[1] for t in tiles]
        for scores in use:
            for q, s in scores.items():
                l2 = item.category[q]
                cats.setdefault(l2, []).append(s)
                cats.setdefault(l2.split(" - ")[0].strip(), []).append(s)
    out = {"dpg_overall": 100 * sum(s for _, s, _ in per_image) / max(1, len(per_image))}
    for c, v in cats.items():
        out["dpg_" + c.replace(" - ", "/").replace(" ", "_")] = 100 * sum(v) / len(v)
    return out


class BlipVQA:
    """transformers BlipForQuestionAnswering (e.g. Salesforce/blip-vqa-base): greedy answer, lower-cased."""

    def __init__(self, path: str, device: str = "cpu", model=None, processor=None):
        from transformers import BlipForQuestionAnswering, BlipProcessor

        self.model = (model or BlipForQuestionAnswering.from_pretrained(path)).to(device).eval()
        self.proc = processor or BlipProcessor.from_pretrained(path)
        self.device = device

    def __call__(self, image, question: str) -> str:
        import torch

        inputs = self.proc(images=image, text=question, return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=10)
        return self.proc.decode(out[0], skip_special_tokens=True).strip().lower()


class MplugVQA:
    """The official backend, through ModelScope (``pip install modelscope`` and its cache)."""

    def __init__(self, model_id: str = "damo/mplug_visual-question-answering_coco_large_en", device: str = "cpu"):
        try:
            from modelscope.pipelines import pipeline
        except ImportError:
            raise UserError("DPG-Bench's official VQA (mPLUG) needs modelscope: pip install modelscope") from None
        self.pipe = pipeline("visual-question-answering", model=model_id, device=device)

    def __call__(self, image, question: str) -> str:
        return self.pipe({"image": image, "question": question})["text"]


def run(bench: dict, image_dir: Path, out_dir: Path, device: str = "cpu") -> dict[str, float]:
    """The ``dpg`` metric: every ``<item_id>.png`` grid in image_dir that the question CSV knows."""
    import json

    from PIL import Image

    from eval.datasets import data_dir, need
    from varbench.weights import resolve_files, weights_dir

    d = bench.get("dpg") or {}
    quirks = bool(d.get("official_quirks", True))
    items = load_csv(need("dpg_bench", "dpg_bench.csv", data_dir(bench.get("data_dir"))), quirks)
    if d.get("vqa", "mplug") == "mplug":
        vqa = MplugVQA(device=device)
    else:
        p = resolve_files({"vqa": dict(d["files"]["vqa"])}, weights_dir(d.get("weights_dir")), "bench.dpg.weights_dir")
        vqa = BlipVQA(str(p["vqa"]), device)
    from eval.cache import ScoreCache

    cache = ScoreCache(out_dir / "dpg_cache.jsonl", image_dir)
    per_image = []
    for img_path in sorted(Path(image_dir).glob("*.png")):
        if img_path.stem in items:  # the official script skips unknown stems
            hit = cache.get(img_path)
            if hit is None:
                s, tiles = score_image(Image.open(img_path).convert("RGB"), items[img_path.stem], vqa,
                                       int(d.get("pic_num", 4)))
                cache.put(img_path, [s, [[{str(k): v for k, v in o.items()}, {str(k): v for k, v in f.items()}]
                                         for o, f in tiles]])
            else:
                s, tiles = hit[0], [({int(k): v for k, v in o.items()}, {int(k): v for k, v in f.items()})
                                    for o, f in hit[1]]
            per_image.append((items[img_path.stem], s, tiles))
    (out_dir / "dpg_results.jsonl").write_text("".join(json.dumps({"item_id": it.item_id, "score": s}) + "\n"
                                                       for it, s, _ in per_image))
    return summarize(per_image, quirks)
