"""The official GenEval detector in transformers: OpenMMLab's ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth``
(mmdetection 2.x) loaded into ``Mask2FormerForUniversalSegmentation`` by renaming its keys.

The mmdet 2.x module tree (``MaskFormer``: ``backbone`` = ``SwinTransformer``, ``panoptic_head`` =
``Mask2FormerHead`` with ``pixel_decoder`` = ``MSDeformAttnPixelDecoder``), read from the mmdet 2.x / mmcv 1.x
sources, and where each piece lands in transformers:

  backbone.patch_embed.projection / .norm            -> swin.embeddings.patch_embeddings.projection / embeddings.norm
  backbone.stages.i.blocks.j.norm1 / norm2           -> swin.encoder.layers.i.blocks.j.layernorm_before / _after
  ... .attn.w_msa.qkv (one Linear, q|k|v stacked)    -> ... .attention.q_proj / k_proj / v_proj (split in 3)
  ... .attn.w_msa.proj                               -> ... .attention.o_proj
  ... .attn.w_msa.relative_position_bias_table       -> ... .attention.relative_position_bias.relative_position_bias_table
  ... .attn.w_msa.relative_position_index (buffer)   -> dropped (transformers recomputes it; checked equal)
  ... .ffn.layers.0.0 / .ffn.layers.1 (mmcv FFN)     -> ... .mlp.fc1 / .mlp.fc2
  backbone.stages.i.downsample.reduction / .norm     -> swin.encoder.layers.i.downsample.reduction / .norm, with the
      4C input channels reordered: mmdet's PatchMerging samples 2x2 patches with nn.Unfold (channel c*4 + dy*2 + dx),
      the original Swin / transformers concatenate x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2]
      (channel p*C + c); this is the inverse of mmdet's own ``swin_converter`` (order [0, 2, 1, 3])
  backbone.norm{i} (one LN per output)               -> hidden_states_norms.stage{i+1}
  panoptic_head.pixel_decoder.input_convs.l.conv / .gn (ConvModule, GN)      -> decoder.input_projections.l.0 / .1
  panoptic_head.pixel_decoder.encoder.layers.j.attentions.0.{sampling_offsets, attention_weights, value_proj,
      output_proj} (mmcv MultiScaleDeformableAttention)                      -> decoder.encoder.layers.j.self_attn.*
  ... .encoder.layers.j.norms.0 / norms.1                                     -> .self_attn_layer_norm / .final_layer_norm
  ... .encoder.layers.j.ffns.0.layers.0.0 / .layers.1                         -> .fc1 / .fc2
  panoptic_head.pixel_decoder.level_encoding (Embedding)                      -> decoder.level_embed (Parameter)
  panoptic_head.pixel_decoder.lateral_convs.0.conv / .gn                      -> decoder.adapter_1.0 / .1
  panoptic_head.pixel_decoder.output_convs.0.conv / .gn                       -> decoder.layer_1.0 / .1
  panoptic_head.pixel_decoder.mask_feature                                    -> decoder.mask_projection
  panoptic_head.transformer_decoder.layers.j (DetrTransformerDecoderLayer, order cross_attn, norm, self_attn, norm,
      ffn, norm): attentions.0.attn (nn.MultiheadAttention)                    -> decoder.layers.j.cross_attn
      attentions.1.attn.in_proj_* (q|k|v stacked), .out_proj                 -> .self_attn.q_proj / k_proj / v_proj, out_proj
      norms.0 / norms.1 / norms.2                                             -> .cross_attn_layer_norm / .self_attn_layer_norm
                                                                                 / .final_layer_norm
      ffns.0.layers.0.0 / .layers.1                                           -> .fc1 / .fc2
  panoptic_head.transformer_decoder.post_norm        -> transformer_module.decoder.layernorm
  panoptic_head.query_embed / query_feat / level_embed -> transformer_module.queries_embedder / queries_features /
                                                          level_embed
  panoptic_head.mask_embed.{0,2,4} (Linear, ReLU, Linear, ReLU, Linear) -> decoder.mask_predictor.mask_embedder.{0,1,2}.0
  panoptic_head.cls_embed                            -> class_predictor
  (decoder_input_projs are nn.Identity, the positional encodings and the loss modules hold no weights)

transformers-only entries, not in the mmdet file, taken from the freshly built model and listed in ``HF_ONLY``:
``swin.layernorm`` (SwinModel's final norm; SwinBackbone never applies it: transformers itself ignores it when
loading) and ``criterion.empty_weight`` (the training loss's class weights, unused at inference).
"""
from __future__ import annotations

