"""Names -> classes and functions, imported lazily, from the tables that sit next to what they name:

  backbone families  ``varbench/backbones/__init__.py``  BACKBONES
  methods            ``nova/__init__.py`` and ``baselines/__init__.py``  METHODS   (plus ``none``: the base class)
  metrics            ``eval/__init__.py``  METRICS

Unknown names fail with one line and a suggestion (``UserError``), before anything heavy is loaded.
``register_configs()`` stores every method's ``Config`` dataclass as the Hydra schema ``method/_<family>``, so the
yamls in ``conf/method/`` only override defaults (one source of truth for defaults and types).
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import fields

from hydra.core.config_store import ConfigStore

import baselines
import eval as metrics_pkg
import nova
from varbench.backbones import BACKBONES
from varbench.errors import UserError, did_you_mean
from varbench.hooks import Method

METHODS = {"none": "varbench.hooks:Method", **nova.METHODS, **baselines.METHODS}
METRICS = metrics_pkg.METRICS


def _load(table: dict, kind: str, name: str):
    if name not in table:
        raise UserError(f"unknown {kind} {name!r}{did_you_mean(name, table)}; known: {', '.join(sorted(table))}")
    mod, attr = table[name].split(":")
    return getattr(importlib.import_module(mod), attr)


def method_class(family: str) -> type[Method]:
    return _load(METHODS, "method", family)


def build_method(mcfg: dict) -> Method:
    """``mcfg``: the ``method`` config node as a dict; ``family`` picks the class (default: ``name``), the other
    keys are the fields of its ``Config`` dataclass (validated there, one-line errors)."""
    mcfg = dict(mcfg)
    family = str(mcfg.get("family") or mcfg["name"])
    cls = method_class(family)
    known = {f.name for f in fields(cls.Config)}
    unknown = sorted(set(mcfg) - known)
    if unknown:
        raise UserError(f"method {family!r} has no option {unknown[0]!r}{did_you_mean(unknown[0], known)}; "
                        f"options: {', '.join(sorted(known - {'name', 'family', 'footnote'}))}")
    mcfg.setdefault("family", family)
    try:
        return cls(cls.Config(**mcfg))
    except TypeError as e:
        raise UserError(f"bad options for method {family!r}: {e}") from None


def metric_fn(name: str):
    return _load(METRICS, "metric", name)


def backbone_builder(family: str):
    return _load(BACKBONES, "backbone family", family)


def build_backbone(model_cfg: dict, device: str, dtype: str, compile: bool = False):
    """The backbone of a model config; ``compile=True`` (opt-in ``torch.compile`` of the blocks) where the family's
    builder offers it (a ``compile`` parameter: Infinity), else a one-line error."""
    builder = backbone_builder(model_cfg.get("family", "infinity"))
    if compile:
        check_compile(model_cfg)
    return builder(model_cfg, device=device, dtype=dtype, **({"compile": True} if compile else {}))


def check_compile(model_cfg: dict) -> None:
    """One line unless the model's backbone builder takes ``compile`` (Infinity; not HART)."""
    family = model_cfg.get("family", "infinity")
    if "compile" not in inspect.signature(backbone_builder(family)).parameters:
        raise UserError(f"compile=true is implemented for Infinity backbones; model "
                        f"{model_cfg.get('name')!r} is {family!r} (run it with compile=false)")


def register_configs() -> None:
    """Hydra schemas ``method/_<family>`` from each method's Config dataclass (idempotent)."""
    cs = ConfigStore.instance()
    for family in METHODS:
        cs.store(group="method", name=f"_{family}", node=method_class(family).Config)
