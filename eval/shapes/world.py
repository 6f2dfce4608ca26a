"""The shapes world: circles, squares and triangles with GenEval-like prompts, on textured backgrounds.

Everything is deterministic from a seed and needs no files. Each prompt carries GenEval-format metadata (``tag``,
``include`` / ``exclude`` clauses with class, count, colour, position), so ShapesEval reuses GenEval's rules
(``eval/geneval/rules.py``) with an exact detector (``eval/shapes/scorer.py``) instead of a neural one.
Tags: single_object, two_object, counting, colors, position, color_attr (GenEval's six).

Fine-scale detail (issue 18). Objects and background carry textures drawn from seeded stochastic families, so an
image is not determined by its layout: the scales that resolve a texture have real, image-dependent uncertainty
(NOVA's premise: structure first, then detail). Families, each with a random scale (period / correlation length,
2-16 px at 64 px), orientation and phase:

  plain     no texture (a flat fill, or the white background)
  grain     i.i.d. per-pixel noise
  stripes   a sine wave at a random period, angle and phase
  gradient  a linear ramp at a random angle
  noise     smooth noise (Gaussian-filtered white noise at a random correlation length)
  checks    a checkerboard of sine waves at a random period and phase

In training data (``with_background``) the background family is named in the prompt half of the time ("a red circle
on stripes"), so the text conditions part of the detail and leaves the rest to chance; the ShapesEval prompts
(``prompt_set``) name none and are the same as before the textures.

Layouts: ``placement="random"`` draws positions anywhere (the world before anchoring); ``placement="anchored"`` (what
``model=tiny`` is trained on) puts objects where the prompt says (``SLOTS``: count, prompt order, relation) up to
sub-token jitter, so the coarse scales are predictable from the text and edges, sizes and textures are left to chance.

Textures stay inside bounds that keep ShapesEval exact
(``tests/test_shapes.py``): the background is grey-darkened by at most ``BG_AMP`` per channel (L2 from white
< the scorer's 60), object fills move by at most ``FILL_AMP`` per channel around their colour (every object pixel
stays > 150 from white and its median names the colour).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from eval.geneval.rules import Det, relative_position

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 180), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
FAMILIES = ("plain", "grain", "stripes", "gradient", "noise", "checks")
BG_WORDS = {"plain": "white", "grain": "grain", "stripes": "stripes", "gradient": "a gradient", "noise": "noise",
            "checks": "checks"}
BG_AMP = (14.0, 26.0)     # per-channel darkening of the background, px value range (max L2 from white 26·√3 < 60)
FILL_AMP = (12.0, 34.0)   # per-channel amplitude of an object's fill texture around its colour


@dataclass
class Texture:
    family: str = "plain"
    amp: float = 0.0      # pixel-value amplitude
    scale: float = 4.0    # period (stripes, checks) or correlation length (noise), px at 64 px
    angle: float = 0.0    # radians (stripes, gradient)
    phase: float = 0.0    # radians (stripes, checks)
    seed: int = 0         # grain, noise


@dataclass
class Obj:
    shape: str
    color: str
    box: tuple[int, int, int, int]   # x1, y1, x2, y2 (exclusive)
    texture: Texture | None = None   # fill texture (None = flat)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(shape: str, color: str | None = None) -> str:
    w = f"{color} {shape}" if color else shape
    return f"{_article(w)} {w}"


def _objects_prompt(tag: str, rng: random.Random) -> dict:
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


def make_prompt(tag: str, rng: random.Random) -> dict:
    """One GenEval-style metadata record for a tag (the ShapesEval prompts: they name no background)."""
    return _objects_prompt(tag, rng)


def with_background(meta: dict, rng: random.Random) -> dict:
    """The record with a background family (``background``) and whether the prompt names it (``background_named``,
    half the time; then the prompt ends in " on <family>"). Training data (scripts/train_tiny.py --world textured)."""
    meta = dict(meta, background=rng.choice(FAMILIES), background_named=rng.random() < 0.5)
    if meta["background_named"]:
        meta["prompt"] += f" on {BG_WORDS[meta['background']]}"
    return meta


def prompt_set(n_per_tag: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [make_prompt(tag, rng) for tag in TAGS for _ in range(n_per_tag)]


def random_texture(family: str, amp_range: tuple[float, float], rng: random.Random) -> Texture:
    """A texture of a family with seeded random amplitude, scale (log-uniform 2-16 px), angle and phase."""
    if family == "plain":
        return Texture()
    return Texture(family, rng.uniform(*amp_range), math.exp(rng.uniform(math.log(2.0), math.log(16.0))),
                   rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi), rng.randrange(1 << 30))


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Periodic Gaussian blur of a 2-D array (FFT; numpy only)."""
    fy = np.fft.fftfreq(a.shape[0])[:, None]
    fx = np.fft.fftfreq(a.shape[1])[None, :]
    return np.real(np.fft.ifft2(np.fft.fft2(a) * np.exp(-2 * (math.pi * sigma) ** 2 * (fx ** 2 + fy ** 2))))


