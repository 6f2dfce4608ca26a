"""The HART transformer (HARTForT2I, llama attention / llama MLP, ``disable_aln``), written from
``shared/specs/hart_var.md`` Part A.

Parameter names, shapes and registration order are the official ones (mit-han-lab/hart @e28a41fe,
``hart/modules/models/transformer/hart_transformer_t2i.py``, ``hart/modules/networks/basic_hart.py``), so the
official ``llm/`` checkpoint loads strictly; the code is ours. Structural differences, on purpose (as for Infinity):

* a block is two residual *branches* (``sa``, ``ffn``) callable on any subset of tokens (token-reduction methods);
* RoPE is applied from per-token cos/sin rows computed by the backbone (``positions``), so a subset of tokens
  carries its own positions; the image RoPE is HART's 2-D "naive" path (float coordinates ``i/pn·64`` offset by the
  last context position id; the two axes share one rotate_half over the head dimension);
* the K/V cache is an explicit object owned by the loop (``varbench/kvcache.py``) and the attention kernel is a
  function argument.

Only the ``disable_aln=True`` / ``shared_aln=False`` / ``attn_type=llama`` / ``mlp_type=llama`` /
``use_cross_attn=False`` / ``use_timestep_embed=False`` branch exists (the one HART-0.7B uses, spec Part A).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from varbench.attention import AttnFn, offer_raw_query, sdpa_attention
from varbench.backbones.hart.diffusion import DiffHead
from varbench.kvcache import KVCache


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x·rsqrt(mean(x²)+eps)·w in fp32, returned in x's dtype (the official fused kernel's contract)."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    """HART's ``LlamaRMSNormFused``: always has a weight (also where the official code says 'no affine')."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope_1d(pos_BL: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaMA 1-D RoPE for the context tokens: angles pos·theta^(−2j/d), duplicated; cos, sin [B, L, d]."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float().to(pos_BL.device) / head_dim))
    f = pos_BL.float()[..., None] * inv
    emb = torch.cat((f, f), dim=-1)
    return emb.cos(), emb.sin()


def image_coords(pn: int, last_pn: int, device=None) -> torch.Tensor:
    """[pn², 2] float (row, col) coordinates of a pn×pn grid in units of the last grid: (i / pn)·last_pn."""
    a = torch.arange(pn, device=device)
    grid = torch.stack(torch.meshgrid(a, a, indexing="ij"), dim=-1)
    return (grid / pn * last_pn).reshape(-1, 2)


