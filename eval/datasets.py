"""Prompt sources of the benchmarks (plug-ins: one function per ``bench.source``, listed in ``eval/__init__.py``
PROMPT_SOURCES, found by the harness through the ``varbench.sources`` entry points): where each file comes from and where it is cached.

Files are looked up in ``bench.data_dir`` (default ``$VARBENCH_DATA``, else ``~/.cache/varbench/data``) under
``<source>/<file>``. ``python scripts/fetch_benchmarks.py <source>`` downloads them from the official source into
that cache and records the URL and sha256 beside them (``<file>.source.json``). Nothing is downloaded at run time:
a missing file stops the run with one line naming it and the fetch command.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from eval.shapes.world import prompt_set
from varbench.bench.prompts import Prompt
from varbench.errors import UserError

SOURCES = {  # source -> file -> official URL (pinned commits, as in shared/specs/evaluation.md)
    "geneval": {
        "evaluation_metadata.jsonl": "https://raw.githubusercontent.com/djghosh13/geneval/af4902f24d3ca90ebbb446dd9891a59e0f82725f/prompts/evaluation_metadata.jsonl",
        "object_names.txt": "https://raw.githubusercontent.com/djghosh13/geneval/af4902f24d3ca90ebbb446dd9891a59e0f82725f/prompts/object_names.txt",
    },
    "imagereward": {
        "benchmark-prompts.json": "https://raw.githubusercontent.com/THUDM/ImageReward/c1392c6dd0fd6ecd6d416c96959ab744a6d0a8fb/benchmark/benchmark-prompts.json",
    },
    "dpg_bench": {
        "prompts": "https://github.com/TencentQQGYLab/ELLA/tree/3c228f1dc6c4d3cad0a47493816151a419f14db3/dpg_bench/prompts",
        "dpg_bench.csv": "https://raw.githubusercontent.com/TencentQQGYLab/ELLA/3c228f1dc6c4d3cad0a47493816151a419f14db3/dpg_bench/dpg_bench.csv",
    },
    "hpsv2": {f"{s}.json": f"https://huggingface.co/datasets/zhwang/HPDv2/resolve/main/benchmark/{s}.json"
              for s in ("anime", "concept-art", "paintings", "photo")},
    "mjhq30k": {"meta_data.json": "https://huggingface.co/datasets/playgroundai/MJHQ-30K/resolve/main/meta_data.json"},
}


def data_dir(cfg_dir: str | None = None) -> Path:
    return Path(os.path.expanduser(cfg_dir or os.environ.get("VARBENCH_DATA", "~/.cache/varbench/data")))


def need(source: str, name: str, root: Path) -> Path:
    p = root / source / name
    if not p.exists():
        url = SOURCES.get(source, {}).get(name, "?")
        raise UserError(f"missing benchmark file {p} (official source: {url}); run `python scripts/fetch_benchmarks.py "
                        f"{source}` on a machine with internet, or set VARBENCH_DATA / bench.data_dir")
    return p


def shapes(bench: dict) -> list[Prompt]:
    """ShapesEval: generated from the shapes world, no files."""
    metas = prompt_set(int(bench.get("n_per_tag", 20)), int(bench.get("prompt_seed", 0)))
    return [Prompt(i, m["prompt"], f"{i:05d}", m) for i, m in enumerate(metas)]


def geneval(bench: dict) -> list[Prompt]:
    f = need("geneval", "evaluation_metadata.jsonl", data_dir(bench.get("data_dir")))
    metas = [_json(f, ln, n + 1) for n, ln in enumerate(f.read_text().splitlines()) if ln.strip()]
    return [Prompt(i, _field(f, m, "prompt"), f"{i:05d}", m) for i, m in enumerate(metas)]


def imagereward(bench: dict) -> list[Prompt]:
    f = need("imagereward", "benchmark-prompts.json", data_dir(bench.get("data_dir")))
    items = _json(f, f.read_text())
    return [Prompt(i, _field(f, it, "prompt"), str(_field(f, it, "id")), it) for i, it in enumerate(items)]


def dpg_bench(bench: dict) -> list[Prompt]:
    files = sorted(need("dpg_bench", "prompts", data_dir(bench.get("data_dir"))).glob("*.txt"), key=lambda p: p.stem)
    return [Prompt(i, f.read_text().strip(), f.stem) for i, f in enumerate(files)]


def hpsv2(bench: dict) -> list[Prompt]:
    out, root = [], data_dir(bench.get("data_dir"))
    for style in bench.get("styles", ["anime", "concept-art", "paintings", "photo"]):
        f = need("hpsv2", f"{style}.json", root)
        for j, p in enumerate(_json(f, f.read_text())):
            out.append(Prompt(len(out), p, f"{style}/{j:05d}", {"style": style}))
    return out


def mjhq30k(bench: dict) -> list[Prompt]:
    f = need("mjhq30k", "meta_data.json", data_dir(bench.get("data_dir")))
    meta = _json(f, f.read_text())
    cats = bench.get("categories")
    items = [(k, v) for k, v in meta.items() if not cats or v["category"] in cats]
    return [Prompt(i, v["prompt"], f"{v['category']}/{k}", v) for i, (k, v) in enumerate(items)]


def _json(path: Path, text: str, line: int | None = None):
    try:
        return json.loads(text)
    except ValueError as e:
        where = f"line {line}" if line is not None else f"line {getattr(e, 'lineno', '?')}"
        raise UserError(f"malformed prompt file {path} ({where}): {str(e).split(':')[0]}") from None


def _field(path: Path, obj, key: str):
    if not isinstance(obj, dict) or key not in obj:
        raise UserError(f"malformed prompt file {path}: an entry has no {key!r} field ({str(obj)[:60]})")
    return obj[key]
