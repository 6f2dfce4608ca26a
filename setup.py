"""Packaging detail pyproject.toml cannot express: ship the top-level ``conf/`` and ``results/paper/`` inside the
wheel as ``varbench/conf`` and ``varbench/paper`` (varbench/resources.py finds either)."""
from setuptools import find_packages, setup

CONF = ["varbench.conf"] + [f"varbench.conf.{g}" for g in ("model", "method", "bench", "experiment")]
setup(
    packages=find_packages(include=["varbench*", "nova*", "baselines*", "eval*"]) + CONF + ["varbench.paper",
                                                                                            "varbench.conf.hydra.launcher"],
    package_dir={"varbench.conf": "conf", "varbench.paper": "results/paper"},
    package_data={"varbench.conf": ["*.yaml"], "varbench.conf.model": ["*.yaml"], "varbench.conf.method": ["*.yaml"],
                  "varbench.conf.bench": ["*.yaml"], "varbench.conf.experiment": ["*.yaml"],
                  "varbench.conf.hydra.launcher": ["*.yaml"], "varbench.paper": ["*.csv", "*.md"],
                  "varbench.backbones.infinity": ["weights/*/*.safetensors", "weights/*/*.json", "weights/*/*.md"],
                  "baselines": ["data/*.json"], "varbench.report": ["templates/*.html", "templates/*.css"]},
    include_package_data=False,
)
