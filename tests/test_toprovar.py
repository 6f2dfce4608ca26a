"""ToProVAR (baselines/toprovar.py) and the exact streaming attention entropy (varbench/attention_entropy.py):
spec §3.8 items 1, 3-6 on random tensors and the tiny model."""
import math

import pytest
import torch

from baselines.toprovar import ToProVAR, ToProVARConfig, depth_test, layer_score, low_entropy_ratio, prune_probability
from varbench.attention import sdpa_attention
from varbench.attention_entropy import materialised_attention_entropy, streaming_attention_entropy
from varbench.hooks import Method
from varbench.loop import generate


# ------------------------------------------------------------------ §3.8 item 1: FAE exactness
def printed_algorithm2_entropy(z: torch.Tensor, tile: int) -> float:
    """The paper's printed update (running Σ p̃ ln p̃ rescaled by exp(m_old − m_new) only), returned as +H."""
    m, l, s = -math.inf, 0.0, 0.0
    for t in z.split(tile):
        m_new = max(m, float(t.max()))
        a = math.exp(m - m_new) if m > -math.inf else 0.0
        p = torch.exp(t - m_new)
        l = l * a + float(p.sum())
        s = s * a + float((p * (t - m_new)).sum())
        m = m_new
    return -(s / l - math.log(l))


def test_streaming_entropy_equals_materialised_on_ascending_tiles():
    """Logits ascending across key chunks move the running max at every chunk (the rescale the paper misprints)."""
    z = torch.linspace(-4.0, 12.0, 64)
    q = z.view(1, 1, 1, 64).clone()
    k = torch.eye(64).view(1, 1, 64, 64)              # q·k_j = z_j
    ref = materialised_attention_entropy(q, k, scale=1.0)
    _, H = streaming_attention_entropy(q, k, scale=1.0, k_chunk=8)
    assert abs(float(H) - float(ref)) < 1e-5
    assert abs(printed_algorithm2_entropy(z, 8) - float(ref)) > 1e-2    # the printed update is not exact here


def test_streaming_entropy_and_output_on_random_adversarial_logits():
    g = torch.Generator().manual_seed(0)
    rows, H, Lq, Lk, c = 2, 3, 37, 301, 16
    q = torch.randn(rows, H, Lq, c, generator=g) * 3
    k = torch.randn(rows, H, Lk, c, generator=g)
    k = k * torch.linspace(0.1, 4.0, Lk).view(1, 1, Lk, 1)          # key norms grow along the key axis
    v = torch.randn(rows, H, Lk, c, generator=g)
    mask = torch.rand(rows, 1, Lq, Lk, generator=g) > 0.3
    for m in (None, mask):
        ref = materialised_attention_entropy(q, k, scale=0.7, mask=m)
        for kc, qc in ((7, 5), (64, 1024), (1024, 16)):
            out, Hs = streaming_attention_entropy(q, k, v, scale=0.7, mask=m, k_chunk=kc, q_chunk=qc,
                                                  want_output=True)
            assert torch.allclose(Hs, ref, atol=1e-5, rtol=0), (kc, qc)
            assert torch.allclose(out, sdpa_attention(q, k, v, scale=0.7, mask=m), atol=1e-5)


# ------------------------------------------------------------------ §3.8 items 3-5: D, SVD score, gate
def test_depth_test_directions_and_guard():
    rhos = {0: 0.0, 1: 0.6, 2: 0.55, 3: 0.5, 4: 0.45, 5: 0.41, 6: 0.39, 7: 0.3}
    assert depth_test(rhos, 6, 0.4, "le") and not depth_test(rhos, 6, 0.4, "ge")
    assert depth_test(rhos, 6, 0.4, "auto")            # ρ fell since scale 1: le
    up = {0: 0.0, 1: 0.2, 2: 0.3, 6: 0.45}
    assert depth_test(up, 6, 0.4, "auto") and depth_test(up, 6, 0.4, "ge")
    assert not any(depth_test(rhos, s, 2.0, "ge") for s in rhos)   # never crossed
    assert low_entropy_ratio(torch.tensor([1.0, 1.0, 1.0, 5.0])) == 0.75


