"""Optional mirror of a run to Weights & Biases (``wandb=true``; off by default; ``pip install -e '.[wandb]'``).

Logs the resolved config, the run's metrics (the same numbers as the results store) and a few sample images. The
results store stays the source of truth; W&B is a view. Set WANDB_MODE=offline to log without a network.
"""
from __future__ import annotations

from pathlib import Path

from varbench.errors import UserError


def mirror(cfg: dict, run_dir: Path, metrics: dict, n_images: int = 8) -> None:
    try:
        import wandb
    except ImportError:
        raise UserError("wandb=true needs the wandb package: pip install -e '.[wandb]'") from None
    name = f"{cfg['model']['name']}/{cfg['bench']['name']}/{cfg['method']['name']}/{run_dir.name}"
    run = wandb.init(project=cfg.get("wandb_project") or "varbench", name=name, config=cfg, dir=str(run_dir),
                     reinit=True)
    run.log({k: v for k, (v, _) in metrics.items() if v is not None})
    imgs = sorted((run_dir / "images").rglob("*.png"))[:n_images]
    if imgs:
        run.log({"samples": [wandb.Image(str(p), caption=str(p.relative_to(run_dir / "images"))) for p in imgs]})
    run.finish()
