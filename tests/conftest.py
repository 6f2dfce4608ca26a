"""Shared test helpers: locate ../shared (skip with a reason when absent), compose configs, build tiny backbones."""
from pathlib import Path

import pytest
import torch

from varbench.harness.registry import register_configs

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

torch.set_num_threads(2)
register_configs()


def shared_path(*parts) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent: golden fixtures live in ../shared beside the repo (present in CI)")
    return p


def compose(*overrides: str) -> dict:
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_container(hcompose("config", overrides=list(overrides)), resolve=True)


def compose_method(name: str) -> dict:
    return compose(f"method={name}")["method"]


def contract_models() -> list[str]:
    """The seeded tiny backbones every method runs on (one per family that has one)."""
    return [m for m in ("tiny_random", "hart_tiny_random", "var_tiny_random") if (REPO / f"conf/model/{m}.yaml").exists()]


@pytest.fixture(scope="session")
def tiny_cfg():
    """The seeded-random tiny model (official 0.25M schedule, 128 px): unit and contract tests need no trained
    weights and exercise the official schedule. The trained default ``model=tiny`` has its own tests."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/tiny_random.yaml"), resolve=True)


@pytest.fixture(scope="session")
def trained_tiny_cfg():
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/tiny.yaml"), resolve=True)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_cfg):
    from varbench.harness.registry import build_backbone

    return build_backbone(tiny_cfg, "cpu", "fp32")
