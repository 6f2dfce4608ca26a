"""The HTML report (issue 29) on a synthetic results store (no model): the tables are make_tables' cells, links are
relative and resolve, a re-run rewrites nothing and a changed row only what depends on it, sweeps are joined in
parameter order, kept-token masks are drawn from records that hold them, bad input is one line with exit code 2.
The real-browser test on a real run is tests/test_report_browser.py."""
from __future__ import annotations

import importlib.util
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from varbench.report import build
from varbench.report import builder as B
from varbench.report.cli import main as report_main
from varbench.results import store, tables
from varbench.results.fidelity import load_rgb, psnr_ssim

REPO = Path(__file__).resolve().parents[1]
HW = [[1, 1], [2, 2], [4, 4]]


def make_run(root: Path, method: str, tag: str, mcfg: dict, shift: int, rows: dict, prompts=("a cat", "a dog"),
             kept=False, kv=None) -> str:
    d = root / "runs" / "toy" / "shapes" / method / tag
    (d / "images").mkdir(parents=True)
    meta = {"config": {"method": {"name": method, **mcfg}}, "run_id": method + tag, "device_name": "cpu:test"}
    (d / "meta.json").write_text(json.dumps(meta))
    recs = []
    for i, p in enumerate(prompts):
        rng = np.random.default_rng(i)
        arr = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        arr[:shift] = 0
        Image.fromarray(arr).save(d / "images" / f"{i:05d}.png")
        tokens = [[float(h * w)] * 2 for h, w in HW]
        if method != "none":
            tokens[-1] = [8.0, 4.0]
        rec = {"index": i, "prompt": p, "seed": i, "image": f"{i:05d}.png", "time_per_image_s": 0.1 * (i + 1),
               "tokens": tokens, "scale_n": [h * w for h, w in HW], "scale_hw": HW, "rows": [2, 2, 2],
               "method_summary": {}}
        if kv is not None:      # KV bytes per (scale, layer) of image i: kv(i)
            rec["kv_bytes"] = kv(i)
        if method == "nova":
            rec["method_summary"] = {"entropy_per_scale": [0.5, 1.0 + i, 1.2], "t_star": 1 if i else None,
                                     "ratios": {"2": [0.5, 0.25]}}
            if kept:
                rec["kept_maps"] = {"2": [[0, 1, 2, 3, 5], None]}
        recs.append(rec)
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    run = str(d.relative_to(root))
    store.append_rows(root, [{"run": run, "model": "toy", "method": method, "family": method, "bench": "shapes",
                              "overrides": tag, "metric": k, "value": v, "n": 2, "device": "cpu:test",
                              "note": "our reading" if method == "nova" else None} for k, v in rows.items()])
    return run


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    make_run(root, "none", "default", {}, 0, {"latency_s": 0.5, "speedup": 1.0, "flop_speedup": 1.0,
                                               "tokens_frac": 1.0, "shapes_overall": 0.9, "shapes_counting": 0.8})
    for tag, alpha, sp, q in (("method.alpha=0.7", 0.7, 1.9, 0.5), ("default", 0.5, 1.5, 0.7),
                              ("method.alpha=0.3", 0.3, 1.2, 0.85)):
        make_run(root, "nova", tag, {"family": "nova", "alpha": alpha}, 3, {
            "latency_s": 0.5 / sp, "speedup": sp, "flop_speedup": 2 * sp, "tokens_frac": 0.4, "psnr": 20 + q,
            "ssim": 0.6, "shapes_overall": q, "shapes_counting": q - 0.1, "activation_rate": 1.0},
            kept=tag == "default")
    make_run(root, "fastvar", "default", {"family": "fastvar"}, 5, {
        "latency_s": 0.4, "speedup": 1.25, "flop_speedup": 2.6, "tokens_frac": 0.46, "psnr": 29.0, "ssim": 0.9,
        "shapes_overall": 0.75})
    return root


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.rows, self._row, self._cell = [], [], None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("href", "src"):
            if a.get(k):
                self.refs.append(a[k])
        if tag == "tr" and "data-run" in a:
            self._row = []
        if tag == "td" and self._row is not None:
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None


def parse(p: Path) -> Links:
    x = Links()
    x.feed(p.read_text())
    return x


