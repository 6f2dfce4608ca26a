"""Weight-file lookup shared by backbones and scorers: a local folder first, then the Hugging Face hub cache.

Nothing is downloaded. Everything missing is reported at once, in one line (``MissingWeights``), before anything
heavy is loaded.
"""
from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from varbench.errors import MissingWeights, UserError


def weights_dir(cfg_dir: str | None) -> Path:
    return Path(os.path.expanduser(cfg_dir or os.environ.get("VARBENCH_WEIGHTS", "~/.cache/varbench/weights")))


def find_file(name: str, wdir: Path, hf_repo: str | None, snapshot: bool = False) -> Path | None:
    """``<wdir>/<name>``, else the HF hub cache (a file of ``hf_repo``, or with ``snapshot`` the whole repo)."""
    p = wdir / name
    if p.exists():
        return p
    if not hf_repo:
        return None
    try:
        from huggingface_hub import snapshot_download, try_to_load_from_cache

        if snapshot:
            return Path(snapshot_download(hf_repo, local_files_only=True))
        hit = try_to_load_from_cache(hf_repo, name)
        if isinstance(hit, str):
            return Path(hit)
        snap = Path(snapshot_download(hf_repo, local_files_only=True, allow_patterns=[f"{name}/*"]))
        return snap / name if (snap / name).exists() else None
    except Exception:  # noqa: BLE001 - not cached (the hub raises several kinds of errors offline)
        return None


def resolve_files(files: dict, wdir: Path, setting: str = "model.weights_dir") -> dict[str, Path]:
    """``files``: role -> {file, hf_repo, url}. Returns role -> path, or raises one MissingWeights for all."""
    found, missing = {}, []
    for role, f in files.items():
        p = find_file(f["file"], wdir, f.get("hf_repo"), bool(f.get("snapshot")))
        if p is None:
            where = f"{wdir}" + (f" and the HF cache of {f['hf_repo']}" if f.get("hf_repo") else "")
            missing.append((f["file"], where, f.get("url", f.get("hf_repo", "?"))))
        else:
            found[role] = p
    if missing:
        raise MissingWeights(missing, setting)
    return found




def load_safetensors(path) -> dict:
    """A .safetensors file as a state dict; a truncated or corrupt file is one line naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                        f"(truncated or corrupt? re-download or rebuild it)") from None


def state_dict_mismatch(err: Exception) -> str:
    """The first informative line of torch's load_state_dict error (the key and the two shapes)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    detail = [ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    return (detail or lines or [type(err).__name__])[0][:300]
