"""SparVAR on a compressed cache (``method=stack_sparvar_scalekv``): the loop names the token position of every cached
key (``lctx.kv_positions``), SparVAR's key sets are token positions, and a key ScaleKV dropped is not attended —
each rule checked against a version written out here, one query and one key at a time."""
import math

import pytest
import torch
from test_methods_contract import backbone

from baselines.sparvar import cs4a_sparse_reference, csla_keys_per_query, csla_reference, tiles_to_elements
from varbench.errors import UserError
from varbench.harness.registry import build_method
from varbench.hooks import Method
from varbench.loop import generate


@pytest.fixture(scope="module")
def bb():
    return backbone("tiny_random")


def _gen(bb, m):
    return generate(bb, ["two green circles"], m, torch.Generator().manual_seed(0))


class _Keys(Method):
    """Records, per (scale, layer), the keys the attention kernel receives and their token positions."""

    needs_kv_positions = True

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, {}
        self.granularity = inner.granularity

    def attention(self, lctx):
        def kernel(q, k, v, *, scale, mask=None, ctx=None):
            self.seen[(lctx.si, lctx.li)] = (k.clone(), None if ctx.kv_positions is None else ctx.kv_positions.clone())
            return (self.inner.attention(lctx) or _sdpa)(q, k, v, scale=scale, mask=mask, ctx=ctx)
        return kernel

    def compress_kv(self, lctx, kv):
        return self.inner.compress_kv(lctx, kv)


def _sdpa(q, k, v, *, scale, mask=None, ctx=None):
    from varbench.attention import sdpa_attention
    return sdpa_attention(q, k, v, scale=scale)


def test_key_positions_name_the_tokens_the_cached_keys_belong_to(bb):
    """Under ScaleKV, the key at cache index j with token position p is, bit for bit, the key token p got when its
    scale appended it (recorded then, before any compression)."""
    m = _Keys(build_method({"name": "scalekv"}))
    out = _gen(bb, m)
    S, D = len(bb.scales()), bb.spec.depth
    starts = [sum(out.record.scale_n[:s]) for s in range(S + 1)]
    checked = compressed = 0
    for si in range(1, S):
        for li in range(D):
            k, pos = m.seen[(si, li)]
            if pos is None:
                assert k.shape[2] == starts[si + 1]          # nothing dropped yet: key j is token j
                continue
            compressed += 1
            R, H, L, _ = k.shape
            pos = pos.expand(R, H, L)
            for r in range(R):
                for h in range(H):
                    for j in range(L):
                        p = int(pos[r, h, j])
                        s = max(t for t in range(S) if starts[t] <= p)        # the scale token p belongs to
                        if s == si:
                            assert p - starts[si] == j - (L - out.record.scale_n[si])
                        k_then = _key_at_append(m, s, li, r, h, p - starts[s], out.record.scale_n[s])
                        assert torch.equal(k[r, h, j], k_then), (si, li, r, h, j, p)
                        checked += 1
    assert compressed > 0 and checked > 1000


def _key_at_append(m, s, li, r, h, g, n):
    """The key of grid token g of scale s in layer li, as the cache held it when scale s appended it (the last n)."""
    k = m.seen[(s, li)][0]
    return k[r, h, k.shape[2] - n + g]


def test_positions_are_tracked_only_for_a_method_that_reads_them(bb):
    class Plain(_Keys):
        needs_kv_positions = False

    m = Plain(build_method({"name": "scalekv"}))
    _gen(bb, m)
    assert all(pos is None for _, pos in m.seen.values())
    assert build_method({"name": "stack", "methods": ["sparvar", "scalekv"]}).needs_kv_positions
    assert not build_method({"name": "stack", "methods": ["nova", "scalekv"]}).needs_kv_positions


def test_noop_compression_takes_the_position_path_and_changes_nothing(bb):
    """A stack with a no-op ScaleKV hands SparVAR every key with its position (the compressed-cache kernels run):
    the images equal SparVAR alone bit for bit."""
    a = _gen(bb, build_method({"name": "sparvar"}))
    m = build_method({"name": "stack", "methods": ["sparvar", {"name": "scalekv", "enabled": False}]})
    b = _gen(bb, m)
    assert set(b.method_summary["members"]["sparvar"]["kernels"].values()) >= {"reference (compressed cache)"}
    assert torch.equal(a.images, b.images)
    assert a.method_summary["attn_keys"] == b.method_summary["members"]["sparvar"]["attn_keys"]


