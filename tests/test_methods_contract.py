"""One contract for every registered method and every method config, on the tiny model.

A new method is covered automatically once it is in ``varbench/harness/registry.py`` and ``conf/method/``; it must also add
an entry to NOOP: options under which it changes nothing (it must then be bit-identical to method=none).
"""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO
from varbench.hooks import Method
from varbench.loop import generate
from varbench.harness.registry import METHODS, build_method

NOOP = {
    "none": {},
    "nova": {"t_est": 9},                                    # t* >= 10 = T: never activates on 10 scales
    "fastvar": {"prune_ratios": {}, "skip_widths": []},
    "skipvar": {"decision_from_end": 99},                    # the decision scale is never reached
    "sparsevar": {"ratios": {}},
}
CONFIGS = sorted(p.stem for p in (REPO / "conf/method").glob("*.yaml"))


def _cfg(name: str) -> dict:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=[f"method={name}"]).method, resolve=True)


def _gen(bb, m, seed=0):
    return generate(bb, ["two green circles"], m, torch.Generator().manual_seed(seed))


def test_every_registered_method_has_a_noop_setting_and_a_config():
    assert set(METHODS) <= set(NOOP), f"add a NOOP entry for {set(METHODS) - set(NOOP)}"
    assert set(METHODS) <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_method_contract(name, tiny_backbone):
    bb = tiny_backbone
    cfg = _cfg(name)
    a, b = _gen(bb, build_method(cfg)), _gen(bb, build_method(cfg))
    assert torch.equal(a.images, b.images), "not deterministic for a seed"
    rec, S, D = a.record, len(bb.scales()), bb.spec.depth
    assert len(rec.scale_hw) == len(rec.tokens) == len(rec.kv_len) == len(rec.rows) == len(rec.scale_time_s) == S
    for si, (h, w) in enumerate(rec.scale_hw):
        assert len(rec.tokens[si]) == D and all(0 <= t <= h * w for t in rec.tokens[si])
        if si in rec.skipped_scales:
            assert rec.tokens[si] == [0.0] * D and rec.rows[si] == 0
    assert torch.isfinite(a.images).all() and a.images.shape == (1, 3, 128, 128)
    s = a.method_summary
    for si, per_layer in (s.get("tokens_claimed") or {}).items():   # what the method says it computed
        assert rec.tokens[int(si)] == per_layer, f"scale {si}"
    for si, layers in (s.get("tokens_kept") or {}).items():          # FastVAR: per (layer, branch)
        for li, ks in layers.items():
            assert rec.tokens[int(si)][int(li)] == sum(ks) / 3 + (3 - len(ks)) * rec.scale_hw[int(si)][0] * rec.scale_hw[int(si)][1] / 3
    if s.get("stop_at") is not None:                                 # SkipVAR
        assert rec.skipped_scales == list(range(s["stop_at"], S))


@pytest.mark.parametrize("key", sorted(NOOP))
def test_method_configured_to_do_nothing_is_bit_identical_to_none(key, tiny_backbone):
    ref = _gen(tiny_backbone, Method())
    m = build_method({"name": key, **NOOP[key]})
    out = _gen(tiny_backbone, m)
    assert torch.equal(out.images, ref.images)
    assert out.record.tokens == ref.record.tokens and out.record.skipped_scales == []


def test_out_of_range_ratios_are_refused():
    from varbench.errors import UserError

    for key, opts in [("fastvar", {"prune_ratios": {32: 1.2}}), ("sparsevar", {"ratios": {32: -0.1}}),
                      ("nova", {"fixed_ratios": {32: 2.0}}), ("nova", {"ratio_override": 1.5})]:
        with pytest.raises(UserError, match=r"\[0, 1\]"):
            build_method({"name": key, **opts})
