"""NOVA: each equation on hand-computed numbers, and its behaviour inside the loop on the tiny model."""
import math

import pytest
import torch

from nova.method import (
    Nova,
    NovaConfig,
    detect_inflection,
    early_baseline,
    growth_rates,
    keep_count,
    layer_ratio,
    linked_layer_ratio,
    scale_ratio,
)
from varbench.backbones.base import ScaleInfo
from varbench.errors import UserError
from varbench.hooks import Method
from varbench.loop import generate


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


def test_moving_average_changes_t_star():
    """Eq. 10 smooths: g_6 = 0.3 <= αη = 0.375 alone, but g̃_6 = (0.3 + 0.5)/2 = 0.4 > 0.375; g̃_7 = 0.2 -> t* = 7."""
    H = [1.0, 2.0, 2.5, 3.5, 4.0, 4.3, 4.4]
    assert early_baseline(H, 5) == pytest.approx(0.75)
    assert detect_inflection(H[:6], 5, 0.5) is None
    assert detect_inflection(H, 5, 0.5) == 7


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


def test_ratio_t_is_clipped_before_the_layer_linkage():
    """Issue 12 item 1: unclipped Ratio_t = 1.078 and Δ = 0.05 at a 48x48 scale: clipping Ratio_t first keeps 116
    of 2,304 tokens; clipping only r_{t,j} (``after_layer_only``, the old behaviour) keeps none."""
    means = [2.0, 2.1]                                                  # Δ = (2.1 - 2)/2 = 0.05
    assert linked_layer_ratio(1.078, means) == pytest.approx(0.95)
    assert keep_count(2304, linked_layer_ratio(1.078, means)) == 116
    assert keep_count(2304, linked_layer_ratio(1.078, means, clip_scale_ratio="after_layer_only")) == 0
    # below 0: Ratio_t = -0.2 and Δ = 1.5 (1 - Δ < 0): clipped first keeps everything, not 10 % pruned
    assert linked_layer_ratio(-0.2, [2.0, 5.0]) == 0.0
    assert linked_layer_ratio(-0.2, [2.0, 5.0], clip_scale_ratio="after_layer_only") == pytest.approx(0.1)
    assert linked_layer_ratio(0.99, [2.0, 1.0], r_max=0.9) == pytest.approx(0.9)   # r_max bounds both steps


def test_check_schedule_says_when_nova_can_never_act():
    sched = tuple(ScaleInfo(si, s, s, s * s, s) for si, s in enumerate([1, 2, 4, 6, 8, 12, 16, 20, 24, 32]))
    assert Nova().check_schedule(sched) is None                                  # t_est = 5, T = 10
    assert Nova(NovaConfig(t_est=8)).check_schedule(sched) is None               # t* = 9 can prune scale 10
    line = Nova(NovaConfig(t_est=9)).check_schedule(sched)
    assert line and "\n" not in line and "t_est=9" in line and "never" in line
    assert "t_star=10" in Nova(NovaConfig(t_star=10)).check_schedule(sched)
    assert Nova(NovaConfig(t_star=9)).check_schedule(sched) is None
    assert "fixed ratio" in Nova(NovaConfig(scale_linkage=False, fixed_ratios={64: 1.0})).check_schedule(sched)


