"""HART golden-fixture check: rebuild HART from a fixture's meta file alone and compare with the official run.

Files: ``<tag>_meta.json`` beside ``<tag>_transformer_weights.safetensors``, ``<tag>_tokenizer_vae_weights.safetensors``
and ``<tag>_tensors.safetensors`` (the shared fixture: tag ``tiny_hart``); the tag is the meta's ``tag`` field when it
has one, else its file name less ``meta.json``, as the Infinity checker (``fixtures.py`` ``_files``) names its files.

Fixture format: ``shared/fixtures/hart/README.md`` (official mit-han-lab/hart @e28a41fe classes on CPU, fp32).
The official run called ``torch.manual_seed(123)`` just before ``autoregressive_infer_cfg``; nothing in it draws
from torch's global RNG before the diffusion head, so the diffusion noise is regenerated exactly from that seed
(checked: ``diff_init_noise_half``). Compared:

1. replay (recorded indices forced, global-RNG diffusion noise): raw cond/uncond head logits of every fed token at
   every scale (scale 0: all context positions), the diffusion condition ``z``, the CFG scale of the diffusion,
   every diffusion step (input, timestep, output), the scaled residual, ``f_hat`` and the image. The diffusion runs
   free here (each step's input is our previous step's output), and with random weights a step can amplify 1e-6
   rounding sixty-fold (1.3e-3 at step 6, whose values reach 174) before the next contracts it again: each such step
   is judged relative to its scale, |Δ| <= 1e-4 x max(1, max|ref|) (``free_running_check``);
2. teacher forcing of each diffusion step: our ``p_sample`` on the recorded step input, timestep and ``z`` with
   the regenerated noise gives the recorded step output, strictly (absolute 1e-4: no amplification to excuse);
3. free sampling with the fixture's ``g_seed``: our sampler draws the recorded indices, and the same image;
4. the effective top-k per stage (hard-coded 600/300).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from varbench.backbones.hart.backbone import HARTBackbone, HARTSampling
from varbench.backbones.hart.load import arch_from_official, new_modules
from varbench.errors import UserError
from varbench.harness.checks import TOL, Check, _diff
from varbench.hooks import Method
from varbench.loop import generate


class FixedContext:
    """A 'text encoder' returning the fixture's context, mask and position ids."""

    def __init__(self, ctx, mask, pos):
        self.out = (ctx, mask, pos)

    def __call__(self, prompts):
        return self.out


def fixture_files(meta_path: str | Path, meta: dict | None = None) -> dict[str, Path]:
    """The fixture's files beside its meta file, named by its tag (see the module docstring)."""
    meta_path = Path(meta_path)
    meta = json.loads(meta_path.read_text()) if meta is None else meta
    name = meta_path.name
    tag = meta.get("tag") or (name[: -len("meta.json")].rstrip("_") if name.endswith("meta.json") else meta_path.stem)
    pre, d = (f"{tag}_" if tag else ""), meta_path.parent
    return {"transformer": d / f"{pre}transformer_weights.safetensors",
            "vae": d / f"{pre}tokenizer_vae_weights.safetensors", "tensors": d / f"{pre}tensors.safetensors"}


REQUIRED_META = ("transformer_config", "tokenizer_config", "sampling")


