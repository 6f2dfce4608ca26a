"""FastVAR: cached token pruning (Guo et al., ICCV 2025, arXiv 2503.23367), as the official code behaves.

Official code: csguoh/FastVAR @34cdd65, ``Infinity/infinity/models/{infinity,fastvar_basic,fastvar_utils}.py``.
Spec: ``shared/specs/methods.md`` §1. Each choice below is that code's behaviour:
  * a fresh selection before **each branch** (SA, CA, FFN) on the current residual stream (``granularity="branch"``);
  * score = squared L2 distance of a token to the spatial mean of the same map, **per batch row** (cond and uncond
    rows get their own sets); keep the K = N − floor(N·ratio) highest, in descending-score order (the order in which
    their K/V are appended to the cache);
  * pruning only at the scales whose **width** is a key of ``prune_ratios`` and in blocks ``blocks[0]..blocks[1]``;
  * restoration: the full branch output cached at the scale of width ``cache_width`` (written whenever that scale
    runs), ``area``-resized to the current grid, with the kept tokens' fresh outputs scattered in;
  * "width" is ``ScaleCtx.rule_w``: the grid width on official schedules; on a custom schedule (model=tiny) the
    official width at the same position from the end (``model.schedule.rule_widths``);
  * scales whose width is in ``skip_widths`` are skipped entirely (no blocks, head or sampling); the image is
    decoded from the codes accumulated so far.
Infinity-2B official schedule: prune {32: 0.4, 40: 0.5}, blocks 3..27, cache 24, skip {48, 64}.
Infinity-8B has no official schedule: ``conf/method/fastvar_8b.yaml`` is **our port** (blocks 3..35).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from varbench.errors import UserError
from varbench.hooks import LayerCtx, Method, MethodConfig, ScaleCtx, ScalePlan
from varbench.tokens import ResidualCache, Selection, check_ratio, keep_count

OFFICIAL_2B_PRUNE_RATIOS = {32: 0.4, 40: 0.5}


@dataclass
class FastVARConfig(MethodConfig):
    name: str = "fastvar"
    family: str = "fastvar"
    # scale width -> ratio; None = the official Infinity-2B rule {32: 0.4, 40: 0.5}. (A dict default would be MERGED
    # by Hydra with a derived config's dict, e.g. fastvar_hart's {48, 64} would keep 32 and 40.)
    prune_ratios: Any = None
    skip_widths: list = field(default_factory=lambda: [48, 64])
    blocks: list = field(default_factory=lambda: [3, 27])                    # inclusive global block range
    cache_width: int = 24
    interp: str = "area"

    def __post_init__(self):
        if self.prune_ratios is None:
            self.prune_ratios = dict(OFFICIAL_2B_PRUNE_RATIOS)
        self.prune_ratios = {int(k): check_ratio(v, f"fastvar.prune_ratios[{k}]") for k, v in self.prune_ratios.items()}
        if len(self.blocks) != 2 or self.blocks[0] > self.blocks[1]:
            raise UserError(f"fastvar.blocks must be [first, last], got {self.blocks}")
        self.skip_widths = [int(w) for w in self.skip_widths or []]


def distance_to_mean_keep(x_BNC: torch.Tensor, hw: tuple[int, int], k: int) -> torch.Tensor:
    """Per row: indices of the k tokens farthest (squared L2) from the row's spatial mean, descending score.

    The mean is a 1×1 adaptive average pool of the (h, w) map and the sort runs over a [B, N, 1] score, as in
    the official ``masked_previous_scale_cache``, so that near-ties break the same way (kept order = K/V order)."""
    B, N, C = x_BNC.shape
    mean = F.adaptive_avg_pool2d(x_BNC.view(B, *hw, C).permute(0, 3, 1, 2), (1, 1)).permute(0, 2, 3, 1).view(B, 1, C)
    score = torch.sum((x_BNC - mean) ** 2, dim=-1, keepdim=True)
    return torch.argsort(score, dim=1, descending=True)[:, :k, 0]


class FastVAR(Method):
    CITATION = "FastVAR, arXiv 2503.23367; official csguoh/FastVAR @34cdd65 (Infinity/); shared/specs/methods.md §1"
    STATUS = "exact (fixture-verified on Infinity)"
    Config = FastVARConfig
    NOOP = {"prune_ratios": {}, "skip_widths": []}
    granularity = "branch"
    cfg: FastVARConfig

    def reset(self) -> None:
        self.cache = ResidualCache()            # (li, branch) -> full branch output at the cache scale
        self.kept: dict[tuple[int, int, str], torch.Tensor] = {}   # (si, li, branch) -> keep_idx, for inspection
        self.skipped: list[int] = []

    def plan_scale(self, sctx: ScaleCtx) -> ScalePlan:
        skip = sctx.rule_w in self.cfg.skip_widths
        if skip:
            self.skipped.append(sctx.si)
            self.claim_skip(sctx)
        return ScalePlan(skip=skip)

    def _in_blocks(self, li: int) -> bool:
        return self.cfg.blocks[0] <= li <= self.cfg.blocks[1]

    def select(self, lctx: LayerCtx, x: torch.Tensor) -> Selection | None:
        w, n = lctx.scale.rule_w, x.shape[1]
        if w == self.cfg.cache_width:
            return Selection.all(n, x.device)  # run everything; restore() records the branch output
        ratio = self.cfg.prune_ratios.get(w)
        if ratio is None or not self._in_blocks(lctx.li):
            return None
        k = keep_count(n, ratio)
        idx = distance_to_mean_keep(x, lctx.scale.hw, k)
        self.kept[(lctx.si, lctx.li, lctx.branch)] = idx
        self.claim(lctx, k)
        return Selection(idx, n)

    def restore(self, lctx: LayerCtx, x_in, y_kept, sel):
        key = (lctx.li, lctx.branch)
        if lctx.scale.rule_w == self.cfg.cache_width:  # full branch output (after its gamma) of the cache scale
            self.cache.put(key, y_kept - x_in, lctx.scale.hw)
            return y_kept
        if key not in self.cache:
            raise UserError(f"{self.name}: no scale of width {self.cfg.cache_width} (the cache scale) ran before scale "
                            f"{lctx.si}; this schedule's widths: {[s.rule_w for s in lctx.scale.schedule]} "
                            f"(set cache_width, or use the method config made for this model)")
        base = self.cache.restore(key, x_in, lctx.scale.hw, self.cfg.interp)
        return sel.scatter(y_kept, base, inplace=base is not x_in)

    def summary(self) -> dict:
        return {"skipped_scales": list(self.skipped)}

    def check_schedule(self, schedule) -> str | None:
        widths = [getattr(s, "rule_w", 0) or s.w for s in schedule]
        pruned = [w for w in widths if w in self.cfg.prune_ratios]
        if pruned and self.cfg.cache_width not in widths[: widths.index(pruned[0])]:
            raise UserError(f"{self.name}: prunes widths {pruned} but its cache width {self.cfg.cache_width} is not an "
                            f"earlier scale of this schedule ({widths}); use the method config made for this model")
        if not pruned and not any(w in self.cfg.skip_widths for w in widths):
            return f"{self.name}: none of its widths {sorted(self.cfg.prune_ratios)} occur in this schedule ({widths})"
        return None