def test_check_schedule_takes_the_backbones_own_scales(tiny_backbone):
    """The runner passes ``backbone.scales()`` (no ScaleInfo): widths come from ``.w`` when there is no rule_w."""
    scales = tiny_backbone.scales()
    assert Nova(NovaConfig(scale_linkage=False, fixed_ratios={32: 0.5})).check_schedule(scales) is None
    assert "fixed ratio" in Nova(NovaConfig(scale_linkage=False, fixed_ratios={64: 1.0})).check_schedule(scales)
    assert "t_est=9" in Nova(NovaConfig(t_est=9)).check_schedule(scales)


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
    with pytest.raises(UserError, match="g_lag"):
        NovaConfig(g_lag=0)
    with pytest.raises(UserError, match="t_star"):
        NovaConfig(t_star=0)
    for k in ("clip_scale_ratio", "layer_entropy_source", "first_layer_score", "cache_dtype"):
        with pytest.raises(UserError, match=k):
            NovaConfig(**{k: "bogus"})


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
    assert sorted(int(k) for k in s["scale_ratio_raw"]) == list(range(6, S)) and s["schedule_warning"] is None
    assert sorted(int(k) for k in s["ratios"]) == list(range(6, S))
    assert all(len(v) == D and all(0 <= r <= 1 for r in v) for v in s["ratios"].values())
    for si in range(6, S):  # tokens computed follow the ratios exactly
        n = rec.scale_hw[si][0] * rec.scale_hw[si][1]
        assert rec.tokens[si] == [keep_count(n, r) for r in s["ratios"][str(si)]]
    assert all(rec.tokens[si] == [rec.scale_hw[si][0] * rec.scale_hw[si][1]] * D for si in range(6))


def test_pruned_tokens_get_input_plus_interpolated_residual_and_kept_tokens_the_block_output(tiny_backbone):
    """At one (scale, layer): pruned outputs = input + Interp(Cache_{t-1}); kept outputs = the block run on the
    kept tokens with the same KV context (Eqs. 14-16)."""
    from varbench.kvcache import KVCache
    from varbench.tokens import resize_grid

    target = (7, 2)
    seen = {}

    class Probe(Nova):
        def select(self, lctx, x):
            sel = super().select(lctx, x)
            if (lctx.si, lctx.li) == target:
                seen.update(sel=sel, cache=self.cache.get(lctx.li), x_in=x.clone())
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
    pk = bb.gather_positions(bb.positions(cond, grid), sel)
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
    assert "t_est=9" in s["schedule_warning"]
    ref = _gen(tiny_backbone, Method())
    assert torch.equal(out.images, ref.images)


# ---------------------------------------------------------------- review of issue 12 (fail-first on the old code)
class Probe(Nova):
    """NOVA unchanged, recording what it saw and chose: the block input and the selection per (scale, layer), the
    cache entry restoration used, each block's output, the lens calls' row counts and the final logits."""

    def reset(self):
        super().reset()
        self.seen, self.outs, self.final, self.lens_rows = {}, {}, {}, []

    def select(self, lctx, x):
        head, folded = lctx.head_logits, lctx.lens_entropy

        def counting_head(h):
            self.lens_rows.append((lctx.si, lctx.li, h.shape[0]))
            return head(h)

        def counting_folded(h, *a):   # the folded lens (lens: folded, the default) sees the same hidden states
            self.lens_rows.append((lctx.si, lctx.li, h.shape[0]))
            return folded(h, *a)
        lctx.head_logits = counting_head
        lctx.lens_entropy = counting_folded if folded is not None else None   # HART has no folded lens
        cache = self.cache.get(lctx.li)
        sel = super().select(lctx, x)
        lctx.head_logits, lctx.lens_entropy = head, folded
        self.seen[(lctx.si, lctx.li)] = (x.clone(), sel, cache)
        return sel

    def after_layer(self, lctx, x_in, x_out):
        self.outs[(lctx.si, lctx.li)] = x_out.clone()
        super().after_layer(lctx, x_in, x_out)

    def after_logits(self, sctx, lc, lu, lg):
        self.final[sctx.si] = (lc.clone(), None if lu is None else lu.clone(), lg.clone())
        return super().after_logits(sctx, lc, lu, lg)


def _sig(z):
    return 1 / (1 + math.exp(-z))


def _ent(logits):
    """Sum of the bits' binary entropies in nats, computed here (independent of varbench.entropy)."""
    p = torch.softmax(logits.double().reshape(*logits.shape[:-1], -1, 2), -1)
    return -(p * p.clamp_min(1e-300).log()).sum((-1, -2))


@pytest.fixture(scope="module")
def hot_backbone(tiny_backbone):
    """The tiny backbone sampling at temperature 0.5 (its own config uses 1.0, where a missing /tau is invisible)."""
    import copy
    import dataclasses

    bb = copy.copy(tiny_backbone)
    bb.sampling = dataclasses.replace(tiny_backbone.sampling, tau=0.5)
    return bb


