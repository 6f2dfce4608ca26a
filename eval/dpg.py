"""DPG-Bench (ELLA, TencentQQGYLab @3c228f1): VQA on each tile of a 2x2 grid, dependency-aware scoring, categories.

Re-implemented from the official ``dpg_bench/compute_dpg_bench.py`` behaviour (shared/specs/evaluation.md §2):
  * a grid image ``<item_id>.png`` of 4 tiles of R px; every question of the item is asked on every tile; score 1
    iff the answer is exactly "yes";
  * per tile, in question order, a question is zeroed if a parent in its dependency list (0 = none) scores 0 —
    **in place**, so zeros cascade down the dependency chain as in the official loop; tile score = mean;
    image score = mean of the tiles; DPG overall = 100 x mean image score;
  * category scores (L2 = text of ``tuple`` before "(", L1 = L2 before the first "-", both stripped, as the
    official ``category.split('-')[0].strip()``; so "global - (...)" counts in "global"): 100 x mean of per-question
    scores pooled over images;
  * an image whose item names a parent question the item does not have (item 1: the official loader drops CSV
    row 0, its question 1, which the other questions depend on) raises ``KeyError`` in the official loop, which
    then skips the image ("Failed filename"); we skip it too and log one warning line naming the item.
``official_quirks=True`` reproduces the official script: categories use the scores **before** dependency zeroing
and of the **last tile only**, the CSV's first data row is skipped and images with a missing parent are skipped.
``False``: all tiles, after zeroing, all rows, and a missing parent is ignored (the question is scored).
VQA backends: ``mplug`` (official, ModelScope ``damo/mplug_visual-question-answering_coco_large_en``) or ``blip``
(transformers ``BlipForQuestionAnswering``; not official: numbers shift).
"""
from __future__ import annotations

import csv
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

from eval.cache import ScoreCache
from eval.datasets import data_dir, need
from varbench.errors import UserError
from varbench.weights import resolve_files, weights_dir

log = logging.getLogger(__name__)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class MissingParent(KeyError):
    """A dependency names a proposition the item does not have (the official loop's KeyError)."""


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


def tile_scores(answers: dict[int, str], dependency: dict[int, list[int]],
                strict: bool = True) -> tuple[dict[int, float], dict[int, float]]:
    """(scores before zeroing, scores after the official in-place, question-order dependency zeroing).

    Per question the parents are visited in order as in the official loop: 0 is skipped, the first parent that
    scores 0 zeroes the question and ends the visit; a parent that is not a question of the item raises
    ``MissingParent`` (``strict``, the official ``KeyError``) or is ignored (``strict=False``)."""
    scores = {q: float(a == "yes") for q, a in answers.items()}
    orig = dict(scores)
    for q, parents in dependency.items():
        if q not in scores:
            continue
        for p in parents:
            if p == 0:
                continue
            if p not in scores:
                if strict:
                    raise MissingParent(p)
                continue
            if scores[p] == 0:
                scores[q] = 0.0
                break
    return orig, scores


def score_image(image, item: Item, vqa, pic_num: int = 4,
                strict: bool = True) -> tuple[float, list[tuple[dict, dict]]]:
    """Mean over tiles of the mean dependency-filtered score; also every tile's (orig, filtered) scores.
    ``MissingParent`` propagates when ``strict`` (the caller skips the image, as the official script does)."""
    R = image.width // 2
    boxes = [(0, 0, R, R), (R, 0, 2 * R, R), (0, R, R, 2 * R), (R, R, 2 * R, 2 * R)][:pic_num]
    tiles, means = [], []
    for b in boxes:
        tile = image.crop(b)
        answers = {q: vqa(tile, text) for q, text in item.questions.items()}
        orig, filt = tile_scores(answers, item.dependency, strict)
        tiles.append((orig, filt))
        means.append(sum(filt.values()) / max(1, len(filt)))
    return sum(means) / len(means), tiles


def category_keys(l2: str) -> list[str]:
    """Table keys of a question's L2 category ("entity - whole" -> dpg_entity/whole) and its L1 (the official
    ``split('-')[0].strip()`` -> dpg_entity). An L2 with nothing after the '-' ("global -") is its L1 ("global")."""
    l1 = l2.split("-")[0].strip()
    rest = l2[len(l2.split("-")[0]) + 1:].strip() if "-" in l2 else ""
    keys = ["dpg_" + l1.replace(" ", "_")]
    if rest:
        keys.append("dpg_" + l1.replace(" ", "_") + "/" + rest.replace(" - ", "/").replace(" ", "_"))
    return keys


