"""Where the configs and the papers' tables are: the checkout's ``conf/`` and ``results/paper/`` when running from
a checkout (or an editable install), else the copies a wheel installs as ``varbench/conf`` and ``varbench/paper``."""
from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent
REPO = _PKG.parent


def conf_dir() -> Path:
    return REPO / "conf" if (REPO / "conf" / "config.yaml").is_file() else _PKG / "conf"


def paper_dir() -> Path:
    return REPO / "results" / "paper" if (REPO / "results" / "paper").is_dir() else _PKG / "paper"
