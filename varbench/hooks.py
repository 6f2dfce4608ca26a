"""The hook points of the generation loop, the typed contexts methods see, and the ``Method`` base class.

A method (NOVA, FastVAR, ...) subclasses :class:`Method` and overrides only the hooks it needs; the loop
(``varbench/loop.py``) calls them in this order for each scale ``si`` (one batch of images):

    plan_scale(sctx)                         -> ScalePlan: compute / skip the scale, keep / drop the uncond branch
    for each layer li (and, if granularity == "branch", for each branch of the block):
        attention(lctx)                      -> an attention kernel for this (scale, layer), or None (default)
        select(lctx, x)                      -> Selection of tokens to compute, or None (all tokens)
        restore(lctx, x_in, y_kept, sel)     -> full output of the unit (default: others keep their input)
        after_layer(lctx, x_in, x_out)       once per block
        compress_kv(lctx, kv)                -> KVEdit: what this layer's self-attention cache keeps, or None (all)
    after_logits(sctx, cond, uncond, guided) -> replacement guided logits, or None
    code_mask(sctx)                          -> [B, n] bool: tokens whose sampled codes are set to 0, or None
    after_scale(sctx, state)

Logits reach ``after_logits`` before any top-k/top-p filtering and are never edited in place by the sampler.
``lctx.head_logits(h)`` applies the backbone's head to any hidden state ("logit lens"); ``lctx.guide(logits)``
turns such logits into (cond, uncond, guided) exactly as the sampler's input is formed (CFG, temperature).
``lctx.lens_entropy(h, mix)``, where a backbone offers it (Infinity), is the entropy of those logits computed with the
head folded (``mix="guided"``: of the guided logits; ``"rows"``: of each row's logits / temperature): same values up
to float rounding, a fraction of the cost.
``compress_kv`` runs after the block, i.e. after this scale's keys/values were appended to the layer's cache and
attended (ScaleKV compresses there: Lvar ``scale_kv.py``, the patched forward runs the original attention first); the
edit shapes what later scales attend, the FLOP count (``kv_len`` of later scales) and the KV bytes recorded. The
loop calls it only for methods whose ``uses_kv_hook()`` is true (default: ``compress_kv`` is overridden).
Methods never receive the backbone: ``sctx.spec`` and ``sctx.schedule`` describe it, ``sctx.preview`` decodes a
state (the state object passed to ``after_scale`` is opaque to methods).

A method declares, next to its code and in one format: its ``Config`` (a dataclass extending :class:`MethodConfig`;
the Hydra schema of ``conf/method/<name>.yaml``), ``CITATION``, ``STATUS`` and ``FOOTNOTE`` (shown in tables),
``NOOP`` (options under which it changes nothing; the contract suite checks bit-identity with ``method=none``),
``FAMILIES`` (backbone families it supports), its token accounting (``self.claim`` / ``self.claim_skip``, checked
against what the loop measured) and its run-level metrics (``aggregate``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from varbench.backbones.base import BackboneSpec, ScaleInfo
from varbench.tokens import Selection


@dataclass
class MethodConfig:
    """Fields every method config has. ``name`` labels the run/row (``nova_attn``); ``family`` picks the class."""

    name: str = "none"
    family: str = "none"
    footnote: str | None = None   # table footnote for rows of this config (default: the class's FOOTNOTE)


@dataclass
class ScalePlan:
    skip: bool = False        # do not compute this scale (its codes are not added; decoding still happens)
    cond_only: bool = False   # drop the unconditional CFG branch from this scale on (rows, caches sliced)
    input_resize: str | None = None   # resize of the accumulated codes to this grid: None = the backbone's own;
                                      # an F.interpolate mode (SparseVAR-Lvar: "area"), for backbones that take it


@dataclass
class ScaleCtx:
    si: int
    num_scales: int
    hw: tuple[int, int]
    rows: int                 # batch rows in the transformer (2B with CFG)
    batch: int                # images B
    spec: BackboneSpec
    schedule: tuple[ScaleInfo, ...] = ()
    rule_w: int = 0           # width for width-keyed method rules (= hw[1] except on custom schedules)
    preview: Callable[[Any, int], torch.Tensor] | None = None   # (state, si) -> images [B,3,H,W] on scale si's grid

    @property
    def n(self) -> int:
        """Tokens fed to the blocks at this scale."""
        return self.schedule[self.si].n if self.schedule else self.hw[0] * self.hw[1]


@dataclass
class KVState:
    """One layer's self-attention cache as ``compress_kv`` sees it: right after scale ``si`` appended ``new`` keys
    (the last ``new`` positions of ``k``/``v``) and its queries attended them."""

    k: torch.Tensor                    # [rows, H, L, c] cached keys (as the backbone caches them: normed, RoPE'd)
    v: torch.Tensor                    # [rows, H, L, c]
    q: torch.Tensor | None             # [rows, H, K, c] this scale's queries as the attention kernel received them
    new: int                           # keys this scale appended (K computed tokens)
    new_pos: torch.Tensor | None = None  # [rows|1, K] grid index (0..h*w-1) of each appended key; None: 0..K-1
    segments: tuple[int, ...] = ()     # keys each scale appended (scale order, this scale last; before any edit)
    attn_scale: float | None = None    # the scale the kernel multiplied q·k by (logits = attn_scale · q·kᵀ)
    raw_q: Callable[[], torch.Tensor] | None = None   # this scale's raw q projection (LayerCtx.raw_query), if offered

    @property
    def length(self) -> int:
        return self.k.shape[2]


@dataclass
class KVEdit:
    """What a layer's cache keeps: ``keep_idx`` [rows|1, H|1, L'] int64 positions into the cache (per row and
    head; the loop gathers keys and values with them), or replacement tensors ``k``/``v`` [rows, H, L', c] (pooled)."""

    keep_idx: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def apply(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keep_idx is None:
            if self.k is None or self.v is None:
                raise ValueError("KVEdit needs keep_idx or both replacement tensors k and v")
            return self.k, self.v
        idx = self.keep_idx.to(k.device)
        idx = idx.expand(k.shape[0], k.shape[1], -1)[..., None].expand(-1, -1, -1, k.shape[3])
        return k.gather(2, idx), v.gather(2, idx)


@dataclass
class LayerCtx:
    scale: ScaleCtx
    li: int
    branch: str | None = None          # None: the whole block is one unit
    kv_len: int = 0                    # keys already cached for this layer before this scale
    kv_segments: tuple[int, ...] = ()  # keys each earlier scale added to this layer's cache (scale order)
    head_logits: Callable[[torch.Tensor], torch.Tensor] | None = None   # backbone head on any hidden state
    guide: Callable[[torch.Tensor], tuple] | None = None                # logits -> (cond, uncond, guided), as for sampling
    lens_entropy: Callable[..., torch.Tensor] | None = None             # (h, mix) -> lens entropy maps, folded head (if offered)
    attn_keys: float | None = None     # set by a sparse attention kernel: mean keys attended per query (FLOP count)
    raw_query: Callable[[], torch.Tensor] | None = None   # set by the backbone's self-attention: this scale's raw q
    #                                  projection [rows, H, K, c] (no bias/norm/RoPE), computed when called
    kv_positions: torch.Tensor | None = None   # [rows|1, H|1, L] token position (scale offset + grid index) of each
    #                                  key the kernel receives; None: key j is token j (nothing pruned or compressed),
    #                                  or the method does not read positions (Method.needs_kv_positions False)
    extra: dict = field(default_factory=dict)

    @property
    def si(self) -> int:
        return self.scale.si


class Method:
    """Base class: a method that changes nothing (``method=none``). Subclasses override hooks and class facts."""

    name: str = "none"         # the row name, from the config (nova_attn, fastvar_8b, ...)
    Config: ClassVar[type] = MethodConfig
    CITATION: ClassVar[str] = ""
    STATUS: ClassVar[str] = "the backbone's own inference"
    FOOTNOTE: ClassVar[str | None] = None
    NOOP: ClassVar[dict] = {}                       # options under which the method changes nothing
    FAMILIES: ClassVar[tuple[str, ...] | None] = None   # backbone families supported (None: all)
    granularity: ClassVar[str] = "block"   # "block": select once per block; "branch": before each branch
    batch_rectangular: ClassVar[bool] = True  # False: decisions are per image (the runner then uses batch 1)
    needs_kv_positions: ClassVar[bool] = False  # True: the loop tracks each cached key's token position and hands it
    #                                            to the kernels as lctx.kv_positions (SparVAR on a compressed cache)

    def __init__(self, cfg: MethodConfig | None = None):
        self.cfg = cfg if cfg is not None else self.Config()
        self.name = self.cfg.name
        self.claims: dict[tuple[int, int], list[int]] = {}
        self.claimed_skips: list[int] = []
        self.reset()

    # ---- called by the loop
    def start(self) -> None:
        """Before scale 0 of every batch: clear the token accounting, then the method's own state."""
        self.claims, self.claimed_skips = {}, []
        self.reset()

    def reset(self) -> None:
        """Clear per-image state (called once per batch, before scale 0)."""

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

    def compress_kv(self, lctx: LayerCtx, kv: KVState) -> KVEdit | None:
        """After the block: which of this layer's cached keys/values later scales keep (None: all)."""
        return None

    def uses_kv_hook(self) -> bool:
        """Does the loop call ``compress_kv`` (and hand it this scale's queries)? Default: the hook is overridden."""
        return type(self).compress_kv is not Method.compress_kv

    def after_logits(self, sctx: ScaleCtx, logits_cond, logits_uncond, logits_guided):
        return None

    def code_mask(self, sctx: ScaleCtx) -> torch.Tensor | None:
        """[B, n] bool: tokens of this scale whose sampled codes are set to zero before they are accumulated
        (SparseVAR as Lvar runs it), or None. Backbones whose ``update`` takes ``zero`` (Infinity) apply it; a method
        that returns one declares ``FAMILIES`` accordingly."""
        return None

    def after_scale(self, sctx: ScaleCtx, state) -> None:
        pass

    def summary(self) -> dict:
        """Fields added to each image's record (e.g. NOVA's activation scale)."""
        return {}

    # ---- token accounting, one format for every method (checked by tests/test_methods_contract.py)
    def claim(self, lctx: LayerCtx, k: int) -> None:
        """State that the current unit (scale, layer[, branch]) computes ``k`` tokens."""
        self.claims.setdefault((lctx.si, lctx.li), []).append(int(k))

    def claim_skip(self, sctx: ScaleCtx) -> None:
        """State that scale ``sctx.si`` is skipped."""
        self.claimed_skips.append(sctx.si)

    # ---- run level
    def footnote(self) -> str | None:
        return self.cfg.footnote or self.FOOTNOTE

    @classmethod
    def aggregate(cls, summaries: list[dict]) -> dict[str, tuple[float, int]]:
        """Run-level metrics from the per-image summaries: metric -> (value, n). Default: none."""
        return {}

    @classmethod
    def report(cls, records: list[dict], out_dir, title: str = "") -> list:
        """The method's own figures from a run's records, written into ``out_dir``; returns their paths."""
        return []

    def check_schedule(self, schedule) -> str | None:
        """Before anything is written: one warning line if this method can never act on ``schedule`` (the backbone's
        scales), else None; raise ``UserError`` if it cannot run on it at all."""
        return None
