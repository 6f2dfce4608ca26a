"""HART's residual diffusion head (MAR-style ``DiffLoss``: ``SimpleMLPAdaLN`` + IDDPM sampling), written from
``shared/specs/hart_var.md`` Part A "Residual diffusion MLP".

Key names are the official ones (``diffloss.net.*``, mit-han-lab/hart @e28a41fe ``hart/modules/diffusion``).
Sampling: 1000-step cosine schedule respaced to ``num_sampling_steps`` (the model sees the original index),
ε-prediction with learned-range variance, x0 clipped to [−1, 1], CFG inside the net (guided ε, unguided variance
channel), no noise at the last step, output × 0.6. The schedule constants are computed in float64 with numpy and
read as float32, like the official ``_extract_into_tensor``.

Noise: ``noise(shape, like)`` is a callable the caller supplies. The official code draws the initial noise from
torch's global CPU RNG and each step's noise from the global RNG of the device (``randn_like``);
``global_noise`` reproduces that order exactly.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

VAE_SCALE = 0.6


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.freq_dim = freq_dim

    @staticmethod
    def embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t):
        return self.mlp(self.embedding(t, self.freq_dim))


class ResBlock(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(w, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 3 * w))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, w: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(w, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    def __init__(self, in_ch: int, width: int, out_ch: int, z_ch: int, depth: int):
        super().__init__()
        self.in_ch = in_ch
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_ch, width)
        self.input_proj = nn.Linear(in_ch, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, out_ch)

    def forward(self, x, t, c):
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for b in self.res_blocks:
            x = b(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(self, x, t, c, cfg_scale: float):
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, c)
        eps, rest = out[:, : self.in_ch], out[:, self.in_ch:]
        e_c, e_u = torch.split(eps, len(eps) // 2, dim=0)
        g = e_c * (1 + cfg_scale) - cfg_scale * e_u
        return torch.cat([torch.cat([g, g], dim=0), rest], dim=1)


def space_timesteps(num_timesteps: int, section_counts: str) -> list[int]:
    """The kept original steps for a respacing such as "8" (equal sections, fractional stride, rounded)."""
    counts = [int(x) for x in str(section_counts).split(",")]
    size_per, extra = num_timesteps // len(counts), num_timesteps % len(counts)
    start, steps = 0, []
    for i, n in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < n:
            raise ValueError(f"cannot divide section of {size} steps into {n}")
        stride = 1 if n <= 1 else (size - 1) / (n - 1)
        cur = 0.0
        for _ in range(n):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


class Schedule:
    """Respaced cosine IDDPM schedule (float64 numpy constants, as the official GaussianDiffusion)."""

    def __init__(self, num_sampling_steps: str = "8", num_timesteps: int = 1000):
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        base = np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                         for i in range(num_timesteps)], dtype=np.float64)
        ac_base = np.cumprod(1.0 - base, axis=0)
        keep = set(space_timesteps(num_timesteps, num_sampling_steps)) if num_sampling_steps else set(range(num_timesteps))
        last, betas, self.timestep_map = 1.0, [], []
        for i, ac in enumerate(ac_base):
            if i in keep:
                betas.append(1 - ac / last)
                last = ac
                self.timestep_map.append(i)
        b = np.array(betas, dtype=np.float64)
        ac = np.cumprod(1.0 - b, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        self.num_steps = len(b)
        pv = b * (1.0 - ac_prev) / (1.0 - ac)
        self.np = {
            "log_betas": np.log(b),
            "posterior_log_variance_clipped": np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.array([]),
            "coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
            "coef2": (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
            "sqrt_recip_ac": np.sqrt(1.0 / ac),
            "sqrt_recipm1_ac": np.sqrt(1.0 / ac - 1),
        }

    def get(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The constant at each row's step, float32, broadcast to ``like`` (official _extract_into_tensor)."""
        res = torch.from_numpy(self.np[name]).to(t.device)[t].float()
        while res.dim() < like.dim():
            res = res[..., None]
        return res + torch.zeros(like.shape, device=t.device)


NoiseFn = Callable[[tuple, torch.Tensor, int], torch.Tensor]   # (shape, like, step: -1 initial / j) -> noise


