"""FLOPs of one generation from what the loop recorded (tokens per (scale, layer), keys, rows).

Counted (multiply-add = 2 FLOPs), per batch row: for each (scale, layer) with K computed tokens and Lk keys,
  self-attention  K·(2·C·3C + 2·C·C) + 4·K·Lk·C        (qkv + proj; QKᵀ and AV)
  cross-attention K·(2·C·C + 2·C·C) + 4·K·T·C          (q + proj; T text keys; text K/V are computed once per image)
  FFN             K·4·C·hidden
and the head on every token of a computed scale, N·2·C·V. Not counted: the VAE decoder and text encoder (the same
for every method), and a method's own overhead (e.g. NOVA's logit-lens heads), which shows in measured latency.
The FLOP-ideal speedup is FLOPs(method=none) / FLOPs(method) for the same prompt and seed.
"""
from __future__ import annotations


def generation_flops(rec: dict, embed_dim: int, mlp_hidden: int, head_out: int) -> float:
    C, total = embed_dim, 0.0
    text = rec.get("text_len") or [0]
    T = sum(text) / len(text)
    for si, (h, w) in enumerate(rec["scale_hw"]):
        rows = rec["rows"][si] if rec.get("rows") else 2
        if rows == 0:
            continue
        for li, K in enumerate(rec["tokens"][si]):
            Lk = rec["kv_len"][si][li]
            per = K * (8 * C * C) + 4 * K * Lk * C + K * (4 * C * C) + 4 * K * T * C + K * 4 * C * mlp_hidden
            total += rows * per
        total += rows * h * w * 2 * C * head_out
    return total / max(1, rec.get("batch", 1))


def flops_for_backbone(rec: dict, backbone) -> float:
    spec = backbone.spec
    hidden = backbone.model.blocks[0].ffn.fc1.out_features if hasattr(backbone, "model") else 4 * spec.embed_dim
    v = 2 * spec.head_dim_out if spec.head_type == "bitwise" else spec.head_dim_out
    return generation_flops(rec, spec.embed_dim, hidden, v)
