"""A static HTML report of the results store: ``varbench report`` / ``python scripts/report.py``.

Reads ``<results_root>/rows.jsonl`` and the run folders (meta.json, records, images) only; never loads a model.
Writes ``<results_root>/report/``: ``index.html``, one page per (model, bench) and one per run, the plots (PNG and
SVG, matplotlib) and copies of the images shown, all linked by relative paths (works from ``file://``, from a copied
folder and from a static web server; nothing is fetched from the network). The tables are the rows of
``varbench.results.tables`` / ``varbench.results.paper`` (the same functions ``scripts/make_tables.py`` prints), so
the report and the terminal show the same numbers. Re-running rewrites only the files whose inputs changed.
"""
from varbench.report.builder import build

__all__ = ["build"]
