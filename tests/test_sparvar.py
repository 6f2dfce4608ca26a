"""SparVAR (baselines/sparvar.py): the index arithmetic of the authors' Infinity-1M configuration (spec §2.9 items
1-2), exactness identities of the kernels on random q/k/v (item 3), fast vs masked reference (item 4), no-op (item 5)."""
import math

import pytest
import torch

from baselines.sparvar import (
    SparVAR,
    SparVARConfig,
    cs4a_decide,
    cs4a_sparse_gather,
    cs4a_sparse_reference,
    csla_flex,
    csla_reference,
    csla_token_mask,
    effective_bound_layer,
    flex_block_mask,
    group_map,
    local_runs,
    offsets,
    tile_mask,
    topk_budget,
)
from varbench.flops import generation_flops
from varbench.hooks import Method
from varbench.loop import generate

SIDES_1M = [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]
HWS = [(s, s) for s in SIDES_1M]
NS = [s * s for s in SIDES_1M]
OFF = offsets(NS)


def dense(q, k, v, scale=1.0):
    p = (torch.einsum("bhqc,bhkc->bhqk", q, k) * scale).softmax(-1)
    return torch.einsum("bhqk,bhkc->bhqc", p, v)


# ------------------------------------------------------------------ §2.9 item 1: index arithmetic
def test_prefix_lengths_and_decision_budget():
    assert OFF[11] == 4121 and OFF[12] == 6425 and OFF[13] == 10521
    assert topk_budget(4121, 0.2, 112) == 784
    assert topk_budget(4121, 0.2, 64) == 832          # the Triton provider's alignment
    assert topk_budget(100, 0.2, 112) == 100          # never more than the keys there are


def test_local_runs_560_and_784():
    starts, L, sizes = local_runs(48, 48, 7, 192, 112)
    assert (L, max(sizes), len(starts)) == (560, 480, 12)
    starts, L, sizes = local_runs(64, 64, 9, 192, 112)
    assert (L, max(sizes), len(starts)) == (784, 704, 22)
    assert int(starts.max()) + L <= 64 * 64            # runs end inside the scale
    assert starts[0] == 0 and starts[1] == 0 and starts[2] == 2 * 64   # group 2 = rows 6-8, window rows 2-12


def test_group_maps_9_to_12_and_12_to_22_and_keys_per_group():
    g11 = group_map(9, 12)
    assert g11.tolist() == [0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 7, 8]
    g12 = group_map(12, 22)
    assert g12.tolist() == [0, 0, 1, 1, 2, 2, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 10, 10, 11, 11]
    assert math.ceil(1600 / 192) == 9 and math.ceil(2304 / 192) == 12 and math.ceil(4096 / 192) == 22
    assert 784 + 560 == 1344 and 1344 + 784 == 2128    # the method below builds these sets (tested end to end)


def test_csla_tile_densities_sparsity_and_invisible_scales():
    want = {10: (0.0320, 0.210), 11: (0.0242, 0.183), 12: (0.0192, 0.164)}
    for si, (tok, tile) in want.items():
        m = csla_token_mask(HWS, NS, si, 5, [1, 1, 3, 5, 7])
        assert m.shape == (NS[si], OFF[si + 1])
        assert abs(m.float().mean().item() - tok) < 5e-4
        t = tile_mask(m, 128)
        assert abs(t.float().mean().item() - tile) < 5e-4, si
        assert [a for a in range(si + 1) if not m[:, OFF[a]:OFF[a + 1]].any()] == [5, 6, 7]
        assert m[:, :121].all()                        # sinks: the first 5 scales
    sparsity = 1 - tile_mask(csla_token_mask(HWS, NS, 12, 5, [1, 1, 3, 5, 7]), 128).float().mean().item()
    assert round(100 * sparsity, 1) == 83.6 and abs(100 * sparsity - 83.5) <= 0.2   # paper: 83.5 %


def test_bound_layer_mapping():
    cfg = SparVARConfig()
    assert effective_bound_layer(cfg, 32) == 10 and effective_bound_layer(cfg, 40) == 10
    assert effective_bound_layer(cfg, 4) == 0          # round(11·4/32) − 1
    assert effective_bound_layer(SparVARConfig(bound_layer_scaling="absolute"), 4) == 3


# ------------------------------------------------------------------ §2.9 item 3-4: exactness on random q/k/v
@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    rows, H, N, P, c = 2, 2, 100, 255, 16
    return (torch.randn(rows, H, N, c, generator=g), torch.randn(rows, H, P, c, generator=g),
            torch.randn(rows, H, P, c, generator=g))


