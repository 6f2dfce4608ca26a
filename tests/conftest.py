"""Shared test helpers: locate ../shared (skip with a reason when absent) and build the tiny backbone once."""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

torch.set_num_threads(2)


def shared_path(*parts) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent: golden fixtures live in ../shared beside the repo (present in CI)")
    return p


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
