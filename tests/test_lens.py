"""The folded logit lens (``Backbone.lens_entropy``, NOVA's ``lens: folded``) computes what the head and ``guide``
compute: the entropy of the guided (or each row's tempered) bit distribution, up to float rounding."""
import dataclasses

import pytest
import torch

from nova.method import Nova, NovaConfig
from varbench.loop import generate

PROMPTS = ["a red circle", "two blue squares"]


def _ent(logits):
    """Sum of the bits' binary entropies in nats, in float64, computed here (independent of varbench.entropy)."""
    p = torch.softmax(logits.double().reshape(*logits.shape[:-1], -1, 2), -1)
    return -(p * p.clamp_min(1e-300).log()).sum((-1, -2))


@pytest.fixture
def sampling(tiny_backbone):
    """Set the backbone's sampling settings for one test, then put them back."""
    bb, before = tiny_backbone, tiny_backbone.sampling

    def set_(**kw):
        bb.sampling = dataclasses.replace(before, **kw)
    yield set_
    bb.sampling = before


SETTINGS = [dict(), dict(cfg=4.5, tau=0.5), dict(cfg=1.0, tau=0.7), dict(cfg=3.0, cfg_insertion_layer=-1),
            dict(cfg=[1.0] * 4 + [3.0] * 20, tau=[1.0] * 6 + [0.6] * 20)]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}" for k in kw) or "official")
def test_folded_lens_equals_head_then_guide(tiny_backbone, sampling, kw):
    bb = tiny_backbone
    sampling(**kw)
    cond = bb.condition(PROMPTS)
    g = torch.Generator().manual_seed(0)
    scales = bb.scales()
    for scale in (scales[3], scales[-1]):
        h = torch.randn(cond.rows, scale.n, bb.spec.embed_dim, generator=g) * 3 + 0.5
        lc, lu, lg = bb.guide(bb.head(h, cond, scale), cond, scale)
        tau = bb.sampling.per_scale(bb.sampling.tau, scale.si)
        got = bb.lens_entropy(h, cond, scale, "guided")
        assert got.shape == (cond.batch, scale.n)
        torch.testing.assert_close(got.double(), _ent(lg), rtol=1e-5, atol=1e-5)
        rows = bb.lens_entropy(h, cond, scale, "rows")
        own = torch.cat([lc] + ([lu] if lu is not None else []), 0).mul(1 / tau)
        torch.testing.assert_close(rows.double(), _ent(own), rtol=1e-5, atol=1e-5)
        cond_rows = bb.lens_entropy(h[: cond.batch], cond, scale, "rows")   # NOVA's entropy_branch: cond
        torch.testing.assert_close(cond_rows, rows[: cond.batch], rtol=1e-6, atol=1e-6)


def test_folded_lens_without_the_uncond_rows(tiny_backbone):
    """A method that dropped the unconditional branch (SkipVAR): guided = cfg·ℓ + (1-cfg)·ℓ with ℓ = cond/tau."""
    bb = tiny_backbone
    cond = bb.cond_only(bb.condition(PROMPTS))
    scale = bb.scales()[5]
    h = torch.randn(cond.rows, scale.n, bb.spec.embed_dim, generator=torch.Generator().manual_seed(1))
    lg = bb.guide(bb.head(h, cond, scale), cond, scale)[2]
    torch.testing.assert_close(bb.lens_entropy(h, cond, scale, "guided").double(), _ent(lg), rtol=1e-5, atol=1e-5)


def test_guided_lens_needs_every_row_and_a_known_mix(tiny_backbone):
    bb = tiny_backbone
    cond, scale = bb.condition(PROMPTS), bb.scales()[4]
    h = torch.randn(cond.rows, scale.n, bb.spec.embed_dim)
    with pytest.raises(ValueError, match="every row"):
        bb.lens_entropy(h[:1], cond, scale, "guided")
    with pytest.raises(ValueError, match="mix"):
        bb.lens_entropy(h, cond, scale, "uncond")


class Counting(Nova):
    """NOVA unchanged, counting which lens it used."""

    def reset(self):
        super().reset()
        self.used = {"head": 0, "folded": 0}

    def select(self, lctx, x):
        head, folded = lctx.head_logits, lctx.lens_entropy

        def h(*a):
            self.used["head"] += 1
            return head(*a)

        def f(*a):
            self.used["folded"] += 1
            return folded(*a)
        lctx.head_logits, lctx.lens_entropy = h, f
        return super().select(lctx, x)


@pytest.mark.parametrize("opts", [dict(t_star=6), dict(t_star=6, entropy_branch="cond", log_base="2"),
                                  dict(t_star=7, entropy_reduction="mean_bit", r_max=0.8)], ids=["default", "cond", "units"])
def test_nova_folded_and_exact_lens_choose_the_same_tokens(tiny_backbone, opts):
    """``lens: folded`` is a faster way to the same decisions: same layer entropies (to rounding), same kept tokens
    at every (scale, layer), same image; ``exact`` never calls the folded lens and ``folded`` never the head."""
    outs = {}
    for lens in ("exact", "folded"):
        m = Counting(NovaConfig(lens=lens, **opts))
        outs[lens] = (generate(tiny_backbone, ["a red circle"], m, torch.Generator().manual_seed(0)), m.used)
    (ex, ex_used), (fo, fo_used) = outs["exact"], outs["folded"]
    assert ex_used["folded"] == 0 and ex_used["head"] > 0
    assert fo_used["head"] == 0 and fo_used["folded"] == ex_used["head"]
    assert fo.record.tokens == ex.record.tokens and min(min(t) for t in fo.record.tokens) < max(fo.record.scale_n)
    torch.testing.assert_close(torch.tensor(sum(fo.method_summary["layer_entropy"].values(), [])),
                               torch.tensor(sum(ex.method_summary["layer_entropy"].values(), [])), rtol=1e-5, atol=1e-5)
    assert torch.equal(fo.images, ex.images)


def test_per_branch_ranking_keeps_the_exact_lens(tiny_backbone):
    """``cfg_index_mode: per_branch`` ranks each row by its own logits: it stays on the head + guide path."""
    m = Counting(NovaConfig(t_star=6, cfg_index_mode="per_branch"))
    generate(tiny_backbone, ["a red circle"], m, torch.Generator().manual_seed(0))
    assert m.used["folded"] == 0 and m.used["head"] > 0
