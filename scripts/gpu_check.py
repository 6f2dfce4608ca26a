"""The GPU check of issue 26 in ONE command with a time budget: pytest -m gpu, then bench_speed on the full-size
seeded-random models, then one markdown + JSON report.

    python scripts/gpu_check.py --official .official/Infinity            # on one GPU: about 8 minutes (--budget 480)
    python scripts/gpu_check.py --smoke                                   # on a CPU: tiny models, about a minute or two

Steps (each a child process, so the GPU memory of one never stays for the next; output streamed and logged):

  pytest       python -m pytest -m gpu tests/test_gpu.py (every method config on tiny_random / hart_tiny_random on
               CUDA in bf16 and fp32, compile=true, SparVAR fast vs reference kernels, NOVA's folded lens in bf16)
  infinity_2b  bench_speed.py --model infinity_2b_random --dtype bf16 (1024x1024): none, nova, fastvar, skipvar,
               sparsevar, sparvar, toprovar, eager and with compile=true (--compile), against the official
               FoundationVision/Infinity code (--official PATH), NOVA's t* pinned (nova.t_star=6: images are noise)
  hart         bench_speed.py --model hart_0.7b_random --dtype bf16: none, nova, fastvar_hart, sparvar_hart
  infinity_8b  bench_speed.py --model infinity_8b_random --dtype bf16: none, nova, fastvar_8b

``--smoke`` runs the same steps on the CPU at tiny sizes (tiny_random for both Infinity steps, hart_tiny_random; fp32;
1 prompt, 1 round, no warmup, no --compile: inductor takes minutes on 2 cores), so CI can check the script itself.

Time budget (``--budget`` seconds, default 480 = 8 minutes on one H100): a step runs only if the budget left covers
its estimate (else it is skipped with a line), and it is stopped (and reported as timed out) when it would eat the
estimates of the steps after it. The estimates are guesses: no GPU number existed when they were written (published
latencies: Infinity-2B about 0.8 s per 1024x1024 image on one H100, HART-0.7B about 0.3 s, Infinity-8B a few
seconds; torch.compile tens of seconds). The elapsed time of every step is printed and written to the report.

Report: ``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` (device name, torch / CUDA versions, every min / median /
max latency, speedup vs none, FLOP-ideal speedup, realized / ideal, ours / official, peak memory, the pytest summary
with the peak memory each GPU test recorded, the issue's targets met or not), and ``<out>/gpu_check.log`` (every
step's output). ``--out`` defaults to results/speed (a temporary folder with --smoke). Exit code 0 when no step
failed or timed out, 1 otherwise, 2 on bad input.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from varbench.errors import UserError  # noqa: E402  (light: no torch)

INFINITY_METHODS = "none,nova,fastvar,skipvar,sparsevar,sparvar,toprovar"
HART_METHODS = "none,nova,fastvar_hart,sparvar_hart"
INFINITY_8B_METHODS = "none,nova,fastvar_8b,scalekv"   # scalekv: KV MB and peak memory where the cache is largest
PIN = ["--set", "nova.t_star=6"]        # random weights: NOVA's entropy-driven t* is meaningless, pin it for timing
STEPS = ("pytest", "infinity_2b", "hart", "infinity_8b")
TARGETS = {"none_over_official": 1.0, "none_compile_over_official": 0.9, "nova_realized": 0.85,
           "baseline_realized": 0.80}


@dataclass
class Step:
    name: str
    what: str
    cmd: list[str]
    estimate_s: float
    json_path: Path | None = None       # bench_speed --json
    junit_path: Path | None = None      # pytest --junitxml
    result: dict = field(default_factory=dict)


def bench(model, methods, est, work, smoke, official, name, compile_=True, extra=()) -> Step:
    js = work / f"bench_{name}.json"
    cmd = [sys.executable, "scripts/bench_speed.py", "--model", model, "--methods", methods, *PIN, "--json", str(js)]
    if smoke:
        cmd += ["--device", "cpu", "--dtype", "fp32", "--prompts", "1", "--repeats", "1", "--warmup", "0",
                "--threads", "1"]
    else:
        cmd += ["--device", "cuda", "--dtype", "bf16", "--prompts", "1", "--repeats", "3", "--warmup", "1"]
        if compile_:
            cmd += ["--compile"]
    if official:
        cmd += ["--official", str(official)]
    cmd += list(extra)
    size = "tiny, CPU fp32" if smoke else "1024x1024, bf16"
    return Step(name, f"bench_speed {model} ({size}): {methods.replace(',', ', ')}"
                      f"{' +compile' if compile_ and not smoke else ''}{' vs official' if official else ''}",
                cmd, est, json_path=js)


def plan(smoke: bool, official: Path | None, work: Path) -> list[Step]:
    junit = work / "pytest_gpu.xml"
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider",
                  "-rfEs", "--durations=15", f"--junitxml={junit}", "-o", "junit_family=xunit1"]
    s = 1 if not smoke else 0
    steps = [Step("pytest", "pytest -m gpu tests/test_gpu.py", pytest_cmd, 150 if s else 60, junit_path=junit)]
    if smoke:
        steps += [bench("tiny_random", INFINITY_METHODS, 120, work, True, official, "infinity_2b"),
                  bench("hart_tiny_random", HART_METHODS, 60, work, True, None, "hart"),
                  bench("tiny_random", INFINITY_8B_METHODS, 45, work, True, None, "infinity_8b")]
    else:
        steps += [bench("infinity_2b_random", INFINITY_METHODS, 210, work, False, official, "infinity_2b"),
                  bench("hart_0.7b_random", HART_METHODS, 45, work, False, None, "hart", compile_=False),
                  bench("infinity_8b_random", INFINITY_8B_METHODS, 75, work, False, None, "infinity_8b",
                        compile_=False)]
    return steps


def decide(remaining: float, estimate: float, later: list[float]) -> tuple[bool, float]:
    """(run it?, its time limit): run when the budget left covers the estimate; the limit leaves the later steps'
    estimates untouched, but is never below the step's own estimate."""
    if remaining < estimate:
        return False, 0.0
    return True, max(estimate, remaining - sum(later))


