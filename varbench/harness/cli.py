"""Command line: ``python run.py ...`` and the ``varbench`` console script (the same thing).

    varbench model=<m> method=<x> bench=<b> [key=value ...]       one run
    varbench -m method=none,nova,fastvar                          a Hydra multirun (sweeps, SLURM launchers)
    varbench report [--root <results>] [--out <folder>]           the HTML report of the results store

Before Hydra sees the command line, names and values are checked so that a mistake costs one line and exit code 2:
unknown ``model=``/``method=``/``bench=``/``experiment=`` names (with a suggestion), values of the wrong type or out
of range, and the composed config -- of the single run, or of every job of a multirun (``-m``: the jobs Hydra's
basic sweeper would launch, the experiment's ``hydra.sweeper.params`` included). Paths containing ``=`` (our own run
folders) are quoted for Hydra's grammar. Ctrl-C is one line and exit code 130 (finished images are kept; the same
command resumes). ``--help`` lists the groups' names that ``model=``/``method=``/... accept (not the methods'
``_<family>`` schemas) and the composed config.
"""
from __future__ import annotations

import re
import sys
from dataclasses import fields

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from varbench.errors import UserError, did_you_mean
from varbench.harness.config import RunConfig
from varbench.harness.registry import config_dirs, register_configs
from varbench.harness.runner import prepare, resolve_device, run
from varbench.hooks import MethodConfig
from varbench.report.cli import main as report_main
from varbench.resources import conf_dir

CONF = conf_dir()
GROUPS = ("model", "method", "bench", "experiment")
PATH_KEYS = ("score_dir", "run_dir", "results_root", "model.weights_dir", "bench.data_dir")
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
INTERRUPTED = "varbench: interrupted (Ctrl-C); the images finished so far are kept: run the same command again to resume"


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
    """The config names of a group: ours (``conf/<group>``) and the installed plug-ins'. ``_<family>`` files are a
    method's schema, not a choice (``method=`` refuses them), so they are not listed."""
    return sorted({p.stem for d in [CONF, *config_dirs()] for p in (d / group).glob("*.yaml")
                   if not p.stem.startswith("_")})


HELP_TEMPLATE = """varbench: training-free acceleration of next-scale visual autoregressive generators (Hydra command line)

    varbench model=<m> method=<x> bench=<b> [key=value ...]       one run
    varbench -m method=none,nova,fastvar                          a multirun (sweeps, SLURM launchers)
    varbench report [--root <results>] [--out <folder>]           the HTML report of the results store

== Configuration groups ==
Compose your configuration from those groups (group=option)

GROUPS

== Config ==
Override anything in the config (foo.bar=value)

$CONFIG

Hydra's own options: --hydra-help"""


def help_node() -> dict:
    """Hydra's ``hydra/help`` config with the groups listed as ``check_names`` accepts them (Hydra's own listing also
    shows the ``method/_<family>`` schemas registered in its ConfigStore, which are no choice)."""
    groups = "\n".join(f"{g}: {', '.join(group_names(g))}" for g in GROUPS)
    return {"app_name": "varbench", "header": "", "footer": "",
            "template": HELP_TEMPLATE.replace("GROUPS", groups.replace("$", "$$"))}


def use_help(args: list[str]) -> list[str]:
    """``--help``/``-h``: our help page (``hydra/help=varbench``, stored in Hydra's ConfigStore)."""
    if not any(a in ("--help", "-h") for a in args) or any(a.startswith("hydra/help=") for a in args):
        return args
    ConfigStore.instance().store(group="hydra/help", name="varbench", node=help_node())
    return args + ["hydra/help=varbench"]


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
    """Compose the config once (single runs; every job of a multirun) so type/merge errors become one line before
    Hydra starts."""
    multirun = [a for a in args if a in ("-m", "--multirun")]
    if multirun and not any(a.startswith("-") and a not in multirun for a in args):
        return preflight_multirun([a for a in args if a not in multirun])
    if any(a.startswith("-") for a in args):
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


def preflight_multirun(args: list[str]) -> None:
    """Every job of a multirun composed and checked as the basic sweeper will launch it (its ``hydra.sweeper.params``,
    e.g. an experiment's, plus the command line's sweeps), through the runner's own checks (``prepare``: names,
    options, model values, bench, scorer files): the first bad job is one line naming it, before any job runs.
    Another sweeper (optuna, ...) chooses its jobs itself: only the command line is checked then."""
    job: list[str] = []
    threads = torch.get_num_threads()
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            hyd = GlobalHydra.instance().hydra
            master = hyd.compose_config("config", args, run_mode=RunMode.MULTIRUN)
            if master.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
                return
            params = [f"{k}={v}" for k, v in (master.hydra.sweeper.get("params") or {}).items()]
            parser = OverridesParser.create(config_loader=hyd.config_loader)
            jobs = [j for batch in BasicSweeper.split_arguments(
                parser.parse_overrides(params + list(master.hydra.overrides.task)), None) for j in batch]
            for job in jobs:
                cfg = hyd.config_loader.load_sweep_config(master, list(job))
                with open_dict(cfg):
                    del cfg["hydra"]
                rc = RunConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
                if not rc.score_dir:
                    prepare(rc, list(job))     # writes and loads nothing
    except UserError as e:
        _fail(f"{e}{_in_job(job)}")
    except Exception as e:  # noqa: BLE001 - Hydra/OmegaConf raise many kinds; we print their first useful lines
        _fail(f"{compose_error(e)}{_in_job(job)}")
    finally:
        torch.set_num_threads(threads)


def _in_job(job) -> str:
    return f" (in the sweep job {' '.join(job)})" if job else ""


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
        rc = RunConfig.from_dict(plain)
        note = compile_note(rc)
        if note:
            print(note, file=sys.stderr, flush=True)
        return run(rc, list(HydraConfig.get().overrides.task))
    except UserError as e:
        _fail(str(e))
    except PermissionError as e:
        _fail(f"permission denied: {e.filename} (set results_root to a writable folder)")
    except (NotADirectoryError, FileExistsError, IsADirectoryError) as e:
        _fail(f"{e.strerror}: {e.filename} (check results_root / run_dir)")


def compile_note(rc: RunConfig) -> str | None:
    """One line when ``compile=true`` will generate on the CPU: torch.compile is there for the GPU; on the CPU it was
    measured slower than eager (0.14x on the tiny model, issue 24), so the run's speed figures say little."""
    if not rc.compile or rc.stage == "score":
        return None
    device, _ = resolve_device(rc.device, rc.dtype)
    if device != "cpu":
        return None
    return ("[varbench] note: compile=true on the CPU: torch.compile targets the GPU and is usually slower than eager "
            "here (measured 0.14x on the tiny model); this run's speed figures are not what compile gives on a GPU")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:        # `varbench report [--root ...]`: the HTML report (varbench/report/), no Hydra
        raise SystemExit(report_main(argv[1:]))
    try:
        args = quote_paths(argv)
        check_names(args)
        register_configs()
        args = use_help(search_path(args))
        preflight(args)
        sys.argv = [sys.argv[0]] + args
        _task()
    except KeyboardInterrupt:   # the runner's finally blocks have released the locks; images are written atomically
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
