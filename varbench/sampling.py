"""Categorical token sampling shared by the VAR and HART backbones (official FoundationVision/VAR @78b95394
``models/helpers.py`` ``sample_with_top_k_top_p_`` and ``gumbel_softmax_with_rng``; HART copies them).

Spec ``shared/specs/hart_var.md`` Part B "Sampling loop": top-k keeps the logits ≥ the k-th largest (ties kept);
top-p sorts ascending, drops the entries whose cumulative softmax is ≤ 1−p and always keeps the largest; one
``torch.multinomial`` over the [B·l, V] probabilities per scale. The official filters work in place; ours return a
filtered copy, so the guided logits a method read (NOVA's entropy) stay untouched (spec pitfall 6).
"""
from __future__ import annotations

import torch


def top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """A float copy of ``logits`` [..., V] with the removed entries at −inf (``top_k`` 0 / ``top_p`` 0: off)."""
    x = logits.float()
    if top_k > 0:
        x = x.masked_fill(x < x.topk(min(top_k, x.shape[-1]), largest=True, sorted=False, dim=-1)[0].amin(-1, keepdim=True),
                          float("-inf"))
    if top_p > 0:
        srt, idx = x.sort(dim=-1, descending=False)
        rm = srt.softmax(-1).cumsum(-1) <= (1 - top_p)
        rm[..., -1:] = False
        x = x.masked_fill(rm.scatter(idx.ndim - 1, idx, rm), float("-inf"))
    return x


def draw(x: torch.Tensor, rng) -> torch.Tensor:
    """Indices [B, l] drawn from softmax(x) [B, l, V]: one ``torch.multinomial`` over [B·l, V] on ``rng`` (a
    generator or None), or with a list of generators one draw per image (a batch draws what B single runs would)."""
    B, l, V = x.shape
    probs = x.softmax(-1)
    if isinstance(rng, (list, tuple)):
        return torch.stack([torch.multinomial(probs[b], 1, replacement=True, generator=g).view(l)
                            for b, g in enumerate(rng)])
    return torch.multinomial(probs.view(-1, V), 1, replacement=True, generator=rng).view(B, l)


def soft_embedding(x: torch.Tensor, ratio: float, codebook: torch.Tensor, rng) -> torch.Tensor:
    """``more_smooth``: gumbel_softmax(x·(1+ratio), tau = max(0.27·(1−0.95·ratio), 0.005), hard=False) @ codebook,
    on the filtered logits, the Exp(1) noise drawn from ``rng`` after the multinomial (per image with a list)."""
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    y = x.mul(1 + ratio)
    if isinstance(rng, (list, tuple)):
        e = torch.cat([torch.empty_like(y[b:b + 1]).exponential_(generator=g) for b, g in enumerate(rng)])
    else:
        e = torch.empty_like(y, memory_format=torch.legacy_contiguous_format).exponential_(generator=rng)
    return ((y - e.log()) / tau).softmax(-1) @ codebook.unsqueeze(0)
