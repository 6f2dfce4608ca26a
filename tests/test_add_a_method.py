"""Adding a method is a class + a yaml + one registry line: shown with a toy method that touches no other file.

The toy method lives only in this test: its class (below), its yaml (written into a copy of ``conf/``) and one line
in a METHODS table. It then composes through Hydra, builds through the registry, passes the contract suite and runs
through the CLI's runner with its own row in the table — nothing else in the repository knows about it.
"""
import shutil
from dataclasses import dataclass

import pytest
import torch
from conftest import REPO
from test_methods_contract import backbone, check_contract

import baselines
from varbench.harness import registry
from varbench.hooks import Method, MethodConfig
from varbench.loop import generate
from varbench.tokens import Selection, keep_count


@dataclass
class EveryOtherConfig(MethodConfig):
    name: str = "every_other"
    family: str = "every_other"
    ratio: float = 0.5          # share of tokens NOT computed at the last scale


class EveryOther(Method):
    """Computes every other token of the last scale (a toy); the rest keep their input."""

    Config = EveryOtherConfig
    STATUS = "toy (tests only)"
    NOOP = {"ratio": 0.0}

    def select(self, lctx, x):
        if lctx.si != lctx.scale.num_scales - 1:
            return None
        n = x.shape[1]
        k = keep_count(n, self.cfg.ratio)
        if k >= n:
            return None
        self.claim(lctx, k)
        return Selection(torch.arange(n)[None, :: max(1, n // max(k, 1))][:, :k], n)


@pytest.fixture
def registered(monkeypatch, tmp_path):
    import sys
    import types

    mod = types.ModuleType("toy_every_other")
    mod.EveryOther = EveryOther
    monkeypatch.setitem(sys.modules, "toy_every_other", mod)
    # the one registry line (a METHODS table, as in baselines/__init__.py)
    monkeypatch.setitem(baselines.METHODS, "every_other", "toy_every_other:EveryOther")
    monkeypatch.setitem(registry.METHODS, "every_other", "toy_every_other:EveryOther")
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "method/every_other.yaml").write_text("defaults: [_every_other, _self_]\nname: every_other\n")
    registry.register_configs()
    return conf


def _compose(conf):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(conf), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=["method=every_other", "model=tiny_random"]),
                                      resolve=True)


def test_a_new_method_needs_only_class_yaml_and_registry_line(registered):
    cfg = _compose(registered)
    assert cfg["method"] == {"name": "every_other", "family": "every_other", "footnote": None, "ratio": 0.5}
    bb = backbone("tiny_random")
    check_contract(bb, lambda: registry.build_method(cfg["method"]))
    noop = registry.build_method(cfg["method"] | EveryOther.NOOP)
    a = generate(bb, ["x"], noop, torch.Generator().manual_seed(0))
    b = generate(bb, ["x"], Method(), torch.Generator().manual_seed(0))
    assert torch.equal(a.images, b.images)


@pytest.mark.slow
def test_the_runner_takes_the_new_method_end_to_end(registered, tmp_path):
    """generate, reference, score, one table row: nothing else in the repository knows the method."""
    from varbench.harness.runner import run

    cfg = _compose(registered)
    cfg |= {"results_root": str(tmp_path / "res"), "progress": False, "warmup": 0, "bench": cfg["bench"] | {"limit": 1}}
    out = run(cfg, ["method=every_other", "model=tiny_random"])
    assert out["metrics"]["tokens_frac"][0] < 1.0
