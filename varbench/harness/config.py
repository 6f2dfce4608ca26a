"""The run as a typed object: ``RunConfig`` is the schema of ``conf/config.yaml`` and the only place a run default
is written. Hydra composes ``model``/``method``/``bench`` from their groups into it; every other top-level key is a
field here, typed (Hydra refuses a wrong type or an unknown key while composing) and checked once in
``__post_init__`` (ranges, choices: one-line ``UserError``). The runner receives a ``RunConfig``, never a dict.

``model``, ``method`` and ``bench`` stay plain dicts here: the method's own schema is its ``Config`` dataclass
(``method/_<family>``), validated when the method is built.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from varbench.errors import UserError

STAGES = ("generate", "score", "all")
DTYPES = ("auto", "fp32", "bf16")
RESULTS_ENV = "VARBENCH_RESULTS"


def _int(key: str, value, lo: int | None = None, allow_none: bool = False) -> int | None:
    """An integer option (or None where allowed), checked against a lower bound; one line otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not re.fullmatch(r"-?\d+", str(value)):
        raise UserError(f"{key} must be an integer{' or null' if allow_none else ''}, got {value!r}")
    v = int(value)
    if lo is not None and v < lo:
        raise UserError(f"{key} must be >= {lo}{' (or null for all)' if allow_none else ''}, got {v}")
    return v


def _bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    raise UserError(f"{key} must be true or false, got {value!r}")


@dataclass
class ShardConfig:
    """Worker ``index`` of ``count`` generates the items i with i % count == index. Null: torchrun's RANK /
    WORLD_SIZE, or the SLURM array index, else 0 of 1 (``runner.resolve_shard``)."""

    index: Optional[int] = None
    count: Optional[int] = None

    def __post_init__(self):
        self.count = _int("shard.count", self.count, lo=1, allow_none=True)
        self.index = _int("shard.index", self.index, lo=0, allow_none=True)
        if self.index is not None and self.count is not None and self.index >= self.count:
            raise UserError(f"shard.index must be < shard.count ({self.count}), got {self.index}")


@dataclass
class RunConfig:
    # what runs: Hydra groups (conf/model, conf/method, conf/bench); plain dicts
    model: Any = None
    method: Any = None
    bench: Any = None
    # what determines the images (part of the run's identity)
    seed: int = 0                  # image i uses seed + i (its own RNG: independent of batching and sharding)
    device: str = "auto"           # auto | cpu | cuda | cuda:N  (torchrun: cuda:LOCAL_RANK)
    dtype: str = "auto"            # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    threads: Any = "auto"          # CPU threads: auto = 1 (images depend on the count, so it is fixed and recorded)
    compile: bool = False          # opt-in torch.compile of the blocks' pure parts (Infinity; not bit-identical)
    batch_size: int = 1            # per-image adaptive methods (NOVA, SkipVAR, ...) always run with 1
    run_tag: Optional[str] = None  # a name added to the run directory, to keep a second run apart
    # how it runs (not part of the identity)
    stage: str = "all"             # generate | score | all
    shard: ShardConfig = field(default_factory=ShardConfig)
    score_dir: Optional[str] = None    # stage=score on a finished image folder made elsewhere (bench layout)
    score_model: Optional[str] = None  # model name for the rows of score_dir (default "external")
    reference: bool = True         # also run method=none on the same prompts/seeds (cached): speedup and fidelity
    warmup: int = 1                # untimed generations before timing
    wandb: bool = False            # mirror config, metrics and sample images to Weights & Biases
    wandb_project: str = "varbench"
    progress: bool = True          # progress bars
    results_root: str = "${oc.env:" + RESULTS_ENV + ",results}"   # $VARBENCH_RESULTS, else ./results
    run_dir: Optional[str] = None  # explicit run directory (default: <results_root>/runs/<model>/<bench>/<method>/<tag>)
    code_change: str = "stop"      # resuming a run whose image-making code changed: stop (one line) | keep
    record_maps: bool = False      # records keep the tokens each (scale, layer) computed (report masks; large)

    def __post_init__(self):
        self.seed = _int("seed", self.seed, lo=0)
        self.batch_size = _int("batch_size", self.batch_size, lo=1)
        self.warmup = _int("warmup", self.warmup, lo=0)
        for key in ("compile", "reference", "wandb", "progress", "record_maps"):
            setattr(self, key, _bool(key, getattr(self, key)))
        if self.stage not in STAGES:
            raise UserError(f"stage must be generate, score or all, got {self.stage!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.code_change not in ("stop", "keep"):
            raise UserError(f"code_change must be stop or keep, got {self.code_change!r}")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be fp32, bf16 or auto, got {self.dtype!r}")
        if self.threads != "auto":
            self.threads = _int("threads", self.threads, lo=1)
        if isinstance(self.shard, dict):
            self.shard = ShardConfig(**self.shard)
        if not str(self.results_root).strip():
            raise UserError(f"results_root is empty (is {RESULTS_ENV} set to an empty string?); name a folder")

    @classmethod
    def from_dict(cls, cfg: dict) -> RunConfig:
        """From a composed config (``OmegaConf.to_container(..., resolve=True)``). Unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known - {"experiment"})
        if unknown:
            raise UserError(f"{unknown[0]} is not a run option; options: {', '.join(sorted(known))}")
        values = {k: v for k, v in cfg.items() if k in known}
        if "results_root" not in values:
            values["results_root"] = os.environ.get(RESULTS_ENV) or "results"
        shard = values.get("shard") or {}
        if not isinstance(shard, (dict, ShardConfig)):
            raise UserError(f"shard must be a mapping {{index, count}}, got {shard!r}")
        return cls(**values)

    def to_dict(self) -> dict:
        """The plain config (what ``meta.json`` records and the identity is computed from)."""
        return asdict(self)
