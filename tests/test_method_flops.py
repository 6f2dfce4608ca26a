"""Method FLOPs (issue 25 item 6): the work a method spends on itself is reported per image in its summary
(``method_flops``), counted apart from the model's FLOPs (varbench/flops.py), and shown at run level as
``method_gflops`` and the FLOP-ideal speedup with it (``flop_speedup_with_method``) beside ``flop_speedup``."""
import pytest

from varbench.backbones.base import BackboneSpec
from varbench.flops import generation_flops, method_flops
from varbench.results import tables
from varbench.results.speed import run_metrics

SPEC = BackboneSpec("toy", 2, 8, 2, "bitwise", 4, ("sa", "ca", "ffn"))


def rec(tokens: float, summary: dict | None) -> dict:
    r = {"scale_hw": [(1, 1), (2, 2)], "tokens": [[1.0, 1.0], [tokens, tokens]], "kv_len": [[1, 1], [5, 5]],
         "rows": [2, 2], "attn_keys": [], "text_len": [3], "batch": 1, "time_per_image_s": 1.0,
         "peak_memory_bytes": 1, "device_name": "cpu"}
    if summary is not None:
        r["method_summary"] = summary
    return r


def test_run_metrics_with_and_without_method_flops():
    ref = {0: rec(4.0, None), 1: rec(4.0, None)}
    mine = {0: rec(2.0, {"method_flops": 1000.0}), 1: rec(2.0, {"method_flops": 3000.0})}
    m = run_metrics(mine, SPEC, ref)
    g_ref, g = generation_flops(ref[0], SPEC), generation_flops(mine[0], SPEC)
    assert m["flop_speedup"] == (pytest.approx(g_ref / g), 2)
    assert m["flop_speedup_with_method"] == (pytest.approx(2 * g_ref / (2 * g + 4000.0)), 2)
    assert m["method_gflops"] == (pytest.approx(2000.0 / 1e9), 2)
    assert m["flop_speedup_with_method"][0] < m["flop_speedup"][0]
    quiet = run_metrics({0: rec(2.0, {"D": 7})}, SPEC, ref)           # reports no method FLOPs: no such columns
    assert "method_gflops" not in quiet and "flop_speedup_with_method" not in quiet
    assert method_flops(rec(2.0, {"method_flops": 0.0})) == 0.0
    zero = run_metrics({0: rec(2.0, {"method_flops": 0.0})}, SPEC, ref)  # reports zero: both figures equal
    assert zero["flop_speedup_with_method"][0] == pytest.approx(zero["flop_speedup"][0])


def test_table_shows_both_flop_ideal_columns():
    import pandas as pd

    rows = [{"model": "toy", "bench": "b", "method": meth, "overrides": "default", "run": meth, "metric": k,
             "value": v, "n": 2, "time": 0.0, "note": None, "device": "cpu"}
            for meth, vals in (("none", {"flop_speedup": 1.0}),
                               ("toprovar", {"flop_speedup": 1.5, "flop_speedup_with_method": 1.2,
                                             "method_gflops": 0.25}))
            for k, v in vals.items()]
    text = tables.markdown(tables.wide(pd.DataFrame(rows)))
    head = text.splitlines()[0]
    assert "FLOP-ideal↑" in head and "FLOP-ideal incl. method↑" in head and "Method GFLOPs" in head
    assert "1.50×" in text and "1.20×" in text