def run_step(cmd: list[str], timeout: float, log, env_extra: dict | None = None) -> tuple[int | None, float, bool, str]:
    """Run ``cmd`` in its own process group, streaming its output to stdout and ``log``; stop it at ``timeout``.
    Returns (exit code or None, seconds, timed out, the last 4000 characters of its output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, bufsize=1)
    tail: list[str] = []

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            tail.append(line)
            if len(tail) > 400:
                del tail[:200]

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    th.join(timeout=5)
    return proc.returncode, time.perf_counter() - t0, timed_out, "".join(tail)[-4000:]


def device_info(smoke: bool) -> dict:
    """Device name, torch / CUDA / cuDNN versions, from a child process (the parent never holds a CUDA context)."""
    code = ("import json, platform, torch; c = torch.cuda.is_available(); print(json.dumps({'cuda_available': c, "
            "'device': torch.cuda.get_device_name() if c else 'CPU (' + (platform.processor() or platform.machine()) "
            "+ ')', 'torch': torch.__version__, 'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version() "
            "if c else None, 'gpu_memory_bytes': torch.cuda.get_device_properties(0).total_memory if c else None, "
            "'python': platform.python_version(), 'varbench': __import__('varbench').__file__}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise UserError(f"could not import torch: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    if not Path(info["varbench"]).resolve().is_relative_to(REPO):
        raise UserError(f"python imports varbench from {info['varbench']}, not from this checkout {REPO}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    return info


def junit_summary(path: Path) -> dict | None:
    """Counts, failures (first line of each message) and the peak memory each test recorded, from pytest's XML."""
    if path is None or not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "skipped_budget": 0, "failed": [],
           "peak_memory_bytes": {}}
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            name = case.get("name")
            for bad in list(case.iter("failure")) + list(case.iter("error")):
                out["failed"].append(f"{name}: {(bad.get('message') or '').splitlines()[0][:300] if bad.get('message') else bad.tag}")
            out["skipped_budget"] += sum("time budget" in (sk.get("message") or "") for sk in case.iter("skipped"))
            for prop in case.iter("property"):
                if prop.get("name") == "peak_memory_bytes":
                    out["peak_memory_bytes"][name] = int(prop.get("value"))
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


# ---------------------------------------------------------------- the report
def _x(v, fmt="{:.2f}x"):
    return "—" if v is None else fmt.format(v)


def _mib(n):
    return "—" if not n else f"{n / 2**20:,.0f} MiB"


