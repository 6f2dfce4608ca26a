"""A method from outside this repository: a class, a yaml and two entry points in a package of its own.

The toy package is written into a temporary folder, installed there with pip (``--target``: nothing in the
repository or the environment changes), and put on ``PYTHONPATH``. The harness then finds its method through the
``varbench.methods`` entry point and its yaml through ``varbench.configs`` (Hydra's search path): it composes,
passes the contract suite, and runs through ``run.py`` (generate, reference, score, a table row).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO
from test_methods_contract import backbone, check_contract

from varbench.harness import registry
from varbench.hooks import Method
from varbench.loop import generate

TOY = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "toy-every-other"
        version = "0.1"

        [project.entry-points."varbench.methods"]
        every_other = "toy_every_other:EveryOther"

        [project.entry-points."varbench.configs"]
        toy_every_other = "toy_every_other.conf"

        [tool.setuptools]
        packages = ["toy_every_other", "toy_every_other.conf"]

        [tool.setuptools.package-data]
        "toy_every_other.conf" = ["method/*.yaml"]
    """,
    "toy_every_other/__init__.py": '''
        """Computes every other token of the last scale (a toy); the rest keep their input."""
        from dataclasses import dataclass

        import torch

        from varbench.hooks import Method, MethodConfig
        from varbench.tokens import Selection, keep_count


        @dataclass
        class EveryOtherConfig(MethodConfig):
            name: str = "every_other"
            family: str = "every_other"
            ratio: float = 0.5          # share of tokens NOT computed at the last scale


        class EveryOther(Method):
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
    ''',
    "toy_every_other/conf/__init__.py": "",
    "toy_every_other/conf/method/every_other.yaml": """
        defaults: [_every_other, _self_]
        name: every_other
    """,
}


@pytest.fixture(scope="module")
def toy_site(tmp_path_factory):
    """The toy package, pip-installed into a folder of its own; yields that folder (for PYTHONPATH / sys.path)."""
    src = tmp_path_factory.mktemp("toy_src")
    for rel, text in TOY.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(textwrap.dedent(text).lstrip())
    site = tmp_path_factory.mktemp("toy_site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return site


@pytest.fixture
def toy_on_path(toy_site, monkeypatch):
    monkeypatch.syspath_prepend(str(toy_site))
    registry.entry_points.cache_clear()
    yield toy_site
    registry.entry_points.cache_clear()


def test_the_toy_is_not_known_without_its_package():
    assert "every_other" not in registry.names("method")
    with pytest.raises(Exception, match="unknown method 'every_other'"):
        registry.method_class("every_other")


def test_an_installed_method_composes_and_passes_the_contract(toy_on_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from varbench.harness.cli import search_path

    assert "every_other" in registry.names("method")
    registry.register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=search_path(["method=every_other",
                                                                               "model=tiny_random"])), resolve=True)
    assert cfg["method"] == {"name": "every_other", "family": "every_other", "footnote": None, "ratio": 0.5}
    cls = registry.method_class("every_other")
    assert cls.__module__ == "toy_every_other"
    bb = backbone("tiny_random")
    check_contract(bb, lambda: registry.build_method(cfg["method"]))
    noop = registry.build_method(cfg["method"] | cls.NOOP)
    a = generate(bb, ["x"], noop, torch.Generator().manual_seed(0))
    b = generate(bb, ["x"], Method(), torch.Generator().manual_seed(0))
    assert torch.equal(a.images, b.images)


@pytest.mark.slow
def test_run_py_runs_the_installed_method_end_to_end(toy_site, tmp_path):
    """generate, reference, score, one table row: nothing in this repository knows the method."""
    env = os.environ | {"PYTHONPATH": str(toy_site), "VARBENCH_RESULTS": str(tmp_path / "res")}
    args = ["model=tiny_random", "bench.limit=1", "progress=false", "warmup=0"]
    r = subprocess.run([sys.executable, "run.py", "method=every_other", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    row = [ln for ln in r.stdout.splitlines() if ln.startswith("| tiny_random | smoke | every_other |")]
    assert row, r.stdout[-2000:]
    bad = subprocess.run([sys.executable, "run.py", "method=every_othr", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "did you mean 'every_other'" in bad.stderr, bad.stderr
