"""One run = (model, method, bench): generate images (resumable), save records and metadata.

Layout of a run directory (named by model/bench/method/overrides, never by the clock, so re-running the same
command resumes it)::

    meta.json            git sha, resolved config, package versions, command line
    images/00000.png     one file per image (written atomically: a killed run leaves no half image)
    records.jsonl        one JSON line per image: prompt, seed, per-scale times, tokens, memory, method summary
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from nova.errors import UserError
from nova.registry import build_backbone, build_method

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Item:
    index: int
    prompt: str
    seed: int
    relpath: str           # image path relative to the run's image folder


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device=cuda asked for, but torch sees no GPU; use device=cpu")
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    if dtype not in ("fp32", "bf16"):
        raise UserError(f"dtype must be fp32, bf16 or auto, got {dtype!r}")
    return device, dtype


def bench_items(bench: dict, base_seed: int) -> list[Item]:
    """Prompts x images_per_prompt; seed = base_seed + index (a fixed rule, independent of batching)."""
    prompts = list(bench.get("prompts") or [])
    if not prompts:
        raise UserError(f"bench {bench.get('name')!r} has no prompts")
    n_per = int(bench.get("images_per_prompt", 1))
    items = []
    for pi, p in enumerate(prompts):
        for j in range(n_per):
            i = pi * n_per + j
            items.append(Item(i, p, base_seed + i, f"{i:05d}.png"))
    limit = bench.get("limit")
    return items[: int(limit)] if limit else items


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "hydra", "omegaconf", "numpy"):
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001
            pass
    out["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return out


def write_meta(run_dir: Path, cfg: dict) -> None:
    meta = {"git_sha": git_sha(), "config": cfg, "versions": versions(), "argv": sys.argv}
    (run_dir / "meta.json").write_text(json.dumps(meta, indent=1, default=str))


def to_uint8(images_pm1: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] -> uint8 [B,H,W,3], truncating like the official code (spec §6.7)."""
    return ((images_pm1.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).mul(255).to(torch.uint8).cpu()


def save_png(arr_HW3: torch.Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr_HW3.numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def image_ok(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - truncated or corrupt: regenerate
        return False


def read_records(path: Path) -> dict[int, dict]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                out[int(r["index"])] = r
            except (ValueError, KeyError):
                continue  # a line cut by a killed run
    return out


def generate_items(backbone, method, items: list[Item], image_dir: Path, records_path: Path,
                   batch_size: int = 1, progress: bool = True) -> dict:
    """Generate every item whose image/record is missing; return counts. Batches share one sampling RNG."""
    from tqdm import tqdm

    from nova.loop import generate

    done = read_records(records_path)
    todo = [it for it in items if not (it.index in done and image_ok(image_dir / it.relpath))]
    if not method.batch_rectangular:
        batch_size = 1
    bar = tqdm(total=len(todo), desc=f"{backbone.spec.name}/{method.name}", disable=not progress, unit="img")
    with records_path.open("a") as f:
        for s in range(0, len(todo), batch_size):
            batch = todo[s:s + batch_size]
            rng = torch.Generator(device=backbone.device).manual_seed(batch[0].seed)
            out = generate(backbone, [it.prompt for it in batch], method, rng)
            imgs = to_uint8(out.images)
            for it, img, rec in zip(batch, imgs, out.record.per_image()):
                save_png(img, image_dir / it.relpath)
                rec.update(index=it.index, prompt=it.prompt, seed=it.seed, image=it.relpath,
                           method=method.name, method_summary=out.method_summary)
                f.write(json.dumps(rec) + "\n")
                f.flush()
            bar.update(len(batch))
    bar.close()
    return {"generated": len(todo), "reused": len(items) - len(todo)}


def run(cfg: dict, run_dir: Path) -> dict:
    """Entry point used by ``run.py`` (``cfg`` is the resolved Hydra config as a plain dict)."""
    device, dtype = resolve_device(str(cfg.get("device", "auto")), str(cfg.get("dtype", "auto")))
    method = build_method(dict(cfg["method"]))           # fail fast on names and options
    items = bench_items(cfg["bench"], int(cfg.get("seed", 0)))
    backbone = build_backbone(cfg["model"], device, dtype)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_meta(run_dir, cfg)
    image_dir = run_dir / "images"
    counts = generate_items(backbone, method, items, image_dir, run_dir / "records.jsonl",
                            int(cfg.get("batch_size", 1)), bool(cfg.get("progress", True)))
    recs = read_records(run_dir / "records.jsonl")
    times = [recs[i.index]["time_per_image_s"] for i in items if i.index in recs]
    print(f"[varbench] {len(items)} images in {image_dir} ({counts['generated']} generated, {counts['reused']} reused); "
          f"mean time/image {sum(times) / max(1, len(times)):.3f}s on {device} ({dtype})")
    return {"run_dir": str(run_dir), "image_dir": str(image_dir), **counts}