def test_clip_scale_ratio_before_the_layer_linkage(tiny_backbone):
    """Item 1: Ratio_t is clipped to [0, r_max] BEFORE Eq. 13. λ = 3 drives Ratio_t above 1 at t = 8 on this seed
    (g_7 < 0); a layer with Δ > 0 must then prune less than everything (the old code kept 0 tokens there)."""
    m = Probe(NovaConfig(t_star=6, lam=3.0))
    out = _gen(tiny_backbone, m)
    s = out.method_summary
    H, acted = s["entropy_per_scale"], 0
    for si, ratios in s["ratios"].items():
        t, si = int(si) + 1, int(si)
        raw = _sig((t - 7) / 0.8) - 3.0 * math.tanh(H[si - 1] - H[si - 2])
        r_t = min(max(raw, 0.0), 1.0)
        LH = s["layer_entropy"][str(si)]
        for j, r in enumerate(ratios):
            expect = r_t if j == 0 else r_t * (1 - (LH[j] - sum(LH[:j]) / j) / (sum(LH[:j]) / j))
            assert r == pytest.approx(min(max(expect, 0.0), 1.0), abs=1e-9), (si, j, raw)
        acted += raw > 1
    assert acted, "the configuration no longer drives Ratio_t above 1: pick another λ"


def test_fixed_t_star_at_or_below_t_est_still_restores_from_the_cache(tiny_backbone):
    """Item 2: t_star = 5 = t_est: scale 6 is pruned, so every block needs its residual of scale 5 (Eq. 16)."""
    m = Probe(NovaConfig(t_star=5, ratio_override=0.5, layer_linkage=False))
    _gen(tiny_backbone, m)
    sched = tiny_backbone.scales()
    for li in range(tiny_backbone.spec.depth):
        x_in, sel, cache = m.seen[(5, li)]
        assert sel is not None and cache is not None, f"no residual cache at the first pruned scale, block {li}"
        assert cache[1] == (sched[4].h, sched[4].w)


def test_cond_entropy_and_per_branch_ranking_divide_by_the_temperature(hot_backbone):
    """Item 4: the cond branch's distribution is softmax(cond/τ), like the guided one (guided = CFG mix / τ)."""
    bb = hot_backbone
    m = Probe(NovaConfig(t_star=6, entropy_branch="cond", layer_linkage=False))
    out = _gen(bb, m)
    H = out.method_summary["entropy_per_scale"]
    for si, (lc, lu, lg) in m.final.items():
        assert H[si] == pytest.approx(_ent(lc / 0.5)[:1].mean().item(), rel=1e-5)
    m = Probe(NovaConfig(t_star=6, cfg_index_mode="per_branch", layer_linkage=False))
    _gen(bb, m)
    cond = bb.condition(["a red circle"])
    checked = 0
    for (si, li), (x, sel, _) in m.seen.items():
        if sel is None or sel.k == 0:
            continue
        e = _ent(bb.head(x, cond, bb.scales()[si]) / 0.5)           # [rows, n]: each row its own map
        assert sel.keep_idx.shape[0] == 2
        for row in range(2):
            keep = sel.mask(2)[row]
            assert e[row][keep].min() >= e[row][~keep].max() - 1e-6, (si, li, row)
        checked += 1
    assert checked


def test_cond_entropy_branch_runs_the_lens_on_the_cond_rows_only(tiny_backbone):
    """Item 4: ``entropy_branch: cond`` exists to save the uncond row's lens cost."""
    m = Probe(NovaConfig(t_star=6, entropy_branch="cond"))
    _gen(tiny_backbone, m)
    assert m.lens_rows and {rows for *_, rows in m.lens_rows} == {1}


