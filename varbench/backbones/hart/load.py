"""Build a HART backbone from a model config: official folders (local / HF hub cache) or seeded tiny weights.

Official layout (mit-han-lab/hart-0.7b-1024px): ``llm/`` (config.json, ``ema_model.bin``: the official scripts load
it over the base weights with ``use_ema=True``) and ``tokenizer/`` (config.json + weights of
HARTAutoEncoderWithDisc: ``vae.*`` and ``disc.*``); text encoder mit-han-lab/Qwen2-VL-1.5B-Instruct.
Lookup: ``<weights_dir>/<weights_subdir>/{llm,tokenizer}`` and ``<weights_dir>/Qwen2-VL-1.5B-Instruct``, then the
Hugging Face hub cache; everything missing is reported in one line (``MissingWeights``) before anything heavy is
loaded. State dicts load strictly (keys and shapes). When ``llm/config.json`` is present, the architecture values of
the model config are compared with it first (``config_mismatches``): the 0.7B values here were assumed.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from varbench import config_checks as cc
from varbench import weights
from varbench.backbones.hart.backbone import HARTBackbone, HARTSampling
from varbench.backbones.hart.model import HARTTransformer
from varbench.backbones.hart.text import QwenTextEncoder, TinyTextEncoder
from varbench.backbones.hart.vae import VQVAE, TokenizerWithDisc
from varbench.errors import MissingWeights, UserError
from varbench.weights import find_file, load_strict, read_state_dict, weights_dir

# HF config.json key -> our arch key (transformer); values that must hold for the branch we implement
TF_KEYS = {"depth": "depth", "embed_dim": "embed_dim", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio",
           "norm_eps": "norm_eps", "attn_l2_norm": "attn_l2_norm", "use_context_norm": "use_context_norm",
           "context_token": "context_token", "context_dim": "context_dim", "patch_nums": "patch_nums",
           "diff_width": "diff_width", "diff_depth": "diff_depth", "num_sampling_steps": "num_sampling_steps"}
TF_FIXED = {"attn_type": "llama", "mlp_type": "llama", "disable_aln": True, "shared_aln": False,
            "use_cross_attn": False, "use_timestep_embed": False, "sampler": "iddpm", "diffusion_head_repeats": 1}
VAE_KEYS = {"vocab_size": "vocab_size", "z_channels": "z_channels", "ch": "ch", "ch_mult": "ch_mult",
            "quant_resi": "quant_resi", "share_quant_resi": "share_quant_resi"}
VAE_FIXED = {"quantizer_type": "var_hybrid", "double_decoder": False, "quant_conv_ks": 3}
# The official config classes' defaults (HARTForT2IConfig / HARTAutoEncoderConfig): a key absent from a
# config.json means this value.
TF_DEFAULTS = {"depth": 16, "embed_dim": 1024, "num_heads": 16, "mlp_ratio": 4.0, "norm_eps": 1e-6,
               "attn_l2_norm": False, "use_context_norm": False, "context_token": 77, "context_dim": 768,
               "patch_nums": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], "diff_width": 1024, "diff_depth": 6,
               "num_sampling_steps": "8", "attn_type": "gpt2", "mlp_type": "gpt2", "disable_aln": False,
               "shared_aln": False, "use_cross_attn": False, "use_timestep_embed": False, "sampler": "iddpm",
               "diffusion_head_repeats": 1}
VAE_DEFAULTS = {"vocab_size": 4096, "z_channels": 32, "ch": 160, "ch_mult": [1, 1, 2, 2, 4], "quant_resi": 0.5,
                "share_quant_resi": 4, "quantizer_type": "var", "double_decoder": False, "quant_conv_ks": 3}


def _norm(v):
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else (str(v) if isinstance(v, str) else v)


def config_mismatches(ours: dict, official: dict, keys: dict, fixed: dict, prefix: str,
                      defaults: dict | None = None) -> list[str]:
    """Differences between our arch values and an official config.json (and unsupported official values). With
    ``defaults`` (the official config class's), a key absent from the file counts as its default."""
    defaults = defaults or {}

    def value(k):
        return (official[k], "config says") if k in official else (defaults.get(k), "config omits it: default")

    out = []
    for ok, key in keys.items():
        if ok not in official and ok not in defaults:
            continue
        v, how = value(ok)
        if _norm(v) != _norm(ours.get(key)):
            if isinstance(v, float) and isinstance(ours.get(key), (int, float)) and math.isclose(v, ours[key]):
                continue
            out.append(f"{prefix}.{key}: {how} {v!r}, ours {ours.get(key)!r}")
    for ok, want in fixed.items():
        if ok not in official and ok not in defaults:
            continue
        v, how = value(ok)
        if v != want:
            out.append(f"{prefix}: {ok}={v!r} ({how}) is not implemented (only {want!r})")
    return out


def arch_from_official(tf: dict, tok: dict) -> tuple[dict, dict]:
    """Our (arch, vae) config from official transformer / tokenizer config.json dicts (the fixture's meta)."""
    bad = config_mismatches({}, tf, {}, TF_FIXED, "arch") + config_mismatches({}, tok, {}, VAE_FIXED, "vae")
    if bad:
        raise UserError("unsupported HART config: " + "; ".join(bad))
    arch = {ours: tf[k] for k, ours in TF_KEYS.items() if k in tf}
    vae = {ours: tok[k] for k, ours in VAE_KEYS.items() if k in tok}
    return arch, vae


def new_modules(arch: dict, vae_cfg: dict) -> tuple[HARTTransformer, VQVAE]:
    a, v = arch, vae_cfg
    vae = VQVAE(v["vocab_size"], v["z_channels"], v["ch"], tuple(v["ch_mult"]), len(a["patch_nums"]),
                v.get("quant_resi", 0.5), v.get("share_quant_resi", 4))
    tf = HARTTransformer(depth=a["depth"], embed_dim=a["embed_dim"], num_heads=a["num_heads"], vocab_size=v["vocab_size"],
                         Cvae=v["z_channels"], patch_nums=a["patch_nums"], context_token=a["context_token"],
                         context_dim=a["context_dim"], mlp_ratio=a.get("mlp_ratio", 4.0), norm_eps=a.get("norm_eps", 1e-6),
                         attn_l2_norm=a.get("attn_l2_norm", True), use_context_norm=a.get("use_context_norm", True),
                         diff_width=a["diff_width"], diff_depth=a["diff_depth"],
                         num_sampling_steps=str(a.get("num_sampling_steps", "8")))
    return tf, vae


HINT = "check the model config against its config.json (python -m varbench.backbones.hart.check_config)"


def _init_rule(name: str, leaf: str, p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """HART's seeded weights: N(0, 1/fan_in) matrices, norm weights ≈ 1, small biases, its special tensors sane."""
    if leaf == "scale_mul_1H11":
        return math.log(4.0) + 0.3 * r
    if p.ndim == 1 and leaf == "weight":   # RMSNorm / LayerNorm / GroupNorm weights
        return 1 + 0.1 * r
    if p.ndim == 1:
        return 0.05 * r
    if name.endswith("embedding.weight"):
        return r
    return r / math.sqrt(p[0].numel())


def seeded_init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic weights by HART's rule (``varbench.weights.seeded_init_``)."""
    return weights.seeded_init_(module, seed, _init_rule)


def weights_file(folder: Path, names: list[str]) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def resolve(mcfg) -> dict[str, Path]:
    """role -> path for the llm folder's weights + config, the tokenizer weights and the text encoder folder."""
    files = {k: dict(f) for k, f in mcfg["files"].items()}
    wdir = weights_dir(mcfg.get("weights_dir"))
    sub = wdir / mcfg["weights_subdir"] if mcfg.get("weights_subdir") else wdir
    found, missing = {}, []
    for role, f in files.items():
        where = sub if role in ("transformer", "tokenizer") else wdir
        p = find_file(f["file"], where, f.get("hf_repo"), bool(f.get("snapshot")))
        if p is None:
            missing.append((f["file"], f"{where}" + (f" and the HF cache of {f['hf_repo']}" if f.get("hf_repo") else ""),
                            f.get("url", f.get("hf_repo", "?"))))
        else:
            found[role] = p
    inner = {"transformer": ["ema_model.bin"] if mcfg.get("use_ema", True) else
             ["model.safetensors", "pytorch_model.bin"],
             "tokenizer": ["model.safetensors", "pytorch_model.bin"]}
    for role, names in inner.items():
        if role in found:
            w = weights_file(found[role], names)
            if w is None:
                missing.append((f"{files[role]['file']}/{names[0]}", str(found[role]), files[role].get("url", "?")))
            else:
                found[role + "_weights"] = w
    if missing:
        raise MissingWeights(missing)
    return found


def check_official_configs(mcfg, paths: dict) -> list[str]:
    out = []
    for role, keys, fixed, pre, defaults in (("transformer", TF_KEYS, TF_FIXED, "arch", TF_DEFAULTS),
                                             ("tokenizer", VAE_KEYS, VAE_FIXED, "vae", VAE_DEFAULTS)):
        cj = Path(paths[role]) / "config.json"
        if cj.is_file():
            out += config_mismatches(dict(mcfg[pre]), json.loads(cj.read_text()), keys, fixed, pre, defaults)
    return out


MODEL_KEYS = ("name", "family", "seed", "arch", "vae", "text", "sampling", "rule_widths", "files", "weights_dir",
              "weights_subdir", "trust_pickle", "use_ema", "init_on_device")


def check_config(m: dict) -> None:
    """A HART model config's keys and sampling values, checked before anything is built (one line each)."""
    cc.keys(m, MODEL_KEYS, "model")
    cc.keys(m.get("text"), ("system_prompt",), "model.text")
    smp = cc.keys(m.get("sampling"), [f.name for f in dataclasses.fields(HARTSampling)], "model.sampling")
    if "cfg" in smp:
        cc.number(smp["cfg"], "model.sampling.cfg", lo=0)
    if "top_p" in smp:
        cc.number(smp["top_p"], "model.sampling.top_p", lo=0, hi=1)
    for k in ("top_k_early", "top_k_late", "top_k_switch", "final_stage"):
        if k in smp:
            cc.integer(smp[k], f"model.sampling.{k}", lo=0)
    if "diffusion_temperature" in smp:
        cc.number(smp["diffusion_temperature"], "model.sampling.diffusion_temperature", lo=0, lo_open=True)
    if "diffusion_noise" in smp:
        cc.choice(smp["diffusion_noise"], "model.sampling.diffusion_noise", ("rng", "global"))


def sampling_from_config(s: dict) -> HARTSampling:
    known = [f.name for f in dataclasses.fields(HARTSampling)]
    unknown = sorted(set(s) - set(known))
    if unknown:
        raise UserError(f"model.sampling: unknown option(s) {', '.join(unknown)} for HART (known: {', '.join(known)}; "
                        f"HART's top-k is hard-coded per stage: top_k_early / top_k_late / top_k_switch)")
    return HARTSampling(**s)


def build_hart(mcfg, device="cpu", dtype="fp32") -> HARTBackbone:
    """``mcfg``: a model config node (``conf/model/hart_0.7b.yaml``, ``hart_tiny_random.yaml``)."""
    check_config(mcfg)
    arch, vcfg = dict(mcfg["arch"]), dict(mcfg["vae"])
    tcfg = dict(mcfg.get("text") or {})
    if mcfg.get("files"):
        paths = resolve(mcfg)
        bad = check_official_configs(mcfg, paths)
        if bad:
            raise UserError("model config differs from the official config.json: " + "; ".join(bad))
        tf, vae = new_modules(arch, vcfg)
        load_strict(tf, read_state_dict(paths["transformer_weights"], bool(mcfg.get("trust_pickle", False))),
                    str(paths["transformer_weights"]), HINT)
        tok = TokenizerWithDisc(vae)
        load_strict(tok, read_state_dict(paths["tokenizer_weights"], bool(mcfg.get("trust_pickle", False))),
                    str(paths["tokenizer_weights"]), HINT)
        text = QwenTextEncoder(str(paths["text_encoder"]), arch["context_token"], tcfg.get("system_prompt"), device)
    else:   # seeded; init_on_device (full-size *_random configs): built and drawn on the device itself
        with torch.device(device if mcfg.get("init_on_device") else "cpu"):
            tf, vae = new_modules(arch, vcfg)
        seed = int(mcfg.get("seed", 0))
        seeded_init_(tf, seed)
        seeded_init_(vae, seed + 1)
        text = TinyTextEncoder(arch["context_dim"], arch["context_token"], seed + 2, device)
    tf.to(device).eval()
    vae.to(device).eval()
    smp = sampling_from_config(dict(mcfg.get("sampling") or {}))
    return HARTBackbone(tf, vae, text, smp, mcfg.get("rule_widths"), device, dtype, mcfg.get("name", "hart"))
