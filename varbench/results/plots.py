"""Plots written next to a run's results (PNG) that every method shares: the contact sheet of images and prompts.
A method's own plots come from its ``report`` (e.g. NOVA's entropy/activation figure in ``nova/plots.py``)."""
from __future__ import annotations

from pathlib import Path


def contact_sheet(images: list[tuple[Path, str]], out_png: Path, max_images: int = 24, cols: int = 6) -> Path | None:
    """The first ``max_images`` (image, prompt) pairs of a run in one PNG, each titled with its prompt."""
    images = [(p, t) for p, t in images if Path(p).is_file()][:max_images]
    if not images:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    cols = min(cols, len(images))
    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (p, title) in zip(axes.flat, images):
        ax.imshow(Image.open(p).convert("RGB"), interpolation="nearest")
        ax.set_title(title if len(title) <= 30 else title[:28] + "…", fontsize=6.5)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
