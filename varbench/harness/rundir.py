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
from varbench.io import append_jsonl, is_temp_of, iter_jsonl, write_json

REPO = Path(__file__).resolve().parents[2]

# config keys that do not change a single image: left out of the identity (and of the directory name)
NON_IDENTITY = ("stage", "progress", "results_root", "score_dir", "score_model", "wandb", "wandb_project", "reference",
                "warmup", "run_dir", "shard", "experiment", "code_change", "record_maps")
# core modules whose code determines images (the loop, its hooks and the shared kernels), fingerprinted with the
# backbone family's folder and the method's module in every run's meta.json
CORE_IMAGE_CODE = ("varbench/loop.py", "varbench/hooks.py", "varbench/tokens.py", "varbench/attention.py",
                   "varbench/entropy.py", "varbench/sampling.py", "varbench/msvq.py", "varbench/kvcache.py",
                   "varbench/stack.py", "varbench/backbones/base.py")
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


def code_fingerprint(paths) -> dict[str, str]:
    """sha256 (12 hex) of each file that determines a run's images: Python sources and weight files, not docs.
    ``paths``: files or folders (searched for ``*.py`` and ``*.safetensors``); keys are paths relative to the
    checkout (or to the folder above a plug-in's package)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.suffix in (".py", ".safetensors") and "__pycache__" not in f.parts]
        elif p.is_file():
            files.append(p)
    out = {}
    for f in sorted(set(files)):
        f = f.resolve()
        rel = f.relative_to(REPO) if f.is_relative_to(REPO) else Path(*f.parts[-3:])
        out[str(rel)] = hashlib.sha256(f.read_bytes()).hexdigest()[:12]
    return out


def code_changes(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two code fingerprints (changed, added, removed files)."""
    out = [f"{k} changed" for k in sorted(set(old) & set(new)) if old[k] != new[k]]
    out += [f"{k} added" for k in sorted(set(new) - set(old))] + [f"{k} removed" for k in sorted(set(old) - set(new))]
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
        """The run's meta.json, or None where there is none. A damaged or foreign one (not JSON, not an object,
        no identity) is one line: it is what makes resuming safe, so it is never silently treated as absent."""
        p = self.meta_path()
        if not p.exists():
            return None
        try:
            meta = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(self._damaged(f"not JSON: {str(e).split(':')[0]}")) from None
        if not isinstance(meta, dict) or not isinstance(meta.get("identity"), dict) or "run_id" not in meta:
            raise UserError(self._damaged("not a varbench meta.json: no identity/run_id"))
        return meta

    def _damaged(self, why: str) -> str:
        return (f"{self.meta_path()} is damaged or foreign ({why}); the run's identity cannot be checked: restore "
                f"the file, or move {self.path} aside (or pass run_tag=<name>) to start a new run")

    def check(self, ident: dict) -> dict | None:
        """The existing meta (None for a new run) if it was made with identity ``ident``; one line otherwise."""
        old = self.read_meta()
        if old is not None and old.get("run_id") != run_id(ident):
            diffs = diff_keys(old.get("identity") or {}, ident)
            raise UserError(f"{self.path} was made with other settings ({'; '.join(diffs[:3]) or 'unknown'}); "
                            f"resuming would mix images: pass run_tag=<name> for a separate run, or delete the folder")
        return old

    def open(self, ident: dict, extra: dict, wait: bool = False, code_change: str = "stop") -> None:
        """Create the directory (or resume it after checking its identity), take this shard's lock, write meta.
        ``wait``: if another process holds the lock, wait for it (a shared reference run) instead of stopping.
        ``extra["code"]`` (a code fingerprint): resuming a run whose images were made by other code stops in one
        line naming the file, unless ``code_change="keep"`` (then the new fingerprint is recorded)."""
        self.check(ident)                     # before anything is created: a mismatch costs nothing
        if not self.meta_path().exists() and self.path.is_dir() and \
                any(not self._own_bookkeeping(p.name) for p in self.path.iterdir()):
            raise UserError(f"{self.path} is not empty and holds no varbench run (no meta.json): refusing to write "
                            f"into it; pick an empty or new folder for run_dir")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise UserError(f"cannot create {self.path}: permission denied (set results_root to a writable folder)") from None
        self.lock(wait)
        try:
            old = self.check(ident)           # again under the lock: another writer may have created it meanwhile
        except UserError:
            self.unlock()
            raise
        changes = code_changes(old.get("code") or {}, extra.get("code") or {}) if old and old.get("code") else []
        if changes and code_change != "keep":
            self.unlock()
            raise UserError(f"{self.path}: its images were made by other code ({'; '.join(changes[:3])}"
                            f"{'; ...' if len(changes) > 3 else ''}); keep them and go on with code_change=keep, or "
                            f"redo them: run_tag=<name> for a new run, or delete the folder")
        if changes:
            print(f"[varbench] note: code_change=keep: resuming {self.path} although {'; '.join(changes[:3])}",
                  file=sys.stderr)
        if old is not None and old.get("git_sha") not in (None, extra.get("git_sha")):
            print(f"[varbench] note: resuming a run started at git {old.get('git_sha')}; this is {extra.get('git_sha')}",
                  file=sys.stderr)
        meta = (old or {}) | extra | {"identity": ident, "run_id": run_id(ident)}
        meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_json(self.meta_path(), meta)

    def _own_bookkeeping(self, name: str) -> bool:
        """Files another worker of this run writes before meta.json is in place: its lock and the atomic write's
        temp file (``varbench.io``: ``.meta.json.<pid>.tmp``, renamed into place)."""
        return name.startswith(".lock") or is_temp_of(name, self.meta_path())

    def lock(self, wait: bool = False) -> None:
        p = self.path / f".lock{self.shard.suffix}"
        fh = open(p, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            if wait:
                print(f"[varbench] waiting for {self.path} (being written by {holder}); it is shared, so its images "
                      f"are made once", file=sys.stderr)
                fcntl.flock(fh, fcntl.LOCK_EX)
            else:
                fh.close()
                raise UserError(f"{self.path}{' shard ' + str(self.shard.index) if self.shard.count > 1 else ''} is being "
                                f"written by {holder}; wait for it or stop it (two writers would duplicate the work)") \
                    from None
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