def test_site_tables_links_and_rerun(results, capsys):
    res = build(results, progress=False)
    out = res["out"]
    pages = sorted(out.glob("*.html"))
    assert len(pages) == 1 + 1 + 5                  # index, toy/shapes, five runs
    # every link and image is relative and resolves inside the site; nothing is fetched from the network
    for p in pages:
        text = p.read_text()
        assert "http://" not in text and "https://" not in text, p.name
        for ref in parse(p).refs:
            assert not re.match(r"^[a-z]+:", ref) and not ref.startswith("/"), (p.name, ref)
            assert (p.parent / ref).exists(), (p.name, ref)
    assert (out / "style.css").is_file() and "@import" not in (out / "style.css").read_text()

    # the bench table shows exactly the cells `make_tables.py --model toy --bench shapes` prints
    spec = importlib.util.spec_from_file_location("make_tables", REPO / "scripts" / "make_tables.py")
    mt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt)
    capsys.readouterr()
    assert mt.main(["--results-root", str(results), "--model", "toy", "--bench", "shapes"]) == 0
    md_rows = [[c.strip() for c in ln.strip()[1:-1].split(" | ")] for ln in capsys.readouterr().out.splitlines()
               if ln.startswith("| ") and not ln.startswith("| Model")]
    bench_page = next(p for p in pages if p.name.startswith("bench-"))
    html_rows = parse(bench_page).rows
    assert [r[:-1] for r in html_rows] == md_rows     # the last HTML column is the device
    assert all(r[-1] == "cpu:test" for r in html_rows)
    assert "our reading" in bench_page.read_text()     # the footnote

    # the qualitative grid: PSNR to the reference as the fidelity module computes it
    a = out / "img" / next(d.name for d in (out / "img").iterdir() if "fastvar" in d.name) / "00000.png"
    r = out / "img" / next(d.name for d in (out / "img").iterdir() if "none" in d.name) / "00000.png"
    assert f"PSNR {psnr_ssim(load_rgb(a), load_rgb(r))[0]:.2f} dB" in bench_page.read_text()
    assert "reference" in bench_page.read_text()

    # a re-run rewrites nothing; a changed row rewrites the pages that show it and the plots drawn from it only
    again = build(results, progress=False)
    assert again["written"] == 0 and again["unchanged"] == res["written"] + res["unchanged"]
    mtimes = {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != B.CACHE}
    fast = next(p for p in pages if p.name.startswith("run-") and "fastvar" in p.name)
    store.append_rows(results, [{"run": "runs/toy/shapes/fastvar/default", "model": "toy", "method": "fastvar",
                                 "family": "fastvar", "bench": "shapes", "overrides": "default", "metric": "psnr",
                                 "value": 31.0, "n": 2, "device": "cpu:test"}])
    third = build(results, progress=False)
    changed = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != B.CACHE
               and p.stat().st_mtime_ns != mtimes.get(str(p.relative_to(out)))}
    assert fast.name in changed and bench_page.name in changed and "index.html" in changed
    assert any(n.startswith("plots/pareto-toy-shapes-psnr") for n in changed)
    assert not any(n.startswith("plots/pareto-toy-shapes-shapes_overall") for n in changed)
    assert not any("nova" in n for n in changed), changed
    assert third["written"] == len(changed)
    assert "31.00" in fast.read_text()


def test_sweep_joined_in_parameter_order(results):
    runs = B.collect_runs(store.load(results), results)
    nova = [r for r in runs.values() if r.family == "nova"]
    ordered, labels = B.sweep_order(nova)
    assert [r.method_config["alpha"] for r in ordered] == [0.3, 0.5, 0.7]
    assert [labels[r.run] for r in ordered] == ["alpha=0.3", "alpha=0.5", "alpha=0.7"]


def test_method_figures_and_kept_masks(results):
    out = build(results, progress=False)["out"]
    page = next(p for p in out.glob("run-*nova_default*.html"))
    text = page.read_text()
    for kind in ("tokens", "entropy", "ratios", "kept0"):
        assert re.search(rf'src="plots/[^"]*-{kind}\.png"', text), kind
    assert "-kept1" in text                            # both images hold kept_maps; the sweeps' records do not
    assert not list(out.glob("plots/*alpha_0.3*kept*"))
    rec = json.loads((results / "runs/toy/shapes/nova/default/records.jsonl").read_text().splitlines()[0])
    masks = B._masks(rec)
    assert masks[0] == ("s2 L0: 5/16", [[True] * 4, [False, True, False, False], [False] * 4, [False] * 4])
    assert masks[1][0] == "s2 L1: 16/16" and all(all(row) for row in masks[1][1])
    none_page = next(p for p in out.glob("run-*none_default*.html"))
    assert "plots/" not in none_page.read_text()       # the reference pruned nothing: no method figure


