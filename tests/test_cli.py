"""The command line as a user meets it: default job, resume, clear one-line errors."""
import os
import subprocess
import sys
import time

from conftest import REPO


def run_py(*args, env=None, timeout=300):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=e)


def test_default_job_writes_images_and_resumes(tmp_path):
    env = {"VARBENCH_RESULTS": str(tmp_path)}
    r = run_py("method=none", "bench.limit=2", "progress=false", env=env)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "runs/tiny/smoke/none/bench.limit=2"  # named by overrides (progress excluded), not the clock
    imgs = sorted((run_dir / "images").glob("*.png"))
    assert len(imgs) == 2 and str(run_dir / "images") in r.stdout
    meta = (run_dir / "meta.json").read_text()
    assert '"git_sha"' in meta and '"versions"' in meta and '"config"' in meta
    # a half-written image (killed run) is regenerated, a finished one is reused
    imgs[1].write_bytes(imgs[1].read_bytes()[:100])
    r2 = run_py("method=none", "bench.limit=2", "progress=false", env=env)
    assert r2.returncode == 0, r2.stderr
    assert "1 generated, 1 reused" in r2.stdout
    from PIL import Image

    Image.open(imgs[1]).load()


def test_missing_weights_fail_fast_with_one_line(tmp_path):
    t0 = time.time()
    r = run_py("model=infinity_2b", env={"VARBENCH_WEIGHTS": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hf"),
                                         "HF_HUB_OFFLINE": "1", "VARBENCH_RESULTS": str(tmp_path / "res")})
    assert time.time() - t0 < 10
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "infinity_2b_reg.pth" in lines[0] and "infinity_vae_d32reg.pth" in lines[0] and str(tmp_path) in lines[0]
    assert "huggingface.co/FoundationVision/Infinity" in lines[0]


def test_unknown_names_and_bad_values_are_clear(tmp_path):
    env = {"VARBENCH_RESULTS": str(tmp_path)}
    r = run_py("method=nova_typo", env=env)
    assert r.returncode != 0 and "method/nova_typo" in r.stderr and "Available options" in r.stderr
    r = run_py("dtype=fp8", env=env)
    assert r.returncode == 2 and "dtype must be" in r.stderr and "Traceback" not in r.stderr
