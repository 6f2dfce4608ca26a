"""model=tiny: the project's own trained Infinity-architecture model (weights in the repo) and its custom schedule."""
import copy

import numpy as np
import pytest
import torch

from varbench.backbones.infinity.schedules import custom_schedule, rope_positions, schedule_from_config
from varbench.errors import UserError


def test_custom_schedule_positions_and_rule_widths(trained_tiny_cfg):
    s = schedule_from_config(trained_tiny_cfg["schedule"])
    assert s.pn == "custom" and len(s.hws) == 12 and s.hws[-1] == (16, 16) and s.total_tokens == 785
    assert s.rope_grid == (16, 16)
    pos = rope_positions(s)
    last = pos[-256:]
    assert torch.equal(last[:, 0].unique(), torch.arange(16)) and torch.equal(last[:, 1].unique(), torch.arange(16))
    assert pos[0].tolist() == [0, 0] and pos[1:5].tolist() == [[0, 0], [0, 8], [8, 0], [8, 8]]
    assert [sc.rule_w for sc in s.scales][-4:] == [32, 40, 48, 64]
    assert [sc.rule_w for sc in schedule_from_config({"h_div_w": 1.0, "pn": "0.25M"}).scales] == \
        [1, 2, 4, 6, 8, 12, 16, 20, 24, 32]


@pytest.mark.parametrize("hws,rule", [([], None), ([(2, 2), (1, 1)], None), ([(1, 1), (2, 2)], [1])])
def test_custom_schedule_rejects_bad_grids(hws, rule):
    with pytest.raises(ValueError):
        custom_schedule(hws, rule)


def _shapes_accuracy(cfg, n_per_tag=2, method=None):
    from eval.shapes.scorer import score_image
    from eval.shapes.world import prompt_set
    from varbench.harness.registry import build_backbone
    from varbench.harness.runner import to_uint8
    from varbench.loop import generate

    bb = build_backbone(cfg, "cpu", "fp32")
    metas = prompt_set(n_per_tag, seed=7)
    ok, outs = 0, []
    for i, m in enumerate(metas):
        out = generate(bb, [m["prompt"]], method, torch.Generator().manual_seed(i))
        img = to_uint8(out.images)[0].numpy()
        ok += score_image(img, m)[0]
        outs.append(out)
    return ok / len(metas), outs


def test_trained_tiny_draws_the_shapes_it_is_asked_for(trained_tiny_cfg):
    """The shipped weights draw 64-px shapes that the exact scorer accepts far more often than the same
    architecture with seeded random weights (which draws noise)."""
    acc, outs = _shapes_accuracy(trained_tiny_cfg)
    assert outs[0].images.shape == (1, 3, 64, 64)
    rnd = dict(trained_tiny_cfg, package_weights=None)
    acc_rnd, _ = _shapes_accuracy(rnd)
    assert acc >= 0.25 and acc_rnd <= 0.1, (acc, acc_rnd)   # measured: 0.33 and 0.0 (torch 2.14.1, CPU)


def test_package_weights_load_strictly_and_fail_in_one_line(trained_tiny_cfg, tmp_path, monkeypatch):
    from varbench.backbones.infinity import load
    from varbench.harness.registry import build_backbone

    wrong = copy.deepcopy(trained_tiny_cfg)
    wrong["arch"]["embed_dim"] = 64
    with pytest.raises(UserError, match="infinity.safetensors does not match the model config"):
        build_backbone(wrong, "cpu", "fp32")
    monkeypatch.setattr(load, "PACKAGE_WEIGHTS", tmp_path)
    with pytest.raises(UserError, match="package weights infinity.safetensors, vae.safetensors, text.safetensors "
                                        "not found") as e:
        build_backbone(trained_tiny_cfg, "cpu", "fp32")
    assert "\n" not in str(e.value) and "train_tiny.py" in str(e.value)


def test_width_keyed_methods_act_on_the_custom_schedule(trained_tiny_cfg):
    """FastVAR's official rule (prune widths 32, 40; skip 48, 64) reaches model=tiny through rule_widths."""
    from varbench.harness.registry import build_backbone, build_method
    from varbench.loop import generate

    bb = build_backbone(trained_tiny_cfg, "cpu", "fp32")
    m = build_method({"name": "fastvar", "prune_ratios": {32: 0.4, 40: 0.5}, "skip_widths": [48, 64],
                      "blocks": [1, 3], "cache_width": 24, "interp": "area"})
    out = generate(bb, ["a red circle"], m, torch.Generator().manual_seed(0))
    assert out.record.skipped_scales == [10, 11]   # grids 12x12, 16x16 stand for widths 48, 64
    tok = np.asarray(out.record.tokens)            # [scale, layer] tokens computed (per row)
    assert tok[8, 0] == 81 and tok[8, 1] < 81 and tok[9, 1] < 100 and tok[7, 1] == 64


def test_straight_through_bsq_has_the_inference_values_and_passes_gradients():
    """BSQVAE.encode_bits(straight_through=True) (used by scripts/train_tiny.py) gives the same bits and features as
    the inference path, and gradients reach the encoder (without it they are zero: d/dz (z + (zhat - z)) = 0)."""
    from varbench.backbones.infinity.vae import BSQVAE

    torch.manual_seed(0)
    vae = BSQVAE(8, 32, (1, 2), 1, 4)
    sched = [(1, h, h) for h in (1, 2, 3, 5, 8)]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    b0, o0 = vae.encode_bits(x, sched)
    b1, o1 = vae.encode_bits(x, sched, straight_through=True)
    assert all(torch.equal(a, b) for a, b in zip(b0, b1)) and torch.equal(o0, o1)
    w = next(vae.encoder.parameters())
    g0, = torch.autograd.grad(vae.decoder(o0[:, :, 0]).square().mean(), [w], allow_unused=True)
    g1, = torch.autograd.grad(vae.decoder(o1[:, :, 0]).square().mean(), [w])
    assert (g0 is None or not g0.abs().sum()) and g1.abs().sum() > 0


def test_shipped_weights_stay_within_the_size_budget():
    """MODEL_CARD.md states the budget: 10 MB for the three safetensors files."""
    from varbench.backbones.infinity.load import PACKAGE_WEIGHTS

    files = sorted((PACKAGE_WEIGHTS / "tiny").glob("*.safetensors"))
    assert len(files) == 3 and sum(f.stat().st_size for f in files) <= 10 * 2**20
