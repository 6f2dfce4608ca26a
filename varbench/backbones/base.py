"""What a next-scale backbone exposes to the loop (``varbench/loop.py``). No method-specific arguments, ever.

A backbone owns its weights and its inference settings (CFG, temperature, top-k/top-p); the loop composes:

    cond  = condition(conditions)                 one per image: a prompt (str: Infinity, HART) or a class label
                                                  (int: VAR), each backbone checking its kind (``text_conditions``,
                                                  ``label_conditions``); CFG as a doubled batch (``cond.rows`` = 2B,
                                                  ``cond.batch`` = B)
    state = init_state(cond)                      accumulated codes
    for scale in scales():                        objects with si, h, w, n (tokens fed), start, rule_w
        x   = scale_input(state, cond, scale)     [rows, n, C], level/position embeddings included
        pos = positions(cond, scale)              per-token positional data; ``gather_positions`` takes a subset
        for li, for branch in spec.branches:      x = x + branch(li, name, x, pos, cond, kv[li], attn_fn, lctx)
            x = after_block(li, x, cond, scale)   (e.g. Infinity's optional CFG insertion at a layer)
        logits = head(x, cond, scale)             logits of the tokens sampled at this scale
        cond_l, uncond_l, guided = guide(logits, cond, scale)
        codes = sample(guided, x, cond, scale, rng)   (``x``: HART's diffusion head needs the last hidden state)
        state = update(state, codes, scale)
    images = decode(state)                        [B, 3, H, W] in [-1, 1]
    preview(state, si)                            the accumulated codes decoded on the grid of scale si (SkipVAR)

Methods never see the backbone: they get :class:`BackboneSpec` (what FLOP counting and entropy need) and
:class:`ScaleInfo` rows through the loop's contexts (``varbench/hooks.py``).
"""
from __future__ import annotations

import numbers
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, Protocol, Union

import torch

from varbench.errors import UserError

Condition = Union[str, int]   # what one image is generated from: a text prompt or a class label


def text_conditions(conditions, name: str) -> list[str]:
    """The prompts of a text-conditioned backbone; anything else is one line naming the first offender."""
    for c in conditions:
        if not isinstance(c, str):
            raise UserError(f"{name} is text-conditioned: each condition must be a prompt (str), got "
                            f"{type(c).__name__} {c!r} (class labels are for class-conditional models such as VAR)")
    return list(conditions)


def label_conditions(conditions, num_classes: int, name: str) -> list[int]:
    """The class labels of a class-conditional backbone: ints 0..num_classes−1, or num_classes for the
    unconditional class; anything else is one line naming the first offender."""
    out = []
    for c in conditions:
        ok = isinstance(c, numbers.Integral) and not isinstance(c, bool) and 0 <= int(c) <= num_classes
        if not ok:
            raise UserError(f"{name} is class-conditional: each condition must be a class label (int 0..{num_classes - 1},"
                            f" {num_classes} = unconditional), got {type(c).__name__} {c!r}")
        out.append(int(c))
    return out


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about a backbone: enough to count FLOPs and compute entropies without loading it."""

    name: str
    depth: int
    embed_dim: int
    num_heads: int
    head_type: str            # "bitwise" (Infinity: d Bernoulli bits per token) or "categorical" (VAR/HART)
    head_dim_out: int         # bits per token (bitwise) or vocabulary size (categorical)
    branches: tuple[str, ...]
    family: str = "infinity"
    mlp_hidden: int = 0       # FFN hidden width (0: 4 x embed_dim)
    mlp_mats: int = 2         # matrices in the FFN: 2 (GELU MLP) or 3 (SwiGLU)
    cross_attn: bool = True   # blocks cross-attend to text (Infinity) or not (HART: text tokens are a prefix)
    conditioning: str = "text"  # what ``condition`` takes per image: "text" (prompts, str) or "class" (labels, int)

    @property
    def head_out(self) -> int:
        """Width of the head's output (bitwise heads emit two logits per bit)."""
        return 2 * self.head_dim_out if self.head_type == "bitwise" else self.head_dim_out

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> BackboneSpec:
        d = dict(d)
        d["branches"] = tuple(d.get("branches", ()))
        return BackboneSpec(**d)


@dataclass(frozen=True)
class ScaleInfo:
    """One scale as methods see it: index, token grid, tokens fed to the blocks, width for width-keyed rules."""

    si: int
    h: int
    w: int
    n: int            # tokens fed to the blocks (h*w; HART's scale 0 feeds its text-context tokens instead)
    rule_w: int       # the width that methods' width-keyed rules see (= w on official schedules)

    @staticmethod
    def of(scale) -> ScaleInfo:
        return ScaleInfo(scale.si, scale.h, scale.w, scale.n, getattr(scale, "rule_w", 0) or scale.w)


class Backbone(Protocol):
    spec: BackboneSpec
    device: torch.device

    def scales(self) -> list: ...
    def condition(self, conditions: list[Condition]) -> Any: ...
    def cond_only(self, cond: Any) -> Any: ...
    def text_lengths(self, cond: Any) -> list[int]: ...
    def init_state(self, cond: Any) -> Any: ...
    def scale_input(self, state: Any, cond: Any, scale) -> torch.Tensor: ...
    def positions(self, cond: Any, scale) -> Any: ...
    def gather_positions(self, pos: Any, sel) -> Any: ...
    def branch(self, li: int, name: str, x: torch.Tensor, pos: Any, cond: Any, kv, attn_fn, lctx) -> torch.Tensor: ...
    def after_block(self, li: int, x: torch.Tensor, cond: Any, scale) -> torch.Tensor: ...
    def head(self, h: torch.Tensor, cond: Any, scale) -> torch.Tensor: ...
    def guide(self, logits: torch.Tensor, cond: Any, scale) -> tuple: ...
    def sample(self, logits: torch.Tensor, h: torch.Tensor, cond: Any, scale, rng: torch.Generator | None) -> torch.Tensor: ...
    def update(self, state: Any, codes: torch.Tensor, scale) -> Any: ...
    def decode(self, state: Any) -> torch.Tensor: ...
    def preview(self, state: Any, si: int) -> torch.Tensor: ...
    def new_kv_cache(self) -> Any: ...
    def precision(self) -> AbstractContextManager: ...
