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

from varbench.errors import UserError
from varbench.harness.registry import build_backbone, build_method

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
    """Prompts x images_per_prompt in the bench's file layout; seed = base_seed + item index (a fixed rule,
    independent of batching, resumable; the official GenEval script draws its 4 samples sequentially instead)."""
    from eval.datasets import load_prompts
    from eval.layouts import relpath

    prompts = load_prompts(bench)
    if not prompts:
        raise UserError(f"bench {bench.get('name')!r} has no prompts")
    limit = bench.get("limit")
    prompts = prompts[: int(limit)] if limit else prompts
    n_per, layout = int(bench.get("images_per_prompt", 1)), bench.get("layout", "flat")
    items = []
    for p in prompts:
        for k in range(n_per):
            i = len(items)
            items.append(Item(i, p.prompt, base_seed + i, relpath(layout, p.key, p.index, k, n_per)))
    return items


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


def save_image(arr_HW3: torch.Tensor, path: Path) -> None:
    """PNG, or JPEG (quality 95, cv2's default, as the official scripts save) for a .jpg path; atomic."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    jpg = path.suffix.lower() in (".jpg", ".jpeg")
    Image.fromarray(arr_HW3.numpy()).save(tmp, format="JPEG" if jpg else "PNG", **({"quality": 95} if jpg else {}))
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

    from varbench.loop import generate

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
                save_image(img, image_dir / it.relpath)
                rec.update(index=it.index, prompt=it.prompt, seed=it.seed, image=it.relpath,
                           method=method.name, method_summary=out.method_summary)
                f.write(json.dumps(rec) + "\n")
                f.flush()
            bar.update(len(batch))
    bar.close()
    return {"generated": len(todo), "reused": len(items) - len(todo)}


def _finalize_layout(bench: dict, image_dir: Path) -> None:
    from eval.datasets import load_prompts
    from eval.layouts import finalize

    prompts = load_prompts(bench)
    limit = bench.get("limit")
    finalize(bench.get("layout", "flat"), image_dir, prompts[: int(limit)] if limit else prompts,
             int(bench.get("images_per_prompt", 1)))


def reference_dir(run_dir: Path) -> Path:
    """The unpruned run with the same model, bench and non-method overrides: <root>/<model>/<bench>/none/<tag>."""
    keep = [kv for kv in run_dir.name.split(",") if kv and not kv.startswith("method.")]
    return run_dir.parent.parent / "none" / (",".join(keep) or "default")


def _warmup(backbone, method, items, n: int) -> None:
    """Untimed generations so one-off costs (allocator, kernel selection) do not enter the first latency."""
    from varbench.loop import generate

    for it in items[:n]:
        generate(backbone, [it.prompt], method, torch.Generator(device=backbone.device).manual_seed(it.seed))


def score_run(cfg: dict, run_dir: Path, backbone, method_name: str, ref_dir: Path | None) -> dict:
    """Speed/fidelity metrics against the reference -> metrics.json + rows in the results store + plot."""
    from eval import store
    from eval.plots import plot_entropy_activation
    from eval.speed import run_metrics

    recs = read_records(run_dir / "records.jsonl")
    if not recs:
        raise UserError(f"no generated images in {run_dir}: run stage=generate first")
    ref = read_records(ref_dir / "records.jsonl") if ref_dir is not None else None
    if method_name == "none":  # the reference itself: speedup 1 by definition, no fidelity to itself
        ref, ref_dir = recs, None
    root = Path(cfg["results_root"]).resolve()
    base = {"run": str(run_dir.relative_to(root)) if run_dir.is_relative_to(root) else str(run_dir),
            "model": cfg["model"]["name"], "method": method_name, "bench": cfg["bench"]["name"],
            "overrides": run_dir.name, "git_sha": git_sha()}
    metrics: dict = {}

    def save(new: dict) -> None:
        metrics.update(new)
        (run_dir / "metrics.json").write_text(json.dumps({k: {"value": v, "n": n} for k, (v, n) in metrics.items()}, indent=1))
        store.append_rows(root, [base | {"metric": k, "value": v, "n": n} for k, (v, n) in new.items() if v is not None])

    save(run_metrics(recs, backbone.spec, ref, run_dir / "images", ref_dir / "images" if ref_dir else None))
    plot_entropy_activation(list(recs.values()), run_dir / "entropy_activation.png",
                            f"{cfg['model']['name']} / {method_name} / {cfg['bench']['name']}")
    save(bench_metrics(cfg, run_dir, len(recs)))     # after speed/fidelity are stored: a scorer error loses nothing
    return metrics


def bench_metrics(cfg: dict, run_dir: Path, n: int) -> dict[str, tuple[float, int]]:
    """The bench's quality metrics (``bench.metrics``: GenEval, ...), each from its scorer in ``eval/``."""
    from varbench.harness.registry import metric_fn

    out = {}
    for name in cfg["bench"].get("metrics") or []:
        values = metric_fn(name)(cfg["bench"], run_dir / "images", run_dir, str(cfg.get("device", "cpu")))
        out.update({k: (v, n) for k, v in values.items()})
    return out


