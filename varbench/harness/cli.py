"""Command line: ``python run.py ...`` and the ``varbench`` console script (the same thing).

    varbench model=<m> method=<x> bench=<b> [key=value ...]       one run
    varbench -m method=none,nova,fastvar                          a Hydra multirun (sweeps, SLURM launchers)
    varbench report [--root <results>] [--out <folder>]           the HTML report of the results store

Before Hydra sees the command line, names and values are checked so that a mistake costs one line and exit code 2:
unknown ``model=``/``method=``/``bench=``/``experiment=`` names (with a suggestion), values of the wrong type or out
of range, and the composed config. Paths containing ``=`` (our own run folders) are quoted for Hydra's grammar.
"""
from __future__ import annotations

import re
import sys
from dataclasses import fields

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from varbench.errors import UserError, did_you_mean
from varbench.harness.config import RunConfig
from varbench.harness.registry import config_dirs, register_configs
from varbench.harness.runner import run
from varbench.hooks import MethodConfig
from varbench.report.cli import main as report_main
from varbench.resources import conf_dir

CONF = conf_dir()
GROUPS = ("model", "method", "bench", "experiment")
PATH_KEYS = ("score_dir", "run_dir", "results_root", "model.weights_dir", "bench.data_dir")


def _fail(msg: str) -> None:
    print(f"varbench: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def quote_paths(args: list[str]) -> list[str]:
    """``score_dir=a/b=c`` -> ``score_dir='a/b=c'`` (Hydra's override grammar reads an unquoted '=' as an error)."""
    out = []
    for a in args:
        key, eq, val = a.partition("=")
        if eq and key.lstrip("+~") in PATH_KEYS and "=" in val and not val.startswith(("'", '"')):
            a = f"{key}='{val}'"
        out.append(a)
    return out


def search_path(args: list[str]) -> list[str]:
    """``args`` plus a ``hydra.searchpath`` override naming the config folders of installed plug-ins, if any."""
    dirs = config_dirs()
    if not dirs or any(a.startswith("hydra.searchpath=") for a in args):
        return args
    return args + ["hydra.searchpath=[" + ",".join(f"'file://{d}'" for d in dirs) + "]"]


def group_names(group: str) -> list[str]:
    """The config names of a group: ours (``conf/<group>``) and the installed plug-ins'."""
    return sorted({p.stem for d in [CONF, *config_dirs()] for p in (d / group).glob("*.yaml")})


def check_names(args: list[str]) -> None:
    for a in args:
        key, eq, val = a.partition("=")
        group = key.lstrip("+~")
        if not eq or group not in GROUPS:
            continue
        names = group_names(group)
        for v in re.split(r",", val.strip("'\"")):
            v = v.strip()
            if v and v not in names and not v.startswith(("glob(", "choice(", "range(")):
                _fail(f"unknown {group} {v!r}{did_you_mean(v, names)}; known: {', '.join(names)}")


def preflight(args: list[str]) -> None:
    """Compose the config once (single runs) so type/merge errors become one line before Hydra starts."""
    if any(a in ("-m", "--multirun") for a in args) or any(a.startswith("-") for a in args):
        return
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=args)
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # noqa: BLE001 - Hydra/OmegaConf raise many kinds; we print their first useful lines
        _fail(compose_error(e))
    try:
        RunConfig.from_dict(plain)
    except UserError as e:
        _fail(str(e))


def compose_error(e: BaseException) -> str:
    """One line from a Hydra/OmegaConf composition error: what was wrong, with the cause and a suggestion."""
    text = str(e) + ("\n" + str(e.__cause__) if e.__cause__ else "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("full_key", "object_type", "reference_type", "To append"))]
    conv = re.search(r"Value '(.*?)' (?:of type '\w+' )?could not be converted to (\w+)", text) or \
        re.search(r"Value '(.*?)' is not a valid (bool)", text)
    if conv:
        full = re.search(r"full_key: ([\w.]+)", text)
        kind = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "bool": "true or false"}.get(conv.group(2),
                                                                                              conv.group(2))
        return f"{full.group(1) if full else 'a value'} must be {kind}, got {conv.group(1)!r}"
    missing = re.search(r"Key '([^']+)' not in '(\w+)'", text)
    if missing:
        key, where = missing.groups()
        full = re.search(r"full_key: ([\w.]+)", text)
        group = full.group(1).rpartition(".")[0] if full else ""
        known = _known_options(group, text)
        return f"{(group + '.') if group else ''}{key} is not an option of {where}{did_you_mean(key, known)}"
    return ": ".join(dict.fromkeys(useful[:2])) or type(e).__name__


def _known_options(group: str, text: str) -> list[str]:
    if group == "":
        return [f.name for f in fields(RunConfig)]
    if group != "method":
        return []
    classes = {c.__name__: c for c in _subclasses(MethodConfig)}
    m = re.search(r"object_type=(\w+)", text)
    cls = classes.get(m.group(1)) if m else None
    return [f.name for f in fields(cls)] if cls else []


def _subclasses(cls) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub] + _subclasses(sub)
    return out


@hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")
def _task(cfg: DictConfig):
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
        return run(RunConfig.from_dict(plain), list(HydraConfig.get().overrides.task))
    except UserError as e:
        _fail(str(e))
    except PermissionError as e:
        _fail(f"permission denied: {e.filename} (set results_root to a writable folder)")
    except (NotADirectoryError, FileExistsError, IsADirectoryError) as e:
        _fail(f"{e.strerror}: {e.filename} (check results_root / run_dir)")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:        # `varbench report [--root ...]`: the HTML report (varbench/report/), no Hydra
        raise SystemExit(report_main(argv[1:]))
    args = quote_paths(argv)
    check_names(args)
    register_configs()
    args = search_path(args)
    preflight(args)
    sys.argv = [sys.argv[0]] + args
    _task()


if __name__ == "__main__":
    main()