def texture_field(t: Texture, size: int) -> np.ndarray:
    """The texture's field in [-1, 1], float64 [size, size] (scale given at 64 px, scaled with the image)."""
    k = size / 64.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / k
    if t.family == "plain":
        return np.zeros((size, size))
    if t.family == "grain":
        return np.random.RandomState(t.seed).uniform(-1, 1, (size, size))
    if t.family == "stripes":
        return np.sin(2 * math.pi * (x * math.cos(t.angle) + y * math.sin(t.angle)) / t.scale + t.phase)
    if t.family == "gradient":
        u = x * math.cos(t.angle) + y * math.sin(t.angle)
        return (u - u.min()) / max(u.max() - u.min(), 1e-9) * 2 - 1
    if t.family == "noise":
        f = gaussian_blur(np.random.RandomState(t.seed).randn(size, size), t.scale * k / 2)
        return np.clip(f / max(f.std(), 1e-9) / 2, -1, 1)
    if t.family == "checks":
        w = 2 * math.pi / t.scale
        return np.sin(w * x + t.phase) * np.sin(w * y + t.phase / 2)
    raise ValueError(f"unknown texture family {t.family!r}")


# Anchored layouts (``layout(..., placement="anchored")``): object centres at 64 px, by object count, before jitter.
# Two objects sit side by side in prompt order ("A and B": A left), or as the relation says ("A above B": A on top).
SLOTS = {1: [(32, 32)], 2: [(16, 32), (48, 32)], 3: [(18, 20), (46, 20), (32, 46)],
         4: [(18, 18), (46, 18), (18, 46), (46, 46)]}
JITTER = 3        # anchored: centres move by up to ±JITTER px (64-px units), less than one 16-grid token (4 px)
SIDE_JITTER = 2   # anchored: object sides vary by up to ±SIDE_JITTER px


def _anchor_centres(meta: dict, n: int) -> list[tuple[int, int]]:
    if n != 2:
        return list(SLOTS[n])
    rel = meta["include"][-1].get("position", [None])[0]
    (lx, ly), (rx, ry) = SLOTS[2]
    if rel in ("above", "below"):
        (lx, ly), (rx, ry) = (ly, lx), (ry, rx)      # the vertical pair: first slot on top
    # include order is [B, A(rel B)]: the slot of A is the first one for "left of"/"above"
    return [(rx, ry), (lx, ly)] if rel in ("left of", "above") else [(lx, ly), (rx, ry)]


