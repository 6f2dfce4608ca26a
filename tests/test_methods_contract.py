"""One contract for every method config in ``conf/method/`` on every tiny backbone — no per-method entry here.

Each method declares its facts next to its code (``varbench/hooks.py``: NOOP, FAMILIES, claims); this suite checks
them: it runs, is deterministic, its records are complete, the tokens it claims equal the tokens the loop measured,
and its NOOP setting is bit-identical to ``method=none``.
"""
import pytest
import torch
from conftest import REPO, compose_method, contract_models

from varbench.errors import UserError
from varbench.harness.registry import build_backbone, build_method, method_class, names
from varbench.hooks import Method
from varbench.loop import generate

METHODS = names("method")

CONFIGS = sorted(p.stem for p in (REPO / "conf/method").glob("*.yaml"))
MODELS = contract_models()
_BACKBONES: dict = {}


def backbone(model: str):
    if model not in _BACKBONES:
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(REPO / f"conf/model/{model}.yaml"), resolve=True)
        _BACKBONES[model] = build_backbone(cfg, "cpu", "fp32")
    return _BACKBONES[model]


def _gen(bb, m, seed=0):   # the generator on the backbone's device (tests/test_gpu.py runs this contract on CUDA)
    cond = "two green circles" if bb.spec.conditioning == "text" else 3   # a prompt, or a class label (VAR)
    return generate(bb, [cond], m, torch.Generator(device=bb.device).manual_seed(seed))


def check_contract(bb, make) -> None:
    """``make()`` builds a fresh method. Shared by the suite and by the add-a-method test."""
    m1, m2 = make(), make()
    a, b = _gen(bb, m1), _gen(bb, m2)
    assert torch.equal(a.images, b.images), "not deterministic for a seed"
    rec, S, D = a.record, len(bb.scales()), bb.spec.depth
    assert len(rec.scale_hw) == len(rec.tokens) == len(rec.kv_len) == len(rec.rows) == len(rec.scale_time_s) == S
    units = 1 if m1.granularity == "block" else len(bb.spec.branches)
    for si in range(S):
        n = rec.scale_n[si]
        assert len(rec.tokens[si]) == D and all(0 <= t <= n for t in rec.tokens[si])
        if si in rec.skipped_scales:
            assert rec.tokens[si] == [0.0] * D and rec.rows[si] == 0
            continue
        for li in range(D):   # what the method says it computed == what the loop measured
            ks = m1.claims.get((si, li), [])
            assert len(ks) <= units, (si, li, ks)
            assert rec.tokens[si][li] == (sum(ks) + (units - len(ks)) * n) / units, (si, li, ks)
    assert sorted(m1.claimed_skips) == rec.skipped_scales
    assert torch.isfinite(a.images).all() and a.images.ndim == 4
    assert isinstance(a.method_summary, dict)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", CONFIGS)
def test_method_contract(name, model):
    cfg = compose_method(name)
    cls = method_class(cfg.get("family") or cfg["name"])
    bb = backbone(model)
    if cls.FAMILIES is not None and bb.spec.family not in cls.FAMILIES:
        pytest.skip(f"{name} declares FAMILIES={cls.FAMILIES} (the runner refuses {bb.spec.family} in one line)")
    try:
        check_contract(bb, lambda: build_method(cfg))
    except UserError as e:   # a config made for another model's widths (fastvar_var's cache scale): one line, named
        if "\n" in str(e) or "made for this model" not in str(e):
            raise
        pytest.skip(f"{name} refuses {model} in one line: {e}")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("family", sorted(METHODS))
def test_noop_setting_is_bit_identical_to_none(family, model):
    cls = method_class(family)
    bb = backbone(model)
    if cls.FAMILIES is not None and bb.spec.family not in cls.FAMILIES:
        pytest.skip(f"{family} does not support {bb.spec.family}")
    ref = _gen(bb, Method())
    out = _gen(bb, build_method({"name": family, "family": family, **cls.NOOP}))
    assert torch.equal(out.images, ref.images)
    assert out.record.tokens == ref.record.tokens and out.record.skipped_scales == []


def test_every_method_family_has_a_config():
    fams = {compose_method(n).get("family") for n in CONFIGS}
    assert set(METHODS) <= fams, f"no conf/method/*.yaml for {set(METHODS) - fams}"


def test_out_of_range_ratios_are_refused():
    from varbench.errors import UserError

    for key, opts in [("fastvar", {"prune_ratios": {32: 1.2}}), ("sparsevar", {"ratios": {32: -0.1}}),
                      ("nova", {"fixed_ratios": {32: 2.0}}), ("nova", {"ratio_override": 1.5}),
                      ("fastvar", {"prune_ratios": {32: "half"}})]:
        with pytest.raises(UserError, match=r"\[0, 1\]"):
            build_method({"name": key, **opts})


def test_unknown_method_option_is_one_line_with_a_suggestion():
    from varbench.errors import UserError

    with pytest.raises(UserError, match=r"no option 'alpah'.*did you mean 'alpha'"):
        build_method({"name": "nova", "alpah": 0.3})


def test_a_schedule_mismatch_is_one_line_before_anything_runs():
    """fastvar_hart (cache side 36) on a schedule without 36 used to die mid-run with a RuntimeError."""
    from varbench.errors import UserError

    bb = backbone("tiny_random")
    m = build_method(compose_method("fastvar") | {"prune_ratios": {32: 0.5}, "cache_width": 36})
    with pytest.raises(UserError, match=r"cache width 36 is not an earlier scale"):
        m.check_schedule(bb.scales())
