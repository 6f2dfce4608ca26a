"""method=stack (varbench/stack.py): members on disjoint hooks, claims/FLOPs/memory that add up, one line on overlap."""
from pathlib import Path

import pytest
import torch
from test_methods_contract import backbone, check_contract

from varbench.backbones.base import ScaleInfo
from varbench.errors import UserError
from varbench.harness.registry import build_method
from varbench.hooks import LayerCtx, Method, ScaleCtx
from varbench.loop import generate
from varbench.stack import Stack, claimed_hooks


@pytest.fixture(scope="module")
def bb():
    return backbone("tiny_random")


def _gen(bb, m):
    return generate(bb, ["two green circles"], m, torch.Generator().manual_seed(0))


def test_members_claiming_one_hook_stop_with_one_line_naming_it():
    with pytest.raises(UserError, match=r"members 'nova' and 'fastvar' both claim the hook 'plan_scale'"):
        build_method({"name": "stack", "methods": ["nova", "fastvar"]})
    assert claimed_hooks(build_method({"name": "scalekv"})) == ["compress_kv"]
    with pytest.raises(UserError, match="registry"):
        Stack(Stack.Config(methods=["nova"]))          # members are built by the registry only


@pytest.mark.parametrize("member", ["scalekv", "fastvar"])
def test_a_stack_of_one_is_that_method(bb, member):
    """Forwarding changes nothing: images, tokens, kept keys and the method's FLOPs equal the member's alone."""
    a, b = _gen(bb, build_method({"name": member})), _gen(bb, build_method({"name": "stack", "methods": [member]}))
    assert torch.equal(a.images, b.images)
    assert a.record.tokens == b.record.tokens and a.record.kv_kept == b.record.kv_kept
    assert a.method_summary.get("method_flops", 0.0) == b.method_summary["method_flops"]


def test_nova_with_scalekv_adds_up(bb):
    """Tokens are NOVA's claims, the cache ScaleKV's budget, the method FLOPs the sum of the members' reports."""
    m = build_method({"name": "stack", "methods": ["nova", "scalekv"]})
    nova, skv = m.members
    out = _gen(bb, m)
    rec = out.record
    assert m.claims == nova.claims and m.claims and not skv.claims
    sched = tuple(ScaleInfo.of(sc) for sc in bb.scales())
    budget = skv.uniform_budget(LayerCtx(ScaleCtx(0, len(sched), (1, 1), 2, 1, bb.spec, sched), 0))
    assert 0 < budget < rec.kv_len[-1][0]
    assert rec.kv_kept == [[min(L, budget) for L in row] for row in rec.kv_len]
    s = out.method_summary
    assert s["method_flops"] == sum(v.get("method_flops", 0.0) for v in s["members"].values())
    assert s["members"]["scalekv"]["method_flops"] > 0
    none = _gen(bb, Method())
    alone = _gen(bb, build_method({"name": "nova"}))
    assert rec.kv_peak_bytes < alone.record.kv_peak_bytes < none.record.kv_peak_bytes


class _Selects(Method):
    """A toy member computing half the tokens of every scale from scale 2 on, claiming them."""

    def select(self, lctx, x):
        from varbench.tokens import Selection

        if lctx.si < 2:
            return None
        k = x.shape[1] // 2
        self.claim(lctx, k)
        return Selection(torch.arange(k)[None], x.shape[1])


class _AlsoClaims(Method):
    """A faulty member: it changes nothing, yet claims the tokens of every (scale, layer) again after the block."""

    def after_layer(self, lctx, x_in, x_out):
        self.claim(lctx, x_in.shape[1])


def test_the_contract_fails_on_a_stack_whose_claims_double_count(bb):
    good = lambda: Stack(Stack.Config(methods=["a"]), build=lambda node: _Selects())   # noqa: E731
    check_contract(bb, good)
    bad = lambda: Stack(Stack.Config(methods=["a", "b"]),   # noqa: E731
                        build=lambda node: _Selects() if node["name"] == "a" else _AlsoClaims())
    assert sorted(claimed_hooks(_Selects()) + claimed_hooks(_AlsoClaims())) == ["after_layer", "select"]
    with pytest.raises(AssertionError):
        check_contract(bb, bad)


def test_a_stacks_run_metrics_and_figures_are_its_members(bb, tmp_path):
    """The run-level metrics of a stack are each member's aggregate over its part of the summaries (NOVA's activation
    rate, t*, ...), under the member's own names; its figures are the members' (before: none at all)."""
    m = build_method({"name": "stack", "methods": ["nova", "scalekv"]})
    outs = [generate(bb, [p], m, torch.Generator().manual_seed(i))
            for i, p in enumerate(["two green circles", "a red square left of a blue triangle"])]
    summaries = [o.method_summary for o in outs]
    nova = build_method({"name": "nova"})
    want = nova.aggregate([s["members"]["nova"] for s in summaries])
    assert want and m.aggregate(summaries) == want
    recs = [{"method_summary": s} for s in summaries]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    got = [Path(p).name for p in m.report(recs, tmp_path / "a", "t")]
    alone = [Path(p).name for p in nova.report([{"method_summary": s["members"]["nova"]} for s in summaries],
                                               tmp_path / "b", "t")]
    assert alone and got == alone


class _Twin(Method):
    def __init__(self, cfg=None, name="twin", value=1.0):
        super().__init__(cfg)
        self.name, self.value = name, value

    def summary(self):
        return {"v": self.value}

    def aggregate(self, summaries):
        return {"v_mean": (sum(s["v"] for s in summaries) / len(summaries), len(summaries))}


def test_a_metric_two_members_report_is_kept_per_member():
    st = build_method({"name": "stack", "methods": []})
    st.members = [_Twin(name="a", value=1.0), _Twin(name="b", value=3.0)]
    s = {"members": {"a": {"v": 1.0}, "b": {"v": 3.0}}}
    assert st.aggregate([s, s]) == {"a.v_mean": (1.0, 2), "b.v_mean": (3.0, 2)}