def test_sparvar_with_scalekv_attends_the_kept_keys_of_its_sets(bb):
    m = build_method({"name": "stack_sparvar_scalekv", "family": "stack", "methods": ["sparvar", "scalekv"]})
    out = _gen(bb, m)
    rec, sv = out.record, out.method_summary["members"]["sparvar"]
    alone = _gen(bb, build_method({"name": "sparvar"}))
    assert sum(map(sum, rec.kv_kept)) < sum(map(sum, alone.record.kv_kept)) / 2
    assert not torch.equal(out.images, alone.images) and torch.isfinite(out.images).all()
    for mod, per in sv["attn_keys"].items():       # fewer keys per query than SparVAR on the full cache, never more
        for si, keys in per.items():               # than the layer holds
            assert 0 < keys <= alone.method_summary["attn_keys"][mod][si] + 1e-9
            assert keys <= max(rec.kv_len[int(si)])


# ---- the kernels, against the rule written out
def _softmax_rows(q, k, v, scale, visible):
    """One query: softmax over the visible keys only (lists of floats)."""
    logits = {j: scale * sum(float(a) * float(b) for a, b in zip(q, k[j])) for j in visible}
    mx = max(logits.values())
    z = sum(math.exp(x - mx) for x in logits.values())
    return [sum(math.exp(logits[j] - mx) / z * float(v[j][c]) for j in visible) for c in range(v.shape[-1])]


def _cache(seed=0, R=2, H=2, P_full=40, keep=25, n=12, c=4):
    """A cache that kept ``keep`` of the ``P_full - n`` earlier tokens (different ones per row and head), then appended
    this scale's n tokens; the positions of its keys."""
    g = torch.Generator().manual_seed(seed)
    old = P_full - n
    pos = torch.stack([torch.stack([torch.randperm(old, generator=g)[:keep].sort().values for _ in range(H)])
                       for _ in range(R)])
    pos = torch.cat((pos, torch.arange(old, P_full).expand(R, H, n)), -1)
    L = pos.shape[-1]
    q = torch.randn(R, H, n, c, generator=g)
    return q, torch.randn(R, H, L, c, generator=g), torch.randn(R, H, L, c, generator=g), pos


