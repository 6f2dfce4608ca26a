"""NOVA's figures from a run's records: entropy per scale with the activation scale (paper Fig. 4b) and the
distribution of activation scales over the prompt set (paper Fig. 8)."""
from __future__ import annotations

from pathlib import Path


def plot_entropy_activation(records: list[dict], out_png: Path, title: str = "") -> Path | None:
    summaries = [r.get("method_summary") or {} for r in records]
    curves = [s["entropy_per_scale"] for s in summaries if s.get("entropy_per_scale")]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    n = max(len(c) for c in curves)
    for c in curves:
        a.plot(range(1, len(c) + 1), c, color="0.75", lw=0.8)
    mean = np.nanmean([c + [np.nan] * (n - len(c)) for c in curves], 0)
    a.plot(range(1, n + 1), mean, color="C0", lw=2, label="mean over images")
    stars = [s.get("t_star") for s in summaries if s.get("t_star") is not None]
    if stars:
        t_med = int(np.median(stars))
        a.axvline(t_med, color="C3", ls="--", label=f"median t* = {t_med}")
        a.axvspan(t_med + 1 - 0.5, n + 0.5, color="C3", alpha=0.08, label="token reduction (t ≥ t*+1)")
    a.set(xlabel="scale t", ylabel="mean token entropy H̄_t (nats)", title="Entropy per scale")
    a.legend(fontsize=8)
    never = sum(s.get("t_star") is None for s in summaries)
    labels = list(range(1, n + 1))
    counts = [stars.count(t) for t in labels]
    b.bar([str(t) for t in labels] + ["never"], counts + [never], color=["C0"] * n + ["0.6"])
    b.set(xlabel="activation scale t*", ylabel="images", title=f"Activation scales ({len(summaries)} images)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
