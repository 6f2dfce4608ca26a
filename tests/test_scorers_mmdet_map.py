"""GenEval's official detector (OpenMMLab mask2former_swin-s ... coco.pth, mmdet 2.x) in transformers: the key map
loads a state dict with mmdet's key names and shapes strictly into a tiny Mask2Former; the two re-orderings it
does (Swin PatchMerging channels, fused q|k|v) reproduce mmdet's computation."""
import pytest
import torch

pytest.importorskip("scipy", reason="transformers' Mask2Former needs scipy (declared by the project)")
from eval.geneval.mmdet_map import HF_ONLY, load_mapped, map_state_dict, mmdet_relative_position_index, unfold_to_concat  # noqa: E402
from varbench.errors import UserError  # noqa: E402

C, DEPTHS, HEADS, WIN = 16, (1, 2, 1, 1), (1, 1, 2, 2), 4       # tiny Swin
D, Q, NCLS, ENC_L, DEC_L, H, PTS, LVL, F_ENC, F_DEC = 32, 10, 80, 1, 2, 2, 4, 3, 64, 64


def mmdet_keys() -> dict[str, tuple]:
    """Names and shapes of an mmdet 2.x MaskFormer(SwinTransformer, Mask2FormerHead(MSDeformAttnPixelDecoder))
    state dict, written from mmdet's module tree: backbone.patch_embed(projection, norm); backbone.stages[i]
    .blocks[j](norm1, attn.w_msa(relative_position_bias_table, relative_position_index, qkv, proj), norm2,
    ffn.layers[0][0], ffn.layers[1]); stages[i].downsample(norm, reduction) for i < 3; backbone.norm{i};
    pixel_decoder(input_convs[l](conv, gn), encoder.layers[j](attentions[0](sampling_offsets, attention_weights,
    value_proj, output_proj), ffns[0], norms[0..1]), level_encoding, lateral_convs[0], output_convs[0],
    mask_feature); transformer_decoder.layers[j](attentions[0..1].attn (nn.MultiheadAttention), ffns[0],
    norms[0..2]), post_norm; query_embed, query_feat, level_embed, cls_embed, mask_embed[0, 2, 4]."""
    k: dict[str, tuple] = {}

    def lin(name, o, i, bias=True):
        k[name + ".weight"] = (o, i)
        if bias:
            k[name + ".bias"] = (o,)

    def ln(name, n):
        k[name + ".weight"], k[name + ".bias"] = (n,), (n,)

    b = "backbone."
    k[b + "patch_embed.projection.weight"], k[b + "patch_embed.projection.bias"] = (C, 3, 4, 4), (C,)
    ln(b + "patch_embed.norm", C)
    for i, (d, h) in enumerate(zip(DEPTHS, HEADS)):
        ci = C * 2 ** i
        for j in range(d):
            p = f"{b}stages.{i}.blocks.{j}."
            ln(p + "norm1", ci)
            k[p + "attn.w_msa.relative_position_bias_table"] = ((2 * WIN - 1) ** 2, h)
            k[p + "attn.w_msa.relative_position_index"] = (WIN * WIN, WIN * WIN)
            lin(p + "attn.w_msa.qkv", 3 * ci, ci)
            lin(p + "attn.w_msa.proj", ci, ci)
            ln(p + "norm2", ci)
            lin(p + "ffn.layers.0.0", 4 * ci, ci)
            lin(p + "ffn.layers.1", ci, 4 * ci)
        if i < 3:
            ln(f"{b}stages.{i}.downsample.norm", 4 * ci)
            lin(f"{b}stages.{i}.downsample.reduction", 2 * ci, 4 * ci, bias=False)
        ln(f"{b}norm{i}", ci)
    pd = "panoptic_head.pixel_decoder."
    for lvl in range(3):
        cin = C * 2 ** (3 - lvl)
        k[f"{pd}input_convs.{lvl}.conv.weight"], k[f"{pd}input_convs.{lvl}.conv.bias"] = (D, cin, 1, 1), (D,)
        ln(f"{pd}input_convs.{lvl}.gn", D)
    for j in range(ENC_L):
        p = f"{pd}encoder.layers.{j}."
        lin(p + "attentions.0.sampling_offsets", H * LVL * PTS * 2, D)
        lin(p + "attentions.0.attention_weights", H * LVL * PTS, D)
        lin(p + "attentions.0.value_proj", D, D)
        lin(p + "attentions.0.output_proj", D, D)
        lin(p + "ffns.0.layers.0.0", F_ENC, D)
        lin(p + "ffns.0.layers.1", D, F_ENC)
        ln(p + "norms.0", D)
        ln(p + "norms.1", D)
    k[pd + "level_encoding.weight"] = (3, D)
    k[pd + "lateral_convs.0.conv.weight"] = (D, C, 1, 1)
    ln(pd + "lateral_convs.0.gn", D)
    k[pd + "output_convs.0.conv.weight"] = (D, D, 3, 3)
    ln(pd + "output_convs.0.gn", D)
    k[pd + "mask_feature.weight"], k[pd + "mask_feature.bias"] = (D, D, 1, 1), (D,)
    td = "panoptic_head.transformer_decoder."
    for j in range(DEC_L):
        p = f"{td}layers.{j}."
        for a in (0, 1):
            k[f"{p}attentions.{a}.attn.in_proj_weight"], k[f"{p}attentions.{a}.attn.in_proj_bias"] = (3 * D, D), (3 * D,)
            lin(f"{p}attentions.{a}.attn.out_proj", D, D)
        lin(p + "ffns.0.layers.0.0", F_DEC, D)
        lin(p + "ffns.0.layers.1", D, F_DEC)
        for n in range(3):
            ln(f"{p}norms.{n}", D)
    ln(td + "post_norm", D)
    ph = "panoptic_head."
    k[ph + "query_embed.weight"], k[ph + "query_feat.weight"], k[ph + "level_embed.weight"] = (Q, D), (Q, D), (3, D)
    lin(ph + "cls_embed", NCLS + 1, D)
    for i in (0, 2, 4):
        lin(f"{ph}mask_embed.{i}", D, D)
    return k


