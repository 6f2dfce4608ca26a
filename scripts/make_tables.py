"""Tables from the results store (rows.jsonl): speed, latency, FLOP-ideal speedup, fidelity and quality columns.

    python scripts/make_tables.py                       # the paper's Tables 1-5 with ours beside, then all runs
    python scripts/make_tables.py --paper               # only the paper's Tables 1-5
    python scripts/make_tables.py --model tiny --bench smoke --csv results/tables/tiny_smoke.csv
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-root", type=Path, default=Path(os.environ.get("VARBENCH_RESULTS", "results")))
    ap.add_argument("--model")
    ap.add_argument("--bench")
    ap.add_argument("--csv", type=Path, help="also write the wide table as CSV here")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    ap.add_argument("--paper", action="store_true", help="print the paper's Tables 1-5 with our numbers beside them")
    a = ap.parse_args(argv)
    from varbench.results import store, tables

    df = store.load(a.results_root)
    if a.paper or not (a.model or a.bench or a.csv):
        from varbench.results import paper

        md = "\n\n".join(paper.render(n, df) for n in sorted(paper.TABLES))
        if len(df) and not a.paper:
            md += "\n\n### All runs\n\n" + tables.markdown(tables.wide(df))
        print(md)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(md + "\n")
        return 0
    if not len(df):
        print(f"no results in {a.results_root / 'rows.jsonl'}: run `python run.py` first", file=sys.stderr)
        return 1
    w = tables.wide(df, a.model, a.bench)
    first, extra = tables.bench_columns(w)           # e.g. shapes_overall, then its tags, before speed
    md = tables.markdown(w, extra=extra, quality=first)
    print(md)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(md + "\n")
    if a.csv:
        a.csv.parent.mkdir(parents=True, exist_ok=True)
        w.to_csv(a.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