def global_noise(shape, like: torch.Tensor, step: int) -> torch.Tensor:
    """The official RNG order: initial noise from torch's global CPU RNG, step noise ``randn_like`` on the device."""
    if step < 0:
        return torch.randn(*shape).to(like.device)
    return torch.randn_like(like)


def generator_noise(rng, tokens: int = 0) -> NoiseFn:
    """All diffusion noise from torch.Generator(s), in the official order and shapes (reproducible per image).

    ``rng`` a list of B generators (one per image, ``tokens`` = L tokens per image): each image draws what it would
    draw alone (its cond rows, then its uncond rows), placed at its rows of the batch."""
    def draw(n, c, g, like):
        dev = g.device if g is not None else like.device
        return torch.randn(n, c, generator=g, device=dev).to(like.device)

    def fn(shape, like, step):
        if not isinstance(rng, (list, tuple)):
            return draw(shape[0], shape[1], rng, like)
        B, L, C = len(rng), tokens, shape[1]
        per = shape[0] // (B * L)                       # rows per image in this tensor (1: half / no CFG, 2: CFG)
        parts = [draw(per * L, C, g, like).view(per, L, C) for g in rng]
        return torch.stack(parts, 1).reshape(shape)      # [per, B, L, C]: cond rows of every image, then uncond
    return fn


class DiffHead(nn.Module):
    """``diffloss``: the net (keys ``diffloss.net.*``) and the respaced sampler."""

    def __init__(self, target_ch: int, z_ch: int, width: int, depth: int, num_sampling_steps: str = "8"):
        super().__init__()
        self.in_ch = target_ch
        self.net = SimpleMLPAdaLN(target_ch, width, 2 * target_ch, z_ch, depth)
        self.schedule = Schedule(num_sampling_steps)

    def p_mean_variance(self, x, t, z, cfg: float):
        """(mean, log_variance) of p(x_{t-1} | x_t) for respaced step indices ``t`` [N]."""
        s = self.schedule
        tm = torch.tensor(s.timestep_map, device=t.device, dtype=t.dtype)[t]
        out = self.net.forward_with_cfg(x, tm, z, cfg) if cfg != 1.0 else self.net(x, tm, z)
        C = x.shape[1]
        eps, var_v = torch.split(out, C, dim=1)
        min_log = s.get("posterior_log_variance_clipped", t, x)
        max_log = s.get("log_betas", t, x)
        frac = (var_v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = (s.get("sqrt_recip_ac", t, x) * x - s.get("sqrt_recipm1_ac", t, x) * eps).clamp(-1, 1)
        mean = s.get("coef1", t, x) * x0 + s.get("coef2", t, x) * x
        return mean, log_var

    def p_sample(self, x, t, z, cfg: float, noise: torch.Tensor, temperature: float = 1.0):
        mean, log_var = self.p_mean_variance(x, t, z, cfg)
        nonzero = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        return mean + nonzero * torch.exp(0.5 * log_var) * noise * temperature

    def sample(self, z: torch.Tensor, cfg: float, noise_fn: NoiseFn, temperature: float = 1.0,
               trace: list | None = None) -> torch.Tensor:
        """Residual tokens for conditions ``z`` [N, Cz] (with CFG: cond rows then uncond rows), × 0.6."""
        if cfg != 1.0:
            n = noise_fn((z.shape[0] // 2, self.in_ch), z, -1)
            x = torch.cat([n, n], dim=0)
        else:
            x = noise_fn((z.shape[0], self.in_ch), z, -1)
        for j, i in enumerate(reversed(range(self.schedule.num_steps))):
            t = torch.full((x.shape[0],), i, device=z.device, dtype=torch.long)
            mean, log_var = self.p_mean_variance(x, t, z, cfg)
            noise = noise_fn(tuple(x.shape), x, j)
            nonzero = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
            x_new = mean + nonzero * torch.exp(0.5 * log_var) * noise * temperature
            if trace is not None:
                trace.append({"x_in": x, "t": t, "x_out": x_new, "mean": mean, "log_var": log_var})
            x = x_new
        return x * VAE_SCALE
