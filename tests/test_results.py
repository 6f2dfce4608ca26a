"""Scoring pieces: FLOPs, fidelity, the results store and tables, and the default job end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO


def test_flops_by_hand():
    from varbench.backbones.base import BackboneSpec
    from varbench.flops import generation_flops

    C, hid, V = 4, 8, 2
    rec = {"scale_hw": [(1, 1), (1, 2)], "tokens": [[1], [1]], "kv_len": [[1], [2]], "rows": [2, 2], "text_len": [3],
           "batch": 1}
    # scale 0: K=1, Lk=1: 8C²+4·1·C+4C²+4·3·C+4C·hid = 128+16+64+48+128 = 384; head 1·2·C·V = 16 -> (384+16)·2 rows
    # scale 1: K=1 (of 2), Lk=2: 128+32+64+48+128 = 400; head 2·2·4·2 = 32 -> (400+32)·2
    spec = BackboneSpec("t", 1, C, 1, "categorical", V, ("sa", "ca", "ffn"), mlp_hidden=hid)
    assert generation_flops(rec, spec) == (400 + 432) * 2
    # a sparse kernel's reported keys replace the cache length (scale 1 attends 1 key instead of 2: -4·C)
    assert generation_flops(rec | {"attn_keys": [[1.0], [1.0]]}, spec) == (400 - 16 + 432) * 2
    # SwiGLU FFN (3 matrices) and no cross-attention (HART): per token +2·C·hid, -(4C² + 4·T·C)
    hart = BackboneSpec("h", 1, C, 1, "categorical", V, ("sa", "ffn"), mlp_hidden=hid, mlp_mats=3, cross_attn=False)
    assert generation_flops(rec, hart) == (400 + 432 + 2 * (64 - 64 - 48)) * 2


def test_fidelity_identical_and_different():
    from varbench.results.fidelity import psnr_ssim

    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 32, 32, generator=g)
    p, s = psnr_ssim(a, a.clone())
    assert p == float("inf") and s == pytest.approx(1.0)
    b = (a + 0.1 * torch.randn(1, 3, 32, 32, generator=g)).clamp(0, 1)
    p2, s2 = psnr_ssim(b, a)
    assert 15 < p2 < 25 and s2 < 0.95


def test_store_dedupes_and_table_shows_missing_as_dash(tmp_path):
    from varbench.results import store, tables

    base = {"model": "tiny", "bench": "smoke", "overrides": "default", "n": 4, "git_sha": "x"}
    store.append_rows(tmp_path, [base | {"run": "a", "method": "none", "metric": "latency_s", "value": 2.0},
                                 base | {"run": "b", "method": "nova", "metric": "latency_s", "value": 9.9},
                                 base | {"run": "b", "method": "nova", "metric": "latency_s", "value": 1.0},
                                 base | {"run": "b", "method": "nova", "metric": "speedup", "value": 2.0}])
    df = store.load(tmp_path)
    assert len(df) == 3  # the newest latency of run b replaces the older one
    md = tables.markdown(tables.wide(df, "tiny", "smoke"))
    lines = md.splitlines()
    assert lines[2].startswith("| tiny | smoke | none |") and "| — |" in lines[2]  # none has no speedup row
    assert "2.00×" in lines[3] and "1.000" in lines[3]


def _run(args, tmp_path):
    env = dict(os.environ, VARBENCH_RESULTS=str(tmp_path))
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow
def test_default_job_runs_nova_with_reference_and_prints_table(tmp_path):
    r = _run(["bench.limit=2", "progress=false"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "reference (method=none)" in r.stdout
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("| tiny")]
    assert [ln.split("|")[3].split()[0] for ln in table] == ["none", "nova"]
    run_dir = tmp_path / "runs/tiny/smoke/nova/default"     # bench.limit does not change images: same run
    m = json.loads((run_dir / "metrics.json").read_text())
    assert {"speedup", "flop_speedup", "psnr", "ssim", "latency_s", "activation_rate"} <= set(m)
    assert (run_dir / "entropy_activation.png").exists()
    rec = json.loads((run_dir / "records.jsonl").read_text().splitlines()[0])
    assert "t_star" in rec["method_summary"] and "ratios" in rec["method_summary"]


@pytest.mark.slow
def test_multirun_none_and_nova(tmp_path):
    r = _run(["-m", "method=none,nova", "bench.limit=1", "progress=false"], tmp_path)
    assert r.returncode == 0, r.stderr
    for m in ("none", "nova"):
        assert (tmp_path / f"runs/tiny/smoke/{m}/default/records.jsonl").exists()
    assert r.stdout.count("| tiny | smoke | nova |") == 1


@pytest.mark.slow
def test_bench_speed_prints_ratios_in_one_process():
    r = subprocess.run([sys.executable, "scripts/bench_speed.py", "--methods", "none,nova", "--prompts", "1",
                        "--repeats", "1", "--warmup", "0", "--set", "nova.t_star=6"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| n")]
    assert rows[0].startswith("| none |") and "1.00x | 1.00x" in rows[0] and rows[1].startswith("| nova |")
    assert "CPU" in r.stdout  # labelled when no GPU


def test_paper_tables_show_ours_beside_the_paper(tmp_path):
    from varbench.results import paper, store

    base = {"model": "infinity_2b", "method": "nova", "bench": "geneval", "overrides": "default", "n": 2212,
            "git_sha": "x", "run": "r"}
    store.append_rows(tmp_path, [base | {"metric": "geneval_overall", "value": 0.70}])
    t1 = paper.render(1, store.load(tmp_path))
    row = next(ln for ln in t1.splitlines() if ln.startswith("| infinity_2b | nova |"))
    assert "0.70 / 0.72 (-0.02)" in row and "— / 2.89" in row   # measured: with Δ; unmeasured: '—'
    for n in paper.TABLES:
        assert paper.render(n, None).count("| ") > 3


def test_wandb_mirror_logs_metrics_and_images(tmp_path, monkeypatch):
    import types

    from varbench.results.wandb_log import mirror

    calls = []
    run = types.SimpleNamespace(log=lambda d: calls.append(d), finish=lambda: calls.append("finish"))
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or run, Image=lambda p, caption: ("img", caption))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (tmp_path / "images").mkdir()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "00000.png")
    cfg = {"model": {"name": "tiny"}, "bench": {"name": "smoke"}, "method": {"name": "nova"}}
    mirror(cfg, tmp_path, {"speedup": (1.5, 4), "psnr": (None, 0)})
    assert calls[0]["name"].startswith("tiny/smoke/nova") and calls[1] == {"speedup": 1.5}
    assert calls[2]["samples"] == [("img", "00000.png")] and calls[-1] == "finish"


def test_a_model_specific_method_config_fills_the_papers_row_of_its_family(tmp_path):
    from varbench.results import paper, store

    base = {"model": "hart_0.7b", "bench": "geneval", "overrides": "default", "n": 4, "git_sha": "x"}
    store.append_rows(tmp_path, [base | {"run": "r1", "method": "fastvar_hart", "family": "fastvar",
                                         "metric": "geneval_overall", "value": 0.5}])
    t1 = paper.render(1, store.load(tmp_path))
    row = next(ln for ln in t1.splitlines() if ln.startswith("| hart_0.7b | fastvar |"))
    assert "0.50 / " in row


def test_make_tables_for_one_model_and_bench_with_string_columns(tmp_path):
    """rows carry note/device/family strings: make_tables --model/--bench crashed formatting them as numbers."""
    from varbench.results import store

    base = {"model": "tiny", "bench": "shapes", "overrides": "default", "n": 4, "git_sha": "x", "device": "cpu:x:2",
            "family": "sparsevar", "note": "reconstructed"}
    store.append_rows(tmp_path, [base | {"run": "a", "method": "sparsevar", "metric": m, "value": v}
                                 for m, v in (("shapes_overall", 0.3), ("speedup", 1.2), ("activation_rate", 0.5))])
    r = subprocess.run([sys.executable, "scripts/make_tables.py", "--results-root", str(tmp_path), "--model", "tiny",
                        "--bench", "shapes"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| tiny | shapes | sparsevar[1] | 4 | 0.300 |" in r.stdout and "[1] reconstructed" in r.stdout
