"""Tables from the results store: rows (run × metric) -> one line per run, one column per metric."""
from __future__ import annotations

import math

# (metric, header, format) in the order of the paper's Table 1 speed/latency columns, then fidelity and cost.
SPEED_COLUMNS = [
    ("speedup", "Speed↑", "{:.2f}×"),
    ("latency_s", "Latency (s)↓", "{:.3f}"),
    ("flop_speedup", "FLOP-ideal↑", "{:.2f}×"),
    ("tokens_frac", "Tokens computed", "{:.1%}"),
    ("psnr", "PSNR (dB)↑", "{:.2f}"),
    ("ssim", "SSIM↑", "{:.4f}"),
    ("peak_mem_gb", "Peak mem (GB)", "{:.2f}"),
    ("activation_rate", "Activated", "{:.0%}"),
    ("t_star_mean", "mean t*", "{:.2f}"),
]


# Methods whose rows need a footnote (prefix match on the row's method name).
FOOTNOTES = {
    "sparsevar": "SparseVAR is reconstructed from its paper: no official code or schedule is public; defaults are ours.",
    "nova_sparsevar": "NOVA‡ uses our SparseVAR ratios (SparseVAR's schedule is unknown).",
    "fastvar_8b": "FastVAR on Infinity-8B is our port of the 2B schedule (no official 8B setting).",
    "nova_attn": "NOVA w/ Attn: the paper does not define the attention score; ours is methods.md §2.4.",
}


def _note(method: str) -> int | None:
    for i, key in enumerate(FOOTNOTES):
        if method.startswith(key):
            return i
    return None


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
    w = df.pivot_table(index=["model", "bench", "method", "overrides", "run"], columns="metric", values="value",
                       aggfunc="last").reset_index()
    w["_ref_first"] = w["method"] != "none"
    return w.sort_values(["model", "bench", "_ref_first", "method", "overrides"]).drop(columns="_ref_first")


def quality_columns(w, prefixes: list[str]) -> list[str]:
    """The quality metrics of a bench present in ``w``: each ``<prefix>_overall`` first, then its parts."""
    out = []
    for p in prefixes:
        mine = sorted(c for c in w.columns if isinstance(c, str) and c.startswith(p + "_"))
        out += [c for c in mine if c.endswith("_overall")] + [c for c in mine if not c.endswith("_overall")]
    return out


def markdown(w, columns=SPEED_COLUMNS, extra: list[str] | None = None, quality: list[str] | None = None) -> str:
    """Markdown table; missing cells show as '—', never as a number. ``quality`` columns come first."""
    q = [(m, m.replace("_", " "), "{:.3f}") for m in (quality or []) if m in w.columns]
    cols = q + [c for c in columns if c[0] in w.columns] + [(m, m, "{:.4g}") for m in (extra or []) if m in w.columns]
    head = ["Model", "Bench", "Method"] + [h for _, h, _ in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    used = []
    for _, r in w.iterrows():
        note = _note(r["method"])
        mark = ""
        if note is not None:
            if note not in used:
                used.append(note)
            mark = f"[{used.index(note) + 1}]"
        name = r["method"] + mark + (f" ({r['overrides']})" if r.get("overrides") not in (None, "", "default") else "")
        cells = [r["model"], r["bench"], name] + [_fmt(r.get(m), f) for m, _, f in cols]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    keys = list(FOOTNOTES)
    lines += [""] * bool(used) + [f"[{i + 1}] {FOOTNOTES[keys[n]]}" for i, n in enumerate(used)]
    return "\n".join(lines)
