"""Text conditioning for HART (spec hart_var.md Part A "Text conditioning"; official ``hart/utils/tools.py``
``encode_prompts``): a text encoder returns ``(context [B, T, D] float32, mask [B, T] int64, position_ids [B, T])``.

* :class:`QwenTextEncoder`: Qwen2 (mit-han-lab/Qwen2-VL-1.5B-Instruct) through ``transformers``' AutoModel /
  AutoTokenizer. Each prompt is tokenised on its own (padding "max_length", ``max_length`` = context tokens,
  truncation); mask = token ≠ pad id; position ids = cumsum(mask) − 1. With a system prompt, its tokens (no
  padding) are prepended with a mask of ones, and only the prompt positions of the last hidden state are kept.
* :class:`TinyTextEncoder`: seeded byte embeddings with the same outputs (model=hart_tiny_random, no download).
"""
from __future__ import annotations

import torch


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(mask, dim=1) - 1


class QwenTextEncoder:
    def __init__(self, path: str, max_length: int = 300, system_prompt: str | None = None, device="cpu"):
        from transformers import AutoModel, AutoTokenizer  # heavy third-party import, only when HART-0.7B is built

        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()   # fp32 weights, run under the loop's autocast
        self.max_length, self.system_prompt, self.device = max_length, system_prompt, torch.device(device)

    @torch.no_grad()
    def __call__(self, prompts: list[str]):
        ids = torch.stack([self.tok(p, return_tensors="pt", padding="max_length", max_length=self.max_length,
                                    truncation=True).input_ids[0] for p in prompts]).to(self.device)
        mask = ids != self.tok.pad_token_id
        pos = position_ids(mask.long())
        if self.system_prompt:
            sys_ids = self.tok(self.system_prompt, return_tensors="pt", padding="longest", max_length=self.max_length,
                               truncation=True).input_ids[0].to(self.device)
            sys_ids = sys_ids[None].repeat(ids.shape[0], 1)
            full = torch.cat([sys_ids, ids], 1)
            att = torch.cat([torch.ones_like(mask)[:, : sys_ids.shape[1]], mask], 1)
            ctx = self.model(full, attention_mask=att, output_hidden_states=True).hidden_states[-1][:, sys_ids.shape[1]:]
        else:
            ctx = self.model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        return ctx.float(), mask.long(), pos


class TinyTextEncoder:
    """UTF-8 bytes -> seeded embeddings [T, D] with a running mean (so tokens see their prefix); pad = 0."""

    def __init__(self, dim: int, max_length: int, seed: int = 0, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(257, dim, generator=g).to(device)
        self.max_length, self.device = max_length, torch.device(device)

    def __call__(self, prompts: list[str]):
        T = self.max_length
        ids = torch.zeros(len(prompts), T, dtype=torch.long)
        for i, p in enumerate(prompts):
            b = [c + 1 for c in p.encode("utf-8")][:T] or [1]
            ids[i, : len(b)] = torch.tensor(b)
        ids = ids.to(self.device)
        mask = (ids != 0).long()
        e = self.table[ids]
        run = e.cumsum(1) / torch.arange(1, T + 1, device=self.device)[None, :, None]
        ctx = (0.5 * e + run) * mask[..., None]
        return ctx.float(), mask, position_ids(mask)
