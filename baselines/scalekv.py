"""ScaleKV: scale-aware KV-cache compression with drafter and refiner layers (Li et al., NeurIPS 2025, arXiv 2505.19602).

Our code, written from the paper and from the most complete public port, Weepingchestnut/Lvar @f94b7ec
``models/scalekv/scale_kv.py`` (walked through in ``shared/specs/lvar_sparsevar_scalekv.md``; "port :N" below is a
line of that file). It runs on the loop's ``compress_kv`` hook (``varbench/hooks.py``): after each layer's block at
each scale, the layer's self-attention cache keeps at most its budget of keys/values, per batch row and head.

Values, each from the paper or the port:
  * budgets per (scale, layer): the authors' budget files (``budget_file``: ``2b_10%_budget.json`` /
    ``8b_10%_budget.json`` under ``models/scalekv/budgets/`` in Weepingchestnut/Lvar; third-party data, not shipped:
    pass your copy's path). "Scale N" -> per "Block i" 1 = drafter (keeps ``Max``) else refiner (keeps ``Min``) (port
    :304-338, :332). Without a file, every layer keeps ``budget_fraction`` (10 %, the paper's abstract: "reduces the
    required KV cache memory to 10%") of the schedule's tokens before its last scale — the authors' files average
    650 keys per layer at every scale, 650/6425 = 10.1 % of the 1M schedule's tokens before its last scale (our
    reading, documented; no drafter/refiner split without the paper's calibration).
  * base capacity 650 (``enable_scale_kv(max_capacity=650)``, Lvar tools/run_infinity.py:710, passed as
    ``base_capacity`` port :383): caches up to this length are kept whole until it is first exceeded (port :167).
  * observation window: ``window_size`` 16 queries of the current scale, the centres of a 4x4 grid of patches
    (``h_patch = H // 4``, centre ``i*h_patch + (h_patch-1)//2``, port :72-96); grids smaller than 4 take the last 16
    cache rows (port :60-68).
  * scores: window queries against every cached key, window columns excluded, summed over the window queries
    (port :233-252); ``max_pool1d`` kernel 5, stride 1, padding 2 (port :257; ``pooling: avgpool`` :255); window
    columns excluded again (:260); keep the ``budget - window`` best (topk, :269) plus the window, sorted ascending
    (:276); keys and values gathered with the same indices per (row, head) (:290-295).

The port's quirks, each an option (``conf/method/scalekv_lvar.yaml`` sets them all as the port runs):
  * ``score``: ``softmax`` (default: the attention weights the window queries give the keys, as the paper scores
    "attention interactions") | ``logits`` (port :233-252 sums the raw logits, no softmax).
  * ``logit_scale``: ``attn`` (default: the scale the attention kernel uses, so scores are its logits) | ``sqrt_d``
    (port :240 divides by sqrt(head_dim) whatever the model's attention does).
  * ``query``: ``attn`` (default: the queries the attention used; for Infinity normalised, temperature-scaled and
    RoPE'd like the cached keys, so the scores are the attention's own) | ``raw`` (port :355-356 re-projects
    ``mat_qkv(x)``: the attention input times the q rows of the fused weight, no q bias, no norm, no temperature, no
    RoPE — scored against the normalised, RoPE'd cached keys). Backbones offer the raw projection lazily through
    ``LayerCtx.raw_query`` (``varbench.attention.offer_raw_query``; Infinity, HART and VAR do); a backbone without it
    stops with one line.
  * ``budget_offset``: the budget of scale si is the file's "Scale (si + budget_offset)" (port :183: 2). Default 2:
    the files' drafter sizes fit it (2B block 0: Scale 9 keeps 920 of the 921 keys cached at si 7, Scale 10 1490 of
    920+576 at si 8, ...). A scale past the file's last key reuses the last (port :173-175, si 12 -> si 11's).
  * ``missing_layer``: ``error`` (default: one line when the file has no entry for a layer, e.g. the 2B file on the
    8B model) | ``base`` (port :188-190: fall back to ``base_capacity`` with a warning; Lvar's evaluation scripts
    never pass ``model_size``, so its 8B runs used the 2B file and layers >= 32 kept 650).
  * ``reset_base``: ``image`` (default: "has reached base" is cleared for every image) | ``lvar`` (port :173-175: it
    is cleared only when scale 12 is compressed, so on schedules shorter than 13 scales the next image looks up
    "Scale 2", absent: the port crashes with ``len(None)``; we stop with one line there).
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from varbench.errors import UserError
from varbench.hooks import KVEdit, KVState, LayerCtx, Method, MethodConfig

LVAR_BUDGETS = ("Weepingchestnut/Lvar models/scalekv/budgets/2b_10%_budget.json or 8b_10%_budget.json "
                "(https://github.com/Weepingchestnut/Lvar)")


@dataclass
class ScaleKVConfig(MethodConfig):
    name: str = "scalekv"
    family: str = "scalekv"
    budget_file: str | None = None      # the authors' budget JSON (your copy); None: uniform budget_fraction
    budget_fraction: float = 0.1        # without a file: keys kept per layer / tokens before the last scale
    base_capacity: int | None = None    # None: 650 with a file (port :383, run_infinity.py:710), else the uniform budget
    window_size: int = 16               # port enable_scale_kv(window_size=16)
    kernel_size: int = 5                # port enable_scale_kv(kernel_size=5), :257
    pooling: str = "maxpool"            # maxpool | avgpool (port :254-257)
    score: str = "softmax"              # softmax | logits (port :233-252: raw logits summed)
    logit_scale: str = "attn"           # attn | sqrt_d (port :240)
    query: str = "attn"                 # attn | raw (port :355-356: x·W_qᵀ, no bias/norm/RoPE)
    budget_offset: int = 2              # "Scale (si + offset)" (port :183)
    missing_layer: str = "error"        # error | base (port :188-190)
    reset_base: str = "image"           # image | lvar (port :173-175)
    enabled: bool = True                # false: the hook changes nothing (NOOP)

    def __post_init__(self):
        for key, allowed in (("pooling", ("maxpool", "avgpool")), ("score", ("softmax", "logits")),
                             ("logit_scale", ("attn", "sqrt_d")), ("query", ("attn", "raw")),
                             ("missing_layer", ("error", "base")), ("reset_base", ("image", "lvar"))):
            if getattr(self, key) not in allowed:
                raise UserError(f"scalekv.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if not 0 < float(self.budget_fraction) <= 1:
            raise UserError(f"scalekv.budget_fraction must be in (0, 1], got {self.budget_fraction}")
        for key in ("window_size", "kernel_size"):
            if int(getattr(self, key)) < 1:
                raise UserError(f"scalekv.{key} must be >= 1, got {getattr(self, key)}")
        if self.base_capacity is not None and int(self.base_capacity) < 1:
            raise UserError(f"scalekv.base_capacity must be >= 1, got {self.base_capacity}")


def load_budgets(path: str | Path) -> dict[int, list[int]]:
    """The authors' budget file as ``{N: [keys kept per layer]}`` for every "Scale N" key: per "Block i", 1 = drafter
    (the scale's ``Max``), anything else = refiner (``Min``) (port :304-338, :332). Layers: "Block 0.." while present."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"scalekv budget file {str(p)!r} not found: it is the authors' data, published as {LVAR_BUDGETS}")
    try:
        raw = json.loads(p.read_text())
        out = {}
        for key, d in raw.items():
            if not key.startswith("Scale "):
                continue
            n = int(key.split()[1])
            blocks = []
            while f"Block {len(blocks)}" in d:
                blocks.append(int(d["Max"]) if d[f"Block {len(blocks)}"] == 1 else int(d["Min"]))
            out[n] = blocks
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"scalekv budget file {str(p)!r} is not in the authors' format ({{\"Scale N\": {{\"Max\", "
                        f"\"Min\", \"Block i\": 0|1}}}}): {e}") from None
    if not out:
        raise UserError(f"scalekv budget file {str(p)!r} has no \"Scale N\" entries")
    return out


