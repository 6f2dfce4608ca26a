"""Attention kernels by name. A backbone's self-attention calls ``attn_fn(q, k, v, scale=, mask=, ctx=)``.

``q`` is [rows, H, Lq, c] (the tokens being computed), ``k``/``v`` are [rows, H, Lk, c] (cache + current),
``mask`` is None (inference: every cached token is visible, spec §4.2) or a boolean mask (True = visible).
``ctx`` is the loop's :class:`varbench.hooks.LayerCtx` (scale, layer, segment table) or None.

A method replaces the kernel per (scale, layer) through ``Method.attention``; see ``reference_attention`` for
a kernel that also reports attention statistics (computed only when asked for: it materialises the scores).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F


class AttnFn(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                 mask: torch.Tensor | None, ctx=None) -> torch.Tensor: ...


def sdpa_attention(q, k, v, *, scale: float, mask=None, ctx=None) -> torch.Tensor:
    """PyTorch's scaled-dot-product attention (flash / memory-efficient kernels on a GPU)."""
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)


def offer_raw_query(ctx, x: torch.Tensor, qkv_weight: torch.Tensor, heads: int) -> None:
    """Hand ``ctx`` (a :class:`varbench.hooks.LayerCtx`, or None) the layer's *raw* query projection as a lazy
    callable: ``x · W_qᵀ`` per head, [rows, H, L, c], from the fused qkv weight's first C rows — no q bias, no
    normalisation, no temperature, no RoPE. Backbones call it in their self-attention before the kernel; it costs
    nothing unless a method asks (ScaleKV ``query=raw``: Lvar scale_kv.py:355-356 scores with ``mat_qkv(x)``)."""
    if ctx is None or not hasattr(ctx, "raw_query"):
        return
    B, L, C = x.shape

    def raw() -> torch.Tensor:
        return F.linear(x, qkv_weight[:C]).view(B, L, heads, C // heads).transpose(1, 2)

    ctx.raw_query = raw


def reference_attention(stats_sink: Callable[[dict], None] | None = None):
    """Materialised softmax attention; optionally hands per-key received mass and per-query entropy to a sink.

    ``stats_sink({'key_mass': [rows, Lk], 'query_entropy': [rows, Lq], 'ctx': ctx})``; both are averaged over heads.
    """

    def attn(q, k, v, *, scale: float, mask=None, ctx=None):
        s = torch.einsum("bhqc,bhkc->bhqk", q.float(), k.float()) * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = s.softmax(-1)
        if stats_sink is not None:
            ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
            stats_sink({"key_mass": p.sum(2).mean(1), "query_entropy": ent.mean(1), "ctx": ctx})
        return torch.einsum("bhqk,bhkc->bhqc", p, v.float()).to(q.dtype)

    return attn


BACKENDS = {"sdpa": sdpa_attention, "reference": reference_attention()}


def get_backend(name: str) -> AttnFn:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]
