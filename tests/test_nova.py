"""NOVA: each equation on hand-computed numbers, and its behaviour inside the loop on the tiny model."""
import math

import pytest
import torch

from varbench.errors import UserError
from varbench.hooks import Method
from varbench.loop import generate
from nova.method import (Nova, NovaConfig, detect_inflection, early_baseline, growth_rates, keep_count,
                               layer_ratio, scale_ratio)


# ---------------------------------------------------------------- Eqs. 8-10
def test_growth_and_baseline():
    H = [1.0, 2.0, 2.5, 3.5, 4.0]
    assert growth_rates(H) == [None, 1.0, 0.5, 1.0, 0.5]
    assert early_baseline(H, 5) == pytest.approx((1.0 + 0.5 + 1.0 + 0.5) / 4)  # η = 0.75


def test_inflection_detected_at_first_smoothed_drop():
    # η = 0.75 (above); t=6: g6 = 0.5, g̃6 = (0.5+0.5)/2 = 0.5 > 0.375; t=7: g7 = 0.2, g̃7 = 0.35 <= 0.375 -> t* = 7
    H = [1.0, 2.0, 2.5, 3.5, 4.0, 4.5, 4.7, 4.8]
    assert detect_inflection(H[:6], 5, 0.5) is None
    assert detect_inflection(H[:7], 5, 0.5) == 7
    assert detect_inflection(H, 5, 0.5) == 7


def test_inflection_needs_t_est_plus_one_scales_and_can_never_happen():
    assert detect_inflection([1, 2, 3, 4, 5], 5, 0.5) is None      # only the baseline is known
    steady = [1.0 + k for k in range(10)]                          # constant growth 1 > 0.5·1
    assert detect_inflection(steady, 5, 0.5) is None
    assert detect_inflection(steady, 5, 1.0) == 6                  # g̃ = 1 <= 1·η


def test_nonpositive_baseline_options():
    H = [3.0, 2.0, 1.5, 1.0, 0.5, 0.6, 0.7]                         # η = -0.625 < 0
    assert detect_inflection(H, 5, 0.5, "literal") is None         # g̃6 = (0.1-0.5)/2 = -0.2 > -0.3125; g̃7 = 0.1
    assert detect_inflection(H, 5, 0.5, "never") is None
    assert detect_inflection(H, 5, 0.5, "activate_immediately") == 6


# ---------------------------------------------------------------- Eq. 11, 12-13, clipping
def test_scale_ratio_values():
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert scale_ratio(7, 6, 0.0, 0.8, 0.1) == pytest.approx(0.5)
    assert scale_ratio(8, 6, 0.0, 0.8, 0.1) == pytest.approx(sig(1 / 0.8))             # 0.7773
    assert scale_ratio(8, 6, 0.0, 0.8, 0.1) == pytest.approx(0.77730, abs=1e-5)
    assert scale_ratio(9, 6, 2.0, 0.8, 0.1) == pytest.approx(sig(2.5) - 0.1 * math.tanh(2.0))  # 0.9241 - 0.0964


def test_layer_ratio_values():
    assert layer_ratio(0.6, [2.0]) == 0.6                                  # j = 1: Ratio_t
    # j = 3: μ = (2 + 4)/2 = 3, Δ = (3.6 - 3)/3 = 0.2 -> 0.6·(1 - 0.2) = 0.48
    assert layer_ratio(0.6, [2.0, 4.0, 3.6]) == pytest.approx(0.48)
    # a layer less uncertain than its predecessors prunes more: Δ = (1.5-3)/3 = -0.5 -> 0.9
    assert layer_ratio(0.6, [2.0, 4.0, 1.5]) == pytest.approx(0.9)


def test_keep_count_clips_and_rounds_like_fastvar():
    assert keep_count(1024, 0.4) == 1024 - 409          # K = N - floor(N·r) = 615
    assert keep_count(100, 1.7) == 0                    # clipped to r_max = 1: bypass
    assert keep_count(100, -0.3) == 100                 # clipped to 0: keep all
    assert keep_count(100, 0.99, r_max=0.9) == 10
    assert keep_count(100, 1.0, min_keep=4) == 4


def test_bad_options_are_refused():
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        NovaConfig(fixed_ratios={32: 1.5})
    with pytest.raises(UserError, match="r_max"):
        NovaConfig(r_max=-0.1)
    with pytest.raises(UserError, match="interp"):
        NovaConfig(interp="lanczos")
    with pytest.raises(UserError, match="fixed_ratios"):
        NovaConfig(scale_linkage=False)


