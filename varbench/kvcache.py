"""The self-attention K/V cache of one layer, grown by concatenation (VAR, HART; Infinity has a preallocated one).

The loop owns one per layer (``backbone.new_kv_cache()``); a block appends the keys/values of the tokens it computes
and attends to everything cached (``attn_bias`` None at inference: block-causal by construction).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Keys/values [rows, H, L, c] of the tokens computed so far (keys as the model caches them: after l2-norm, and
    after RoPE where the model rotates)."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def append(self, k, v):
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat((self.k, k), 2), torch.cat((self.v, v), 2)
        return self.k, self.v

    def keep_rows(self, n: int) -> None:
        if self.k is not None:
            self.k, self.v = self.k[:n], self.v[:n]

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]
