"""The hook points of the generation loop, and the ``Method`` base class whose hooks all do nothing.

A method (NOVA, FastVAR, ...) subclasses :class:`Method` and overrides only the hooks it needs; the loop
(``varbench/loop.py``) calls them in this order for each scale ``si`` (one batch of images):

    plan_scale(sctx)                         -> ScalePlan: compute / skip the scale, keep / drop the uncond branch
    for each layer li (and, if granularity == "branch", for each branch of the block):
        attention(lctx)                      -> an attention kernel for this (scale, layer), or None (default)
        select(lctx, x)                      -> Selection of tokens to compute, or None (all tokens)
        restore(lctx, x_in, y_kept, sel)     -> full output of the unit (default: others keep their input)
        after_layer(lctx, x_in, x_out)       (block granularity: once per block; branch: once per block too)
    after_logits(sctx, cond, uncond, guided) -> replacement guided logits, or None
    after_scale(sctx, state)

Logits reach ``after_logits`` before any top-k/top-p filtering and are never edited in place by the sampler.
``lctx.head_logits(h)`` applies the backbone's head to any hidden state ("logit lens"); ``lctx.guide(logits)``
turns such logits into (cond, uncond, guided) exactly as the sampler's input is formed (CFG, temperature).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from varbench.tokens import Selection


@dataclass
class ScalePlan:
    skip: bool = False        # do not compute this scale (its codes are not added; decoding still happens)
    cond_only: bool = False   # drop the unconditional CFG branch from this scale on (rows, caches sliced)


@dataclass
class ScaleCtx:
    si: int
    num_scales: int
    hw: tuple[int, int]
    rows: int                 # batch rows in the transformer (2B with CFG)
    batch: int                # images B
    backbone: Any
    rule_w: int = 0           # width for width-keyed method rules (= hw[1] except on custom schedules)


@dataclass
class LayerCtx:
    scale: ScaleCtx
    li: int
    branch: str | None = None          # None: the whole block is one unit
    kv_len: int = 0                    # keys already cached for this layer before this scale
    head_logits: Callable[[torch.Tensor], torch.Tensor] | None = None   # backbone head on any hidden state
    guide: Callable[[torch.Tensor], tuple] | None = None                # logits -> (cond, uncond, guided), as for sampling
    extra: dict = field(default_factory=dict)

    @property
    def si(self) -> int:
        return self.scale.si


class Method:
    """Base class: a method that changes nothing. Subclasses set ``name``, ``CITATION`` and override hooks."""

    name: ClassVar[str] = "none"
    CITATION: ClassVar[str] = ""
    granularity: ClassVar[str] = "block"   # "block": select once per block; "branch": before each of sa/ca/ffn
    batch_rectangular: ClassVar[bool] = True  # False: decisions are per image (the runner then uses batch 1)

    def reset(self, sctx: ScaleCtx | None = None) -> None:
        """Called once per batch, before scale 0: clear per-image state."""

    def plan_scale(self, sctx: ScaleCtx) -> ScalePlan:
        return ScalePlan()

    def attention(self, lctx: LayerCtx):
        return None

    def select(self, lctx: LayerCtx, x_BLC: torch.Tensor) -> Selection | None:
        return None

    def restore(self, lctx: LayerCtx, x_in_BLC: torch.Tensor, y_BKC: torch.Tensor, sel: Selection) -> torch.Tensor:
        return sel.scatter(y_BKC, x_in_BLC)

    def after_layer(self, lctx: LayerCtx, x_in_BLC: torch.Tensor, x_out_BLC: torch.Tensor) -> None:
        pass

    def after_logits(self, sctx: ScaleCtx, logits_cond, logits_uncond, logits_guided):
        return None

    def after_scale(self, sctx: ScaleCtx, state) -> None:
        pass

    def summary(self) -> dict:
        """Fields added to each image's record (e.g. NOVA's activation scale)."""
        return {}