def test_layer_score():
    g = torch.Generator().manual_seed(0)
    u, w = torch.randn(16, 1, generator=g), torch.randn(1, 16, generator=g)
    rank1 = u @ w + 1e-6 * torch.randn(16, 16, generator=g)
    vr, R = layer_score(rank1, 1.0)
    assert vr > 1e3 and R < 1e-6
    vr_iid, R_iid = layer_score(torch.randn(16, 16, generator=g), 1.0)
    assert 1.0 <= vr_iid < 2.0 and abs(R_iid - math.exp(-(vr_iid - 1))) < 1e-12
    Rs = [layer_score(torch.diag(torch.tensor([r, 1.0, 0.5])), 0.5)[1] for r in (1.0, 2.0, 4.0)]
    assert Rs[0] == 1.0 and Rs[0] > Rs[1] > Rs[2] >= 0


def test_gate():
    H = torch.rand(1, 256, generator=torch.Generator().manual_seed(0)) + 0.5
    _, p0 = prune_probability(H, 0.8, 0.0, 0.0, 0.9, "mean")
    assert float(p0.sum()) == 0.0                       # R = 0: Global layer, nothing pruned
    counts = [float(prune_probability(H, phi, R, 0.0, 0.9, "mean")[1].sum()) for phi, R in
              ((0.5, 0.5), (0.8, 0.5), (0.8, 0.9))]
    assert counts[0] < counts[1] < counts[2]            # monotone in φ and R
    q, _ = prune_probability(H, 0.8, 0.9, 0.0, 0.9, "mean")
    from varbench.tokens import Selection
    kept = Selection.top_k(-q, 200).keep_idx[0]
    pruned = sorted(set(range(256)) - set(kept.tolist()))
    assert float(H[0, pruned].min()) >= float(H[0, kept].max())   # pruned = the highest-entropy tokens
    _, ps = prune_probability(H, 0.8, 0.9, 0.1, 0.9, "sum")       # literal Eq. 5: gate ≈ α_min
    assert abs(float(ps.mean()) - 0.1) < 0.01


# ------------------------------------------------------------------ the method on the tiny model
def _gen(bb, m):
    return generate(bb, ["two green circles"], m, torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def none_run(tiny_backbone):
    return _gen(tiny_backbone, Method())


@pytest.mark.parametrize("opts", [ToProVAR.NOOP, {"alpha_max": 0.0}])
def test_inactive_settings_are_bit_identical_to_none(opts, tiny_backbone, none_run):
    out = _gen(tiny_backbone, ToProVAR(ToProVARConfig(**opts)))
    assert torch.equal(out.images, none_run.images) and out.record.tokens == none_run.record.tokens


def test_pruned_tokens_skip_the_layer_and_add_no_kv(tiny_backbone, none_run):
    m = ToProVAR(ToProVARConfig(beta=1e-4, d_direction="ge", tau=0.3))   # R ≈ 1: every layer Detail
    out = _gen(tiny_backbone, m)
    s, rec = out.method_summary, out.record
    assert s["D"] == 7 and min(s["R"]) > 0.1
    pruned = 0
    for si in range(7, 10):
        ks = s["kept"][str(si)]
        for li, K in enumerate(ks):
            assert rec.tokens[si][li] == K
            assert rec.kv_len[si][li] - rec.kv_len[si - 1][li] == K        # only kept tokens' K/V
            pruned += rec.scale_n[si] - K
    assert pruned > 0 and rec.tokens[:7] == none_run.record.tokens[:7]
    assert s["kernel"] == "streaming_entropy+sdpa"


def test_bad_options_are_one_line_errors():
    from varbench.errors import UserError

    with pytest.raises(UserError, match="d_direction"):
        ToProVARConfig(d_direction="up")
    with pytest.raises(UserError, match="alpha"):
        ToProVARConfig(alpha_max=1.5)


def test_calibration_rule_puts_r_half_at_the_valley():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("calibrate_toprovar", REPO / "scripts/calibrate_toprovar.py")
    cal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cal)
    star = cal.valley([2.0, 2.5, 3.0, 40.0, 55.0, 70.0])
    assert 3.0 < star < 40.0 and abs(star - math.sqrt(3.0 * 40.0)) < 1e-9
    beta = cal.beta_for(star)
    assert abs(math.exp(-beta * (star - 1)) - 0.5) < 1e-12


