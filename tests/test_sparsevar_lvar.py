"""SparseVAR as Weepingchestnut/Lvar implements it (baselines/sparsevar_lvar.py), tested from the rules read in
``models/sparsevar/sparsevar_model.py`` @f94b7ec (``shared/specs/lvar_sparsevar_scalekv.md``). Every expected value
is computed here, in plain Python or with the torch ops the rules name, never with the module's functions.

Ties: the metric is nearest-upsampled (equal values in blocks) and anchors can be equidistant; torch's sort is not
stable, so the unit tests accept any valid choice inside a tie group. The end-to-end reference (a loop written here
the way Lvar's loop runs: one gather at block 0, one scatter + anchor copy after the last block, codes zeroed) uses
the same sort ops the lines name, so it must match bit for bit.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from baselines.sparsevar_lvar import SparseVARLvar, SparseVARLvarConfig
from varbench.attention import sdpa_attention
from varbench.backbones.base import BackboneSpec, ScaleInfo
from varbench.errors import UserError
from varbench.hooks import LayerCtx, Method, ScaleCtx
from varbench.loop import generate

SPEC = BackboneSpec("fake", depth=8, embed_dim=6, num_heads=1, head_type="bitwise", head_dim_out=3,
                    branches=("sa", "ca", "ffn"))


# ------------------------------------------------------------------ the rules, written out independently
def rule_anchor_coords(N: int, s: int, quirk: bool) -> list[int]:
    """:97-101: every s-th coordinate; N-1 appended when s % N != 0 (quirk) / N % s != 0 (meant)."""
    coords = list(range(0, N, s))
    if (s % N if quirk else N % s) != 0:
        coords.append(N - 1)
    return coords


def rule_anchors(N: int, s: int, quirk: bool) -> list[tuple[int, int]]:
    c = rule_anchor_coords(N, s, quirk)
    return [(r, q) for r in c for q in c]          # meshgrid 'ij', flattened row-major (:104-107)


def rule_ratio(mse: list[list[float]], thr: float) -> float:
    """:770 — max over rows of the fraction of tokens with mse / (max over the whole batch) > thr."""
    top = max(max(r) for r in mse)
    return max(sum(1 for v in r if v / top > thr) / len(r) for r in mse)


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.double() @ b.double() / max(a.double().norm() * b.double().norm(), 1e-8))


def sctx(si, hw, batch=1, rows=None, num_scales=13):
    return ScaleCtx(si, num_scales, hw, rows or 2 * batch, batch, SPEC, (), hw[1])


def drive_prev_scale(m: Method, si: int, n: int, mse_rows: torch.Tensor, logits: torch.Tensor, batch=1):
    """Scale si (n×n, unpruned): block chunk 3 of 8 on depth 8 = block 3; its output − input is sqrt(mse) in every
    channel (mean square = mse), then the guided logits."""
    C = SPEC.embed_dim
    sc = sctx(si, (n, n), batch)
    for li in range(SPEC.depth):
        x_in = torch.zeros(2 * batch, n * n, C)
        x_out = x_in.clone()
        if li == 3:
            x_out[...] = mse_rows.sqrt()[..., None]
        m.after_layer(LayerCtx(sc, li), x_in, x_out)
    m.after_logits(sc, None, None, logits)


def decide(m: Method, si: int, N: int, batch=1, x=None):
    sc = sctx(si, (N, N), batch)
    x = torch.zeros(2 * batch, N * N, SPEC.embed_dim) if x is None else x
    sel = m.select(LayerCtx(sc, 0), x)
    return sc, sel


def kept_rows(sel, batch):
    return [sorted(sel.keep_idx[b if sel.keep_idx.shape[0] > 1 else 0].tolist()) for b in range(batch)]


def upsampled(vals: torch.Tensor, n: int, N: int) -> list[float]:
    """nearest: target (y, x) reads source (floor(y·n/N), floor(x·n/N))."""
    return [float(vals[(y * n) // N * n + (x * n) // N]) for y in range(N) for x in range(N)]


def check_top_set(kept: list[int], metric: list[float], k: int):
    """The k largest (any choice inside the tie group at the cut)."""
    assert len(kept) == k
    if k == 0:
        return
    cut = sorted(metric)[-k]
    assert all(metric[i] >= cut for i in kept)
    assert all(i in kept for i, v in enumerate(metric) if v > cut)


# ------------------------------------------------------------------ anchor grid
@pytest.mark.parametrize("N,s", [(40, 4), (48, 4), (64, 4), (40, 3), (12, 4), (16, 4), (10, 4), (7, 3), (4, 4)])
@pytest.mark.parametrize("quirk", [True, False])
def test_anchor_grid(N, s, quirk):
    m = SparseVARLvar(SparseVARLvarConfig(local_window_size=s, quirk_anchor_mod=quirk,
                                          quirk_b1_no_anchor_merge=False, compress_ratio=2.0))
    # no token is above 2.0 x max: ratio 0 -> k = 0; without the zero-k quirk the top-k part is empty, so the kept
    # set is exactly the merged anchors
    m.cfg.quirk_zero_k_keeps_all = False
    n = max(1, N // 2)
    drive_prev_scale(m, 9, n, torch.rand(2, n * n) + 0.1, torch.randn(1, n * n, 6))
    _, sel = decide(m, 10, N)
    anchors = rule_anchors(N, s, quirk)
    assert kept_rows(sel, 1)[0] == sorted({r * N + c for r, c in anchors})
    if quirk and s < N:   # N-1 always appended (s % N = s != 0)
        assert N - 1 in rule_anchor_coords(N, s, True)
    if (N, s) == (40, 3):
        # (N-1) % s == 0 means N % s == 1: the meant test appends the duplicate as well
        assert rule_anchor_coords(N, s, True).count(39) == 2 == rule_anchor_coords(N, s, False).count(39)
    if (N, s) == (64, 4):
        assert rule_anchor_coords(N, s, True)[-1] == 63 and rule_anchor_coords(N, s, False)[-1] == 60


# ------------------------------------------------------------------ adaptive ratio and the kept set
@pytest.mark.parametrize("seed", range(4))
def test_adaptive_ratio_and_kept_set_batch1(seed):
    g = torch.Generator().manual_seed(seed)
    n, N = 5, 8
    rows = torch.rand(2, n * n, generator=g) ** 3          # cond and uncond rows' MSE maps
    mse = ((rows[0] + rows[1]) / 2)
    m = SparseVARLvar()
    drive_prev_scale(m, 9, n, rows, torch.randn(1, n * n, 6, generator=g))
    r = rule_ratio([mse.tolist()], 0.6)
    assert float(m.ratio) == pytest.approx(r, abs=1e-6)
    _, sel = decide(m, 10, N)
    k = int(N * N * r)
    metric = upsampled(mse, n, N)
    check_top_set(kept_rows(sel, 1)[0], metric, k)      # B = 1 (quirk on): the top-k only, no anchors
    assert m.claims[(10, 0)] == [k]


def test_ratio_is_strict_and_over_the_whole_batch():
    """Exactly representable values (squares of dyadic numbers): 0.25 / 1.0 is not > 0.25; image 1's values are
    compared with image 0's maximum."""
    m = SparseVARLvar(SparseVARLvarConfig(quirk_codes_view=False, compress_ratio=0.25))
    n = 2
    a = torch.tensor([1.0, 0.25, 0.25, 0.0])
    b = torch.tensor([0.25, 0.25, 0.25, 0.0625])
    rows = torch.stack([a, b, a, b])                       # [cond b0, cond b1, uncond b0, uncond b1]
    drive_prev_scale(m, 9, n, rows, torch.randn(2, 4, 6), batch=2)
    assert rule_ratio([a.tolist(), b.tolist()], 0.25) == 0.25
    assert float(m.ratio) == 0.25
    assert rule_ratio([a.tolist(), (b * 0.5).tolist()], 0.25) == 0.25 and rule_ratio([b.tolist()], 0.25) == 0.75


