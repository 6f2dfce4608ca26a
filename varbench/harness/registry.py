"""Names -> classes and functions, found through Python entry points (``importlib.metadata``), imported lazily.

  group                   what                                      our plug-ins declare them in (the one place to edit)
  ``varbench.methods``    method family -> ``Method`` subclass      ``nova/__init__.py``, ``baselines/__init__.py`` METHODS
  ``varbench.backbones``  backbone family -> builder                ``varbench/backbones/__init__.py`` BACKBONES
  ``varbench.metrics``    metric -> ``run(bench, images, out, dev)`` ``eval/__init__.py`` METRICS
  ``varbench.sources``    ``bench.source`` -> ``(bench) -> prompts`` ``eval/__init__.py`` PROMPT_SOURCES
  ``varbench.configs``       a package whose folder holds Hydra groups (``method/<name>.yaml``, ...): added to the
                          config search path (third-party plug-ins; ours live in ``conf/``)

``pyproject.toml`` declares the entry points; ``python scripts/entry_points.py --write`` regenerates them from the
tables and ``tests/test_entry_points.py`` fails when the two disagree. A third-party package adds a method with a
class, a yaml and two entry points (``varbench.methods`` and ``varbench.configs``), nothing in this repository.
The harness never imports a plug-in package by name: ``method=none`` (the core ``Method``) is the only built-in.

Unknown names fail with one line and a suggestion (``UserError``), before anything heavy is loaded.
``register_configs()`` stores every method's ``Config`` dataclass as the Hydra schema ``method/_<family>`` and
``RunConfig`` as ``_run`` (the schema of ``conf/config.yaml``), so yamls only override defaults.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import fields
from importlib import metadata, resources
from pathlib import Path

from hydra.core.config_store import ConfigStore

from varbench.errors import UserError, did_you_mean
from varbench.harness.config import RunConfig
from varbench.hooks import Method
from varbench.resources import REPO
from varbench.stack import Stack

GROUPS = {"method": "varbench.methods", "backbone family": "varbench.backbones", "metric": "varbench.metrics",
          "prompt source": "varbench.sources"}
BUILTIN = {"varbench.methods": {"none": Method, "stack": Stack}}   # stack: members built by build_method


@functools.cache
def entry_points(group: str) -> dict[str, metadata.EntryPoint]:
    """name -> entry point of one group, over every installed distribution."""
    return {ep.name: ep for ep in metadata.entry_points(group=group)}


def names(kind: str) -> list[str]:
    group = GROUPS[kind]
    return sorted(set(entry_points(group)) | set(BUILTIN.get(group, {})))


def _declared_in_checkout(group: str, name: str) -> bool:
    """Is ``name`` declared for ``group`` in this checkout's pyproject.toml (but not installed: stale metadata)?"""
    toml = REPO / "pyproject.toml"
    if not toml.is_file():
        return False
    text = toml.read_text()
    head = f'[project.entry-points."{group}"]'
    if head not in text:
        return False
    section = text.split(head, 1)[1].split("\n[", 1)[0]
    return any(line.split("=", 1)[0].strip().strip('"') == name for line in section.splitlines() if "=" in line)


def load(kind: str, name: str):
    """The object named ``name`` in the group of ``kind`` (one line if unknown)."""
    group = GROUPS[kind]
    if name in BUILTIN.get(group, {}):
        return BUILTIN[group][name]
    eps = entry_points(group)
    if name not in eps:
        known = names(kind)
        hint = (f"; it is declared in {REPO / 'pyproject.toml'} but not installed: run `pip install -e .` again"
                if _declared_in_checkout(group, name) else "")
        raise UserError(f"unknown {kind} {name!r}{did_you_mean(name, known)}; known: {', '.join(known)}{hint}")
    return eps[name].load()


def method_class(family: str) -> type[Method]:
    return load("method", family)


def method_family(node: dict) -> str:
    """The registry name of a method config node: its ``family``, or its ``name`` where the yaml is the family's."""
    return str(node["family"] if node.get("family") else node["name"])


def model_family(node: dict) -> str:
    """The backbone family of a model config node (every ``conf/model/*.yaml`` names one)."""
    if not node.get("family"):
        raise UserError(f"model {node.get('name')!r} names no backbone family (add `family: <one of "
                        f"{', '.join(names('backbone family'))}>` to its yaml)")
    return str(node["family"])


def build_method(node: dict) -> Method:
    """``node``: the ``method`` config node as a dict; ``family`` picks the class (default: ``name``), the other
    keys are the fields of its ``Config`` dataclass (validated there, one-line errors)."""
    family = method_family(node)
    node = dict(node, family=family)
    cls = method_class(family)
    known = {f.name for f in fields(cls.Config)}
    unknown = sorted(set(node) - known)
    if unknown:
        raise UserError(f"method {family!r} has no option {unknown[0]!r}{did_you_mean(unknown[0], known)}; "
                        f"options: {', '.join(sorted(known - {'name', 'family', 'footnote'}))}")
    try:
        if issubclass(cls, Stack):     # its members are built here, by name (core code imports no plug-in)
            return cls(cls.Config(**node), build=build_method)
        return cls(cls.Config(**node))
    except TypeError as e:
        raise UserError(f"bad options for method {family!r}: {e}") from None


def metric_fn(name: str):
    return load("metric", name)


def metric_check(name: str):
    """The metric's ``check(bench)`` (its module's: the files the scorer needs, resolved without loading them), or
    None where the metric needs no files."""
    return getattr(importlib.import_module(metric_fn(name).__module__), "check", None)


def prompt_source(name: str):
    return load("prompt source", name)


def backbone_builder(family: str):
    return load("backbone family", family)


def check_model(model: dict) -> None:
    """Every field of a model config node, by its family's ``check_config`` (the builder's module; one-line errors,
    before anything is written or built). Families without one are checked when built."""
    check = getattr(importlib.import_module(backbone_builder(model_family(model)).__module__), "check_config", None)
    if check is not None:
        check(model)


def build_backbone(model: dict, device: str, dtype: str, compile: bool = False):
    """The backbone of a model config node; ``compile=True`` (opt-in ``torch.compile`` of the blocks) where the
    family's builder offers it (a ``compile`` parameter: Infinity), else a one-line error."""
    builder = backbone_builder(model_family(model))
    if compile:
        check_compile(model)
    return builder(model, device=device, dtype=dtype, **({"compile": True} if compile else {}))


def check_compile(model: dict) -> None:
    """One line unless the model's backbone builder takes ``compile`` (Infinity; not HART)."""
    family = model_family(model)
    if "compile" not in inspect.signature(backbone_builder(family)).parameters:
        raise UserError(f"compile=true is implemented for Infinity backbones; model "
                        f"{model['name']!r} is {family!r} (run it with compile=false)")


def config_dirs() -> list[Path]:
    """Folders of Hydra config groups contributed by installed plug-ins (``varbench.configs`` entry points)."""
    out = []
    for ep in entry_points("varbench.configs").values():
        try:
            out.append(Path(str(resources.files(ep.value))))
        except (ModuleNotFoundError, TypeError) as e:
            raise UserError(f"config entry point {ep.name!r} names {ep.value!r}, which cannot be imported ({e})") from None
    return out


def register_configs() -> None:
    """Hydra schemas: ``_run`` (RunConfig, the schema of config.yaml) and ``method/_<family>`` from each method's
    Config dataclass (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="_run", node=RunConfig)
    for family in names("method"):
        cs.store(group="method", name=f"_{family}", node=method_class(family).Config)
