"""Weights shared by backbones and scorers: file lookup (a local folder first, then the Hugging Face hub cache),
reading and strict loading of checkpoints, and seeded weights for the models that need no file.

Nothing is downloaded. Everything missing is reported at once, in one line (``MissingWeights``), before anything
heavy is loaded.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
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


def read_state_dict(path: Path, trust_pickle: bool = False) -> dict:
    """A .pth (``torch.load`` with weights_only unless trusted) or .safetensors file, floats as float32."""
    return as_float32(load_checkpoint(path, trust_pickle))


def as_float32(sd: dict) -> dict:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def load_checkpoint(path: Path, trust_pickle: bool = False) -> dict:
    """The dict a .pth (``torch.load`` with weights_only unless trusted) or .safetensors file holds, as stored; an
    unreadable file or one that holds no dict is one line."""
    path = Path(path)
    if path.suffix == ".safetensors":
        sd = load_safetensors(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except Exception as e:  # noqa: BLE001 - torch raises several kinds for a bad or pickled file
            raise UserError(f"could not read {path} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''});"
                            f" if it is a trusted pickle, set model.trust_pickle=true") from None
    if not isinstance(sd, dict):
        raise UserError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    return sd


def load_strict(module: torch.nn.Module, sd: dict, what: str, hint: str = "check model.arch / model.vae against "
                "the checkpoint") -> None:
    """``load_state_dict(strict=True)``; a mismatch is one line naming the first keys/shapes that differ."""
    own = module.state_dict()
    missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs ours {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise UserError(f"{what} does not match the model config: {len(missing)} missing {missing[:3]}, "
                        f"{len(unexpected)} unexpected {unexpected[:3]}, shapes differ {shapes[:2]} -- {hint}")
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f"{what}: {state_dict_mismatch(e)}") from None


InitRule = Callable[[str, str, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def seeded_init_(module: torch.nn.Module, seed: int, rule: InitRule) -> torch.nn.Module:
    """Deterministic weights for a model without files (the ``*_random`` configs, the fixtures' tiny models): one
    N(0, 1) draw ``r`` of each parameter's shape, in ``named_parameters`` order, and the parameter set to
    ``rule(name, leaf, p, r)`` (each family's rule: matrices N(0, 1/fan_in), norms ≈ 1, small biases, ...).

    Drawn where the parameters live, from a generator on that device (CPU: the same numbers as always; a CUDA
    generator draws other numbers from the same seed). Parameters on the meta device are left as they are (shapes
    only)."""
    params = list(module.named_parameters())
    dev = params[0][1].device if params else torch.device("cpu")
    if dev.type == "meta":
        return module
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, p in params:
        p.copy_(rule(name, name.rsplit(".", 1)[-1], p, torch.randn(p.shape, generator=g, device=dev)))
    return module
