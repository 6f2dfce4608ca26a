"""Memory recorded for every image (varbench/records.py): KV-cache bytes per (scale, layer) and at peak, the bytes of
the tensors the loop holds (CPU) — exact figures from the tensors, checked against the arithmetic of the cache —, the
table columns, and the large-canvas schedules (our extrapolation beyond '1M')."""
import json

import pytest
import torch
from conftest import REPO

from varbench.backbones.infinity.schedules import get_schedule, rope_positions
from varbench.harness.registry import build_backbone, build_method
from varbench.hooks import Method
from varbench.loop import generate
from varbench.records import tensor_bytes
from varbench.results.speed import memory_metrics


def _model(pn=None):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/tiny_random.yaml"), resolve=True)
    if pn:
        cfg["schedule"] = {"h_div_w": 1.0, "pn": pn}
    return build_backbone(cfg, "cpu", "fp32")


@pytest.fixture(scope="module")
def bb():
    return _model()


def _gen(bb, m):
    return generate(bb, ["two green circles"], m, torch.Generator().manual_seed(0))


def _per_key(bb, rows=2):
    """Bytes one cached key costs in one layer: keys and values, every row, fp32."""
    return rows * bb.spec.embed_dim * 2 * 4


def test_kv_bytes_are_the_cache_arithmetic(bb):
    rec = _gen(bb, Method()).record
    D, per = bb.spec.depth, _per_key(bb)
    total = sum(h * w for h, w in rec.scale_hw)
    for si in range(len(rec.scale_hw)):
        assert rec.kv_kept[si] == rec.kv_len[si]                          # nothing compressed
        assert rec.kv_bytes[si] == [L * per for L in rec.kv_len[si]]
    assert rec.kv_peak_bytes == D * total * per                          # every layer full after the last scale
    assert rec.peak_memory_kind == "cpu_loop_tensors" and rec.peak_memory_bytes == rec.loop_peak_bytes
    # the loop also holds the conditioning, the accumulated codes and the last scale's hidden states
    last_n = rec.scale_hw[-1][0] * rec.scale_hw[-1][1]
    assert rec.loop_peak_bytes >= rec.kv_peak_bytes + 2 * last_n * bb.spec.embed_dim * 4
    assert rec.rss_peak_bytes > rec.loop_peak_bytes


def test_tensor_bytes_counts_each_buffer_once():
    a = torch.zeros(10, 4)
    assert tensor_bytes(a, [a, {"x": a}]) == 160
    assert tensor_bytes(a, torch.zeros(3, dtype=torch.float16)) == 166


def test_scalekv_holds_well_under_half_of_the_cache(bb):
    none, skv = _gen(bb, Method()).record, _gen(bb, build_method({"name": "scalekv"})).record
    per = _per_key(bb)
    assert skv.kv_peak_bytes < 0.5 * none.kv_peak_bytes
    assert skv.loop_peak_bytes < none.loop_peak_bytes
    for si in range(len(skv.scale_hw)):
        assert skv.kv_bytes[si] == [L * per for L in skv.kv_kept[si]]
    # the peak: earlier layers' kept caches + this layer's full one + later layers' previous ones, at some layer
    D, S = bb.spec.depth, len(skv.scale_hw)
    cand = []
    for si in range(S):
        prev = skv.kv_kept[si - 1] if si else [0] * D
        for li in range(D):
            cand.append(sum(skv.kv_kept[si][:li]) + skv.kv_len[si][li] + sum(prev[li + 1:]))
    assert skv.kv_peak_bytes == max(cand) * per


def test_memory_columns_in_metrics_and_tables():
    recs = [{"kv_peak_bytes": 3 * 2**20, "peak_memory_bytes": 5 * 2**20},
            {"kv_peak_bytes": 2**20, "peak_memory_bytes": 9 * 2**20}]
    assert memory_metrics(recs) == {"kv_mb": (3.0, 2), "peak_mb": (9.0, 2)}
    assert memory_metrics([{"peak_memory_bytes": 7}]) == {}     # an old record: no kv_peak_bytes, CPU RSS peak
    from varbench.results.tables import SPEED_COLUMNS

    heads = [h for _, h, _ in SPEED_COLUMNS]
    assert "KV MB↓" in heads and "peak MB↓" in heads
    import pandas as pd

    from varbench.results.tables import bench_columns, markdown

    w = pd.DataFrame([{"model": "m", "bench": "b", "method": "none", "n": 2, "speedup": 1.0, "peak_mb": 9.0,
                       "kv_mb": 3.0, "peak_mem_gb": 9 / 1024}])
    quality, extra = bench_columns(w)
    md = markdown(w, extra=extra, quality=quality)
    assert "peak MB↓" in md and "| 9.0 |" in md and "peak_mem_gb" not in md    # one memory peak, in one unit


def test_large_canvas_schedules_extend_the_official_table():
    one = get_schedule(1.0, "1M")
    two, four = get_schedule(1.0, "2M"), get_schedule(1.0, "4M")
    assert two.hws[:13] == one.hws and two.hws[13] == (90, 90)
    assert four.hws[:14] == two.hws and four.hws[14] == (128, 128)
    assert two.rope_grid == (64, 64) and int(rope_positions(two)[-1].max()) == 63   # positions stay in range
    assert get_schedule(0.8, "2M").hws[-1] == (80, 98)


def test_large_canvas_none_grows_scalekv_stays_bounded(tmp_path):
    """tiny_random at '2M' (14 scales, 18 621 tokens): none holds every key of every layer; ScaleKV with a budget
    file keeps at most its budget per layer after every scale, so its peak is the kept caches + one layer's last
    scale — growing by that scale only."""
    from test_scalekv import BUDGET_4, write_budget

    bb = _model("2M")
    D, per = bb.spec.depth, _per_key(bb)
    assert [s.h for s in bb.scales()][-2:] == [64, 90]
    none = _gen(bb, Method()).record
    assert none.kv_peak_bytes == D * 18621 * per
    p = write_budget(tmp_path / "b.json", D, BUDGET_4)
    skv = _gen(bb, build_method({"name": "scalekv", "budget_file": p})).record
    cap = max(mx for mx, _ in BUDGET_4.values())
    assert all(L <= max(cap, 650) for row in skv.kv_kept for L in row)
    assert skv.kv_peak_bytes <= ((D - 1) * cap + cap + 90 * 90) * per < 0.3 * none.kv_peak_bytes
    print(json.dumps({"none_kv_mb": none.kv_peak_bytes / 2**20, "scalekv_kv_mb": skv.kv_peak_bytes / 2**20}))
