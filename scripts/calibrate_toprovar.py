"""Calibrate ToProVAR's τ and β on a prompt list (spec ``shared/specs/toprovar_sparvar.md`` §3.4-3.5 item 1) and
write a method config that composes ``conf/method/toprovar.yaml`` with the values found.

    python scripts/calibrate_toprovar.py --model tiny --bench shapes --n 50            # -> conf/method/toprovar_tiny.yaml
    python scripts/calibrate_toprovar.py --model infinity_2b --prompts my_prompts.txt --out conf/method/toprovar_2b.yaml

1. β (GUESS rule): run ToProVAR without pruning and collect ϱ = σ1/σ2 of every layer's entropy map at s_rep; ϱ* is
   the valley between the Global and Detail modes, taken as the widest gap of the sorted log ϱ; β = ln 2/(ϱ* − 1),
   so that R(ϱ*) = 0.5.
2. τ (paper A.2: "SSIM > 0.8 vs full"): for each τ of the grid, generate with that τ and the β found; keep the τ
   with the fewest FLOPs whose mean SSIM to the unpruned image (same prompt and seed) exceeds ``--ssim``; if none
   does, the τ with the highest SSIM.
"""
import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


def valley(values: list[float]) -> float:
    """ϱ* between two modes: the midpoint (in log) of the widest gap of the sorted values; one mode: the median."""
    v = sorted(x for x in values if math.isfinite(x) and x > 1.0)
    if len(v) < 2:
        return v[0] if v else 2.0
    logs = [math.log(x) for x in v]
    gaps = [(logs[i + 1] - logs[i], i) for i in range(len(logs) - 1)]
    g, i = max(gaps)
    if g <= 0:
        return v[len(v) // 2]
    return math.exp((logs[i] + logs[i + 1]) / 2)


def beta_for(rho_star: float) -> float:
    return math.log(2) / max(rho_star - 1.0, 1e-6)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--bench", default="shapes", help="prompt source: a conf/bench/<name>.yaml (ignored with --prompts)")
    ap.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    ap.add_argument("--n", type=int, default=50, help="number of prompts (the paper: about 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--taus", default="0.3,0.35,0.4,0.45,0.5,0.55,0.6")
    ap.add_argument("--direction", default="auto", choices=["auto", "ge", "le"])
    ap.add_argument("--ssim", type=float, default=0.8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, help="default: conf/method/toprovar_<model>.yaml")
    ap.add_argument("--name", help="config name (default: the --out file's stem)")
    a = ap.parse_args(argv)

    import torch
    from omegaconf import OmegaConf

    from varbench.errors import UserError
    from varbench.flops import generation_flops
    from varbench.harness.registry import build_backbone, build_method
    from varbench.hooks import Method
    from varbench.loop import generate
    from varbench.results.fidelity import psnr_ssim

    mpath = REPO / "conf/model" / f"{a.model}.yaml"
    if not mpath.exists():
        raise UserError(f"unknown model {a.model!r}: {mpath} does not exist")
    if a.prompts:
        prompts = [p.strip() for p in a.prompts.read_text().splitlines() if p.strip()]
    else:
        from varbench.harness.runner import load_prompts

        bench = OmegaConf.to_container(OmegaConf.load(REPO / "conf/bench" / f"{a.bench}.yaml"), resolve=True)
        prompts = [p.prompt for p in load_prompts(bench)]
    prompts = prompts[:a.n]
    if not prompts:
        raise UserError("no prompts to calibrate on")
    out = a.out or REPO / "conf/method" / f"toprovar_{a.model}.yaml"
    name = a.name or out.stem
    bb = build_backbone(OmegaConf.to_container(OmegaConf.load(mpath), resolve=True), a.device, "fp32")

    def gen(method, i):
        return generate(bb, [prompts[i]], method, torch.Generator().manual_seed(a.seed + i))

    def unit(x):
        return ((x.float().clamp(-1, 1) + 1) / 2).cpu()

    # 1. reference images and the ϱ statistics without pruning
    refs, varrho, rhos = [], [], []
    for i in range(len(prompts)):
        refs.append(gen(Method(), i))
        s = gen(build_method({"name": "toprovar", "tau": 2.0, "d_direction": "ge"}), i).method_summary
        varrho += [v for v in (s.get("varrho") or [])]
        rhos.append(s["rho"])
    rho_star = valley(varrho)
    beta = beta_for(rho_star)
    print(f"[calibrate] {len(prompts)} prompts; varrho min/median/max "
          f"{min(varrho):.2f}/{sorted(varrho)[len(varrho) // 2]:.2f}/{max(varrho):.2f}; valley {rho_star:.2f} -> "
          f"beta {beta:.4g}")
    # 2. τ grid
    f_ref = sum(generation_flops(r.record.per_image()[0], bb.spec) for r in refs)
    rows = []
    for tau in [float(t) for t in a.taus.split(",")]:
        ss, fl = [], 0.0
        for i in range(len(prompts)):
            o = gen(build_method({"name": "toprovar", "tau": tau, "beta": beta, "d_direction": a.direction}), i)
            ss.append(psnr_ssim(unit(o.images), unit(refs[i].images))[1])
            fl += generation_flops(o.record.per_image()[0], bb.spec)
        rows.append((tau, sum(ss) / len(ss), f_ref / fl))
        print(f"[calibrate] tau {tau:.3f}: mean SSIM {rows[-1][1]:.4f}, FLOP-ideal speedup {rows[-1][2]:.3f}x")
    ok = [r for r in rows if r[1] > a.ssim]
    tau, ssim, speed = max(ok, key=lambda r: (r[2], r[1])) if ok else max(rows, key=lambda r: r[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"# ToProVAR calibrated by scripts/calibrate_toprovar.py on model={a.model}, {len(prompts)} prompts "
        f"({'file ' + str(a.prompts) if a.prompts else 'bench=' + a.bench}), seed {a.seed}.\n"
        f"# beta = ln2/(varrho* - 1) with varrho* = {rho_star:.4g} (widest gap of log varrho over "
        f"{len(varrho)} layer maps at s_rep);\n"
        f"# tau = the fewest-FLOPs value of {a.taus} with mean SSIM > {a.ssim} vs the unpruned image "
        f"(found: SSIM {ssim:.4f}, FLOP-ideal {speed:.3f}x{'' if ok else '; NO tau reached the SSIM bound'}).\n"
        f"defaults: [toprovar, _self_]\nname: {name}\ntau: {tau}\nbeta: {beta:.6g}\nd_direction: {a.direction}\n")
    print(f"[calibrate] wrote {out}: tau {tau}, beta {beta:.6g}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # one-line user errors, like the CLI
        from varbench.errors import UserError

        if isinstance(e, UserError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
