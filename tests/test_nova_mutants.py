"""NOVA checked INSIDE real generations on model=tiny_random (issue 12).

Every record NOVA writes is recomputed here from what it saw (each block's input, each block's output, the final
logits), with the backbone's own head and guide and an entropy computed in this file, never with nova/method.py's
functions. ``scripts/nova_mutants.py`` runs these tests (and the unit tests of tests/test_nova.py) against
deliberately wrong NOVAs and prints which test kills which mutant; ``test_every_mutant_still_applies`` keeps the
script in step with the code.
"""
import importlib.util
import math

import pytest
import torch
from test_nova import Probe, _ent, _gen, _sig

from nova.method import Nova, NovaConfig
from varbench.loop import generate
from varbench.tokens import keep_count, resize_grid

PROMPT = "a red circle"
RUNS = {  # name -> NOVA options; both runs prune on this seed
    "default": {},                             # t* detected (6 on this seed), paper hyperparameters
    "clipping": {"t_star": 6, "lam": 3.0},     # λ = 3 drives Ratio_t out of [0, 1] (issue 12, item 1)
}


@pytest.fixture(scope="module", params=list(RUNS))
def run(request, tiny_backbone):
    m = Probe(NovaConfig(**RUNS[request.param]))
    out = _gen(tiny_backbone, m, PROMPT)
    assert out.method_summary["activated"], request.param
    return request.param, m, out


def _lens_map(bb, x, si):
    """Guided logit-lens entropy map [n] of a hidden state at scale si (batch of one image)."""
    cond, scale = bb.condition([PROMPT]), bb.scales()[si]
    return _ent(bb.guide(bb.head(x, cond, scale), cond, scale)[2])[0]


def test_scale_entropy_is_the_sum_over_bits_of_the_guided_distribution(run):
    """Eqs. 4-7: H̄_t = mean over tokens of Σ_bits h(p) of the guided (CFG, temperature) logits, in nats."""
    _, m, out = run
    H = out.method_summary["entropy_per_scale"]
    assert len(H) == len(m.final) == len(out.record.scale_hw)
    for si, (lc, lu, lg) in m.final.items():
        assert H[si] == pytest.approx(_ent(lg)[0].mean().item(), rel=1e-5, abs=1e-6), si


def test_t_star_follows_eq_10_on_the_recorded_entropies(run):
    name, m, out = run
    s = out.method_summary
    if name != "default":
        pytest.skip("t* is fixed in this run")
    H = s["entropy_per_scale"]
    g = {t: H[t - 1] - H[t - 2] for t in range(2, len(H) + 1)}
    eta = sum(g[t] for t in range(2, 6)) / 4
    star = next((t for t in range(6, len(H) + 1) if (g[t] + g[t - 1]) / 2 <= 0.5 * eta), None)
    assert s["t_star"] == star and s["eta"] == pytest.approx(eta)


def test_kept_set_is_the_top_k_of_the_guided_lens_map_shared_by_both_rows(run, tiny_backbone):
    """At every pruned (scale, layer): H̄_{t,j} = mean guided lens entropy of the block's input, and the kept tokens
    are that map's K highest (pruning drops the lowest-entropy tokens), one set for the cond and uncond rows."""
    _, m, out = run
    s, checked = out.method_summary, 0
    for (si, li), (x, sel, _) in m.seen.items():
        if str(si) not in s["ratios"]:
            assert sel is None
            continue
        e = _lens_map(tiny_backbone, x, si)
        assert s["layer_entropy"][str(si)][li] == pytest.approx(e.mean().item(), rel=1e-5), (si, li)
        if sel is None or sel.k == 0:
            continue
        assert sel.keep_idx.shape[0] == 1 or bool((sel.keep_idx == sel.keep_idx[:1]).all()), "kept sets differ per row"
        keep = sel.mask(1)[0]
        assert e[keep].min() >= e[~keep].max() - 1e-5, (si, li)
        checked += 1
    assert checked


def test_ratios_follow_eqs_11_to_13_with_ratio_t_clipped_first(run):
    """Eq. 11 with g_{t-1} from the recorded H̄ (the unclipped Ratio_t is recorded), then Eq. 13 on Ratio_t clipped
    to [0, 1], clipped again; the block computes exactly K = N - floor(N r) tokens."""
    name, m, out = run
    s, rec, c = out.method_summary, out.record, m.cfg
    H, t_star, outside = s["entropy_per_scale"], s["t_star"], 0
    assert sorted(s["scale_ratio_raw"]) == sorted(s["ratios"])
    for key, ratios in s["ratios"].items():
        si = int(key)
        t = si + 1
        raw = _sig((t - (t_star + 1)) / c.sigmoid_tau) - c.lam * math.tanh(H[si - 1] - H[si - 2])
        assert s["scale_ratio_raw"][key] == pytest.approx(raw, abs=1e-9), si
        outside += not 0 <= raw <= 1
        r_t, LH = min(max(raw, 0.0), 1.0), s["layer_entropy"][key]
        for j, r in enumerate(ratios):
            mu = sum(LH[:j]) / j if j else None
            expect = r_t if j == 0 else r_t - (LH[j] - mu) / mu * r_t
            assert r == pytest.approx(min(max(expect, 0.0), 1.0), abs=1e-9), (si, j)
            n = rec.scale_hw[si][0] * rec.scale_hw[si][1]
            assert rec.tokens[si][j] == keep_count(n, r)
    if name == "clipping":
        assert outside, "λ = 3 no longer drives Ratio_t out of [0, 1] on this seed: the clipping check lost its power"


