"""Golden-fixture checks: rebuild a backbone from a fixture's meta file alone and compare with the official run.

Used by ``scripts/check_fixture.py`` and by the golden tests (one code path). Fixture format: see
``shared/fixtures/infinity/README.md``: ``<tag>_meta.json`` beside ``<tag>_infinity_weights.safetensors``,
``<tag>_vae_weights.safetensors`` and ``<tag>_tensors.safetensors`` (weights stored as float8_e4m3fn).

Compared (when the fixture holds them): teacher-forced cond / uncond / CFG logits, both entropies, the
KV-cached loop's CFG logits with the recorded bits replayed, the summed codes, the decoded image (float and
uint8 BGR), the bits our sampler draws with the fixture's seed, and the VAE encoder path.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from baselines.fastvar import FastVAR, FastVARConfig
from baselines.skipvar import SkipVAR, features
from varbench.backbones.infinity.backbone import InfinityBackbone, Sampling
from varbench.backbones.infinity.model import InfinityTransformer
from varbench.backbones.infinity.schedules import rope_cos_sin, rope_positions, schedule_from_official
from varbench.backbones.infinity.vae import BSQVAE, load_vae_state_dict
from varbench.entropy import bitwise_entropy
from varbench.hooks import Method
from varbench.io import to_uint8
from varbench.loop import generate

# README "Recommended tolerances for a re-implementation in fp32"
TOL = {"logits_cfg": 1e-4, "logits_cond": 5e-5, "logits_uncond": 5e-5, "entropy": 1e-4, "image": 1e-4, "codes": 1e-4,
       "exact": 0.0,
       "uint8": 1.0,  # ±1 at truncation boundaries: fp noise of ~1e-6 in the decoder (seen across torch versions)
       "rank_shift": 1.0}


@dataclass
class Check:
    name: str
    max_abs_diff: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tol


def _load_weights(path: Path) -> dict:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


class FixedText:
    """A 'text encoder' that returns the fixture's T5 features (kv_compact, lens)."""

    def __init__(self, kv_compact: torch.Tensor, lens: list[int]):
        self.kv, self.lens = kv_compact, lens

    def __call__(self, prompts):
        return self.kv, list(self.lens)


def _files(meta_path: Path) -> tuple[str, dict]:
    tag = json.loads(meta_path.read_text()).get("tag", "")
    pre = f"{tag}_" if tag else ""
    d = meta_path.parent
    return tag, {"tf": d / f"{pre}infinity_weights.safetensors", "vae": d / f"{pre}vae_weights.safetensors",
                 "tensors": d / f"{pre}tensors.safetensors"}


def build_from_meta(meta_path: Path):
    """(backbone, tensors, meta): an Infinity backbone built from the meta file, with the fixture's weights."""

    meta = json.loads(Path(meta_path).read_text())
    _, files = _files(Path(meta_path))
    I, V = meta["infinity"], meta["vae"]
    patchify = bool(V.get("apply_spatial_patchify", 0))
    d_bits = I.get("d_vae(bits per token)") or I.get("d(bits per token)") or V["codebook_dim"] * (4 if patchify else 1)
    tf = InfinityTransformer(I["depth"], I["embed_dim"], I["num_heads"], d_bits, I["text_channels"], I["text_maxlen"],
                             I.get("mlp_ratio", 4), I["block_chunks"])
    tf.load_state_dict(_load_weights(files["tf"]), strict=True)
    vae = BSQVAE(V["codebook_dim"], V["base_ch"], tuple(V["ch_mult"]), V.get("num_res_blocks", 2),
                 V.get("patch_size(stride)", V.get("patch_size")))
    load_vae_state_dict(vae, _load_weights(files["vae"]))
    t = load_file(str(files["tensors"]))
    cu = t["cu_seqlens_k"].long()
    lens = (cu[1:] - cu[:-1]).tolist()
    s = meta["sampling"]
    cil = s.get("cfg_insertion_layer", [0])
    smp = Sampling(cfg=s["cfg"], tau=s["tau"], top_k=s["top_k"], top_p=s["top_p"],
                   cfg_insertion_layer=int(cil[0] if isinstance(cil, list) else cil))
    sched = schedule_from_official(meta["scale_schedule"])
    bb = InfinityBackbone(tf.eval(), vae.eval(), FixedText(t["kv_compact"], lens), sched, smp, patchify, "cpu", "fp32")
    return bb, t, meta