def score_external(cfg: dict, folder: Path) -> dict:
    """``stage=score score_dir=<folder>``: the bench's quality metrics on images made elsewhere (same layout)."""
    from eval import store

    if not folder.is_dir():
        raise UserError(f"score_dir {folder} is not a folder")
    values = {}
    for name in cfg["bench"].get("metrics") or []:
        from varbench.harness.registry import metric_fn

        values.update(metric_fn(name)(cfg["bench"], folder, folder, str(cfg.get("device", "cpu"))))
    base = {"run": str(folder), "model": cfg.get("score_model") or "external", "method": cfg["method"]["name"],
            "bench": cfg["bench"]["name"], "overrides": "default", "git_sha": git_sha()}
    store.append_rows(Path(cfg["results_root"]).resolve(), [base | {"metric": k, "value": v, "n": None} for k, v in values.items()])
    print(json.dumps(values, indent=1))
    return {"metrics": values}


def print_table(cfg: dict) -> str:
    from eval import store, tables

    w = tables.wide(store.load(Path(cfg["results_root"])), cfg["model"]["name"], cfg["bench"]["name"])
    quality = tables.quality_columns(w, list(cfg["bench"].get("metrics") or [])) if len(w) else []
    text = tables.markdown(w, quality=quality) if len(w) else "(no results yet)"
    print(text)
    return text


def run(cfg: dict, run_dir: Path) -> dict:
    """Entry point used by ``run.py`` (``cfg`` is the resolved Hydra config as a plain dict)."""
    from varbench.hooks import Method

    device, dtype = resolve_device(str(cfg.get("device", "auto")), str(cfg.get("dtype", "auto")))
    stage = str(cfg.get("stage", "all"))
    if stage not in ("generate", "score", "all"):
        raise UserError(f"stage must be generate, score or all, got {stage!r}")
    if cfg.get("score_dir"):                             # score a finished folder (ours or anyone's), no generation
        return score_external(cfg, Path(cfg["score_dir"]))
    method = build_method(dict(cfg["method"]))           # fail fast on names and options
    items = bench_items(cfg["bench"], int(cfg.get("seed", 0)))
    backbone = build_backbone(cfg["model"], device, dtype)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_meta(run_dir, cfg)
    bs, prog = int(cfg.get("batch_size", 1)), bool(cfg.get("progress", True))
    use_ref = method.name != "none" and bool(cfg.get("reference", True))
    ref_dir = reference_dir(run_dir) if use_ref else None
    counts = {"generated": 0, "reused": len(items)}
    if stage in ("generate", "all"):
        _warmup(backbone, method, items, int(cfg.get("warmup", 1)))
        counts = generate_items(backbone, method, items, run_dir / "images", run_dir / "records.jsonl", bs, prog)
        _finalize_layout(cfg["bench"], run_dir / "images")
        from eval.plots import contact_sheet

        step = max(1, len(items) // 24)                 # evenly spread over the bench (its tags come in blocks)
        sheet = contact_sheet([(run_dir / "images" / it.relpath, it.prompt) for it in items[::step]],
                              run_dir / "samples.png")
        if sheet is not None:
            print(f"[varbench] first images with their prompts: {sheet}")
        if use_ref:
            ref_dir.mkdir(parents=True, exist_ok=True)
            if not (ref_dir / "meta.json").exists():
                write_meta(ref_dir, cfg | {"method": {"name": "none"}})
            rc = generate_items(backbone, Method(), items, ref_dir / "images", ref_dir / "records.jsonl", bs, prog)
            _finalize_layout(cfg["bench"], ref_dir / "images")
            contact_sheet([(ref_dir / "images" / it.relpath, it.prompt) for it in items[::step]], ref_dir / "samples.png")
            print(f"[varbench] reference (method=none): {ref_dir} ({rc['generated']} generated, {rc['reused']} reused; "
                  f"images with prompts: {ref_dir / 'samples.png'})")
    recs = read_records(run_dir / "records.jsonl")
    times = [recs[i.index]["time_per_image_s"] for i in items if i.index in recs]
    print(f"[varbench] {len(items)} images in {run_dir / 'images'} ({counts['generated']} generated, "
          f"{counts['reused']} reused); mean time/image {sum(times) / max(1, len(times)):.3f}s on {device} ({dtype})")
    metrics = {}
    if stage in ("score", "all"):
        if use_ref and (ref_dir / "records.jsonl").exists():
            score_run(cfg | {"method": {"name": "none"}}, ref_dir, backbone, "none", None)
        metrics = score_run(cfg, run_dir, backbone, method.name, ref_dir)
        print_table(cfg)
        if cfg.get("wandb"):
            from eval.wandb_log import mirror

            mirror(cfg, run_dir, metrics)
    return {"run_dir": str(run_dir), "image_dir": str(run_dir / "images"), "metrics": metrics, **counts}
