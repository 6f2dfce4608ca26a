"""The command line as a user meets it: default job, resume, and one-line errors that lose nothing.

Every bad input gets exit code 2 and exactly one line on stderr (no traceback), and the results folder is
unchanged byte for byte (hashes before/after).
"""
import hashlib
import os
import subprocess
import sys

import pytest
from conftest import REPO


def run_py(*args, env=None, timeout=600):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=e)


def tree_hash(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".lock")}


@pytest.mark.slow
def test_default_job_writes_images_and_resumes(tmp_path):
    env = {"VARBENCH_RESULTS": str(tmp_path)}
    r = run_py("method=none", "bench.limit=2", "progress=false", env=env)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "runs/tiny/smoke/none/default"  # named by what changes images, not the clock
    imgs = sorted((run_dir / "images").glob("*.png"))
    assert len(imgs) == 2 and str(run_dir / "images") in r.stdout
    import json

    meta = json.loads((run_dir / "meta.json").read_text())
    assert {"git_sha", "versions", "config", "identity", "run_id", "spec", "threads", "device_name"} <= set(meta)
    # a half-written image (killed run) is regenerated, a finished one is reused
    imgs[1].write_bytes(imgs[1].read_bytes()[:100])
    r2 = run_py("method=none", "bench.limit=2", "progress=false", env=env)
    assert r2.returncode == 0, r2.stderr
    assert "1 generated, 1 reused" in r2.stdout
    from PIL import Image

    Image.open(imgs[1]).load()


@pytest.mark.slow
def test_missing_weights_fail_fast_with_one_line(tmp_path):
    r = run_py("model=infinity_2b", env={"VARBENCH_WEIGHTS": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hf"),
                                         "HF_HUB_OFFLINE": "1", "VARBENCH_RESULTS": str(tmp_path / "res")})
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "infinity_2b_reg.pth" in lines[0] and "infinity_vae_d32reg.pth" in lines[0] and str(tmp_path) in lines[0]
    assert "huggingface.co/FoundationVision/Infinity" in lines[0]
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").rglob("meta.json"))


BAD = [  # (arguments, a phrase the one line must contain)
    (["method=nova_typo"], "unknown method 'nova_typo' (did you mean"),
    (["model=infinty_2b"], "did you mean 'infinity_2b'"),
    (["bench=genevall"], "did you mean 'geneval'"),
    (["dtype=fp8"], "dtype must be"),
    (["bench.limit=0"], "bench.limit must be >= 1"),
    (["bench.limit=-3"], "bench.limit must be >= 1"),
    (["bench.limit=abc"], "bench.limit must be an integer"),
    (["seed=abc"], "seed must be an integer"),
    (["batch_size=0"], "batch_size must be >= 1"),
    (["method.alpha=abc"], "method.alpha must be a number, got 'abc'"),
    (["method.alpah=0.3"], "method.alpah is not an option of NovaConfig (did you mean 'alpha'?)"),
    (["method.r_max=1.5"], "[0, 1]"),
    (["method.alpha=-1"], "nova.alpha must be > 0 (Eq. 10"),
    (["stage=scor"], "stage must be"),
    (["shard.index=3", "shard.count=2"], "shard.index must be < shard.count"),
    (["device=tpu"], "device must be"),
    (["method=skipvar", "model=hart_tiny_random"], "supports backbone families infinity"),
    (["results_root=/dev/null/results"], "Not a directory: /dev/null"),
]


QUICK = {"method=nova_typo", "bench.limit=0", "method.alpha=abc", "batch_size=0"}


@pytest.mark.parametrize("args,phrase", [pytest.param(a, p, marks=() if " ".join(a) in QUICK else pytest.mark.slow)
                                         for a, p in BAD], ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(args, phrase, tmp_path):
    if "model=hart_tiny_random" in args and not (REPO / "conf/model/hart_tiny_random.yaml").exists():
        pytest.skip("no HART model config yet")
    res = tmp_path / "res"
    (res / "runs/x").mkdir(parents=True)
    (res / "runs/x/keep.txt").write_text("previous results")
    before = tree_hash(res)
    r = run_py(*args, "progress=false", env={"VARBENCH_RESULTS": str(res)}, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert phrase in lines[0], lines[0]
    assert tree_hash(res) == before
    assert not any(p.is_dir() and not any(p.iterdir()) for p in res.rglob("*")), "an empty run folder was left"


def test_score_dir_paths_with_equals_signs_are_quoted_for_hydra(tmp_path):
    from varbench.harness.cli import quote_paths

    assert quote_paths(["score_dir=results/runs/tiny/smoke/nova/bench.limit=2", "seed=1"]) == [
        "score_dir='results/runs/tiny/smoke/nova/bench.limit=2'", "seed=1"]


@pytest.mark.slow
def test_score_dir_that_is_empty_is_refused_and_not_written_to(tmp_path):
    empty = tmp_path / "empty=folder"
    empty.mkdir()
    r = run_py("stage=score", f"score_dir={empty}", "bench=shapes", env={"VARBENCH_RESULTS": str(tmp_path / "r")})
    assert r.returncode == 2 and "holds no .png/.jpg images" in r.stderr
    assert list(empty.iterdir()) == []
