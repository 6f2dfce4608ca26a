"""Names -> "module:attr", imported lazily. Adding a backbone family, a method or a metric is one line here.

Unknown names fail with one line and a suggestion (``UserError``), before anything heavy is loaded.
"""
from __future__ import annotations

import importlib

from varbench.errors import UserError, did_you_mean

BACKBONES = {
    "infinity": "varbench.backbones.infinity.load:build_infinity",
}

METHODS = {
    "none": "varbench.hooks:Method",
    "nova": "nova.method:Nova",
    "fastvar": "baselines.fastvar:FastVAR",
    "skipvar": "baselines.skipvar:SkipVAR",
    "sparsevar": "baselines.sparsevar:SparseVAR",
}


METRICS = {
    "geneval": "eval.geneval.scorer:run",
    "dpg": "eval.dpg:run",
    "mjhq": "eval.mjhq:run",
    "hpsv2": "eval.hpsv2:run",
    "imagereward": "eval.imagereward:run",
    "shapes": "eval.shapes.scorer:run",
}


def _load(table: dict, kind: str, name: str):
    if name not in table:
        raise UserError(f"unknown {kind} {name!r}{did_you_mean(name, table)}; known: {', '.join(sorted(table))}")
    mod, attr = table[name].split(":")
    return getattr(importlib.import_module(mod), attr)


def method_class(name: str):
    return _load(METHODS, "method", name)


def build_method(mcfg: dict):
    """``mcfg``: the ``method`` config node as a dict; ``name`` picks the class, the other keys are its options."""
    opts = {k: v for k, v in mcfg.items() if k not in ("name", "method")}
    key = mcfg.get("method", mcfg["name"])  # ablation configs name their own row but reuse a class
    cls = method_class(key)
    m = _construct(cls, key, opts)
    m.name = str(mcfg["name"])  # rows are named by the config (nova_attn, fastvar_8b, ...), not by the class
    return m


def _construct(cls, key: str, opts: dict):
    if not opts:
        return cls()
    cfg_cls = getattr(cls, "Config", None)
    if cfg_cls is None:
        raise UserError(f"method {key!r} takes no options, got {sorted(opts)}")
    try:
        return cls(cfg_cls(**opts))
    except TypeError as e:
        raise UserError(f"bad options for method {key!r}: {e}") from None


def metric_fn(name: str):
    return _load(METRICS, "metric", name)


def build_backbone(model_cfg: dict, device: str, dtype: str):
    family = model_cfg.get("family", "infinity")
    return _load(BACKBONES, "backbone family", family)(model_cfg, device=device, dtype=dtype)
