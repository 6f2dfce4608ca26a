"""Files a run writes, written so that a killed process never leaves a half file behind or loses a finished one.

* ``atomic_write_bytes/text``: write a temporary sibling, fsync, ``os.replace``; a reader sees the old or the new
  file, never a prefix.
* ``append_jsonl``: one JSON object per line, appended. If the file ends in a torn line (a process was killed in
  the middle of a write), a newline is written first, so the torn line stays isolated and every later record is
  intact. ``read_jsonl`` skips lines that do not parse (and says how many it skipped).
* ``to_uint8`` / ``save_image``: images in [-1, 1] to uint8 the way the official code truncates, saved atomically.
"""
from __future__ import annotations

import io as _io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from PIL import Image

from varbench.errors import UserError


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def is_temp_of(name: str, path: Path) -> bool:
    """Is ``name`` (in ``path``'s folder) an atomic write of ``path`` under way, by any process?"""
    return name.startswith(f".{Path(path).name}.") and name.endswith(".tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except PermissionError:
        raise UserError(f"cannot write {path}: permission denied (choose another results_root)") from None
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Replace a JSON-lines file atomically."""
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Append rows as JSON lines; a torn last line (killed writer) is first closed with a newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r, default=str) + "\n" for r in rows)
    try:
        with open(path, "ab+") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    lines = "\n" + lines
            f.write(lines.encode())
            f.flush()
            os.fsync(f.fileno())
    except PermissionError:
        raise UserError(f"cannot write {path}: permission denied (choose another results_root)") from None


def iter_jsonl(path: Path) -> Iterator[dict]:
    """The parseable JSON objects of a JSON-lines file (torn or corrupt lines are skipped)."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                yield obj


def read_jsonl(path: Path) -> list[dict]:
    return list(iter_jsonl(path))


def to_uint8(images_pm1: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] -> uint8 [B,H,W,3], truncating like the official code (spec infinity.md §6.7)."""
    return ((images_pm1.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).mul(255).to(torch.uint8).cpu()


def save_image(arr_HW3: torch.Tensor, path: Path, **pil_kwargs) -> None:
    """Atomically save uint8 [H, W, 3]; ``pil_kwargs`` for ``PIL.Image.save`` (default: PNG, or JPEG quality 95 =
    cv2's default, as the official scripts save, for a .jpg/.jpeg path)."""
    path = Path(path)
    if not pil_kwargs:
        jpg = path.suffix.lower() in (".jpg", ".jpeg")
        pil_kwargs = {"format": "JPEG", "quality": 95} if jpg else {"format": "PNG"}
    buf = _io.BytesIO()
    Image.fromarray(arr_HW3.numpy()).save(buf, **pil_kwargs)
    atomic_write_bytes(path, buf.getvalue())


def image_ok(path: Path) -> bool:
    """True if ``path`` is a complete, decodable image (a truncated or corrupt file is regenerated)."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - truncated or corrupt
        return False