def rope_2d(coords_BL2: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """HART's 2-D RoPE: per axis angles a·theta^(−4j/d) (d/4 of them), duplicated; [row (d/2) | col (d/2)]."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 4, dtype=torch.int64).float().to(coords_BL2.device) / head_dim))
    parts = []
    for axis in range(2):
        f = coords_BL2[..., axis].float()[..., None] * inv
        parts += [f, f]
    emb = torch.cat(parts, dim=-1)
    return emb.cos(), emb.sin()


class LlamaAttention(nn.Module):
    """Self-attention with q/v biases, optional l2-normalised q/k with a learned per-head scale, and RoPE."""

    def __init__(self, C: int, H: int, attn_l2_norm: bool = True):
        super().__init__()
        self.H, self.c, self.l2 = H, C // H, attn_l2_norm
        if attn_l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
            self.scale = 1.0
        else:
            self.scale = 0.25 / math.sqrt(self.c)
        self.qkv_proj = nn.Linear(C, 3 * C, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)

    def forward(self, x, cos_sin, kv: KVCache | None, attn_fn: AttnFn = sdpa_attention, ctx=None, mask=None):
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        q, k, v = F.linear(x, self.qkv_proj.weight, bias).view(B, L, 3, self.H, self.c).permute(2, 0, 3, 1, 4).unbind(0)
        if self.l2:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        cos, sin = cos_sin[0][:, None].to(v.dtype), cos_sin[1][:, None].to(v.dtype)   # [B, 1, L, c]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv is not None:
            k, v = kv.append(k, v)
        offer_raw_query(ctx, x, self.qkv_proj.weight, self.H)
        out = attn_fn(q, k, v, scale=self.scale, mask=mask, ctx=ctx)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class LlamaMLP(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(C, hidden, bias=False)
        self.up_proj = nn.Linear(C, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, C, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def llama_hidden(C: int, mlp_ratio: float) -> int:
    """The official SwiGLU width: int(C·ratio·2/3 + 255) // 256 · 256."""
    return int((C * mlp_ratio * 2) / 3 + 255) // 256 * 256


class HARTBlock(nn.Module):
    """x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)), one shared norm weight (``ln_wo_grad``)."""

    BRANCHES = ("sa", "ffn")

    def __init__(self, C: int, H: int, mlp_ratio: float, eps: float, attn_l2_norm: bool):
        super().__init__()
        self.attn = LlamaAttention(C, H, attn_l2_norm)
        self.ffn = LlamaMLP(C, llama_hidden(C, mlp_ratio))
        self.ln_wo_grad = RMSNorm(C, eps)

    def branch(self, name: str, x, *, cos_sin=None, kv=None, attn_fn: AttnFn = sdpa_attention, ctx=None, mask=None):
        if name == "sa":
            return self.attn(self.ln_wo_grad(x), cos_sin, kv, attn_fn, ctx, mask)
        if name == "ffn":
            return self.ffn(self.ln_wo_grad(x))
        raise ValueError(f"unknown branch {name!r}")


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.ln_wo_grad = RMSNorm(C, eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, h, cond_BTC):
        """cond max-pooled over all context tokens (padding included), then (scale, shift)."""
        if cond_BTC.dim() == 3 and cond_BTC.shape[1] > 1:
            cond_BTC = cond_BTC.max(1, keepdim=True).values
        scale, shift = self.ada_lin(cond_BTC).view(-1, 1, 2, h.shape[-1]).unbind(2)
        return self.ln_wo_grad(h).mul(scale.add(1)).add_(shift)


class HARTTransformer(nn.Module):
    """Parameters of HARTForT2I (registration order = the official state_dict order)."""

    def __init__(self, *, depth: int, embed_dim: int, num_heads: int, vocab_size: int, Cvae: int, patch_nums,
                 context_token: int, context_dim: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 attn_l2_norm: bool = True, use_context_norm: bool = True, diff_width: int = 1024,
                 diff_depth: int = 6, num_sampling_steps: str = "8"):
        super().__init__()
        C = embed_dim
        self.C, self.depth, self.num_heads, self.head_dim = C, depth, num_heads, C // num_heads
        self.V, self.Cvae, self.context_token, self.eps = vocab_size, Cvae, context_token, norm_eps
        self.patch_nums = tuple(int(p) for p in patch_nums)
        L = sum(p * p for p in self.patch_nums) + context_token - 1
        lvl = torch.cat([torch.zeros(context_token, dtype=torch.long)]
                        + [torch.full((p * p,), i + 1) for i, p in enumerate(self.patch_nums[1:])])
        self.register_buffer("lvl_1L", lvl.view(1, L).contiguous())
        bias = torch.where(lvl[:, None] >= lvl[None, :], 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", bias.view(1, 1, L, L).contiguous())
        self.word_embed = nn.Linear(Cvae, C)
        self.context_embed = nn.Linear(context_dim, C)
        self.context_norm = RMSNorm(context_dim, norm_eps) if use_context_norm else nn.Identity()
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        self.blocks = nn.ModuleList(HARTBlock(C, num_heads, mlp_ratio, norm_eps, attn_l2_norm) for _ in range(depth))
        self.head_nm = AdaLNBeforeHead(C, norm_eps)
        self.head = nn.Linear(C, vocab_size)
        self.decoder_norm = RMSNorm(C, norm_eps)
        self.diffloss = DiffHead(Cvae, C, diff_width, diff_depth, str(num_sampling_steps))

    def encode_context(self, context_BTD: torch.Tensor) -> torch.Tensor:
        """sos = cond = context_embed(context_norm(context)), [rows, T, C]."""
        return self.context_embed(self.context_norm(context_BTD))

    def logits(self, h: torch.Tensor, cond_BTC: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h.float(), cond_BTC).float()).float()

    def diffusion_condition(self, h_last: torch.Tensor, emb_BlC: torch.Tensor) -> torch.Tensor:
        """z = decoder_norm(h_last + word_embed(codebook[idx])) with the discrete part repeated for every CFG half."""
        d = self.word_embed(emb_BlC)
        d = d.repeat(h_last.shape[0] // d.shape[0], 1, 1)
        return self.decoder_norm(h_last + d)
