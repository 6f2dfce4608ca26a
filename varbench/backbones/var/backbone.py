"""VAR as a loop backbone: its parts, as the official ``VAR.autoregressive_infer_cfg`` composes them.

Spec: ``shared/specs/hart_var.md`` Part B ("Sampling loop"). Official: FoundationVision/VAR @78b95394
``models/var.py``. What the loop sees:

* conditions are ImageNet class labels (int 0..num_classes−1; ``num_classes`` = the unconditional label); with
  CFG the batch is doubled, rows B..2B−1 taking the unconditional label;
* scale 0 feeds one token: class embedding + pos_start + lvl_embed(0) + pos_1LC[0]; scale si > 0 feeds
  word_embed(area-downsampled f_hat at pn_si) + lvl_embed(si) + pos_1LC[segment si], duplicated for CFG;
* ``guide``: t = cfg·si/(SN−1), guided = (1+t)·cond − t·uncond (the guidance ramps from 0 to cfg). ``guided``
  is the distribution the sampler draws from before top-k/top-p (NOVA's entropy reads it);
* ``sample``: top-k, top-p, one multinomial over [B·pn², V] on ``rng`` (``varbench/sampling.py``); with
  ``more_smooth`` (visualisation only, off for FID) the Gumbel soft embedding replaces codebook[idx];
* ``update``: bicubic upsample to the last grid (not at the last scale), Phi_k, f_hat += h;
* ``decode``: decoder(post_quant_conv(f_hat)).clamp(−1, 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from varbench.backbones.base import BackboneSpec, label_conditions
from varbench.backbones.var.model import VARTransformer
from varbench.errors import UserError
from varbench.msvq import VQVAE, FHatBackbone, FHatState, Scale
from varbench.sampling import draw, soft_embedding, top_k_top_p


@dataclass
class VARSampling:
    """Defaults: the official FID evaluation settings (README): cfg 1.5, top_k 900, top_p 0.96, more_smooth off.
    (``autoregressive_infer_cfg``'s own defaults are cfg 1.5, top_k 0, top_p 0; the demo uses cfg 4, top_p 0.95.)"""

    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    more_smooth: bool = False

    def __post_init__(self):
        if self.top_k < 0 or not 0 <= self.top_p <= 1:
            raise UserError(f"model.sampling: top_k must be >= 0 and top_p in [0, 1], got {self.top_k}, {self.top_p}")


@dataclass
class VARCond:
    labels: torch.Tensor       # [rows] class labels (uncond rows: num_classes)
    cond_BD: torch.Tensor      # class embeddings [rows, C]
    ada: list                  # per block the AdaLN vectors [rows, 1, 6, C]
    batch: int
    rows: int
    cfg: bool = True


@dataclass
class VARCodes:
    idx: torch.Tensor          # [B, l] sampled codebook indices
    emb: torch.Tensor          # [B, l, Cvae] what enters f_hat (codebook[idx] or the soft embedding)


class VARBackbone(FHatBackbone):
    """VAR transformer + VQVAE + sampling settings."""

    def __init__(self, transformer: VARTransformer, vae: VQVAE, sampling: VARSampling, rule_widths=None,
                 device="cpu", dtype: str = "fp32", name: str = "var"):
        self.model, self.vae, self.sampling = transformer, vae, sampling
        self.device, self.dtype, self.name = torch.device(device), dtype, name
        m = transformer
        self.spec = BackboneSpec(name, m.depth, m.C, m.num_heads, "categorical", m.V, ("sa", "ffn"), family="var",
                                 mlp_hidden=m.blocks[0].ffn.fc1.out_features, mlp_mats=2, cross_attn=False,
                                 conditioning="class")
        pns = m.patch_nums
        if rule_widths is not None and len(rule_widths) != len(pns):
            raise UserError(f"model.rule_widths has {len(rule_widths)} entries for {len(pns)} scales")
        rw = list(rule_widths) if rule_widths is not None else list(pns)
        self._scales = [Scale(si, p, p, p * p, int(rw[si])) for si, p in enumerate(pns)]
        self.forced_idx: list | None = None        # replay recorded indices instead of sampling (fixture checks)
        self.record_logits: dict | None = None     # when a dict: si -> raw head logits of the scale (all rows)

    # ---- loop parts (the rest: varbench.msvq.FHatBackbone) ----
    def condition(self, conditions: list) -> VARCond:
        labels = torch.tensor(label_conditions(conditions, self.model.num_classes, self.name), device=self.device)
        B, use_cfg = labels.shape[0], self.sampling.cfg != 0
        if use_cfg:  # rows B..2B-1: the unconditional label (official: torch.full_like(label_B, num_classes))
            labels = torch.cat((labels, torch.full_like(labels, self.model.num_classes)))
        cond_BD = self.model.class_emb(labels)
        return VARCond(labels, cond_BD, self.model.ada_params(cond_BD), B, labels.shape[0], use_cfg)

    def text_lengths(self, cond: VARCond) -> list[int]:
        return [0] * cond.batch     # no text: the class is the first token, not a cross-attention memory

    def cond_only(self, cond: VARCond) -> VARCond:
        B = cond.batch
        return VARCond(cond.labels[:B], cond.cond_BD[:B], [a[:B] for a in cond.ada], B, B, cond.cfg)

    def scale_input(self, state: FHatState, cond: VARCond, scale) -> torch.Tensor:
        if scale.si == 0:
            return self.model.first_input(cond.cond_BD)
        z = F.interpolate(state.f_hat, size=(scale.h, scale.w), mode="area")
        return self.model.next_input(z, scale.si).repeat(cond.rows // cond.batch, 1, 1)

    def positions(self, cond: VARCond, scale):
        return None        # absolute positions are in the input (pos_1LC, lvl_embed); no rotation

    def gather_positions(self, pos, sel):
        return None

    def branch(self, li, name, x, pos, cond: VARCond, kv, attn_fn, lctx) -> torch.Tensor:
        return self.model.blocks[li].branch(name, x, cond.ada[li][: x.shape[0]], kv=kv, attn_fn=attn_fn, ctx=lctx)

    def head(self, h: torch.Tensor, cond: VARCond, scale=None) -> torch.Tensor:
        out = self.model.logits(h, cond.cond_BD[: h.shape[0]])
        if self.record_logits is not None and scale is not None:
            self.record_logits[scale.si] = out
        return out

    def sample(self, logits, h, cond: VARCond, scale, rng) -> VARCodes:
        si, B = scale.si, cond.batch
        emb_w = self.vae.quantize.embedding.weight
        x = top_k_top_p(logits, self.sampling.top_k, self.sampling.top_p)
        if self.forced_idx is not None and si < len(self.forced_idx):
            idx = self.forced_idx[si].to(self.device).reshape(B, x.shape[1])
        else:
            idx = draw(x, rng)
        emb = soft_embedding(x, self.ratio(si), emb_w, rng) if self.sampling.more_smooth else F.embedding(idx, emb_w)
        return VARCodes(idx, emb)

    def update(self, state: FHatState, codes: VARCodes, scale) -> FHatState:
        B, last = state.f_hat.shape[0], self.model.patch_nums[-1]
        hw = codes.emb.transpose(1, 2).reshape(B, self.model.Cvae, scale.h, scale.w)
        return FHatState(state.f_hat + self.vae._up(hw, scale.si, self.num_scales, last), state.idx + [codes.idx])
