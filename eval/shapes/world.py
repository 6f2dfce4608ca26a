"""The shapes world: flat-coloured circles, squares and triangles on white, with GenEval-like prompts.

Everything is deterministic from a seed and needs no files. Each prompt carries GenEval-format metadata (``tag``,
``include`` / ``exclude`` clauses with class, count, colour, position), so ShapesEval reuses GenEval's rules
(``eval/geneval/rules.py``) with an exact detector (``eval/shapes/scorer.py``) instead of a neural one.
Tags: single_object, two_object, counting, colors, position, color_attr (GenEval's six).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 180), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass
class Obj:
    shape: str
    color: str
    box: tuple[int, int, int, int]   # x1, y1, x2, y2 (exclusive)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(shape: str, color: str | None = None) -> str:
    w = f"{color} {shape}" if color else shape
    return f"{_article(w)} {w}"


def make_prompt(tag: str, rng: random.Random) -> dict:
    """One GenEval-style metadata record for a tag."""
    s1, s2 = rng.sample(SHAPES, 2)
    c1, c2 = rng.sample(sorted(COLORS), 2)
    if tag == "single_object":
        return {"tag": tag, "prompt": _np(s1), "include": [{"class": s1, "count": 1}]}
    if tag == "colors":
        return {"tag": tag, "prompt": _np(s1, c1), "include": [{"class": s1, "count": 1, "color": c1}]}
    if tag == "two_object":
        return {"tag": tag, "prompt": f"{_np(s1)} and {_np(s2)}",
                "include": [{"class": s1, "count": 1}, {"class": s2, "count": 1}]}
    if tag == "counting":
        n = rng.choice(sorted(NUMBERS))
        return {"tag": tag, "prompt": f"{NUMBERS[n]} {s1}s", "include": [{"class": s1, "count": n}],
                "exclude": [{"class": s1, "count": n + 1}]}
    if tag == "position":
        rel = rng.choice(RELATIONS)
        return {"tag": tag, "prompt": f"{_np(s2)} {rel} {_np(s1)}",
                "include": [{"class": s1, "count": 1}, {"class": s2, "count": 1, "position": [rel, 0]}]}
    if tag == "color_attr":
        return {"tag": tag, "prompt": f"{_np(s1, c1)} and {_np(s2, c2)}",
                "include": [{"class": s1, "count": 1, "color": c1}, {"class": s2, "count": 1, "color": c2}]}
    raise ValueError(f"unknown tag {tag!r}")


def prompt_set(n_per_tag: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [make_prompt(tag, rng) for tag in TAGS for _ in range(n_per_tag)]


def layout(meta: dict, size: int, rng: random.Random) -> list[Obj]:
    """Objects satisfying the metadata (colours drawn at random where unspecified), non-overlapping."""
    objs: list[Obj] = []
    inc = meta["include"]
    for k, req in enumerate(inc):
        for _ in range(req["count"]):
            color = req.get("color") or rng.choice(sorted(c for c in COLORS if all(o.color != c for o in objs)) or sorted(COLORS))
            objs.append(Obj(req["class"], color, (0, 0, 0, 0)))
    side = max(8, int(size * (0.32 if len(objs) <= 2 else 0.24)))
    for _ in range(200):  # rejection sampling of positions
        boxes = []
        for o in objs:
            x, y = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
            boxes.append((x, y, x + side, y + side))
        if any(_overlap(a, b, gap=2) for i, a in enumerate(boxes) for b in boxes[i + 1:]):
            continue
        if "position" in inc[-1]:
            from eval.geneval.rules import Det, relative_position

            rel = inc[-1]["position"][0]
            if rel not in relative_position(Det(boxes[-1], 1.0), Det(boxes[0], 1.0)):
                continue
        return [Obj(o.shape, o.color, b) for o, b in zip(objs, boxes)]
    raise RuntimeError(f"could not lay out {meta['prompt']!r} on {size}px")


def _overlap(a, b, gap=0) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def render(objs: list[Obj], size: int):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for o in objs:
        x1, y1, x2, y2 = o.box
        c = COLORS[o.color]
        if o.shape == "circle":
            d.ellipse((x1, y1, x2 - 1, y2 - 1), fill=c)
        elif o.shape == "square":
            d.rectangle((x1, y1, x2 - 1, y2 - 1), fill=c)
        else:
            d.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=c)
    return im


def sample(meta: dict, size: int = 64, seed: int = 0):
    """A ground-truth image of the prompt (PIL) and its objects."""
    rng = random.Random(seed)
    objs = layout(meta, size, rng)
    return render(objs, size), objs