def mmdet_state_dict(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in mmdet_keys().items():
        if name.endswith("relative_position_index"):
            sd[name] = mmdet_relative_position_index(WIN, WIN)
        else:
            sd[name] = torch.randn(shape, generator=g) * 0.2
    return sd


def tiny_hf():
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    bc = SwinConfig(embed_dim=C, depths=list(DEPTHS), num_heads=list(HEADS), window_size=WIN,
                    out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=bc, num_queries=Q, num_labels=NCLS, hidden_dim=D, mask_feature_size=D,
                            feature_size=D, encoder_layers=ENC_L, decoder_layers=DEC_L + 1, num_attention_heads=H,
                            dim_feedforward=F_DEC, encoder_feedforward_dim=F_ENC, use_pretrained_backbone=False)
    return Mask2FormerForUniversalSegmentation(cfg).eval()


def test_mmdet_state_dict_loads_strictly_with_equal_shapes():
    sd = mmdet_state_dict()
    mapped, unknown = map_state_dict(sd)
    model = tiny_hf()
    own = model.state_dict()
    assert unknown == []
    assert sorted(set(own) - set(mapped)) == sorted(HF_ONLY)         # only the two unused transformers entries
    assert set(mapped) <= set(own)
    assert all(tuple(mapped[k].shape) == tuple(own[k].shape) for k in mapped)
    load_mapped(model, sd)
    got = model.state_dict()
    P = "model.pixel_level_module.encoder.swin.encoder.layers.0.blocks.0.attention."
    qkv = sd["backbone.stages.0.blocks.0.attn.w_msa.qkv.weight"]
    assert torch.equal(torch.cat([got[P + n + ".weight"] for n in ("q_proj", "k_proj", "v_proj")]), qkv)
    assert torch.equal(got["class_predictor.weight"], sd["panoptic_head.cls_embed.weight"])
    assert torch.equal(got["model.transformer_module.decoder.mask_predictor.mask_embedder.2.0.weight"],
                       sd["panoptic_head.mask_embed.4.weight"])
    with torch.no_grad():                                            # and the loaded model runs
        out = model(pixel_values=torch.randn(1, 3, 64, 64))
    assert out.class_queries_logits.shape == (1, Q, NCLS + 1)


def test_missing_or_extra_keys_fail_in_one_line():
    sd = mmdet_state_dict()
    for bad in ({k: v for k, v in sd.items() if "post_norm" not in k}, {**sd, "panoptic_head.extra.weight": torch.ones(1)},
                {**sd, "panoptic_head.query_feat.weight": torch.ones(Q + 1, D)}):
        with pytest.raises(UserError) as e:
            load_mapped(tiny_hf(), bad)
        assert "\n" not in str(e.value)


def test_patch_merging_reorder_reproduces_mmdets_unfold_merging():
    """mmdet PatchMerging: nn.Unfold(2, stride 2) (channel c*4 + dy*2 + dx) -> LayerNorm(4C) -> Linear(4C, 2C);
    transformers' downsample with the re-ordered weights gives the same output."""
    model = tiny_hf()
    sd = mmdet_state_dict(1)
    load_mapped(model, sd)
    ds = model.model.pixel_level_module.encoder.swin.encoder.layers[0].downsample
    Hh, Ww = 6, 8
    x = torch.randn(2, Hh * Ww, C)
    unf = torch.nn.functional.unfold(x.view(2, Hh, Ww, C).permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)
    p = "backbone.stages.0.downsample."
    ref = torch.nn.functional.layer_norm(unf, (4 * C,), sd[p + "norm.weight"], sd[p + "norm.bias"]) @ sd[p + "reduction.weight"].T
    with torch.no_grad():
        got = ds(x, (Hh, Ww))
    got = got[0] if isinstance(got, tuple) else got
    assert torch.allclose(got, ref, atol=1e-5)
    w = torch.randn(3, 4 * C)                                       # the re-order is a permutation of columns
    assert torch.equal(unfold_to_concat(w).sort(1).values, w.sort(1).values)


def test_relative_position_index_equals_transformers():
    from transformers.models.swin.modeling_swin import SwinConfig, SwinModel

    m = SwinModel(SwinConfig(embed_dim=C, depths=[1], num_heads=[1], window_size=7))
    bias = [x for x in m.modules() if hasattr(x, "_create_relative_position_index")][0]
    assert torch.equal(mmdet_relative_position_index(7, 7), bias._create_relative_position_index())
    sd = mmdet_state_dict()
    sd["backbone.stages.0.blocks.0.attn.w_msa.relative_position_index"] = torch.zeros(WIN * WIN, WIN * WIN).long()
    with pytest.raises(UserError, match="relative position index"):
        map_state_dict(sd)