def test_pruned_tokens_restore_from_the_same_block_at_the_previous_scale(run, tiny_backbone):
    """Eqs. 15-16: at every pruned (scale t, block j), including t = t*+1, the cache is block j's output minus input
    at scale t-1, and pruned outputs are input + its resize to grid t."""
    _, m, out = run
    first = out.method_summary["t_star"]
    sched, checked = tiny_backbone.scales(), set()
    for (si, li), (x, sel, cache) in m.seen.items():
        if sel is None:
            continue
        assert cache is not None, f"no residual cache at scale index {si}, block {li}"
        res, hw = cache
        prev = sched[si - 1]
        assert hw == (prev.h, prev.w)
        assert torch.allclose(res, m.outs[(si - 1, li)] - m.seen[(si - 1, li)][0], atol=1e-6)
        pruned = ~sel.mask(x.shape[0])
        expect = x + resize_grid(res, hw, (sched[si].h, sched[si].w), "area")
        assert torch.allclose(m.outs[(si, li)][pruned], expect[pruned], atol=1e-5), (si, li)
        checked.add(si)
    assert first in checked, "the first pruned scale t*+1 (index t*) was not checked"


def test_every_mutant_still_applies():
    """scripts/nova_mutants.py patches named attributes of nova.method: each must still exist and be replaced."""
    from conftest import REPO

    spec = importlib.util.spec_from_file_location("nova_mutants", REPO / "scripts" / "nova_mutants.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert len(mod.MUTANTS) >= 8
    for name, patches in mod.MUTANTS.items():
        for owner, attr, new in patches:
            assert hasattr(owner, attr), (name, attr)
            if callable(new):   # a plain value (a class flag) is the same object in a mutated run: nothing to tell
                assert getattr(owner, attr) is not new, (name, attr)
    assert all(hasattr(Nova, a) for a in ("_keep", "_maps", "_entropy", "_growth_for_ratio", "_records_cache"))


# ---------------------------------------------------------------- issue 25 item 5: corners no test covered
def _pruned_scales(out):
    return [int(k) for k in out.method_summary["ratios"]]


def test_min_keep_is_applied_in_the_loop(tiny_backbone):
    """``min_keep``: a ratio of 1 bypasses a block (K = 0), unless min_keep tokens must be kept: K = min(n, 5)."""
    out = _gen(tiny_backbone, Nova(NovaConfig(t_star=6, ratio_override=1.0, min_keep=5, layer_linkage=False)))
    rec, D = out.record, tiny_backbone.spec.depth
    assert _pruned_scales(out) == list(range(6, len(rec.scale_hw)))
    for si in _pruned_scales(out):
        n = rec.scale_hw[si][0] * rec.scale_hw[si][1]
        assert rec.tokens[si] == [min(n, 5)] * D, si
    base = _gen(tiny_backbone, Nova(NovaConfig(t_star=6, ratio_override=1.0, layer_linkage=False)))
    assert all(base.record.tokens[si] == [0] * D for si in _pruned_scales(base))
    assert not torch.equal(out.images, base.images)


def test_ratio_override_is_capped_at_r_max(tiny_backbone):
    """``ratio_override`` 0.9 with r_max 0.5: every active (scale, layer) prunes floor(n/2) tokens and records 0.5."""
    out = _gen(tiny_backbone, Nova(NovaConfig(t_star=6, ratio_override=0.9, r_max=0.5)))
    rec, s, D = out.record, out.method_summary, tiny_backbone.spec.depth
    assert _pruned_scales(out)
    for si in _pruned_scales(out):
        n = rec.scale_hw[si][0] * rec.scale_hw[si][1]
        assert s["ratios"][str(si)] == [0.5] * D, si
        assert rec.tokens[si] == [n - n // 2] * D, si


def _nats(logits):
    """Entropy of softmax(logits) in nats, in float64, written here (filtered logits at -inf contribute 0)."""
    lp = logits.double().log_softmax(-1)
    return -torch.where(lp.isfinite(), lp.exp() * lp, torch.zeros_like(lp)).sum(-1)


@pytest.fixture(scope="module")
def hart_backbone():
    from conftest import REPO
    from omegaconf import OmegaConf

    from varbench.harness.registry import build_backbone

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/hart_tiny_random.yaml"), resolve=True)
    return build_backbone(cfg, "cpu", "fp32")


def test_categorical_entropy_is_in_nats_in_the_loop_on_hart(hart_backbone):
    """The categorical head (HART; VAR later): H̄_t = mean entropy of softmax over the codebook of the guided logits,
    in nats, and H̄_{t,j} the same of the guided logit lens of block j's input (every other in-loop entropy test
    runs on Infinity's bitwise head)."""
    bb = hart_backbone
    assert bb.spec.head_type == "categorical"
    m = Probe(NovaConfig(t_star=len(bb.scales()) - 2))
    out = generate(bb, [PROMPT], m, torch.Generator().manual_seed(0))
    s = out.method_summary
    H = s["entropy_per_scale"]
    assert len(H) == len(m.final) == len(bb.scales())
    for si, (lc, lu, lg) in m.final.items():
        assert H[si] == pytest.approx(_nats(lg)[0].mean().item(), rel=1e-5), si
    cond, checked = bb.condition([PROMPT]), 0
    for (si, li), (x, _sel, _) in m.seen.items():
        if str(si) in s["layer_entropy"]:
            scale = bb.scales()[si]
            lens = _nats(bb.guide(bb.head(x, cond, scale), cond, scale)[2])[0]
            assert s["layer_entropy"][str(si)][li] == pytest.approx(lens.mean().item(), rel=1e-5), (si, li)
            checked += 1
    assert checked
