"""Tables from the results store (rows.jsonl): speed, latency, FLOP-ideal speedup, fidelity and quality columns.

    python scripts/make_tables.py                       # the paper's Tables 1-5 with ours beside, then all runs
    python scripts/make_tables.py --paper               # only the paper's Tables 1-5
    python scripts/make_tables.py --model tiny --bench smoke --csv results/tables/tiny_smoke.csv

Bad input is one line on stderr and exit code 2: a results root that does not exist or holds no rows (only
``--paper`` prints the paper's tables without ours, with a note), an empty ``VARBENCH_RESULTS``, an ``--out`` or
``--csv`` that cannot be written.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from varbench.errors import UserError  # noqa: E402  (light)


def write(path: Path, text: str | None = None, frame=None) -> None:
    """``--out``/``--csv``: the folder is created; a path that cannot be written is one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if frame is not None:
            frame.to_csv(path, index=False)
        else:
            path.write_text(text)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or type(e).__name__}"
                        f"{f' ({e.filename})' if e.filename and str(e.filename) != str(path) else ''}") from None


def main(argv=None) -> int:
    try:
        return _main(argv)
    except UserError as e:
        print(f"make_tables: {e}", file=sys.stderr)
        return 2


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    env = os.environ.get("VARBENCH_RESULTS")
    ap.add_argument("--results-root", type=Path, default=None if env == "" else Path(env or "results"),
                    help="the results store (default: $VARBENCH_RESULTS, else ./results)")
    ap.add_argument("--model")
    ap.add_argument("--bench")
    ap.add_argument("--csv", type=Path, help="also write the wide table as CSV here")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    ap.add_argument("--paper", action="store_true", help="print the paper's Tables 1-5 with our numbers beside them")
    a = ap.parse_args(argv)
    from varbench.results import store, tables

    if a.results_root is None:
        raise UserError("VARBENCH_RESULTS is set to an empty string: set it to the results folder, or pass "
                        "--results-root")
    if not a.results_root.is_dir():
        raise UserError(f"no results folder at {a.results_root} (run `python run.py` first, or pass --results-root / "
                        f"set VARBENCH_RESULTS to where the results are)")
    df = store.load(a.results_root)
    if not len(df):
        if not a.paper:
            raise UserError(f"no results in {store.rows_path(a.results_root)}: run `python run.py` first, or pass "
                            f"--paper for the paper's tables alone")
        print(f"make_tables: note: no results of ours in {store.rows_path(a.results_root)}: the paper's numbers only",
              file=sys.stderr)
    if a.paper or not (a.model or a.bench or a.csv):
        from varbench.results import paper

        md = "\n\n".join(paper.render(n, df) for n in sorted(paper.TABLES))
        if len(df) and not a.paper:
            md += "\n\n### All runs\n\n" + tables.markdown(tables.wide(df))
        print(md)
        if a.out:
            write(a.out, md + "\n")
        return 0
    w = tables.wide(df, a.model, a.bench)
    first, extra = tables.bench_columns(w)           # e.g. shapes_overall, then its tags, before speed
    md = tables.markdown(w, extra=extra, quality=first)
    print(md)
    if a.out:
        write(a.out, md + "\n")
    if a.csv:
        write(a.csv, frame=w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
