"""What a next-scale backbone exposes to the loop (``varbench/loop.py``). No method-specific arguments, ever.

A backbone owns its weights and its inference settings (CFG, temperature, top-k/top-p); the loop composes:

    cond  = condition(prompts)                    CFG as a doubled batch (rows = 2B), text/class conditioning
    state = init_state(cond)                      accumulated codes
    for scale in scales():
        x   = scale_input(state, cond, scale)     [rows, h*w, C], level/position embeddings included
        pos = positions(scale)                    per-token positional data; ``gather_positions`` takes a subset
        for li, for branch in branches:           x = x + branch(li, name, x, pos, cond, kv[li], attn_fn, lctx)
            x = after_block(li, x, cond, scale)   (e.g. Infinity's optional CFG insertion at a layer)
        logits = head(x, cond)
        cond_l, uncond_l, guided = guide(logits, cond, scale)
        codes = sample(guided, scale, rng)
        state = update(state, codes, scale)
    images = decode(state)                        [B, 3, H, W] in [-1, 1]
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    depth: int
    embed_dim: int
    num_heads: int
    head_type: str            # "bitwise" (Infinity: d Bernoulli bits per token) or "categorical" (VAR/HART)
    head_dim_out: int         # bits per token (bitwise) or vocabulary size (categorical)
    branches: tuple[str, ...]


class Backbone(Protocol):
    spec: BackboneSpec
    device: torch.device

    def scales(self) -> list: ...
    def condition(self, prompts: list[str]) -> Any: ...
    def cond_only(self, cond: Any) -> Any: ...
    def text_lengths(self, cond: Any) -> list[int]: ...
    def init_state(self, cond: Any) -> Any: ...
    def scale_input(self, state: Any, cond: Any, scale) -> torch.Tensor: ...
    def positions(self, scale) -> Any: ...
    def gather_positions(self, pos: Any, sel) -> Any: ...
    def branch(self, li: int, name: str, x: torch.Tensor, pos: Any, cond: Any, kv, attn_fn, lctx) -> torch.Tensor: ...
    def after_block(self, li: int, x: torch.Tensor, cond: Any, scale) -> torch.Tensor: ...
    def head(self, h: torch.Tensor, cond: Any) -> torch.Tensor: ...
    def guide(self, logits: torch.Tensor, cond: Any, scale) -> tuple: ...
    def sample(self, logits: torch.Tensor, scale, rng: torch.Generator | None) -> torch.Tensor: ...
    def update(self, state: Any, codes: torch.Tensor, scale) -> Any: ...
    def decode(self, state: Any) -> torch.Tensor: ...
    def new_kv_cache(self) -> Any: ...
    def precision(self) -> AbstractContextManager: ...
