"""The report builder: results store + run folders -> pages (Jinja2 templates), figures, copies of the images.

Pages (flat, so every link is a plain relative file name): ``index.html``, ``bench-<model>-<bench>-<h>.html``,
``run-<model>_<bench>_<method>_<tag>-<h>.html``; beside them ``style.css``, ``plots/`` and ``img/<run>/...``.

Tables are not recomputed here: a bench table is ``tables.markdown(tables.wide(df, model, bench), ...)`` with the
column choice of ``scripts/make_tables.py --model --bench`` and the index's "all runs" table is the one
``make_tables.py`` prints; the paper tables are ``paper.render``. The markdown is split into cells (one source for
every number), each numeric cell tagged with its metric so that a browser test can compare it with the store.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from tqdm import tqdm

from varbench.errors import UserError
from varbench.io import atomic_write_text, iter_jsonl
from varbench.report import figures
from varbench.results import paper, store, tables
from varbench.results.fidelity import load_rgb, psnr_ssim
from varbench.results.speed import PSNR_CAP, _tokens

VERSION = "3"          # part of every figure's content hash: bump when a drawing changes
TEMPLATES = Path(__file__).resolve().parent / "templates"
CACHE = ".report_cache.json"
METHOD_KEYS_IGNORED = ("name", "footnote")
LABEL_HEADERS = ("Model", "Bench", "Method", "n")    # the columns of tables.markdown that are not a metric


# ------------------------------------------------------------------ tables (from varbench.results, split into cells)
@dataclass
class Cell:
    text: str
    metric: str | None = None


@dataclass
class Table:
    title: str
    head: list[str]
    rows: list[dict]                 # {"cells": [Cell], "run": page name or None, "device": str}
    notes: list[str] = field(default_factory=list)
    kind: str = "runs"               # "runs" (our rows; each numeric cell is a store value) or "paper"

    @property
    def has_ours(self) -> bool:
        return any(not c.text.startswith("—") for r in self.rows for c in r["cells"][2:])


def split_markdown(md: str) -> tuple[str, list[str], list[list[str]], list[str]]:
    """(title, header, rows of cells, footnotes) of a table written by ``tables.markdown`` / ``paper.render``."""
    title, head, rows, notes = "", None, [], []
    for line in md.splitlines():
        if line.startswith("### "):
            title = line[4:]
        elif line.startswith("|---"):
            continue
        elif line.startswith("| "):
            cells = [c.strip() for c in line.strip()[1:-1].split(" | ")]
            if head is None:
                head = cells
            elif len(cells) != len(head):
                raise ValueError(f"table row with {len(cells)} cells under {len(head)} headers: {line}")
            else:
                rows.append(cells)
        elif re.match(r"\[\d+\] ", line):
            notes.append(line.split("] ", 1)[1])
    return title, head or [], rows, notes


def header_metrics(w) -> dict[str, str]:
    """Header text -> metric name, as ``tables.markdown`` writes headers (its column list, quality names with spaces,
    other metrics verbatim)."""
    out = {h: m for m, h, _ in tables.SPEED_COLUMNS}
    for c in w.columns:
        if isinstance(c, str):
            out.setdefault(c.replace("_", " "), c)
            out.setdefault(c, c)
    return out


def runs_table(title: str, w, md: str, pages: dict[str, str]) -> Table:
    _, head, rows, notes = split_markdown(md)
    hm = header_metrics(w)
    metric_of = [None if h in LABEL_HEADERS else hm.get(h) for h in head]
    out = []
    for cells, (_, r) in zip(rows, w.iterrows()):
        dev = r.get("device")
        out.append({"cells": [Cell(t, m) for t, m in zip(cells, metric_of)], "run": pages.get(r["run"]),
                    "run_key": r["run"], "device": dev if isinstance(dev, str) else "—"})
    return Table(title, head, out, notes)


def paper_table(n: int, df, model: str | None = None) -> Table:
    """``paper.render(n, df)`` in cells (only ``model``'s rows if given), with a note naming the devices our numbers
    for the table's models were measured on (the papers' are the papers' GPUs)."""
    title, head, rows, notes = split_markdown(paper.render(n, df))
    rows = [c for c in rows if model is None or c[0] == model]
    models = {c[0] for c in rows}
    mine = [c for c in rows if any(not x.startswith("—") for x in c[2:])]
    devices = sorted({d for d in df[df.model.isin(models)]["device"] if isinstance(d, str)}) if mine else []
    if devices:
        notes = notes + [f"our numbers in this table were measured on: {', '.join(devices)}"]
    return Table(title, head, [{"cells": [Cell(t, h if i >= 2 else None) for i, (t, h) in
                                          enumerate(zip(cells, head))], "run": None, "run_key": None, "device": ""}
                               for cells in rows], notes, kind="paper")


# ------------------------------------------------------------------ runs
@dataclass
class Run:
    run: str                # as stored (relative to the results root, or an absolute folder for external scores)
    model: str
    bench: str
    method: str
    family: str
    overrides: str
    note: str | None
    device: str | None
    path: Path | None
    page: str
    slug: str
    meta: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)

    @property
    def method_config(self) -> dict:
        return (self.meta.get("config") or {}).get("method") or (self.meta.get("identity") or {}).get("method") or {}

    @property
    def label(self) -> str:
        return self.method + ("" if self.overrides in ("default", "", None) else f" ({self.overrides})")


def safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")[:80]


def short_hash(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()[:6]


def read_records(folder: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for p in sorted(folder.glob("records*.jsonl")):
        for r in iter_jsonl(p):
            if "index" in r:
                out[int(r["index"])] = r
    return out


def collect_runs(df, root: Path) -> dict[str, Run]:
    out = {}
    for run, g in df.sort_values("time").groupby("run", sort=False):
        last = g.iloc[-1]
        p = Path(run) if Path(run).is_absolute() else root / run
        slug = safe(str(run).removeprefix("runs/").replace("/", "_")) + "-" + short_hash(str(run))
        r = Run(run, str(last["model"]), str(last["bench"]), str(last["method"]),
                str(last["family"]) if isinstance(last["family"], str) and last["family"] else str(last["method"]),
                str(last["overrides"] or "default"), last["note"] if isinstance(last["note"], str) else None,
                last["device"] if isinstance(last["device"], str) else None, p if p.is_dir() else None,
                f"run-{slug}.html", slug)
        if r.path is not None:
            meta = r.path / "meta.json"
            if meta.is_file():
                try:
                    r.meta = json.loads(meta.read_text())
                except ValueError:
                    r.meta = {}
            r.records = read_records(r.path)
        out[run] = r
    return out


def sweep_order(runs: list[Run]) -> tuple[list[Run], dict[str, str]]:
    """The runs of one family in parameter order (the method settings that differ between them), with labels."""
    cfgs = [{k: v for k, v in r.method_config.items() if k not in METHOD_KEYS_IGNORED} for r in runs]
    keys = sorted({k for c in cfgs for k in c if any(json.dumps(c.get(k), sort_keys=True) !=
                                                      json.dumps(cfgs[0].get(k), sort_keys=True) for c in cfgs)})
    methods_differ = len({r.method for r in runs}) > 1

    def key(i: int):
        return tuple(_sortable(cfgs[i].get(k)) for k in keys) + (runs[i].method, runs[i].overrides)

    order = sorted(range(len(runs)), key=key)
    labels = {}
    for i in order:
        parts = ([runs[i].method] if methods_differ else []) + [f"{k}={cfgs[i].get(k)}" for k in keys]
        labels[runs[i].run] = ", ".join(parts)
    return [runs[i] for i in order], labels


def _sortable(v):
    if isinstance(v, bool) or v is None:
        return (1, str(v))
    if isinstance(v, (int, float)):
        return (0, float(v))
    return (1, json.dumps(v, sort_keys=True))


# ------------------------------------------------------------------ the builder
class Builder:
    def __init__(self, root: Path, out: Path | None = None, n_prompts: int = 8, prompts: list[int] | None = None,
                 progress: bool = True):
        self.root = Path(root).resolve()
        self.out = Path(out).resolve() if out else self.root / "report"
        self.n_prompts, self.prompts, self.progress = n_prompts, prompts, progress
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                                      undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.stats = {"written": 0, "unchanged": 0, "removed": 0}
        self.produced: set[str] = set()     # every file this build wrote or found up to date (the rest is stale)
        self.cache = self._load_cache()

    # -- incremental writes
    def _load_cache(self) -> dict:
        try:
            c = json.loads((self.out / CACHE).read_text())
            return c if isinstance(c, dict) else {}
        except (OSError, ValueError):
            return {}

    def write_text(self, name: str, text: str) -> None:
        p = self.out / name
        self.produced.add(name)
        if p.is_file() and p.read_text() == text:
            self.stats["unchanged"] += 1
            return
        atomic_write_text(p, text)
        self.stats["written"] += 1

    def figure(self, stem: str, data: dict, draw) -> dict:
        """Draw a figure unless its data (and VERSION) hash as the last time and both files are there."""
        key = hashlib.sha256((VERSION + json.dumps(data, sort_keys=True, default=str)).encode()).hexdigest()
        files = [f"plots/{stem}.png", f"plots/{stem}.svg"]
        figs = self.cache.setdefault("figures", {})
        self.produced.update(files)
        if figs.get(stem) == key and all((self.out / f).is_file() for f in files):
            self.stats["unchanged"] += 2
        else:
            draw(self.out / "plots" / stem)
            figs[stem] = key
            self.stats["written"] += 2
        return {"png": files[0], "svg": files[1]}

    def copy_image(self, run: Run, rel: str) -> str | None:
        """The image copied into the report (so a copied folder still works); relative link, or None if absent."""
        src = run.path / "images" / rel if run.path else None
        if src is None or not src.is_file():
            return None
        name = f"img/{run.slug}/{rel}"
        dst = self.out / name
        self.produced.add(name)
        st = src.stat()
        if dst.is_file() and dst.stat().st_size == st.st_size and dst.stat().st_mtime_ns == st.st_mtime_ns:
            self.stats["unchanged"] += 1
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            self.stats["written"] += 1
        return name

    def psnr(self, a: Path, b: Path) -> float:
        """PSNR of image a to b (dB; identical images give the store's cap), cached by the two files' contents."""
        key = hashlib.sha256(a.read_bytes() + b"|" + b.read_bytes()).hexdigest()
        cache = self.cache.setdefault("psnr", {})
        if key not in cache:
            cache[key] = min(psnr_ssim(load_rgb(a), load_rgb(b))[0], PSNR_CAP)
        return cache[key]

    def remove_stale(self) -> None:
        """Delete what an earlier build wrote and this one did not (a run gone from the store, a renamed figure):
        only the report's own kinds of files (pages, plots/, img/), never anything else in the folder."""
        old = [p for p in self.out.glob("*.html") if p.name.startswith(("run-", "bench-"))]
        old += [p for d in ("plots", "img") for p in (self.out / d).rglob("*") if p.is_file()]
        for p in old:
            if str(p.relative_to(self.out)) not in self.produced:
                p.unlink()
                self.stats["removed"] += 1
        for d in sorted((p for p in (self.out / "img").rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            if not any(d.iterdir()):
                d.rmdir()
        live = {Path(f).name.rsplit(".", 1)[0] for f in self.produced if f.startswith("plots/")}
        self.cache["figures"] = {k: v for k, v in self.cache.get("figures", {}).items() if k in live}

    def render(self, template: str, name: str, **ctx) -> None:
        self.write_text(name, self.env.get_template(template).render(**ctx))

    # -- the pages
    def build(self) -> dict:
        df = store.load(self.root)
        if not len(df):
            raise UserError(f"no results in {store.rows_path(self.root)}: run `python run.py` first")
        self.out.mkdir(parents=True, exist_ok=True)
        runs = collect_runs(df, self.root)
        pages = {k: r.page for k, r in runs.items() if r.path is not None}
        groups = sorted({(r.model, r.bench) for r in runs.values()})
        bench_pages = {g: f"bench-{safe(g[0])}-{safe(g[1])}-{short_hash('/'.join(g))}.html" for g in groups}
        todo = [("style", None)] + [("bench", g) for g in groups] + \
            [("run", r) for r in runs.values() if r.path is not None] + [("index", None)]
        bar = tqdm(todo, desc="report", unit="page", disable=not self.progress, file=sys.stderr)
        bench_summaries = []
        for kind, arg in bar:
            if kind == "style":
                self.write_text("style.css", (TEMPLATES / "style.css").read_text())
            elif kind == "bench":
                bench_summaries.append(self.bench_page(df, arg, runs, pages, bench_pages[arg]))
            elif kind == "run":
                self.run_page(df, arg, runs, pages, bench_pages[(arg.model, arg.bench)])
            else:
                self.index_page(df, pages, bench_summaries)
        bar.close()
        self.remove_stale()
        atomic_write_text(self.out / CACHE, json.dumps(self.cache, sort_keys=True))
        return {"out": self.out, "index": self.out / "index.html", "pages": 1 + len(groups) + len(pages)} | self.stats

    def index_page(self, df, pages: dict[str, str], benches: list[dict]) -> None:
        w = tables.wide(df)
        all_runs = runs_table("All runs", w, tables.markdown(w), pages)
        ptables = [paper_table(n, df) for n in sorted(paper.TABLES)]
        self.render("index.html", "index.html", title="varbench report", benches=benches, all_runs=all_runs,
                    paper_ours=[t for t in ptables if t.has_ours], paper_rest=[t for t in ptables if not t.has_ours],
                    root=str(self.root), n_runs=len(w))

    def bench_page(self, df, group: tuple[str, str], runs: dict[str, Run], pages: dict[str, str], name: str) -> dict:
        model, bench = group
        w = tables.wide(df, model, bench)
        quality, extra = tables.bench_columns(w)
        table = runs_table(f"{model} / {bench}", w, tables.markdown(w, extra=extra, quality=quality), pages)
        ordered = [runs[k] for k in w["run"] if k in runs]
        ref = self.reference(ordered)
        plots = self.pareto_plots(w, model, bench, ordered, quality)
        grid = self.grid(ordered, ref)
        ptables = [t for t in (paper_table(n, df, model) for n in sorted(paper.TABLES)) if t.rows]
        kv = kv_curves(ordered)
        memory = None
        if kv:
            d = {"curves": kv}
            memory = self.figure(f"kv-{safe(model)}-{safe(bench)}-{short_hash(model + '/' + bench)}", d,
                                 lambda s, d=d: figures.lines(s, f"{model} / {bench}: KV cache held after each scale",
                                                              d["curves"], "scale", "KV cache (MiB, all layers)")) | {
                "caption": "KV-cache bytes each run holds once a scale is done (after any compression), summed over "
                           "layers, mean over the images (the records' kv_bytes)."}
        self.render("bench.html", name, title=f"{model} / {bench}", table=table, plots=plots, grid=grid,
                    ref=ref.label if ref else None, model=model, bench=bench, paper_tables=ptables, memory=memory)
        return {"model": model, "bench": bench, "page": name, "runs": len(ordered),
                "methods": ", ".join(dict.fromkeys(r.method for r in ordered)), "plot": plots[0] if plots else None}

    @staticmethod
    def reference(runs: list[Run]) -> Run | None:
        refs = [r for r in runs if r.method == "none" and r.records]
        return next((r for r in refs if r.overrides == "default"), refs[0] if refs else None)

    def pareto_plots(self, w, model: str, bench: str, runs: list[Run], quality: list[str]) -> list[dict]:
        qs = [q for q in quality if q.endswith("_overall")] + (["psnr"] if "psnr" in w.columns else [])
        by_run = {r["run"]: r for _, r in w.iterrows()}
        fams: dict[str, list[Run]] = {}
        for r in runs:
            if r.method != "none":
                fams.setdefault(r.family, []).append(r)
        out = []
        for q in qs:
            series = []
            for fam, members in fams.items():
                members, labels = sweep_order(members)
                pts = [{"speedup": _num(by_run[m.run].get("speedup")), "quality": _num(by_run[m.run].get(q)),
                        "flop_speedup": _num(by_run[m.run].get("flop_speedup")),
                        "label": labels[m.run] if len(members) > 1 else ""} for m in members]
                series.append({"family": fam, "points": pts})
            refs = [by_run[r.run] for r in runs if r.method == "none"]
            reference = {"quality": _num(refs[0].get(q)) if q != "psnr" else None} if refs else None
            pp = self.paper_points(model, q)
            data = {"series": series, "reference": reference, "paper": pp, "q": q, "model": model, "bench": bench}
            stem = f"pareto-{safe(model)}-{safe(bench)}-{safe(q)}-{short_hash(model + '/' + bench)}"
            files = self.figure(stem, data, lambda s, d=data: figures.pareto(
                s, f"{model} / {bench}: {d['q']} vs speedup", d["q"], d["series"], d["reference"], d["paper"]))
            out.append(files | {"quality": q, "paper": len(pp)})
        return out

    @staticmethod
    def paper_points(model: str, q: str) -> list[dict]:
        """The papers' (speedup, quality) rows for this model where a paper table has both columns."""
        pts = []
        for n in sorted(paper.TABLES):
            title, _, _, metrics = paper.TABLES[n]      # a method in several tables: one point per table
            if "speedup" not in metrics or q not in metrics:
                continue
            for r in paper.read_paper(n):
                s, v = _num(r.get("speedup")), _num(r.get(q))
                if r.get("backbone") == model and s is not None and v is not None:
                    pts.append({"speedup": s, "quality": v, "label": r["method"], "table": title.split(":")[0]})
        return pts

    def grid(self, runs: list[Run], ref: Run | None) -> dict:
        """N prompts × runs: each cell the image (a relative link to the full size), time, tokens, PSNR to none."""
        base = ref or next((r for r in runs if r.records), None)
        if base is None:
            return {"columns": [], "rows": []}
        idx = sorted(base.records)
        chosen = [i for i in (self.prompts or idx[:self.n_prompts]) if i in base.records]
        cols = [r for r in runs if r.records]
        rows = []
        for i in chosen:
            cells = []
            for r in cols:
                rec = r.records.get(i)
                cells.append(self.cell(r, rec, ref, ref.records.get(i) if ref else None) if rec else None)
            rows.append({"index": i, "prompt": base.records[i].get("prompt", ""), "cells": cells})
        return {"columns": [{"label": r.label, "page": r.page} for r in cols], "rows": rows}

    def cell(self, run: Run, rec: dict, ref: Run | None, ref_rec: dict | None) -> dict:
        rel = rec.get("image")
        img = self.copy_image(run, rel) if rel else None
        tok = _tokens(rec) if rec.get("tokens") else None
        out = {"img": img, "time": f"{rec['time_per_image_s']:.3f} s" if _num(rec.get("time_per_image_s")) else "—",
               "tokens": "—", "psnr": "—", "alt": rec.get("prompt", "")}
        same = ref_rec is not None and ref_rec.get("seed") == rec.get("seed") and \
            ref_rec.get("prompt") == rec.get("prompt")
        if tok is not None:
            rtok = _tokens(ref_rec) if same and ref_rec.get("tokens") else None
            out["tokens"] = f"{tok / rtok:.0%} tokens" if rtok else f"{tok:.0f} tokens"
        if run is ref:
            out["psnr"] = "reference"
        elif same and img and ref.path is not None and (ref.path / "images" / ref_rec["image"]).is_file():
            p = self.psnr(run.path / "images" / rel, ref.path / "images" / ref_rec["image"])
            out["psnr"] = "identical" if p >= PSNR_CAP else f"PSNR {p:.2f} dB"
        return out

    def run_page(self, df, run: Run, runs: dict[str, Run], pages: dict[str, str], bench_page: str) -> None:
        w = tables.wide(df[df.run == run.run])
        quality, extra = tables.bench_columns(w)
        table = runs_table(run.label, w, tables.markdown(w, extra=extra, quality=quality), pages)
        recs = [run.records[i] for i in sorted(run.records)]
        ref = self.reference([r for r in runs.values() if (r.model, r.bench) == (run.model, run.bench)])
        images = [self.cell(run, rec, ref, ref.records.get(rec["index"]) if ref else None) | {
            "index": rec["index"], "prompt": rec.get("prompt", "")} for rec in recs]
        plots = self.method_plots(run, recs)
        config = json.dumps(run.method_config, indent=1, sort_keys=True)
        self.render("run.html", run.page, title=run.label, run=run, table=table, images=images, plots=plots,
                    config=config, bench_page=bench_page, meta=run.meta)

    def method_plots(self, run: Run, recs: list[dict]) -> list[dict]:
        """What the records hold: tokens computed per (scale, layer) (every method), NOVA's entropy curve and t*,
        its keep ratios per layer, ToProVAR's ρ/D and R per layer, SparVAR's tile density, kept-token masks."""
        out = []
        sums = [r.get("method_summary") or {} for r in recs]
        tag = f"{run.slug}"
        frac = _token_fraction(recs)
        if frac and run.method != "none":
            d = {"m": frac, "n": [str(i) for i in range(len(frac))]}
            out.append(self.figure(f"{tag}-tokens", d, lambda s, d=d: figures.heatmap(
                s, f"{run.label}: share of tokens computed (mean over {len(recs)} images)", d["m"], d["n"], "layer",
                "scale", "computed / scale tokens")) | {"caption": "Tokens computed per (scale, layer) / the scale's "
                                                                     "tokens, mean over images (from the records)."})
        if any("entropy_per_scale" in s for s in sums):
            d = {"c": [s.get("entropy_per_scale") or [] for s in sums], "t": [s.get("t_star") for s in sums]}
            out.append(self.figure(f"{tag}-entropy", d, lambda s, d=d: figures.entropy_curves(
                s, f"{run.label}: entropy per scale and t*", d["c"], d["t"])) | {
                "caption": "NOVA: entropy per scale of each image (thin), mean (thick), t* per image; histogram of t*."})
        ratios = _mean_matrix([s.get("ratios") for s in sums])
        if ratios:
            d = {"m": ratios[1], "n": ratios[0]}
            out.append(self.figure(f"{tag}-ratios", d, lambda s, d=d: figures.heatmap(
                s, f"{run.label}: keep ratio per (scale, layer)", d["m"], d["n"], "layer", "scale", "keep ratio")) | {
                "caption": "NOVA: keep ratio per (scale, layer), mean over the images where the scale was pruned."})
        if any(s.get("R") for s in sums) or any(s.get("rho") for s in sums):
            Rs = [s["R"] for s in sums if s.get("R")]
            n = max((len(r) for r in Rs), default=0)
            bars = [sum(r[i] for r in Rs if len(r) > i) / max(1, sum(len(r) > i for r in Rs)) for i in range(n)]
            d = {"c": [{int(k): v for k, v in (s.get("rho") or {}).items()} for s in sums],
                 "D": [s.get("D") for s in sums], "R": bars}
            out.append(self.figure(f"{tag}-toprovar", d, lambda s, d=d: figures.curves_and_bars(
                s, f"{run.label}: ρ per scale, D, R per layer", d["c"], ("scale", "ρ (low-entropy ratio)"), d["R"],
                ("layer", "R (mean)"), d["D"], "D (image)")) | {
                "caption": "ToProVAR: ρ per scale of each image with its depth D; R per layer (mean over images)."})
        dens = _mean_dict([s.get("csla_tile_density") for s in sums])
        if dens:
            d = {"c": [{int(k): v for k, v in (s.get("csla_tile_density") or {}).items()} for s in sums],
                 "b": [dens[k] for k in sorted(dens)], "k": sorted(dens)}
            out.append(self.figure(f"{tag}-sparvar", d, lambda s, d=d: figures.curves_and_bars(
                s, f"{run.label}: CSLA tile density per scale", d["c"], ("scale", "tile density (image)"), d["b"],
                (f"scale ({', '.join(map(str, d['k']))})", "tile density (mean)"))) | {
                "caption": "SparVAR: share of attention tiles computed by CSLA per scale (per image, and the mean)."})
        for rec in [r for r in recs if r.get("kept_maps")][:2]:
            masks = _masks(rec)
            img = run.path / "images" / rec["image"] if run.path and rec.get("image") else None
            if masks and img is not None and img.is_file():
                layers = max(len(v) for v in (rec["kept_maps"] or {}).values())
                d = {"m": masks, "img": hashlib.sha256(img.read_bytes()).hexdigest(), "cols": layers}
                out.append(self.figure(f"{tag}-kept{rec['index']}", d, lambda s, d=d, img=img, i=rec["index"]:
                                       figures.kept_masks(s, f"{run.label}: kept tokens, image {i}", img, d["m"],
                                                          d["cols"])) | {
                    "caption": f"Kept tokens per (scale, layer) of image {rec['index']} (dark: not computed), over "
                               f"the final image."})
        return out


def _num(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _token_fraction(recs: list[dict]) -> list[list[float]]:
    """Mean over images of tokens computed / the scale's tokens, per (scale, layer)."""
    mats = [[[t / n if n else 0.0 for t in layer_tokens] for layer_tokens, n in zip(r["tokens"], r["scale_n"])]
            for r in recs if r.get("tokens") and r.get("scale_n")]
    if not mats:
        return []
    S, L = len(mats[0]), len(mats[0][0]) if mats[0] else 0
    return [[sum(m[s][li] for m in mats) / len(mats) for li in range(L)] for s in range(S)]


def kv_curves(runs: list[Run]) -> dict[str, list[float]]:
    """KV cache held after each scale, MiB (the records' ``kv_bytes``: per (scale, layer) after any compression,
    summed over layers), mean over a run's images; one curve per run that recorded it."""
    out = {}
    for r in runs:
        per = [rec["kv_bytes"] for rec in r.records.values() if rec.get("kv_bytes")]
        if not per:
            continue
        S = min(len(p) for p in per)
        out[r.label] = [sum(sum(p[si]) for p in per) / len(per) / 2**20 for si in range(S)]
    return out


def _mean_matrix(dicts: list[dict | None]) -> tuple[list[str], list[list[float | None]]] | None:
    """{scale: [value per layer]} per image -> (scale labels, mean matrix)."""
    acc: dict[int, list[list[float]]] = {}
    for d in dicts:
        for k, v in (d or {}).items():
            if isinstance(v, list):
                acc.setdefault(int(k), []).append(v)
    if not acc:
        return None
    L = max(len(v) for vs in acc.values() for v in vs)
    keys = sorted(acc)
    return [str(k) for k in keys], [[_mean([v[i] for v in acc[k] if len(v) > i]) for i in range(L)] for k in keys]


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if _num(x) is not None]
    return sum(xs) / len(xs) if xs else None


def _mean_dict(dicts: list[dict | None]) -> dict[int, float]:
    acc: dict[int, list[float]] = {}
    for d in dicts:
        for k, v in (d or {}).items():
            if _num(v) is not None:
                acc.setdefault(int(k), []).append(float(v))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def _masks(rec: dict) -> list[tuple[str, list[list[bool]]]]:
    """``kept_maps`` ({scale: [kept token indices, or None for all, per layer]}) -> [(label, h × w mask)]."""
    out = []
    hw = rec.get("scale_hw") or []
    for k in sorted(rec["kept_maps"], key=int):
        si = int(k)
        if si >= len(hw):
            continue
        h, w = hw[si]
        for li, kept in enumerate(rec["kept_maps"][k]):
            keep = set(range(h * w)) if kept is None else set(int(i) for i in kept)
            out.append((f"s{si} L{li}: {len(keep)}/{h * w}", [[y * w + x in keep for x in range(w)] for y in range(h)]))
    return out


def build(root: Path, out: Path | None = None, n_prompts: int = 8, prompts: list[int] | None = None,
          progress: bool = True) -> dict:
    """Write the report of the results store at ``root`` into ``out`` (default ``<root>/report``)."""
    return Builder(root, out, n_prompts, prompts, progress).build()
