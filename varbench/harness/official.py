"""The official FoundationVision/Infinity transformer, built from a user's checkout with OUR weights (for timing).

``scripts/bench_speed.py --official PATH`` times the official ``Infinity.autoregressive_infer_cfg`` beside our loop,
on the same architecture, schedule, sampling settings and the very same (random or trained) weights: our state
dict is loaded into the official class strictly (the parameter names are the official ones).

Nothing in the checkout is edited or copied. When a dependency the official code imports at module level is not
installed, a stand-in module is put into ``sys.modules`` before the import, and :attr:`OfficialInfinity.standins`
says which, so the benchmark table can print it:

* ``flash_attn`` (often not installable): the two functions ``infinity/models/basic.py`` imports,
  ``flash_attn_func`` (self-attention with the customised kernel; unused with ``customized_flash_attn=False``, as
  ``tools/run_infinity.py`` builds the model) and ``flash_attn_varlen_kvpacked_func`` (cross-attention and the
  text pooling; the official code casts fp32 inputs to bf16 before it), are given by PyTorch's SDPA on padded
  sequences with a key mask. The fused ops (``flash_attn.ops``) then fail to import, and the official code takes
  its own non-fused fallback, as on any machine without flash-attn.
* ``pytz`` (only for log time stamps in ``infinity/utils``): ``zoneinfo``.

The model is built with the arguments of ``tools/run_infinity.py`` (shared AdaLN, fused norm, RoPE mode 2,
``pad_to_multiplier=128``, bit labels, ``inference_mode=True``). The VAE handed to it is ours (bits -> codes, the
official trilinear accumulation happens inside ``autoregressive_infer_cfg``), so the official code is compared on
the transformer and its loop, which is what the benchmark times (scale loop only: no text encoder, no decode).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from varbench.backbones.infinity.schedules import TEMPLATES
from varbench.backbones.infinity.vae import bits_to_codes
from varbench.errors import UserError

FLASH_ATTN_FUNCS = ("flash_attn_func", "flash_attn_varlen_kvpacked_func")


# ---------------------------------------------------------------- stand-ins for missing dependencies
def sdpa_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
    """flash-attn's ``flash_attn_func`` layout (q, k, v: [B, L, H, c]; returns [B, L, H, c]) by SDPA."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2)


def _padded(x_N: torch.Tensor, cu: torch.Tensor, max_len: int):
    """Compact rows [N, ...] with cumulative lengths ``cu`` [B+1] -> padded [B, max_len, ...] and mask [B, max_len]."""
    cu = cu.to(x_N.device).long()
    starts, lens = cu[:-1], cu[1:] - cu[:-1]
    ar = torch.arange(max_len, device=x_N.device)
    mask = ar[None, :] < lens[:, None]
    idx = (starts[:, None] + ar[None, :]).clamp(max=max(x_N.shape[0] - 1, 0))
    return x_N[idx], mask


def sdpa_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         dropout_p=0.0, softmax_scale=None, causal=False, **_):
    """flash-attn's varlen kv-packed attention (q: [Nq, H, c], kv: [Nk, 2, H, c]; returns [Nq, H, c]) by SDPA on
    padded sequences with a boolean key mask (padded keys get exactly zero weight)."""
    if causal:
        raise NotImplementedError("the SDPA stand-in of flash_attn_varlen_kvpacked_func has no causal mode")
    qp, qmask = _padded(q, cu_seqlens_q, int(max_seqlen_q))          # [B, Lq, H, c]
    kvp, kmask = _padded(kv, cu_seqlens_k, int(max_seqlen_k))        # [B, Lk, 2, H, c]
    k, v = kvp.unbind(2)
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=kmask[:, None, None, :], dropout_p=dropout_p, scale=softmax_scale)
    return out.transpose(1, 2)[qmask]                                # back to compact [Nq, H, c]


