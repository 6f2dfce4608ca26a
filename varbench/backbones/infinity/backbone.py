"""Infinity as a loop backbone: its parts, as the official ``autoregressive_infer_cfg`` composes them.

Spec: ``shared/specs/infinity.md`` §2 (conditioning), §6 (inference loop), §8 (precision), §9 (defaults).
Official: FoundationVision/Infinity @4c27bbb5 ``Infinity.autoregressive_infer_cfg``,
``sample_with_top_k_top_p_also_inplace_modifying_logits_`` (ours is out of place: hooks see unedited logits).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from varbench.backbones.base import BackboneSpec, text_conditions
from varbench.backbones.infinity.model import NORM_EPS, InfinityTransformer, TextMemory
from varbench.backbones.infinity.schedules import Schedule, rope_cos_sin, rope_positions
from varbench.backbones.infinity.vae import BSQVAE, bits_to_codes
from varbench.entropy import bitwise_entropy_from_delta
from varbench.kvcache import KVCache


@dataclass
class Sampling:
    """Official inference settings (spec §9). ``cfg``/``tau``: a number, or one value per scale.

    ``cfg_insertion_layer``: 0 = CFG on logits (official default); k < 0 = mix hidden states after block depth+k.
    """

    cfg: float | list = 3.0
    tau: float | list = 1.0
    top_k: int = 900
    top_p: float = 0.97
    cfg_insertion_layer: int = 0

    def per_scale(self, value, si: int) -> float:
        return float(value[si] if isinstance(value, (list, tuple)) else value)


@dataclass
class InfinityCond:
    sos: torch.Tensor             # pooled text [rows, C] (the head's condition)
    gss: torch.Tensor             # shared AdaLN [rows, 1, 6, C]
    mem: TextMemory               # cross-attention memory
    batch: int                    # images B
    rows: int                     # B, or 2B with CFG
    cfg: bool = False             # CFG is on for this generation (stays True when a method drops the uncond rows)
    lens_heads: dict = field(default_factory=dict, repr=False, compare=False)   # folded lens heads (lens_entropy)


@dataclass
class InfinityState:
    summed: torch.Tensor | float = 0.0                 # [B, cd, 1, H, W] accumulated codes (VAE grid)
    bits: list = field(default_factory=list)           # sampled bits per scale [B, h*w, d]


def sample_bits(logits_BLV: torch.Tensor, top_k: int, top_p: float, rng) -> torch.Tensor:
    """Sample every bit of [B, L, 2d] logits: top-k (clipped to 2, so a no-op at 900), top-p, one multinomial.

    Top-p (official): sort ascending, drop entries whose cumulative softmax <= 1 - top_p, always keep the largest;
    for a pair this makes a bit deterministic when its minority probability is <= 1 - top_p.
    """
    B, L, V = logits_BLV.shape
    x = logits_BLV.reshape(B, -1, 2).float()
    if 0 < top_k < 2:
        x = x.masked_fill(x < x.topk(top_k, dim=-1).values.amin(-1, keepdim=True), float("-inf"))
    if top_p > 0:
        srt, idx = x.sort(dim=-1, descending=False)
        remove = srt.softmax(-1).cumsum(-1) <= (1 - top_p)
        remove[..., -1:] = False
        x = x.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    probs = x.softmax(-1)
    if isinstance(rng, (list, tuple)):  # one generator per image: a batch draws what B single runs would draw
        draws = torch.stack([torch.multinomial(probs[b].view(-1, 2), 1, replacement=True, generator=g)
                             for b, g in enumerate(rng)])
    else:
        draws = torch.multinomial(probs.view(-1, 2), 1, replacement=True, generator=rng)
    return draws.view(B, L, V // 2).to(torch.uint8)


class InfinityBackbone:
    """Transformer + BSQ-VAE + text encoder + schedule + sampling settings."""

    def __init__(self, transformer: InfinityTransformer, vae: BSQVAE, text_encoder, schedule: Schedule,
                 sampling: Sampling, patchify: bool = False, device="cpu", dtype: str = "fp32", name="infinity"):
        self.model, self.vae, self.text, self.schedule = transformer, vae, text_encoder, schedule
        self.sampling, self.patchify = sampling, patchify
        self.forced_bits: list | None = None  # replay recorded bits instead of sampling (fixture checks)
        self.device, self.dtype = torch.device(device), dtype
        m = transformer
        self.spec = BackboneSpec(name, m.depth, m.C, m.num_heads, "bitwise", m.d_bits, ("sa", "ca", "ffn"),
                                 family="infinity", mlp_hidden=m.blocks[0].ffn.fc1.out_features, mlp_mats=2,
                                 cross_attn=True)
        self._scales = schedule.scales
        self._cos_sin = rope_cos_sin(rope_positions(schedule), m.head_dim).to(self.device)
        f = 2 if patchify else 1
        self.vae_hws = [(h * f, w * f) for h, w in schedule.hws]
        if dtype == "bf16":  # official: blocks in bf16, everything else fp32, generation under autocast (§8)
            for b in m.blocks:
                b.bfloat16()

    # ---- loop parts ----
    def scales(self):
        return self._scales

    def precision(self):
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _cfg(self, si: int) -> float:
        return self.sampling.per_scale(self.sampling.cfg, si)

    def _cfg_on_logits(self, cfg: float) -> bool:
        """CFG is applied to the logits (official default), not to hidden states, and changes them."""
        return self.sampling.cfg_insertion_layer == 0 and cfg != 1

    def condition(self, prompts: list[str]) -> InfinityCond:
        kv, lens = self.text(text_conditions(prompts, self.spec.name))
        kv = kv.to(self.device)
        B = len(prompts)
        use_cfg = any(self._cfg(s.si) != 1 for s in self._scales)
        if use_cfg:  # uncond = cfg_uncond[:len_i] per prompt, appended after the cond rows (spec §2)
            kv, lens = torch.cat((kv, self.model.uncond_text(lens).to(kv.dtype)), 0), lens + lens
        sos, gss, mem = self.model.encode_text(kv, lens)
        return InfinityCond(sos, gss, mem, B, len(lens), use_cfg)

    def text_lengths(self, cond: InfinityCond) -> list[int]:
        return cond.mem.mask_BT[: cond.batch].sum(1).tolist()

    def cond_only(self, cond: InfinityCond) -> InfinityCond:
        B = cond.batch
        return InfinityCond(cond.sos[:B], cond.gss[:B], cond.mem.rows(B), B, B, cond.cfg)

    def init_state(self, cond) -> InfinityState:
        return InfinityState()

    def new_kv_cache(self) -> KVCache:
        return KVCache(capacity=self.schedule.total_tokens)  # preallocated for the whole schedule

    def scale_input(self, state: InfinityState, cond: InfinityCond, scale, resize: str = "trilinear") -> torch.Tensor:
        """Scale 0: sos + pos_start. Later: word_embed(trilinear resize of the accumulated codes), both CFG
        halves alike (trilinear also when downsampling, spec pitfall 2). Level embedding added (spec §4).
        ``resize``: another ``F.interpolate`` mode, asked for by a method (``ScalePlan.input_resize``)."""
        m = self.model
        if scale.si == 0:
            x = cond.sos[:, None, :] + m.pos_start
        else:
            if torch.is_tensor(state.summed):
                z = F.interpolate(state.summed, size=(1, *self.vae_hws[scale.si]), mode=resize).squeeze(2)
            else:  # every earlier scale was skipped: nothing accumulated yet
                z = torch.zeros(cond.batch, self.vae.codebook_dim, *self.vae_hws[scale.si], device=self.device)
            if self.patchify:
                z = F.pixel_unshuffle(z, 2)
            x = m.word_embed(z.reshape(*z.shape[:2], -1).transpose(1, 2).float())
            x = x.repeat(cond.rows // cond.batch, 1, 1)
        return x + m.lvl_embed.weight[scale.si]

    def positions(self, cond: InfinityCond, scale) -> torch.Tensor:
        return self._cos_sin[:, None, None, scale.start:scale.start + scale.n]  # [2, 1, 1, n, c/2]

    def gather_positions(self, pos: torch.Tensor, sel) -> torch.Tensor:
        idx = sel.keep_idx.to(pos.device)  # [rows|1, K]
        g = pos[:, 0, 0][:, idx]           # [2, rows|1, K, c/2]
        return g[:, :, None]

    def branch(self, li, name, x, pos, cond: InfinityCond, kv, attn_fn, lctx) -> torch.Tensor:
        return self.model.blocks[li].branch(name, x, gss=cond.gss, mem=cond.mem, cos_sin=pos, kv=kv,
                                            attn_fn=attn_fn, ctx=lctx, cache_key=li)

    def after_block(self, li, x, cond: InfinityCond, sctx) -> torch.Tensor:
        k = self.sampling.cfg_insertion_layer
        cfg = self._cfg(sctx.si)
        if k < 0 and li == self.spec.depth + k and cond.rows > cond.batch and cfg != 1:
            B = cond.batch
            mixed = cfg * x[:B] + (1 - cfg) * x[B:]
            return torch.cat((mixed, mixed), 0)
        return x

    def head(self, h: torch.Tensor, cond: InfinityCond, scale=None) -> torch.Tensor:
        return self.model.logits(h, cond.sos[: h.shape[0]])

    def guide(self, logits: torch.Tensor, cond: InfinityCond, scale):
        """(cond, uncond or None, guided) logits. cond/uncond are raw; guided = cfg·(cond/tau) + (1-cfg)·(uncond/tau)
        with CFG on logits (official order: ``.mul(1/tau)`` first, then the mix; spec §6.3). When a method dropped
        the unconditional branch, guided = cfg·ℓ + (1-cfg)·ℓ with ℓ = cond/tau (SkipVAR's official formula)."""
        B, tau, cfg = cond.batch, self.sampling.per_scale(self.sampling.tau, scale.si), self._cfg(scale.si)
        lc, lu = logits[:B], (logits[B:] if cond.rows > B else None)
        on_logits = self._cfg_on_logits(cfg)
        if on_logits and lu is not None:
            return lc, lu, cfg * lc.mul(1 / tau) + (1 - cfg) * lu.mul(1 / tau)
        if on_logits and cond.cfg:
            lcs = lc.mul(1 / tau)
            return lc, None, cfg * lcs + (1 - cfg) * lcs
        return lc, lu, lc.mul(1 / tau)

    def lens_entropy(self, h: torch.Tensor, cond: InfinityCond, scale, mix: str = "guided") -> torch.Tensor:
        """Logit-lens entropy maps in nats (sum over bits) of hidden states ``h`` [R, n, C], with the head FOLDED.

        ``mix="guided"`` (h holds every row): [B, n], the entropy of ``guide(head(h))[2]``; ``mix="rows"``: [R, n],
        the entropy of each row's own logits / tau. Same quantity as the unfolded path, computed in fewer passes
        over the hidden state: a bit's distribution depends on its logit pair only through d = l_1 - l_0, and the head
        is linear after the LayerNorm, so the AdaLN scale/shift of each row (``head_nm``), the pair difference,
        1/tau and the CFG weights fold into a per-row [d_bits, C] matrix: one LayerNorm, one batched matmul with
        half the head's outputs, and no AdaLN pass (the unfolded path: LayerNorm, AdaLN, the full head, the CFG mix).
        Values agree with the unfolded path up to float rounding (tests/test_lens.py)."""
        m, B, R, C = self.model, cond.batch, h.shape[0], h.shape[-1]
        tau, cfg = self.sampling.per_scale(self.sampling.tau, scale.si), self._cfg(scale.si)
        if mix not in ("guided", "rows"):
            raise ValueError(f"mix must be 'guided' or 'rows', got {mix!r}")
        mixing = mix == "guided" and self._cfg_on_logits(cfg) and cond.rows > B
        if mix == "guided" and R != cond.rows:
            raise ValueError(f"mix='guided' needs every row of the hidden state ({cond.rows}), got {R}")
        with torch.autocast(h.device.type, enabled=False):
            key = (R, mixing, tau, cfg)   # the text condition is fixed for a generation: fold once per scale setting
            if key not in cond.lens_heads:
                scale_, shift = m.head_nm.ada_lin(cond.sos[:R].float()).view(R, 2, C).unbind(1)   # as head_nm
                W, b = m.head.weight.float(), m.head.bias.float()
                Wd, bd = W[1::2] - W[0::2], b[1::2] - b[0::2]                                    # [d, C], [d]
                coef = torch.full((R, 1), 1 / tau, device=h.device)
                if mixing:   # guided = cfg·(cond/tau) + (1-cfg)·(uncond/tau)
                    coef[:B], coef[B:] = cfg / tau, (1 - cfg) / tau
                w = Wd[None] * scale_.add(1)[:, None, :] * coef[..., None]                        # [R, d, C]
                cond.lens_heads[key] = (w.transpose(1, 2), ((shift @ Wd.T + bd) * coef)[:, None, :])
            w, bias = cond.lens_heads[key]
            xn = F.layer_norm(h.float(), (C,), eps=NORM_EPS)
            delta = torch.baddbmm(bias, xn, w)                                                # [R, n, d]
        if mixing:
            delta = delta[:B] + delta[B:]
        elif mix == "guided":
            delta = delta[:B]
        return bitwise_entropy_from_delta(delta)

    def preview(self, state: InfinityState, si: int) -> torch.Tensor:
        """Decode the accumulated codes resized (trilinear, as the official code) to the VAE grid of scale ``si``."""
        return self.preview_codes(state.summed, si)

    def preview_codes(self, summed: torch.Tensor, si: int) -> torch.Tensor:
        z = F.interpolate(summed, size=(1, *self.vae_hws[si]), mode="trilinear").squeeze(2)
        with torch.autocast(self.device.type, enabled=False):
            return self.vae.decode(z.float())

    def sample(self, logits, h, cond, scale, rng):
        if self.forced_bits is not None and scale.si < len(self.forced_bits):  # official ``gt_leak``
            return self.forced_bits[scale.si].to(self.device)
        return sample_bits(logits, self.sampling.top_k, self.sampling.top_p, rng)

    def update(self, state: InfinityState, bits_BLd: torch.Tensor, scale, zero=None) -> InfinityState:
        """Bits -> codes -> accumulate on the final VAE grid (trilinear), spec §6.5–6.6. ``zero`` ([B, n] bool,
        ``Method.code_mask``): those tokens' codes are set to 0 before the accumulation (with patchify: its 2×2)."""
        B = bits_BLd.shape[0]
        b = bits_BLd.reshape(B, scale.h, scale.w, -1)
        if self.patchify:  # bit k -> channel k//4 at sub-pixel ((k%4)//2, k%2)
            b = F.pixel_shuffle(b.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        codes = bits_to_codes(b[:, None].float(), self.vae.codebook_dim)  # [B, cd, 1, h', w']
        if zero is not None:
            z = zero.to(codes.device).reshape(B, 1, 1, scale.h, scale.w)
            if self.patchify:
                z = z.repeat_interleave(2, -2).repeat_interleave(2, -1)
            codes.masked_fill_(z, 0.0)   # in place: keeps the codes' (permuted) layout, so interpolation rounds alike
        last = scale.si == len(self._scales) - 1
        if not last:
            codes = F.interpolate(codes, size=(1, *self.vae_hws[-1]), mode="trilinear")
        summed = codes if not torch.is_tensor(state.summed) else state.summed + codes
        return InfinityState(summed, state.bits + [bits_BLd])

    def decode(self, state: InfinityState) -> torch.Tensor:
        if not torch.is_tensor(state.summed):
            raise RuntimeError("no scale was computed: nothing to decode")
        with torch.autocast(self.device.type, enabled=False):
            return self.vae.decode(state.summed.squeeze(2).float())