# ---------------------------------------------------------------- in the loop
def _gen(bb, method, prompt="a red circle", seed=0):
    return generate(bb, [prompt], method, torch.Generator().manual_seed(seed))


def test_all_ratios_zero_is_bit_identical_to_none(tiny_backbone):
    ref = _gen(tiny_backbone, Method())
    out = _gen(tiny_backbone, Nova(NovaConfig(t_star=6, ratio_override=0.0)))
    assert out.method_summary["activated"]
    assert torch.equal(out.images, ref.images)


def test_records_are_complete(tiny_backbone):
    out = _gen(tiny_backbone, Nova(NovaConfig(t_star=6)))
    s, rec = out.method_summary, out.record
    S, D = len(rec.scale_hw), tiny_backbone.spec.depth
    assert s["t_star"] == 6 and s["first_pruned_si"] == 6
    assert len(s["entropy_per_scale"]) == S
    assert sorted(int(k) for k in s["ratios"]) == list(range(6, S))
    assert all(len(v) == D and all(0 <= r <= 1 for r in v) for v in s["ratios"].values())
    for si in range(6, S):  # tokens computed follow the ratios exactly
        n = rec.scale_hw[si][0] * rec.scale_hw[si][1]
        assert rec.tokens[si] == [keep_count(n, r) for r in s["ratios"][str(si)]]
    assert all(rec.tokens[si] == [rec.scale_hw[si][0] * rec.scale_hw[si][1]] * D for si in range(6))


def test_pruned_tokens_get_input_plus_interpolated_residual_and_kept_tokens_the_block_output(tiny_backbone):
    """At one (scale, layer): pruned outputs = input + Interp(Cache_{t-1}); kept outputs = the block run on the
    kept tokens with the same KV context (Eqs. 14-16)."""
    from varbench.backbones.infinity.model import KVCache
    from varbench.tokens import resize_grid

    target = (7, 2)
    seen = {}

    class Probe(Nova):
        def select(self, lctx, x):
            sel = super().select(lctx, x)
            if (lctx.si, lctx.li) == target:
                seen.update(sel=sel, cache=self.cache[lctx.li], x_in=x.clone())
            return sel

        def attention(self, lctx):
            if (lctx.si, lctx.li) != target:
                return None

            def attn(q, k, v, *, scale, mask=None, ctx=None):
                seen.update(k=k.clone(), v=v.clone())
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            return attn

        def after_layer(self, lctx, x_in, x_out):
            if (lctx.si, lctx.li) == target:
                seen["x_out"] = x_out.clone()
            super().after_layer(lctx, x_in, x_out)

    bb = tiny_backbone
    _gen(bb, Probe(NovaConfig(t_star=6, ratio_override=0.5, layer_linkage=False)))
    sel, x_in, x_out = seen["sel"], seen["x_in"], seen["x_out"]
    (res, hw), grid = seen["cache"], bb.scales()[target[0]]
    assert 0 < sel.k < x_in.shape[1] and hw == (bb.scales()[target[0] - 1].h, bb.scales()[target[0] - 1].w)
    pruned = ~sel.mask(x_in.shape[0])
    expect = x_in + resize_grid(res, hw, (grid.h, grid.w), "area")
    assert torch.allclose(x_out[pruned], expect[pruned], atol=1e-6)
    # kept: rerun the block on the kept tokens with the keys cached before this scale
    K = sel.k
    kv = KVCache(seen["k"][:, :, :-K], seen["v"][:, :, :-K])
    cond = bb.condition(["a red circle"])
    xk = sel.gather(x_in)
    pk = bb.gather_positions(bb.positions(grid), sel)
    for name in ("sa", "ca", "ffn"):
        xk = xk + bb.model.blocks[target[1]].branch(name, xk, gss=cond.gss, mem=cond.mem, cos_sin=pk, kv=kv)
    assert torch.allclose(sel.gather(x_out), xk, atol=1e-5)
    assert not pruned.all() and pruned.any()


def test_nova_is_deterministic_for_a_seed(tiny_backbone):
    a = _gen(tiny_backbone, Nova(), seed=3)
    b = _gen(tiny_backbone, Nova(), seed=3)
    assert torch.equal(a.images, b.images) and a.method_summary == b.method_summary


def test_no_inflection_means_no_reduction_and_is_recorded(tiny_backbone):
    out = _gen(tiny_backbone, Nova(NovaConfig(t_est=9)))   # t* >= 10 = T: nothing left to prune
    s = out.method_summary
    assert not s["activated"] and s["ratios"] == {}
    ref = _gen(tiny_backbone, Method())
    assert torch.equal(out.images, ref.images)