def _has(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _flash_attn_standin() -> types.ModuleType:
    m = types.ModuleType("flash_attn")
    m.__doc__ = "varbench stand-in: SDPA for the two flash-attn functions the official Infinity code imports"
    m.flash_attn_func = sdpa_flash_attn_func
    m.flash_attn_varlen_kvpacked_func = sdpa_flash_attn_varlen_kvpacked_func
    return m


def _pytz_standin() -> types.ModuleType:
    from zoneinfo import ZoneInfo

    m = types.ModuleType("pytz")
    m.timezone = ZoneInfo
    return m


# module name -> (builder of its stand-in, what the table header says)
STANDINS = {
    "flash_attn": (_flash_attn_standin, "flash_attn (SDPA stand-in for flash_attn_func, flash_attn_varlen_kvpacked_func)"),
    "pytz": (_pytz_standin, "pytz (zoneinfo, log time stamps only)"),
}


def install_standins() -> list[str]:
    """Put stand-in modules for missing ``flash_attn`` / ``pytz`` into ``sys.modules``; returns what was supplied
    (also when an earlier call supplied it)."""
    supplied = []
    for name, (build, label) in STANDINS.items():
        if not _has(name):
            m = build()
            m.__varbench_standin__ = True
            sys.modules[name] = m
        if getattr(sys.modules.get(name), "__varbench_standin__", False):
            supplied.append(label)
    return supplied


def check_checkout(path) -> Path:
    """The checkout folder, or a one-line error (before any model is built)."""
    p = Path(path).expanduser()
    if not (p / "infinity" / "models" / "infinity.py").is_file():
        raise UserError(f"--official {path}: not a FoundationVision/Infinity checkout (no infinity/models/"
                        f"infinity.py there); git clone https://github.com/FoundationVision/Infinity")
    return p.resolve()


# ---------------------------------------------------------------- the VAE the official loop talks to
class _VaeForOfficial:
    """What ``Infinity.__init__`` and ``autoregressive_infer_cfg`` read from ``vae_local``/``vae``, from our BSQ-VAE."""

    def __init__(self, vae, codebook_dim: int):
        self.embed_dim, self.vocab_size = codebook_dim, 2 ** codebook_dim
        lfq = types.SimpleNamespace(mask=None,
                                    indices_to_codes=lambda idx, label_type="bit_label": bits_to_codes(idx, codebook_dim))
        self.quantizer = types.SimpleNamespace(lfq=lfq, z_interplote_up="trilinear")
        self._vae = vae

    def decode(self, z):
        with torch.autocast(z.device.type, enabled=False):
            return self._vae.decode(z.float())


@dataclass
class OfficialInfinity:
    model: torch.nn.Module
    vae: _VaeForOfficial
    scale_schedule: list
    cfg: list
    tau: list
    top_k: int
    top_p: float
    cfg_insertion_layer: list
    device: torch.device
    dtype: str
    standins: list = field(default_factory=list)
    checkout: str = ""

    def generate(self, text_features, seed: int, gt_bits: list | None = None):
        """The official scale loop for one prompt's T5 features ``(kv_compact, lens)`` -> (bits per scale
        [1, h*w, d], accumulated codes). ``gt_bits``: force those bits (the official ``gt_leak``)."""
        kv, lens = text_features
        cu = torch.tensor([0] + list(lens), device=self.device).cumsum(0).to(torch.int32)
        label = (kv.to(self.device), list(lens), cu, max(lens))
        leak = []
        if gt_bits is not None:
            leak = [b.reshape(1, h, w, -1)[:, None].to(self.device) for b, (_, h, w) in zip(gt_bits, self.scale_schedule)]
        amp = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.dtype == "bf16"
               else contextlib.nullcontext())
        codes = {}
        real_idc = self.vae.quantizer.lfq.indices_to_codes

        def tap(idx, label_type="bit_label"):  # keep the bits the loop samples (it returns them only for vae_type 0)
            c = real_idc(idx, label_type)
            codes.setdefault("bits", []).append(idx.reshape(1, -1, idx.shape[-1]).to(torch.uint8))
            codes.setdefault("codes", []).append(c)
            return c

        self.vae.quantizer.lfq.indices_to_codes = tap
        try:
            with torch.no_grad(), amp:
                self.model.autoregressive_infer_cfg(
                    vae=self.vae, scale_schedule=self.scale_schedule, label_B_or_BLT=label, g_seed=seed, B=1,
                    negative_label_B_or_BLT=None, cfg_list=self.cfg, tau_list=self.tau, top_k=self.top_k,
                    top_p=self.top_p, returns_vemb=1, cfg_insertion_layer=self.cfg_insertion_layer, vae_type=1,
                    ret_img=False, gt_leak=len(leak), gt_ls_Bl=leak or None, inference_mode=True)
        finally:
            self.vae.quantizer.lfq.indices_to_codes = real_idc
        return codes.get("bits", []), codes.get("codes", [])