def test_pruned_tokens_pass_the_block_unchanged(tiny_backbone):
    """Identity restoration (spec §3.8 item 6): at a pruned (scale, layer) the pruned tokens' outputs are their inputs."""
    seen = []

    class Spy(ToProVAR):
        def after_layer(self, lctx, x_in, x_out):
            if self._sel is not None:
                mask = self._sel.mask(x_in.shape[0])
                seen.append((torch.equal(x_out[~mask], x_in[~mask]), bool((x_out[mask] != x_in[mask]).any())))

    _gen(tiny_backbone, Spy(ToProVARConfig(beta=1e-4, d_direction="ge", tau=0.3)))
    assert seen and all(same for same, _ in seen) and all(changed for _, changed in seen)


# ------------------------------------------------------------------ issue 25 item 3: auto direction, first_layer
SIDES_10 = [1, 2, 4, 6, 8, 12, 16, 20, 24, 32]


def _drive(m: ToProVAR, rho_curve: dict[int, float], depth: int = 2) -> None:
    """Run the method's hooks on a synthetic 10-scale schedule whose every layer's entropy map has the low-entropy
    share rho_curve[si] (tokens at 0 below a mean set by the tokens at 1; a random map elsewhere)."""
    from varbench.backbones.base import BackboneSpec, ScaleInfo
    from varbench.hooks import LayerCtx, ScaleCtx

    spec = BackboneSpec("synthetic", depth, 8, 2, "bitwise", 4, ("sa", "ca", "ffn"))
    sched = tuple(ScaleInfo(i, s, s, s * s, s) for i, s in enumerate(SIDES_10))
    g = torch.Generator().manual_seed(0)
    m.start()
    for si, s in enumerate(SIDES_10):
        n = s * s
        sctx = ScaleCtx(si, len(SIDES_10), (s, s), 2, 1, spec, sched)
        e = torch.ones(2, n) + 0.1 * torch.rand(2, n, generator=g)
        low = round(rho_curve.get(si, 0.5) * n)
        e[:, :low] = 0.0
        for li in range(depth):
            lctx = LayerCtx(sctx, li)
            m.attention(lctx)
            sel = m.select(lctx, torch.zeros(2, n, 8))
            m._record(lctx, e if sel is None else e[:, sel.keep_idx[0]])
        m.after_scale(sctx, None)


def test_auto_direction_with_first_layer_sees_a_curve_already_below_tau_at_scale_7():
    """A falling ρ curve (0.75 at scale 1) that is already ≤ τ at scale 7 triggers at scale 7 with
    rho_source=first_layer, as in the default mode one scale later (seen failing before the fix: ρ was recorded only
    from scale 7 in that mode, so auto compared ρ_7 with itself, chose ge and missed it)."""
    curve = {1: 0.75, 2: 0.69, 3: 0.64, 4: 0.59, 5: 0.54, 6: 0.45, 7: 0.35, 8: 0.35, 9: 0.35}
    lagged = ToProVAR(ToProVARConfig(d_direction="auto"))
    _drive(lagged, curve)
    assert lagged.D == 8                                 # ρ_7 ≤ τ passes after scale 7: prune from scale 8
    first = ToProVAR(ToProVARConfig(d_direction="auto", rho_source="first_layer"))
    _drive(first, curve)
    assert abs(first.rho[1] - 0.75) < 1e-9              # ρ of the early scales is recorded in this mode too
    assert first.D == 7
    rising = {1: 0.25, 2: 0.3, 3: 0.3, 4: 0.3, 5: 0.35, 6: 0.35, 7: 0.45, 8: 0.45, 9: 0.45}
    up = ToProVAR(ToProVARConfig(d_direction="auto", rho_source="first_layer"))
    _drive(up, rising)
    assert up.D == 7                                     # rising past τ at scale 7: ge


