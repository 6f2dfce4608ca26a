"""One run = (model, method, bench): generate images (resumable, shardable), the unpruned reference, scores, tables.

    run(cfg, overrides)      the entry point of ``run.py`` / ``varbench`` (cfg: the resolved Hydra config as a dict)

Stages (``stage=generate|score|all``):
  generate   this process's shard of the bench's items -> images + records (``varbench/harness/rundir.py``), and the
             same items with ``method=none`` into the reference run (same prompts, seeds and settings)
  score      once every shard is complete: speed/fidelity against the reference, the bench's quality metrics,
             tidy rows in ``<results_root>/rows.jsonl``, one table. Never loads a model (FLOPs use the backbone spec
             stored in ``meta.json``).

Sharding: ``shard.index=K shard.count=N`` (or torchrun's RANK/WORLD_SIZE) gives worker K the items i with
i % N == K; seeds depend on the item only, so images do not depend on N. Under torchrun, rank 0 scores after a
barrier; with independent jobs (SLURM arrays) run ``stage=score`` once all shards are done.
"""
from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from eval import store, tables
from eval.datasets import load_prompts
from eval.layouts import finalize, format_record, image_format, relpath, save_kwargs
from eval.plots import contact_sheet
from eval.speed import run_metrics
from eval.wandb_log import mirror
from varbench.backbones.base import BackboneSpec
from varbench.errors import UserError
from varbench.harness.registry import build_backbone, build_method, method_class, metric_fn
from varbench.harness.rundir import NON_IDENTITY, REPO, RunDir, Shard, device_name, git_sha, identity, run_id, versions
from varbench.hooks import Method
from varbench.io import image_ok, save_image, to_uint8, write_json
from varbench.loop import generate

TAG_EXCLUDE = set(NON_IDENTITY) | {"model", "method", "bench", "bench.limit", "bench.data_dir", "model.weights_dir",
                                   "model.trust_pickle", "threads_note"}


@dataclass
class Item:
    index: int
    prompt: str
    seed: int
    relpath: str           # image path relative to the run's image folder
    original: str | None = None   # the benchmark prompt when the bench rewrites prompts


# ------------------------------------------------------------------ settings
def _bool(cfg: dict, key: str) -> bool:
    """A boolean option: true/false (YAML/CLI) or absent (false); anything else is a one-line error."""
    value = cfg.get(key, False)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise UserError(f"{key} must be true or false, got {value!r}")


