"""The self-attention K/V cache of one layer (every backbone: ``backbone.new_kv_cache()``).

The loop owns one per layer; a block appends the keys/values of the tokens it computes and attends to everything
cached (``attn_bias`` None at inference: block-causal by construction).
"""
from __future__ import annotations

import torch


class KVCache:
    """Self-attention keys/values of one layer for the tokens computed so far, ``k``/``v`` [rows, H, L, c].

    With ``capacity`` (the backbone passes its schedule's token count) the first ``append`` allocates one buffer of
    that length and later appends copy only the new keys into it (a static cache, as gpt-fast does): ``k``/``v``
    are views of its first L positions, so no scale re-copies the cache as ``torch.cat`` growth does. Appends that
    would not fit (or change dtype/rows) fall back to concatenation. ``KVCache(k, v)`` wraps given tensors.
    """

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None, capacity: int = 0):
        self.k, self.v, self.capacity = k, v, int(capacity)
        self._kb = self._vb = None  # the preallocated buffers [rows, H, capacity, c]

    def _fits(self, k: torch.Tensor, L: int) -> bool:
        kb = self._kb
        return (kb is not None and L + k.shape[2] <= kb.shape[2] and kb.dtype == k.dtype
                and kb.shape[0] == k.shape[0] and kb.shape[1] == k.shape[1] and kb.shape[3] == k.shape[3])

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            if self.capacity >= k.shape[2] and k.dtype == v.dtype:
                n = k.shape[2]
                self._kb = k.new_empty(k.shape[0], k.shape[1], self.capacity, k.shape[3])
                self._vb = v.new_empty(v.shape[0], v.shape[1], self.capacity, v.shape[3])
                self._kb[:, :, :n].copy_(k)
                self._vb[:, :, :n].copy_(v)
                self.k, self.v = self._kb[:, :, :n], self._vb[:, :, :n]
            else:
                self.k, self.v = k, v
            return self.k, self.v
        L = self.k.shape[2]
        if self._fits(k, L) and v.dtype == self._vb.dtype:
            n = L + k.shape[2]
            self._kb[:, :, L:n].copy_(k)
            self._vb[:, :, L:n].copy_(v)
            self.k, self.v = self._kb[:, :, :n], self._vb[:, :, :n]
        else:
            self._kb = self._vb = None
            self.k, self.v = torch.cat((self.k, k), 2), torch.cat((self.v, v), 2)
        return self.k, self.v

    def keep_rows(self, n: int) -> None:
        if self.k is not None:
            self.k, self.v = self.k[:n], self.v[:n]
        if self._kb is not None:
            self._kb, self._vb = self._kb[:n], self._vb[:n]

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]