def _tensors(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing (a fixture's files lie beside its meta file, named <tag>_*)")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors reports a torn or corrupt file with its own error types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable safetensors file ({msg})") from None


def _load_strict(module: torch.nn.Module, path: Path) -> None:
    """The fixture's weights into ``module`` strictly; a file that does not fit the meta's architecture is one line."""
    try:
        module.load_state_dict(_weights(path), strict=True)
    except RuntimeError as e:
        detail = " ".join(ln.strip() for ln in str(e).splitlines()[1:2])[:240]
        raise UserError(f"{path}: does not fit the architecture in the meta file (damaged or from another fixture: "
                        f"{detail})") from None


def _weights(path: Path) -> dict:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in _tensors(path).items()}


def free_running_check(name: str, got: torch.Tensor, ref: torch.Tensor) -> Check:
    """A free-running diffusion tensor: |Δ| <= TOL["codes"] x max(1, max|ref|) (never stricter than the absolute
    1e-4; relative where the step's values are large)."""
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    return Check(f"{name} (free-running, tol x max|ref|)", _diff(got, ref), TOL["codes"] * scale)


def build_from_meta(meta_path: str | Path):
    """(backbone, tensors, meta) with the fixture's weights loaded strictly."""
    meta_path = Path(meta_path)
    meta = json.loads(meta_path.read_text())
    missing = [k for k in REQUIRED_META if not isinstance(meta.get(k), dict)]
    if missing:
        raise UserError(f"{meta_path}: a HART fixture meta file needs {', '.join(REQUIRED_META)}; "
                        f"{', '.join(missing)} missing or not an object (damaged?)")
    files = fixture_files(meta_path, meta)
    arch, vcfg = arch_from_official(meta["transformer_config"], meta["tokenizer_config"])
    tf, vae = new_modules(arch, vcfg)
    _load_strict(tf, files["transformer"])
    _load_strict(vae, files["vae"])
    t = _tensors(files["tensors"])
    s = meta["sampling"]
    smp = HARTSampling(cfg=s["cfg"], top_p=s["top_p"], more_smooth=bool(s["more_smooth"]),
                       final_stage=int(s["final_stage"]), diffusion_noise="global")
    text = FixedContext(t["context"], t["context_mask"], t["context_position_ids"])
    bb = HARTBackbone(tf.eval(), vae.eval(), text, smp, None, "cpu", "fp32", "tiny_hart_fixture")
    return bb, t, meta


def _run(bb: HARTBackbone, B: int, torch_seed: int, rng=None):
    """generate() with the global torch RNG seeded as the official call was (restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed)
        return generate(bb, [""] * B, Method(), rng)


def check_hart_fixture(meta_path: str | Path) -> list[Check]:
    """The checks listed in the module docstring. A meta or tensors file that lacks an entry the checks read (a
    damaged or foreign fixture) is one line naming the entry, not a KeyError."""
    try:
        return _check_hart_fixture(meta_path)
    except KeyError as e:
        raise UserError(f"{meta_path}: the fixture has no {e.args[0]!r} (a damaged meta or tensors file, or a fixture "
                        f"made by another version of the script)") from None


@torch.no_grad()
def _check_hart_fixture(meta_path: str | Path) -> list[Check]:
    bb, t, meta = build_from_meta(meta_path)
    s = meta["sampling"]
    B, n_sc, seed = int(s["B"]), len(bb.scales()), int(s["torch_manual_seed_before_call"])
    idx_ref = [t[f"idx_s{si:02d}"] for si in range(n_sc)]
    out: list[Check] = []

    # 4. effective top-k per stage
    wrong = sum(int(bb.top_k(si) != k) for si, k in enumerate(s["top_k_used_per_stage"]))
    out.append(Check("top_k per stage (stages differing)", float(wrong), TOL["exact"]))

    # 1. replay
    bb.forced_idx, bb.record_logits, bb.diffusion_trace = idx_ref, {}, []
    res = _run(bb, B, seed)
    logits, trace = bb.record_logits, bb.diffusion_trace
    bb.forced_idx = bb.record_logits = bb.diffusion_trace = None
    for si in range(n_sc):
        ref, got = t[f"logits_raw_s{si:02d}"], logits.get(si)
        for half, name in ((slice(0, B), "cond"), (slice(B, 2 * B), "uncond")):
            d = float("inf") if got is None else _diff(got[half], ref[half])
            out.append(Check(f"logits_raw_s{si:02d} {name}", d, TOL["logits_cfg"]))
    head = [e for e in trace if "z" in e]
    steps = [e for e in trace if "x_in" in e]
    tail = [e for e in trace if "out_scaled" in e]
    out.append(Check("diff_z", _diff(head[0]["z"], t["diff_z"]) if head else float("inf"), TOL["logits_cfg"]))
    out.append(Check("diffusion cfg scale", abs(head[0]["cfg"] - s["diffusion_cfg_used"]) if head else float("inf"), 1e-9))
    out.append(Check("diff_init_noise_half (global RNG regenerated)",
                     _diff(steps[0]["x_in"][: B * t["diff_init_noise_half"].shape[0] // B], t["diff_init_noise_half"])
                     if steps else float("inf"), TOL["exact"]))
    for j in range(8):
        if j >= len(steps):
            out.append(Check(f"diff_step{j} (missing)", float("inf"), 0.0))
            continue
        e = steps[j]
        out.append(Check(f"diff_step{j}_t", float((e["t"] != t[f"diff_step{j}_t"]).sum()), TOL["exact"]))
        out.append(free_running_check(f"diff_step{j}_x_in", e["x_in"], t[f"diff_step{j}_x_in"]))
        out.append(free_running_check(f"diff_step{j}_x_out", e["x_out"], t[f"diff_step{j}_x_out"]))
    out.append(Check("diff_out_scaled", _diff(tail[0]["out_scaled"], t["diff_out_scaled"]) if tail else float("inf"),
                     TOL["codes"]))
    out.append(Check("f_hat_final", _diff(res.state.f_hat, t["f_hat_final"]), TOL["codes"]))
    out.append(Check("image_01", _diff(res.images.add(1).mul(0.5), t["image_01"]), TOL["image"]))

    # 2. teacher forcing of every diffusion step with the regenerated global-RNG noise
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.randn(*t["diff_init_noise_half"].shape)
        noises = [torch.randn(*t[f"diff_step{j}_x_in"].shape) for j in range(8)]
    dh, cfg = bb.model.diffloss, float(s["diffusion_cfg_used"])
    worst = 0.0
    for j in range(8):
        x_out = dh.p_sample(t[f"diff_step{j}_x_in"], t[f"diff_step{j}_t"], t["diff_z"], cfg, noises[j])
        worst = max(worst, _diff(x_out, t[f"diff_step{j}_x_out"]))
    out.append(Check("diffusion steps teacher-forced (x_in, t, z, noise -> x_out), max over 8", worst, TOL["codes"]))

    # 3. free sampling with g_seed
    rng = torch.Generator().manual_seed(int(s["g_seed"]))
    res2 = _run(bb, B, seed, rng)
    drawn = torch.cat([i.reshape(B, -1) for i in res2.state.idx], 1)
    ref = torch.cat([i.reshape(B, -1) for i in idx_ref], 1)
    frac = (drawn != ref).float().mean().item() if drawn.shape == ref.shape else float("inf")
    out.append(Check("sampled idx with g_seed (fraction differing)", frac, TOL["exact"]))
    out.append(Check("image_01 (free sampling, g_seed + torch seed)", _diff(res2.images.add(1).mul(0.5), t["image_01"]),
                     TOL["image"]))
    return out
