"""scripts/gpu_check.py: the budget scheduler, bad input in one line, and the whole script in --smoke mode on the CPU
(tiny models; the report's JSON and markdown carry every figure the GPU run will)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

OFFICIAL = Path("/tmp/official/Infinity")      # a copy of the official checkout, when one was prepared here


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod            # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, "scripts/gpu_check.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_budget_scheduler_keeps_room_for_later_steps():
    decide = _script().decide
    assert decide(480, 150, [210, 45, 75]) == (True, 150)        # exactly its estimate: the rest is reserved
    assert decide(400, 150, [45]) == (True, 355)                 # slack goes to the running step
    assert decide(100, 150, []) == (False, 0.0)                  # would not fit: skipped
    assert decide(200, 150, [210]) == (True, 150)                # never below its own estimate


def test_the_real_plan_names_every_method_and_the_settings_of_the_issue(tmp_path):
    steps = {s.name: s for s in _script().plan(False, Path("/x/Infinity"), tmp_path)}
    assert list(steps) == ["pytest", "infinity_2b", "hart", "infinity_8b"]
    assert steps["pytest"].cmd[3:6] == ["-q", "-m", "gpu"]
    b2 = steps["infinity_2b"].cmd
    assert b2[b2.index("--model") + 1] == "infinity_2b_random"
    assert b2[b2.index("--methods") + 1] == "none,nova,fastvar,skipvar,sparsevar,sparvar,toprovar"
    assert {"--compile", "--official", "/x/Infinity", "bf16", "cuda", "nova.t_star=6"} <= set(b2)
    assert steps["hart"].cmd[steps["hart"].cmd.index("--methods") + 1] == "none,nova,fastvar_hart,sparvar_hart"
    assert steps["infinity_8b"].cmd[steps["infinity_8b"].cmd.index("--model") + 1] == "infinity_8b_random"
    assert "--official" not in steps["hart"].cmd
    assert sum(s.estimate_s for s in steps.values()) <= 480      # the plan fits the default 8-minute budget


@pytest.mark.parametrize("args,msg", [
    (["--official", "/nonexistent/Infinity", "--smoke"], "not a FoundationVision/Infinity checkout"),
    (["--smoke", "--steps", "pytest,bench2b"], "unknown step bench2b"),
    (["--smoke", "--budget", "0"], "--budget must be > 0"),
])
def test_bad_input_is_one_line_exit_2(args, msg):
    r = _run(*args, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], r.stderr


def test_without_a_gpu_the_real_check_refuses_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the real check would run")
    r = _run("--steps", "pytest", timeout=120)
    assert r.returncode == 2 and "no CUDA device" in r.stderr and "--smoke" in r.stderr


def test_a_step_over_the_budget_is_skipped_with_a_line(tmp_path):
    r = _run("--smoke", "--budget", "5", "--out", str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    skipped = [ln for ln in r.stdout.splitlines() if "SKIPPED" in ln]
    assert len(skipped) == 4 and all("of the budget left, its estimate is" in ln for ln in skipped)
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["status"] for s in rep["steps"]] == ["skipped (budget)"] * 4
    assert "did not run" in rep["targets"][0]


@pytest.mark.slow
def test_smoke_run_on_the_cpu_writes_the_report(tmp_path):
    """The whole script at tiny sizes: every step runs, every method of the GPU plan has a row with min/median/max,
    speedup vs none, FLOP-ideal speedup and realized/ideal; the markdown names the device and versions. With a copy
    of the official checkout in /tmp the Infinity step is also timed against it (ours / official column)."""
    args = ["--smoke", "--out", str(tmp_path)] + (["--official", str(OFFICIAL)] if OFFICIAL.is_dir() else [])
    r = _run(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("pytest", "infinity_2b", "hart", "infinity_8b"):
        assert f"[gpu_check] {name}: ok in " in r.stdout
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["smoke"] and rep["device"]["torch"] and "cuda" in rep["device"]
    steps = {s["name"]: s for s in rep["steps"]}
    assert all(s["status"] == "ok" and s["elapsed_s"] > 0 for s in steps.values())
    py = steps["pytest"]["pytest"]
    assert py["tests"] > 0 and py["failures"] == py["errors"] == 0    # on a CPU: every gpu test skipped
    want = {"infinity_2b": ["none", "nova", "fastvar", "skipvar", "sparsevar", "sparvar", "toprovar"],
            "hart": ["none", "nova", "fastvar_hart", "sparvar_hart"], "infinity_8b": ["none", "nova", "fastvar_8b", "scalekv"]}
    for name, methods in want.items():
        rows = {row["run"]: row for row in steps[name]["bench"]["rows"]}
        assert set(methods) <= set(rows), (name, rows.keys())
        for m in methods:
            row = rows[m]
            assert row["min_s"] <= row["median_s"] <= row["max_s"] and row["flop_ideal_speedup"] >= 1.0
            assert row["realized_over_ideal"] == pytest.approx(row["speedup_median"] / row["flop_ideal_speedup"])
        assert rows["none"]["speedup_median"] == 1.0
    if OFFICIAL.is_dir():
        b = steps["infinity_2b"]["bench"]
        assert "official" in {row["run"] for row in b["rows"]} and b["none_over_official_median"] > 0
        assert "sampled bits identical" in b["equality"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert rep["device"]["device"] in md and f"torch {rep['device']['torch']}" in md
    assert "| run | min (s) | median (s) | max (s) | speedup vs none | FLOP-ideal speedup | realized / ideal |" in md
    assert (tmp_path / "gpu_check.log").read_text().count("$ ") == 4


def test_pytest_step_stops_starting_tests_after_its_deadline(tmp_path):
    """VARBENCH_GPU_DEADLINE in the past: tests/test_gpu.py skips what would start (with the budget reason), pytest
    ends by itself and its XML counts those skips (the pytest step's report survives a tight budget)."""
    import os

    xml = tmp_path / "p.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "tests/test_gpu.py", "-k", "real_architecture", "-p",
           "no:cacheprovider", f"--junitxml={xml}", "-o", "junit_family=xunit1"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, VARBENCH_GPU_DEADLINE="0"))
    assert r.returncode == 0, r.stdout[-2000:]
    s = _script().junit_summary(xml)
    assert s["tests"] == 3 and s["skipped"] == 3 and s["skipped_budget"] == 3 and s["passed"] == 0
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)   # no deadline: they run
    s = _script().junit_summary(xml)
    assert r.returncode == 0 and s["passed"] == 3 and s["skipped_budget"] == 0
