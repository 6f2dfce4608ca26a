"""The results store: tidy rows (one per run × metric), appended as JSON lines to ``<results_root>/rows.jsonl``.

Row fields:
  run        run directory relative to results_root (unique per model/bench/method/overrides)
  model, method, bench, overrides   what was run (overrides: the non-default settings, as in the run name)
  metric     e.g. latency_s, speedup, flop_speedup, psnr, ssim, tokens_frac, activation_rate
  value, n   the aggregate and how many images it is over
  git_sha, time   provenance (time: ISO-8601, UTC)
Loading keeps the newest row per (run, metric): re-running or re-scoring replaces, never duplicates.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

FIELDS = ("run", "model", "method", "bench", "overrides", "metric", "value", "n", "git_sha", "time")


def rows_path(results_root: Path) -> Path:
    return Path(results_root) / "rows.jsonl"


def append_rows(results_root: Path, rows: list[dict]) -> None:
    p = rows_path(results_root)
    p.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with p.open("a") as f:
        for r in rows:
            r = {k: r.get(k) for k in FIELDS} | {"time": r.get("time") or now}
            f.write(json.dumps(r) + "\n")


def load(results_root: Path):
    import pandas as pd

    p = rows_path(results_root)
    recs = []
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue
    df = pd.DataFrame(recs, columns=list(FIELDS))
    if len(df):
        df = df.drop_duplicates(["run", "metric"], keep="last").reset_index(drop=True)
    return df