def test_split_markdown_refuses_a_ragged_table():
    with pytest.raises(ValueError):
        B.split_markdown("| a | b |\n|---|---|\n| 1 | 2 | 3 |")
    title, head, rows, notes = B.split_markdown("### T\n\n| a | b |\n|---|---|\n| 1 | — |\n\n[1] a note")
    assert (title, head, rows, notes) == ("T", ["a", "b"], [["1", "—"]], ["a note"])


def test_header_metrics_cover_every_column(results):
    w = tables.wide(store.load(results), "toy", "shapes")
    q, extra = tables.bench_columns(w)
    _, head, _, _ = B.split_markdown(tables.markdown(w, extra=extra, quality=q))
    hm = B.header_metrics(w)
    metrics = [h for h in head if h not in B.LABEL_HEADERS]
    assert len(metrics) >= 8 and all(h in hm for h in metrics), [h for h in metrics if h not in hm]


def test_cli_one_line_errors(tmp_path, capsys):
    assert report_main(["--root", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert report_main(["--root", str(tmp_path / "empty"), "--no-progress"]) == 2
    assert "no results" in capsys.readouterr().err
    assert report_main(["--root", str(tmp_path), "--select", "x"]) == 2


def test_paper_points_are_the_papers_rows():
    import csv

    from varbench.resources import paper_dir

    with (paper_dir() / "nova_table1_geneval_dpg.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["backbone"] == "infinity_2b" and r["speedup"] and
                r["geneval_overall"]]
    pts = [p for p in B.Builder.paper_points("infinity_2b", "geneval_overall") if p["table"] == "Table 1"]
    assert rows and [(p["label"], p["speedup"], p["quality"]) for p in pts] == \
        [(r["method"], float(r["speedup"]), float(r["geneval_overall"])) for r in rows]
    assert B.Builder.paper_points("tiny", "geneval_overall") == []


def test_a_run_gone_from_the_store_leaves_no_page(results):
    out = build(results, progress=False)["out"]
    (out / "notes.txt").write_text("mine")               # not the report's: never touched
    assert list(out.glob("run-*fastvar*.html")) and list(out.glob("img/*fastvar*/*.png"))
    rows = store.rows_path(results)
    rows.write_text("".join(ln + "\n" for ln in rows.read_text().splitlines() if '"fastvar"' not in ln))
    res = build(results, progress=False)
    assert res["removed"] > 0
    assert not list(out.glob("run-*fastvar*")) and not list(out.glob("img/*fastvar*"))
    assert not list(out.glob("plots/*fastvar*"))
    assert not [r for p in out.glob("*.html") for r in parse(p).refs if "fastvar" in r]
    assert (out / "notes.txt").read_text() == "mine"
    assert build(results, progress=False)["written"] == 0


def test_bench_page_of_a_paper_model_has_the_papers_rows(tmp_path):
    root = tmp_path / "results"
    store.append_rows(root, [{"run": "runs/infinity_2b/geneval/nova/default", "model": "infinity_2b",
                              "method": "nova", "family": "nova", "bench": "geneval", "overrides": "default",
                              "metric": m, "value": v, "n": 553, "device": "NVIDIA H100"}
                             for m, v in (("speedup", 2.0), ("geneval_overall", 0.7123))])
    out = build(root, progress=False)["out"]
    page = next(out.glob("bench-infinity_2b-geneval-*.html")).read_text()
    assert "Table 1: GenEval and DPG-Bench" in page and "0.71 / " in page     # ours / paper at the paper's decimals
    assert "measured on: NVIDIA H100" in page
    assert "<td>hart_0.7b</td>" not in page                                    # only this model's rows


def test_toprovar_and_sparvar_figures_from_their_summaries(tmp_path):
    """The summaries as baselines/toprovar.py and baselines/sparvar.py write them (summary())."""
    root = tmp_path / "results"
    make_run(root, "none", "default", {}, 0, {"latency_s": 0.5, "speedup": 1.0})
    run = make_run(root, "toprovar", "default", {"family": "toprovar"}, 2, {"latency_s": 0.4, "speedup": 1.25})
    spv = make_run(root, "sparvar", "default", {"family": "sparvar"}, 2, {"latency_s": 0.4, "speedup": 1.25})
    for r, summ in ((run, [{"D": 2, "rho": {"0": 0.1, "1": 0.3, "2": 0.8}, "varrho": [0.2, 0.4], "R": [0.5, 0.9],
                            "kept": {"2": [8, 4]}, "pruned_tokens": 4, "skipped_scales": []},
                           {"D": None, "rho": {"0": 0.1, "1": 0.2, "2": 0.3}, "varrho": [], "R": None}]),
                    (spv, [{"kernels": {"csla": "reference"}, "csla_tile_density": {"1": 0.5, "2": 0.25}},
                           {"kernels": {"csla": "reference"}, "csla_tile_density": {"2": 0.75}}])):
        f = root / r / "records.jsonl"
        recs = [json.loads(ln) for ln in f.read_text().splitlines()]
        for rec, s in zip(recs, summ):
            rec["method_summary"] = s
        f.write_text("".join(json.dumps(x) + "\n" for x in recs))
    out = build(root, progress=False)["out"]
    top = next(out.glob("run-*toprovar*.html")).read_text()
    assert re.search(r'src="plots/[^"]*-toprovar\.png"', top) and "ρ per scale" in top
    sp = next(out.glob("run-*sparvar*.html")).read_text()
    assert re.search(r'src="plots/[^"]*-sparvar\.png"', sp)
    assert B._mean_dict([s["csla_tile_density"] for s in summ]) == {1: 0.5, 2: 0.5}


def test_varbench_report_dispatches_before_hydra(results, tmp_path, capsys):
    from varbench.harness.cli import main as varbench_main

    with pytest.raises(SystemExit) as e:
        varbench_main(["report", "--root", str(tmp_path / "missing")])
    assert e.value.code == 2 and "results root" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        varbench_main(["report", "--root", str(results), "--out", str(tmp_path / "site"), "--no-progress"])
    assert e.value.code == 0 and (tmp_path / "site" / "index.html").is_file()
    assert "stale removed" in capsys.readouterr().out


def test_bench_page_draws_the_kv_cache_each_run_holds(tmp_path):
    """The memory figure: per run, KV bytes after each scale summed over layers, mean over images, in MiB; runs that
    recorded none (older records) are left out."""
    root = tmp_path / "results"
    mb = 2**20
    make_run(root, "none", "default", {}, 0, {"speedup": 1.0, "shapes_overall": 0.9},
             kv=lambda i: [[1 * mb, 1 * mb], [3 * mb, 3 * mb], [8 * mb, 8 * mb]])
    make_run(root, "scalekv", "default", {"family": "scalekv"}, 2, {"speedup": 1.1, "shapes_overall": 0.8},
             kv=lambda i: [[1 * mb, 1 * mb], [2 * mb, (1 + i) * mb], [2 * mb, 2 * mb]])
    make_run(root, "fastvar", "default", {"family": "fastvar"}, 4, {"speedup": 1.3, "shapes_overall": 0.7})
    runs = [B.Run(r, "toy", "shapes", m, m, "default", None, None, None, "", m,
                  records={i: json.loads(ln) for i, ln in enumerate(
                      (root / r / "records.jsonl").read_text().splitlines())})
            for r, m in (("runs/toy/shapes/none/default", "none"), ("runs/toy/shapes/scalekv/default", "scalekv"),
                         ("runs/toy/shapes/fastvar/default", "fastvar"))]
    assert B.kv_curves(runs) == {"none": [2.0, 6.0, 16.0], "scalekv": [2.0, 3.5, 4.0]}
    out = build(root, progress=False)["out"]
    page = next(out.glob("bench-*.html")).read_text()
    m = re.search(r'<h2>Memory</h2>\s*<figure>\s*<a href="(plots/kv-[^"]+\.png)"', page)
    assert m and (out / m.group(1)).is_file()
