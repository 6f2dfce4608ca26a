"""The results store: tidy rows (one per run × metric), appended as JSON lines to ``<results_root>/rows.jsonl``.

Row fields:
  run        run directory relative to results_root (unique per model/bench/method/overrides)
  model, method, family, bench, overrides   what was run (family: the method's class; fastvar_hart -> fastvar) (overrides: the settings that change images, as in the run name)
  metric     e.g. latency_s, speedup, flop_speedup, psnr, ssim, tokens_frac, activation_rate
  value, n   the aggregate and how many images it is over
  items      the item set scored: "<count>-<hash of the item indices>" (a bench.limit score is its own row)
  note       the method's footnote (reconstructed method, our port, our reading ...), shown under tables
  device     where the images were made (speed columns compare rows of one device type only)
  run_id, git_sha, time   provenance (time: ISO-8601, UTC)
Loading keeps the newest row per (run, metric, items): re-running or re-scoring the same items replaces, never
duplicates; scoring part of a run adds rows beside the full run's (tables show the largest item set, with its n). A torn or
non-numeric line (killed writer, hand edit) is skipped with one warning line instead of breaking every table.
"""
from __future__ import annotations

import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from varbench.io import append_jsonl, iter_jsonl

FIELDS = ("run", "model", "method", "family", "bench", "overrides", "metric", "value", "n", "items", "note", "device",
          "run_id", "git_sha", "time")


def rows_path(results_root: Path) -> Path:
    return Path(results_root) / "rows.jsonl"


def append_rows(results_root: Path, rows: list[dict]) -> None:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    append_jsonl(rows_path(results_root), [{k: r.get(k) for k in FIELDS} | {"time": r.get("time") or now}
                                           for r in rows])


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def load(results_root: Path) -> pd.DataFrame:
    recs, bad = [], 0
    for r in iter_jsonl(rows_path(results_root)):
        if not _numeric(r.get("value")) or not r.get("run") or not r.get("metric"):
            bad += 1
            continue
        recs.append(r)
    if bad:
        print(f"[varbench] warning: skipped {bad} malformed row(s) in {rows_path(results_root)}", file=sys.stderr)
    df = pd.DataFrame(recs, columns=list(FIELDS))
    if len(df):
        df["value"] = df["value"].astype(float)
        df["items"] = df["items"].fillna("")
        df = df.drop_duplicates(["run", "metric", "items"], keep="last").reset_index(drop=True)
    return df
