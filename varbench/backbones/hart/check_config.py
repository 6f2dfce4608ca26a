"""Check our HART model config against the official files, in one command:

    python -m varbench.backbones.hart.check_config /path/to/hart-0.7b-1024px [--model conf/model/hart_0.7b.yaml]

Compares every architecture value of the model config with ``llm/config.json`` and ``tokenizer/config.json``
(the 0.7B values were assumed offline: use_context_norm, attn_l2_norm, norm_eps among them), then builds the model
on the meta device (no memory) and compares its state-dict keys and shapes with the checkpoint files' keys
(``llm/ema_model.bin``, the tokenizer weights) when they are there. Prints one line per difference; exit 0 when
everything matches, 1 otherwise, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from varbench.backbones.hart.load import (
    TF_DEFAULTS,
    TF_FIXED,
    TF_KEYS,
    VAE_DEFAULTS,
    VAE_FIXED,
    VAE_KEYS,
    config_mismatches,
    new_modules,
    weights_file,
)
from varbench.backbones.hart.vae import TokenizerWithDisc
from varbench.errors import UserError

DEFAULT_MODEL = Path(__file__).resolve().parents[3] / "conf" / "model" / "hart_0.7b.yaml"


def meta_modules(arch: dict, vae_cfg: dict):
    """(transformer, tokenizer-with-disc) built on the meta device: state-dict layout without memory."""
    with torch.device("meta"):
        tf, vae = new_modules(arch, vae_cfg)
        return tf, TokenizerWithDisc(vae)


def layout(module: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def compare_layout(ours: dict[str, tuple], ref: dict[str, tuple], what: str) -> list[str]:
    """Keys (both ways), order and shapes of two state-dict layouts."""
    out = []
    missing, extra = [k for k in ref if k not in ours], [k for k in ours if k not in ref]
    if missing:
        out.append(f"{what}: {len(missing)} keys missing from ours, e.g. {missing[:3]}")
    if extra:
        out.append(f"{what}: {len(extra)} keys not in the reference, e.g. {extra[:3]}")
    shapes = [k for k in ref if k in ours and tuple(ours[k]) != tuple(ref[k])]
    if shapes:
        out.append(f"{what}: {len(shapes)} shapes differ, e.g. {shapes[0]} ours {ours[shapes[0]]} ref {ref[shapes[0]]}")
    common = [k for k in ref if k in ours]
    if not missing and not extra and [k for k in ours if k in ref] != common:
        out.append(f"{what}: same keys in a different order")
    return out


def _checkpoint_layout(path: Path) -> dict[str, tuple]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {k: tuple(v.shape) for k, v in sd.items()}


def check(folder: Path, model_yaml: Path) -> list[str]:
    from omegaconf import OmegaConf

    m = OmegaConf.to_container(OmegaConf.load(model_yaml))
    arch, vae_cfg = m["arch"], m["vae"]
    llm, tok = folder / "llm", folder / "tokenizer"
    if not llm.is_dir() and (folder / "config.json").is_file() and folder.name == "llm":
        llm, tok = folder, folder.parent / "tokenizer"
    if not llm.is_dir():
        raise UserError(f"{folder}: expected the official HART folder with llm/ and tokenizer/ inside")
    out = []
    for d, keys, fixed, pre, cfg, dflt in ((llm, TF_KEYS, TF_FIXED, "arch", arch, TF_DEFAULTS),
                                           (tok, VAE_KEYS, VAE_FIXED, "vae", vae_cfg, VAE_DEFAULTS)):
        cj = d / "config.json"
        if cj.is_file():
            out += config_mismatches(cfg, json.loads(cj.read_text()), keys, fixed, pre, dflt)
        else:
            out.append(f"{cj}: not found (values not checked)")
    tf, tok_mod = meta_modules(arch, vae_cfg)
    w = weights_file(llm, ["ema_model.bin", "model.safetensors", "pytorch_model.bin"])
    if w is not None:
        out += compare_layout(layout(tf), _checkpoint_layout(w), str(w))
    w = weights_file(tok, ["model.safetensors", "pytorch_model.bin"])
    if w is not None:
        out += compare_layout(layout(tok_mod), _checkpoint_layout(w), str(w))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="the official hart-0.7b-1024px folder (with llm/ and tokenizer/)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="our model config (default: hart_0.7b.yaml)")
    args = ap.parse_args(argv)
    try:
        diffs = check(args.folder, args.model)
    except UserError as e:
        print(f"check_config: {e}", file=sys.stderr)
        return 2
    for d in diffs:
        print(d)
    print("MATCH" if not diffs else f"DIFFER: {len(diffs)} difference(s)")
    return 0 if not diffs else 1


if __name__ == "__main__":
    sys.exit(main())
