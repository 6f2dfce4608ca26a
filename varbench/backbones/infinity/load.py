"""Build an Infinity backbone from a model config: official files (local folder / HF hub cache) or seeded tiny.

File lookup order for each weight file: ``<weights_dir>/<file>``, then the Hugging Face hub cache
(``HF_HOME``/``HF_HUB_CACHE``, no network). Everything missing is reported in one line (``MissingWeights``)
before anything heavy is loaded. Official checkpoints load *strictly*, except for the differences the official
loader hides on purpose (spec infinity.md §11.11): absent ``zero_k_bias`` buffers (zeros) and a ``cfg_uncond``
longer or shorter than ``text_maxlen`` (trimmed / padded with our init, like the official ``load_state_dict``).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from varbench import config_checks as cc
from varbench import weights
from varbench.backbones.infinity.backbone import InfinityBackbone, Sampling
from varbench.backbones.infinity.model import InfinityTransformer
from varbench.backbones.infinity.schedules import PN_TO_NUM_SCALES, TEMPLATES, schedule_from_config
from varbench.backbones.infinity.text import T5TextEncoder
from varbench.backbones.infinity.vae import BSQVAE, load_vae_state_dict
from varbench.errors import UserError
from varbench.weights import find_file, load_safetensors, resolve_files, state_dict_mismatch, weights_dir  # noqa: F401


# ---------------------------------------------------------------- state dicts
def read_state_dict(path: Path, key: str | None = None, trust_pickle: bool = False) -> dict:
    """A .safetensors / .pth file, or an HF-sharded folder (``*.index.json``)."""
    path = Path(path)
    if path.is_dir():
        idx = sorted(path.glob("*.index.json"))
        if not idx:
            raise UserError(f"{path} is a folder without a *.index.json shard index")
        shards = sorted(set(json.loads(idx[0].read_text())["weight_map"].values()))
        sd = {}
        for s in shards:
            sd.update(read_state_dict(path / s, None, trust_pickle))
        return sd
    sd = weights.load_checkpoint(path, trust_pickle)
    if key is not None and key in sd:
        sd = sd[key]
    return weights.as_float32(sd)


def load_transformer_state(model: InfinityTransformer, sd: dict) -> None:
    sd = dict(sd)
    own = model.state_dict()
    for k in own:
        if k.endswith("zero_k_bias") and k not in sd:
            sd[k] = own[k]
    if "cfg_uncond" in sd and sd["cfg_uncond"].shape[0] != own["cfg_uncond"].shape[0]:
        n, old = own["cfg_uncond"].shape[0], sd["cfg_uncond"]
        sd["cfg_uncond"] = old[:n] if old.shape[0] >= n else torch.cat((old, own["cfg_uncond"][old.shape[0]:]))
    missing, unexpected = set(own) - set(sd), set(sd) - set(own)
    if missing or unexpected:
        raise UserError(f"checkpoint does not match the architecture: missing {sorted(missing)[:5]}"
                        f"{'...' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------- seeded weights (tiny)
def _init_rule(name: str, leaf: str, p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Infinity's seeded weights: N(0, 1/fan_in) matrices, norms ≈ 1, biases small, its special tensors sane."""
    if leaf == "scale_mul_1H11":
        return math.log(4.0) + 0.3 * r
    if leaf == "ada_gss":
        return 0.25 * r
    if leaf == "cfg_uncond":
        return 1.2 / math.sqrt(p.shape[-1]) * r
    if p.ndim == 1 and ("norm" in name or name.endswith("text_norm.weight")) and leaf == "weight":
        return 1 + 0.1 * r
    if p.ndim == 1:
        return 0.05 * r
    return r / math.sqrt(p[0].numel() if p.ndim > 1 else p.shape[-1])


