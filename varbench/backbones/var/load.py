"""Build a VAR backbone from a model config: the official checkpoints (local folder / HF hub cache) or seeded tiny.

Official files (https://huggingface.co/FoundationVision/var): ``vae_ch160v4096z32.pth`` (the VQVAE, shared by every
depth) and ``var_d{16,20,24,30,36}.pth``. Lookup (``varbench/weights.py``): ``<weights_dir>/<file>``
(``model.weights_dir``, else ``$VARBENCH_WEIGHTS``, else ``~/.cache/varbench/weights``), then the Hugging Face hub
cache of ``FoundationVision/var``; nothing is downloaded, and everything missing is reported in one line before
anything heavy is loaded. Both state dicts load strictly (keys and shapes), with one exception that the official
``VQVAE.load_state_dict`` makes too: a ``quantize.ema_vocab_hit_SV`` (training statistics) for another number of
scales is replaced by the module's own buffer (``varbench.msvq.fit_ema_buffer``).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from varbench import weights
from varbench.backbones.var.backbone import VARBackbone, VARSampling
from varbench.backbones.var.model import VARTransformer
from varbench.errors import UserError
from varbench.msvq import VQVAE, fit_ema_buffer
from varbench.weights import load_strict, read_state_dict, resolve_files, weights_dir

ARCH_KEYS = ("depth", "embed_dim", "num_heads", "patch_nums")
VAE_KEYS = ("vocab_size", "z_channels", "ch")


def _need(cfg: dict, keys, where: str) -> None:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise UserError(f"model.{where} needs {', '.join(missing)}")


def new_modules(arch: dict, vae_cfg: dict) -> tuple[VARTransformer, VQVAE]:
    """Our modules for a VAR config (``arch``: the VAR constructor's values; ``vae``: the VQVAE's)."""
    a, v = dict(arch), dict(vae_cfg)
    _need(a, ARCH_KEYS, "arch")
    _need(v, VAE_KEYS, "vae")
    if a["embed_dim"] % a["num_heads"]:
        raise UserError(f"model.arch.embed_dim {a['embed_dim']} is not a multiple of num_heads {a['num_heads']}")
    pns = [int(p) for p in a["patch_nums"]]
    vae = VQVAE(v["vocab_size"], v["z_channels"], v["ch"], tuple(v.get("ch_mult", (1, 1, 2, 2, 4))), len(pns),
                v.get("quant_resi", 0.5), v.get("share_quant_resi", 4))
    if pns[-1] * vae.downsample != int(a.get("resolution", pns[-1] * vae.downsample)):
        raise UserError(f"model.arch.resolution {a['resolution']} != last scale {pns[-1]} x {vae.downsample}")
    tf = VARTransformer(depth=a["depth"], embed_dim=a["embed_dim"], num_heads=a["num_heads"],
                        vocab_size=v["vocab_size"], Cvae=v["z_channels"], patch_nums=pns,
                        num_classes=a.get("num_classes", 1000), mlp_ratio=a.get("mlp_ratio", 4.0),
                        norm_eps=a.get("norm_eps", 1e-6), shared_aln=bool(a.get("shared_aln", False)),
                        attn_l2_norm=bool(a.get("attn_l2_norm", True)))
    return tf, vae


@torch.no_grad()
def _init_rule(name: str, leaf: str, p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """VAR's seeded weights: N(0, 1/fan_in) matrices, codebook and embeddings N(0, 1) (class/position embeddings
    0.3), small biases, ``scale_mul_1H11`` ≈ log 4, GroupNorm weights ≈ 1."""
    if leaf == "scale_mul_1H11":
        return math.log(4.0) + 0.3 * r
    if p.ndim == 1 and leaf == "weight":        # GroupNorm weights
        return 1 + 0.1 * r
    if p.ndim == 1:
        return 0.05 * r
    if name.endswith("embedding.weight"):
        return r
    if leaf in ("pos_start", "pos_1LC") or name.endswith(("class_emb.weight", "lvl_embed.weight")):
        return 0.3 * r
    if leaf == "ada_gss":
        return 0.1 * r
    return r / math.sqrt(p[0].numel())


def seeded_init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic weights by VAR's rule (``varbench.weights.seeded_init_``)."""
    return weights.seeded_init_(module, seed, _init_rule)


def sampling_from_config(s: dict) -> VARSampling:
    known = [f.name for f in dataclasses.fields(VARSampling)]
    unknown = sorted(set(s) - set(known))
    if unknown:
        raise UserError(f"model.sampling: unknown option(s) {', '.join(unknown)} for VAR (known: {', '.join(known)})")
    return VARSampling(**s)


def build_var(mcfg, device="cpu", dtype="fp32") -> VARBackbone:
    """``mcfg``: a model config node (``conf/model/var_d16.yaml`` ... ``var_tiny_random.yaml``)."""
    arch, vcfg = dict(mcfg["arch"]), dict(mcfg["vae"])
    smp = sampling_from_config(dict(mcfg.get("sampling") or {}))
    if mcfg.get("files"):
        files = {k: dict(f) for k, f in mcfg["files"].items()}
        paths = resolve_files(files, weights_dir(mcfg.get("weights_dir")))
        tf, vae = new_modules(arch, vcfg)
        trust = bool(mcfg.get("trust_pickle", False))
        load_strict(vae, fit_ema_buffer(read_state_dict(paths["vae"], trust), vae), str(paths["vae"]))
        load_strict(tf, read_state_dict(paths["transformer"], trust), str(paths["transformer"]))
    else:
        tf, vae = new_modules(arch, vcfg)
        seed = int(mcfg.get("seed", 0))
        seeded_init_(tf, seed)
        seeded_init_(vae, seed + 1)
    tf.to(device).eval()
    vae.to(device).eval()
    return VARBackbone(tf, vae, smp, mcfg.get("rule_widths"), device, dtype, mcfg.get("name", "var"))
