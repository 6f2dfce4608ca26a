"""FLOPs of one generation from what the loop recorded (tokens per (scale, layer), keys, rows) and the backbone's
:class:`~varbench.backbones.base.BackboneSpec` (stored in each run's ``meta.json``: scoring never loads a model).

Counted (multiply-add = 2 FLOPs), per batch row: for each (scale, layer) with K computed tokens and Lk keys attended
per query (``attn_keys`` when a sparse kernel reported them, else the whole cache as the scale attended it: ``kv_len``,
which counts only the keys a ``compress_kv`` method kept from earlier scales, plus this scale's),
  self-attention  K·(2·C·3C + 2·C·C) + 4·K·Lk·C        (qkv + proj; QKᵀ and AV)
  cross-attention K·(2·C·C + 2·C·C) + 4·K·T·C          (q + proj; T text keys; only for ``spec.cross_attn``)
  FFN             K·mlp_mats·2·C·hidden                 (2 matrices for a GELU MLP, 3 for SwiGLU)
and the head on every token of a computed scale, N·2·C·V. Not counted: the VAE decoder, the text encoder and HART's
diffusion head (the same for every method), and a method's own overhead (e.g. NOVA's logit-lens heads), which
shows in measured latency. The FLOP-ideal speedup is FLOPs(method=none) / FLOPs(method) for the same prompt and seed.

Method FLOPs (:func:`method_flops`) are counted apart: work a method spends on itself beyond the model's layers, per
image, as the method reports it in its summary (``method_summary.method_flops``; ToProVAR's entropy pass and SVD,
SparVAR's decision passes beyond the dense one: each method's module documents its count). Absent: 0. The speed
metrics show the FLOP-ideal speedup both without and with them.
"""
from __future__ import annotations

from varbench.backbones.base import BackboneSpec


def generation_flops(rec: dict, spec: BackboneSpec) -> float:
    C, total = spec.embed_dim, 0.0
    hidden = spec.mlp_hidden or 4 * C
    text = rec.get("text_len") or [0]
    T = sum(text) / len(text) if spec.cross_attn else 0.0
    keys = rec.get("attn_keys") or []
    for si, (h, w) in enumerate(rec["scale_hw"]):
        rows = rec["rows"][si] if rec.get("rows") else 2
        if rows == 0:
            continue
        for li, K in enumerate(rec["tokens"][si]):
            Lk = rec["kv_len"][si][li]
            if si < len(keys) and keys[si] and keys[si][li] is not None:
                Lk = keys[si][li]
            per = K * (8 * C * C) + 4 * K * Lk * C + K * spec.mlp_mats * 2 * C * hidden
            if spec.cross_attn:
                per += K * (4 * C * C) + 4 * K * T * C
            total += rows * per
        total += rows * h * w * 2 * C * spec.head_out
    return total / max(1, rec.get("batch", 1))


def method_flops(rec: dict) -> float:
    """FLOPs per image the method spent on itself (its summary's ``method_flops``; 0 when it reports none)."""
    return float((rec.get("method_summary") or {}).get("method_flops") or 0.0)
