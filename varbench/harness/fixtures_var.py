"""VAR golden-fixture check: rebuild VAR from ``tiny_meta.json`` / ``tiny_saln_meta.json`` alone, compare with the
official run.

Fixture format: ``shared/fixtures/var/README.md`` (official FoundationVision/VAR @78b95394 classes on CPU, fp32).
Compared:

1. the training path: our teacher-forcing input rebuilt from the recorded indices, and our block-causal forward on
   the fixture's input with the true labels and with the unconditional label (``tf_logits_cond/uncond``, ≤ 1e-5),
   the CFG mix per scale (t = cfg·si/(SN−1)) and its entropy;
2. the inference path, through OUR loop with the K/V cache (recorded indices forced): the raw cond/uncond logits of
   every scale against the teacher-forced ones (the official KV and TF paths differ by ≤ 1.4e-6), the guided logits
   and their entropy, f_hat and the image;
3. free sampling with the fixture's ``g_seed``: our sampler draws the recorded indices (one multinomial per scale on
   one generator, as official);
4. ``embed_to_fhat`` (``f_hat_from_idx``) and the tokenizer's encode path (``enc_*``: quant_conv∘encoder, the
   multi-scale quantisation with patch_nums (1, 2, 4), and the reconstruction), where the fixture stores them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from varbench.backbones.var.backbone import VARBackbone, VARSampling
from varbench.backbones.var.load import new_modules
from varbench.entropy import categorical_entropy
from varbench.errors import UserError
from varbench.harness.checks import TOL, Check, _diff
from varbench.hooks import Method
from varbench.loop import generate
from varbench.msvq import fit_ema_buffer

TF_TOL = 1e-5          # README "Observed facts": KV-cached vs teacher-forced logits differ by ≤ 1.4e-6; use ≈ 1e-5
ENC_PATCH_NUMS = (1, 2, 4)


def is_var_meta(meta: dict) -> bool:
    return "num_classes" in (meta.get("config") or {})


class _GuidedRecorder(Method):
    """Keeps the guided logits of every scale (read-only: returns None, the loop samples as usual)."""

    def start(self):
        self.guided = {}

    def after_logits(self, sctx, lc, lu, lg):
        self.guided[sctx.si] = lg.clone()


def _tensors(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing (a fixture's files lie beside its meta file)")
    return load_file(str(path))


def _weights(path: Path) -> dict:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in _tensors(path).items()}


def build_from_meta(meta_path: str | Path, meta: dict):
    """(backbone, tensors) with the fixture's weights loaded strictly (fp8-stored values cast to float32)."""
    meta_path = Path(meta_path)
    d, tag = meta_path.parent, meta_path.name[: -len("_meta.json")]
    c, s = meta["config"], meta["sampling"]
    arch = {"depth": c["depth"], "embed_dim": c["embed_dim"], "num_heads": c["num_heads"], "num_classes": c["num_classes"],
            "patch_nums": c["patch_nums"], "mlp_ratio": c["mlp_ratio"], "norm_eps": c["norm_eps"],
            "shared_aln": c["shared_aln"], "attn_l2_norm": c["attn_l2_norm"]}
    if c.get("using_znorm"):
        raise UserError(f"{meta_path}: using_znorm=True is not implemented (VAR's checkpoints use False)")
    vcfg = {"vocab_size": c["V"], "z_channels": c["Cvae"], "ch": c["ch"], "quant_resi": c["quant_resi"],
            "share_quant_resi": c["share_quant_resi"]}
    tf, vae = new_modules(arch, vcfg)
    tf.load_state_dict(_weights(d / f"{tag}_var_weights.safetensors"), strict=True)
    vae.load_state_dict(fit_ema_buffer(_weights(d / "tiny_vqvae_weights.safetensors"), vae), strict=True)
    smp = VARSampling(cfg=s["cfg"], top_k=s["top_k"], top_p=s["top_p"], more_smooth=bool(s["more_smooth"]))
    bb = VARBackbone(tf.eval(), vae.eval(), smp, None, "cpu", "fp32", f"{tag}_fixture")
    return bb, _tensors(d / f"{tag}_tensors.safetensors")


