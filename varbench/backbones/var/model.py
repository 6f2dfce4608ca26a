"""The VAR transformer (class-conditional, AdaLN blocks, optional shared AdaLN), written from
``shared/specs/hart_var.md`` Part B ("Checkpoint keys (VAR)", "Transformer math").

Parameter names, shapes and the state_dict order are the official ones (FoundationVision/VAR @78b95394,
``models/var.py`` VAR, ``models/basic_var.py`` AdaLNSelfAttn / SelfAttention / FFN / AdaLNBeforeHead), so
``var_d{16,20,24,30}.pth`` load strictly; the code is ours. Structural differences, on purpose (as for Infinity
and HART):

* a block is two residual *branches* (``sa``, ``ffn``) callable on any subset of tokens (token-reduction methods),
  each returning gamma·f(AdaLN(x)) for the loop to add;
* the AdaLN parameters of every block are computed once per generation from the class embedding (``ada_params``;
  the official loop recomputes the same values at every scale);
* the K/V cache is an explicit object owned by the loop and the attention kernel is a function argument;
* the block-causal training forward (``teacher_forced_logits``, the official ``VAR.forward`` with
  ``cond_drop_rate`` 0) runs the same branches with the level mask instead of a cache.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from varbench.attention import AttnFn, offer_raw_query, sdpa_attention
from varbench.kvcache import KVCache


class SelfAttention(nn.Module):
    """qkv = x·Wᵀ + (q_bias, 0, v_bias); with ``attn_l2_norm`` q, k l2-normalised per head, q·exp(min(s, ln 100)),
    softmax scale 1 (else 0.25/sqrt(head_dim)); no positional rotation."""

    def __init__(self, C: int, H: int, attn_l2_norm: bool = True):
        super().__init__()
        self.H, self.c, self.l2 = H, C // H, attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.c)
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)

    def forward(self, x, kv: KVCache | None, attn_fn: AttnFn = sdpa_attention, ctx=None, mask=None):
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.H, self.c).permute(2, 0, 3, 1, 4).unbind(0)
        if self.l2:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        if kv is not None:
            k, v = kv.append(k, v)
        offer_raw_query(ctx, x, self.mat_qkv.weight, self.H)
        out = attn_fn(q, k, v, scale=self.scale, mask=mask, ctx=ctx)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """x += gamma1·Attn(LN(x)·(1+scale1)+shift1); x += gamma2·FFN(LN(x)·(1+scale2)+shift2). LN without affine.
    The six vectors come from ``ada_lin(SiLU(cond))`` or, with shared AdaLN, ``ada_gss + shared_ada_lin(cond)``,
    in the order gamma1, gamma2, scale1, scale2, shift1, shift2."""

    BRANCHES = ("sa", "ffn")

    def __init__(self, C: int, H: int, mlp_ratio: float, eps: float, attn_l2_norm: bool, shared_aln: bool):
        super().__init__()
        self.C, self.eps, self.shared_aln = C, eps, shared_aln
        self.attn = SelfAttention(C, H, attn_l2_norm)
        self.ffn = FFN(C, round(C * mlp_ratio))
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def ada(self, cond_or_gss: torch.Tensor) -> torch.Tensor:
        """[rows, 1, 6, C] from the class embedding [rows, C] (or the shared [rows, 1, 6, C])."""
        if self.shared_aln:
            return self.ada_gss + cond_or_gss
        return self.ada_lin(cond_or_gss).view(-1, 1, 6, self.C)

    def _ln(self, x):
        return F.layer_norm(x, (self.C,), eps=self.eps)

    def branch(self, name: str, x, ada6, *, kv=None, attn_fn: AttnFn = sdpa_attention, ctx=None, mask=None):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada6.unbind(2)
        if name == "sa":
            return self.attn(self._ln(x).mul(scale1.add(1)).add_(shift1), kv, attn_fn, ctx, mask).mul_(gamma1)
        if name == "ffn":
            return self.ffn(self._ln(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2)
        raise ValueError(f"unknown branch {name!r}")


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.C, self.eps = C, eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, h, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return F.layer_norm(h, (self.C,), eps=self.eps).mul(scale.add(1)).add_(shift)


class VARTransformer(nn.Module):
    """Parameters of VAR (registration order = the official state_dict order)."""

    def __init__(self, *, depth: int, embed_dim: int, num_heads: int, vocab_size: int, Cvae: int, patch_nums,
                 num_classes: int = 1000, mlp_ratio: float = 4.0, norm_eps: float = 1e-6, shared_aln: bool = False,
                 attn_l2_norm: bool = True):
        super().__init__()
        C = embed_dim
        self.C, self.depth, self.num_heads, self.head_dim = C, depth, num_heads, C // num_heads
        self.V, self.Cvae, self.num_classes, self.shared_aln = vocab_size, Cvae, num_classes, shared_aln
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.L = sum(p * p for p in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        ends = [0]
        for p in self.patch_nums:
            ends.append(ends[-1] + p * p)
        self.begin_ends = list(zip(ends[:-1], ends[1:]))
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, C))
        lvl = torch.cat([torch.full((p * p,), i) for i, p in enumerate(self.patch_nums)])
        self.register_buffer("lvl_1L", lvl.view(1, self.L).contiguous())
        bias = torch.where(lvl[:, None] >= lvl[None, :], 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", bias.view(1, 1, self.L, self.L).contiguous())
        self.word_embed = nn.Linear(Cvae, C)
        self.class_emb = nn.Embedding(num_classes + 1, C)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C)) if shared_aln else nn.Identity()
        self.blocks = nn.ModuleList(AdaLNSelfAttn(C, num_heads, mlp_ratio, norm_eps, attn_l2_norm, shared_aln)
                                    for _ in range(depth))
        self.head_nm = AdaLNBeforeHead(C, norm_eps)
        self.head = nn.Linear(C, vocab_size)

    # ---- pieces of both paths ----
    def ada_params(self, cond_BD: torch.Tensor) -> list[torch.Tensor]:
        """Per block the six AdaLN vectors [rows, 1, 6, C]."""
        gss = self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.C) if self.shared_aln else cond_BD
        return [b.ada(gss) for b in self.blocks]

    def lvl_pos(self, si: int) -> torch.Tensor:
        """lvl_embed(si) + pos_1LC of scale si's segment, [1, pn², C]."""
        b, e = self.begin_ends[si]
        return self.lvl_embed.weight[si] + self.pos_1LC[:, b:e]

    def first_input(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """The first scale's tokens: class embedding + pos_start + lvl_embed(0) + pos_1LC[0]."""
        sos = cond_BD.unsqueeze(1).expand(-1, self.first_l, -1)
        return sos + self.pos_start.expand(cond_BD.shape[0], -1, -1) + self.lvl_pos(0)

    def next_input(self, z_BCl: torch.Tensor, si: int) -> torch.Tensor:
        """word_embed(token map [B, Cvae, pn, pn]) + lvl_embed(si) + pos_1LC of scale si."""
        return self.word_embed(z_BCl.flatten(2).transpose(1, 2)) + self.lvl_pos(si)

    def logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """head(AdaLN(h)) in fp32, as the official ``get_logits``."""
        return self.head(self.head_nm(h.float(), cond_BD).float()).float()

    # ---- the block-causal training forward (teacher forcing) ----
    def teacher_forced_logits(self, labels: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor,
                              attn_fn: AttnFn = sdpa_attention) -> torch.Tensor:
        """Logits [B, L, V] of every position in one pass with the block-causal mask (``VAR.forward`` with
        cond_drop_rate 0). ``x_BLCv_wo_first_l``: the area-downsampled cumulative f_hat of scales 1..SN−1."""
        B = labels.shape[0]
        cond_BD = self.class_emb(labels)
        sos = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
        x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), 1)
        x = x + (self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC)
        mask = self.lvl_1L[0][:, None] >= self.lvl_1L[0][None, :]       # True = visible (the official bias is 0)
        for blk, ada in zip(self.blocks, self.ada_params(cond_BD)):
            for name in blk.BRANCHES:
                x = x + blk.branch(name, x, ada, attn_fn=attn_fn, mask=mask)
        return self.logits(x, cond_BD)
