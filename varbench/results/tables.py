"""Tables from the results store: rows (run × metric) -> one line per run, one column per metric."""
from __future__ import annotations

import math

# (metric, header, format) in the order of the paper's Table 1 speed/latency columns, then fidelity and cost.
SPEED_COLUMNS = [
    ("speedup", "Speed↑", "{:.2f}×"),
    ("latency_s", "Latency (s)↓", "{:.3f}"),
    ("flop_speedup", "FLOP-ideal↑", "{:.2f}×"),
    ("flop_speedup_with_method", "FLOP-ideal incl. method↑", "{:.2f}×"),   # + the method's own FLOPs
    ("method_gflops", "Method GFLOPs", "{:.3g}"),
    ("tokens_frac", "Tokens computed", "{:.1%}"),
    ("psnr", "PSNR (dB)↑", "{:.2f}"),
    ("ssim", "SSIM↑", "{:.4f}"),
    ("identical_frac", "Identical", "{:.0%}"),
    ("kv_mb", "KV MB↓", "{:.2f}"),         # most KV-cache bytes held at once (varbench/records.py)
    ("peak_mb", "peak MB↓", "{:.1f}"),     # GPU allocator peak; CPU: bytes of the tensors the loop holds
]


# A scorer that had to use a stand-in feature network (eval/imagenet.py without the real Inception weights) reports
# ``<prefix>_standin = 1``: not a column, a footnote on that row.
STANDIN = "_standin"
STANDIN_NOTE = ("{p}: scored with a STAND-IN feature network (seeded random weights, the real network's interface): "
                "its weights were not found, so these numbers exercise the pipeline and compare with nothing")


def _fmt(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return fmt.format(v)


def wide(df, model: str | None = None, bench: str | None = None):
    """One row per run with a column per metric (pandas DataFrame)."""
    if model is not None:
        df = df[df.model == model]
    if bench is not None:
        df = df[df.bench == bench]
    if not len(df):
        return df
    keys = ["model", "bench", "method", "overrides", "run"]
    # per run and metric, the largest item set scored (a bench.limit re-score never hides the full run), newest first
    df = df.assign(_n=df["n"].fillna(0)).sort_values(["_n", "time"], kind="stable")
    df = df.drop_duplicates(["run", "metric"], keep="last")
    lat = df[df.metric == "latency_s"].set_index("run")["_n"]      # images per run: the n of its latency
    images = lat.combine_first(df.groupby("run")["_n"].max()).rename("images")
    w = df.pivot_table(index=keys, columns="metric", values="value", aggfunc="last").reset_index()
    side = df.sort_values("time").groupby("run")[["note", "device"]].last()
    w = w.join(side, on="run").join(images, on="run")
    w["_ref_first"] = w["method"] != "none"
    return w.sort_values(["model", "bench", "_ref_first", "method", "overrides"]).drop(columns="_ref_first")


def quality_columns(w, prefixes: list[str]) -> list[str]:
    """The quality metrics of a bench present in ``w``: each ``<prefix>_overall`` first, then its parts."""
    out = []
    for p in prefixes:
        mine = sorted(c for c in w.columns if isinstance(c, str) and c.startswith(p + "_") and not c.endswith(STANDIN))
        out += [c for c in mine if c.endswith("_overall")] + [c for c in mine if not c.endswith("_overall")]
    return out


# metrics in the store that no table shows as a column: gflops (shown as the FLOP-ideal speedup), images (the n
# column), peak_mem_gb (peak MB in GiB, kept for rows written before the memory columns)
NOT_SHOWN = {"gflops", "images", "peak_mem_gb"}


def bench_columns(w) -> tuple[list[str], list[str]]:
    """(quality, extra) of a (model, bench) table: each ``<bench>_overall`` and its parts first, the other non-speed
    metrics after the speed columns (``make_tables.py --model M --bench B`` and the report use this one choice)."""
    numeric = [c for c in w.columns if isinstance(c, str) and w[c].dtype.kind in "fi"]
    quality = sorted(set(numeric) - {m for m, _, _ in SPEED_COLUMNS} - NOT_SHOWN)
    prefixes = sorted({c.rsplit("_", 1)[0] for c in quality if c.endswith("_overall")})
    first = quality_columns(w, prefixes)
    return first, [c for c in quality if c not in first]


def markdown(w, columns=SPEED_COLUMNS, extra: list[str] | None = None, quality: list[str] | None = None) -> str:
    """Markdown table; missing cells show as '—', never as a number. ``quality`` columns come first. Footnotes come
    from the rows (each method declares its own); a table whose speed rows come from several device types says so."""
    q = [(m, m.replace("_", " "), "{:.3f}") for m in (quality or []) if m in w.columns]
    known = {c[0] for c in columns} | {m for m, _, _ in q} | {"model", "bench", "method", "overrides", "run", "note",
                                                                 "device"} | NOT_SHOWN
    flags = [c for c in w.columns if isinstance(c, str) and c.endswith(STANDIN)]
    known |= set(flags)
    auto = [c for c in w.columns if isinstance(c, str) and c not in known and c not in (extra or [])]
    cols = q + [c for c in columns if c[0] in w.columns] + [(m, m, "{:.4g}") for m in list(extra or []) + auto
                                                            if m in w.columns]
    head = ["Model", "Bench", "Method", "n"] + [h for _, h, _ in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: list[str] = []
    for _, r in w.iterrows():
        mark = ""
        row_notes = [r.get("note")] + [STANDIN_NOTE.format(p=f[:-len(STANDIN)]) for f in flags if r.get(f) == 1]
        for note in row_notes:
            if isinstance(note, str) and note:
                if note not in notes:
                    notes.append(note)
                mark += f"[{notes.index(note) + 1}]"
        name = r["method"] + mark + (f" ({r['overrides']})" if r.get("overrides") not in (None, "", "default") else "")
        cells = [r["model"], r["bench"], name, _fmt(r.get("images"), "{:.0f}")] + [_fmt(r.get(m), f) for m, _, f in cols]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    devices = sorted({_kind(d) for d in w.get("device", []) if isinstance(d, str)})
    if len(devices) > 1:
        notes.append(f"rows were measured on different device types ({', '.join(devices)}): compare speed columns "
                     f"only within one device type (each speedup is against a reference made on its own device)")
    lines += [""] * bool(notes) + [f"[{i + 1}] {n}" for i, n in enumerate(notes)]
    return "\n".join(lines)


def _kind(device: str) -> str:
    return device.split(":")[0] if device.startswith("cpu") else device
