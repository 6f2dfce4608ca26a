"""Infinity's BSQ-VAE ("flux-style" convolutional autoencoder, no attention) and multi-scale BSQ, written from
``shared/specs/infinity.md`` §6.5–6.6 and §7.

Key names/shapes equal the official modules (FoundationVision/Infinity @4c27bbb5
``infinity/models/bsq_vae/{flux_vqgan,multiscale_bsq,conv}.py``): convolutions sit in a wrapper (``.conv.``),
GroupNorms in a wrapper (``.norm.``), and the quantizer is registered twice (``quantizer`` and ``quantize``,
one module), holding only the persistent ``lfq.mask`` buffer.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

VAE_CONFIGS = {
    "vae_d32": dict(codebook_dim=32, base_ch=128, ch_mult=(1, 2, 4, 4, 4), num_res_blocks=2, patch_size=16),
    "vae_d56_f8_14_patchify": dict(codebook_dim=14, base_ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, patch_size=8),
}


class _Conv(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding)

    def forward(self, x):
        return self.conv(x)


class _Norm(nn.Module):
    def __init__(self, c):
        super().__init__()
        groups = 32 if c % 32 == 0 else 24
        if c % groups:
            raise ValueError(f"GroupNorm needs channels divisible by 32 or 24, got {c}")
        self.norm = nn.GroupNorm(groups, c, eps=1e-6, affine=True)

    def forward(self, x):
        return self.norm(x)


def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _Norm(cin), _Conv(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _Norm(cout), _Conv(cout, cout, 3, padding=1)
        self.nin_shortcut = _Conv(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class _Down(nn.Module):  # zero-pad right/bottom by 1, then 3x3 stride 2
    def __init__(self, c):
        super().__init__()
        self.conv = _Conv(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Up(nn.Module):  # nearest x2, then 3x3
    def __init__(self, c):
        super().__init__()
        self.conv = _Conv(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _level(blocks, resample=None):
    m = nn.Module()
    m.block = nn.ModuleList(blocks)
    m.attn = nn.ModuleList()
    if resample is not None:
        m.add_module("downsample" if isinstance(resample, _Down) else "upsample", resample)
    return m


def _mid(c):
    m = nn.Module()
    m.block_1, m.block_2 = ResnetBlock(c, c), ResnetBlock(c, c)
    return m


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, patch_size):
        super().__init__()
        n_down = int(math.log2(patch_size))
        self.conv_in = _Conv(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(cin, ch * mult))
                cin = ch * mult
            self.down.append(_level(blocks, _Down(cin) if i < n_down else None))
        self.mid = _mid(cin)
        self.norm_out, self.conv_out = _Norm(cin), _Conv(cin, z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            for b in lvl.block:
                h = b(h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, patch_size):
        super().__init__()
        n_up = int(math.log2(patch_size))
        cin = ch * ch_mult[-1]
        self.conv_in = _Conv(z_channels, cin, 3, padding=1)
        self.mid = _mid(cin)
        levels = [None] * len(ch_mult)
        for i in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, ch * ch_mult[i]))
                cin = ch * ch_mult[i]
            levels[i] = _level(blocks, _Up(cin) if 1 <= i <= n_up else None)
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = _Norm(cin), _Conv(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for lvl in reversed(self.up):
            for b in lvl.block:
                h = b(h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class _LFQ(nn.Module):
    def __init__(self, cd):
        super().__init__()
        self.register_buffer("mask", 2 ** torch.arange(cd - 1, -1, -1))


class _Quantizer(nn.Module):
    def __init__(self, cd):
        super().__init__()
        self.lfq = _LFQ(cd)


def bits_to_codes(bits: torch.Tensor, codebook_dim: int) -> torch.Tensor:
    """Bits [B, T, h, w, cd] -> codes [B, cd, T, h, w]: ±1/sqrt(cd), L2-normalised over channels (official)."""
    s = 1 / math.sqrt(codebook_dim)
    codes = F.normalize(bits.float() * s * 2 - s, dim=-1)
    return codes.permute(0, 4, 1, 2, 3)


def bsq_quantize(z_B1hwC: torch.Tensor) -> torch.Tensor:
    """Binary spherical quantisation of [.., cd] features: sign of the L2-normalised vector times 1/sqrt(cd).

    Computed as ``z + (zhat - z)`` like the official straight-through form, so rounding matches it.
    """
    z = F.normalize(z_B1hwC, dim=-1)
    zhat = torch.where(z > 0, 1.0, -1.0).to(z.dtype) / math.sqrt(z.shape[-1])
    return z + (zhat - z)


class BSQVAE(nn.Module):
    def __init__(self, codebook_dim: int, base_ch: int = 128, ch_mult=(1, 2, 4, 4, 4), num_res_blocks: int = 2,
                 patch_size: int = 16):
        super().__init__()
        self.codebook_dim, self.patch_size = codebook_dim, patch_size
        self.encoder = Encoder(base_ch, ch_mult, num_res_blocks, codebook_dim, patch_size)
        self.decoder = Decoder(base_ch, ch_mult, num_res_blocks, codebook_dim, patch_size)
        self.quantizer = _Quantizer(codebook_dim)
        self.quantize = self.quantizer

    def decode(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_BCHW).clamp(-1, 1)

    def encode_raw(self, img_pm1: torch.Tensor) -> torch.Tensor:
        return self.encoder(img_pm1).float()

    def encode_bits(self, img_pm1: torch.Tensor, vae_schedule: list,
                    straight_through: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Multi-scale BSQ (spec §7): per scale area-downsample the residual, quantise, trilinear-upsample,
        subtract. Returns bits per scale [B, 1, h, w, cd] (uint8) and the summed quantised features [B, cd, 1, H, W].

        ``straight_through=True`` (training, OURS: scripts/train_tiny.py) passes gradients through each scale's
        quantiser as the identity (``z + (zhat - z).detach()``); the values are the same as without it."""
        h = self.encode_raw(img_pm1)[:, :, None]  # [B, cd, 1, H, W]
        full = tuple(h.shape[2:])
        residual, out, bits = h, torch.zeros_like(h), []
        for pt, ph, pw in vae_schedule:
            same = (pt, ph, pw) == full
            r = residual if same else F.interpolate(residual, size=(pt, ph, pw), mode="area")
            if straight_through:
                z = F.normalize(r.permute(0, 2, 3, 4, 1), dim=-1)
                zhat = torch.where(z > 0, 1.0, -1.0).to(z.dtype) / math.sqrt(z.shape[-1])
                q = (z + (zhat - z).detach()).permute(0, 4, 1, 2, 3)
            else:
                q = bsq_quantize(r.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
            bits.append((q > 0).permute(0, 2, 3, 4, 1).to(torch.uint8))
            if not same:
                q = F.interpolate(q, size=full, mode="trilinear")
            residual = residual - q
            out = out + q
        return bits, out


def load_vae_state_dict(vae: BSQVAE, sd: dict) -> None:
    """Strict load accepting both spellings the official loader accepts: module keys (``...conv_in.conv.weight``,
    ``...norm1.norm.weight``) and flux keys without the wrapper segment (spec infinity.md §7, README §1)."""
    own = vae.state_dict()
    alias = {}
    for k in own:
        flux = k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
        flux = flux.replace(".norm.weight", ".weight").replace(".norm.bias", ".bias")
        alias[flux] = k
    fixed = {}
    for k, v in sd.items():
        fixed[k if k in own else alias.get(k, k)] = v
    for k in own:  # the quantizer mask is the same buffer under both names
        if k.endswith("lfq.mask") and k not in fixed:
            fixed[k] = own[k]
    missing, unexpected = sorted(set(own) - set(fixed)), sorted(set(fixed) - set(own))
    if missing or unexpected:
        raise ValueError(f"VAE checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    vae.load_state_dict(fixed, strict=True)