@pytest.mark.parametrize("sdpa", [False, True])
def test_cs4a_on_a_compressed_cache_is_the_softmax_over_its_sets_kept_keys(sdpa):
    q, k, v, pos = _cache()
    R, H, n, _ = q.shape
    group, G = 5, 3
    g = torch.Generator().manual_seed(1)
    J = torch.stack([torch.stack([torch.stack([torch.randperm(40, generator=g)[:15].sort().values for _ in range(G)])
                                  for _ in range(H)]) for _ in range(R)])        # token positions per group
    counts: list = []
    out = cs4a_sparse_reference(q, k, v, J, group, 0.7, pos, counts, sdpa)
    seen = []
    for r in range(R):
        for h in range(H):
            for i in range(n):
                want = set(int(t) for t in J[r, h, i // group])
                visible = [j for j in range(k.shape[2]) if int(pos[r, h, j]) in want]
                seen.append(len(visible))
                ref = _softmax_rows(q[r, h, i], k[r, h], v[r, h], 0.7, visible)
                assert torch.allclose(out[r, h, i], torch.tensor(ref), atol=1e-5)
    assert abs(sum(counts) / n - sum(seen) / len(seen)) < 1e-4     # mean keys per query (FLOP count)


@pytest.mark.parametrize("sdpa", [False, True])
def test_csla_on_a_compressed_cache_is_the_softmax_over_its_tiles_kept_keys(sdpa):
    q, k, v, pos = _cache(seed=2)
    R, H, n, _ = q.shape
    tile, P_full = 4, 40
    g = torch.Generator().manual_seed(3)
    tiles = torch.rand(math.ceil(n / tile), P_full // tile, generator=g) < 0.5
    tiles[:, -1] = True                                   # every query sees its own scale's last tile
    out = csla_reference(q, k, v, tiles, tile, 0.5, pos, P_full, sdpa)
    el = tiles_to_elements(tiles, tile, n, P_full)
    seen = []
    for r in range(R):
        for h in range(H):
            for i in range(n):
                visible = [j for j in range(k.shape[2]) if bool(tiles[i // tile, int(pos[r, h, j]) // tile])]
                assert visible == [j for j in range(k.shape[2]) if bool(el[i, int(pos[r, h, j])])]
                seen.append(len(visible))
                ref = _softmax_rows(q[r, h, i], k[r, h], v[r, h], 0.5, visible)
                assert torch.allclose(out[r, h, i], torch.tensor(ref), atol=1e-5)
    assert abs(csla_keys_per_query(tiles, tile, n, pos, P_full) - sum(seen) / len(seen)) < 1e-4


def test_pruned_queries_or_pooled_keys_are_one_line(bb):
    from varbench.backbones.base import ScaleInfo
    from varbench.hooks import LayerCtx, ScaleCtx

    m = build_method({"name": "sparvar"})
    m.start()
    sched = tuple(ScaleInfo.of(s) for s in bb.scales())
    T = len(sched)
    si = T - 1
    sctx = ScaleCtx(si, T, (sched[si].h, sched[si].w), 2, 1, bb.spec, sched, sched[si].w)
    lctx = LayerCtx(sctx, bb.spec.depth - 1, kv_segments=tuple(s.n for s in sched[:si]))
    P = sum(s.n for s in sched)
    k = torch.randn(2, bb.spec.num_heads, P, 8)
    kernel = m.attention(lctx)
    with pytest.raises(UserError, match="pruned tokens"):
        kernel(torch.randn(2, bb.spec.num_heads, sched[si].n - 1, 8), k, k, scale=1.0, ctx=lctx)
    lctx.kv_positions = torch.full((1, 1, P), -1)
    with pytest.raises(UserError, match="no token position"):
        kernel(torch.randn(2, bb.spec.num_heads, sched[si].n, 8), k, k, scale=1.0, ctx=lctx)


@pytest.mark.parametrize("rule", ["held", "full"])
def test_the_decision_top_k_on_a_compressed_cache_follows_compressed_topk(bb, rule):
    """k at the decision scale: 20 % of the keys the layer holds (held, default) or of the full cache, capped (full);
    the key sets are kept as token positions of keys the cache holds."""
    from baselines.sparvar import topk_budget

    m = build_method({"name": "stack", "methods": [{"name": "sparvar", "compressed_topk": rule}, "scalekv"]})
    sv = m.members[0]
    seen = {}
    decide = sv._cs4a_decide_kernel

    def spy(q, k, v, *, scale, mask=None, ctx=None):
        out = decide(q, k, v, scale=scale, mask=mask, ctx=ctx)
        seen[ctx.li] = (k.shape[2], sum(ctx.kv_segments) + q.shape[2], sv.state[ctx.li]["src"].clone(),
                        ctx.kv_positions.clone())
        return out

    sv._cs4a_decide_kernel = spy
    _gen(bb, m)
    assert seen
    for held, full, src, pos in seen.values():
        assert held < full
        want = topk_budget(held if rule == "held" else full, sv.cfg.topk_ratio, sv.cfg.align)
        assert src.shape[-1] == min(held, want)
        R, H = src.shape[:2]
        for r in range(R):
            for h in range(H):
                have = set(pos.expand(R, H, -1)[r, h].tolist())
                assert set(src[r, h].flatten().tolist()) <= have


def test_compressed_topk_is_checked():
    with pytest.raises(UserError, match="compressed_topk must be held|full"):
        build_method({"name": "sparvar", "compressed_topk": "some"})


def test_the_fast_kernels_on_a_compressed_cache_are_masked_sdpa(bb):
    m = build_method({"name": "stack", "methods": [{"name": "sparvar", "kernel": "fast"}, "scalekv"]})
    out = _gen(bb, m)
    kernels = out.method_summary["members"]["sparvar"]["kernels"]
    assert kernels["cs4a"] == kernels["csla"] == "masked_sdpa (compressed cache)"
    assert torch.isfinite(out.images).all()