class Recorder(Method):
    """Wraps a method (or none): forwards every hook to it and records the logits handed to ``after_logits`` and
    the kept index sets, for comparison with a fixture. ``inner`` keeps the wrapped method's own state."""

    def __init__(self, inner: Method | None = None):
        self.inner = inner if inner is not None else Method()
        self.granularity = self.inner.granularity
        super().__init__(self.inner.cfg)

    def start(self):
        self.inner.start()
        self.logits, self.kept_sets = {}, {}

    def plan_scale(self, sctx):
        return self.inner.plan_scale(sctx)

    def attention(self, lctx):
        return self.inner.attention(lctx)

    def select(self, lctx, x):
        sel = self.inner.select(lctx, x)
        if sel is not None and sel.k < sel.n_total:
            self.kept_sets[(lctx.si, lctx.li, lctx.branch)] = sel.keep_idx.clone()
        return sel

    def restore(self, lctx, x_in, y_kept, sel):
        return self.inner.restore(lctx, x_in, y_kept, sel)

    def after_layer(self, lctx, x_in, x_out):
        self.inner.after_layer(lctx, x_in, x_out)

    def after_logits(self, sctx, lc, lu, lg):
        self.logits[sctx.si] = {"cfg": lg.clone(), "cond": lc.clone(), "uncond": None if lu is None else lu.clone()}
        return self.inner.after_logits(sctx, lc, lu, lg)

    def after_scale(self, sctx, state):
        self.inner.after_scale(sctx, state)

    def summary(self):
        return self.inner.summary()


def method_from_meta(meta: dict):
    """The method a fixture was made with: FastVAR (its schedule read from the meta file) or none."""
    if "fastvar" not in json.dumps(meta.get("source", "")).lower():
        return None

    pr = meta["pruned"]
    ratios = {int(m.group(2)): v["ratio"] for k, v in pr.items() if (m := re.match(r"s\d+\((\d+)x(\d+)\)", k))}
    cache_w = int(re.match(r"s\d+\((\d+)x(\d+)\)", pr["cache_scale"]).group(2))
    skip_w = sorted({meta["scale_schedule"][si][2] for si in meta.get("scales_skipped", [])})
    return FastVAR(FastVARConfig(prune_ratios=ratios, skip_widths=skip_w, blocks=list(pr["blocks"]), cache_width=cache_w))


