"""Benchmark prompt sets: where each file comes from, where it is cached, and how a bench becomes items.

Files are looked up in ``bench.data_dir`` (default ``$VARBENCH_DATA``, else ``~/.cache/varbench/data``) under
``<source>/<file>``. ``python scripts/fetch_benchmarks.py <source>`` downloads them from the official source into
that cache and records the URL and sha256 beside them (``<file>.source.json``). Nothing is downloaded at run time:
a missing file stops the run with one line naming it and the fetch command.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from eval.shapes.world import prompt_set
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


@dataclass
class Prompt:
    index: int
    prompt: str
    key: str                      # official id / folder name (GenEval index, DPG item_id, MJHQ id, ...)
    meta: dict = field(default_factory=dict)
    original: str | None = None   # the benchmark's prompt when ``prompt`` is a rewritten one (scorers use meta)


def load_rewrites(path) -> dict[str, str]:
    """A prompt-rewrite file: a JSON object {benchmark prompt: rewritten prompt}, the format of Infinity's
    ``evaluation/gen_eval/prompt_rewrite_cache.json``. A value still in the rewriter's raw output format
    ``<prompt:...><cfg:...>`` is reduced to its prompt field, as Infinity's ``extract_key_val`` does."""
    if not path:
        raise UserError("bench.rewrite_prompts=true needs bench.rewrite_prompts_file (a JSON {prompt: rewritten})")
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise UserError(f"missing prompt-rewrite file {p} (bench.rewrite_prompts_file; Infinity's "
                        f"evaluation/gen_eval/prompt_rewrite_cache.json format: a JSON object prompt -> rewritten)")
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise UserError(f"prompt-rewrite file {p} is not JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise UserError(f"prompt-rewrite file {p} must be a JSON object mapping prompt strings to prompt strings")
    out = {}
    for k, v in data.items():
        kv = {a: b.lstrip() for a, b in re.findall(r"<(.+?):(.+?)>", v)}
        out[k] = kv.get("prompt", v)
    return out


def apply_rewrites(bench: dict, prompts: list[Prompt]) -> list[Prompt]:
    """``bench.rewrite_prompts``: generate from the rewritten prompts of ``bench.rewrite_prompts_file`` (Infinity's
    ``--rewrite_prompt 1`` with its cache); metadata (what the scorers read) keeps the benchmark prompt. Every
    prompt must be in the file: we never call a rewriting model."""
    if not bench.get("rewrite_prompts"):
        return prompts
    table = load_rewrites(bench.get("rewrite_prompts_file"))
    missing = [p.prompt for p in prompts if p.prompt not in table]
    if missing:
        raise UserError(f"{len(missing)} prompt(s) are not in {bench.get('rewrite_prompts_file')}, e.g. "
                        f"{missing[0]!r}")
    return [Prompt(p.index, table[p.prompt], p.key, p.meta, p.prompt) for p in prompts]


def load_prompts(bench: dict) -> list[Prompt]:
    """The prompt list of a bench config (built-in ``prompts`` or an official ``source``), rewritten when
    ``bench.rewrite_prompts`` is on."""
    return apply_rewrites(bench, _load_prompts(bench))


def _load_prompts(bench: dict) -> list[Prompt]:
    if bench.get("prompts"):
        return [Prompt(i, p, f"{i:05d}") for i, p in enumerate(bench["prompts"])]
    src = bench.get("source")
    if src == "shapes":  # generated: no files

        metas = prompt_set(int(bench.get("n_per_tag", 20)), int(bench.get("prompt_seed", 0)))
        return [Prompt(i, m["prompt"], f"{i:05d}", m) for i, m in enumerate(metas)]
    root = data_dir(bench.get("data_dir"))
    if src == "geneval":
        f = need("geneval", "evaluation_metadata.jsonl", root)
        metas = [_json(f, ln, n + 1) for n, ln in enumerate(f.read_text().splitlines()) if ln.strip()]
        return [Prompt(i, _field(f, m, "prompt"), f"{i:05d}", m) for i, m in enumerate(metas)]
    if src == "imagereward":
        f = need("imagereward", "benchmark-prompts.json", root)
        items = _json(f, f.read_text())
        return [Prompt(i, _field(f, it, "prompt"), str(_field(f, it, "id")), it) for i, it in enumerate(items)]
    if src == "dpg_bench":
        files = sorted(need("dpg_bench", "prompts", root).glob("*.txt"), key=lambda p: p.stem)
        return [Prompt(i, f.read_text().strip(), f.stem) for i, f in enumerate(files)]
    if src == "hpsv2":
        out = []
        for style in bench.get("styles", ["anime", "concept-art", "paintings", "photo"]):
            f = need("hpsv2", f"{style}.json", root)
            for j, p in enumerate(_json(f, f.read_text())):
                out.append(Prompt(len(out), p, f"{style}/{j:05d}", {"style": style}))
        return out
    if src == "mjhq30k":
        f = need("mjhq30k", "meta_data.json", root)
        meta = _json(f, f.read_text())
        cats = bench.get("categories")
        items = [(k, v) for k, v in meta.items() if not cats or v["category"] in cats]
        return [Prompt(i, v["prompt"], f"{v['category']}/{k}", v) for i, (k, v) in enumerate(items)]
    raise UserError(f"bench {bench.get('name')!r} has neither prompts nor a known source (got {src!r}; known: "
                    f"{', '.join(SOURCES)})")


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