def test_batch2_merges_anchors_and_truncates_to_the_shortest_row():
    """:594-597 — per row sorted unique(anchors ∪ top-k), truncated to the smallest row (drops the largest indices).
    Previous grid = current grid (no upsampling ties) so the top-k sets are unique."""
    g = torch.Generator().manual_seed(3)
    N, B = 9, 2
    rows = torch.rand(2 * B, N * N, generator=g)
    rows[1] *= 0.5                                          # image 1: fewer tokens above 0.6 of the batch max
    mse = torch.stack([rows[:B], rows[B:]]).mean(0)
    m = SparseVARLvar(SparseVARLvarConfig(quirk_codes_view=False))
    drive_prev_scale(m, 9, N, rows, torch.randn(B, N * N, 6, generator=g), batch=B)
    r = rule_ratio(mse.tolist(), 0.6)
    _, sel = decide(m, 10, N, batch=B)
    k = int(N * N * r)
    anchors = {a * N + c for a, c in rule_anchors(N, 4, True)}
    unions = []
    for b in range(B):
        order = sorted(range(N * N), key=lambda i: float(mse[b, i]))
        unions.append(sorted(anchors | set(order[-k:])))
    L = min(len(u) for u in unions)
    assert len(unions[0]) != len(unions[1])                 # the truncation is exercised
    assert sel.keep_idx.shape == (2 * B, L)                 # one row per CFG row: [b0, b1, b0, b1]
    assert torch.equal(sel.keep_idx[:B], sel.keep_idx[B:])
    for b in range(B):
        assert sel.keep_idx[b].tolist() == unions[b][:L]