def targets(steps: dict) -> list[str]:
    """The issue's targets, met or not, from what ran (NOVA's t* pinned)."""
    out = []
    b = (steps.get("infinity_2b") or {}).get("bench")
    if not b:
        return ["Infinity-2B benchmark did not run: no target can be judged"]
    rows = {r["run"]: r for r in b["rows"]}
    if b.get("none_over_official_median") is not None:
        v = b["none_over_official_median"]
        out.append(f"ours none / official (eager, medians) {v:.2f}x: target <= {TARGETS['none_over_official']:.1f}x "
                   f"{'met' if v <= TARGETS['none_over_official'] else 'NOT met'}")
    if b.get("none_compile_over_official_median") is not None:
        v = b["none_compile_over_official_median"]
        out.append(f"ours none+compile / official (medians) {v:.2f}x: target <= "
                   f"{TARGETS['none_compile_over_official']:.1f}x "
                   f"{'met' if v <= TARGETS['none_compile_over_official'] else 'NOT met'}")
    for n, r in rows.items():
        base = n.split("+")[0]
        if base in ("none", "official"):
            continue
        want = TARGETS["nova_realized"] if base == "nova" else TARGETS["baseline_realized"]
        v = r["realized_over_ideal"]
        out.append(f"{n} realized / FLOP-ideal {v:.0%}: target >= {want:.0%} {'met' if v >= want else 'NOT met'}")
    pn, pb = (rows.get("nova") or {}).get("peak_memory_bytes"), (rows.get("none") or {}).get("peak_memory_bytes")
    if pn and pb:
        out.append(f"peak memory nova {_mib(pn)} vs none {_mib(pb)}: target nova < none {'met' if pn < pb else 'NOT met'}")
    return out


def markdown(rep: dict) -> str:
    d = rep["device"]
    L = [f"# GPU check ({'smoke, CPU' if rep['smoke'] else 'GPU'}) — {rep['started']}", "",
         f"Device: **{d.get('device')}**{' (' + d['nvidia_smi'] + ')' if d.get('nvidia_smi') else ''}; torch "
         f"{d.get('torch')}, CUDA {d.get('cuda')}, cuDNN {d.get('cudnn')}, Python {d.get('python')}; git {rep['git']}",
         f"Budget {rep['budget_s']:.0f} s, used {rep['elapsed_s']:.0f} s. Official code: {rep['official'] or 'not given'}.",
         "", "| step | what | status | elapsed (s) | limit (s) |", "|---|---|---|---|---|"]
    for s in rep["steps"]:
        L.append(f"| {s['name']} | {s['what']} | {s['status']} | {s.get('elapsed_s', 0):.1f} | "
                 f"{s.get('limit_s', 0):.0f} |")
    py = next((s for s in rep["steps"] if s["name"] == "pytest"), {}).get("pytest")
    if py:
        L += ["", f"pytest -m gpu: {py['passed']} passed, {py['failures']} failed, {py['errors']} errors, "
                  f"{py['skipped']} skipped ({py['skipped_budget']} of them: out of the step's time budget)"]
        L += [f"- FAILED {f}" for f in py["failed"]]
        if py["peak_memory_bytes"]:
            peaks = sorted(py["peak_memory_bytes"].values())
            L.append(f"- peak memory recorded by {len(peaks)} GPU contract runs: {_mib(peaks[0])} to {_mib(peaks[-1])} "
                     f"(per test in the JSON)")
    for s in rep["steps"]:
        b = s.get("bench")
        if not b:
            continue
        L += ["", f"## {s['name']}: {b['model']} on {b['device']}, {b['dtype']}, {b['weights']}",
              f"{b['prompts']} prompt(s) x {b['repeats']} round(s) after {b['warmup']} warmup run(s); model built in "
              f"{b['build_s']:.1f} s" + (f", official in {b['official_build_s']:.1f} s" if b.get("official_build_s")
                                         else "") + f"; --set {' '.join(b['sets'])}", "",
              "| run | min (s) | median (s) | max (s) | speedup vs none | FLOP-ideal speedup | realized / ideal | "
              "ours / official | peak memory |", "|---|---|---|---|---|---|---|---|---|"]
        for r in b["rows"]:
            L.append(f"| {r['run']} | {r['min_s']:.3f} | {r['median_s']:.3f} | {r['max_s']:.3f} | "
                     f"{r['speedup_median']:.2f}x | {r['flop_ideal_speedup']:.2f}x | {r['realized_over_ideal']:.0%} | "
                     f"{_x(r['over_official_median'])} | {_mib(r['peak_memory_bytes'])} |")
        if b.get("none_over_official_median") is not None:
            L.append(f"\nours none / official: {b['none_over_official_median']:.2f}x (medians)"
                     + (f"; none+compile / official: {b['none_compile_over_official_median']:.2f}x"
                        if b.get("none_compile_over_official_median") is not None else ""))
        if b.get("equality"):
            L.append(f"\n{b['equality']}")
        if b.get("wide_spread"):
            L.append(f"\nwide spread: {', '.join(b['wide_spread'])}")
    L += ["", "## Targets (issue 26; NOVA's t* pinned at 6)" + (": judged on the GPU run only, a CPU smoke run "
                                                              "says nothing about them" if rep["smoke"] else ""), ""]
    L += [f"- {t}" for t in rep["targets"]]
    return "\n".join(L) + "\n"