def _int(cfg: dict, key: str, value, lo: int | None = None, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not re.fullmatch(r"-?\d+", str(value)):
        raise UserError(f"{key} must be an integer{' or null' if allow_none else ''}, got {value!r}")
    v = int(value)
    if lo is not None and v < lo:
        raise UserError(f"{key} must be >= {lo}{' (or null for all)' if allow_none else ''}, got {v}")
    return v


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    device, dtype = str(device), str(dtype)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device=cuda asked for, but torch sees no GPU; use device=cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    if dtype not in ("fp32", "bf16"):
        raise UserError(f"dtype must be fp32, bf16 or auto, got {dtype!r}")
    return device, dtype


def resolve_threads(threads, device: str) -> int | None:
    """CPU threads: an explicit number, or ``auto`` = 1 (measured: on 2 shared cores the tiny models run fastest and
    steadiest with 1; images also depend on the thread count, so a fixed default keeps them machine-independent)."""
    if torch.device(device).type != "cpu":
        return None
    n = 1 if threads in (None, "auto") else _int({}, "threads", threads, lo=1)
    torch.set_num_threads(n)
    return n


def resolve_shard(cfg: dict) -> Shard:
    s = cfg.get("shard") or {}
    count = s.get("count")
    index = s.get("index")
    if count is None and "WORLD_SIZE" in os.environ:          # torchrun
        count, index = os.environ["WORLD_SIZE"], os.environ.get("RANK", "0")
    if index is None and os.environ.get("SLURM_ARRAY_TASK_ID") and count not in (None, 1, "1"):
        index = os.environ["SLURM_ARRAY_TASK_ID"]
    count = _int(cfg, "shard.count", 1 if count is None else count, lo=1)
    index = _int(cfg, "shard.index", 0 if index is None else index, lo=0)
    if index >= count:
        raise UserError(f"shard.index must be < shard.count ({count}), got {index}")
    return Shard(index, count)


def tag_of(overrides: list[str], cfg: dict, drop_method: bool = False) -> str:
    """Run-directory leaf: the overrides that change images (sorted, as typed), or 'default'."""
    keep = []
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key in TAG_EXCLUDE or key.split(".")[0] in ("shard", "hydra") or key.endswith(".weights_dir"):
            continue
        if drop_method and (key == "method" or key.startswith("method.")):
            continue
        keep.append(o.lstrip("+~"))
    if cfg.get("run_tag"):
        keep.append(f"tag={cfg['run_tag']}")
    tag = ",".join(sorted(keep))
    tag = re.sub(r"[^A-Za-z0-9._=,+{}:\[\]-]", "_", tag)
    return (tag[:100] + "-" + run_id({"t": tag})[:8]) if len(tag) > 110 else (tag or "default")


def run_paths(cfg: dict, overrides: list[str]) -> tuple[Path, Path]:
    """(run dir, reference dir). The reference always lives under results_root, named from this run's identity."""
    root = Path(cfg["results_root"]).resolve()
    m, b = cfg["model"]["name"], cfg["bench"]["name"]
    main = Path(cfg["run_dir"]).resolve() if cfg.get("run_dir") else root / "runs" / m / b / cfg["method"]["name"] / tag_of(overrides, cfg)
    ref = root / "runs" / m / b / "none" / tag_of(overrides, cfg, drop_method=True)
    return main, ref


# ------------------------------------------------------------------ items
def bench_items(bench: dict, base_seed: int, prompts=None) -> list[Item]:
    """Prompts x images_per_prompt in the bench's file layout; seed = base_seed + item index (independent of
    batching and sharding)."""
    prompts = prompts if prompts is not None else limited_prompts(bench)
    n_per = _int({}, "bench.images_per_prompt", bench.get("images_per_prompt", 1), lo=1)
    layout, fmt = bench.get("layout", "flat"), image_format(bench)[0]
    items = []
    for p in prompts:
        for k in range(n_per):
            i = len(items)
            items.append(Item(i, p.prompt, base_seed + i, relpath(layout, p.key, p.index, k, n_per, fmt),
                              getattr(p, "original", None)))
    return items


def limited_prompts(bench: dict):
    prompts = load_prompts(bench)
    if not prompts:
        raise UserError(f"bench {bench.get('name')!r} has no prompts")
    limit = _int({}, "bench.limit", bench.get("limit"), lo=1, allow_none=True)
    return prompts[:limit] if limit else prompts


# ------------------------------------------------------------------ generation
def generate_items(backbone, method: Method, items: list[Item], rd: RunDir, bench: dict, batch_size: int = 1,
                   progress: bool = True, label: str = "") -> dict:
    """Generate this shard's items whose image or record is missing. Each image gets its own RNG (seeded by its
    item), so a batch of B gives the images of B single runs (up to the kernels' batch-size numerics)."""
    done = rd.records()
    mine = [it for it in items if rd.shard.owns(it.index)]
    todo = [it for it in mine if not (it.index in done and image_ok(rd.images / it.relpath))]
    if not method.batch_rectangular and batch_size > 1:
        print(f"[varbench] {method.name} decides per image: batch_size={batch_size} -> 1")
        batch_size = 1
    shard = f" shard {rd.shard.index}/{rd.shard.count}" if rd.shard.count > 1 else ""
    print(f"[varbench] {label or method.name}{shard}: {len(mine)} items, {len(mine) - len(todo)} done, "
          f"{len(todo)} to generate -> {rd.path}")
    kw, dev = save_kwargs(bench), device_name(str(backbone.device))
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"{backbone.spec.name}/{label or method.name}{shard}", disable=not progress,
               unit="img")
    for s in range(0, len(todo), batch_size):
        batch = todo[s:s + batch_size]
        rngs = [torch.Generator(device=backbone.device).manual_seed(it.seed) for it in batch]
        out = generate(backbone, [it.prompt for it in batch], method, rngs[0] if len(rngs) == 1 else rngs)
        for it, img, rec in zip(batch, to_uint8(out.images), out.record.per_image()):
            save_image(img, rd.images / it.relpath, **kw)
            rec.update(index=it.index, prompt=it.prompt, seed=it.seed, image=it.relpath, method=method.name,
                       method_summary=out.method_summary, device_name=dev, shard=rd.shard.index)
            if it.original is not None:
                rec["original_prompt"] = it.original
            rd.append_record(rec)
        bar.update(len(batch))
    bar.close()
    wall = time.perf_counter() - t0
    if todo:
        print(f"[varbench] {label or method.name}{shard}: {len(todo)} images in {wall:.1f}s "
              f"({len(todo) / max(wall, 1e-9):.2f} images/s)")
    return {"generated": len(todo), "reused": len(mine) - len(todo)}


