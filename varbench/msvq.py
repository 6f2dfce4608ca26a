"""VAR's multi-scale VQ tokenizer (VQVAE), shared by the VAR and HART backbones.

Written from ``shared/specs/hart_var.md`` Part B ("VQVAE") and Part A ("Tokenizer decode"). Key names are the
official ones (FoundationVision/VAR @78b95394 ``models/{vqvae,basic_vae,quant}.py``; HART's
``hart/modules/networks/basic_vae.py`` and ``var_quantize_multiple_res.py`` use the same names), so
``vae_ch160v4096z32.pth`` (VAR) and HART's ``tokenizer/`` (``vae.*``) load strictly; the code is ours.

Inference uses the codebook (``quantize.embedding``), Phi_k(h) = (1−r)·h + r·conv3×3_k(h) with k = argmin
|ticks − si/(SN−1)|, and ``decoder(post_quant_conv(f_hat)).clamp(−1, 1)``. The encode path (``img_to_idx``: the
multi-scale residual quantisation of ``VectorQuantizer2.f_to_idxBl_or_fhat``), ``idx_to_fhat`` (``embed_to_fhat``)
and ``idx_to_var_input`` (``idxBl_to_var_input``, VAR's teacher-forcing input) are VAR's.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from varbench.kvcache import KVCache


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _gn(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _gn(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.C = c
        self.norm = _gn(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        w = torch.bmm(q.permute(0, 2, 1), k).mul_(C ** -0.5).softmax(dim=2)      # [B, HW(q), HW(k)]
        h = torch.bmm(v, w.permute(0, 2, 1)).view(B, C, H, W)
        return x + self.proj_out(h)


class _Up(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Down(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult, z: int, nrb: int = 2):
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(ch_mult):
            lvl = nn.Module()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(nrb):
                lvl.block.append(ResnetBlock(cin, ch * m))
                cin = ch * m
                if i == n - 1:
                    lvl.attn.append(AttnBlock(cin))
            if i != n - 1:
                lvl.downsample = _Down(cin)
            self.down.append(lvl)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(cin, cin), AttnBlock(cin), ResnetBlock(cin, cin)
        self.norm_out, self.conv_out = _gn(cin), nn.Conv2d(cin, z, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            for j, b in enumerate(lvl.block):
                h = b(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult, z: int, nrb: int = 2):
        super().__init__()
        n = len(ch_mult)
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z, cin, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(cin, cin), AttnBlock(cin), ResnetBlock(cin, cin)
        levels = [None] * n
        for i in reversed(range(n)):
            lvl = nn.Module()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(nrb + 1):
                lvl.block.append(ResnetBlock(cin, ch * ch_mult[i]))
                cin = ch * ch_mult[i]
                if i == n - 1:
                    lvl.attn.append(AttnBlock(cin))
            if i != 0:
                lvl.upsample = _Up(cin)
            levels[i] = lvl
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = _gn(cin), nn.Conv2d(cin, 3, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for lvl in reversed(self.up):
            for j, b in enumerate(lvl.block):
                h = b(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, 3, 1, 1)
        self.ratio = abs(ratio)

    def forward(self, h):
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class _PhiShared4(nn.Module):
    """``quant_resi.qresi_ls.{0..K-1}``, picked by argmin |ticks − si/(SN−1)|."""

    def __init__(self, c: int, ratio: float, k: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(c, ratio) for _ in range(k))
        self.ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)

    def index(self, at: float) -> int:
        return int(np.argmin(np.abs(self.ticks - at)).item())

    def __getitem__(self, at: float) -> Phi:
        return self.qresi_ls[self.index(at)]


class Quantizer(nn.Module):
    """The parts of VectorQuantizer2 / HARTHybridQuantizer that inference needs (partially shared Phi only)."""

    def __init__(self, vocab: int, Cvae: int, num_scales: int, quant_resi: float = 0.5, share_quant_resi: int = 4):
        super().__init__()
        if share_quant_resi < 2:
            raise ValueError("only partially shared Phi (share_quant_resi >= 2) is implemented, as HART uses")
        self.quant_resi = _PhiShared4(Cvae, quant_resi, share_quant_resi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(num_scales, vocab))
        self.embedding = nn.Embedding(vocab, Cvae)


class VQVAE(nn.Module):
    """VAR's ``VQVAE`` / HART's ``HARTAutoEncoder`` (the ``vae`` of HART's tokenizer folder)."""

    def __init__(self, vocab: int = 4096, Cvae: int = 32, ch: int = 160, ch_mult=(1, 1, 2, 2, 4), num_scales: int = 14,
                 quant_resi: float = 0.5, share_quant_resi: int = 4):
        super().__init__()
        self.V, self.Cvae = vocab, Cvae
        self.encoder = Encoder(ch, ch_mult, Cvae)
        self.decoder = Decoder(ch, ch_mult, Cvae)
        self.quant_conv = nn.Conv2d(Cvae, Cvae, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(Cvae, Cvae, 3, 1, 1)
        self.quantize = Quantizer(vocab, Cvae, num_scales, quant_resi, share_quant_resi)
        self.downsample = 2 ** (len(ch_mult) - 1)

    def phi(self, h: torch.Tensor, si: int, num_scales: int) -> torch.Tensor:
        return self.quantize.quant_resi[si / (num_scales - 1)](h)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """[B, Cvae, h, w] -> [B, 3, 16h, 16w] in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    # ---- VAR's encode path and its multi-scale helpers (official models/quant.py, models/vqvae.py) ----
    def _up(self, h: torch.Tensor, si: int, SN: int, last: int) -> torch.Tensor:
        """h_si as it enters f_hat: bicubic upsample to the last grid (not at the last scale), then Phi_k."""
        if si != SN - 1:
            h = F.interpolate(h, size=(last, last), mode="bicubic")
        return self.phi(h, si, SN)

    def embed(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        """Codebook vectors of a pn×pn index map (row-major), [B, Cvae, pn, pn]."""
        return self.quantize.embedding(idx_Bl).transpose(1, 2).reshape(idx_Bl.shape[0], self.Cvae, pn, pn)

    def f_to_idx(self, f: torch.Tensor, patch_nums) -> list[torch.Tensor]:
        """Residual quantisation of f [B, Cvae, H, W] over ``patch_nums`` (nearest codebook vector in L2, no
        z-norm): per scale the area-downsampled rest (the full rest at the last scale), argmin distance, then
        f_rest −= Phi(upsampled embedding). Returns the index maps [B, pn²]."""
        B, C, H, W = f.shape
        if patch_nums[-1] != H or H != W:
            raise ValueError(f"the last scale {patch_nums[-1]} must equal the latent grid {H}x{W}")
        rest, out, SN = f.clone(), [], len(patch_nums)
        w = self.quantize.embedding.weight
        for si, pn in enumerate(patch_nums):
            z = (F.interpolate(rest, size=(pn, pn), mode="area") if si != SN - 1 else rest).permute(0, 2, 3, 1)
            z = z.reshape(-1, C)
            d = z.square().sum(1, keepdim=True) + w.square().sum(1)
            d.addmm_(z, w.T, alpha=-2, beta=1)
            idx = d.argmin(1).view(B, pn * pn)
            rest.sub_(self._up(self.embed(idx, pn), si, SN, H))
            out.append(idx)
        return out

    def img_to_idx(self, img_pm1: torch.Tensor, patch_nums) -> list[torch.Tensor]:
        """Image in [−1, 1] -> index maps per scale (``img_to_idxBl``)."""
        return self.f_to_idx(self.quant_conv(self.encoder(img_pm1)), patch_nums)

    def idx_to_fhat(self, idx: list[torch.Tensor], patch_nums) -> torch.Tensor:
        """Σ_si Phi_k(up(embedding(idx_si))) on the last grid (``embed_to_fhat``, all_to_max_scale, last_one)."""
        SN, last = len(patch_nums), patch_nums[-1]
        f_hat = torch.zeros(idx[0].shape[0], self.Cvae, last, last, device=idx[0].device)
        for si, pn in enumerate(patch_nums):
            f_hat.add_(self._up(self.embed(idx[si], pn), si, SN, last))
        return f_hat

    def idx_to_var_input(self, idx: list[torch.Tensor], patch_nums) -> torch.Tensor:
        """VAR's teacher-forcing input (``idxBl_to_var_input``): for si = 1..SN−1 the cumulative f_hat of the
        scales before si, area-downsampled to pn_si; [B, L − pn_0², Cvae]."""
        SN, last = len(patch_nums), patch_nums[-1]
        f_hat = torch.zeros(idx[0].shape[0], self.Cvae, last, last, device=idx[0].device)
        parts = []
        for si in range(SN - 1):
            f_hat.add_(self._up(self.embed(idx[si], patch_nums[si]), si, SN, last))
            nxt = patch_nums[si + 1]
            parts.append(F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2))
        return torch.cat(parts, 1)


def fit_ema_buffer(sd: dict, vae: VQVAE, prefix: str = "") -> dict:
    """The official ``VQVAE.load_state_dict``: a ``quantize.ema_vocab_hit_SV`` (training statistics, unused at
    inference) whose number of scales differs from this schedule's is replaced by the module's own buffer."""
    k = prefix + "quantize.ema_vocab_hit_SV"
    own = vae.quantize.ema_vocab_hit_SV
    if k in sd and sd[k].shape != own.shape and sd[k].shape[1:] == own.shape[1:]:
        sd = dict(sd)
        sd[k] = own.detach().clone()
    return sd


# ---- loop parts shared by the backbones that accumulate this tokenizer's f_hat (VAR, HART) ----
@dataclass(frozen=True)
class Scale:
    si: int
    h: int
    w: int
    n: int           # tokens fed to the blocks (h·w; HART's scale 0: its context tokens)
    rule_w: int = 0


@dataclass
class FHatState:
    f_hat: torch.Tensor                                   # [B, Cvae, last, last]
    idx: list = field(default_factory=list)               # sampled indices per scale [B, l]


class FHatBackbone:
    """The parts VAR and HART compose alike (spec hart_var.md Part B "Sampling loop"): the scale list, fp16/bf16
    autocast on CUDA, the zero f_hat, a concatenating K/V cache, CFG on the logits with t = cfg·ratio(si) (guided =
    (1+t)·cond − t·uncond; without uncond rows, the same formula on cond alone), the decode and the preview.
    Needs ``self.model`` (``patch_nums``, ``Cvae``), ``self.vae``, ``self.sampling.cfg``, ``self._scales``,
    ``self.device``, ``self.dtype``."""

    def scales(self):
        return self._scales

    @property
    def num_scales(self) -> int:
        return len(self._scales)

    def ratio(self, si: int) -> float:
        """si/(SN−1): the CFG ramp and the more_smooth ratio."""
        last = self.num_scales - 1
        return si / last if last > 0 else 0.0

    def precision(self):
        if self.dtype in ("fp16", "bf16") and self.device.type == "cuda":  # official: fp16 autocast
            return torch.autocast("cuda", dtype=torch.float16 if self.dtype == "fp16" else torch.bfloat16)
        return contextlib.nullcontext()

    def init_state(self, cond) -> FHatState:
        last = self.model.patch_nums[-1]
        return FHatState(torch.zeros(cond.batch, self.model.Cvae, last, last, device=self.device))

    def new_kv_cache(self) -> KVCache:
        return KVCache()

    def after_block(self, li, x, cond, scale) -> torch.Tensor:
        return x

    def guide(self, logits: torch.Tensor, cond, scale):
        """(cond, uncond or None, guided): guided = (1+t)·cond − t·uncond with t = cfg·ratio(si). ``guided`` is what
        the sampler draws from before top-k/top-p (NOVA's entropy reads it)."""
        B, t = cond.batch, self.sampling.cfg * self.ratio(scale.si)
        lc, lu = logits[:B], (logits[B:] if cond.rows > B else None)
        if not cond.cfg:
            return lc, lu, lc
        return lc, lu, (1 + t) * lc - t * (lu if lu is not None else lc)

    def decode(self, state: FHatState) -> torch.Tensor:
        return self.vae.fhat_to_img(state.f_hat)

    def preview(self, state: FHatState, si: int) -> torch.Tensor:
        """The accumulated f_hat area-resized to scale si's grid, decoded."""
        s = self._scales[si]
        return self.vae.fhat_to_img(F.interpolate(state.f_hat, size=(s.h, s.w), mode="area"))