def build_official(path, backbone, mcfg: dict) -> OfficialInfinity:
    """The official ``Infinity`` for our Infinity ``backbone`` (its architecture, schedule, sampling and weights)."""
    root = check_checkout(path)
    sched = backbone.schedule
    if sched.rope_hw is not None or sched.template not in TEMPLATES:
        raise UserError(f"--official needs an official schedule (model {mcfg['name']!r} uses a custom one); "
                        f"use e.g. --model infinity_mid_random or tiny_random")
    standins = install_standins()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            mod = importlib.import_module("infinity.models.infinity")
    except ImportError as e:
        raise UserError(f"--official {path}: importing the official code failed ({e}); install its requirements") from None
    if not str(Path(mod.__file__).resolve()).startswith(str(root)):
        raise UserError(f"--official {path}: python imported 'infinity' from {mod.__file__}, not from the checkout")
    a, v, smp = mcfg["arch"], mcfg["vae"], backbone.sampling
    ours = backbone.model
    patchify = bool(v.get("patchify", False))
    vae = _VaeForOfficial(backbone.vae, ours.d_bits if not patchify else ours.d_bits // 4)
    kw = dict(vae_local=vae, text_channels=a["text_channels"], text_maxlen=a["text_maxlen"], shared_aln=True,
              raw_scale_schedule=None, checkpointing="full-block", customized_flash_attn=False, fused_norm=True,
              pad_to_multiplier=128, use_flex_attn=False, add_lvl_embeding_only_first_block=1, use_bit_label=1,
              rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn=sched.pn, apply_spatial_patchify=int(patchify),
              inference_mode=True, train_h_div_w_list=[1.0], depth=a["depth"], embed_dim=a["embed_dim"],
              num_heads=a["num_heads"], mlp_ratio=a.get("mlp_ratio", 4), block_chunks=a["block_chunks"],
              drop_path_rate=0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        model = mod.Infinity(**kw)
    sd = {k: t.detach().float().cpu() for k, t in ours.state_dict().items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("zero_k_bias")]
    if missing or unexpected:
        raise UserError(f"our state dict does not fit the official class: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}")
    dev = backbone.device
    model.to(dev).eval().requires_grad_(False)
    if backbone.dtype == "bf16":  # tools/run_infinity.py: blocks in bf16
        for b in model.unregistered_blocks:
            b.bfloat16()
    model.rng = torch.Generator(device=dev)  # the official one lives on dist.get_device() ('cpu' when not launched)
    n = len(sched.hws)
    per = lambda val: [float(val[i] if isinstance(val, (list, tuple)) else val) for i in range(n)]  # noqa: E731
    k = smp.cfg_insertion_layer
    return OfficialInfinity(model, vae, [(1, h, w) for h, w in sched.hws], per(smp.cfg), per(smp.tau), smp.top_k,
                            smp.top_p, [k], dev, backbone.dtype, standins, str(root))

