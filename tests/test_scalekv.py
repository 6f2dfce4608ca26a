"""ScaleKV (baselines/scalekv.py): the selection against an independent implementation written here from the paper's
rule, the budget file as the authors' format states it, and the loop attending exactly the keys that were kept."""
import json
import math

import pytest
import torch
from conftest import REPO

from varbench.backbones.base import BackboneSpec, ScaleInfo
from varbench.errors import UserError
from varbench.flops import generation_flops
from varbench.harness.registry import build_backbone, build_method
from varbench.hooks import KVState, LayerCtx, Method, ScaleCtx
from varbench.loop import generate

SCALES_1M = [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]


def _model(pn=None, hws=None):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/tiny_random.yaml"), resolve=True)
    if pn:
        cfg["schedule"] = {"h_div_w": 1.0, "pn": pn}
    if hws:
        cfg["schedule"] = {"hws": hws}
    return build_backbone(cfg, "cpu", "fp32")


@pytest.fixture(scope="module")
def bb():
    return _model()


def _gen(bb, m, prompt="two green circles"):
    return generate(bb, [prompt], m, torch.Generator().manual_seed(0))


# ---- an independent implementation of the selection, from the paper's rule, one (row, head) at a time
def reference_keep(q_win, k, win, budget, scale, score="softmax", kernel=5, pooling="maxpool"):
    """For every (row, head): importance of each non-window key j = Σ over window queries i of the attention weight
    softmax_j(scale · q_i·k_j) (or the raw logit); pooled over neighbours |j'-j| <= kernel//2 (max or mean over the
    kernel, zero padding for the mean); keep the window and the budget-w best non-window keys. Returns, per (r, h),
    (pooled scores of the non-window keys as a dict, the window set, how many non-window keys to keep)."""
    R, H, L, _ = k.shape
    out = {}
    for r in range(R):
        W = set(int(i) for i in win[r])
        for h in range(H):
            weights = []      # per window query: the weight (or logit) it gives each key
            for i in range(q_win.shape[2]):
                logits = [scale * sum(float(a) * float(b) for a, b in zip(q_win[r, h, i], k[r, h, jj]))
                          for jj in range(L)]
                if score == "softmax":
                    mx = max(logits)
                    z = sum(math.exp(x - mx) for x in logits)
                    logits = [math.exp(x - mx) / z for x in logits]
                weights.append(logits)
            raw = [-math.inf if j in W else sum(wq[j] for wq in weights) for j in range(L)]
            pad = kernel // 2
            pooled = {}
            for j in range(L):
                if j in W:
                    continue
                nb = [raw[jj] if 0 <= jj < L else (0.0 if pooling == "avgpool" else -math.inf)
                      for jj in range(j - pad, j + pad + 1)]
                pooled[j] = max(nb) if pooling == "maxpool" else sum(nb) / kernel
            out[(r, h)] = (pooled, W, min(max(0, budget - len(W)), L - len(W)))
    return out


def assert_valid_keep(keep, ref, tol=1e-5):
    """Any choice inside a group tied at the cut is valid (max pooling makes equal neighbours): every key above the
    cut kept, none below it, the right count, the window always."""
    for (r, h), (pooled, W, n_rest) in ref.items():
        got = [int(i) for i in keep[r, h]]
        assert got == sorted(got) and len(set(got)) == len(got) == n_rest + len(W)
        assert W <= set(got)
        rest = set(got) - W
        if n_rest == 0:
            continue
        cut = sorted(pooled.values(), reverse=True)[n_rest - 1]
        for j, s in pooled.items():
            if s > cut + tol:
                assert j in rest, (r, h, j, s, cut)
            if s < cut - tol:
                assert j not in rest, (r, h, j, s, cut)


def _ctx(si, li, hws, depth=2):
    spec = BackboneSpec("t", depth, 16, 2, "bitwise", 8, ("sa", "ca", "ffn"))
    sched = tuple(ScaleInfo(i, h, w, h * w, w) for i, (h, w) in enumerate(hws))
    sctx = ScaleCtx(si, len(hws), hws[si], 2, 1, spec, sched, hws[si][1])
    return LayerCtx(sctx, li)


