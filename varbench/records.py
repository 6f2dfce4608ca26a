"""Per-batch generation records: wall time per scale (device-synchronised), tokens computed, keys, memory.

Memory, recorded for every image on every device:
  kv_bytes[si][li]  bytes of layer li's self-attention keys+values kept after scale si (after any ``compress_kv``)
  kv_peak_bytes     the most KV-cache bytes held at once, over all layers: measured after each layer's append (its
                    cache then holds this scale's keys, earlier layers' caches their kept keys, later layers' those of
                    the previous scale), before the layer's compression; bytes of the tensors' own elements
                    (Infinity's static cache reserves the whole schedule's buffer from scale 0: same peak for none)
  loop_peak_bytes   the most bytes of tensors the loop holds at once (KV caches, the conditioning, the accumulated
                    state, the hidden states entering and leaving the block, the logits), counted exactly from the
                    tensors at every layer boundary; intermediates inside a block are not included
  peak_memory_bytes GPU: ``torch.cuda.max_memory_allocated`` (kind ``cuda_max_allocated``); CPU: ``loop_peak_bytes``
                    (kind ``cpu_loop_tensors``; the process's RSS is kept apart in ``rss_peak_bytes``, not a per-run
                    figure: it never decreases within a process)
"""
from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field

import torch


def sync(device: torch.device | str) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device) -> tuple[int, str]:
    """Peak GPU memory allocated since the last reset, or (on CPU) the process's peak resident set size."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return rss_peak_bytes(), "cpu_process_max_rss"


def rss_peak_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def tensor_bytes(*objs) -> int:
    """Bytes of the elements of every tensor reachable in ``objs`` (tensors, lists, tuples, dicts, dataclass-like
    objects' attributes), each storage region counted once (views of one buffer are not double-counted)."""
    seen: set = set()
    total, stack = 0, list(objs)
    while stack:
        o = stack.pop()
        if o is None or isinstance(o, (str, int, float, bool)):
            continue
        if isinstance(o, torch.Tensor):
            key = (o.data_ptr(), o.numel(), o.dtype)
            if key not in seen and o.numel():
                seen.add(key)
                total += o.numel() * o.element_size()
            continue
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif hasattr(o, "__dict__") and not callable(o):
            stack.extend(vars(o).values())
    return total


def kv_bytes(kv) -> int:
    """Bytes of one layer cache's keys and values (``kv.k``/``kv.v``, None when empty)."""
    return sum(t.numel() * t.element_size() for t in (getattr(kv, "k", None), getattr(kv, "v", None)) if t is not None)


class MemoryTracker:
    """KV-cache bytes per layer as the loop runs, their peak sum, and the peak bytes of the tensors the loop holds."""

    def __init__(self, depth: int):
        self.kv = [0] * depth
        self.kv_peak = 0
        self.loop_peak = 0
        self.held = 0          # bytes outside the caches held for the whole scale (conditioning, state)

    def observe(self, li: int | None = None, kv_now: int | None = None, *live: torch.Tensor) -> None:
        """``kv_now``: layer ``li``'s cache bytes at this moment (else the recorded ones); ``live``: tensors held now."""
        if li is not None and kv_now is not None:
            self.kv[li] = kv_now
        total = sum(self.kv)
        self.kv_peak = max(self.kv_peak, total)
        self.loop_peak = max(self.loop_peak, total + self.held + tensor_bytes(*live))


@dataclass
class GenRecord:
    """What the loop measured for one batch; ``per_image`` splits it into one dict per image."""

    scale_hw: list = field(default_factory=list)          # [(h, w)] per scale
    scale_n: list = field(default_factory=list)           # tokens fed to the blocks per scale (h*w; HART s0: context)
    scale_time_s: list = field(default_factory=list)      # wall time per scale, device-synchronised
    tokens: list = field(default_factory=list)            # [scale][layer] tokens computed (mean over branches)
    kv_len: list = field(default_factory=list)            # [scale][layer] keys in the self-attention cache after it
    attn_keys: list = field(default_factory=list)         # [scale][layer] keys attended per query (sparse kernels)
    rows: list = field(default_factory=list)              # transformer batch rows per scale (2B with CFG)
    text_len: list = field(default_factory=list)          # text tokens per image (cross-attention keys)
    skipped_scales: list = field(default_factory=list)
    cond_only_from: int | None = None
    decode_time_s: float = 0.0
    total_time_s: float = 0.0
    kv_kept: list = field(default_factory=list)           # [scale][layer] keys the cache keeps after the scale
    kv_bytes: list = field(default_factory=list)          # [scale][layer] bytes of those keys + values
    kv_peak_bytes: int = 0                                # most KV bytes held at once (all layers)
    loop_peak_bytes: int = 0                              # most bytes of tensors the loop holds at once
    rss_peak_bytes: int = 0                               # the process's max RSS so far (CPU; not per run)
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    batch: int = 1
    kept_maps: dict | None = None    # record_maps: {si: [per layer: kept token indices of row 0, or None = all]}

    def per_image(self) -> list[dict]:
        d = asdict(self)
        d["time_per_image_s"] = self.total_time_s / max(1, self.batch)
        return [dict(d) for _ in range(self.batch)]


class Stopwatch:
    def __init__(self, device):
        self.device = device
        sync(device)
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        sync(self.device)
        t = time.perf_counter()
        dt, self.t0 = t - self.t0, t
        return dt