def seeded_init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic weights by Infinity's rule (``varbench.weights.seeded_init_``: drawn on the parameters' device,
    meta parameters left as shapes)."""
    return weights.seeded_init_(module, seed, _init_rule)


# ---------------------------------------------------------------- config
MODEL_KEYS = ("name", "family", "seed", "arch", "vae", "text", "schedule", "sampling", "files", "package_weights",
              "weights_dir", "trust_pickle", "init_on_device")
ARCH_KEYS = ("depth", "embed_dim", "num_heads", "mlp_ratio", "block_chunks", "text_channels", "text_maxlen")
VAE_KEYS = ("codebook_dim", "base_ch", "ch_mult", "num_res_blocks", "patch_size", "patchify")


def check_config(m: dict) -> None:
    """Every field of an Infinity model config, checked before anything is built (one line each): unknown keys,
    the schedule (an official ``pn`` and an exact template ``h_div_w``, or explicit ``hws``; never both), and the
    sampling values (cfg >= 0, tau > 0, top_k >= 0, top_p in [0, 1], per-scale lists as long as the schedule)."""
    cc.keys(m, MODEL_KEYS, "model")
    a = cc.keys(m.get("arch"), ARCH_KEYS, "model.arch")
    for k in ("depth", "embed_dim", "num_heads", "block_chunks", "text_channels", "text_maxlen"):
        if k in a:
            cc.integer(a[k], f"model.arch.{k}", lo=1)
    cc.keys(m.get("vae"), VAE_KEYS, "model.vae")
    cc.keys(m.get("text"), ("layers", "heads"), "model.text")
    s = cc.keys(m.get("schedule"), ("h_div_w", "pn", "hws", "rule_widths"), "model.schedule")
    if s.get("hws") is not None:
        extra = [k for k in ("pn", "h_div_w") if s.get(k) is not None]
        if extra:
            raise UserError(f"model.schedule.{extra[0]} cannot be combined with model.schedule.hws (this model's "
                            f"explicit scales); drop one of them")
    else:
        cc.choice(str(s.get("pn")), "model.schedule.pn", list(PN_TO_NUM_SCALES))
        hw = s.get("h_div_w", 1.0)
        cc.number(hw, "model.schedule.h_div_w", lo=0, lo_open=True)
        if not any(abs(float(hw) - t) < 1e-6 for t in TEMPLATES):
            raise UserError(f"model.schedule.h_div_w={hw} is not one of Infinity's aspect-ratio templates "
                            f"({', '.join(f'{t:g}' for t in sorted(TEMPLATES))}); the official code snaps to the "
                            f"nearest one: name that one, so the run records what it used")
    n = len(schedule_from_config(s).hws)
    smp = cc.keys(m.get("sampling"), [f.name for f in dataclasses.fields(Sampling)], "model.sampling")
    if "cfg" in smp:
        cc.number(smp["cfg"], "model.sampling.cfg", lo=0, n_scales=n)
    if "tau" in smp:
        cc.number(smp["tau"], "model.sampling.tau", lo=0, lo_open=True, n_scales=n)
    if "top_k" in smp:
        cc.integer(smp["top_k"], "model.sampling.top_k", lo=0)
    if "top_p" in smp:
        cc.number(smp["top_p"], "model.sampling.top_p", lo=0, hi=1)
    if "cfg_insertion_layer" in smp:
        cc.integer(smp["cfg_insertion_layer"], "model.sampling.cfg_insertion_layer", lo=1 - int(a.get("depth", 1)),
                   hi=0)


# ---------------------------------------------------------------- build
PACKAGE_WEIGHTS = Path(__file__).resolve().parent / "weights"


def new_modules(mcfg) -> tuple[InfinityTransformer, BSQVAE]:
    """The transformer and BSQ-VAE a model config describes, with their constructors' initial weights."""
    a, v = mcfg["arch"], mcfg["vae"]
    d_bits = v["codebook_dim"] * (4 if v.get("patchify", False) else 1)
    tf = InfinityTransformer(a["depth"], a["embed_dim"], a["num_heads"], d_bits, a["text_channels"], a["text_maxlen"],
                             a.get("mlp_ratio", 4.0), a["block_chunks"])
    vae = BSQVAE(v["codebook_dim"], v["base_ch"], tuple(v["ch_mult"]), v["num_res_blocks"], v["patch_size"])
    return tf, vae