def test_attn_ranks_block_1_by_block_1_at_the_previous_scale(tiny_backbone):
    """Item 5 (methods.md §2.4): NOVA w/ Attn scores block 1 at scale t by block 1's attention mass at t-1."""
    from varbench.tokens import resize_grid

    class AttnProbe(Nova):
        def reset(self):
            super().reset()
            self.maps, self.scores = {}, {}

        def _attn_score(self, lctx, n):
            score = super()._attn_score(lctx, n)
            self.scores[(lctx.si, lctx.li)] = score.clone()
            return score

        def after_layer(self, lctx, x_in, x_out):
            if self.attn_map is not None:
                self.maps[(lctx.si, lctx.li)] = (self.attn_map.clone(), lctx.scale.hw)
            super().after_layer(lctx, x_in, x_out)

    m = AttnProbe(NovaConfig(t_star=6, selection="attn", ratio_override=0.5))
    _gen(tiny_backbone, m)
    firsts = [si for (si, li) in m.scores if li == 0]
    assert firsts
    for si in firsts:
        prev, hw = m.maps[(si - 1, 0)]
        grid = tiny_backbone.scales()[si]
        expect = resize_grid(prev[..., None], hw, (grid.h, grid.w), "area")[..., 0].mean(0, keepdim=True)
        assert torch.allclose(m.scores[(si, 0)], expect), si


# ---------------------------------------------------------------- the readings of methods.md §2.3 (issue 12, item 3)
@pytest.fixture(scope="module")
def combo(tiny_backbone):
    """One run for three independent options: g_lag = 2, a bf16 cache, block 1 ranked by the previous final map."""
    m = Probe(NovaConfig(t_star=6, g_lag=2, cache_dtype="bf16", first_layer_score="prev_scale_final"))
    return m, _gen(tiny_backbone, m)


def test_g_lag_2_uses_the_growth_two_scales_back(combo):
    m, out = combo
    s, c = out.method_summary, m.cfg
    H = s["entropy_per_scale"]
    for key, raw in s["scale_ratio_raw"].items():
        t = int(key) + 1   # g_{t-2} = H̄_{t-2} - H̄_{t-3}: 0-based H[t-3] - H[t-4]
        assert raw == pytest.approx(_sig((t - 7) / c.sigmoid_tau) - c.lam * math.tanh(H[t - 3] - H[t - 4]), abs=1e-12)


def test_cache_dtype_bf16_stores_and_restores_bf16_residuals(combo, tiny_backbone):
    from varbench.tokens import resize_grid

    m, out = combo
    sched, checked = tiny_backbone.scales(), 0
    for (si, li), (x, sel, cache) in m.seen.items():
        if sel is None or cache is None:
            continue
        res, hw = cache
        assert res.dtype == torch.bfloat16
        assert torch.equal(res, (m.outs[(si - 1, li)] - m.seen[(si - 1, li)][0]).to(torch.bfloat16))
        pruned = ~sel.mask(x.shape[0])
        expect = x + resize_grid(res, hw, (sched[si].h, sched[si].w), "area").to(x.dtype)
        assert torch.allclose(m.outs[(si, li)][pruned], expect[pruned], atol=1e-6)
        checked += 1
    assert checked


def _top_k_of(score, sel):
    keep = sel.mask(1)[0]
    return score[keep].min() >= score[~keep].max() - 1e-5


def test_first_layer_score_prev_scale_final_ranks_block_1_by_the_last_final_map(combo, tiny_backbone):
    from varbench.tokens import resize_grid

    m, _ = combo
    sched, cond, checked = tiny_backbone.scales(), tiny_backbone.condition(["a red circle"]), 0
    for (si, li), (x, sel, _) in m.seen.items():
        if sel is None or sel.k == 0:
            continue
        if li == 0:
            prev = sched[si - 1]
            final = _ent(m.final[si - 1][2])[:1].float()
            score = resize_grid(final[..., None], (prev.h, prev.w), (sched[si].h, sched[si].w), "area")[0, :, 0]
        else:
            score = _ent(tiny_backbone.guide(tiny_backbone.head(x, cond, sched[si]), cond, sched[si])[2])[0]
        assert _top_k_of(score, sel), (si, li)
        checked += li == 0
    assert checked


