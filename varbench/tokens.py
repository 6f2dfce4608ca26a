"""Token subsets of one scale: which tokens a (scale, layer[, branch]) computes, and how the rest come back."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from varbench.errors import UserError


@dataclass(frozen=True)
class Selection:
    """Kept token indices of the current scale, ``keep_idx`` [rows or 1, K] (int64), of ``n_total``.

    The order is the method's: the kept tokens' K/V enter the cache in this order (FastVAR keeps descending score).

    One row means the same subset for every batch row (e.g. shared by both CFG halves). The backbone gathers
    per-token positional data (RoPE rows) with :meth:`gather` as well, so kept tokens keep their positions.
    """

    keep_idx: torch.Tensor
    n_total: int

    @property
    def k(self) -> int:
        return self.keep_idx.shape[-1]

    def _idx(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.keep_idx.to(x.device)
        return idx.expand(x.shape[0], -1) if idx.shape[0] == 1 else idx

    def gather(self, x_BLC: torch.Tensor) -> torch.Tensor:
        idx = self._idx(x_BLC)
        return x_BLC.gather(1, idx[..., None].expand(-1, -1, x_BLC.shape[-1]))

    def scatter(self, y_BKC: torch.Tensor, base_BLC: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``base`` with the kept tokens replaced by ``y``: out of place, or written into ``base`` when the caller
        owns it (``inplace``: a restore base made for this call; saves a copy of the whole scale)."""
        idx = self._idx(base_BLC)
        op = base_BLC.scatter_ if inplace else base_BLC.scatter
        return op(1, idx[..., None].expand(-1, -1, base_BLC.shape[-1]), y_BKC.to(base_BLC.dtype))

    def mask(self, rows: int) -> torch.Tensor:
        """Boolean [rows, n_total], True where the token is computed."""
        m = torch.zeros(rows, self.n_total, dtype=torch.bool, device=self.keep_idx.device)
        return m.scatter(1, self.keep_idx.expand(rows, -1), True)

    @staticmethod
    def top_k(score_BL: torch.Tensor, k: int) -> Selection:
        """Keep the ``k`` highest-scoring tokens per row (indices sorted ascending)."""
        n = score_BL.shape[-1]
        k = max(0, min(int(k), n))
        idx = score_BL.topk(k, dim=-1, sorted=False).indices.sort(-1).values
        return Selection(idx, n)

    @staticmethod
    def all(n: int, device=None) -> Selection:
        return Selection(torch.arange(n, device=device)[None], n)


def resize_grid(x_BLC: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize per-token features laid out row-major on an (h, w) grid to another grid (for caches across scales)."""
    B, L, C = x_BLC.shape
    # [B, h, w, C] seen as NCHW in channels-last layout: no transpose copy in or out (interpolate keeps the layout;
    # the values are those of the contiguous NCHW path, bit for bit: tests/test_tokens_resize.py)
    g = x_BLC.reshape(B, *src_hw, C).permute(0, 3, 1, 2)
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    g = F.interpolate(g.float(), size=dst_hw, mode=mode, **kw).to(x_BLC.dtype)
    return g.permute(0, 2, 3, 1).reshape(B, -1, C)


def check_ratio(value, what: str) -> float:
    """A pruning ratio: a number in [0, 1] (1 = the unit is bypassed); anything else is a one-line error."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number in [0, 1] (1 = bypass), got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise UserError(f"{what} must be in [0, 1] (1 = bypass), got {value}")
    return v


def keep_count(n: int, ratio: float, r_max: float = 1.0, min_keep: int = 0) -> int:
    """Tokens kept for a pruning ratio: clip to [0, r_max], K = N − floor(N·ratio) (FastVAR's rounding), >= min_keep."""
    r = min(max(float(ratio), 0.0), r_max)
    return min(n, max(n - math.floor(n * r), min_keep))


class ResidualCache:
    """Per-key residuals of one scale, restored on a later scale's grid (NOVA Eq. 16, FastVAR, SparseVAR).

    ``put(key, residual_BLC, hw)`` stores (detached); ``restore(key, x_in_BLC, hw, mode)`` returns
    ``x_in + resize(residual, hw)`` — or ``x_in`` unchanged when nothing is stored for ``key``.
    """

    def __init__(self):
        self.data: dict = {}

    def clear(self) -> None:
        self.data.clear()

    def __contains__(self, key) -> bool:
        return key in self.data

    def put(self, key, residual_BLC: torch.Tensor, hw: tuple[int, int]) -> None:
        self.data[key] = (residual_BLC.detach(), tuple(hw))

    def get(self, key):
        return self.data.get(key)

    def resized(self, key, hw: tuple[int, int], mode: str, dtype=None) -> torch.Tensor | None:
        hit = self.data.get(key)
        if hit is None:
            return None
        res, src = hit
        out = resize_grid(res, src, hw, mode)
        return out if dtype is None else out.to(dtype)

    def restore(self, key, x_in_BLC: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
        """``x_in + resized residual`` as a NEW tensor the caller may write into (``x_in`` itself when nothing is
        stored for ``key``). The sum is formed in the resized residual's buffer (same values: + commutes)."""
        r = self.resized(key, hw, mode, x_in_BLC.dtype)
        if r is None:
            return x_in_BLC
        return r.add_(x_in_BLC) if r.shape == x_in_BLC.shape else x_in_BLC + r