@torch.no_grad()
def check_infinity_fixture(meta_path: str | Path) -> list[Check]:
    meta_path = Path(meta_path)
    bb, t, meta = build_from_meta(meta_path)
    m, sched = bb.model, bb.schedule
    n_sc = len(sched.hws)
    lens = bb.text(None)[1]
    B = len(lens)
    cfg, tau = meta["sampling"]["cfg"], meta["sampling"]["tau"]
    out: list[Check] = []
    bits = [t[f"bits_s{si:02d}"] for si in range(n_sc) if f"bits_s{si:02d}" in t]
    method = method_from_meta(meta)

    # 1. teacher-forced full-sequence forward (block-causal mask)
    if "tf_x_BLC_wo_prefix" in t:
        cs = rope_cos_sin(rope_positions(sched), m.head_dim)
        x = t["tf_x_BLC_wo_prefix"]
        lc = m.forward_teacher_forced(t["kv_compact"], lens, x, sched.scales, cs)
        lu = m.forward_teacher_forced(m.uncond_text(lens), lens, x, sched.scales, cs)
        lg = cfg * lc.mul(1 / tau) + (1 - cfg) * lu.mul(1 / tau)
        out += [Check("tf_logits_cond", _diff(lc, t["tf_logits_cond"]), TOL["logits_cond"]),
                Check("tf_logits_uncond", _diff(lu, t["tf_logits_uncond"]), TOL["logits_uncond"]),
                Check("tf_logits_cfg", _diff(lg, t["tf_logits_cfg"]), TOL["logits_cfg"]),
                Check("tf_entropy_cfg", _diff(bitwise_entropy(lg), t["tf_entropy_cfg"]), TOL["entropy"]),
                Check("tf_entropy_cond", _diff(bitwise_entropy(lc / tau), t["tf_entropy_cond"]), TOL["entropy"])]

    # 2. the KV-cached loop (with the fixture's method) and the recorded bits replayed (official gt_leak-style)
    rec = Recorder(method)
    bb.forced_bits = bits
    res = generate(bb, [""] * B, rec)
    bb.forced_bits = None
    if "infer_logits_cfg" in t:
        infer = torch.cat([rec.logits[si]["cfg"] for si in sorted(rec.logits)], 1)
        out.append(Check("infer_logits_cfg (KV cache, replayed bits)", _diff(infer, t["infer_logits_cfg"]), TOL["logits_cfg"]))
    for si in range(n_sc):  # per-scale logits (FastVAR-style fixtures)
        for kind in ("cfg", "cond", "uncond"):
            key = f"logits_{kind}_s{si:02d}"
            if key in t:
                got = rec.logits.get(si, {}).get(kind)
                out.append(Check(key, float("inf") if got is None else _diff(got, t[key]), TOL["logits_cfg"]))
    if meta.get("scales_skipped") is not None:
        out.append(Check("skipped scales (count differing)",
                         float(len(set(meta["scales_skipped"]) ^ set(res.record.skipped_scales))), TOL["exact"]))
    for key in sorted(k for k in t if k.startswith("kept_idx_s")):  # [block, branch, row, K], official order
        si = int(key[len("kept_idx_s"):])
        ref = t[key].long()
        b0 = meta["pruned"]["blocks"][0]
        n_set = n_order = 0
        max_shift = 0
        for bi in range(ref.shape[0]):
            for br, name in enumerate(("sa", "ca", "ffn")):
                got = rec.kept_sets.get((si, b0 + bi, name))
                if got is None:
                    n_set += ref.shape[2]
                    continue
                got = got.expand(ref.shape[2], -1)
                for row in range(ref.shape[2]):
                    g, r = got[row].tolist(), ref[bi, br, row].tolist()
                    if set(g) != set(r):
                        n_set += 1
                        continue
                    if g != r:
                        n_order += 1
                        rank = {tok: i for i, tok in enumerate(r)}
                        max_shift = max(max_shift, max(abs(i - rank[tok]) for i, tok in enumerate(g)))
        rows = ref.shape[0] * 3 * ref.shape[2]
        n_units = len([k for k in rec.kept_sets if k[0] == si])
        out.append(Check(f"{key} sets (rows differing)", float(n_set + abs(n_units - ref.shape[0] * 3)), TOL["exact"]))
        # README: order exact except near-tied scores; fp32 noise (~1e-6) only swaps neighbours
        out.append(Check(f"{key} order (max rank shift; {n_order}/{rows} rows not identical)", float(max_shift),
                         TOL["rank_shift"]))
    for key in sorted(k for k in t if k.startswith("dbg_cache_b")):  # FastVAR's per-branch caches (cache scale)
        li, branch = int(key[len("dbg_cache_b"):][:2]), key.rsplit("_", 1)[-1]
        got = rec.inner.cache.get((li, branch)) if hasattr(rec.inner, "cache") else None
        out.append(Check(key, float("inf") if got is None else _diff(got[0], t[key]), TOL["codes"]))
    if "summed_codes" in t:
        out.append(Check("summed_codes", _diff(res.state.summed, t["summed_codes"]), TOL["codes"]))
    if "image_pm1" in t:
        out.append(Check("image_pm1", _diff(res.images, t["image_pm1"]), TOL["image"]))
    if "image_pm1_crop256" in t:
        c = t["image_pm1_crop256"]
        out.append(Check("image_pm1_crop256", _diff(res.images[..., : c.shape[-2], : c.shape[-1]], c), TOL["image"]))
    if "image_uint8_bgr_hwc" in t:
        ours = to_uint8(res.images).flip(-1)
        out.append(Check("image_uint8_bgr", _diff(ours, t["image_uint8_bgr_hwc"]), TOL["uint8"]))

    # 3. our sampler with the fixture's seed draws the recorded bits (same method)
    g_seed = meta["sampling"].get("g_seed")
    if g_seed is not None and bits:
        rng = torch.Generator().manual_seed(int(g_seed))
        res2 = generate(bb, [""] * B, Recorder(method_from_meta(meta)), rng)
        drawn = torch.cat([b.reshape(B, -1) for b in res2.state.bits], 1)
        ref_bits = torch.cat([b.reshape(B, -1) for b in bits], 1)
        diff = (drawn != ref_bits).float().mean().item() if drawn.shape == ref_bits.shape else float("inf")
        out.append(Check("sampled_bits (g_seed, fraction differing)", diff, TOL["exact"]))

    # 4. VAE encoder path (multi-scale BSQ on the VAE schedule)
    if "enc_image_pm1" in t:
        vae = bb.vae
        raw = vae.encode_raw(t["enc_image_pm1"])
        out.append(Check("enc_raw_features", _diff(raw, t["enc_raw_features"]), TOL["image"]))
        enc_bits, q = vae.encode_bits(t["enc_image_pm1"], [tuple(s) for s in meta["vae_scale_schedule"]])
        nb = sum(int((b.to(torch.uint8) != t[f"enc_bits_s{i:02d}"]).sum()) for i, b in enumerate(enc_bits))
        out.append(Check("enc_bits (count differing)", float(nb), TOL["exact"]))
        out.append(Check("enc_quantized_out", _diff(q.reshape(t["enc_quantized_out"].shape), t["enc_quantized_out"]), TOL["codes"]))
        out.append(Check("enc_recon_pm1", _diff(vae.decode(t["enc_quantized_out"]), t["enc_recon_pm1"]), TOL["image"]))
    return out


