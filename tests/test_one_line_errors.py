"""Issue 24 items 5, 8, 9: one-line errors and exit codes the same everywhere, and no silent no-ops.

ONE parametrized test over every input the issue lists, whatever the entry point: ``run.py`` (single run and
multirun), Ctrl-C during a run, ``scripts/bench_speed.py``, ``scripts/check_fixture.py`` (every fixture family),
``scripts/make_tables.py``. A bad input gets exactly one line on stderr (no traceback) and exit code 2; Ctrl-C one
line and 130; a run's results folder is unchanged byte for byte and no empty run folder is left. The inputs that
used to be silent no-ops are either refused (one line, 2) or, where the command is legitimate, answered with the
warning / note / listing that was missing (``rc`` 0, the phrase on ``stdout``).

Every case failed on the old code (b52efef, before issue 24): raw Hydra text / tracebacks / exit 1 / exit 0 with
nothing said. Cases that take more than ~20 s here are marked slow; one fast case of each kind stays in the quick
loop (run.py single, run.py -m, check_fixture, make_tables, bench_speed).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
from conftest import REPO

SHARED = REPO.parent / "shared" / "fixtures"


@dataclass
class Case:
    id: str
    cmd: list[str]                  # script and arguments; "{x}" is filled from what ``setup`` returns
    phrase: str                     # in the one stderr line (rc != 0), else in stdout
    rc: int = 2
    env: dict = field(default_factory=dict)
    setup: Optional[Callable[[Path], dict]] = None
    quick: bool = False
    absent: tuple = ()              # phrases that must not appear (stdout and stderr)
    stderr_lines: Optional[int] = 1  # exactly this many non-empty stderr lines (None: not counted)
    keeps_results: bool = True      # the results root is unchanged byte for byte


# ------------------------------------------------------------------ setups (files the inputs point at)
def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(path)


def external_folder(tmp: Path) -> dict:
    _png(tmp / "ext" / "00000.png")
    return {"folder": str(tmp / "ext")}


def _damaged_copy(tmp: Path, family: str, victim: str) -> dict:
    src = SHARED / family
    if not src.is_dir():
        pytest.skip(f"no {src} (shared fixtures absent)")
    dst = tmp / family
    shutil.copytree(src, dst)
    f = dst / victim
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])      # a torn copy (interrupted download / disk full)
    return {"dir": str(dst)}


def damaged_hart(tmp: Path) -> dict:
    return _damaged_copy(tmp, "hart", "tiny_hart_transformer_weights.safetensors")


def damaged_hart_tensors(tmp: Path) -> dict:
    return _damaged_copy(tmp, "hart", "tiny_hart_tensors.safetensors")


def damaged_var(tmp: Path) -> dict:
    return _damaged_copy(tmp, "var", "tiny_var_weights.safetensors")


def damaged_infinity(tmp: Path) -> dict:
    return _damaged_copy(tmp, "infinity", "tiny_2bstyle_tensors.safetensors")


def hart_meta_without_sampling(tmp: Path) -> dict:
    d = _damaged_copy(tmp, "hart", "tiny_hart_meta.json")  # then rewritten whole, minus one entry
    meta = json.loads((SHARED / "hart/tiny_hart_meta.json").read_text())
    del meta["sampling"]
    (Path(d["dir"]) / "tiny_hart_meta.json").write_text(json.dumps(meta))
    return d


def store_with_a_row(tmp: Path) -> dict:
    root = tmp / "res"
    root.mkdir(parents=True, exist_ok=True)
    row = {"run": "runs/tiny/smoke/none/default", "model": "tiny", "method": "none", "family": "none",
           "bench": "smoke", "overrides": "default", "metric": "latency_s", "value": 0.5, "n": 1, "items": "1-x",
           "device": "cpu"}
    (root / "rows.jsonl").write_text(json.dumps(row) + "\n")
    return {"root": str(root)}


def run_with_stray_png(tmp: Path) -> dict:
    """A finished 1-image bench=shapes run whose item folder also holds a text file named junk.png (beside the item's
    own image, where the shapes scorer looks: the old code crashed there with PIL.UnidentifiedImageError)."""
    env = dict(os.environ, VARBENCH_RESULTS=str(tmp / "res"))
    r = subprocess.run([sys.executable, "run.py", "method=none", "bench=shapes", "bench.limit=1", "stage=generate",
                        "progress=false"], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    images = tmp / "res/runs/tiny/shapes/none/default/images"
    (images / "00000/samples/junk.png").write_text("not an image: left here by another tool")
    return {}


# ------------------------------------------------------------------ the inputs of issue 24 (items 5, 8, 9)
R = ["run.py"]
BS = ["scripts/bench_speed.py"]
CF = ["scripts/check_fixture.py"]
MT = ["scripts/make_tables.py"]
CASES = [
    # item 5: model values (sampling, schedule) and run options, validated when the config is built
    Case("tau=0", R + ["model.sampling.tau=0"], "model.sampling.tau must be in (0, inf]", quick=True),
    Case("tau=-1", R + ["model.sampling.tau=-1"], "model.sampling.tau must be in (0, inf]"),
    Case("cfg=abc", R + ["model.sampling.cfg=abc"], "model.sampling.cfg must be a number"),
    Case("cfg=-3", R + ["model.sampling.cfg=-3"], "model.sampling.cfg must be in [0, inf]"),
    Case("top_k=-5", R + ["model.sampling.top_k=-5"], "model.sampling.top_k must be in [0, inf]"),
    Case("top_p=2", R + ["model.sampling.top_p=2"], "model.sampling.top_p must be in [0, 1]"),
    Case("mid pn=7M", R + ["model=infinity_mid_random", "model.schedule.pn=7M"], "model.schedule.pn must be one of"),
    Case("+pn=7M on tiny", R + ["+model.schedule.pn=7M"], "model.schedule.pn cannot be combined"),
    Case("h_div_w=0.123", R + ["model=tiny_random", "model.schedule.h_div_w=0.123"],
         "model.schedule.h_div_w=0.123 is not one of"),
    Case("warmup=-1", R + ["warmup=-1"], "warmup must be >= 0"),
    Case("reference=maybe", R + ["reference=maybe"], "reference must be true or false"),
    Case("+foo=bar", R + ["+foo=bar"], "foo is not a run option"),
    # item 9: an empty VARBENCH_RESULTS wrote into the checkout; score_dir with the default bench wrote {}
    Case("VARBENCH_RESULTS empty", R + ["method=none", "bench.limit=1"], "results_root is empty",
         env={"VARBENCH_RESULTS": ""}, keeps_results=False),
    Case("score_dir with bench=smoke", R + ["score_dir={folder}"], "has no quality metrics",
         setup=external_folder),
    # item 8: multirun override errors were raw multi-line Hydra text, exit 1
    Case("-m alpha=0.3,abc", R + ["-m", "method.alpha=0.3,abc"], "method.alpha must be a number, got 'abc'",
         quick=True),
    Case("-m bench.limit=1,0", R + ["-m", "bench.limit=1,0"], "bench.limit must be >= 1"),
    Case("-m tau=1,0", R + ["-m", "model.sampling.tau=1,0"], "model.sampling.tau must be in (0, inf]"),
    # item 8: a stray non-image .png in a run crashed scoring: the scorers read only the run's items, one warning
    Case("stray png in a run", R + ["method=none", "bench=shapes", "bench.limit=1", "stage=score"],
         "are not images of this run", rc=0, setup=run_with_stray_png, keeps_results=False),
    # item 8: Ctrl-C printed a 65-line traceback (handled in test_one_line_errors below: kind "sigint")
    Case("Ctrl-C", R + ["method=none", "bench=shapes", "bench.limit=40", "stage=generate"], "interrupted (Ctrl-C)",
         rc=130, keeps_results=False),
    # item 8: bench_speed --set with a misspelled key was a 61-line traceback; a --set naming nothing was ignored
    Case("bench_speed --set nova.alpah=3", BS + ["--set", "nova.alpah=3"],
         "--set nova.alpah=3: method.alpah is not an option of NovaConfig (did you mean 'alpha'?)", quick=True),
    Case("bench_speed --set novaa.alpha=3", BS + ["--set", "novaa.alpha=3"], "'novaa' is neither the model"),
    Case("bench_speed --threads 0", BS + ["--threads", "0"], "--threads must be auto or an integer >= 1"),
    # item 9: --repeats 1 printed spread 0 % and realized/ideal with no warning, ran torch's thread count (run.py
    # runs 1) and said nothing while it worked
    Case("bench_speed --repeats 1", BS + ["--model", "tiny_random", "--methods", "none,nova", "--prompts", "1",
                                          "--repeats", "1", "--warmup", "0", "--set", "nova.t_star=6"],
         "WARNING: --repeats 1", rc=0, stderr_lines=None),
    # item 8: check_fixture on a damaged fixture: one line and 2 for every family (1 stays for real mismatches)
    Case("check_fixture torn HART weights", CF + ["{dir}/tiny_hart_meta.json"],
         "tiny_hart_transformer_weights.safetensors: not a readable safetensors file", setup=damaged_hart, quick=True),
    Case("check_fixture torn HART tensors", CF + ["{dir}/tiny_hart_meta.json"],
         "tiny_hart_tensors.safetensors: not a readable safetensors file", setup=damaged_hart_tensors),
    Case("check_fixture HART meta without sampling", CF + ["{dir}/tiny_hart_meta.json"], "sampling missing",
         setup=hart_meta_without_sampling),
    Case("check_fixture torn VAR weights", CF + ["{dir}/tiny_meta.json"], "not a readable safetensors file",
         setup=damaged_var),
    Case("check_fixture torn Infinity tensors", CF + ["{dir}/tiny_2bstyle_meta.json"],
         "tiny_2bstyle_tensors.safetensors: not a readable safetensors file", setup=damaged_infinity),
    Case("check_fixture unsupported family names HART and VAR", CF + ["{dir}/tiny_hart_meta.json"],
         "HART (hart/*_meta.json), VAR (var/*_meta.json)", setup=lambda tmp: _foreign_meta(tmp)),
    # item 8/9: make_tables
    Case("make_tables missing root", MT + ["--results-root", "{tmp}/nowhere"], "no results folder at", quick=True),
    Case("make_tables empty store", MT + ["--results-root", "{tmp}"], "no results in"),
    Case("make_tables VARBENCH_RESULTS empty", MT, "VARBENCH_RESULTS is set to an empty string",
         env={"VARBENCH_RESULTS": ""}),
    Case("make_tables --out unwritable", MT + ["--results-root", "{root}", "--out", "/proc/varbench/t.md"],
         "cannot write /proc/varbench/t.md", setup=store_with_a_row),
    Case("make_tables --csv unwritable", MT + ["--results-root", "{root}", "--model", "tiny", "--csv",
                                               "/dev/null/t.csv"], "cannot write /dev/null/t.csv",
         setup=store_with_a_row),
    # item 9: --help listed the methods' _<family> schemas, which method= refuses
    Case("--help", R + ["--help"], "method: fastvar,", rc=0, absent=("method: _", ", _nova,", ", _none,"),
         stderr_lines=0),
]


def _foreign_meta(tmp: Path) -> dict:
    d = tmp / "foreign"
    d.mkdir()
    (d / "tiny_hart_meta.json").write_text(json.dumps({"source": "someone else's model", "weights": {}}))
    return {"dir": str(d)}


def tree_hash(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".lock")}


def _sigint(cmd: list[str], env: dict, run_root: Path) -> subprocess.CompletedProcess:
    """Start the run, wait until it has finished two images, send SIGINT (what Ctrl-C sends)."""
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    records = run_root / "records.jsonl"
    for _ in range(3000):      # a bound on the wait, not a timing assertion
        if p.poll() is not None or (records.exists() and records.read_text().count("\n") >= 2):
            break
        time.sleep(0.1)
    assert p.poll() is None, f"the run ended before it could be interrupted: {p.communicate()}"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _params() -> list:
    return [pytest.param(c, id=c.id, marks=() if c.quick else pytest.mark.slow) for c in CASES]


@pytest.mark.parametrize("case", _params())
def test_one_line_errors(case: Case, tmp_path):
    values = {"tmp": str(tmp_path)} | (case.setup(tmp_path) if case.setup else {})
    cmd = [sys.executable] + [a.format(**values) for a in case.cmd]
    res = tmp_path / "res"
    (res / "runs/x").mkdir(parents=True, exist_ok=True)
    (res / "runs/x/keep.txt").write_text("previous results")
    env = dict(os.environ, VARBENCH_RESULTS=str(res))
    env.update(case.env)
    if case.cmd[0] == "run.py" and "--help" not in case.cmd:
        cmd.append("progress=false")
    before = tree_hash(res)
    if case.id == "Ctrl-C":
        r = _sigint(cmd, env, res / "runs/tiny/shapes/none/default")
    else:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == case.rc, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if case.stderr_lines is not None:
        assert len(lines) == case.stderr_lines, r.stderr[-3000:]
    if case.rc != 0:
        assert case.phrase in lines[0], lines[0]
    else:
        assert case.phrase in r.stdout + r.stderr, (r.stdout[-3000:], r.stderr[-3000:])
    for bad in case.absent:
        assert bad not in r.stdout + r.stderr, bad
    if case.keeps_results:
        assert tree_hash(res) == before
        assert not any(p.is_dir() and not any(p.iterdir()) for p in res.rglob("*")), "an empty run folder was left"
    _also(case, r, env, res)


def _also(case: Case, r, env: dict, res: Path) -> None:
    """What each kind of case must also show beyond its one line."""
    if case.id == "Ctrl-C":         # the images are intact and the run resumes from them
        from PIL import Image

        run = res / "runs/tiny/shapes/none/default"
        images = sorted((run / "images").rglob("*.png"))
        assert images and not list(run.rglob("*.tmp"))
        for p in images:
            Image.open(p).load()
        again = subprocess.run([sys.executable, "run.py", "method=none", "bench=shapes",
                                f"bench.limit={len(images) + 1}", "stage=generate", "progress=false"],
                               cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
        assert again.returncode == 0, again.stderr
        assert f"{len(images)} done, 1 to generate" in again.stdout, again.stdout
    if case.id == "bench_speed --repeats 1":   # run.py's thread count, progress while working, no 0 % spread
        assert "1 threads" in r.stdout
        assert "[bench_speed] round 1/1" in r.stderr and "[bench_speed] building tiny_random" in r.stderr
        row = next(ln for ln in r.stdout.splitlines() if ln.startswith("| nova |"))
        assert row.split("|")[5].strip() == "—", row
    if case.id == "--help":
        groups = dict(re.findall(r"^(model|method|bench|experiment): (.*)$", r.stdout, re.M))
        assert set(groups) == {"model", "method", "bench", "experiment"}
        assert "none" in groups["method"].split(", ") and not any(n.startswith("_") for n in
                                                                   groups["method"].split(", "))
    if case.id == "VARBENCH_RESULTS empty":   # it used to write runs/ into the checkout (cwd)
        assert not (REPO / "runs").exists()


def test_compile_on_the_cpu_is_noted_in_one_line():
    """Item 9: compile=true on the CPU ran 0.14x with no note; the note comes before the run (not for stage=score,
    not on a GPU)."""
    from varbench.harness.cli import compile_note
    from varbench.harness.config import RunConfig

    def cfg(**kw):
        return RunConfig.from_dict({"model": {"name": "tiny"}, "method": {"name": "none"}, "bench": {"name": "smoke"},
                                    "results_root": "r", **kw})

    note = compile_note(cfg(compile=True, device="cpu"))
    assert note and "\n" not in note and "compile=true on the CPU" in note
    assert compile_note(cfg(compile=False, device="cpu")) is None
    assert compile_note(cfg(compile=True, device="cpu", stage="score")) is None