@torch.no_grad()
def check_var_fixture(meta_path: str | Path, meta: dict) -> list[Check]:
    bb, t = build_from_meta(meta_path, meta)
    s, m = meta["sampling"], bb.model
    B, SN, pns = int(s["B"]), bb.num_scales, m.patch_nums
    labels = t["labels"]
    idx_ref = [t[f"idx_s{si:02d}"] for si in range(SN)]
    out: list[Check] = []

    # 1. the training path
    x_in = bb.vae.idx_to_var_input(idx_ref, pns)
    out.append(Check("tf_input_BLCv (from the recorded idx)", _diff(x_in, t["tf_input_BLCv"]), TF_TOL))
    tc = m.teacher_forced_logits(labels, t["tf_input_BLCv"])
    tu = m.teacher_forced_logits(torch.full_like(labels, m.num_classes), t["tf_input_BLCv"])
    out.append(Check("tf_logits_cond (teacher forcing)", _diff(tc, t["tf_logits_cond"]), TF_TOL))
    out.append(Check("tf_logits_uncond (teacher forcing)", _diff(tu, t["tf_logits_uncond"]), TF_TOL))
    mix = torch.cat([(1 + bb.sampling.cfg * bb.ratio(si)) * tc[:, b:e] - bb.sampling.cfg * bb.ratio(si) * tu[:, b:e]
                     for si, (b, e) in enumerate(m.begin_ends)], 1)
    out.append(Check("tf_logits_cfg (teacher forcing)", _diff(mix, t["tf_logits_cfg"]), TF_TOL))
    out.append(Check("tf_entropy_cfg (teacher forcing)", _diff(categorical_entropy(mix), t["tf_entropy_cfg"]),
                     TOL["entropy"]))

    # 2. the inference path through the loop (K/V cache), recorded indices forced
    bb.forced_idx, bb.record_logits = idx_ref, {}
    rec = _GuidedRecorder()
    res = generate(bb, [int(v) for v in labels], rec)
    raw, bb.forced_idx, bb.record_logits = bb.record_logits, None, None
    worst = {"cond": 0.0, "uncond": 0.0, "guided": 0.0, "entropy": 0.0}
    for si, (b, e) in enumerate(m.begin_ends):
        got = raw.get(si)
        if got is None or si not in rec.guided:
            worst = dict.fromkeys(worst, float("inf"))
            break
        worst["cond"] = max(worst["cond"], _diff(got[:B], t["tf_logits_cond"][:, b:e]))
        worst["uncond"] = max(worst["uncond"], _diff(got[B:], t["tf_logits_uncond"][:, b:e]))
        worst["guided"] = max(worst["guided"], _diff(rec.guided[si], t["tf_logits_cfg"][:, b:e]))
        worst["entropy"] = max(worst["entropy"], _diff(categorical_entropy(rec.guided[si]), t["tf_entropy_cfg"][:, b:e]))
    out.append(Check("KV-cached loop: cond logits vs tf_logits_cond, max over scales", worst["cond"], TF_TOL))
    out.append(Check("KV-cached loop: uncond logits vs tf_logits_uncond, max over scales", worst["uncond"], TF_TOL))
    out.append(Check("KV-cached loop: guided logits vs tf_logits_cfg, max over scales", worst["guided"], TOL["logits_cfg"]))
    out.append(Check("KV-cached loop: entropy of the guided logits vs tf_entropy_cfg", worst["entropy"], TOL["entropy"]))
    out.append(Check("f_hat_final (loop)", _diff(res.state.f_hat, t["f_hat_final"]), TOL["codes"]))
    out.append(Check("f_hat_from_idx (embed_to_fhat)", _diff(bb.vae.idx_to_fhat(idx_ref, pns), t["f_hat_from_idx"]),
                     TOL["codes"]))
    if "image_01" in t:
        out.append(Check("image_01 (loop, idx replayed)", _diff(res.images.add(1).mul(0.5), t["image_01"]), TOL["image"]))

    # 3. free sampling with g_seed
    res2 = generate(bb, [int(v) for v in labels], Method(), torch.Generator().manual_seed(int(s["g_seed"])))
    drawn = torch.cat([i.reshape(B, -1) for i in res2.state.idx], 1)
    ref = torch.cat([i.reshape(B, -1) for i in idx_ref], 1)
    frac = (drawn != ref).float().mean().item() if drawn.shape == ref.shape else float("inf")
    out.append(Check("sampled idx with g_seed (fraction differing)", frac, TOL["exact"]))
    if "image_01" in t:
        out.append(Check("image_01 (free sampling, g_seed)", _diff(res2.images.add(1).mul(0.5), t["image_01"]),
                         TOL["image"]))

    # 4. the tokenizer's encode path
    if "enc_image_pm1" in t:
        vae = bb.vae
        f = vae.quant_conv(vae.encoder(t["enc_image_pm1"]))
        out.append(Check("enc_f (quant_conv(encoder(image)))", _diff(f, t["enc_f"]), TOL["codes"]))
        enc_idx = vae.f_to_idx(t["enc_f"], ENC_PATCH_NUMS)
        wrong = sum(int((a != t[f"enc_idx_s{si:02d}"]).sum()) if a.shape == t[f"enc_idx_s{si:02d}"].shape else a.numel()
                    for si, a in enumerate(enc_idx))
        out.append(Check("enc_idx_s00..02 (patch_nums 1,2,4; indices differing)", float(wrong), TOL["exact"]))
        rec_img = vae.fhat_to_img(vae.idx_to_fhat([t[f"enc_idx_s{si:02d}"] for si in range(3)], ENC_PATCH_NUMS))
        out.append(Check("enc_recon_pm1 (decode of the encoded indices)", _diff(rec_img, t["enc_recon_pm1"]), TOL["image"]))
    return out
