"""Named time ranges for ``torch.profiler`` (``scripts/bench_speed.py --profile``), off by default.

Code marks a region with ``with prange("vb.attention"):``. While profiling is off (the default) ``prange`` returns
one shared no-op context manager: a global read and a call, no allocation, no profiler event. ``enabled(True)``
turns the ranges into ``torch.profiler.record_function`` ranges, which a running ``torch.profiler.profile`` records.

Range names (``vb.<part>``) and the part each belongs to in the printed breakdown (:data:`CATEGORIES`):
blocks (``vb.block.<branch>``, minus the attention and KV cache ranges nested in them), attention, kv_cache, head,
sampling (guidance, sampling, code update, next scale's input), and the method's bookkeeping (``vb.method.<hook>``:
plan, select, gather, restore, after_layer (entropy, caches), after_logits, after_scale).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch

_ON = False
_NULL = contextlib.nullcontext()

# range name prefix -> breakdown part; nested ranges are subtracted from the range that contains them
CATEGORIES = (
    ("vb.attention", "attention"),
    ("vb.kv_cache", "kv_cache"),
    ("vb.block.", "blocks"),
    ("vb.head", "head"),
    ("vb.sample", "sampling"),
    ("vb.method.", "bookkeeping"),
)
PARTS = ("blocks", "attention", "kv_cache", "head", "sampling", "bookkeeping")


def enabled(on: bool | None = None) -> bool:
    """Turn the ranges on/off (None: only read the state). Returns the state before the call."""
    global _ON
    before = _ON
    if on is not None:
        _ON = bool(on)
    return before


def prange(name: str):
    """A profiler range named ``name`` while profiling is on, else a shared no-op context manager."""
    return torch.profiler.record_function(name) if _ON else _NULL


def category(name: str) -> str | None:
    for prefix, part in CATEGORIES:
        if name == prefix or name.startswith(prefix):
            return part
    return None


def breakdown(events) -> dict:
    """Exclusive time (seconds) per part from profiler ``FunctionEvent``s of the ``vb.*`` ranges.

    Each range's own time is its duration minus the ranges of other parts nested directly inside it, so a part
    is never counted twice (attention inside a block counts as attention, not as block)."""
    spans = []
    for e in events:
        part = category(e.name)
        if part is not None:
            spans.append((e.time_range.start, e.time_range.end, part, e.name))
    spans.sort(key=lambda s: (s[0], -s[1]))
    out: dict = defaultdict(float)
    stack: list = []  # [start, end, part, nested_other_part_time]
    def close(item):
        out[item[2]] += (item[1] - item[0] - item[3]) * 1e-6
    for s, e, part, _ in spans:
        while stack and stack[-1][1] <= s:
            close(stack.pop())
        if stack:
            parent = stack[-1]
            if parent[2] != part:
                parent[3] += e - s
            else:  # same part nested in itself: count it once (in the parent)
                continue
        stack.append([s, e, part, 0.0])
    while stack:
        close(stack.pop())
    return {p: out.get(p, 0.0) for p in PARTS}
