"""Per-token predictive entropy, in nats, for both head types (spec infinity.md §10; methods.md §2).

Bitwise head (Infinity): logits [..., 2d] hold d independent pairs (l_j0, l_j1); the token entropy is the sum of
the bits' binary entropies, which is the exact entropy of the factorised distribution over 2^d codes.
Categorical head (VAR, HART): the entropy of softmax over the codebook.
Neither function edits its input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bitwise_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[..., 2d] -> [...]: sum_j h(sigmoid(l_j1 - l_j0)), h the binary entropy."""
    pairs = logits.float().reshape(*logits.shape[:-1], -1, 2)
    return bitwise_entropy_from_delta(pairs[..., 1] - pairs[..., 0])


def bitwise_entropy_from_delta(delta: torch.Tensor) -> torch.Tensor:
    """[..., d] logit differences l_j1 - l_j0 -> [...]: sum_j h(sigmoid(delta_j)) (a bit's distribution depends on
    its pair only through the difference; a folded logit lens computes the differences directly)."""
    delta = delta.float()
    p = torch.sigmoid(delta)
    # h(p) = softplus(delta) - p*delta is the stable form of -p ln p - (1-p) ln(1-p)
    return (F.softplus(delta) - p * delta).sum(-1)


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [...]: entropy of softmax(logits)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def token_entropy(logits: torch.Tensor, head_type: str) -> torch.Tensor:
    if head_type == "bitwise":
        return bitwise_entropy(logits)
    if head_type == "categorical":
        return categorical_entropy(logits)
    raise ValueError(f"unknown head type {head_type!r}")
