"""One run = (model, method, bench), as named stages over a small ``Run`` object:

    run(cfg, overrides)      the entry point of ``run.py`` / ``varbench`` (cfg: a ``RunConfig``, or the composed
                             config as a dict, which becomes one)

    prepare     check the options, resolve device/dtype/threads and the shard, build the method, list the bench's
                items, name the run and reference directories (nothing is written, no model is loaded)
    generate    this process's shard of the items -> images + records (``varbench/harness/rundir.py``)
    reference   the same items with ``method=none`` into the reference run (same prompts, seeds and settings)
    score       once every shard is complete: speed/fidelity against the reference, the bench's quality metrics,
                tidy rows in ``<results_root>/rows.jsonl``. Never loads a model (FLOPs use the backbone spec stored
                in ``meta.json``)
    report      the table of every run of this (model, bench), the W&B mirror

``stage=generate`` runs prepare, generate, reference; ``stage=score`` prepare, score, report; ``stage=all`` all.
Sharding: ``shard.index=K shard.count=N`` (or torchrun's RANK/WORLD_SIZE) gives worker K the items i with
i % N == K; seeds depend on the item only, so images do not depend on N. Under torchrun, rank 0 scores after a
barrier; with independent jobs (SLURM arrays) run ``stage=score`` once all shards are done.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from varbench.backbones.base import BackboneSpec
from varbench.bench.layouts import derived_files, finalize, format_record, image_format, relpath, save_kwargs
from varbench.bench.prompts import Prompt, apply_rewrites, inline_prompts
from varbench.errors import UserError
from varbench.harness.config import RunConfig, _int
from varbench.harness.registry import (
    build_backbone,
    build_method,
    check_model,
    method_family,
    metric_check,
    metric_fn,
    model_family,
    prompt_source,
)
from varbench.harness.rundir import (
    CORE_IMAGE_CODE,
    NON_IDENTITY,
    REPO,
    RunDir,
    Shard,
    code_fingerprint,
    device_name,
    git_sha,
    identity,
    run_id,
    versions,
)
from varbench.hooks import Method
from varbench.io import image_ok, save_image, to_uint8, write_json, write_jsonl
from varbench.loop import generate
from varbench.results import store, tables
from varbench.results.plots import contact_sheet
from varbench.results.speed import run_metrics
from varbench.results.wandb_log import mirror

TAG_EXCLUDE = set(NON_IDENTITY) | {"model", "method", "bench", "bench.limit", "bench.data_dir", "model.weights_dir",
                                   "model.trust_pickle", "threads_note"}
REFERENCE = {"name": "none", "family": "none", "footnote": None}


@dataclass
class Item:
    index: int
    prompt: str            # the prompt, or a caption of a class-conditional item ("class 207")
    seed: int
    relpath: str           # image path relative to the run's image folder
    original: str | None = None   # the benchmark prompt when the bench rewrites prompts
    label: int | None = None      # the class label of a class-conditional item (ImageNet)

    @property
    def condition(self) -> str | int:
        """What the backbone is conditioned on: the class label where the item has one, else the prompt."""
        return self.prompt if self.label is None else self.label


# ------------------------------------------------------------------ settings
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
    n = 1 if threads in (None, "auto") else _int("threads", threads, lo=1)
    torch.set_num_threads(n)
    return n


def resolve_shard(cfg: RunConfig) -> Shard:
    """The configured shard, else torchrun's RANK/WORLD_SIZE, else the SLURM array index, else 0 of 1."""
    count, index = cfg.shard.count, cfg.shard.index
    if count is None and "WORLD_SIZE" in os.environ:          # torchrun
        count, index = os.environ["WORLD_SIZE"], os.environ.get("RANK", "0")
    if index is None and os.environ.get("SLURM_ARRAY_TASK_ID") and count not in (None, 1, "1"):
        index = os.environ["SLURM_ARRAY_TASK_ID"]
    count = _int("shard.count", 1 if count is None else count, lo=1)
    index = _int("shard.index", 0 if index is None else index, lo=0)
    if index >= count:
        raise UserError(f"shard.index must be < shard.count ({count}), got {index}")
    return Shard(index, count)