def seeded_modules(mcfg, device="cpu"):
    """Transformer, BSQ-VAE and tiny T5 of a model config, weights drawn from ``mcfg.seed`` (no files).

    ``init_on_device: true`` (the full-size ``*_random`` configs): the modules are built and their weights drawn on
    ``device`` itself (seconds on a GPU, no full-size copy in host memory; a CUDA generator, so other numbers than
    the CPU's from the same seed); ``device="meta"`` then builds shapes only. Otherwise: on the CPU, then moved."""
    a, text_cfg = mcfg["arch"], mcfg["text"]
    with torch.device(device if mcfg.get("init_on_device") else "cpu"):
        tf, vae = new_modules(mcfg)
    seed = int(mcfg.get("seed", 0))
    seeded_init_(tf, seed)
    seeded_init_(vae, seed + 1)
    text = T5TextEncoder.tiny(d_model=a["text_channels"], layers=text_cfg.get("layers", 2),
                              heads=text_cfg.get("heads", 2), max_length=a["text_maxlen"], seed=seed + 2,
                              device=device)
    return tf, vae, text


def load_package_weights(name: str, tf, vae, text) -> None:
    """Weights the project trained itself (``varbench/backbones/infinity/weights/<name>/``, see its MODEL_CARD.md),
    loaded strictly: a mismatch with the config is an error, not a silent partial load."""
    folder = PACKAGE_WEIGHTS / name
    shipped = sorted(p.name for p in PACKAGE_WEIGHTS.iterdir() if p.is_dir()) if PACKAGE_WEIGHTS.is_dir() else []
    if not folder.is_dir() and shipped:   # a name we never shipped (not a damaged checkout)
        raise UserError(f"no package weights named {name!r} (shipped with varbench: {', '.join(shipped)}); set "
                        f"model.package_weights to one of them, or null for seeded weights")
    parts = {"infinity.safetensors": tf, "vae.safetensors": vae, "text.safetensors": text.encoder}
    missing = [f for f in parts if not (folder / f).is_file()]
    if missing:
        raise UserError(f"package weights {', '.join(missing)} not found in {folder}; they ship with the repository "
                        f"(git checkout -- {folder}) or are rebuilt by `python scripts/train_tiny.py`")
    for f, module in parts.items():
        sd = load_safetensors(folder / f)
        try:
            module.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise UserError(f"{folder / f} does not match the model config: {state_dict_mismatch(e)}") from None


def build_infinity(mcfg, device="cpu", dtype="fp32", compile: bool = False) -> InfinityBackbone:
    """``mcfg``: a model config node (see ``conf/model/infinity_2b.yaml`` and ``tiny.yaml``).

    Weights: official files (``files``), the project's own trained weights (``package_weights``), or, with
    neither, drawn from ``seed``. ``compile``: ``torch.compile`` the blocks' pure parts (``compile_blocks``)."""
    check_config(mcfg)
    a, v = mcfg["arch"], mcfg["vae"]
    paths = None
    if mcfg.get("files"):
        paths = resolve_files({k: dict(f) for k, f in mcfg["files"].items()}, weights_dir(mcfg.get("weights_dir")))
    patchify = bool(v.get("patchify", False))
    trust = bool(mcfg.get("trust_pickle", False))
    if paths is None:
        tf, vae, text = seeded_modules(mcfg, device)
        if mcfg.get("package_weights"):
            load_package_weights(str(mcfg["package_weights"]), tf, vae, text)
            text.encoder.to(device).eval()
    else:
        tf, vae = new_modules(mcfg)
        load_transformer_state(tf, read_state_dict(paths["transformer"], None, trust))
        load_vae_state_dict(vae, read_state_dict(paths["vae"], "vae", trust))
        text_dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        text = T5TextEncoder.from_pretrained(str(paths["text_encoder"]), a["text_maxlen"], device, text_dtype)
    tf.to(device).eval()
    vae.to(device).eval()
    if compile:
        tf.compile_blocks()
    schedule = schedule_from_config(mcfg["schedule"])
    smp = Sampling(**dict(mcfg["sampling"]))
    return InfinityBackbone(tf, vae, text, schedule, smp, patchify, device, dtype, mcfg.get("name", "infinity"))