def test_layer_entropy_source_prev_scale_lens(tiny_backbone):
    """H̄_{t,j} and the ranking from the lens of block j's OUTPUT at scale t-1, resized to grid t."""
    from varbench.tokens import resize_grid

    bb = tiny_backbone
    m = Probe(NovaConfig(t_star=6, layer_entropy_source="prev_scale_lens"))
    out = _gen(bb, m)
    s, sched, cond, checked = out.method_summary, bb.scales(), bb.condition(["a red circle"]), 0
    for (si, li), (x, sel, _) in m.seen.items():
        if str(si) not in s["ratios"]:
            continue
        prev = sched[si - 1]
        lens = _ent(bb.guide(bb.head(m.outs[(si - 1, li)], cond, prev), cond, prev)[2])[:1].float()
        score = resize_grid(lens[..., None], (prev.h, prev.w), (sched[si].h, sched[si].w), "area")[0, :, 0]
        assert s["layer_entropy"][str(si)][li] == pytest.approx(score.mean().item(), rel=1e-5)
        if sel is not None and sel.k:
            assert _top_k_of(score, sel), (si, li)
            checked += 1
    assert checked


def test_layer_entropy_source_prev_scale_final(tiny_backbone):
    """One ranking per scale (the previous scale's final Eq. 4 map, resized); H̄_{t,j} still from the input lens."""
    from varbench.tokens import resize_grid

    bb = tiny_backbone
    m = Probe(NovaConfig(t_star=6, layer_entropy_source="prev_scale_final"))
    out = _gen(bb, m)
    s, sched, cond, checked = out.method_summary, bb.scales(), bb.condition(["a red circle"]), 0
    for (si, li), (x, sel, _) in m.seen.items():
        if str(si) not in s["ratios"]:
            continue
        lens = _ent(bb.guide(bb.head(x, cond, sched[si]), cond, sched[si])[2])[0]
        assert s["layer_entropy"][str(si)][li] == pytest.approx(lens.mean().item(), rel=1e-5)
        prev = sched[si - 1]
        final = _ent(m.final[si - 1][2])[:1].float()
        score = resize_grid(final[..., None], (prev.h, prev.w), (sched[si].h, sched[si].w), "area")[0, :, 0]
        if sel is not None and sel.k:
            assert _top_k_of(score, sel), (si, li)
            checked += 1
    assert checked


# ---------------------------------------------------------------- issue 25 (fail-first on the old code)
def test_several_prompts_are_refused_in_one_line(tiny_backbone):
    """Item 4: t*, Ratio_t, H̄_{t,j} and the kept sets are each image's own, but a Selection is one rectangle for
    the batch: the old code took image 0's entropies ([:1]) for every image. NOVA refuses a batch in one line."""
    rngs = [torch.Generator().manual_seed(s) for s in (0, 1)]
    with pytest.raises(UserError, match="per image") as e:
        generate(tiny_backbone, ["a red circle", "two blue squares"], Nova(NovaConfig(t_star=6)), rngs)
    assert "\n" not in str(e.value) and "2" in str(e.value)
    assert not Nova.batch_rectangular     # the runner then generates NOVA one image at a time


def test_the_runner_gives_each_image_the_run_it_gets_alone(tiny_backbone, tmp_path):
    """Item 4: generate_items with batch_size=2 gives, per image, exactly the single-prompt run with its own RNG
    (with ``batch_rectangular = True`` the runner would batch the two prompts and NOVA would refuse)."""
    import numpy as np
    from PIL import Image

    from varbench.harness.rundir import RunDir
    from varbench.harness.runner import Item, generate_items
    from varbench.io import to_uint8

    prompts, seeds = ["a red circle", "two blue squares"], [3, 4]
    items = [Item(index=i, prompt=p, seed=s, relpath=f"{i}.png") for i, (p, s) in enumerate(zip(prompts, seeds))]
    rd = RunDir(tmp_path)
    generate_items(tiny_backbone, Nova(NovaConfig(t_star=6)), items, rd, {"name": "t"}, batch_size=2, progress=False)
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        alone = to_uint8(_gen(tiny_backbone, Nova(NovaConfig(t_star=6)), p, s).images)[0]
        got = torch.from_numpy(np.asarray(Image.open(rd.images / f"{i}.png")))
        assert torch.equal(got, alone), p