def tag_of(overrides: list[str], cfg: RunConfig, drop_method: bool = False) -> str:
    """Run-directory leaf: the overrides that change images (sorted, as typed), or 'default'."""
    keep = []
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key in TAG_EXCLUDE or key.split(".")[0] in ("shard", "hydra") or key.endswith(".weights_dir"):
            continue
        if drop_method and (key == "method" or key.startswith("method.")):
            continue
        keep.append(o.lstrip("+~"))
    if cfg.run_tag:
        keep.append(f"tag={cfg.run_tag}")
    tag = ",".join(sorted(keep))
    tag = re.sub(r"[^A-Za-z0-9._=,+{}:\[\]-]", "_", tag)
    return (tag[:100] + "-" + run_id({"t": tag})[:8]) if len(tag) > 110 else (tag or "default")


def run_paths(cfg: RunConfig, overrides: list[str]) -> tuple[Path, Path]:
    """(run dir, reference dir). The reference always lives under results_root, named from this run's identity."""
    root = Path(cfg.results_root).resolve()
    m, b = cfg.model["name"], cfg.bench["name"]
    main = Path(cfg.run_dir).resolve() if cfg.run_dir else root / "runs" / m / b / cfg.method["name"] / tag_of(overrides, cfg)
    ref = root / "runs" / m / b / "none" / tag_of(overrides, cfg, drop_method=True)
    return main, ref


# ------------------------------------------------------------------ items
def load_prompts(bench: dict) -> list[Prompt]:
    """The prompt list of a bench config: its built-in ``prompts``, or its ``source`` (a ``varbench.sources``
    plug-in), rewritten when ``bench.rewrite_prompts`` is on."""
    if bench.get("prompts"):
        prompts = inline_prompts(bench)
    elif bench.get("source"):
        prompts = prompt_source(str(bench["source"]))(bench)
    else:
        raise UserError(f"bench {bench.get('name')!r} has neither prompts nor a source")
    return apply_rewrites(bench, prompts)


def limited_prompts(bench: dict) -> list[Prompt]:
    prompts = load_prompts(bench)
    if not prompts:
        raise UserError(f"bench {bench.get('name')!r} has no prompts")
    limit = _int("bench.limit", bench.get("limit"), lo=1, allow_none=True)
    return prompts[:limit] if limit else prompts


def bench_items(bench: dict, base_seed: int, prompts=None) -> list[Item]:
    """Prompts x images_per_prompt in the bench's file layout; seed = base_seed + item index, or base_seed + the
    prompt's own seed offset + k where the source gives one (ImageNet: per class), independent of batching and
    sharding."""
    prompts = prompts if prompts is not None else limited_prompts(bench)
    n_per = _int("bench.images_per_prompt", bench.get("images_per_prompt", 1), lo=1)
    layout, fmt = bench.get("layout", "flat"), image_format(bench)[0]
    items = []
    for p in prompts:
        for k in range(n_per):
            i = len(items)
            seed = base_seed + (i if p.seed is None else p.seed + k)
            items.append(Item(i, p.prompt, seed, relpath(layout, p.key, p.index, k, n_per, fmt), p.original, p.label))
    return items


def missing_items(rd: RunDir, items: list[Item]) -> list[Item]:
    recs = rd.records()
    return [it for it in items if it.index not in recs or not image_ok(rd.images / it.relpath)]


# ------------------------------------------------------------------ generation
def generate_items(backbone, method: Method, items: list[Item], rd: RunDir, bench: dict, batch_size: int = 1,
                   progress: bool = True, label: str = "", record_maps: bool = False) -> dict:
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
        out = generate(backbone, [it.condition for it in batch], method, rngs[0] if len(rngs) == 1 else rngs,
                       record_maps)
        for it, img, rec in zip(batch, to_uint8(out.images), out.record.per_image()):
            save_image(img, rd.images / it.relpath, **kw)
            rec.update(index=it.index, prompt=it.prompt, seed=it.seed, image=it.relpath, method=method.name,
                       method_summary=out.method_summary, device_name=dev, shard=rd.shard.index)
            if it.original is not None:
                rec["original_prompt"] = it.original
            if it.label is not None:
                rec["label"] = it.label
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
        generate(backbone, [it.condition], method, torch.Generator(device=backbone.device).manual_seed(it.seed))