def test_batch1_anchor_merge_quirk_off_adds_the_anchors():
    g = torch.Generator().manual_seed(5)
    n, N = 5, 10
    rows = torch.rand(2, n * n, generator=g)
    mse = rows.mean(0)
    for quirk in (True, False):
        m = SparseVARLvar(SparseVARLvarConfig(quirk_b1_no_anchor_merge=quirk))
        drive_prev_scale(m, 9, n, rows, torch.randn(1, n * n, 6, generator=g))
        _, sel = decide(m, 10, N)
        kept = set(kept_rows(sel, 1)[0])
        k = int(N * N * rule_ratio([mse.tolist()], 0.6))
        anchors = {a * N + c for a, c in rule_anchors(N, 4, True)}
        top_certain = {i for i, v in enumerate(upsampled(mse, n, N)) if v > sorted(upsampled(mse, n, N))[-k]}
        if quirk:
            assert len(kept) == k and not anchors <= kept
        else:
            assert anchors <= kept and top_certain <= kept


def test_zero_k_keeps_everything_with_the_quirk():
    """:576 — ``[:, -0:]`` keeps every token (MSE all zero: ratio NaN-compare -> 0)."""
    n, N = 3, 6
    for quirk, expect in ((True, N * N), (False, 0)):
        m = SparseVARLvar(SparseVARLvarConfig(quirk_zero_k_keeps_all=quirk))
        drive_prev_scale(m, 9, n, torch.zeros(2, n * n), torch.randn(1, n * n, 6))
        assert float(m.ratio) == 0.0
        _, sel = decide(m, 10, N)
        assert sel.k == expect


# ------------------------------------------------------------------ anchor recovery
def nearest4_candidates(p: int, N: int, anchors: list[tuple[int, int]]):
    """(anchors certainly among the 4 nearest, anchors tied at the 4th distance, how many of those are taken)."""
    y, x = divmod(p, N)
    d = [((y - r) ** 2 + (x - c) ** 2, i) for i, (r, c) in enumerate(anchors)]
    d4 = sorted(v for v, _ in d)[min(3, len(d) - 1)]
    strict = [i for v, i in d if v < d4]
    tied = [i for v, i in d if v == d4]
    return strict, tied, min(4, len(d)) - len(strict)


