"""Per-batch generation records: wall time per scale (device-synchronised), tokens computed, keys, peak memory."""
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
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_process_max_rss"


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
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    batch: int = 1

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
