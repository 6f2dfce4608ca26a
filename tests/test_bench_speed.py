"""scripts/bench_speed.py (issue 16): functional checks on tiny_random — the table, its spread columns, the profile,
one-line name errors before any model loads, the flash-attn stand-ins and the profiler ranges. No timed assertions."""
import importlib.util
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location("bench_speed", REPO / "scripts/bench_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "scripts/bench_speed.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_table_with_spread_columns_and_profile():
    r = _run("--model", "tiny_random", "--methods", "none,nova", "--prompts", "1", "--repeats", "2", "--warmup", "0",
             "--set", "nova.t_star=6", "--profile", "--threads", "1")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    head = next(ln for ln in out.splitlines() if ln.startswith("| run | min (s)"))
    for col in ("min (s)", "median (s)", "max (s)", "spread", "speedup vs none (median)", "speedup (min)",
                "FLOP-ideal speedup", "realized / ideal"):
        assert col in head
    rows = [ln for ln in out.splitlines() if ln.startswith(("| none |", "| nova |"))]
    assert len(rows) == 4  # timing table + profile table, one row each
    assert rows[0].startswith("| none |") and "1.00x | 1.00x | 1.00x | 100%" in rows[0]
    assert "CPU" in out and "round-robin" in out and "1 threads" in out
    prof_head = next(ln for ln in out.splitlines() if ln.startswith("| run | loop (s)"))
    for part in ("blocks", "attention", "kv_cache", "head", "sampling", "bookkeeping"):
        assert part in prof_head
    nova_prof = rows[3].split("|")
    shares = [float(c.strip().rstrip("%")) for c in nova_prof[3:-1]]
    assert shares[0] > 0 and shares[1] > 0  # blocks and attention were seen by the profiler


@pytest.mark.parametrize("args,needle", [
    (["--methods", "none,novaa"], "unknown method 'novaa' (did you mean 'nova'?)"),
    (["--model", "tiny_randm"], "unknown model 'tiny_randm' (did you mean 'tiny_random'?)"),
    (["--official", "/nonexistent/Infinity"], "not a FoundationVision/Infinity checkout"),
    (["--pin", "a-b"], "--pin must list CPUs"),
    (["--set", "t_star=6"], "--set wants"),
    (["--json", "/nonexistent/dir/speed.json"], "--json /nonexistent/dir/speed.json: folder"),
])
def test_bad_input_is_one_line_before_any_model_loads(args, needle, monkeypatch, capsys):
    r = _run(*args, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    # in process: the error comes before the backbone is built (a build would raise something else)
    mod = _script()
    import varbench.harness.registry as reg

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the name check")

    monkeypatch.setattr(reg, "build_backbone", boom)
    with pytest.raises(mod.UserError, match="unknown|checkout|--pin|--set|--json"):
        mod.main(args)


def test_sdpa_standins_match_per_sequence_attention():
    from varbench.harness.official import sdpa_flash_attn_func, sdpa_flash_attn_varlen_kvpacked_func

    g = torch.Generator().manual_seed(0)
    H, c, lq, lk = 2, 8, [3, 5], [4, 2]
    q = torch.randn(sum(lq), H, c, generator=g)
    kv = torch.randn(sum(lk), 2, H, c, generator=g)
    cu_q = torch.tensor([0, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6], dtype=torch.int32)
    out = sdpa_flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max(lq), max(lk), softmax_scale=0.3)
    assert out.shape == q.shape
    ref, qs, ks = [], 0, 0
    for a, b in zip(lq, lk):
        qq, kk, vv = q[qs:qs + a], kv[ks:ks + b, 0], kv[ks:ks + b, 1]
        ref.append(F.scaled_dot_product_attention(qq.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1),
                                                  scale=0.3).transpose(0, 1))
        qs, ks = qs + a, ks + b
    torch.testing.assert_close(out, torch.cat(ref), rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 5, H, c, generator=g)
    y = sdpa_flash_attn_func(x, x, x, softmax_scale=0.5)
    ref = F.scaled_dot_product_attention(*(x.transpose(1, 2),) * 3, scale=0.5).transpose(1, 2)
    torch.testing.assert_close(y, ref)


def test_standins_only_for_missing_modules(monkeypatch):
    from varbench.harness import official

    fake = types.ModuleType("flash_attn")
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setitem(sys.modules, "pytz", types.ModuleType("pytz"))
    assert official.install_standins() == []  # installed (here: present in sys.modules) -> left alone
    assert sys.modules["flash_attn"] is fake
    monkeypatch.delitem(sys.modules, "flash_attn")
    monkeypatch.setattr(official, "_has", lambda m: m != "flash_attn")
    got = official.install_standins()
    assert len(got) == 1 and got[0].startswith("flash_attn")
    m = sys.modules["flash_attn"]
    assert m.flash_attn_func is official.sdpa_flash_attn_func
    assert m.flash_attn_varlen_kvpacked_func is official.sdpa_flash_attn_varlen_kvpacked_func