@pytest.mark.parametrize("gather_quirk", [True, False])
@pytest.mark.parametrize("permute_quirk", [True, False])
@pytest.mark.parametrize("beta_quirk", [True, False])
def test_anchor_recovery(permute_quirk, beta_quirk, gather_quirk):
    g = torch.Generator().manual_seed(11)
    n, N, V = 4, 8, 6
    rows = torch.rand(2, n * n, generator=g)
    # logits: a few distinct prototypes plus noise, so that some similarities pass 0.8 and/or 0.99
    proto = torch.randn(6, V, generator=g)
    logits = (proto[torch.randint(0, 6, (n * n,), generator=g)] + 0.05 * torch.randn(n * n, V, generator=g))[None]
    m = SparseVARLvar(SparseVARLvarConfig(quirk_logits_no_permute=permute_quirk, quirk_beta_not_passed=beta_quirk,
                                          quirk_corner_gather=gather_quirk))
    drive_prev_scale(m, 9, n, rows, logits)
    x_in = torch.randn(2, N * N, SPEC.embed_dim, generator=g)
    sc, sel = decide(m, 10, N, x=x_in)
    kept = sel.keep_idx[0].tolist()
    low = [p for p in range(N * N) if p not in kept]
    y = torch.randn(2, len(kept), SPEC.embed_dim, generator=g)
    out = m.restore(LayerCtx(sc, SPEC.depth - 1), x_in, y, sel)
    full = x_in.clone()
    full[:, kept] = y
    # features: the previous grid's logits as Lvar reads them, nearest-upsampled
    flat = logits.reshape(-1)
    C = V
    if permute_quirk:   # channel c at (yy, xx) = flat[c·n·n + yy·n + xx] (reshape without permute, :565)
        feat_prev = [[float(flat[c * n * n + t]) for c in range(C)] for t in range(n * n)]
    else:
        feat_prev = logits[0].tolist()
    feat = torch.tensor([feat_prev[(yy * n) // N * n + (xx * n) // N] for yy in range(N) for xx in range(N)])
    anchors = rule_anchors(N, 4, True)
    beta = 0.8 if beta_quirk else 0.99
    mask = m.code_mask(sc)[0]
    n_rec = 0
    for p in range(N * N):
        if p in kept:
            assert torch.equal(out[:, p], y[:, kept.index(p)]) and not mask[p]
            continue
        if gather_quirk:   # :56-57 as written: the first 4 anchors of the list for every token
            sims = {i: cos(feat[p], feat[anchors[i][0] * N + anchors[i][1]]) for i in range(4)}
            cands = [i for i in sims if sims[i] >= max(sims.values()) - 1e-6]
        else:              # meant: the 4 nearest (any choice inside a distance tie at the 4th place)
            strict, tied, take = nearest4_candidates(p, N, anchors)
            sims = {i: cos(feat[p], feat[anchors[i][0] * N + anchors[i][1]]) for i in strict + tied}
            best_strict = max((sims[i] for i in strict), default=-2.0)
            # the chosen anchor: a best among the 4 chosen (strict ∪ `take` of the tied)
            cands = [i for i in strict + tied if sims[i] >= best_strict - 1e-6]
            if len(tied) == take:   # no ambiguity: the best similarity among the 4 is known
                best_sim = max(sims.values())
                cands = [i for i in cands if sims[i] >= best_sim - 1e-6]
        cand_pos = {anchors[i][0] * N + anchors[i][1] for i in cands}
        matches = [q for q in cand_pos if torch.equal(out[:, p], full[:, q])]
        if torch.equal(out[:, p], full[:, p]) and not any(torch.equal(full[:, p], full[:, q]) for q in cand_pos):
            # not recovered: its best similarity is <= beta, its codes are zeroed
            assert all(sims[i] <= beta + 1e-6 for i in cands) and mask[p]
        else:
            assert matches, p
            q = matches[0]
            assert cos(feat[p], feat[q]) > beta - 1e-6 and not mask[p]
            n_rec += 1
    assert int(mask.sum()) == len(low) - n_rec
    assert 0 < n_rec < len(low)       # the case is not trivial


def test_recovery_reads_the_anchor_before_writes_and_is_an_exact_copy():
    g = torch.Generator().manual_seed(2)
    n, N = 4, 8
    m = SparseVARLvar()
    logits = torch.ones(1, n * n, 6)                    # identical features: similarity 1 > 0.8 everywhere
    drive_prev_scale(m, 9, n, torch.rand(2, n * n, generator=g), logits)
    x_in = torch.randn(2, N * N, SPEC.embed_dim, generator=g)
    sc, sel = decide(m, 10, N, x=x_in)
    y = torch.randn(2, sel.k, SPEC.embed_dim, generator=g)
    out = m.restore(LayerCtx(sc, SPEC.depth - 1), x_in, y, sel)
    full = sel.scatter(y, x_in)
    assert not m.code_mask(sc).any()                    # every low token recovered
    kept = set(sel.keep_idx[0].tolist())
    anchors = {r * N + c for r, c in rule_anchors(N, 4, True)}
    for p in set(range(N * N)) - kept:                  # a copy of some anchor's row after the kept scatter
        assert any(torch.equal(out[:, p], full[:, q]) for q in anchors)
    # an earlier block's restore only scatters (no recovery before the last block)
    assert torch.equal(m.restore(LayerCtx(sc, 2), x_in, y, sel), full)


# ------------------------------------------------------------------ the loop: start stage, reference, quirks
@pytest.fixture(scope="module")
def tiny():
    from conftest import REPO
    from omegaconf import OmegaConf

    from varbench.harness.registry import build_backbone

    return build_backbone(OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/tiny.yaml"), resolve=True),
                          "cpu", "fp32")


def _run(bb, m, seed=0, prompts=("two green circles",)):
    return generate(bb, list(prompts), m, [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))])


_CACHE: dict = {}


def _run_cfg(bb, **opts):
    """Images of SparseVARLvar(**opts) on ``bb`` (seed 0), computed once per option set (the machine is shared)."""
    cfg = None if opts.get("method") == "none" else SparseVARLvarConfig(**opts)
    key = (id(bb), None if cfg is None else tuple(sorted(vars(cfg).items())))
    if key not in _CACHE:
        _CACHE[key] = _run(bb, Method() if cfg is None else SparseVARLvar(cfg)).images
    return _CACHE[key]


@pytest.mark.parametrize("start", [9, 10, 11])
def test_start_stage(tiny, start):
    S = len(tiny.scales())
    m = SparseVARLvar(SparseVARLvarConfig(start_prune_stage=start))
    out = _run(tiny, m)
    ns = out.record.scale_n
    for si in range(S):
        if si < start:
            assert out.record.tokens[si] == [float(ns[si])] * tiny.spec.depth
            assert not any(k[0] == si for k in m.claims)
        else:
            assert all(t < ns[si] for t in out.record.tokens[si])
    assert [r["si"] for r in out.method_summary["sparsevar_lvar_scales"]] == list(range(start, S))


def test_short_schedule_prunes_nothing_and_says_so(tiny_backbone):
    """0.25M: 10 scales, start 10: nothing pruned; the images differ from ``none`` only through the area-resized
    inputs (:824), so with that quirk off they are the baseline's."""
    m = SparseVARLvar()
    assert "prunes nothing" in m.check_schedule(tiny_backbone.scales())
    a, b = _run(tiny_backbone, m), _run(tiny_backbone, Method())
    assert not m.claims and a.record.tokens == b.record.tokens and not torch.equal(a.images, b.images)
    m = SparseVARLvar(SparseVARLvarConfig(quirk_area_downsample=False))
    assert "changes nothing" in m.check_schedule(tiny_backbone.scales())
    assert torch.equal(_run(tiny_backbone, m).images, b.images)


def lvar_reference(bb, prompt, seed, start=10, thr=0.6, window=4, beta=0.8, chunk=(1, 1), nearest=False, area=True):
    """Lvar's scale loop (:707-831) on our backbone's parts, batch 1: the kept rows gathered once after the level
    embedding and run through every block; the chunk's MSE on the full map with the chunk-0 input elsewhere; after
    the last block the outputs scattered into the chunk-0 input and recoverable rows copied from their anchor; the
    codes of the others zeroed. Quirks as the code runs (no permute, N-1 anchor always, no anchor merge at B = 1,
    candidates = the first 4 anchors; ``nearest``: the 4 nearest instead; every next-scale input area-resized)."""
    rng = torch.Generator().manual_seed(seed)
    D, scales = bb.spec.depth, bb.scales()
    schedule = tuple(ScaleInfo.of(s) for s in scales)
    with bb.precision():
        cond = bb.condition([prompt])
        state = bb.init_state(cond)
        kvs = [bb.new_kv_cache() for _ in range(D)]
        mse = ratio = prev_logits = None
        prev_n = None
        for scale in scales:
            si, N = scale.si, scale.h
            sc = ScaleCtx(si, len(scales), (N, N), cond.rows, cond.batch, bb.spec, schedule, scale.w)
            if si == 0 or not area:
                x = bb.scale_input(state, cond, scale)
            else:   # :824 — the accumulated codes area-resized to this grid (Lvar's Infinity: trilinear, :700)
                z = F.interpolate(state.summed, size=(1, *bb.vae_hws[si]), mode="area").squeeze(2)
                x = bb.model.word_embed(z.reshape(*z.shape[:2], -1).transpose(1, 2).float())
                x = x.repeat(cond.rows // cond.batch, 1, 1) + bb.model.lvl_embed.weight[si]
            pos = bb.positions(cond, scale)
            pruned = si >= start
            if pruned:
                n = prev_n
                feat = F.interpolate(prev_logits.reshape(1, -1, n, n), size=(N, N), mode="nearest")[0]  # [C, N, N]
                metric = F.interpolate(mse.reshape(1, 1, n, n), size=(N, N), mode="nearest").reshape(1, -1)
                hi = metric.sort(1)[1][:, -int(N * N * ratio):][0]                 # :576
                coords = list(range(0, N, window)) + [N - 1]                         # :100 (window % N != 0)
                anchors = torch.tensor([(r, c) for r in coords for c in coords])
                T = torch.arange(N * N)
                if nearest:
                    dist = ((T // N)[None, None, :] - anchors[None, :, 0, None]) ** 2 + \
                           ((T % N)[None, None, :] - anchors[None, :, 1, None]) ** 2    # [1, A, T]
                    four = dist.sort(1)[1][0, :4].T                                     # [T, 4] (:55)
                else:   # :56-57 as written: the gather along dim 1 yields the first 4 anchors for every token
                    four = torch.arange(4)[None].expand(N * N, -1)
                own = feat.reshape(feat.shape[0], -1).T                             # [T, C]
                cand = anchors[four]                                                # [T, 4, 2]
                cf = feat[:, cand[..., 0], cand[..., 1]].permute(1, 2, 0)           # [T, 4, C]
                sims = F.cosine_similarity(own[:, None], cf, dim=-1)
                best = cand[torch.arange(N * N), sims.argmax(-1)]
                best = best[:, 0] * N + best[:, 1]
                mask = torch.ones(N * N, dtype=torch.bool)
                mask[hi] = False
                lo = T[mask]
                rec = sims.max(-1)[0][lo] > beta
                anc = best[lo]
                x_origin = x
                xk = x[:, hi]
                pk = bb.gather_positions(pos, SimpleNamespace(keep_idx=hi[None]))
            else:
                xk, pk = x, pos
            for li in range(D):
                lctx = LayerCtx(sc, li, kv_len=kvs[li].length)
                if li == chunk[0]:
                    chunk_in = xk
                for name in bb.spec.branches:
                    xk = xk + bb.branch(li, name, xk, pk, cond, kvs[li], sdpa_attention, lctx)
                xk = bb.after_block(li, xk, cond, scale)
                if li == chunk[1] and si >= start - 1:
                    if pruned:
                        after, before = x_origin.clone(), x_origin.clone()
                        after[:, hi], before[:, hi] = xk, chunk_in
                    else:
                        after, before = xk, chunk_in
                    d = ((after - before) ** 2).mean(-1)
                    d = torch.stack([d[:1], d[1:]]).mean(0)
                    ratio = ((d / d.max()) > thr).float().mean(1).max()
                    mse, prev_n = d, N
            if pruned:
                x = x_origin.clone()
                x[:, hi] = xk
                src, dst = x[:, anc], x[:, lo]
                mm = rec.to(dst)[None, :, None]
                x[:, lo] = dst * (1 - mm) + mm * src
            else:
                x = xk
            logits = bb.head(x, cond, scale)
            guided = bb.guide(logits, cond, scale)[2]
            bits = bb.sample(guided, x, cond, scale, [rng])
            if pruned:
                zero = torch.zeros(1, N * N, dtype=torch.bool)
                zero[0, lo[~rec]] = True
                state = bb.update(state, bits, scale, zero=zero)
            else:
                state = bb.update(state, bits, scale)
            if si >= start - 1:
                prev_logits = guided
        return bb.decode(state).float()


@pytest.mark.parametrize("start,nearest,area", [(9, False, True), (10, False, True), (9, True, True), (10, False, False)])
def test_equals_the_lvar_loop_written_out(tiny, start, nearest, area):
    """depth 4, block_chunks 8 (Lvar's): chunk 3 = block 1."""
    ref = lvar_reference(tiny, "two green circles", 0, start=start, nearest=nearest, area=area)
    out = _run_cfg(tiny, start_prune_stage=start, quirk_corner_gather=not nearest, quirk_area_downsample=area)
    assert torch.equal(out, ref)
    assert not torch.equal(out, _run_cfg(tiny, method="none"))


def test_infinity_update_zero_sets_those_codes_to_zero(tiny):
    """The ``code_mask`` hook's backbone side: the accumulated sum equals Σ interp(codes · keep) computed here."""
    from varbench.backbones.infinity.vae import bits_to_codes

    sc = tiny.scales()[5]
    g = torch.Generator().manual_seed(0)
    d = tiny.vae.codebook_dim
    bits = torch.randint(0, 2, (1, sc.n, d), generator=g, dtype=torch.uint8)
    zero = torch.rand(1, sc.n, generator=g) > 0.5
    st = tiny.update(tiny.init_state(None), bits, sc, zero=zero)
    codes = bits_to_codes(bits.reshape(1, sc.h, sc.w, d)[:, None].float(), d)       # [1, d, 1, h, w]
    codes = codes * (~zero).reshape(1, 1, 1, sc.h, sc.w)
    expect = F.interpolate(codes, size=(1, *tiny.vae_hws[-1]), mode="trilinear")
    assert torch.equal(st.summed, expect)
    assert not torch.equal(tiny.update(tiny.init_state(None), bits, sc).summed, expect)


@pytest.mark.parametrize("quirk,extra", [
    ("quirk_beta_not_passed", {}), ("quirk_logits_no_permute", {}), ("quirk_b1_no_anchor_merge", {}),
    ("quirk_corner_gather", {}), ("quirk_area_downsample", {}),
    # with the first-4 candidates and no merge, the anchor list matters only through its first 4 entries: on the
    # 12x12 grid (window 4) they are (0,0) (0,4) (0,8) (0,11) as written, (0,0) (0,4) (0,8) (4,0) as meant
    ("quirk_anchor_mod", {}), ("quirk_anchor_mod", {"local_window_size": 3, "quirk_corner_gather": False})])
def test_each_quirk_changes_the_image_on_tiny(tiny, quirk, extra):
    """Each quirk is live on model=tiny at start 9 (grids 10, 12, 16)."""
    base = dict(start_prune_stage=9, **extra)
    assert not torch.equal(_run_cfg(tiny, **base), _run_cfg(tiny, **base, **{quirk: False}))


def test_codes_view_quirk_refuses_batches_and_off_is_per_image(tiny):
    prompts = ("two green circles", "a red square")
    with pytest.raises(UserError, match=r"batch 1 only.*sparsevar_model.py:818"):
        _run(tiny, SparseVARLvar(), prompts=prompts)
    m = SparseVARLvar(SparseVARLvarConfig(quirk_codes_view=False))
    out = _run(tiny, m, prompts=prompts)
    assert torch.isfinite(out.images).all() and out.images.shape[0] == 2
    # the batch shares one kept count (:596) and the ratio is the batch's max (:770): one entry per pruned scale
    assert [r["si"] for r in out.method_summary["sparsevar_lvar_scales"]] == [10, 11]


def test_bad_options_are_one_line():
    for opts in ({"start_prune_stage": 0}, {"specific_mse_layer": 8}, {"local_window_size": 0},
                 {"compress_ratio": "x"}):
        with pytest.raises(UserError, match="sparsevar_lvar"):
            SparseVARLvarConfig(**opts)


def test_chunk_layers_follow_infinity_block_chunks():
    """Infinity-2B: depth 32, 8 chunks -> chunk 3 = blocks 12..15 (the chunk's first input, last output)."""
    m = SparseVARLvar()
    spec = BackboneSpec("2b", depth=32, embed_dim=4, num_heads=1, head_type="bitwise", head_dim_out=2,
                        branches=("sa",))
    seen = []
    sc = ScaleCtx(9, 13, (2, 2), 2, 1, spec, (), 2)
    for li in range(32):
        x_in = torch.full((2, 4, 4), float(li))
        x_out = x_in + 1
        m.after_layer(LayerCtx(sc, li), x_in, x_out)
        if m.mse is not None and not seen:
            seen.append(li)
    assert seen == [15]
    assert torch.allclose(m.mse[1], torch.full((1, 4), 16.0))   # (16 - 12)^2: output of 15 minus input of 12
    assert math.isclose(float(m.ratio), 1.0)


def test_contract_on_the_12_scale_tiny_model_where_it_prunes(tiny):
    """The contract suite runs the yaml on tiny_random (10 scales: nothing pruned); model=tiny prunes scales 10-11."""
    from test_methods_contract import check_contract

    check_contract(tiny, lambda: SparseVARLvar())
    m = SparseVARLvar()
    _run(tiny, m)
    assert sorted({si for si, _ in m.claims}) == [10, 11]


# ------------------------------------------------------------------ against Lvar's own function (optional)
def _lvar_source() -> str:
    """sparsevar_model.py of Weepingchestnut/Lvar: ``LVAR_REPO`` = a checkout, or a bare git dir (read at f94b7ec)."""
    import os
    import subprocess
    from pathlib import Path

    root = os.environ.get("LVAR_REPO")
    if not root:
        pytest.skip("set LVAR_REPO to a checkout (or git dir) of Weepingchestnut/Lvar to compare with its lf_anchor")
    rel = "models/sparsevar/sparsevar_model.py"
    if (Path(root) / rel).exists():
        return (Path(root) / rel).read_text()
    r = subprocess.run(["git", "--git-dir", root, "show", f"f94b7ec:{rel}"], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"LVAR_REPO={root}: no {rel} and no commit f94b7ec ({r.stderr.strip()[:80]})")
    return r.stdout


def test_lf_anchor_equals_lvar_code():
    """Runs Lvar's own ``lf_anchor`` and helpers (taken from its source at test time, never copied here) on random
    previous-scale maps and compares (high, low, recoverable, low_to_anchor) with ours, defaults = quirks on."""
    import ast
    import textwrap
    import warnings

    src = _lvar_source()
    tree = ast.parse(src)
    ns = {"torch": torch, "F": F}
    wanted = {"map_to_best_corner", "get_reverse_indices", "generate_anchors_from_flat", "lf_anchor"}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in wanted:
            exec(textwrap.dedent(ast.get_source_segment(src, node)), ns)
    assert wanted <= set(ns)
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        B = 1 if seed % 3 else 2
        n = int(torch.randint(3, 14, (1,), generator=g))
        N = n + int(torch.randint(1, 8, (1,), generator=g))
        w = int(torch.randint(2, 6, (1,), generator=g))
        mse = torch.rand(B, n * n, generator=g) ** 2
        logits = torch.randn(B, n * n, 8, generator=g)
        if seed % 5 == 0:
            logits = logits.round()            # equal similarities
        ratio = ((mse / mse.max()) > 0.6).float().mean(1).max()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # meshgrid without indexing=
            ref = ns["lf_anchor"](SimpleNamespace(patch_nums=[n, N]), logits, 1, mse, ratio, w)
        m = SparseVARLvar(SparseVARLvarConfig(local_window_size=w))
        m.logits, m.mse, m.ratio = (0, logits, (n, n)), (0, mse, (n, n)), ratio
        got = m.lf_anchor((N, N))
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), (seed, B, n, N, w)
