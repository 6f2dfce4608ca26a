"""Prompts as the harness sees them: the ``Prompt`` item every prompt source yields, and prompt rewriting.

A bench config either lists its prompts inline (``prompts: [...]``) or names a ``source``; sources are plug-ins
(``eval/datasets.py`` for the official benchmarks, found through the ``varbench.sources`` entry points), each a
function ``(bench config dict) -> list[Prompt]``. ``bench.rewrite_prompts`` then swaps in rewritten prompts.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from varbench.errors import UserError


@dataclass
class Prompt:
    index: int
    prompt: str
    key: str                      # official id / folder name (GenEval index, DPG item_id, MJHQ id, ...)
    meta: dict = field(default_factory=dict)
    original: str | None = None   # the benchmark's prompt when ``prompt`` is a rewritten one (scorers use meta)
    label: int | None = None      # class label of a class-conditional item (ImageNet): the condition passed to the
                                  # backbone instead of ``prompt`` (then only a caption)
    seed: int | None = None       # the item's own seed offset (image k of it: run seed + seed + k); None: item index


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


def inline_prompts(bench: dict) -> list[Prompt]:
    """A bench's built-in ``prompts`` list (e.g. ``bench=smoke``)."""
    return [Prompt(i, p, f"{i:05d}") for i, p in enumerate(bench["prompts"])]