def layout(meta: dict, size: int, rng: random.Random, placement: str = "random") -> list[Obj]:
    """Objects satisfying the metadata (colours drawn at random where unspecified), non-overlapping.

    ``placement="random"``: positions drawn uniformly (rejection sampling; the world before issue 18's anchoring).
    ``placement="anchored"``: positions are a function of the prompt (``SLOTS``: count, prompt order, relation) up
    to sub-token jitter, so coarse scales are predictable from the text and the uncertainty that is left sits in
    edges, sizes and textures (issue 18: NOVA's structure-first premise)."""
    if placement not in ("random", "anchored"):
        raise ValueError(f"unknown placement {placement!r} (random | anchored)")
    objs: list[Obj] = []
    inc = meta["include"]
    for k, req in enumerate(inc):
        for _ in range(req["count"]):
            color = req.get("color") or rng.choice(sorted(c for c in COLORS if all(o.color != c for o in objs)) or sorted(COLORS))
            objs.append(Obj(req["class"], color, (0, 0, 0, 0)))
    side = max(8, int(size * (0.32 if len(objs) <= 2 else 0.24)))
    px = size / 64.0   # SLOTS and jitters are given at 64 px
    centres = _anchor_centres(meta, len(objs)) if placement == "anchored" else None
    for _ in range(200):  # rejection sampling of positions
        boxes = []
        for i, o in enumerate(objs):
            if centres is None:
                x, y = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
                boxes.append((x, y, x + side, y + side))
                continue
            sd = side + round(rng.randint(-SIDE_JITTER, SIDE_JITTER) * px)
            cx = round((centres[i][0] + rng.uniform(-JITTER, JITTER)) * px)
            cy = round((centres[i][1] + rng.uniform(-JITTER, JITTER)) * px)
            x, y = min(max(cx - sd // 2, 1), size - sd - 1), min(max(cy - sd // 2, 1), size - sd - 1)
            boxes.append((x, y, x + sd, y + sd))
        if any(_overlap(a, b, gap=2) for i, a in enumerate(boxes) for b in boxes[i + 1:]):
            continue
        if "position" in inc[-1]:
            rel = inc[-1]["position"][0]
            if rel not in relative_position(Det(boxes[-1], 1.0), Det(boxes[0], 1.0)):
                continue
        return [Obj(o.shape, o.color, b) for o, b in zip(objs, boxes)]
    raise RuntimeError(f"could not lay out {meta['prompt']!r} on {size}px")


def _overlap(a, b, gap=0) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _masks(objs: list[Obj], size: int):
    """Per object, its boolean mask as drawn (PIL: ellipse, rectangle, apex-up triangle)."""
    from PIL import Image, ImageDraw

    out = []
    for o in objs:
        im = Image.new("L", (size, size), 0)
        d = ImageDraw.Draw(im)
        x1, y1, x2, y2 = o.box
        if o.shape == "circle":
            d.ellipse((x1, y1, x2 - 1, y2 - 1), fill=255)
        elif o.shape == "square":
            d.rectangle((x1, y1, x2 - 1, y2 - 1), fill=255)
        else:
            d.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=255)
        out.append(np.asarray(im) > 0)
    return out


def render(objs: list[Obj], size: int, background: Texture | None = None):
    """The image (PIL RGB): the background (white, darkened in grey by its texture) and each object's colour plus
    its fill texture (flat when None)."""
    from PIL import Image

    bg = background or Texture()
    grey = 255.0 - bg.amp * (texture_field(bg, size) + 1) / 2
    img = np.repeat(grey[:, :, None], 3, axis=2)
    for o, m in zip(objs, _masks(objs, size)):
        fill = np.asarray(COLORS[o.color], np.float64)[None, None, :].repeat(size, 0).repeat(size, 1)
        if o.texture is not None and o.texture.family != "plain":
            fill = fill + o.texture.amp * texture_field(o.texture, size)[:, :, None]
        img[m] = fill[m]
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def sample(meta: dict, size: int = 64, seed: int = 0, textures: bool = True, placement: str = "random"):
    """A ground-truth image of the prompt (PIL) and its objects (with their fill textures). The background family
    is the metadata's (drawn when absent); its parameters and the fills are drawn from the seed.
    ``textures=False``: the flat world before issue 18 (white background, flat fills; the same pixels as then).
    ``placement``: see ``layout``."""
    rng = random.Random(seed)
    objs = layout(meta, size, rng, placement)
    if not textures:
        return render(objs, size), objs
    bg = random_texture(meta.get("background") or rng.choice(FAMILIES), BG_AMP, rng)
    objs = [Obj(o.shape, o.color, o.box, random_texture(rng.choice(FAMILIES), FILL_AMP, rng)) for o in objs]
    return render(objs, size, bg), objs