@pytest.mark.parametrize("score,pooling", [("softmax", "maxpool"), ("logits", "maxpool"), ("softmax", "avgpool")])
def test_compress_kv_equals_the_rule_written_out(score, pooling):
    """The whole hook (window on the current grid, budget, scores, pooling, top-k) on random caches."""
    g = torch.Generator().manual_seed(1)
    hws = [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)]
    L, n, R, H, c = 121, 64, 2, 2, 8
    k, v = torch.randn(R, H, L, c, generator=g), torch.randn(R, H, L, c, generator=g)
    q = torch.randn(R, H, n, c, generator=g)
    m = build_method({"name": "scalekv", "base_capacity": 10, "budget_fraction": 0.9, "score": score,
                      "pooling": pooling})
    m.start()
    lctx = _ctx(4, 0, hws)
    budget = m.budget(lctx)
    assert budget == round(0.9 * 57)          # budget_fraction of the 57 tokens before the last scale
    edit = m.compress_kv(lctx, KVState(k, v, q, n, None, (1, 4, 16, 36, 64), 0.5))
    # the window: centres of a 4x4 grid of 2x2 patches on the 8x8 grid (row 2i, col 2j), at cache offset 57
    win = [57 + (2 * i) * 8 + 2 * j for i in range(4) for j in range(4)]
    q_win = q[:, :, [w - 57 for w in win]]
    ref = reference_keep(q_win, k, torch.tensor([win, win]), budget, 0.5, score, 5, pooling)
    assert_valid_keep(edit.keep_idx, ref)
    k2, v2 = edit.apply(k, v)
    for r in range(R):
        for h in range(H):
            assert torch.equal(k2[r, h], k[r, h, edit.keep_idx[r, h]]) and torch.equal(v2[r, h], v[r, h, edit.keep_idx[r, h]])


def test_small_grid_window_is_the_last_rows_and_sqrt_d_scale(tmp_path):
    """A grid smaller than the window's (4x4 < 5x5) takes the last window_size cache rows (port :60-68);
    logit_scale=sqrt_d (port :240); the budget of scale 3 is the file's 'Scale 5' (offset 2, port :183)."""
    g = torch.Generator().manual_seed(2)
    hws = [(1, 1), (2, 2), (3, 3), (4, 4)]
    L, n, c = 30, 16, 4
    k, v, q = torch.randn(1, 1, L, c, generator=g), torch.randn(1, 1, L, c, generator=g), torch.randn(1, 1, n, c, generator=g)
    p = write_budget(tmp_path / "b.json", 1, {5: (28, 20), 4: (29, 27)})
    m = build_method({"name": "scalekv", "budget_file": p, "base_capacity": 5, "window_size": 25,
                      "logit_scale": "sqrt_d", "score": "logits"})
    m.start()
    lctx = _ctx(3, 0, hws, depth=1)
    assert m.budget(lctx) == 28
    edit = m.compress_kv(lctx, KVState(k, v, q, n, None, (1, 4, 9, 16), 1.0))
    win = torch.arange(L - 25, L)[None]
    # window rows cached before this scale have no query here: the port clamps them to this scale's first (:244)
    ref = reference_keep(q[:, :, (win[0] - 14).clamp(min=0)], k, win, 28, 1 / math.sqrt(c), "logits")
    assert_valid_keep(edit.keep_idx, ref)


def write_budget(path, depth, scales, drafters=(0,)):
    """A budget file in the authors' format, written by the test (the authors' files are not shipped): per
    "Scale N" a Max, a Min and "Block i": 1 (drafter) / 0 (refiner)."""
    data = {}
    for N, (mx, mn) in scales.items():
        d = {"Max": mx, "Min": mn}
        d.update({f"Block {i}": int(i in drafters) for i in range(depth)})
        data[f"Scale {N}"] = d
    path.write_text(json.dumps(data))
    return str(path)


# per layer averages 650 at every scale, as the authors' 2B/8B files do; distinct numbers per scale so that a wrong
# offset, a swapped Max/Min or a wrong last-scale rule shows
BUDGET_4 = {9: (920, 560), 10: (1490, 370), 11: (1400, 400), 12: (1100, 500), 13: (1250, 450)}


def test_budget_file_is_read_as_the_authors_format(tmp_path):
    from baselines.scalekv import load_budgets

    p = write_budget(tmp_path / "b.json", 4, BUDGET_4, drafters=(0, 3))
    b = load_budgets(p)
    assert b[9] == [920, 560, 560, 920] and b[13] == [1250, 450, 450, 1250]
    with pytest.raises(UserError, match=r"not found: it is the authors' data, published as .*Weepingchestnut/Lvar"):
        build_method({"name": "scalekv", "budget_file": str(tmp_path / "absent.json")})


