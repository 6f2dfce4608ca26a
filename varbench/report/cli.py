"""``varbench report`` / ``python scripts/report.py``: write the HTML report of a results store.

    varbench report                                   # $VARBENCH_RESULTS (else ./results) -> <root>/report/
    varbench report --root results --out /tmp/site --prompts 12
    varbench report --select 0,5,9                    # the grid's prompts by item index
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from varbench.errors import UserError
from varbench.report.builder import build


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="varbench report", description="Write a static HTML report of the results "
                                 "store (tables, Pareto plots, image grids, per-run pages); never loads a model.")
    ap.add_argument("--root", type=Path, default=None,
                    help="results root holding rows.jsonl and runs/ (default: $VARBENCH_RESULTS, else ./results)")
    ap.add_argument("--out", type=Path, default=None, help="where to write the site (default: <root>/report)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts in each image grid: the first N (default 8)")
    ap.add_argument("--select", default=None, help="the grid's prompts by item index, comma-separated (e.g. 0,5,9)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    root = a.root or Path(os.environ.get("VARBENCH_RESULTS") or "results")
    try:
        if a.prompts < 1:
            raise UserError(f"--prompts must be at least 1, got {a.prompts}")
        try:
            select = [int(s) for s in a.select.split(",") if s.strip()] if a.select else None
        except ValueError:
            raise UserError(f"--select takes item indices separated by commas, got {a.select!r}") from None
        if not Path(root).is_dir():
            raise UserError(f"results root {root} is not a folder (run `python run.py` first, or pass --root)")
        res = build(root, a.out, n_prompts=a.prompts, prompts=select, progress=not a.no_progress)
    except UserError as e:
        print(f"varbench report: error: {e}", file=sys.stderr)
        return 2
    print(f"[varbench] report: {res['index']} ({res['pages']} pages; {res['written']} files written, "
          f"{res['unchanged']} unchanged, {res['removed']} stale removed)")
    return 0