import re

import torch

from varbench.errors import UserError

PD = "panoptic_head.pixel_decoder."
TD = "panoptic_head.transformer_decoder."
HF_BACKBONE = "model.pixel_level_module.encoder."
HF_PD = "model.pixel_level_module.decoder."
HF_TM = "model.transformer_module."
HF_ONLY = (HF_BACKBONE + "swin.layernorm.weight", HF_BACKBONE + "swin.layernorm.bias", "criterion.empty_weight")
MERGE_ORDER = [0, 2, 1, 3]     # mmdet unfold position (dy*2+dx) of the original/transformers patch p, and back


def unfold_to_concat(w: torch.Tensor) -> torch.Tensor:
    """mmdet PatchMerging input-channel order (c*4 + q) -> transformers/original Swin order (p*C + c). ``w`` is the
    reduction weight [out, 4C] or the norm's weight/bias [4C]."""
    if w.dim() == 1:
        C = w.shape[0] // 4
        return w.reshape(C, 4)[:, MERGE_ORDER].t().reshape(-1)
    out, C4 = w.shape
    return w.reshape(out, C4 // 4, 4)[:, :, MERGE_ORDER].transpose(1, 2).reshape(out, C4)


def mmdet_relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """mmdet WindowMSA's buffer: double_step_seq(2*Ww-1, Wh, 1, Ww), plus its transpose, flipped on dim 1."""
    seq = (torch.arange(0, (2 * ww - 1) * wh, 2 * ww - 1)[:, None] + torch.arange(ww)[None, :]).reshape(1, -1)
    return (seq + seq.T).flip(1).contiguous()


_RULES = [  # (mmdet regex, transformers template); matched in order, first hit wins
    (r"backbone\.patch_embed\.projection\.(weight|bias)", HF_BACKBONE + r"swin.embeddings.patch_embeddings.projection.\1"),
    (r"backbone\.patch_embed\.norm\.(weight|bias)", HF_BACKBONE + r"swin.embeddings.norm.\1"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.norm1\.(weight|bias)",
     HF_BACKBONE + r"swin.encoder.layers.\1.blocks.\2.layernorm_before.\3"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.norm2\.(weight|bias)",
     HF_BACKBONE + r"swin.encoder.layers.\1.blocks.\2.layernorm_after.\3"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.proj\.(weight|bias)",
     HF_BACKBONE + r"swin.encoder.layers.\1.blocks.\2.attention.o_proj.\3"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.relative_position_bias_table",
     HF_BACKBONE + r"swin.encoder.layers.\1.blocks.\2.attention.relative_position_bias.relative_position_bias_table"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)",
     HF_BACKBONE + r"swin.encoder.layers.\1.blocks.\2.mlp.fc1.\3"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.(weight|bias)",
     HF_BACKBONE + r"swin.encoder.layers.\1.blocks.\2.mlp.fc2.\3"),
    (r"backbone\.stages\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)",
     HF_BACKBONE + r"swin.encoder.layers.\1.downsample.\2.\3"),
    (PD.replace(".", r"\.") + r"input_convs\.(\d+)\.conv\.(weight|bias)", HF_PD + r"input_projections.\1.0.\2"),
    (PD.replace(".", r"\.") + r"input_convs\.(\d+)\.gn\.(weight|bias)", HF_PD + r"input_projections.\1.1.\2"),
    (PD.replace(".", r"\.") + r"encoder\.layers\.(\d+)\.attentions\.0\."
     r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)",
     HF_PD + r"encoder.layers.\1.self_attn.\2.\3"),
    (PD.replace(".", r"\.") + r"encoder\.layers\.(\d+)\.norms\.0\.(weight|bias)",
     HF_PD + r"encoder.layers.\1.self_attn_layer_norm.\2"),
    (PD.replace(".", r"\.") + r"encoder\.layers\.(\d+)\.norms\.1\.(weight|bias)",
     HF_PD + r"encoder.layers.\1.final_layer_norm.\2"),
    (PD.replace(".", r"\.") + r"encoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.(weight|bias)",
     HF_PD + r"encoder.layers.\1.fc1.\2"),
    (PD.replace(".", r"\.") + r"encoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.(weight|bias)",
     HF_PD + r"encoder.layers.\1.fc2.\2"),
    (PD.replace(".", r"\.") + r"level_encoding\.weight", HF_PD + "level_embed"),
    (PD.replace(".", r"\.") + r"lateral_convs\.0\.conv\.(weight|bias)", HF_PD + r"adapter_1.0.\1"),
    (PD.replace(".", r"\.") + r"lateral_convs\.0\.gn\.(weight|bias)", HF_PD + r"adapter_1.1.\1"),
    (PD.replace(".", r"\.") + r"output_convs\.0\.conv\.(weight|bias)", HF_PD + r"layer_1.0.\1"),
    (PD.replace(".", r"\.") + r"output_convs\.0\.gn\.(weight|bias)", HF_PD + r"layer_1.1.\1"),
    (PD.replace(".", r"\.") + r"mask_feature\.(weight|bias)", HF_PD + r"mask_projection.\1"),
    (TD.replace(".", r"\.") + r"layers\.(\d+)\.attentions\.0\.attn\.(in_proj_weight|in_proj_bias)",
     HF_TM + r"decoder.layers.\1.cross_attn.\2"),
    (TD.replace(".", r"\.") + r"layers\.(\d+)\.attentions\.0\.attn\.out_proj\.(weight|bias)",
     HF_TM + r"decoder.layers.\1.cross_attn.out_proj.\2"),
    (TD.replace(".", r"\.") + r"layers\.(\d+)\.attentions\.1\.attn\.out_proj\.(weight|bias)",
     HF_TM + r"decoder.layers.\1.self_attn.out_proj.\2"),
    (TD.replace(".", r"\.") + r"layers\.(\d+)\.norms\.0\.(weight|bias)", HF_TM + r"decoder.layers.\1.cross_attn_layer_norm.\2"),
    (TD.replace(".", r"\.") + r"layers\.(\d+)\.norms\.1\.(weight|bias)", HF_TM + r"decoder.layers.\1.self_attn_layer_norm.\2"),
    (TD.replace(".", r"\.") + r"layers\.(\d+)\.norms\.2\.(weight|bias)", HF_TM + r"decoder.layers.\1.final_layer_norm.\2"),
    (TD.replace(".", r"\.") + r"layers\.(\d+)\.ffns\.0\.layers\.0\.0\.(weight|bias)", HF_TM + r"decoder.layers.\1.fc1.\2"),
    (TD.replace(".", r"\.") + r"layers\.(\d+)\.ffns\.0\.layers\.1\.(weight|bias)", HF_TM + r"decoder.layers.\1.fc2.\2"),
    (TD.replace(".", r"\.") + r"post_norm\.(weight|bias)", HF_TM + r"decoder.layernorm.\1"),
    (r"panoptic_head\.query_embed\.weight", HF_TM + "queries_embedder.weight"),
    (r"panoptic_head\.query_feat\.weight", HF_TM + "queries_features.weight"),
    (r"panoptic_head\.level_embed\.weight", HF_TM + "level_embed.weight"),
    (r"panoptic_head\.cls_embed\.(weight|bias)", r"class_predictor.\1"),
]
_MASK_EMBED = re.compile(r"panoptic_head\.mask_embed\.(\d+)\.(weight|bias)")
_QKV = re.compile(r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.qkv\.(weight|bias)")
_SELF_IN = re.compile(TD.replace(".", r"\.") + r"layers\.(\d+)\.attentions\.1\.attn\.in_proj_(weight|bias)")
_REL_INDEX = re.compile(r"backbone\.stages\.\d+\.blocks\.\d+\.attn\.w_msa\.relative_position_index")
_NORM_OUT = re.compile(r"backbone\.norm(\d+)\.(weight|bias)")
_COMPILED = [(re.compile(a), b) for a, b in _RULES]


def map_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """mmdet 2.x Mask2Former (Swin) state dict -> (transformers state dict, mmdet keys no rule knows)."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for k, v in sd.items():
        if _REL_INDEX.fullmatch(k):
            wh = round(v.shape[0] ** 0.5)
            if not torch.equal(v.long().cpu(), mmdet_relative_position_index(wh, wh)):
                raise UserError(f"{k} is not the relative position index transformers computes for window {wh}")
            continue
        if m := _QKV.fullmatch(k):
            s, b, kind = m.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, 0)):
                out[f"{HF_BACKBONE}swin.encoder.layers.{s}.blocks.{b}.attention.{name}.{kind}"] = part.clone()
            continue
        if m := _SELF_IN.fullmatch(k):
            j, kind = m.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, 0)):
                out[f"{HF_TM}decoder.layers.{j}.self_attn.{name}.{kind}"] = part.clone()
            continue
        if m := _NORM_OUT.fullmatch(k):
            out[f"{HF_BACKBONE}hidden_states_norms.stage{int(m.group(1)) + 1}.{m.group(2)}"] = v
            continue
        if m := _MASK_EMBED.fullmatch(k):
            i = int(m.group(1))
            if i % 2 or i > 4:
                unknown.append(k)
                continue
            out[f"{HF_TM}decoder.mask_predictor.mask_embedder.{i // 2}.0.{m.group(2)}"] = v
            continue
        for rx, tpl in _COMPILED:
            if m := rx.fullmatch(k):
                new = m.expand(tpl)
                if ".downsample." in k:
                    v = unfold_to_concat(v)
                out[new] = v
                break
        else:
            unknown.append(k)
    return out, unknown


def hf_config_for_mmdet_swin_s(num_labels: int = 80):
    """transformers config of the GenEval detector (mmdet config mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py):
    Swin-S (embed 96, depths 2,2,18,2, heads 3,6,12,24, window 7), 256-d pixel decoder with 6 deformable layers
    (8 heads, 4 points, 3 levels, FFN 1024), 9 masked-attention decoder layers (8 heads, FFN 2048), 100 queries."""
    from transformers import Mask2FormerConfig, SwinConfig

    bc = SwinConfig(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4.0,
                    qkv_bias=True, drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerConfig(backbone_config=bc, num_queries=100, num_labels=num_labels, hidden_dim=256,
                             mask_feature_size=256, feature_size=256, encoder_layers=6, decoder_layers=10,
                             num_attention_heads=8, dim_feedforward=2048, encoder_feedforward_dim=1024,
                             common_stride=4, feature_strides=[4, 8, 16, 32], enforce_input_projection=False,
                             pre_norm=False, dropout=0.0, use_pretrained_backbone=False)


def load_mapped(model, sd: dict[str, torch.Tensor]) -> None:
    """Load an mmdet state dict into ``model`` strictly: every mmdet key used, every transformers key given (but
    ``HF_ONLY``), equal shapes. Raises UserError listing what does not fit."""
    mapped, unknown = map_state_dict(sd)
    own = model.state_dict()
    missing = [k for k in own if k not in mapped and k not in HF_ONLY]
    unexpected = [k for k in mapped if k not in own] + unknown
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in mapped.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise UserError(f"mmdet checkpoint does not fit the transformers Mask2Former: {len(missing)} missing "
                        f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(shapes)} shape "
                        f"mismatches {shapes[:2]}")
    full = {k: (mapped[k] if k in mapped else own[k]) for k in own}
    model.load_state_dict(full, strict=True)


def load_mmdet_mask2former(path, device: str = "cpu", trust_pickle: bool = False):
    """The OpenMMLab GenEval checkpoint as a transformers ``Mask2FormerForUniversalSegmentation`` (eval mode)."""
    from transformers import Mask2FormerForUniversalSegmentation

    try:
        ck = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"could not read {path} with weights_only={not trust_pickle} ({type(e).__name__}); if you "
                        f"trust it, set bench.geneval.trust_pickle=true") from None
    sd = ck.get("state_dict", ck) if isinstance(ck, dict) else ck
    n_cls = sd["panoptic_head.cls_embed.weight"].shape[0] - 1 if "panoptic_head.cls_embed.weight" in sd else 80
    model = Mask2FormerForUniversalSegmentation(hf_config_for_mmdet_swin_s(n_cls))
    load_mapped(model, sd)
    return model.to(device).eval()