# ------------------------------------------------------------------ issue 25 items 2, 6, 9: notice, FLOPs, rates
@pytest.fixture(scope="module")
def default_run(tiny_backbone):
    return _gen(tiny_backbone, ToProVAR())


def test_default_beta_prunes_nothing_and_the_run_says_so_in_one_line(default_run, tiny_backbone, capsys):
    """β = 1 on a positive entropy map: ϱ ≫ 1, R ≈ 0 in every layer, nothing pruned although D is reached; the
    summary records ϱ and R per layer and report() prints one line naming the ϱ range and the calibration command
    (seen failing before: no notice existed)."""
    s = default_run.method_summary
    depth = tiny_backbone.spec.depth
    assert len(s["R"]) == len(s["varrho"]) == depth and max(s["R"]) < 1e-3 and min(s["varrho"]) > 5
    assert s["pruned_tokens"] == 0 and s["beta"] == 1.0 and s["variant"] == "full"
    recs = [{"method_summary": s}] * 3
    ToProVAR.report(recs, None, "tiny_random / toprovar / smoke")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "all 3 images" in err[0]
    assert f"{min(s['varrho']):.4g}–{max(s['varrho']):.4g}" in err[0]
    assert "python scripts/calibrate_toprovar.py --model tiny_random" in err[0]
    calibrated = dict(s, R=[0.2] + s["R"][1:])
    assert ToProVAR.run_notice([s, calibrated]) is None            # one layer of one image can prune: silent
    assert ToProVAR.run_notice([dict(s, variant="scale_token")]) is None   # R is not used by that variant
    assert ToProVAR.run_notice([{"D": None, "R": None}]) is None   # R never computed (schedule below s_rep)


def test_activation_rate_counts_images_where_something_was_pruned(default_run):
    """activation_rate = share of images where ToProVAR removed work; reaching D alone is d_reached_rate (seen
    failing before: activation_rate counted D reached with nothing pruned)."""
    s = default_run.method_summary
    assert s["D"] is not None and s["pruned_tokens"] == 0
    pruned = dict(s, pruned_tokens=57)
    skipped = dict(s, D=None, skipped_scales=[8, 9])
    none = dict(s, D=None)
    agg = ToProVAR.aggregate([s, pruned, skipped, none])
    assert agg["activation_rate"] == (0.5, 4)
    assert agg["d_reached_rate"] == (0.5, 4) and agg["D_mean"] == (s["D"], 2)


def test_method_flops_are_the_entropy_pass_and_the_svd(tiny_backbone):
    """Per image: Σ over computed (scale, layer) rows·K·Lk·(2·C + 2·H) (QKᵀ and the entropy accumulator over every
    cached key; the kernel reports no attn_keys, so the record's keys are the whole cache) plus one SVD per layer at
    s_rep; with output=fae only the accumulator, rows·K·Lk·2·H."""
    from baselines.toprovar import svd_flops
    from varbench.flops import method_flops

    spec = tiny_backbone.spec
    C, H = spec.embed_dim, spec.num_heads
    for output, per_key in (("sdpa", 2 * C + 2 * H), ("fae", 2 * H)):
        out = _gen(tiny_backbone, ToProVAR(ToProVARConfig(beta=1e-4, d_direction="ge", tau=0.3, output=output)))
        rec = out.record.per_image()[0] | {"method_summary": out.method_summary}
        assert rec["method_summary"]["pruned_tokens"] > 0
        assert rec["attn_keys"] == rec["kv_len"]        # the loop's fallback: every cached key after the layer
        h, w = rec["scale_hw"][6]
        want = sum(rec["rows"][si] * K * rec["kv_len"][si][li] * per_key
                   for si in range(len(rec["tokens"])) for li, K in enumerate(rec["tokens"][si]))
        want += spec.depth * svd_flops(h, w)
        assert method_flops(rec) == pytest.approx(want, rel=1e-12)
