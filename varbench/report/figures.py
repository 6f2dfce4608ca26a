"""The report's figures (matplotlib, Agg): each function draws from plain data (lists, dicts; never a model) and
writes ``<stem>.png`` and ``<stem>.svg``. The builder decides whether a figure needs redrawing (content hash)."""
from __future__ import annotations

import math
from pathlib import Path

MARKERS = "osD^vP*Xh<>"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = [stem.parent / (stem.name + ".png"), stem.parent / (stem.name + ".svg")]
    fig.savefig(out[0], dpi=110, metadata={"Software": None})
    fig.savefig(out[1], metadata={"Date": None, "Creator": None})
    _plt().close(fig)
    return out


def pareto(stem: Path, title: str, quality: str, series: list[dict], reference: dict | None,
           paper_points: list[dict]) -> list[Path]:
    """Quality vs measured speedup (left) and vs FLOP-ideal speedup (right).

    ``series``: [{"family", "points": [{"speedup", "flop_speedup", "quality", "label"}] in parameter order}], one
    line per method family; ``reference``: the unpruned run's point (speedup 1); ``paper_points``: [{"speedup",
    "quality", "label"}] drawn hollow, on the measured-speedup axes only (the papers report no FLOP-ideal speedup)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, key, name in ((axes[0], "speedup", "measured speedup (×)"), (axes[1], "flop_speedup",
                                                                         "FLOP-ideal speedup (×)")):
        for i, s in enumerate(series):
            pts = [p for p in s["points"] if _ok(p.get(key)) and _ok(p.get("quality"))]
            if not pts:
                continue
            line = ax.plot([p[key] for p in pts], [p["quality"] for p in pts], marker=MARKERS[i % len(MARKERS)],
                           label=s["family"], linewidth=1.4, markersize=6)[0]
            for p in pts:
                if p.get("label"):
                    ax.annotate(p["label"], (p[key], p["quality"]), textcoords="offset points", xytext=(4, 4),
                                fontsize=7, color=line.get_color())
        if reference and _ok(reference.get("quality")):
            ax.plot([1.0], [reference["quality"]], marker="*", color="black", markersize=12, linestyle="none",
                    label="none (reference)")
        if key == "speedup":
            if paper_points:
                ax.plot([p["speedup"] for p in paper_points], [p["quality"] for p in paper_points], marker="o",
                        markerfacecolor="none", color="gray", linestyle="none", markersize=6,
                        label="the papers (as reported)")
            for p in paper_points:
                ax.annotate(p["label"], (p["speedup"], p["quality"]), textcoords="offset points", xytext=(3, -8),
                            fontsize=5.5, color="gray")
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(quality)
    handles, labels = axes[0].get_legend_handles_labels()
    h2, l2 = axes[1].get_legend_handles_labels()
    for h, lab in zip(h2, l2):
        if lab not in labels:
            handles.append(h)
            labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    return _save(fig, stem)


def _ok(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def entropy_curves(stem: Path, title: str, curves: list[list[float]], t_stars: list[int | None]) -> list[Path]:
    """NOVA: the guided-branch entropy per scale of each image (thin), their mean (thick), each image's t* (dot);
    right: the histogram of t* (images where NOVA did not activate counted as 'none')."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    for c, t in zip(curves, t_stars):
        a.plot(range(len(c)), c, color="tab:blue", alpha=0.25, linewidth=0.8)
        if t is not None and 0 <= t < len(c):
            a.plot([t], [c[t]], "o", color="tab:red", markersize=3, alpha=0.6)
    n = max((len(c) for c in curves), default=0)
    mean = [sum(c[i] for c in curves if len(c) > i) / max(1, sum(len(c) > i for c in curves)) for i in range(n)]
    a.plot(range(n), mean, color="tab:blue", linewidth=2.2, label="mean")
    a.plot([], [], "o", color="tab:red", markersize=3, label="t* (image)")
    a.set_xlabel("scale index")
    a.set_ylabel("entropy (guided, per token)")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    vals = [t for t in t_stars if t is not None]
    labels = [str(s) for s in range(n)] + ["none"]
    counts = [sum(t == s for t in vals) for s in range(n)] + [sum(t is None for t in t_stars)]
    b.bar(range(len(labels)), counts, color=["tab:red"] * n + ["gray"])
    b.set_xticks(range(len(labels)), labels, fontsize=7)
    b.set_xlabel("t* (scale where pruning starts)")
    b.set_ylabel("images")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, stem)


def heatmap(stem: Path, title: str, matrix: list[list[float | None]], row_labels: list[str], xlabel: str,
            ylabel: str, cbar: str, vmax: float | None = 1.0) -> list[Path]:
    """A scale × layer matrix (e.g. share of tokens computed); missing cells blank."""
    plt = _plt()
    import numpy as np

    m = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * m.shape[1] + 2.5), max(2.5, 0.3 * m.shape[0] + 1.2)))
    im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax, label=cbar)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, stem)


def curves_and_bars(stem: Path, title: str, curves: list[dict], curve_label: tuple[str, str],
                    bars: list[float], bar_label: tuple[str, str], marks: list[float | None] | None = None,
                    mark_label: str = "") -> list[Path]:
    """Left: one curve per image ({x: y}), each image's mark as a vertical tick; right: a bar per index (e.g. ToProVAR
    ρ per scale with D, and R per layer)."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    for c in curves:
        xs = sorted(c)
        a.plot(xs, [c[x] for x in xs], color="tab:green", alpha=0.35, linewidth=1)
    for m in marks or []:
        if m is not None:
            a.axvline(m, color="tab:red", alpha=0.3, linewidth=1)
    if marks and any(m is not None for m in marks):
        a.plot([], [], color="tab:red", label=mark_label)
        a.legend(fontsize=7)
    a.set_xlabel(curve_label[0])
    a.set_ylabel(curve_label[1])
    a.grid(alpha=0.3)
    b.bar(range(len(bars)), bars, color="tab:purple")
    b.set_xlabel(bar_label[0])
    b.set_ylabel(bar_label[1])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, stem)


def lines(stem: Path, title: str, curves: dict[str, list[float]], xlabel: str, ylabel: str) -> list[Path]:
    """One line per label over x = 0, 1, ... (e.g. the KV cache each run holds after each scale)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, (label, ys) in enumerate(curves.items()):     # ten colours, then the next line style
        ax.plot(range(len(ys)), ys, marker="os^"[i // 10 % 3], markersize=3, linewidth=1.2, label=label,
                color=f"C{i % 10}", linestyle=("-", "--", ":")[i // 10 % 3])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, stem)


def kept_masks(stem: Path, title: str, image_path: Path, masks: list[tuple[str, list[list[bool]]]],
               cols: int) -> list[Path]:
    """Kept-token masks overlaid on the image: one panel per (scale, layer), dropped tokens darkened (the mask, at the
    scale's h × w, stretched over the final image)."""
    plt = _plt()
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(image_path).convert("RGB"), dtype=float) / 255.0
    rows = max(1, math.ceil(len(masks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.75 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    H, W = img.shape[:2]
    for ax, (label, mask) in zip(axes.flat, masks):
        m = np.array(mask, dtype=float)
        yi = (np.arange(H) * m.shape[0] // H)[:, None]
        xi = (np.arange(W) * m.shape[1] // W)[None, :]
        keep = m[yi, xi][..., None]
        ax.imshow(img * (0.25 + 0.75 * keep), interpolation="nearest")
        ax.set_title(label, fontsize=6.5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, stem)
