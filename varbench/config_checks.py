"""One-line checks of config values, shared by the backbone families' ``check_config(model)`` (each family's load
module): unknown keys, numbers in range, integers, per-scale lists. Every failure is a ``UserError`` naming the full
key (``model.sampling.tau``), the value and what is allowed."""
from __future__ import annotations

import math
import numbers

from varbench.errors import UserError, did_you_mean


def keys(node, allowed, where: str) -> dict:
    """``node`` as a dict whose keys are all in ``allowed`` (an unknown key is refused, with a suggestion)."""
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise UserError(f"{where} must be a mapping, got {node!r}")
    unknown = sorted(set(node) - set(allowed))
    if unknown:
        raise UserError(f"{where}.{unknown[0]} is not an option{did_you_mean(unknown[0], allowed)}; "
                        f"options: {', '.join(sorted(allowed))}")
    return node


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def number(value, key: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           n_scales: int | None = None) -> None:
    """A finite number in [lo, hi] (``lo_open``: lo excluded) — or, where ``n_scales`` is given, one per scale."""
    if isinstance(value, (list, tuple)) and n_scales is not None:
        if len(value) != n_scales:
            raise UserError(f"{key} has {len(value)} per-scale values; the schedule has {n_scales} scales")
        for i, v in enumerate(value):
            number(v, f"{key}[{i}]", lo, hi, lo_open)
        return
    if not _is_number(value):
        raise UserError(f"{key} must be a number{' or one per scale' if n_scales else ''}, got {value!r}")
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    if low_bad or (hi is not None and value > hi):
        rng = f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise UserError(f"{key} must be in {rng}, got {value!r}")


def integer(value, key: str, lo: int | None = None, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"{key} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise UserError(f"{key} must be in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}], got {value!r}")


def choice(value, key: str, options) -> None:
    if value not in options:
        raise UserError(f"{key} must be one of {', '.join(map(str, options))}, got {value!r}")