def git_sha() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (r.stdout.strip() or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU (checks this script, about a minute)")
    ap.add_argument("--official", metavar="PATH", help="a FoundationVision/Infinity checkout (e.g. .official/Infinity)")
    ap.add_argument("--out", metavar="DIR", help="report folder (default results/speed; a temporary one with --smoke)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together (default 480)")
    ap.add_argument("--steps", default=",".join(STEPS), help="which steps, in this order")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    t_start = time.perf_counter()
    if a.budget <= 0:
        raise UserError(f"--budget must be > 0 seconds, got {a.budget}")
    wanted = [n for n in a.steps.split(",") if n]
    bad = [n for n in wanted if n not in STEPS]
    if bad or not wanted:
        raise UserError(f"--steps: unknown step {bad[0] if bad else '(none)'}; steps: {', '.join(STEPS)}")
    official = None
    if a.official:
        from varbench.harness.official import check_checkout

        official = check_checkout(a.official)
    out = Path(a.out).expanduser() if a.out else (Path(tempfile.mkdtemp(prefix="gpu_check_smoke_")) if a.smoke
                                                  else REPO / "results" / "speed")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {a.out}: not a folder")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    steps = {s.name: s for s in plan(a.smoke, official, work)}
    info = device_info(a.smoke)
    if not a.smoke and not info["cuda_available"]:
        raise UserError("no CUDA device is visible to torch: the GPU check needs one (run --smoke on a CPU)")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"[gpu_check] {'smoke (CPU, tiny models)' if a.smoke else 'GPU'} on {info['device']}; torch {info['torch']}, "
          f"CUDA {info['cuda']}; budget {a.budget:.0f} s; steps {', '.join(wanted)}; report in {out}", flush=True)
    results, failed = [], False
    with open(out / "gpu_check.log", "w") as log:
        for i, name in enumerate(wanted):
            st = steps[name]
            elapsed = time.perf_counter() - t_start
            remaining = a.budget - elapsed
            go, limit = decide(remaining, st.estimate_s, [steps[n].estimate_s for n in wanted[i + 1:]])
            res = {"name": name, "what": st.what, "command": " ".join(st.cmd), "estimate_s": st.estimate_s}
            if not go:
                msg = (f"[gpu_check] SKIPPED {name}: {remaining:.0f} s of the budget left, its estimate is "
                       f"{st.estimate_s:.0f} s")
                print(msg, flush=True)
                log.write(msg + "\n")
                results.append(res | {"status": "skipped (budget)", "elapsed_s": 0.0, "limit_s": 0.0})
                continue
            head = f"[gpu_check] step {name}: {st.what} (limit {limit:.0f} s)"
            print(head, flush=True)
            log.write(head + "\n$ " + res["command"] + "\n")
            log.flush()
            # pytest skips the tests that would start later than 20 s before the limit (tests/test_gpu.py)
            extra = {"VARBENCH_GPU_DEADLINE": f"{time.time() + limit - 20:.0f}"} if name == "pytest" else None
            rc, dt, timed_out, tail = run_step(st.cmd, limit, log, extra)
            status = "timed out" if timed_out else ("ok" if rc == 0 else f"failed (exit {rc})")
            if name == "pytest" and rc == 5:      # no test collected: cannot happen with tests/test_gpu.py present
                status = "failed (no tests collected)"
            failed |= status != "ok"
            res |= {"status": status, "exit_code": rc, "elapsed_s": dt, "limit_s": limit}
            if status != "ok":
                res["output_tail"] = tail
            if st.json_path is not None and st.json_path.is_file():
                res["bench"] = json.loads(st.json_path.read_text())
            if st.junit_path is not None:
                res["pytest"] = junit_summary(st.junit_path)
            results.append(res)
            total = time.perf_counter() - t_start
            msg = (f"[gpu_check] {name}: {status} in {dt:.1f} s; {total:.0f} s elapsed, {a.budget - total:.0f} s of "
                   f"the budget left")
            print(msg, flush=True)
            log.write(msg + "\n")
            log.flush()
    rep = {"smoke": a.smoke, "started": started, "git": git_sha(), "device": info, "budget_s": a.budget,
           "elapsed_s": time.perf_counter() - t_start, "official": str(official) if official else None,
           "steps": results}
    rep["targets"] = targets({r["name"]: r for r in results})
    (out / "gpu_check.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(rep))
    print(f"[gpu_check] done in {rep['elapsed_s']:.0f} s: {sum(r['status'] == 'ok' for r in results)}/{len(results)} "
          f"steps ok; report {out / 'gpu_check.md'} and .json", flush=True)
    for t in rep["targets"]:
        print(f"[gpu_check] {t}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