def window_positions(hw: tuple[int, int], window_size: int) -> list[int] | None:
    """Grid indices (row-major, 0..h*w-1) of the observation window: the centres of a g x g grid of patches,
    g = sqrt(window_size) (port :72-96), sorted, unique; None when the grid is smaller than g (port :60-68: the last
    ``window_size`` cache rows instead) or window_size is not a square."""
    g = math.isqrt(window_size)
    H, W = hw
    if g * g != window_size or H < g or W < g:
        return None
    hp, wp = H // g, W // g
    pos = {min(H - 1, max(0, i * hp + (hp - 1) // 2)) * W + min(W - 1, max(0, j * wp + (wp - 1) // 2))
           for i in range(g) for j in range(g)}
    return sorted(pos)


def select_keep(q_win: torch.Tensor, k: torch.Tensor, win_idx: torch.Tensor, budget: int, *, scale: float,
                score: str = "softmax", pooling: str = "maxpool", kernel_size: int = 5) -> torch.Tensor:
    """Cache positions to keep, [R, H, budget] sorted ascending: the window ``win_idx`` [R, w] plus the
    ``budget - w`` non-window keys of highest pooled score (port :233-276).

    ``q_win`` [R, H, w, c] window queries, ``k`` [R, H, L, c] cached keys."""
    R, Hh, L, _ = k.shape
    w = win_idx.shape[-1]
    logits = torch.einsum("rhwc,rhlc->rhwl", q_win.float(), k.float()) * scale
    win_cols = torch.zeros(R, 1, 1, L, dtype=torch.bool, device=k.device)
    win_cols[torch.arange(R, device=k.device)[:, None], 0, 0, win_idx] = True
    if score == "softmax":
        s = logits.softmax(-1).masked_fill(win_cols, float("-inf")).sum(2)
    else:
        s = logits.masked_fill(win_cols, float("-inf")).sum(2)
    pad = kernel_size // 2
    if pooling == "maxpool":
        s = F.max_pool1d(s, kernel_size, stride=1, padding=pad)
    else:
        s = F.avg_pool1d(s, kernel_size, stride=1, padding=pad)
    s = s[..., :L].masked_fill(win_cols[:, :, 0], float("-inf"))
    rest = min(max(0, budget - w), L - w)
    top = s.topk(rest, dim=-1).indices if rest > 0 else s.new_zeros(R, Hh, 0, dtype=torch.long)
    keep = torch.cat((top, win_idx[:, None, :].expand(R, Hh, w)), -1)
    return keep.sort(-1).values


class ScaleKV(Method):
    CITATION = ("ScaleKV, arXiv 2505.19602 (NeurIPS 2025); port Weepingchestnut/Lvar @f94b7ec models/scalekv/"
                "scale_kv.py; shared/specs/lvar_sparsevar_scalekv.md")
    STATUS = "our implementation of the paper's selection; the port's quirks as options"
    FOOTNOTE = ("ScaleKV: KV cache compressed after each layer (budgets per scale and layer); tokens are all computed, "
                "attention sees the kept keys")
    Config = ScaleKVConfig
    NOOP = {"enabled": False}
    FAMILIES = None     # the hook is the loop's, any backbone; the authors' budget files are for Infinity-2B/8B
    cfg: ScaleKVConfig

    def __init__(self, cfg: ScaleKVConfig | None = None):
        self.budgets = None
        self._reached_persist: dict[int, bool] = {}
        super().__init__(cfg)
        if self.cfg.budget_file:
            self.budgets = load_budgets(self.cfg.budget_file)

    def reset(self) -> None:
        self.reached: dict[int, bool] = self._reached_persist if self.cfg.reset_base == "lvar" else {}
        self.kept: dict[tuple[int, int], tuple[int, int]] = {}      # (si, li) -> (keys before, keys kept)
        self._mflops = 0.0
        self._batch = 1


    # ---- budgets
    def base_capacity(self, lctx: LayerCtx) -> int:
        if self.cfg.base_capacity is not None:
            return int(self.cfg.base_capacity)
        return 650 if self.budgets is not None else self.uniform_budget(lctx)

    def uniform_budget(self, lctx: LayerCtx) -> int:
        sched = lctx.scale.schedule
        before_last = sum(s.n for s in sched[:-1]) if sched else 0
        return max(self.cfg.window_size, round(self.cfg.budget_fraction * before_last))

    def budget(self, lctx: LayerCtx) -> int | None:
        """Keys layer li keeps after scale si (None: the port would crash here)."""
        if self.budgets is None:
            return self.uniform_budget(lctx)
        n = lctx.si + self.cfg.budget_offset
        last = max(self.budgets)
        if n > last:        # past the file's last scale: reuse it (port :173-175, si 12 -> si 11's)
            n = last
        if n not in self.budgets:
            return None
        row = self.budgets[n]
        if lctx.li < len(row):
            return row[lctx.li]
        if self.cfg.missing_layer == "base":
            warnings.warn(f"scalekv: the budget file has no entry for layer {lctx.li} (it lists {len(row)} layers); "
                          f"using base_capacity (Lvar scale_kv.py:188-190)", stacklevel=2)
            return self.base_capacity(lctx)
        raise UserError(f"scalekv budget file {self.cfg.budget_file!r} lists {len(row)} layers for 'Scale {n}', the "
                        f"model has {lctx.scale.spec.depth}: it is for another model size (missing_layer=base falls "
                        f"back to base_capacity as Lvar's port does)")

    # ---- the hook
    def compress_kv(self, lctx: LayerCtx, kv: KVState) -> KVEdit | None:
        if not self.cfg.enabled:   # NOOP: the hook runs and keeps every key (the contract suite: bit-identical)
            return KVEdit(keep_idx=torch.arange(kv.length, device=kv.k.device)[None, None])
        L, li, si = kv.length, lctx.li, lctx.si
        self._batch = lctx.scale.batch
        if L <= self.base_capacity(lctx) and not self.reached.get(li, False):    # port :167
            return None
        self.reached[li] = True
        last = lctx.scale.num_scales - 1
        if self.cfg.reset_base == "lvar" and si == 12:        # port :173-175: cleared at scale 12 only
            self.reached[li] = False
        cap = self.budget(lctx)
        if cap is None:
            why = (f"'has reached base' is cleared only at scale 12 (reset_base=lvar) and this schedule has {last + 1} "
                   f"scales" if self.cfg.reset_base == "lvar" else f"the cache passed base_capacity before scale "
                   f"{min(self.budgets) - self.cfg.budget_offset}")
            raise UserError(f"scalekv: the budget file has no 'Scale {si + self.cfg.budget_offset}' for scale {si} "
                            f"(Lvar's port crashes here, scale_kv.py:188 len(None)): {why}")
        if L <= cap:
            return None
        if kv.new == 0 or kv.q is None:   # the layer computed no token at this scale (an upstream method bypassed
            return None                   # it): no window queries to score with; the cache stays as it was
        win = self._window(kv, lctx)
        R, Hh, _, c = kv.k.shape
        start = L - kv.new
        q = kv.q
        if self.cfg.query == "raw":
            if kv.raw_q is None:
                raise UserError("scalekv.query=raw: this backbone's self-attention offers no raw query projection "
                                "(varbench.attention.offer_raw_query); use query=attn")
            q = kv.raw_q()
            if q.shape != kv.q.shape:
                raise RuntimeError(f"scalekv: raw queries {tuple(q.shape)} do not match the kernel's {tuple(kv.q.shape)}")
        q_win = q.gather(2, (win - start).clamp(0, kv.new - 1)[:, None, :, None].expand(R, Hh, -1, c))
        scale = (1.0 / math.sqrt(c) if self.cfg.logit_scale == "sqrt_d" or kv.attn_scale is None
                 else float(kv.attn_scale))
        keep = select_keep(q_win, kv.k, win, cap, scale=scale, score=self.cfg.score, pooling=self.cfg.pooling,
                           kernel_size=self.cfg.kernel_size)
        self.kept[(si, li)] = (L, keep.shape[-1])
        self._mflops += 2.0 * R * Hh * win.shape[-1] * L * c       # the window's scores (q·kᵀ)
        return KVEdit(keep_idx=keep)

    def _window(self, kv: KVState, lctx: LayerCtx) -> torch.Tensor:
        """Cache positions of the window queries, [R, w]: the patch centres of the current grid among this scale's
        appended keys (when an upstream method computed a subset, the computed token nearest each centre)."""
        L, R, dev = kv.length, kv.k.shape[0], kv.k.device
        start = L - kv.new
        pos = window_positions(lctx.scale.hw, self.cfg.window_size)
        if pos is None or kv.new == 0:
            w = min(self.cfg.window_size, L)
            return torch.arange(L - w, L, device=dev)[None].expand(R, -1)
        if kv.new_pos is None:
            if kv.new != lctx.scale.n:
                raise RuntimeError(f"scalekv: scale {lctx.si} appended {kv.new} keys of {lctx.scale.n} without positions")
            return (torch.tensor(pos, device=dev) + start)[None].expand(R, -1)
        W = lctx.scale.hw[1]
        cen = torch.tensor(pos, device=dev)
        have = kv.new_pos.to(dev).expand(R, -1)                            # [R, K] grid index of each appended key
        d = ((have[:, None, :] // W - cen[None, :, None] // W) ** 2
             + (have[:, None, :] % W - cen[None, :, None] % W) ** 2)       # [R, w, K]
        nearest = d.argmin(-1)                                             # [R, w] first nearest appended key
        rows = [torch.unique(nearest[r]) for r in range(R)]   # sorted, unique per row
        m = min(len(t) for t in rows)   # rows with more keep their first m (the port pads with duplicates, :120-128)
        return torch.stack([t[:m] for t in rows]) + start

    def summary(self) -> dict:
        kept = {f"{si}:{li}": list(v) for (si, li), v in sorted(self.kept.items())}
        return {"method_flops": self._mflops / max(1, self._batch), "scalekv_kept": kept}
