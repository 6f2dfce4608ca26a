"""Latency of each method against method=none, measured in ONE process, beside the FLOP-ideal ratio.

    python scripts/bench_speed.py                                   # tiny model, CPU (labelled)
    python scripts/bench_speed.py --model infinity_2b --methods none,nova,fastvar,skipvar,sparsevar
    python scripts/bench_speed.py --model infinity_2b --random-weights --set nova.t_star=6   # no weights: speed only

Methods are timed round-robin (none, A, B, ..., none, A, B, ...) after a warmup, on the same prompts and seeds, so
drift affects all alike; the table reports medians. ``--random-weights`` builds the architecture with seeded weights
(for speed only: images and any entropy-driven decision are meaningless then; pin them with --set, e.g. NOVA's t_star).
"""
import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = ["a red circle", "a blue square and a yellow triangle", "three triangles", "a square left of a circle"]


def compose(group: str, name: str, sets: list[str]) -> dict:
    from hydra import compose as hcompose, initialize_config_dir
    from omegaconf import OmegaConf

    over = [f"{group}={name}"] + [f"{group}.{s.split('.', 1)[1]}" for s in sets if s.split(".", 1)[0] in (name, group)]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_container(getattr(hcompose("config", overrides=over), group), resolve=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--methods", default="none,nova,fastvar,skipvar,sparsevar")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="<method or model>.<key>=<value>, e.g. nova.t_star=6")
    a = ap.parse_args(argv)

    import torch

    from varbench.flops import flops_for_backbone
    from varbench.harness.runner import resolve_device
    from varbench.loop import generate
    from varbench.harness.registry import build_backbone, build_method

    device, dtype = resolve_device(a.device, a.dtype)
    mcfg = compose("model", a.model, a.set)
    if a.random_weights:
        mcfg["files"] = None
    bb = build_backbone(mcfg, device, dtype)
    names = a.methods.split(",")
    if names[0] != "none":
        names = ["none"] + [n for n in names if n != "none"]
    methods = {n: build_method(compose("method", n, a.set)) for n in names}
    prompts = (PROMPTS * (a.prompts // len(PROMPTS) + 1))[: a.prompts]

    def one(m, p, seed):
        return generate(bb, [p], m, torch.Generator(device=bb.device).manual_seed(seed))

    for m in methods.values():
        for w in range(a.warmup):
            one(m, prompts[0], 0)
    times = {n: [] for n in names}
    flops = {n: [] for n in names}
    for r in range(a.repeats):
        for i, p in enumerate(prompts):
            for n, m in methods.items():
                out = one(m, p, i)
                times[n].append(out.record.total_time_s)
                if r == 0:
                    rec = {"scale_hw": out.record.scale_hw, "tokens": out.record.tokens, "kv_len": out.record.kv_len,
                           "rows": out.record.rows, "text_len": out.record.text_len, "batch": 1}
                    flops[n].append(flops_for_backbone(rec, bb))
    label = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    weights = "random weights (speed only)" if (a.random_weights or not mcfg.get("files")) else "official weights"
    print(f"# {a.model} on {label}, {dtype}, {weights}; {len(prompts)} prompts x {a.repeats} repeats, medians")
    print("| method | latency (s) | speedup vs none | FLOP-ideal speedup |")
    print("|---|---|---|---|")
    base_t, base_f = statistics.median(times["none"]), sum(flops["none"])
    for n in names:
        t = statistics.median(times[n])
        print(f"| {n} | {t:.3f} | {base_t / t:.2f}x | {base_f / sum(flops[n]):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