def test_profiling_ranges_off_by_default_and_breakdown_is_exclusive():
    from varbench import profiling

    assert profiling.enabled() is False
    assert profiling.prange("vb.attention") is profiling.prange("vb.head")  # one shared no-op, nothing recorded

    def ev(name, s, e):
        return types.SimpleNamespace(name=name, time_range=types.SimpleNamespace(start=s, end=e))

    events = [ev("vb.block.sa", 0, 100), ev("vb.attention", 10, 40), ev("vb.kv_cache", 5, 10),
              ev("vb.block.ffn", 100, 150), ev("vb.method.after_layer", 150, 170), ev("vb.head", 155, 165),
              ev("aten::mm", 0, 50)]
    b = profiling.breakdown(events)
    assert b["blocks"] == pytest.approx((100 - 30 - 5 + 50) * 1e-6)
    assert b["attention"] == pytest.approx(30e-6) and b["kv_cache"] == pytest.approx(5e-6)
    assert b["bookkeeping"] == pytest.approx(10e-6) and b["head"] == pytest.approx(10e-6)
    assert b["sampling"] == 0.0


def test_static_kv_cache_equals_concatenation_and_falls_back_when_full():
    from varbench.kvcache import KVCache

    g = torch.Generator().manual_seed(0)
    parts = [(torch.randn(2, 2, n, 4, generator=g), torch.randn(2, 2, n, 4, generator=g)) for n in (1, 4, 16)]
    static, grown = KVCache(capacity=21), KVCache()
    for k, v in parts:
        ks, vs = static.append(k, v)
        kg, vg = grown.append(k, v)
        assert torch.equal(ks, kg) and torch.equal(vs, vg) and static.length == grown.length
    assert static._kb is not None and static.k.data_ptr() == static._kb.data_ptr()  # views of one buffer
    static.keep_rows(1)
    k, v = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 2, 3, 4, generator=g)
    ks, _ = static.append(k, v)  # 21 + 3 > capacity: concatenation
    assert ks.shape == (1, 2, 24, 4) and torch.equal(ks[:, :, -3:], k) and torch.equal(ks[:, :, :21], grown.k[:1])


@pytest.mark.slow
def test_compile_rows_beside_eager_rows():
    """--compile times each of our runs a second time with compile=true on the same weights, in the same rounds."""
    r = _run("--model", "tiny_random", "--methods", "none,nova", "--prompts", "1", "--repeats", "1", "--warmup", "1",
             "--set", "nova.t_star=6", "--threads", "1", "--compile")
    assert r.returncode == 0, r.stderr
    rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines() if line.startswith("| ")}
    assert {"none", "nova", "none+compile", "nova+compile"} <= set(rows)
    assert "| 1.00x |" in rows["none+compile"]          # its speedup divides none+compile, not eager none
    assert "ours eager and with compile=true" in r.stdout.splitlines()[0]


def test_compile_on_a_backbone_without_it_is_one_line_before_any_model_loads(monkeypatch):
    r = _run("--model", "hart_tiny_random", "--methods", "none", "--compile", timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "compile=true is implemented for Infinity backbones" in lines[0], r.stderr
    mod = _script()
    import varbench.harness.registry as reg
    import varbench.harness.runner  # noqa: F401  (main imports it: bind the real build_backbone before the patch)

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the compile check")

    monkeypatch.setattr(reg, "build_backbone", boom)
    torch.set_num_threads(2)
    with pytest.raises(mod.UserError, match="compile=true is implemented"):
        mod.main(["--model", "hart_tiny_random", "--methods", "none", "--compile"])
    # its thread rule (1 on the CPU) does not leak into the caller (the golden fixtures after it need 2 threads)
    assert torch.get_num_threads() == 2


def test_json_holds_every_figure_of_the_table(tmp_path):
    """--json (scripts/gpu_check.py reads it): the setup and, per run, what the table prints."""
    import json

    out = tmp_path / "speed.json"
    r = _run("--model", "tiny_random", "--methods", "none,nova", "--prompts", "1", "--repeats", "2", "--warmup", "0",
             "--set", "nova.t_star=6", "--threads", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["model"] == "tiny_random" and d["dtype"] == "fp32" and d["device_kind"] == "cpu" and d["repeats"] == 2
    assert d["torch"] == torch.__version__ and d["sets"] == ["nova.t_star=6"] and d["build_s"] > 0
    rows = {row["run"]: row for row in d["rows"]}
    assert list(rows) == ["none", "nova"]
    for name, row in rows.items():
        assert len(row["rounds_s"]) == 2 and row["min_s"] == min(row["rounds_s"]) and row["max_s"] == max(row["rounds_s"])
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[2] == f"{row['median_s']:.3f}" and cells[5] == f"{row['speedup_median']:.2f}x"
        assert cells[7] == f"{row['flop_ideal_speedup']:.2f}x" and cells[8] == f"{row['realized_over_ideal']:.0%}"
        assert row["over_official_median"] is None and row["peak_memory_bytes"] is None   # no official; CPU
    assert rows["nova"]["flop_ideal_speedup"] > 1.0 and "model built in" in r.stdout
