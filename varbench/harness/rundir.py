"""A run directory knows exactly what made it, is written by one process per shard, and survives kill -9.

Layout (``results/runs/<model>/<bench>/<method>/<tag>/``; the tag is the overrides that change images, never the
clock, so the same command resumes the same run)::

    meta.json                identity (the effective config that determines the images), its hash ``run_id``,
                             git sha, versions, command line, backbone spec (FLOP counting without loading a model)
    images/...               one file per image, written atomically (a killed run leaves no half image)
    records.jsonl            one JSON line per image (unsharded run), or
    records.shard<k>of<n>.jsonl  one file per shard: never two writers on one file
    .lock[.shard<k>of<n>]    an flock held while a process writes (released by the kernel when it dies)

Resuming with a different effective config stops with one line (``IdentityMismatch``) instead of silently mixing
images made with other settings.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from varbench.errors import UserError
from varbench.io import append_jsonl, iter_jsonl, write_json

REPO = Path(__file__).resolve().parents[2]

# config keys that do not change a single image: left out of the identity (and of the directory name)
NON_IDENTITY = ("stage", "progress", "results_root", "score_dir", "score_model", "wandb", "wandb_project", "reference",
                "warmup", "run_dir", "shard", "experiment")
BENCH_NON_IDENTITY = ("limit", "data_dir", "metrics", "weights_dir")


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def identity(cfg: dict, device: str, dtype: str, threads: int | None) -> dict:
    """The effective settings that determine the images of a run (resolved device/dtype/threads included)."""
    ident = {k: v for k, v in cfg.items() if k not in NON_IDENTITY and k not in ("model", "method", "bench")}
    if not ident.get("compile"):   # added after runs existed: off (the default) keeps their identities unchanged
        ident.pop("compile", None)
    bench = {k: v for k, v in cfg["bench"].items() if k not in BENCH_NON_IDENTITY and not isinstance(v, dict)}
    method = {k: v for k, v in cfg["method"].items() if k != "footnote"}
    model = {k: v for k, v in cfg["model"].items() if k not in ("weights_dir", "trust_pickle", "files")}
    return ident | {"model": model, "method": method, "bench": bench, "device": torch.device(device).type,
                    "dtype": dtype, "threads": threads if torch.device(device).type == "cpu" else None}


def run_id(ident: dict) -> str:
    return hashlib.sha256(canonical(ident).encode()).hexdigest()[:12]


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_keys(va, vb, f"{prefix}{k}.")
        elif canonical(va) != canonical(vb):
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=5).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - not a checkout (installed wheel)
        return "unknown"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for pkg in ("transformers", "hydra", "omegaconf", "numpy", "open_clip", "torchvision"):
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - optional
            pass
    return out


def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu:{platform.machine()}:{os.cpu_count()}cores"


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    @property
    def suffix(self) -> str:
        return "" if self.count == 1 else f".shard{self.index}of{self.count}"

    def owns(self, item_index: int) -> bool:
        return item_index % self.count == self.index


class RunDir:
    def __init__(self, path: Path, shard: Shard = Shard()):
        self.path, self.shard = Path(path), shard
        self.images = self.path / "images"
        self._lock_fh = None

    @property
    def records_path(self) -> Path:
        return self.path / f"records{self.shard.suffix}.jsonl"

    def meta_path(self) -> Path:
        return self.path / "meta.json"

    def read_meta(self) -> dict | None:
        p = self.meta_path()
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except ValueError:
            return None

    def check(self, ident: dict) -> dict | None:
        """The existing meta (None for a new run) if it was made with identity ``ident``; one line otherwise."""
        old = self.read_meta()
        if old is not None and old.get("run_id") != run_id(ident):
            diffs = diff_keys(old.get("identity") or {}, ident)
            raise UserError(f"{self.path} was made with other settings ({'; '.join(diffs[:3]) or 'unknown'}); "
                            f"resuming would mix images: pass run_tag=<name> for a separate run, or delete the folder")
        return old

    def open(self, ident: dict, extra: dict) -> None:
        """Create the directory (or resume it after checking its identity), take this shard's lock, write meta."""
        old = self.check(ident)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise UserError(f"cannot create {self.path}: permission denied (set results_root to a writable folder)") from None
        self.lock()
        if old is not None and old.get("git_sha") not in (None, extra.get("git_sha")):
            print(f"[varbench] note: resuming a run started at git {old.get('git_sha')}; this is {extra.get('git_sha')}",
                  file=sys.stderr)
        meta = (old or {}) | extra | {"identity": ident, "run_id": run_id(ident)}
        meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_json(self.meta_path(), meta)

    def lock(self) -> None:
        p = self.path / f".lock{self.shard.suffix}"
        fh = open(p, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise UserError(f"{self.path}{' shard ' + str(self.shard.index) if self.shard.count > 1 else ''} is being "
                            f"written by {holder}; wait for it or stop it (two writers would duplicate the work)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}")
        fh.flush()
        self._lock_fh = fh

    def unlock(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def append_record(self, rec: dict) -> None:
        append_jsonl(self.records_path, [rec])

    def records(self) -> dict[int, dict]:
        """index -> record, merged over every shard file (the last record of an index wins)."""
        out: dict[int, dict] = {}
        for p in sorted(self.path.glob("records*.jsonl")):
            for r in iter_jsonl(p):
                if "index" in r:
                    out[int(r["index"])] = r
        return out
