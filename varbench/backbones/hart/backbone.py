"""HART as a loop backbone: its parts, as the official ``HARTForT2I.autoregressive_infer_cfg`` composes them.

Spec: ``shared/specs/hart_var.md`` Part A ("Scale loop", "Residual diffusion MLP", "Tokenizer decode", pitfalls).
Official: mit-han-lab/hart @e28a41fe. What the loop sees:

* scale 0 feeds the ``context_token`` text tokens (``ScaleInfo.n`` = 300 for HART-0.7B, h = w = 1) with 1-D RoPE;
  ``head`` returns the logits of the last context position only (the one the official sampler uses);
* scales ≥ 1 feed word_embed(area-downsampled f_hat) + lvl_embed, with HART's 2-D float RoPE;
* ``guide``: t = cfg·si/(SN−1), guided = (1+t)·cond − t·uncond; at the last scale t keeps the previous stage's
  ratio (12/13 on HART-0.7B, the official stale value). No token temperature. ``guided`` is the distribution the
  sampler draws from before top-k/top-p (NOVA's entropy reads it);
* ``sample``: top-k hard-coded 600 for si < 7 and 300 after (caller's top_k ignored, as official), top-p, one
  multinomial on ``rng``; ``more_smooth`` swaps the codebook embedding for the Gumbel soft embedding (same rng,
  after the multinomial); at the last scale the residual diffusion head adds the continuous residual (CFG t);
* ``update``: bicubic upsample to the last grid, Phi_k, f_hat += h; at the last scale f_hat += tokens (no Phi);
* ``decode``: decoder(post_quant_conv(f_hat)).clamp(−1, 1).

Diffusion noise (spec pitfall 7): ``sampling.diffusion_noise`` = ``rng`` draws it from the generation's generator
(reproducible per image; our default) or ``global`` = the official order on torch's global RNGs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from varbench.backbones.base import BackboneSpec, text_conditions
from varbench.backbones.hart.diffusion import generator_noise, global_noise
from varbench.backbones.hart.model import HARTTransformer, image_coords, rope_1d, rope_2d
from varbench.backbones.hart.vae import VQVAE
from varbench.errors import UserError
from varbench.msvq import FHatBackbone, FHatState, Scale
from varbench.sampling import draw, soft_embedding, top_k_top_p


@dataclass
class HARTSampling:
    """Official defaults (sample.py / FastVAR's infer4eval.py): cfg 4.5, top_p 0 (unset), more_smooth True,
    top-k 600 before scale ``top_k_switch`` (7) and 300 from it on, diffusion with ``final_stage`` 0."""

    cfg: float = 4.5
    top_p: float = 0.0
    more_smooth: bool = True
    top_k_early: int = 600
    top_k_late: int = 300
    top_k_switch: int = 7
    final_stage: int = 0
    diffusion_temperature: float = 1.0
    diffusion_noise: str = "rng"      # rng | global

    def __post_init__(self):
        if self.diffusion_noise not in ("rng", "global"):
            raise UserError(f"model.sampling.diffusion_noise must be 'rng' or 'global', got {self.diffusion_noise!r}")


@dataclass
class HARTCond:
    ctx: torch.Tensor          # sos = cond_BD: context_embed(context_norm(context)) [rows, T, C]
    pos_ids: torch.Tensor      # context position ids [rows, T] (uncond rows: zeros)
    mask: torch.Tensor         # context mask [B, T] (prompt rows; unused by attention, as official)
    batch: int
    rows: int
    cfg: bool = True


@dataclass
class HARTCodes:
    idx: torch.Tensor          # [B, l] sampled codebook indices
    emb: torch.Tensor          # [B, l, Cvae] what is added to f_hat (codebook or soft embedding, + residual)


class HARTBackbone(FHatBackbone):
    """HART transformer + VQVAE (decode path) + text encoder + sampling settings."""

    def __init__(self, transformer: HARTTransformer, vae: VQVAE, text_encoder, sampling: HARTSampling,
                 rule_widths=None, device="cpu", dtype: str = "fp32", name: str = "hart"):
        self.model, self.vae, self.text, self.sampling = transformer, vae, text_encoder, sampling
        self.device, self.dtype, self.name = torch.device(device), dtype, name
        m = transformer
        self.spec = BackboneSpec(name, m.depth, m.C, m.num_heads, "categorical", m.V, ("sa", "ffn"), family="hart",
                                 mlp_hidden=m.blocks[0].ffn.gate_proj.out_features, mlp_mats=3, cross_attn=False)
        pns = m.patch_nums
        if rule_widths is not None and len(rule_widths) != len(pns):
            raise UserError(f"model.rule_widths has {len(rule_widths)} entries for {len(pns)} scales")
        rw = list(rule_widths) if rule_widths is not None else list(pns)
        self._scales = [Scale(si, p, p, m.context_token if si == 0 else p * p, int(rw[si])) for si, p in enumerate(pns)]
        self.forced_idx: list | None = None        # replay recorded indices instead of sampling (fixture checks)
        self.record_logits: dict | None = None     # when a dict: si -> raw head logits of every fed token
        self.diffusion_trace: list | None = None   # when a list: the diffusion steps are appended (fixture checks)

    # ---- loop parts (the rest: varbench.msvq.FHatBackbone) ----
    def ratio(self, si: int) -> float:
        """si/(SN−1); at the last scale the previous stage's ratio (the official loop variable is stale)."""
        last = self.num_scales - 1
        return min(si, last - 1) / last if last > 0 else 0.0

    def condition(self, prompts: list[str]) -> HARTCond:
        ctx, mask, pos = self.text(text_conditions(prompts, self.name))
        ctx, mask, pos = ctx.to(self.device).float(), mask.to(self.device), pos.to(self.device)
        B = len(prompts)
        use_cfg = self.sampling.cfg != 0
        if use_cfg:  # uncond: zero context, position ids 0 (spec Part A "In the generator")
            ctx = torch.cat((ctx, torch.zeros_like(ctx)), 0)
            pos = torch.cat((pos, torch.zeros_like(pos)), 0)
        return HARTCond(self.model.encode_context(ctx), pos, mask, B, ctx.shape[0], use_cfg)

    def text_lengths(self, cond: HARTCond) -> list[int]:
        return cond.mask[: cond.batch].sum(1).tolist()

    def cond_only(self, cond: HARTCond) -> HARTCond:
        B = cond.batch
        return HARTCond(cond.ctx[:B], cond.pos_ids[:B], cond.mask, B, B, cond.cfg)

    def scale_input(self, state: FHatState, cond: HARTCond, scale) -> torch.Tensor:
        m = self.model
        if scale.si == 0:
            return cond.ctx + m.lvl_embed.weight[0]
        z = F.interpolate(state.f_hat, size=(scale.h, scale.w), mode="area")
        x = m.word_embed(z.reshape(*z.shape[:2], -1).transpose(1, 2)) + m.lvl_embed.weight[scale.si]
        return x.repeat(cond.rows // cond.batch, 1, 1)

    def positions(self, cond: HARTCond, scale):
        """(cos, sin), each [rows, n, head_dim]: 1-D on the context position ids at scale 0; 2-D on
        (i/pn·last) + the last context position id (n_valid−1 for prompt rows, 0 for uncond rows) after."""
        hd = self.model.head_dim
        if scale.si == 0:
            return rope_1d(cond.pos_ids, hd)
        coords = image_coords(scale.h, self.model.patch_nums[-1], self.device)[None]     # [1, n, 2]
        coords = coords + cond.pos_ids[:, -1][:, None, None]
        return rope_2d(coords, hd)

    def gather_positions(self, pos, sel):
        idx = sel.keep_idx.to(pos[0].device)                       # [rows|1, K]
        out = []
        for t in pos:
            i = idx.expand(t.shape[0], -1) if idx.shape[0] == 1 and t.shape[0] > 1 else idx
            out.append(torch.gather(t, 1, i[..., None].expand(-1, -1, t.shape[-1])))
        return tuple(out)

    def branch(self, li, name, x, pos, cond: HARTCond, kv, attn_fn, lctx) -> torch.Tensor:
        return self.model.blocks[li].branch(name, x, cos_sin=pos, kv=kv, attn_fn=attn_fn, ctx=lctx)

    def head(self, h: torch.Tensor, cond: HARTCond, scale=None) -> torch.Tensor:
        """Raw logits of the sampled tokens: at scale 0 the last context position only."""
        ctx = cond.ctx[: h.shape[0]]
        if self.record_logits is not None and scale is not None:
            self.record_logits[scale.si] = self.model.logits(h, ctx)
        if scale is not None and scale.si == 0:
            h = h[:, -1:]
        return self.model.logits(h, ctx)

    def top_k(self, si: int) -> int:
        s = self.sampling
        return min(s.top_k_early if si < s.top_k_switch else s.top_k_late, self.model.V)

    def filter_logits(self, logits: torch.Tensor, si: int) -> torch.Tensor:
        """Top-k (keep ≥ the k-th largest, ties kept) then top-p (sort ascending, drop cumsum ≤ 1−p, keep the max)."""
        return top_k_top_p(logits, self.top_k(si), self.sampling.top_p)

    def sample(self, logits, h, cond: HARTCond, scale, rng):
        si, B = scale.si, cond.batch
        emb_w = self.vae.quantize.embedding.weight
        x = self.filter_logits(logits, si)
        if self.forced_idx is not None and si < len(self.forced_idx):
            idx = self.forced_idx[si].to(self.device).reshape(B, x.shape[1])
        else:
            idx = draw(x, rng)
        if self.sampling.more_smooth:  # Gumbel soft embedding on the filtered logits (same rng, after the draw)
            emb = soft_embedding(x, self.ratio(si), emb_w, rng)
        else:
            emb = F.embedding(idx, emb_w)
        last = si == self.num_scales - 1
        if last and self.sampling.final_stage == 0:
            emb = emb + self._residual(h, idx, cond, si, rng)
        return HARTCodes(idx, emb)

    def _residual(self, h_last, idx, cond: HARTCond, si: int, rng):
        """The continuous residual from the diffusion head (CFG t of this scale; noise per ``diffusion_noise``)."""
        m, B = self.model, cond.batch
        z = m.diffusion_condition(h_last, F.embedding(idx, self.vae.quantize.embedding.weight))
        rows, L = z.shape[0], z.shape[1]
        t = self.sampling.cfg * self.ratio(si) if rows > B else 1.0
        noise_fn = global_noise if self.sampling.diffusion_noise == "global" else generator_noise(rng, L)
        z = z.reshape(rows * L, -1)
        if self.diffusion_trace is not None:
            self.diffusion_trace.append({"z": z, "cfg": t})
        r = m.diffloss.sample(z, t, noise_fn, self.sampling.diffusion_temperature, trace=self.diffusion_trace)
        if self.diffusion_trace is not None:
            self.diffusion_trace.append({"out_scaled": r})
        return r.reshape(rows, L, -1)[:B]

    def update(self, state: FHatState, codes: HARTCodes, scale) -> FHatState:
        B, SN, last = state.f_hat.shape[0], self.num_scales, self.model.patch_nums[-1]
        hw = codes.emb.transpose(1, 2).reshape(B, self.model.Cvae, scale.h, scale.w)
        if scale.si != SN - 1:
            hw = self.vae.phi(F.interpolate(hw, size=(last, last), mode="bicubic"), scale.si, SN)
        return FHatState(state.f_hat + hw, state.idx + [codes.idx])
