"""Run directories: torn JSONL lines, identity checks on resume, one writer per shard, kill -9 in the middle."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from varbench.errors import UserError
from varbench.harness.rundir import RunDir, Shard, identity, run_id
from varbench.io import append_jsonl, read_jsonl


def test_torn_last_line_loses_nothing(tmp_path):
    p = tmp_path / "records.jsonl"
    append_jsonl(p, [{"index": 0}])
    with open(p, "a") as f:
        f.write('{"index": 1, "prompt": "a re')          # a writer killed mid-line
    append_jsonl(p, [{"index": 2}])
    append_jsonl(p, [{"index": 3}])
    assert [r["index"] for r in read_jsonl(p)] == [0, 2, 3]   # the old code glued index 2 onto the torn line


def test_store_rows_survive_a_torn_line(tmp_path):
    from varbench.results import store

    base = {"model": "m", "bench": "b", "method": "x", "overrides": "d", "run": "r", "n": 1}
    store.append_rows(tmp_path, [base | {"metric": "a", "value": 1.0}])
    with open(store.rows_path(tmp_path), "a") as f:
        f.write('{"run": "r", "metric": "b", "val')
    store.append_rows(tmp_path, [base | {"metric": "c", "value": 3.0}])
    assert sorted(store.load(tmp_path)["metric"]) == ["a", "c"]


def _ident(**kw):
    cfg = {"model": {"name": "tiny"}, "method": {"name": "none"}, "bench": {"name": "smoke", "limit": 2}, "seed": 0,
           "batch_size": 1, "stage": "all"} | kw
    return identity(cfg, "cpu", "fp32", 1)


def test_identity_ignores_what_does_not_change_images_and_catches_what_does():
    assert run_id(_ident()) == run_id(_ident(stage="score", progress=False))
    assert run_id(_ident()) == run_id(_ident(bench={"name": "smoke", "limit": 9}))
    assert run_id(_ident()) != run_id(_ident(batch_size=2))
    assert run_id(identity(_ident_cfg(), "cpu", "fp32", 1)) != run_id(identity(_ident_cfg(), "cpu", "fp32", 2))


def _ident_cfg():
    return {"model": {"name": "tiny"}, "method": {"name": "none"}, "bench": {"name": "smoke"}}


def test_resuming_with_other_settings_stops_with_one_line(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.open(_ident(), {"git_sha": "a"})
    rd.unlock()
    with pytest.raises(UserError, match=r"was made with other settings \(batch_size: 1 -> 2\)"):
        RunDir(tmp_path / "run").open(_ident(batch_size=2), {"git_sha": "a"})
    meta = json.loads((tmp_path / "run/meta.json").read_text())
    assert meta["identity"]["batch_size"] == 1        # nothing overwritten


def test_a_second_writer_on_the_same_shard_is_refused(tmp_path):
    a = RunDir(tmp_path / "run", Shard(0, 2))
    a.open(_ident(), {})
    with pytest.raises(UserError, match=r"is being written by pid \d+"):
        RunDir(tmp_path / "run", Shard(0, 2)).open(_ident(), {})
    RunDir(tmp_path / "run", Shard(1, 2)).open(_ident(), {})    # another shard is fine
    a.unlock()
    RunDir(tmp_path / "run", Shard(0, 2)).open(_ident(), {})    # released: fine again


def test_a_shard_starting_while_another_writes_meta_is_not_refused(tmp_path):
    """Two workers of one run (torchrun / SLURM array): while shard 1 writes meta.json (its lock taken, the atomic
    write's temp file present, meta.json not yet renamed into place) shard 0 starts. It must not take the folder for a
    foreign one (CI saw this race once: "is not empty and holds no varbench run")."""
    d = tmp_path / "run"
    d.mkdir()
    (d / ".lock.shard1of2").write_text("pid 1")
    (d / f".meta.json.{os.getpid() + 1}.tmp").write_text('{"identity": {}')     # half-written by the other worker
    rd = RunDir(d, Shard(0, 2))
    rd.open(_ident(), {})
    rd.unlock()
    assert json.loads((d / "meta.json").read_text())["run_id"] == run_id(_ident())
    (d / "notes.txt").write_text("mine")                                          # a user's file: still refused
    (d / "meta.json").unlink()
    with pytest.raises(UserError, match="holds no varbench run"):
        RunDir(d, Shard(0, 2)).open(_ident(), {})


def _run(args, env_root, **kw):
    env = dict(os.environ, VARBENCH_RESULTS=str(env_root))
    return subprocess.Popen([sys.executable, "run.py", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kw)


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_every_image_and_record_once(tmp_path):
    """Kill -9 a run several times (one kill lands mid-way through records.jsonl's last line), then resume."""
    args = ["model=tiny_random", "method=none", "bench=shapes", "bench.limit=6", "progress=false", "warmup=0",
            "stage=generate"]
    run_dir = tmp_path / "runs/tiny_random/shapes/none/default"
    for delay in (4.0, 7.0):
        p = _run(args, tmp_path)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
    recs = run_dir / "records.jsonl"
    if recs.exists():
        with open(recs, "a") as f:                  # what a kill in the middle of a write leaves behind
            f.write('{"index": 5, "prompt": "tor')
    r = _run(args, tmp_path)
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    lines = [json.loads(x) for x in recs.read_text().splitlines() if x.startswith("{") and x.endswith("}")]
    idx = [r["index"] for r in lines]
    assert sorted(set(idx)) == list(range(6))
    assert len(idx) == len(set(idx)), "an image was generated twice"
    imgs = sorted((run_dir / "images").rglob("*.png"))
    assert len(imgs) == 6
    r = _run(["model=tiny_random", "method=none", "bench=shapes", "bench.limit=6", "progress=false", "stage=score"],
             tmp_path)
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["latency_s"]["n"] == 6


def test_reference_dir_comes_from_the_runs_identity_not_from_the_folder(tmp_path):
    """hydra.run.dir=/some/dir/run1 used to put the reference at /some/none/run1; and a comma in an override
    (method.fixed_ratios={32:0.4,40:0.5}) broke the folder-name parsing."""
    from varbench.harness.config import RunConfig
    from varbench.harness.runner import run_paths

    cfg = {"results_root": str(tmp_path / "res"), "model": {"name": "tiny"}, "bench": {"name": "smoke"},
           "method": {"name": "nova"}, "run_dir": str(tmp_path / "some/dir/run1")}
    main, ref = run_paths(RunConfig.from_dict(cfg), ["method.fixed_ratios={32:0.4,40:0.5}", "seed=3", "method.scale_linkage=false"])
    assert main == tmp_path / "some/dir/run1"
    assert ref == tmp_path / "res/runs/tiny/smoke/none/seed=3"
    main2, ref2 = run_paths(RunConfig.from_dict(cfg | {"run_dir": None}), ["seed=3", "method.fixed_ratios={32:0.4,40:0.5}"])
    assert ref2 == ref and main2.parent == tmp_path / "res/runs/tiny/smoke/nova"
    assert "fixed_ratios" in main2.name and "seed=3" in main2.name


def test_score_cache_survives_a_torn_line(tmp_path):
    """The scorers' per-image cache appended without closing a torn line (the next entry was lost)."""
    from eval.cache import ScoreCache

    img = tmp_path / "a.png"
    img.write_bytes(b"x")
    img2 = tmp_path / "b.png"
    img2.write_bytes(b"y")
    c = ScoreCache(tmp_path / "cache.jsonl", tmp_path)
    c.put(img, 1.0)
    with open(tmp_path / "cache.jsonl", "a") as f:
        f.write('{"key": "torn')
    ScoreCache(tmp_path / "cache.jsonl", tmp_path).put(img2, 2.0)
    again = ScoreCache(tmp_path / "cache.jsonl", tmp_path)
    assert again.get(img) == 1.0 and again.get(img2) == 2.0