def format_checks(checks: list[Check]) -> str:
    w = max(len(c.name) for c in checks)
    lines = [f"{c.name:<{w}}  max|Δ|={c.max_abs_diff:.3g}  tol={c.tol:g}  {'PASS' if c.ok else 'FAIL'}" for c in checks]
    verdict = "PASS" if all(c.ok for c in checks) else "FAIL"
    return "\n".join(lines + [f"{verdict}: {sum(c.ok for c in checks)}/{len(checks)} checks within tolerance"])


@torch.no_grad()
def check_skipvar_fixture(meta_path: str | Path) -> list[Check]:
    """SkipVAR fixture: decision features/decisions on six code pairs, and three full generation traces."""
    meta_path = Path(meta_path)
    meta = json.loads(meta_path.read_text())
    bb, _, _ = build_from_meta(meta_path.parent.parent / "fastvar" / "meta.json")  # same weights (README)
    t = load_file(str(meta_path.parent / "tensors.safetensors"))
    out: list[Check] = []
    tol_feat = 1e-5
    m = SkipVAR()
    for p in meta["pairs"]:
        k = f"pair{p['pair']}_"
        small_old = F.interpolate(t[k + "summed_codes_s08"], size=(1, *bb.vae_hws[4]), mode="trilinear")
        small_new = F.interpolate(t[k + "summed_codes_s09"], size=(1, *bb.vae_hws[4]), mode="trilinear")
        out.append(Check(k + "small_codes", max(_diff(small_old, t[k + "small_codes_old"]),
                                                _diff(small_new, t[k + "small_codes_new"])), TOL["codes"]))
        old, new = bb.preview_codes(t[k + "summed_codes_s08"], 4), bb.preview_codes(t[k + "summed_codes_s09"], 4)
        out.append(Check(k + "decoded", max(_diff(old, t[k + "decoded_old"]), _diff(new, t[k + "decoded_new"])), TOL["image"]))
        x = list(features(old, new))
        out.append(Check(k + "features", max(abs(x[0] - p["diff_hf"]), abs(x[1] - p["hf_ratio"])), tol_feat))
        sk = m.skip_model.scores(x)
        out.append(Check(k + "skip_scores", max(abs(a - b) for a, b in zip(sk, p["skip_scores"])), 1e-3))
        un = m.uncond_model.predict(x)
        wrong = int(m.skip_model.predict(x) != p["skip_pred"]) + int(un != p["uncond_pred_raw"])
        out.append(Check(k + "decisions (wrong)", float(wrong), TOL["exact"]))
    for li, lp in enumerate(meta["loops"]):
        k = f"loop{li}_"
        cu = t[k + "cu_seqlens_k"].long()
        bb.text = FixedText(t[k + "kv_compact"], (cu[1:] - cu[:-1]).tolist())
        bb.sampling.tau = lp["tau"]
        bits = [t[f"{k}bits_s{si:02d}"] for si in range(13) if f"{k}bits_s{si:02d}" in t]
        rec = Recorder(SkipVAR())
        bb.forced_bits = bits
        res = generate(bb, [""], rec)
        bb.forced_bits = None
        d = rec.inner.decision
        out.append(Check(k + "features", max(abs(d["diff_hf"] - lp["features"][0]), abs(d["hf_ratio"] - lp["features"][1])), tol_feat))
        ran = [si for si in range(13) if si not in res.record.skipped_scales]
        wrong = int(ran != lp["scales_run"]) + int(res.record.cond_only_from != lp["cond_only_from"])
        wrong += int(d["skip_pred"] != lp["skip_pred"]) + int(d.get("uncond_pred") != lp["uncond_pred"])
        out.append(Check(k + "scales run / cond-only / decisions (wrong)", float(wrong), TOL["exact"]))
        worst = 0.0
        for si in lp["scales_run"]:
            for kind in ("cfg", "cond", "uncond"):
                key = f"{k}logits_{kind}_s{si:02d}"
                got = rec.logits.get(si, {}).get(kind)
                if key in t:
                    worst = max(worst, float("inf") if got is None else _diff(got, t[key]))
                elif got is not None and kind == "uncond":
                    worst = float("inf")  # an uncond branch ran where the official one did not
        out.append(Check(k + "logits (all scales, cfg/cond/uncond)", worst, TOL["logits_cfg"]))
        out.append(Check(k + "summed_codes", _diff(res.state.summed, t[k + "summed_codes"]), TOL["codes"]))
        out.append(Check(k + "image_crop128", _diff(res.images[..., :128, :128], t[k + "image_pm1_crop128"]), TOL["image"]))
        out.append(Check(k + "image_uint8_bgr_crop128", _diff(to_uint8(res.images[..., :128, :128]).flip(-1),
                                                             t[k + "image_uint8_bgr_hwc_crop128"]), TOL["uint8"]))
        rng = torch.Generator().manual_seed(int(lp["g_seed"]))
        res2 = generate(bb, [""], SkipVAR(), rng)
        same = len(res2.state.bits) == len(bits) and all(torch.equal(a, b) for a, b in zip(res2.state.bits, bits))
        out.append(Check(k + "sampled bits with g_seed (0 = identical)", 0.0 if same else 1.0, TOL["exact"]))
    return out


def check_fixture(meta_path: str | Path) -> list[Check]:
    """Dispatch on the fixture kind (Infinity / FastVAR: the same checker; SkipVAR: decisions and traces; HART, whose
    meta has a ``transformer_config`` of model_type hart_transformer_t2i: ``varbench/harness/fixtures_hart.py``)."""
    meta = json.loads(Path(meta_path).read_text())
    if (meta.get("transformer_config") or {}).get("model_type") == "hart_transformer_t2i":
        # by module path, like the registry tables: fixtures_hart builds on this module's Check / TOL / _diff
        return __import__("varbench.harness.fixtures_hart", fromlist=["_"]).check_hart_fixture(meta_path)
    src = json.dumps(meta.get("source", "")).lower()
    return check_skipvar_fixture(meta_path) if "skipvar" in src else check_infinity_fixture(meta_path)
