"""A researcher's first week (issue 24): parallel sweeps that share the reference, re-scoring part of a run, PSNR
that means what it says, damaged or foreign run folders. Each test failed on the code before the fix."""
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO
from test_cli import run_py, tree_hash

SHAPES = ["model=tiny", "bench=shapes", "bench.limit=4", "progress=false", "warmup=0"]


def _env(root):
    return {"VARBENCH_RESULTS": str(root)}


def _images(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((run_dir / "images").rglob("*.png"))}


def _records(run_dir) -> list[dict]:
    return [json.loads(ln) for p in sorted(run_dir.glob("records*.jsonl")) for ln in p.read_text().splitlines()]


@pytest.mark.slow
def test_parallel_runs_share_the_reference_and_equal_sequential_runs(tmp_path):
    """Two plain processes and a submitit_local sweep over three methods at once: every job succeeds, the shared
    reference is generated once, and every image equals the sequential run's (before: all but one job stopped on
    the reference's lock, exit 2)."""
    seq, par, sub = tmp_path / "seq", tmp_path / "par", tmp_path / "sub"
    r = run_py("-m", "method=nova,fastvar,skipvar", *SHAPES, env=_env(seq), timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    env = os.environ | _env(par)
    procs = [subprocess.Popen([sys.executable, "run.py", f"method={m}", *SHAPES], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in ("nova", "fastvar")]
    outs = [p.communicate(timeout=1200) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    r = run_py("-m", "hydra/launcher=submitit_local", "method=nova,fastvar,skipvar", *SHAPES, env=_env(sub),
               timeout=1500)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = seq / "runs/tiny/shapes"
    for root, methods in ((par, ("nova", "fastvar", "none")), (sub, ("nova", "fastvar", "skipvar", "none"))):
        for m in methods:
            d = root / "runs/tiny/shapes" / m / "default"
            assert (d / "metrics.json").exists(), f"{root.name}: {m} was not scored"
            assert _images(d) == _images(runs / m / "default"), f"{root.name}: {m} differs from the sequential run"
        ref = [r["index"] for r in _records(root / "runs/tiny/shapes/none/default")]
        assert sorted(ref) == [0, 1, 2, 3], f"{root.name}: reference generated more than once: {ref}"


@pytest.mark.slow
def test_a_limited_rescore_scores_exactly_its_items_and_keeps_the_full_row(tmp_path):
    from eval.shapes.scorer import run as shapes_run
    from varbench.results import store, tables

    r = run_py("method=nova", *SHAPES, env=_env(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = tmp_path / "runs/tiny/shapes/nova/default"
    full = (run_dir / "metrics.json").read_text()
    r = run_py("method=nova", *[a for a in SHAPES if not a.startswith("bench.limit")], "bench.limit=2",
               "stage=score", env=_env(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run_dir / "metrics.json").read_text() == full, "the full run's scores were replaced"
    sub = [json.loads(p.read_text()) for p in run_dir.glob("scores.2-*/metrics.json")]
    assert len(sub) == 1, sub
    assert {sub[0][k]["n"] for k in ("latency_s", "speedup", "psnr", "ssim", "shapes_overall")} == {2}, sub
    # the limited shapes score is the score of those two images alone
    two = tmp_path / "two"
    for k in ("00000", "00001"):
        (two / k / "samples").mkdir(parents=True)
        (two / k / "samples/00000.png").write_bytes((run_dir / "images" / k / "samples/00000.png").read_bytes())
        (two / k / "metadata.jsonl").write_text((run_dir / "images" / k / "metadata.jsonl").read_text())
    (tmp_path / "out_two").mkdir()
    alone = shapes_run({"name": "shapes"}, two, tmp_path / "out_two", "cpu")
    assert sub[0]["shapes_overall"]["value"] == pytest.approx(alone["shapes_overall"])
    w = tables.wide(store.load(tmp_path), "tiny", "shapes")
    row = w[w.method == "nova"].iloc[0]
    assert row["images"] == 4 and row["latency_s"] == pytest.approx(json.loads(full)["latency_s"]["value"])


@pytest.mark.slow
def test_psnr_is_from_the_mean_mse_with_the_identical_share_beside_it(tmp_path):
    """The default job: PSNR = 10·log10(1 / mean MSE) recomputed from the saved images and references (before: a
    mean of per-image PSNRs with identical images counted as 100 dB)."""
    from varbench.results.fidelity import load_rgb

    r = run_py(env=_env(tmp_path) | {"VARBENCH_RESULTS": str(tmp_path)}, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    nova, none = tmp_path / "runs/tiny/smoke/nova/default", tmp_path / "runs/tiny/smoke/none/default"
    mses = []
    for p in sorted((nova / "images").glob("*.png")):
        a, b = load_rgb(p), load_rgb(none / "images" / p.name)
        mses.append(float(((a - b) ** 2).mean()))
    m = json.loads((nova / "metrics.json").read_text())
    mean = sum(mses) / len(mses)
    assert m["psnr"]["value"] == pytest.approx(10 * math.log10(1 / mean), abs=1e-6)
    assert m["identical_frac"]["value"] == pytest.approx(sum(x == 0 for x in mses) / len(mses))
    per = [json.loads(ln) for ln in (nova / "fidelity.jsonl").read_text().splitlines()]
    assert [x["mse"] for x in per] == pytest.approx(mses)
    assert f"| {m['psnr']['value']:.2f} |" in r.stdout


@pytest.mark.slow
def test_a_damaged_meta_json_stops_in_one_line_and_loses_nothing(tmp_path):
    r = run_py("method=nova", "bench.limit=1", "progress=false", env=_env(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = tmp_path / "runs/tiny/smoke/nova/default"
    meta = run_dir / "meta.json"
    meta.write_text(meta.read_text()[:40])
    before = tree_hash(tmp_path)
    for args in (["method=fastvar", f"run_dir={run_dir}"], ["method=nova", "stage=score"]):
        r = run_py(*args, "bench.limit=1", "progress=false", env=_env(tmp_path))
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
        assert "meta.json is damaged or foreign" in lines[0] and str(meta) in lines[0]
        assert tree_hash(tmp_path) == before


def test_run_dir_into_a_folder_that_is_not_a_run_is_refused(tmp_path):
    mine = tmp_path / "my_folder"
    (mine / "images").mkdir(parents=True)
    (mine / "images/00000.png").write_bytes(b"my own file")
    r = run_py("method=none", "bench.limit=1", "progress=false", f"run_dir={mine}",
               env=_env(tmp_path / "res"), timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "holds no varbench run" in lines[0]
    assert (mine / "images/00000.png").read_bytes() == b"my own file"
    assert sorted(p.name for p in mine.rglob("*")) == ["00000.png", "images"]


def test_scorer_files_are_checked_before_the_first_image(tmp_path):
    """bench=geneval with its prompt files but without the detector: one line naming the file, and no image was
    generated (before: every image was generated, then scoring stopped on the missing Mask2Former file)."""
    data = tmp_path / "data/geneval"
    data.mkdir(parents=True)
    (data / "evaluation_metadata.jsonl").write_text('{"prompt": "a red circle", "tag": "single_object"}\n')
    (data / "object_names.txt").write_text("person\n")
    env = {"VARBENCH_RESULTS": str(tmp_path / "res"), "VARBENCH_DATA": str(tmp_path / "data"),
           "VARBENCH_WEIGHTS": str(tmp_path / "w"), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")}
    r = run_py("bench=geneval", "bench.images_per_prompt=1", "progress=false", env=env, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth" in lines[0]
    assert not (tmp_path / "res").exists() or not list((tmp_path / "res").rglob("*.jpg"))


def test_a_code_change_stops_the_resume_in_one_line(tmp_path):
    """The fingerprint of the image-making code is checked on resume: a changed file stops the run naming it;
    code_change=keep goes on and records the new fingerprint; docs do not count."""
    from varbench.errors import UserError
    from varbench.harness.rundir import RunDir, code_fingerprint

    src = tmp_path / "pkg"
    src.mkdir()
    (src / "method.py").write_text("x = 1\n")
    (src / "README.md").write_text("docs\n")
    fp1 = code_fingerprint([src])
    (src / "README.md").write_text("docs, edited\n")
    assert code_fingerprint([src]) == fp1, "a docs edit changed the fingerprint"
    rd = RunDir(tmp_path / "run")
    ident = {"seed": 0}
    rd.open(ident, {"code": fp1})
    rd.unlock()
    (src / "method.py").write_text("x = 2\n")
    fp2 = code_fingerprint([src])
    with pytest.raises(UserError, match=r"pkg/method.py changed.*code_change=keep.*run_tag"):
        rd.open(ident, {"code": fp2})
    rd.open(ident, {"code": fp2}, code_change="keep")
    rd.unlock()
    assert json.loads((tmp_path / "run/meta.json").read_text())["code"] == fp2


@pytest.mark.slow
def test_editing_an_installed_methods_code_stops_the_same_command(tmp_path):
    """End to end with a method outside the repository (the toy plug-in of test_add_a_method): after its module is
    edited, the same command stops in one line naming the file (before: "1 done", the old images were reused)."""
    import textwrap

    from test_add_a_method import TOY

    src, site = tmp_path / "src", tmp_path / "site"
    for rel, text in TOY.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(textwrap.dedent(text).lstrip())
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                        str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {"PYTHONPATH": str(site), "VARBENCH_RESULTS": str(tmp_path / "res")}
    args = ["method=every_other", "model=tiny_random", "bench.limit=1", "progress=false", "warmup=0", "reference=false"]
    assert run_py(*args, env=env).returncode == 0
    mod = site / "toy_every_other/__init__.py"
    mod.write_text(mod.read_text().replace("ratio: float = 0.5", "ratio: float = 0.5   # edited"))
    r = run_py(*args, env=env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "toy_every_other/__init__.py changed" in lines[0] and "code_change=keep" in lines[0]
    r = run_py(*args, "code_change=keep", env=env)
    assert r.returncode == 0 and "code_change=keep" in r.stderr