def _warmup(backbone, method, items, n: int) -> None:
    """Untimed generations so one-off costs (allocator, kernel selection) do not enter the first latency."""
    for it in items[:n]:
        generate(backbone, [it.prompt], method, torch.Generator(device=backbone.device).manual_seed(it.seed))


def _finish_layout(bench: dict, rd: RunDir, prompts, items: list[Item]) -> None:
    fmt, q = image_format(bench)
    finalize(bench.get("layout", "flat"), rd.images, prompts, int(bench.get("images_per_prompt", 1)), fmt, q or 95)
    step = max(1, len(items) // 24)                 # evenly spread over the bench (its tags come in blocks)
    contact_sheet([(rd.images / it.relpath, it.prompt) for it in items[::step]], rd.path / "samples.png")


def missing_items(rd: RunDir, items: list[Item]) -> list[Item]:
    recs = rd.records()
    return [it for it in items if it.index not in recs or not image_ok(rd.images / it.relpath)]


# ------------------------------------------------------------------ scoring
def score_run(cfg: dict, rd: RunDir, items: list[Item], method_name: str, family: str, ref: RunDir | None) -> dict:
    """Speed/fidelity against the reference, method metrics, bench metrics -> metrics.json, rows, plot."""
    missing = missing_items(rd, items)
    if missing:
        count = int(((rd.read_meta() or {}).get("identity") or {}).get("shard_count") or 1)
        count = max([count] + [int(p.stem.split("of")[-1]) for p in rd.path.glob("records.shard*of*.jsonl")])
        shards = sorted({it.index % count for it in missing})
        raise UserError(f"{rd.path}: {len(missing)} of {len(items)} items are missing or unreadable (e.g. item "
                        f"{missing[0].index}: {missing[0].relpath}; shard(s) {shards[:8]} of {count}); run "
                        f"stage=generate (on every shard) to (re)make them")
    meta = rd.read_meta() or {}
    spec = BackboneSpec.from_dict(meta["spec"])
    recs = {i: r for i, r in rd.records().items() if i in {it.index for it in items}}
    ref_recs = None if ref is None else ref.records()
    if method_name == "none":  # the reference itself: speedup 1 by definition, no fidelity to itself
        ref_recs, ref = recs, None
    root = Path(cfg["results_root"]).resolve()
    note = build_method(cfg["method"]).footnote()
    base = {"run": str(rd.path.relative_to(root)) if rd.path.is_relative_to(root) else str(rd.path),
            "model": cfg["model"]["name"], "method": method_name, "family": family, "bench": cfg["bench"]["name"],
            "overrides": rd.path.name, "git_sha": git_sha(), "run_id": meta.get("run_id"), "note": note,
            "device": meta.get("device_name")}
    metrics: dict = {}

    def save(new: dict) -> None:
        metrics.update(new)
        write_json(rd.path / "metrics.json", {k: {"value": v, "n": n} for k, (v, n) in metrics.items()})
        store.append_rows(root, [base | {"metric": k, "value": v, "n": n} for k, (v, n) in new.items() if v is not None])

    save(run_metrics(recs, spec, ref_recs, rd.images, ref.images if ref else None))
    save(method_class(family).aggregate([r.get("method_summary") or {} for r in recs.values()]))
    method_class(family).report(list(recs.values()), rd.path,
                                f"{cfg['model']['name']} / {method_name} / {cfg['bench']['name']}")
    save(bench_metrics(cfg, rd.images, rd.path, len(recs)))   # after speed/fidelity are stored: a scorer error loses nothing
    return metrics


def bench_metrics(cfg: dict, image_dir: Path, out_dir: Path, n: int | None) -> dict[str, tuple[float, int | None]]:
    """The bench's quality metrics (``bench.metrics``: GenEval, ...), each from its scorer in ``eval/``."""
    out = {}
    for name in cfg["bench"].get("metrics") or []:
        values = metric_fn(name)(cfg["bench"], image_dir, out_dir, str(cfg.get("device", "cpu")))
        out.update({k: (v, n) for k, v in values.items()})
    return out


def score_external(cfg: dict, folder: Path) -> dict:
    """``stage=score score_dir=<folder>``: the bench's quality metrics on images made elsewhere (same layout).
    The folder is only read: scores go to ``<results_root>/external/<folder name>-<hash>/``."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise UserError(f"score_dir {folder} is not a folder")
    if not any(p.suffix.lower() in (".png", ".jpg", ".jpeg") for p in folder.rglob("*")):
        raise UserError(f"score_dir {folder} holds no .png/.jpg images (expected the {cfg['bench']['name']} layout)")
    root = Path(cfg["results_root"]).resolve()
    out_dir = root / "external" / f"{folder.name}-{run_id({'f': str(folder)})[:8]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    values = bench_metrics(cfg, folder, out_dir, None)
    base = {"run": str(folder), "model": cfg.get("score_model") or "external", "method": cfg["method"]["name"],
            "bench": cfg["bench"]["name"], "overrides": "default", "git_sha": git_sha()}
    store.append_rows(root, [base | {"metric": k, "value": v, "n": n} for k, (v, n) in values.items()])
    write_json(out_dir / "metrics.json", {k: v for k, (v, _) in values.items()})
    print(f"[varbench] scores of {folder} -> {out_dir / 'metrics.json'}")
    for k, (v, _) in values.items():
        print(f"  {k}: {v:.4f}")
    return {"metrics": {k: v for k, (v, _) in values.items()}}


def print_table(cfg: dict) -> str:
    w = tables.wide(store.load(Path(cfg["results_root"])), cfg["model"]["name"], cfg["bench"]["name"])
    quality = tables.quality_columns(w, list(cfg["bench"].get("metrics") or [])) if len(w) else []
    text = tables.markdown(w, quality=quality) if len(w) else "(no results yet)"
    print(text)
    return text


# ------------------------------------------------------------------ the run
def _dist_init(shard: Shard, device: str) -> bool:
    """Under torchrun: one process group so rank 0 can score after every rank finished generating."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True


def run(cfg: dict, overrides: list[str] | None = None) -> dict:
    """Entry point used by ``run.py`` (``cfg`` is the resolved Hydra config as a plain dict). The CPU thread count
    it sets is restored when it returns, so an in-process run leaves its caller's setting alone."""
    before = torch.get_num_threads()
    try:
        return _run(cfg, overrides)
    finally:
        torch.set_num_threads(before)


def _run(cfg: dict, overrides: list[str] | None = None) -> dict:
    overrides = list(overrides or [])
    stage = str(cfg.get("stage", "all"))
    if stage not in ("generate", "score", "all"):
        raise UserError(f"stage must be generate, score or all, got {stage!r}")
    if cfg.get("score_dir"):                             # score a finished folder (ours or anyone's), no generation
        return score_external(cfg, Path(cfg["score_dir"]))
    shard = resolve_shard(cfg)
    if "LOCAL_RANK" in os.environ and str(cfg.get("device", "auto")) == "auto" and torch.cuda.is_available():
        cfg["device"] = f"cuda:{os.environ['LOCAL_RANK']}"
    device, dtype = resolve_device(cfg.get("device", "auto"), cfg.get("dtype", "auto"))
    threads = resolve_threads(cfg.get("threads", "auto"), device)
    seed = _int(cfg, "seed", cfg.get("seed", 0), lo=0)
    bs = _int(cfg, "batch_size", cfg.get("batch_size", 1), lo=1)
    use_compile = _bool(cfg, "compile")
    method = build_method(cfg["method"])                 # fail fast on names and options
    family = cfg["method"].get("family") or cfg["method"]["name"]
    fams = type(method).FAMILIES
    model_family = cfg["model"].get("family", "infinity")
    if fams is not None and model_family not in fams:
        raise UserError(f"method {method.name!r} supports backbone families {', '.join(fams)}, not "
                        f"{model_family!r} (model={cfg['model']['name']})")
    prompts = limited_prompts(cfg["bench"])
    items = bench_items(cfg["bench"], seed, prompts)
    main_dir, ref_dir = run_paths(cfg, overrides)
    rd, ref = RunDir(main_dir, shard), RunDir(ref_dir, shard)
    use_ref = method.name != "none" and bool(cfg.get("reference", True))
    distributed = _dist_init(shard, device)
    counts = {"generated": 0, "reused": len(items)}
    if stage in ("generate", "all"):
        backbone = build_backbone(cfg["model"], device, dtype, compile=use_compile)
        warn = method.check_schedule(backbone.scales())
        if warn:
            print(f"[varbench] warning: {warn}", file=sys.stderr)
        ident = identity(cfg, device, dtype, threads)
        extra = {"git_sha": git_sha(), "versions": versions(), "argv": sys.argv, "config": cfg,
                 "spec": backbone.spec.to_dict(), "device_name": device_name(device), "threads": threads,
                 "images": format_record(cfg["bench"]), "method_status": type(method).STATUS,
                 "footnote": method.footnote()}
        rd.open(ident, extra)
        if use_ref:
            ref_cfg = cfg | {"method": {"name": "none", "family": "none", "footnote": None}}
            ref.open(identity(ref_cfg, device, dtype, threads), extra | {"config": ref_cfg, "footnote": None,
                                                                         "method_status": Method.STATUS})
        try:
            _warmup(backbone, method, items, int(cfg.get("warmup", 1)))
            counts = generate_items(backbone, method, items, rd, cfg["bench"], bs, bool(cfg.get("progress", True)))
            _finish_layout(cfg["bench"], rd, prompts, items)
            print(f"[varbench] images: {rd.images} (with prompts: {rd.path / 'samples.png'})")
            if use_ref:
                rc = generate_items(backbone, Method(), items, ref, cfg["bench"], bs, bool(cfg.get("progress", True)),
                                    "reference (method=none)")
                _finish_layout(cfg["bench"], ref, prompts, items)
                print(f"[varbench] reference (method=none): {ref.path} ({rc['generated']} generated, "
                      f"{rc['reused']} reused)")
        finally:
            rd.unlock()
            ref.unlock()
        recs = rd.records()
        times = [recs[i.index]["time_per_image_s"] for i in items if i.index in recs and shard.owns(i.index)]
        print(f"[varbench] {len(times)} images in {rd.images} ({counts['generated']} generated, {counts['reused']} "
              f"reused); mean time/image {sum(times) / max(1, len(times)):.3f}s on {device} ({dtype}"
              f"{f', {threads} threads' if threads else ''})")
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        if dist.get_rank() != 0:
            return {"run_dir": str(rd.path), "metrics": {}, **counts}
    elif shard.count > 1 and stage == "all":
        print(f"[varbench] shard {shard.index} of {shard.count} done; once every shard is, score with "
              f"`stage=score` (same overrides, without shard.*)")
        return {"run_dir": str(rd.path), "metrics": {}, **counts}
    metrics = {}
    if stage in ("score", "all"):
        full = RunDir(main_dir, Shard(0, 1))
        full_ref = RunDir(ref_dir, Shard(0, 1))
        if not (main_dir / "meta.json").exists():
            raise UserError(f"no run at {main_dir}: run stage=generate first")
        if use_ref and (ref_dir / "meta.json").exists():
            score_run(cfg | {"method": {"name": "none", "family": "none"}}, full_ref, items, "none", "none", None)
        metrics = score_run(cfg, full, items, method.name, family, full_ref if use_ref else None)
        print_table(cfg)
        if cfg.get("wandb"):
            mirror(cfg, main_dir, metrics)
    return {"run_dir": str(main_dir), "image_dir": str(main_dir / "images"), "metrics": metrics, **counts}


__all__ = ["run", "bench_items", "generate_items", "score_run", "resolve_device", "Item", "REPO"]