def test_cs4a_decide_is_dense_and_selected_plus_cache_reproduces_it(qkv):
    q, k, v = qkv
    out, I, sel = cs4a_decide(q, k, v, 112, 64, 0.5)
    assert torch.allclose(out, dense(q, k, v, 0.5), atol=1e-5)
    assert I.shape == (2, 2, 2, 112) and bool((I[..., 1:] > I[..., :-1]).all())
    C = out - sel
    assert torch.allclose(sel + C, out, atol=1e-6)
    assert not torch.allclose(sel, out, atol=1e-3)     # the selection alone does not explain everything


def test_cs4a_sparse_with_every_key_is_dense_and_gather_matches_reference(qkv):
    q, k, v = qkv
    allk = torch.arange(k.shape[2]).expand(2, 2, 2, -1)
    assert torch.allclose(cs4a_sparse_reference(q, k, v, allk, 64, 0.5), dense(q, k, v, 0.5), atol=1e-5)
    J = torch.rand(2, 2, 2, k.shape[2], generator=torch.Generator().manual_seed(1)).topk(90, -1).indices
    ref = cs4a_sparse_reference(q, k, v, J, 64, 0.5)
    assert torch.allclose(cs4a_sparse_gather(q, k, v, J, 64, 0.5), ref, atol=1e-5)
    m = torch.zeros(2, 2, 2, k.shape[2], dtype=torch.bool).scatter_(3, J, True)
    vis = m[:, :, torch.arange(100) // 64]            # per query: its group's keys
    s = (torch.einsum("bhqc,bhkc->bhqk", q, k) * 0.5).masked_fill(~vis, float("-inf"))
    assert torch.allclose(ref, torch.einsum("bhqk,bhkc->bhqc", s.softmax(-1), v), atol=1e-5)


def test_csla_full_windows_is_dense_and_flex_matches_reference(qkv):
    q, k, v = qkv
    full = torch.ones(1, 2, dtype=torch.bool)
    assert torch.allclose(csla_reference(q, k, v, full, 128, 0.5), dense(q, k, v, 0.5), atol=1e-5)
    hws = [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (8, 8), (10, 10)]
    ns = [h * w for h, w in hws]
    assert csla_token_mask(hws, ns, 7, 0, [99] * 8).all()   # windows covering everything
    tiles = torch.rand(4, 8, generator=torch.Generator().manual_seed(2)) < 0.4
    tiles[:, 0] = True                                 # every query sees some key (the sinks)
    q4 = torch.randn(2, 2, 100, 16)
    k4, v4 = torch.randn(2, 2, 255, 16), torch.randn(2, 2, 255, 16)
    ref = csla_reference(q4, k4, v4, tiles, 32, 0.5)
    el = tiles.repeat_interleave(32, 0).repeat_interleave(32, 1)[:100, :255]
    s = (torch.einsum("bhqc,bhkc->bhqk", q4, k4) * 0.5).masked_fill(~el, float("-inf"))
    assert torch.allclose(ref, torch.einsum("bhqk,bhkc->bhqc", s.softmax(-1), v4), atol=1e-5)
    bm = flex_block_mask(tiles, 32, 100, 255, "cpu")
    assert torch.allclose(csla_flex(q4, k4, v4, bm, 0.5), ref, atol=1e-4)


# ------------------------------------------------------------------ the method on the tiny model
def _gen(bb, m):
    return generate(bb, ["two green circles"], m, torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def runs(tiny_backbone):
    return {"none": _gen(tiny_backbone, Method()), "sparvar": _gen(tiny_backbone, SparVAR()),
            "noop": _gen(tiny_backbone, SparVAR(SparVARConfig(**SparVAR.NOOP))),
            "fast": _gen(tiny_backbone, SparVAR(SparVARConfig(kernel="fast")))}


def test_noop_is_bit_identical(runs):
    assert torch.equal(runs["noop"].images, runs["none"].images)
    assert runs["noop"].record.attn_keys == runs["none"].record.attn_keys


def test_sparvar_on_the_tiny_schedule(runs, tiny_backbone):
    """0.25M schedule (sides ..., 20, 24, 32; T = 10): S = 7, L_b = 0 on depth 4; dense before S."""
    a, ref = runs["sparvar"], runs["none"]
    rec, s = a.record, a.method_summary
    assert rec.attn_keys[:7] == ref.record.attn_keys[:7]
    P7 = sum(n * n for n in [1, 2, 4, 6, 8, 12, 16, 20])
    assert P7 == 921 and topk_budget(P7, 0.2, 112) == 224
    assert s["attn_keys"]["cs4a"] == {"7": 921, "8": 224 + 336, "9": 224 + 336 + 448}
    assert s["decision_keys"] == {"7": 1.5 * 921 + 224}   # dense + column-mass (QKᵀ only) + selected passes
    assert rec.attn_keys[9][0] == 1008 and all(rec.attn_keys[9][li] < rec.kv_len[9][li] for li in range(4))
    assert s["kernels"] == {"cs4a_decide": "reference", "cs4a": "reference", "csla": "reference"}
    assert set(s["csla_tile_density"]) == {"7", "8", "9"}
    assert not torch.equal(a.images, ref.images) and torch.isfinite(a.images).all()
    spec = tiny_backbone.spec
    assert generation_flops(rec.per_image()[0], spec) < generation_flops(ref.record.per_image()[0], spec)


def test_bad_options_are_one_line_errors():
    from varbench.errors import UserError

    with pytest.raises(UserError, match="kernel"):
        SparVARConfig(kernel="triton")
    with pytest.raises(UserError, match="topk_ratio"):
        SparVARConfig(topk_ratio=0.0)


def test_hart_csla_geometry():
    """HART-0.7B (14 scales, 300 text-context tokens at scale 0): the CSLA file's sink = 354 keys, CSLA at 11-13."""
    pn = [1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64]
    hws, ns = [(p, p) for p in pn], [300] + [p * p for p in pn[1:]]
    for si in (11, 12, 13):
        m = csla_token_mask(hws, ns, si, 5, [1, 1, 1, 3, 5, 7])
        assert m[:, :354].all() and not m[:, 354:offsets(ns)[8]].any()     # scales 5-7 (7², 9², 12²) invisible
    cfg = SparVARConfig(cs4a=False, bound_layer=-1, bound_layer_scaling="absolute", csla_windows=[1, 1, 1, 3, 5, 7])
    assert SparVAR(cfg).decision_si(14) == 11 and effective_bound_layer(cfg, 24) == -1


def test_fast_kernels_match_the_masked_reference_end_to_end(runs):
    """kernel=fast (gather+SDPA for CS4A, flex_attention for CSLA; eager on a CPU) gives the reference's image."""
    a, f = runs["sparvar"], runs["fast"]
    assert f.method_summary["kernels"] == {"cs4a_decide": "sdpa+colmass", "cs4a": "gather_sdpa", "csla": "flex_attention"}
    assert torch.allclose(f.images, a.images, atol=1e-3)
    assert f.record.attn_keys == a.record.attn_keys


# ------------------------------------------------------------------ issue 25 item 1: decision scales 9, 10, 11
# The authors' rules, written out here from Weepingchestnut/Lvar @f94b7ec (not from our functions):
#  - dispatch, models/sparvar/basic_sparvar.py:365-386: CSLA when the scale has a FlexAttention mask and l > L_b;
#    else CS4A-decide when si == S and l <= L_b; else CS4A-sparse when si > S and l <= L_b; else dense.
#  - the masks exist only for si = 10, 11, 12 (sparvar_model.py:289-318, passed at :632), whatever S is.
#  - the CS4A local window of scale si is cs4a_ws[si] (sparse-attn-config.yml; sparse_attn.py:904-905 slices the
#    list at S+1 from its end, i.e. by absolute scale): [1] * 11 + [7, 9].
#  - local run (sparse_attn.py:620-675, 678-768, 778-857): per 192-query group, the union of the clamped w×w windows
#    of its queries; L = 112·ceil(max union / 112); the run ends at min(first + L − 1, P_{si+1} − 1).
AUTHORS_CS4A_WS = [1] * 11 + [7, 9]


def authors_kernel(si: int, li: int, S: int, Lb: int = 10) -> str:
    if si in (10, 11, 12) and li > Lb:
        return "csla"
    if si == S and li <= Lb:
        return "decide"
    if si > S and li <= Lb:
        return "sparse"
    return "dense"


def authors_local_run(si: int) -> list[list[int]]:
    """Absolute KV positions of each query group's local run at scale si (13-scale 1M schedule)."""
    n, base, w = SIDES_1M[si], OFF[si], AUTHORS_CS4A_WS[si]
    r = (w - 1) // 2
    unions = []
    for g0 in range(0, n * n, 192):
        u = set()
        for q in range(g0, min(n * n, g0 + 192)):
            y, x = divmod(q, n)
            for dy in range(-r, w - r):
                for dx in range(-r, w - r):
                    u.add(base + min(max(y + dy, 0), n - 1) * n + min(max(x + dx, 0), n - 1))
        unions.append(sorted(u))
    L = 112 * math.ceil(max(len(u) for u in unions) / 112)
    out = []
    for u in unions:
        tail = min(u[0] + L - 1, OFF[si + 1] - 1)
        out.append(list(range(tail - L + 1, tail + 1)))
    return out


def _ctx_1m(si: int, li: int):
    from varbench.backbones.base import BackboneSpec, ScaleInfo
    from varbench.hooks import LayerCtx, ScaleCtx

    spec = BackboneSpec("infinity_2b_geometry", 32, 2048, 16, "bitwise", 32, ("sa", "ca", "ffn"))
    sched = tuple(ScaleInfo(i, s, s, s * s, s) for i, s in enumerate(SIDES_1M))
    sctx = ScaleCtx(si, 13, (SIDES_1M[si], SIDES_1M[si]), 2, 1, spec, sched)
    return LayerCtx(sctx, li, kv_len=OFF[si], kv_segments=tuple(NS[:si]))


def _kernel_name(m: SparVAR, si: int, li: int) -> str:
    fn = m.attention(_ctx_1m(si, li))
    return {None: "dense", "_cs4a_decide_kernel": "decide", "_cs4a_sparse_kernel": "sparse",
            "_csla_kernel": "csla"}[getattr(fn, "__name__", None)]


@pytest.mark.parametrize("S", [9, 10, 11])
def test_kernel_choice_per_scale_and_layer_is_the_authors(S):
    m = SparVAR(SparVARConfig(decision_scale=S))
    got = {(si, li): _kernel_name(m, si, li) for si in range(13) for li in range(32)}
    want = {(si, li): authors_kernel(si, li, S) for si in range(13) for li in range(32)}
    diff = sorted(k for k in want if got[k] != want[k])
    assert not diff, f"{len(diff)} of 416 differ, first {diff[:3]}"


def test_decision_scale_option_keeps_our_former_reading():
    """scale_anchor=decision: CSLA from S up and the CS4A windows counted from S+1 (the behaviour before issue 25)."""
    m = SparVAR(SparVARConfig(decision_scale=9, scale_anchor="decision"))
    assert _kernel_name(m, 9, 11) == "csla" and _kernel_name(m, 9, 10) == "decide"
    assert [m.local_run_keys(m._geometry(_ctx_1m(si, 0).scale), si).shape[1] for si in (10, 11, 12)] == [448, 672, 784]


@pytest.mark.parametrize("S,want_L", [(9, [224, 560, 784]), (10, [560, 784]), (11, [784])])
def test_local_runs_are_the_authors_for_each_decision_scale(S, want_L):
    """The local runs the CS4A-sparse kernel appends, end to end through the kernels on the 13-scale geometry (one
    row, one head, 2 channels; reference kernels): J = the mapped source set followed by the run."""
    m = SparVAR(SparVARConfig(decision_scale=S, kernel="reference"))
    g = torch.Generator().manual_seed(0)
    got_L = []
    for si in range(S, 13):
        N, P = NS[si], OFF[si + 1]
        q, k, v = (torch.randn(1, 1, n, 2, generator=g) for n in (N, P, P))
        ctx = _ctx_1m(si, 0)
        assert _kernel_name(m, si, 0) == ("decide" if si == S else "sparse")
        m.attention(ctx)(q, k, v, scale=1.0, ctx=ctx)
        if si == S:
            continue
        J = m.state[0]["src"][0, 0]                        # [G, |J|]
        want = authors_local_run(si)
        L = len(want[0])
        got_L.append(L)
        assert J[:, -L:].tolist() == want, si
        assert ctx.attn_keys == J.shape[1]
    assert got_L == want_L


# ------------------------------------------------------------------ issue 25 item 6: method FLOPs
def test_decision_pass_is_counted_as_method_flops(runs, tiny_backbone):
    """The decision scale's dense pass (P keys, the layer's output) is model work in the FLOP-ideal count; the
    column-mass pass and the selected-only pass (0.5·P + k keys, Triton convention) are the method's own FLOPs,
    per decision layer rows·N_S·(0.5·P + k)·4·C; the CUDA convention adds a second dense pass (1.5·P + k)."""
    from varbench.flops import method_flops

    spec = tiny_backbone.spec
    a = runs["sparvar"]
    rec = a.record.per_image()[0] | {"method_summary": a.method_summary}
    S, P, N, kk = 7, 921, 20 * 20, 224
    lb = effective_bound_layer(SparVARConfig(), spec.depth)
    assert all(rec["attn_keys"][S][li] == P for li in range(lb + 1))
    C, rows = spec.embed_dim, rec["rows"][S]
    want = (lb + 1) * rows * N * (0.5 * P + kk) * 4 * C
    assert method_flops(rec) == pytest.approx(want, rel=1e-12) and want > 0
    assert method_flops({"method_summary": {}}) == 0.0 and method_flops({}) == 0.0
    cuda = _gen(tiny_backbone, SparVAR(SparVARConfig(decision_flops="cuda")))
    assert cuda.method_summary["method_flops"] == pytest.approx((lb + 1) * rows * N * (1.5 * P + kk) * 4 * C)
    assert torch.equal(cuda.images, a.images)          # accounting only