def summarize(per_image: list[tuple[Item, float, list]], official_quirks: bool = True) -> dict[str, float]:
    cats: dict[str, list[float]] = {}
    for item, _, tiles in per_image:
        use = [tiles[-1][0]] if official_quirks else [t[1] for t in tiles]
        for scores in use:
            for q, s in scores.items():
                for key in category_keys(item.category[q]):
                    cats.setdefault(key, []).append(s)
    out = {"dpg_overall": 100 * sum(s for _, s, _ in per_image) / max(1, len(per_image))}
    for c, v in cats.items():
        out[c] = 100 * sum(v) / len(v)
    return out


def score_items(images, items: dict[str, Item], vqa, pic_num: int = 4, official_quirks: bool = True,
                cache=None) -> list[tuple[Item, float, list]]:
    """``images``: (item_id, PIL image or a callable returning it, optional cache path) tuples. Stems unknown to
    the CSV are skipped (as the official script); with ``official_quirks`` an item with a missing parent question
    is skipped too, with one warning line."""
    per_image = []
    for entry in images:
        key, img, path = (*entry, None)[:3]
        if key not in items:
            continue
        hit = cache.get(path) if cache is not None and path is not None else None
        if hit is not None:
            if hit == "skipped":
                continue
            s, tiles = hit[0], [({int(k): v for k, v in o.items()}, {int(k): v for k, v in f.items()})
                                for o, f in hit[1]]
        else:
            try:
                s, tiles = score_image(img() if callable(img) else img, items[key], vqa, pic_num, official_quirks)
            except MissingParent as e:
                log.warning("DPG item %s skipped: question(s) depend on proposition %s, which the item lacks (the "
                            "official script's KeyError; bench.dpg.official_quirks=false scores it)", key, e.args[0])
                if cache is not None and path is not None:
                    cache.put(path, "skipped")
                continue
            if cache is not None and path is not None:
                cache.put(path, [s, [[{str(k): v for k, v in o.items()}, {str(k): v for k, v in f.items()}]
                                     for o, f in tiles]])
        per_image.append((items[key], s, tiles))
    return per_image


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


def check(bench: dict) -> dict[str, Path]:
    """The files the ``dpg`` metric needs (question CSV; BLIP weights, or the ModelScope package for mPLUG), checked
    before the first image is generated."""
    d = bench.get("dpg") or {}
    paths = {"csv": need("dpg_bench", "dpg_bench.csv", data_dir(bench.get("data_dir")))}
    if d.get("vqa", "mplug") == "mplug":
        if importlib.util.find_spec("modelscope") is None:
            raise UserError("bench.dpg.vqa=mplug (DPG-Bench's official VQA model) needs ModelScope: "
                            "pip install -e '.[dpg]' (or bench.dpg.vqa=blip)")
    else:
        paths |= resolve_files({"vqa": dict(d["files"]["vqa"])}, weights_dir(d.get("weights_dir")),
                               "bench.dpg.weights_dir")
    return paths


def run(bench: dict, image_dir: Path, out_dir: Path, device: str = "cpu") -> dict[str, float]:
    """The ``dpg`` metric: every ``<item_id>.<ext>`` grid in image_dir that the question CSV knows (the official
    script lists the folder and keys each file by its name before the first '.')."""
    import json

    from PIL import Image

    d = bench.get("dpg") or {}
    quirks = bool(d.get("official_quirks", True))
    paths = check(bench)
    items = load_csv(paths["csv"], quirks)
    vqa = MplugVQA(device=device) if "vqa" not in paths else BlipVQA(str(paths["vqa"]), device)

    cache = ScoreCache(out_dir / "dpg_cache.jsonl", image_dir)
    files = sorted(p for p in Path(image_dir).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    images = [(p.name.split(".")[0], (lambda p=p: Image.open(p).convert("RGB")), p) for p in files]
    per_image = score_items(images, items, vqa, int(d.get("pic_num", 4)), quirks, cache)
    (out_dir / "dpg_results.jsonl").write_text("".join(json.dumps({"item_id": it.item_id, "score": s}) + "\n"
                                                       for it, s, _ in per_image))
    return summarize(per_image, quirks)
