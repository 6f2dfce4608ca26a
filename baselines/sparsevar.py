"""SparseVAR: frequency-aware token exclusion at high-resolution scales (Chen et al., ICCV 2025, arXiv 2507.20454).

RECONSTRUCTED — no official code or schedule is public (Caesarhhh/SparseVAR holds a README only); every default
below is OURS, and its table rows carry a footnote. What we implement is the published mechanism
(``shared/specs/methods.md`` §3):
  * frequency proxy: per-token MSE between the input and output of block ``score_block`` at the previous scale,
    ΔF_{k−1} = mean_c (F^s − F^{s−1})², interpolated (``interp``) to the current grid; low values = low frequency;
  * one token subset per scale, shared by all blocks and by both CFG rows (the mean of the rows' maps);
  * uniformly spaced anchor tokens (every ``anchor_stride``-th row and column) are always kept;
  * excluded tokens are not computed in any block; their hidden state is restored by ``restore``:
    ``keep_input`` (zero residual; the figure shows Δr only at computed positions) or ``prev_residual`` (each
    block's residual at the previous scale, interpolated, as in NOVA's Eq. 16). The head runs on the full map.
Pruned scales and ratios are keyed by grid width (``ScaleCtx.rule_w``), like FastVAR's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from varbench.errors import UserError
from varbench.hooks import LayerCtx, Method, MethodConfig
from varbench.tokens import ResidualCache, Selection, check_ratio, keep_count, resize_grid


@dataclass
class SparseVARConfig(MethodConfig):
    name: str = "sparsevar"
    family: str = "sparsevar"
    ratios: Any = None              # by scale width; None = OUR defaults {32: 0.3, 40: 0.4, 48: 0.5, 64: 0.5} (unknown)
    score_block: float = 0.5        # block s as a fraction of depth (0.5 = the middle block); OURS
    anchor_stride: int = 4          # OURS
    interp: str = "bilinear"        # OURS
    restore: str = "keep_input"     # keep_input | prev_residual

    def __post_init__(self):
        if self.ratios is None:
            self.ratios = {32: 0.3, 40: 0.4, 48: 0.5, 64: 0.5}
        self.ratios = {int(k): check_ratio(v, f"sparsevar.ratios[{k}]") for k, v in self.ratios.items()}
        if self.restore not in ("keep_input", "prev_residual"):
            raise UserError(f"sparsevar.restore must be keep_input or prev_residual, got {self.restore!r}")
        if not 0.0 <= self.score_block <= 1.0 or self.anchor_stride < 1:
            raise UserError("sparsevar.score_block must be in [0, 1] and anchor_stride >= 1")


def anchor_mask(h: int, w: int, stride: int) -> torch.Tensor:
    """[h*w] bool: a regular grid of anchors (rows and columns ≡ stride//2 mod stride)."""
    r = (torch.arange(h) % stride) == (stride // 2 % stride)
    c = (torch.arange(w) % stride) == (stride // 2 % stride)
    return (r[:, None] & c[None, :]).reshape(-1)


class SparseVAR(Method):
    CITATION = "SparseVAR, arXiv 2507.20454 (mechanism only; no official code/schedule; defaults ours)"
    STATUS = "reconstructed from the paper (no official code or schedule; defaults ours)"
    FOOTNOTE = "SparseVAR is reconstructed from its paper: no official code or schedule is public; defaults are ours."
    Config = SparseVARConfig
    NOOP = {"ratios": {}}
    batch_rectangular = True
    cfg: SparseVARConfig

    def reset(self) -> None:
        self.mse: tuple[torch.Tensor, tuple[int, int]] | None = None   # [1, n_prev] map at the previous scale
        self.cache = ResidualCache()
        self.sel: Selection | None = None

    def _score_layer(self, depth: int) -> int:
        return min(depth - 1, int(round(self.cfg.score_block * (depth - 1))))

    def select(self, lctx: LayerCtx, x: torch.Tensor) -> Selection | None:
        n, (h, w) = x.shape[1], lctx.scale.hw
        if lctx.li == 0:
            self.sel = None
            ratio = self.cfg.ratios.get(lctx.scale.rule_w)
            if ratio is not None and self.mse is not None:
                k = keep_count(n, ratio)
                score = resize_grid(self.mse[0][..., None], self.mse[1], (h, w), self.cfg.interp)[..., 0]
                anchors = anchor_mask(h, w, self.cfg.anchor_stride).to(score.device)
                score = score.masked_fill(anchors[None], float("inf"))  # anchors always kept
                self.sel = Selection.top_k(score, max(k, int(anchors.sum())))
        self.claim(lctx, n if self.sel is None else self.sel.k)
        return self.sel

    def restore(self, lctx, x_in, y_kept, sel):
        base = x_in
        if self.cfg.restore == "prev_residual":
            base = self.cache.restore(lctx.li, x_in, lctx.scale.hw, self.cfg.interp)
        return sel.scatter(y_kept, base, inplace=base is not x_in)

    def after_layer(self, lctx: LayerCtx, x_in, x_out) -> None:
        if lctx.li == self._score_layer(lctx.scale.spec.depth):
            self.mse = ((x_out - x_in).float().pow(2).mean(-1).mean(0, keepdim=True), lctx.scale.hw)
        if self.cfg.restore == "prev_residual":
            self.cache.put(lctx.li, x_out - x_in, lctx.scale.hw)