def _finish_layout(bench: dict, rd: RunDir, prompts, items: list[Item]) -> None:
    fmt, q = image_format(bench)
    finalize(bench.get("layout", "flat"), rd.images, prompts, int(bench.get("images_per_prompt", 1)), fmt, q or 95)
    step = max(1, len(items) // 24)                 # evenly spread over the bench (its tags come in blocks)
    contact_sheet([(rd.images / it.relpath, it.prompt) for it in items[::step]], rd.path / "samples.png")


# ------------------------------------------------------------------ scoring
def item_set(items: list[Item]) -> str:
    """The key of a set of items in the rows store: its size and a hash of its indices (a limited score and the
    full run's score are different rows)."""
    return f"{len(items)}-{run_id({'items': sorted(it.index for it in items)})[:8]}"


def stray_images(image_dir: Path, items: list[Item], prompts, bench: dict) -> list[str]:
    """Image files in a run's image folder that are neither one of ``items`` nor made from them by the layout (DPG's
    grids): a file a user or another tool left there."""
    ours = {it.relpath for it in items} | set(derived_files(bench.get("layout", "flat"), prompts, bench))
    return sorted(str(p.relative_to(image_dir)) for p in Path(image_dir).rglob("*")
                  if p.suffix.lower() in (".png", ".jpg", ".jpeg") and str(p.relative_to(image_dir)) not in ours)


def score_view(rd: RunDir, items: list[Item], prompts, bench: dict, view: Path) -> Path:
    """``view``: a folder holding exactly ``items`` (links to the run's images) in the bench's layout, with the
    layout's metadata written for ``prompts`` only: what a scorer reads when part of a run is scored, or when the
    run's folder holds files that are not its images."""
    for it in items:
        dst = view / it.relpath
        if not dst.is_symlink():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to((rd.images / it.relpath).resolve())
    fmt, q = image_format(bench)
    finalize(bench.get("layout", "flat"), view, prompts, int(bench.get("images_per_prompt", 1)), fmt, q or 95)
    return view


def score_run(cfg: RunConfig, rd: RunDir, items: list[Item], method_name: str, family: str, ref: RunDir | None,
              prompts=None) -> dict:
    """Speed/fidelity against the reference, method metrics, bench metrics -> metrics.json, rows, plot. Exactly the
    given items are scored (all metrics over the same images); when they are part of the run (``bench.limit``
    below what was generated), the rows carry their own item-set key and every output (metrics.json, per-image
    fidelity, the scorers' files, the method's figures) goes to ``scores.<key>/``, so the full run's scores are
    never replaced."""
    missing = missing_items(rd, items)
    if missing:
        count = int(((rd.read_meta() or {}).get("identity") or {}).get("shard_count") or 1)
        count = max([count] + [int(p.stem.split("of")[-1]) for p in rd.path.glob("records.shard*of*.jsonl")])
        shards = sorted({it.index % count for it in missing})
        raise UserError(f"{rd.path}: {len(missing)} of {len(items)} items are missing or unreadable (e.g. item "
                        f"{missing[0].index}: {missing[0].relpath}; shard(s) {shards[:8]} of {count}); run "
                        f"stage=generate (on every shard) to (re)make them")
    meta = rd.read_meta()
    if meta is None or "spec" not in meta:
        raise UserError(f"{rd.meta_path()} has no backbone spec (the run was never opened by stage=generate)")
    spec = BackboneSpec.from_dict(meta["spec"])
    all_recs = rd.records()
    wanted = {it.index for it in items}
    recs = {i: r for i, r in all_recs.items() if i in wanted}
    subset = bool(set(all_recs) - wanted)
    strays = stray_images(rd.images, items, prompts or [], cfg.bench)
    ref_recs = None if ref is None else ref.records()
    if method_name == "none":  # the reference itself: speedup 1 by definition, no fidelity to itself
        ref_recs, ref = recs, None
    root = Path(cfg.results_root).resolve()
    method = build_method(cfg.method)     # the instance: a stack's run-level metrics are its members'
    note = method.footnote()
    key = item_set(items)
    base = {"run": str(rd.path.relative_to(root)) if rd.path.is_relative_to(root) else str(rd.path),
            "model": cfg.model["name"], "method": method_name, "family": family, "bench": cfg.bench["name"],
            "overrides": rd.path.name, "git_sha": git_sha(), "run_id": meta.get("run_id"), "note": note,
            "device": meta.get("device_name"), "items": key}
    out_dir = rd.path / f"scores.{key}" if subset else rd.path
    out_dir.mkdir(exist_ok=True)
    out_json = out_dir / "metrics.json"
    metrics: dict = {}

    def save(new: dict) -> None:
        metrics.update(new)
        write_json(out_json, {k: {"value": v, "n": n} for k, (v, n) in metrics.items()})
        store.append_rows(root, [base | {"metric": k, "value": v, "n": n} for k, (v, n) in new.items() if v is not None])

    per_image: list = []
    save(run_metrics(recs, spec, ref_recs, rd.images, ref.images if ref else None, per_image))
    if per_image:
        write_jsonl(out_dir / "fidelity.jsonl", per_image)
    save(method.aggregate([r.get("method_summary") or {} for r in recs.values()]))
    method.report(list(recs.values()), out_dir, f"{cfg.model['name']} / {method_name} / {cfg.bench['name']}")
    if strays and not subset:
        print(f"[varbench] {len(strays)} file(s) in {rd.images} are not images of this run (e.g. {strays[0]}): the "
              f"scorers read only the run's items", file=sys.stderr)
    use_view = (subset or strays) and cfg.bench.get("metrics")
    image_dir = score_view(rd, items, prompts or [], cfg.bench, rd.path / f"scores.{key}" / "images") if use_view \
        else rd.images
    save(bench_metrics(cfg, image_dir, out_dir, len(recs)))   # after speed/fidelity are stored: a scorer error loses nothing
    if subset:
        print(f"[varbench] {method_name}: scored {len(items)} of the {len(all_recs)} items of {rd.path} (item set "
              f"{key}: {out_dir.name}/; the table shows each run's largest item set)")
    return metrics


def bench_metrics(cfg: RunConfig, image_dir: Path, out_dir: Path, n: int | None) -> dict[str, tuple[float, int | None]]:
    """The bench's quality metrics (``bench.metrics``: GenEval, ...), each from its scorer (a ``varbench.metrics``
    plug-in)."""
    out = {}
    for name in cfg.bench.get("metrics") or []:
        values = metric_fn(name)(cfg.bench, image_dir, out_dir, str(cfg.device))
        out.update({k: (v, n) for k, v in values.items()})
    return out


def score_external(cfg: RunConfig, folder: Path) -> dict:
    """``stage=score score_dir=<folder>``: the bench's quality metrics on images made elsewhere (same layout).
    The folder is only read: scores go to ``<results_root>/external/<folder name>-<hash>/``."""
    folder = Path(folder).resolve()
    if not cfg.bench.get("metrics"):
        raise UserError(f"bench {cfg.bench['name']!r} has no quality metrics, so score_dir has nothing to score; "
                        f"name the bench whose layout the folder has (bench=geneval, dpg, mjhq, imagereward, hpsv2, "
                        f"shapes)")
    if not folder.is_dir():
        raise UserError(f"score_dir {folder} is not a folder")
    if not any(p.suffix.lower() in (".png", ".jpg", ".jpeg") for p in folder.rglob("*")):
        raise UserError(f"score_dir {folder} holds no .png/.jpg images (expected the {cfg.bench['name']} layout)")
    root = Path(cfg.results_root).resolve()
    out_dir = root / "external" / f"{folder.name}-{run_id({'f': str(folder)})[:8]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    values = bench_metrics(cfg, folder, out_dir, None)
    base = {"run": str(folder), "model": cfg.score_model or "external", "method": cfg.method["name"],
            "bench": cfg.bench["name"], "overrides": "default", "git_sha": git_sha()}
    store.append_rows(root, [base | {"metric": k, "value": v, "n": n} for k, (v, n) in values.items()])
    write_json(out_dir / "metrics.json", {k: v for k, (v, _) in values.items()})
    print(f"[varbench] scores of {folder} -> {out_dir / 'metrics.json'}")
    for k, (v, _) in values.items():
        print(f"  {k}: {v:.4f}")
    return {"metrics": {k: v for k, (v, _) in values.items()}}


def print_table(cfg: RunConfig) -> str:
    w = tables.wide(store.load(Path(cfg.results_root)), cfg.model["name"], cfg.bench["name"])
    quality = tables.quality_columns(w, list(cfg.bench.get("metrics") or [])) if len(w) else []
    text = tables.markdown(w, quality=quality) if len(w) else "(no results yet)"
    print(text)
    return text


# ------------------------------------------------------------------ the run and its stages
@dataclass
class Run:
    """What the stages share: the config, what ``prepare`` resolved, and what the stages produced."""

    cfg: RunConfig
    overrides: list[str]
    shard: Shard
    device: str
    dtype: str
    threads: int | None
    method: Method
    family: str                  # the method's class name in the registry
    prompts: list
    items: list[Item]
    rd: RunDir                   # this run (this process's shard)
    ref: RunDir                  # the reference run (method=none), same shard
    use_ref: bool
    distributed: bool = False
    backbone: object = None
    extra: dict = field(default_factory=dict)     # meta.json fields beside the identity
    counts: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @property
    def ref_cfg(self) -> RunConfig:
        return dataclasses.replace(self.cfg, method=dict(REFERENCE))

    def result(self) -> dict:
        return {"run_dir": str(self.rd.path), "image_dir": str(self.rd.images), "metrics": self.metrics, **self.counts}


def _dist_init(shard: Shard, device: str) -> bool:
    """Under torchrun: one process group so rank 0 can score after every rank finished generating."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True


def prepare(cfg: RunConfig, overrides: list[str]) -> Run:
    """Everything that can fail on a bad option, before anything is written or loaded."""
    shard = resolve_shard(cfg)
    if "LOCAL_RANK" in os.environ and cfg.device == "auto" and torch.cuda.is_available():
        cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    threads = resolve_threads(cfg.threads, device)
    check_model(cfg.model)                            # fail fast on names and options
    method = build_method(cfg.method)
    family, fams, backbone_family = method_family(cfg.method), type(method).FAMILIES, model_family(cfg.model)
    if fams is not None and backbone_family not in fams:
        raise UserError(f"method {method.name!r} supports backbone families {', '.join(fams)}, not "
                        f"{backbone_family!r} (model={cfg.model['name']})")
    prompts = limited_prompts(cfg.bench)
    items = bench_items(cfg.bench, cfg.seed, prompts)
    if cfg.stage == "all":   # a scorer's missing file stops the run now, not after hours of generation
        for name in cfg.bench.get("metrics") or []:
            check = metric_check(name)
            if check is not None:
                check(cfg.bench)
    main_dir, ref_dir = run_paths(cfg, overrides)
    return Run(cfg, overrides, shard, device, dtype, threads, method, family, prompts, items,
               RunDir(main_dir, shard), RunDir(ref_dir, shard), method.name != "none" and cfg.reference,
               counts={"generated": 0, "reused": len(items)})


def image_code(r: Run, method: Method) -> dict[str, str]:
    """The fingerprint of the code that makes this run's images: the core loop and kernels, the backbone family's
    folder (sources and shipped weights) and the method's module."""
    family_dir = Path(sys.modules[type(r.backbone).__module__].__file__).parent
    return code_fingerprint([REPO / f for f in CORE_IMAGE_CODE] + [family_dir, sys.modules[type(method).__module__].__file__])


def generate_stage(r: Run) -> None:
    """Load the model, open the run directory (identity checked, lock taken), generate this shard's missing items."""
    cfg = r.cfg
    r.backbone = build_backbone(cfg.model, r.device, r.dtype, compile=cfg.compile)
    wants = "class" if any(it.label is not None for it in r.items) else "text"
    if r.backbone.spec.conditioning != wants:
        raise UserError(f"bench {cfg.bench['name']!r} gives {'class labels' if wants == 'class' else 'prompts'}, but "
                        f"model {cfg.model['name']!r} is conditioned on {r.backbone.spec.conditioning}")
    warn = r.method.check_schedule(r.backbone.scales())
    if warn:
        print(f"[varbench] warning: {warn}", file=sys.stderr)
    r.extra = {"git_sha": git_sha(), "versions": versions(), "argv": sys.argv, "config": cfg.to_dict(),
               "spec": r.backbone.spec.to_dict(), "device_name": device_name(r.device), "threads": r.threads,
               "images": format_record(cfg.bench), "method_status": type(r.method).STATUS,
               "footnote": r.method.footnote()}
    if r.use_ref:   # a reference made with other settings stops the run now, not after its images
        r.ref.check(identity(r.ref_cfg.to_dict(), r.device, r.dtype, r.threads))
    r.rd.open(identity(cfg.to_dict(), r.device, r.dtype, r.threads), r.extra | {"code": image_code(r, r.method)},
              code_change=cfg.code_change)
    try:
        _warmup(r.backbone, r.method, r.items, cfg.warmup)
        r.counts = generate_items(r.backbone, r.method, r.items, r.rd, cfg.bench, cfg.batch_size, cfg.progress,
                                  record_maps=cfg.record_maps)
        _finish_layout(cfg.bench, r.rd, r.prompts, r.items)
    finally:
        r.rd.unlock()
    print(f"[varbench] images: {r.rd.images} (with prompts: {r.rd.path / 'samples.png'})")


def reference_stage(r: Run) -> None:
    """The same items with ``method=none`` into the shared reference run (generated once, reused by every method)."""
    if r.use_ref:
        ref_cfg = r.ref_cfg
        r.ref.open(identity(ref_cfg.to_dict(), r.device, r.dtype, r.threads),   # shared: wait for another writer
                   r.extra | {"config": ref_cfg.to_dict(), "footnote": None, "method_status": Method.STATUS,
                              "code": image_code(r, Method())}, wait=True, code_change=r.cfg.code_change)
        try:
            rc = generate_items(r.backbone, Method(), r.items, r.ref, r.cfg.bench, r.cfg.batch_size, r.cfg.progress,
                                "reference (method=none)")
            _finish_layout(r.cfg.bench, r.ref, r.prompts, r.items)
        finally:
            r.ref.unlock()
        print(f"[varbench] reference (method=none): {r.ref.path} ({rc['generated']} generated, {rc['reused']} reused)")
    recs = r.rd.records()
    times = [recs[i.index]["time_per_image_s"] for i in r.items if i.index in recs and r.shard.owns(i.index)]
    print(f"[varbench] {len(times)} images in {r.rd.images} ({r.counts['generated']} generated, {r.counts['reused']} "
          f"reused); mean time/image {sum(times) / max(1, len(times)):.3f}s on {r.device} ({r.dtype}"
          f"{f', {r.threads} threads' if r.threads else ''})")


def scoring_process(r: Run) -> bool:
    """Whether this process scores: under torchrun rank 0 after a barrier; a shard of an array job (stage=all) leaves
    scoring to a later ``stage=score``."""
    if r.distributed:
        import torch.distributed as dist

        dist.barrier()
        return dist.get_rank() == 0
    if r.shard.count > 1 and r.cfg.stage == "all":
        print(f"[varbench] shard {r.shard.index} of {r.shard.count} done; once every shard is, score with "
              f"`stage=score` (same overrides, without shard.*)")
        return False
    return True


def score_stage(r: Run) -> None:
    """Score the reference (its own row) and the run, over every shard's records."""
    full, full_ref = RunDir(r.rd.path, Shard(0, 1)), RunDir(r.ref.path, Shard(0, 1))
    if full.read_meta() is None:          # a damaged meta.json is one line here, before anything is scored
        raise UserError(f"no run at {r.rd.path}: run stage=generate first")
    if r.use_ref and (r.ref.path / "meta.json").exists():
        score_run(r.ref_cfg, full_ref, r.items, "none", "none", None, r.prompts)
    r.metrics = score_run(r.cfg, full, r.items, r.method.name, r.family, full_ref if r.use_ref else None, r.prompts)


def report_stage(r: Run) -> None:
    """The table of every run of this (model, bench); the W&B mirror when asked for."""
    print_table(r.cfg)
    if r.cfg.wandb:
        mirror(r.cfg.to_dict(), r.rd.path, r.metrics)


def run(cfg: RunConfig | dict, overrides: list[str] | None = None) -> dict:
    """Entry point used by ``run.py``. The CPU thread count it sets is restored when it returns, so an in-process
    run leaves its caller's setting alone."""
    cfg = cfg if isinstance(cfg, RunConfig) else RunConfig.from_dict(cfg)
    before = torch.get_num_threads()
    try:
        return _run(cfg, list(overrides or []))
    finally:
        torch.set_num_threads(before)


def _run(cfg: RunConfig, overrides: list[str]) -> dict:
    if cfg.score_dir:                             # score a finished folder (ours or anyone's), no generation
        return score_external(cfg, Path(cfg.score_dir))
    r = prepare(cfg, overrides)
    r.distributed = _dist_init(r.shard, r.device)
    if cfg.stage in ("generate", "all"):
        generate_stage(r)
        reference_stage(r)
    if cfg.stage in ("score", "all") and scoring_process(r):
        score_stage(r)
        report_stage(r)
    return r.result()


__all__ = ["run", "Run", "bench_items", "generate_items", "score_run", "resolve_device", "Item", "REPO", "to_uint8"]