def test_the_1m_schedule_keeps_what_the_budget_file_states(tmp_path):
    """On the 1M schedule (13 scales) with a test-written 10 % file: the budget of scale si is 'Scale si+2'
    (port :183), the last scale reuses the previous one (:173-175), caches up to 650 stay whole (:167); the keys the
    last scale attends besides its own are the file's 'Scale 13' per layer = 650/6425 = 10.1 %."""
    bb = _model(pn="1M")
    D = bb.spec.depth
    assert D == 4 and [s.h for s in bb.scales()] == SCALES_1M
    p = write_budget(tmp_path / "2b_10%_budget.json", D, BUDGET_4)
    out = _gen(bb, build_method({"name": "scalekv", "budget_file": p}))
    rec = out.record
    ns = [s * s for s in SCALES_1M]
    full = [sum(ns[: i + 1]) for i in range(13)]
    for si in range(7):      # caches up to base_capacity 650 stay whole (full[6] = 521, full[7] = 921)
        assert rec.kv_kept[si] == [full[si]] * D
    for si in range(7, 13):
        want = [min(BUDGET_4[min(si + 2, 13)][0 if li == 0 else 1], rec.kv_len[si][li]) for li in range(D)]
        assert rec.kv_kept[si] == want, si
        if si > 7:
            assert rec.kv_len[si] == [rec.kv_kept[si - 1][li] + ns[si] for li in range(D)]
    before_last = [rec.kv_len[12][li] - ns[12] for li in range(D)]
    assert before_last == [1250, 450, 450, 450]
    frac = sum(before_last) / D / full[11]
    assert abs(frac - 0.101) < 0.001
    assert rec.kv_peak_bytes < 0.5 * D * full[12] * 2 * 2 * 128 * 4    # well below the whole cache (none)


def test_missing_layer_is_one_line_or_the_ports_fallback(tmp_path):
    bb_depth = 4
    p = write_budget(tmp_path / "b.json", 2, BUDGET_4)     # a file for a 2-layer model
    m = build_method({"name": "scalekv", "budget_file": p})
    hws = [(s, s) for s in SCALES_1M]
    with pytest.raises(UserError, match=r"lists 2 layers for 'Scale 10'.*missing_layer=base"):
        m.budget(_ctx(8, 3, hws, depth=bb_depth))
    m2 = build_method({"name": "scalekv", "budget_file": p, "missing_layer": "base"})
    with pytest.warns(UserWarning, match="scale_kv.py:188-190"):
        assert m2.budget(_ctx(8, 3, hws, depth=bb_depth)) == 650


def test_reset_base_lvar_stops_on_the_second_image_of_a_short_schedule(tmp_path, bb):
    """Port :173-175: 'has reached base' is cleared only at scale 12, so on the 10-scale 0.25M schedule the next image
    looks up 'Scale 2' (absent; the port crashes with len(None)). reset_base=image (default) runs every image."""
    p = write_budget(tmp_path / "b.json", 4, {9: (700, 300), 10: (800, 300), 11: (900, 300)})
    m = build_method({"name": "scalekv", "budget_file": p, "base_capacity": 600, "reset_base": "lvar"})
    _gen(bb, m)
    with pytest.raises(UserError, match=r"no 'Scale 2' for scale 0.*cleared only at scale 12"):
        _gen(bb, m)
    ok = build_method({"name": "scalekv", "budget_file": p, "base_capacity": 600})
    a, b = _gen(bb, ok), _gen(bb, ok)
    assert torch.equal(a.images, b.images)


