"""The generation loop and its hook points, on the tiny seeded backbone."""
import torch

from varbench.hooks import Method, ScalePlan
from varbench.loop import generate
from varbench.tokens import Selection

PROMPTS = ["a red circle"]


def _gen(bb, method=None, seed=0):
    return generate(bb, PROMPTS, method, torch.Generator().manual_seed(seed))


class SelectAll(Method):
    """Selects every token explicitly: must change nothing."""
    name = "select_all"

    def select(self, lctx, x):
        return Selection.all(x.shape[1])


class SelectAllPerBranch(SelectAll):
    granularity = "branch"


class KeepHalfLate(Method):
    """Computes half the tokens of the last two scales in every layer (a toy reduction)."""
    name = "keep_half"

    def select(self, lctx, x):
        if lctx.si < lctx.scale.num_scales - 2:
            return None
        n = x.shape[1]
        return Selection(torch.arange(0, n, 2)[None], n)


def test_noop_method_is_bit_identical_to_no_method(tiny_backbone):
    a = _gen(tiny_backbone, None)
    b = _gen(tiny_backbone, Method())
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(x, y) for x, y in zip(a.state.bits, b.state.bits))


def test_selecting_all_tokens_is_identical(tiny_backbone):
    ref = _gen(tiny_backbone)
    for m in (SelectAll(), SelectAllPerBranch()):
        out = _gen(tiny_backbone, m)
        assert torch.allclose(out.images, ref.images, atol=1e-5), m.name
        assert all(torch.equal(x, y) for x, y in zip(out.state.bits, ref.state.bits))


def test_token_accounting_and_kv_only_for_computed_tokens(tiny_backbone):
    out = _gen(tiny_backbone, KeepHalfLate())
    rec = out.record
    S, D = len(rec.scale_hw), tiny_backbone.spec.depth
    for si, (h, w) in enumerate(rec.scale_hw):
        n = h * w
        expect = (n + 1) // 2 if si >= S - 2 else n
        assert rec.tokens[si] == [expect] * D
    # the KV cache grows only by the computed tokens
    full = [sum(h * w for h, w in rec.scale_hw[: si + 1]) for si in range(S)]
    assert rec.kv_len[S - 3] == [full[S - 3]] * D
    assert rec.kv_len[-1][0] == full[S - 3] + rec.tokens[S - 2][0] + rec.tokens[S - 1][0]
    assert len(rec.scale_time_s) == S and all(t >= 0 for t in rec.scale_time_s)
    assert rec.peak_memory_bytes > 0


def test_skip_scale_and_cond_only(tiny_backbone):
    class SkipLast(Method):
        name = "skip_last"

        def plan_scale(self, sctx):
            return ScalePlan(skip=sctx.si == sctx.num_scales - 1, cond_only=sctx.si >= 5)

    out = _gen(tiny_backbone, SkipLast())
    S = len(out.record.scale_hw)
    assert out.record.skipped_scales == [S - 1]
    assert out.record.cond_only_from == 5
    assert len(out.state.bits) == S - 1
    assert out.images.shape[-1] == 128 and torch.isfinite(out.images).all()


def test_logits_hook_sees_unfiltered_logits_and_is_not_edited(tiny_backbone):
    seen = []

    class Rec(Method):
        def after_logits(self, sctx, lc, lu, lg):
            seen.append((lc.clone(), lu.clone(), lg, lg.clone()))

    _gen(tiny_backbone, Rec())
    cfg = tiny_backbone.sampling.cfg
    for lc, lu, lg, lg_copy in seen:
        assert torch.equal(lg, lg_copy), "the sampler edited the logits in place"
        assert torch.isfinite(lg).all()  # before top-p: nothing masked to -inf
        assert torch.allclose(lg, cfg * lc + (1 - cfg) * lu, atol=1e-4)  # tau = 1


def test_kv_cached_loop_matches_teacher_forced_forward(tiny_backbone):
    """The loop's logits with the bits it sampled equal the full-sequence block-causal forward."""
    import torch.nn.functional as F

    from varbench.backbones.infinity.schedules import rope_cos_sin, rope_positions

    seen = []

    class Rec(Method):
        def after_logits(self, sctx, lc, lu, lg):
            seen.append(lc.clone())

    bb = tiny_backbone
    out = _gen(bb, Rec())
    # rebuild the teacher-forcing input from the sampled bits (spec §6.6)
    xs, summed = [], None
    final = bb.vae_hws[-1]
    for sc, bits in zip(bb.scales(), out.state.bits):
        st = bb.update(type(out.state)(summed if summed is not None else 0.0, []), bits, sc)
        summed = st.summed
        if sc.si + 1 < len(bb.scales()):
            z = F.interpolate(summed, size=(1, *bb.vae_hws[sc.si + 1]), mode="trilinear").squeeze(2)
            xs.append(z.reshape(1, z.shape[1], -1).transpose(1, 2))
    kv, lens = bb.text(PROMPTS)
    cs = rope_cos_sin(rope_positions(bb.schedule), bb.model.head_dim)
    with torch.no_grad():
        tf = bb.model.forward_teacher_forced(kv, lens, torch.cat(xs, 1), bb.scales(), cs)
    assert (torch.cat(seen, 1) - tf).abs().max() < 1e-4
    assert final == (32, 32)


def test_default_tiny_schedule_has_room_for_nova(tiny_backbone):
    assert len(tiny_backbone.scales()) >= 10


def test_bf16_precision_path_runs(tiny_cfg):
    """dtype=bf16 (the GPU setting: bf16 blocks under autocast, fp32 head/VAE) also runs on the CPU."""
    from varbench.harness.registry import build_backbone

    bb = build_backbone(tiny_cfg, "cpu", "bf16")
    assert bb.model.blocks[0].sa.mat_qkv.weight.dtype == torch.bfloat16
    assert bb.model.head.weight.dtype == torch.float32
    out = _gen(bb)
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()