class Recording(Method):
    """A method that only records what the attention of every (scale, layer) received."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, {}

    def reset(self):
        if hasattr(self, "inner"):
            self.inner.start()
            self.seen = {}

    def attention(self, lctx):
        def kern(q, k, v, *, scale, mask=None, ctx=None):
            self.seen[(lctx.si, lctx.li)] = (k.clone(), v.clone())
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        return kern

    def compress_kv(self, lctx, kv):
        e = self.inner.compress_kv(lctx, kv)
        self.seen[("kept", lctx.si, lctx.li)] = (e.apply(kv.k, kv.v) if e is not None else (kv.k, kv.v))
        return e


def test_compressed_keys_are_not_attended_again(bb):
    """What scale si+1 attends = exactly the keys/values kept after scale si, then its own; FLOPs count those."""
    m = Recording(build_method({"name": "scalekv"}))
    out = _gen(bb, m)
    rec, S = out.record, len(bb.scales())
    compressed = 0
    for si in range(S - 1):
        for li in range(bb.spec.depth):
            kk, vk = m.seen[("kept", si, li)]
            ka, va = m.seen[(si + 1, li)]
            L = kk.shape[2]
            assert ka.shape[2] == L + rec.scale_n[si + 1] == rec.kv_len[si + 1][li]
            assert torch.equal(ka[:, :, :L], kk) and torch.equal(va[:, :, :L], vk)
            compressed += rec.kv_kept[si][li] < rec.kv_len[si][li]
    assert compressed > 0
    ref = _gen(bb, Method())
    assert generation_flops(out.record.__dict__, bb.spec) < generation_flops(ref.record.__dict__, bb.spec)


def test_a_layer_that_computed_nothing_keeps_its_cache(tmp_path):
    """An upstream method bypassed the block (K = 0): no queries at this scale, so nothing to score with."""
    p = write_budget(tmp_path / "b.json", 1, {5: (28, 20)})
    m = build_method({"name": "scalekv", "budget_file": p, "base_capacity": 5})
    m.start()
    k = torch.randn(1, 1, 30, 4)
    assert m.compress_kv(_ctx(3, 0, [(1, 1), (2, 2), (3, 3), (4, 4)], depth=1), KVState(k, k, None, 0)) is None


class _Seen(Method):
    """Keeps what compress_kv is handed at (si, li) = (3, 1); compresses nothing."""

    def __init__(self):
        super().__init__()
        self.got = None

    def compress_kv(self, lctx, kv):
        if (lctx.si, lctx.li) == (3, 1):
            self.got = (kv.q.clone(), kv.raw_q(), kv.attn_scale)
        return None


def test_raw_query_is_the_q_projection_without_bias_norm_temperature_or_rope(bb):
    """``query=raw`` (Lvar scale_kv.py:355-356: ``mat_qkv(x)``): what the backbone offers, once the model's own q bias,
    l2-norm, temperature and RoPE are applied here, is exactly the query the attention kernel received."""
    from varbench.backbones.infinity.model import apply_rope

    m = _Seen()
    _gen(bb, m)
    q, raw, scale = m.got
    sa = bb.model.blocks[1].sa
    H, c = sa.H, sa.c
    with torch.no_grad():
        sa.q_bias.normal_(generator=torch.Generator().manual_seed(5))   # a non-zero bias, so leaving it out shows
        m2 = _Seen()
        _gen(bb, m2)
        q, raw, _ = m2.got
        qb = raw + sa.q_bias.view(1, H, 1, c)
        want = torch.nn.functional.normalize(qb, dim=-1) * sa.scale_mul_1H11.clamp_max(sa.max_scale_mul).exp()
        want = apply_rope(want, bb.positions(None, bb.scales()[3]))
        sa.q_bias.zero_()
    assert raw.shape == q.shape and not torch.allclose(raw, q, atol=1e-3)
    torch.testing.assert_close(want, q, rtol=1e-5, atol=1e-5)


def test_query_raw_scores_the_raw_projection(tmp_path):
    """compress_kv with query=raw selects with the raw queries (here: unrelated to the kernel's), by the rule written
    out above; a backbone that offers none stops with one line."""
    g = torch.Generator().manual_seed(3)
    hws = [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)]
    L, n, R, H, c = 121, 64, 2, 2, 8
    k, v = torch.randn(R, H, L, c, generator=g), torch.randn(R, H, L, c, generator=g)
    q, raw = torch.randn(R, H, n, c, generator=g), torch.randn(R, H, n, c, generator=g)
    m = build_method({"name": "scalekv", "base_capacity": 10, "budget_fraction": 0.5, "score": "logits",
                      "logit_scale": "sqrt_d", "query": "raw"})
    m.start()
    edit = m.compress_kv(_ctx(4, 0, hws), KVState(k, v, q, n, None, (1, 4, 16, 36, 64), 1.0, lambda: raw))
    win = [57 + (2 * i) * 8 + 2 * j for i in range(4) for j in range(4)]
    ref = reference_keep(raw[:, :, [w - 57 for w in win]], k, torch.tensor([win, win]), m.budget(_ctx(4, 0, hws)),
                         1 / math.sqrt(c), "logits")
    assert_valid_keep(edit.keep_idx, ref)
    attn = build_method({"name": "scalekv", "base_capacity": 10, "budget_fraction": 0.5, "score": "logits",
                         "logit_scale": "sqrt_d"})
    attn.start()
    other = attn.compress_kv(_ctx(4, 0, hws), KVState(k, v, q, n, None, (1, 4, 16, 36, 64), 1.0, lambda: raw))
    assert not torch.equal(other.keep_idx, edit.keep_idx)
    m.start()
    with pytest.raises(UserError, match="offers no raw query projection"):
        m.compress_kv(_ctx(4, 0, hws), KVState(k, v, q, n, None, (1, 4, 16, 36, 64), 1.0))


@pytest.mark.parametrize("model", ["tiny_random", "hart_tiny_random", "var_tiny_random"])
def test_scalekv_lvar_runs_with_the_raw_query_on_every_backbone(model):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / f"conf/model/{model}.yaml"), resolve=True)
    b = build_backbone(cfg, "cpu", "fp32")
    node = OmegaConf.to_container(OmegaConf.load(REPO / "conf/method/scalekv_lvar.yaml"), resolve=True)
    node.pop("defaults", None)
    node["family"] = "scalekv"
    assert node["query"] == "raw"
    m = build_method(node | {"base_capacity": 8, "budget_fraction": 0.3})
    cond = 3 if b.spec.conditioning == "class" else "two green circles"
    out = generate(b, [cond], m, torch.Generator().manual_seed(0))
    assert sum(out.record.kv_kept[-2]) < sum(out.record.kv_len[-2])
