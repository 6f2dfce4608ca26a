"""NOVA: entropy-guided, dual-linkage token reduction for next-scale VAR models (arXiv 2602.01345, §3.3).

Implements, with the paper's 1-based scale index t = si + 1 and layer index j = li + 1:
  Eq. 4–7   token entropy and the scale's mean entropy H̄_t, from the distribution tokens are drawn from
  Eq. 8     growth rate g_t = H̄_t − H̄_{t−1}
  Eq. 9     early baseline η = mean(g_2..g_{t_est})
  Eq. 10    t* = min{t ≥ t_est+1 : (g_t + g_{t−1})/2 ≤ α·η}; reduction from t*+1 on; none if never found
  Eq. 11    Ratio_t = σ((t − (t*+1))/τ) − λ·tanh(g_{t−1})
  Eq. 12–13 Ratio_{t,j} = Ratio_t·(1 − Δ_{t,j}), Δ_{t,j} = (H̄_{t,j} − μ_{t,j−1})/μ_{t,j−1}
  Eq. 14–16 pruned tokens: output = input + Interp(Cache_{t−1,j}); Cache_{t,j} = output − input (whole block)
Defaults (paper §4.1): t_est=5, α=0.5, τ=0.8, λ=0.1. No official code is public.

Where the paper is ambiguous we follow ``shared/specs/methods.md`` §2.3 and expose the alternatives (every option
is a field of :class:`NovaConfig`; the README's "NOVA readings" table lists them):
  entropy         sum of the bits' binary entropies in nats (``entropy_reduction: sum|mean_bit``, ``log_base: e|2``)
  entropy_branch  ``guided`` (CFG-mixed logits after temperature, before top-k/top-p; default) | ``cond`` (the cond
                  row's logits / sampling temperature; the layer lens then runs on the cond rows only)
  g_t causality   Eq. 11 at scale t uses g_{t−g_lag}, ``g_lag: 1`` = the newest growth rate known when t starts
  H̄_{t,j}         ``layer_entropy_source: input_lens`` (default: logit lens of block j's input at scale t; that map
                  also ranks the tokens, highest entropy kept) | ``prev_scale_lens`` (lens of block j's output at
                  t−1, resized to grid t, for H̄_{t,j} and the ranking) | ``prev_scale_final`` (H̄_{t,j} from the input
                  lens, ranking by the previous scale's final Eq. 4 map, resized); ``first_layer_score`` picks block
                  1's ranking alone (``input_lens|prev_scale_final``)
  CFG rows        one kept set for both rows from the guided lens map (``cfg_index_mode: shared|per_branch``;
                  per_branch ranks each row by its own logits / temperature)
  caching         residuals recorded from scale min(t_est+1, t_star) on (t* is known only after scale t* ends, and
                  scale t*+1 needs scale t*'s residuals); ``interp: area``; ``cache_dtype: native|fp32|bf16|fp16``
  clipping        ``clip_scale_ratio: before_layer`` (default: Ratio_t clipped to [0, r_max] before Eq. 13, then
                  r_{t,j} again) | ``after_layer_only`` (only r_{t,j}); ratio 1 bypasses the block (no compute, no K/V)
  η ≤ 0           ``eta_nonpositive: literal|activate_immediately|never``
  lens            ``lens: folded`` (default: the backbone's head folded with the AdaLN, bit-pair difference, 1/τ and CFG
                  weights, ``Backbone.lens_entropy``; same entropies up to float rounding, about half the cost) | ``exact``
Not implemented (methods.md §2.3 lists them; see the README): ``entropy_branch: post_filter`` (a method sees the
logits before the backbone's top-k/top-p filter, whose settings it is not given) and ``kv_for_pruned: from_restored``
(a method cannot project K/V: the block's QKV weights are the backbone's).
Per image: t*, Ratio_t, H̄_{t,j} and the kept sets are each image's own, and a Selection is one rectangle for the
batch, so ``generate()`` with NOVA takes one prompt per call (more is refused in one line; the runner generates NOVA
at batch size 1, ``batch_rectangular = False``).
Ablations are configs of this class (``conf/method/nova_*.yaml``): ``scale_linkage``, ``layer_linkage``,
``fixed_ratios`` (per grid side, Table 5), ``selection: entropy|mse|attn`` (Table 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nova.plots import plot_entropy_activation
from varbench.attention import reference_attention
from varbench.entropy import token_entropy
from varbench.errors import UserError
from varbench.hooks import LayerCtx, Method, MethodConfig, ScaleCtx, ScalePlan
from varbench.tokens import ResidualCache, Selection, check_ratio, keep_count, resize_grid

CITATION = "NOVA, arXiv 2602.01345, §3.3 Eqs. 4-16 and §4.1 (no official code); readings: shared/specs/methods.md §2"


# ------------------------------------------------------------------ equations (pure functions, 1-based t)
def growth_rates(H: list[float]) -> list[float | None]:
    """Eq. 8: g[t-1] = H̄_t − H̄_{t−1} for t ≥ 2 (g[0] is None)."""
    return [None] + [H[i] - H[i - 1] for i in range(1, len(H))]


def early_baseline(H: list[float], t_est: int) -> float:
    """Eq. 9: η = (1/(t_est−1)) Σ_{t=2..t_est} g_t = (H̄_{t_est} − H̄_1)/(t_est − 1)."""
    g = growth_rates(H[:t_est])
    return sum(g[1:t_est]) / (t_est - 1)


def detect_inflection(H: list[float], t_est: int, alpha: float, eta_nonpositive: str = "literal") -> int | None:
    """Eq. 10 on the entropies seen so far: the 1-based t*, or None."""
    if len(H) < t_est + 1:
        return None
    eta = early_baseline(H, t_est)
    if eta <= 0 and eta_nonpositive == "never":
        return None
    if eta <= 0 and eta_nonpositive == "activate_immediately":
        return t_est + 1
    g = growth_rates(H)
    for t in range(t_est + 1, len(H) + 1):
        if (g[t - 1] + g[t - 2]) / 2 <= alpha * eta:
            return t
    return None


def scale_ratio(t: int, t_star: int, g_prev: float, sigmoid_tau: float, lam: float) -> float:
    """Eq. 11 with the lag-1 growth rate."""
    return 1 / (1 + math.exp(-(t - (t_star + 1)) / sigmoid_tau)) - lam * math.tanh(g_prev)


def layer_ratio(r_t: float, layer_means: list[float], eps: float = 1e-8) -> float:
    """Eqs. 12–13 for layer j = len(layer_means) (1-based): layer_means = [H̄_{t,1}, ..., H̄_{t,j}]."""
    j = len(layer_means)
    if j <= 1:
        return r_t
    mu = sum(layer_means[:-1]) / (j - 1)
    delta = (layer_means[-1] - mu) / (mu if abs(mu) > eps else eps)
    return r_t - delta * r_t


def clip_ratio(r: float, r_max: float = 1.0) -> float:
    """§2.3 (g): a computed ratio is a fraction of tokens, clipped to [0, r_max]."""
    return min(max(float(r), 0.0), r_max)


def linked_layer_ratio(r_t: float, layer_means: list[float], r_max: float = 1.0,
                       clip_scale_ratio: str = "before_layer") -> float:
    """Eq. 13 with the clipping of issue 12: ``before_layer`` clips Ratio_t to [0, r_max] before Eq. 13 and
    r_{t,j} after it; ``after_layer_only`` (the behaviour before issue 12) multiplies the unclipped Ratio_t."""
    base = clip_ratio(r_t, r_max) if clip_scale_ratio == "before_layer" else r_t
    return clip_ratio(layer_ratio(base, layer_means), r_max)


# ------------------------------------------------------------------ the method
CACHE_DTYPES = {"native": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class NovaConfig(MethodConfig):
    name: str = "nova"
    family: str = "nova"
    t_est: int = 5
    alpha: float = 0.5
    sigmoid_tau: float = 0.8          # NOVA's τ in Eq. 11 (not the sampling temperature)
    lam: float = 0.1                  # λ in Eq. 11
    g_lag: int = 1                    # Eq. 11 at scale t uses g_{t-g_lag} (1: the newest known; 0 needs an extra pass)
    r_max: float = 1.0
    min_keep: int = 0
    clip_scale_ratio: str = "before_layer"  # before_layer | after_layer_only (clip Ratio_t before Eq. 13, or not)
    scale_linkage: bool = True        # Eq. 11; False requires fixed_ratios
    layer_linkage: bool = True        # Eqs. 12-13
    fixed_ratios: Any = None          # {grid width: ratio} (Any: a CLI dict replaces None): Table 5's baseline schedules instead of Eq. 11
    selection: str = "entropy"        # entropy | mse | attn (Table 4)
    ratio_one_means: str = "bypass_blocks"  # bypass_blocks | skip_scale (a fixed ratio of 1 skips the scale)
    entropy_branch: str = "guided"    # guided | cond
    entropy_reduction: str = "sum"    # sum | mean_bit
    log_base: str = "e"               # e | 2
    layer_entropy_source: str = "input_lens"  # input_lens | prev_scale_lens | prev_scale_final
    first_layer_score: str = "input_lens"     # input_lens | prev_scale_final (block 1's ranking)
    cfg_index_mode: str = "shared"    # shared | per_branch
    interp: str = "area"              # area | bilinear | bicubic | nearest
    cache_dtype: str = "native"       # native (the residual stream's dtype) | fp32 | bf16 | fp16
    eta_nonpositive: str = "literal"  # literal | activate_immediately | never
    t_star: int | None = None         # fix the activation scale (1-based) instead of detecting it
    ratio_override: float | None = None  # force every (scale, layer) ratio at active scales (tests, sweeps)
    record_layer_entropy: bool = True
    lens: str = "folded"              # folded (the backbone's folded head, where it offers one) | exact (head, guide)

    def __post_init__(self):
        choices = {"selection": ("entropy", "mse", "attn"), "ratio_one_means": ("bypass_blocks", "skip_scale"),
                   "entropy_branch": ("guided", "cond"), "entropy_reduction": ("sum", "mean_bit"),
                   "log_base": ("e", "2"), "cfg_index_mode": ("shared", "per_branch"),
                   "interp": ("area", "bilinear", "bicubic", "nearest"),
                   "eta_nonpositive": ("literal", "activate_immediately", "never"),
                   "clip_scale_ratio": ("before_layer", "after_layer_only"),
                   "layer_entropy_source": ("input_lens", "prev_scale_lens", "prev_scale_final"),
                   "first_layer_score": ("input_lens", "prev_scale_final"), "cache_dtype": tuple(CACHE_DTYPES),
                   "lens": ("folded", "exact")}
        for k, ok in choices.items():
            if str(getattr(self, k)) not in ok:
                raise UserError(f"nova.{k} must be one of {ok}, got {getattr(self, k)!r}")
        self.log_base = str(self.log_base)
        check_ratio(self.r_max, "nova.r_max")
        if self.ratio_override is not None:
            check_ratio(self.ratio_override, "nova.ratio_override")
        if self.fixed_ratios:
            self.fixed_ratios = {int(k): check_ratio(v, f"nova.fixed_ratios[{k}]") for k, v in self.fixed_ratios.items()}
        elif not self.scale_linkage:
            raise UserError("nova.scale_linkage=false needs nova.fixed_ratios (a per-scale schedule)")
        if self.t_est < 2:
            raise UserError(f"nova.t_est must be an integer >= 2 (Eq. 9 averages g_2..g_t_est), got {self.t_est}")
        if not self.alpha > 0:
            raise UserError(f"nova.alpha must be > 0 (Eq. 10 compares growth with alpha * eta), got {self.alpha}")
        if not self.sigmoid_tau > 0:
            raise UserError(f"nova.sigmoid_tau must be > 0 (Eq. 11 divides by it), got {self.sigmoid_tau}")
        if not isinstance(self.g_lag, int) or self.g_lag < 1:
            raise UserError(f"nova.g_lag must be an integer >= 1 (g_t needs scale t's own logits), got {self.g_lag!r}")
        if self.t_star is not None and self.t_star < 1:
            raise UserError(f"nova.t_star must be >= 1 (1-based scale index), got {self.t_star}")


class Nova(Method):
    CITATION = CITATION
    STATUS = "reimplemented from the paper (no official code); readings in the README"
    Config = NovaConfig
    NOOP = {"r_max": 0.0}      # every ratio clipped to 0: the lens runs, every token is computed
    batch_rectangular = False  # t* and the kept sets are per image: the runner uses batch 1, generate() refuses more
    cfg: NovaConfig

    def reset(self) -> None:
        self.H: list[float] = []                 # H̄_t per computed scale
        self.t_star: int | None = self.cfg.t_star
        self.cache = ResidualCache()             # li -> residual [rows, n, C] of block li at the last scale
        self.ratios: dict[int, list] = {}        # si -> [ratio per layer]
        self.layer_H: dict[int, list] = {}       # si -> [H̄_{t,j} per layer]
        self.scale_ratio_raw: dict[int, float] = {}  # si -> Ratio_t before any clipping (Eq. 11 or fixed)
        self._scale_base: float | None = None    # Ratio_t of the current scale, unclipped
        self._inv_tau = 1.0                      # 1 / the sampling temperature of the current scale
        self.prev_lens: dict[int, tuple] = {}    # li -> (stat map, rank map, hw) of block li's output, last scale
        self.prev_final: tuple | None = None     # (stat map, rank map, hw) of the last scale's Eq. 4 map
        self.schedule_warning: str | None = None
        self.attn_map: torch.Tensor | None = None   # [rows, n]: attention mass each token of this scale received
        self.attn_prev: tuple | None = None         # block 1's map at the previous scale, (map, hw)
        self._sel: Selection | None = None

    # -- a line when this configuration can never prune on a schedule (the runner may print it)
    def check_schedule(self, schedule) -> str | None:
        c, T = self.cfg, len(schedule)
        if c.t_star is not None and c.t_star + 1 > T:
            return (f"nova: t_star={c.t_star} leaves no scale to prune (pruning starts at scale t*+1 and the schedule "
                    f"has {T} scales): NOVA runs as the baseline")
        if c.t_star is None and c.t_est + 2 > T:
            return (f"nova: t_est={c.t_est} with {T} scales: t* >= t_est+1 = {c.t_est + 1}, so pruning (from t*+1) "
                    f"can never start: NOVA runs as the baseline")
        widths = [getattr(s, "rule_w", 0) or s.w for s in schedule]   # ScaleInfo or the backbone's own scales
        if c.fixed_ratios and not any(c.fixed_ratios.get(w, 0.0) > 0 for w in widths):
            return (f"nova: no grid width of the schedule has a positive fixed ratio in {c.fixed_ratios}: "
                    f"NOVA runs as the baseline")
        return None

    # -- entropy of a logits tensor in the configured unit
    def _entropy(self, logits: torch.Tensor, head_type: str, d: int) -> torch.Tensor:
        return self._unit(token_entropy(logits, head_type), head_type, d)

    def _unit(self, e: torch.Tensor, head_type: str, d: int) -> torch.Tensor:
        """Nats summed over bits -> the configured unit (``entropy_reduction``, ``log_base``)."""
        if self.cfg.entropy_reduction == "mean_bit" and head_type == "bitwise":
            e = e / d
        return e / math.log(2) if self.cfg.log_base == "2" else e

    def _maps(self, lc, lu, lg, spec) -> tuple[torch.Tensor, torch.Tensor]:
        """(statistics map [1, n], ranking map [1 or rows, n]) from (cond, uncond, guided) logits.

        Statistics (H̄_t, H̄_{t,j}) use ``entropy_branch``: the guided logits, or the conditional ones at the
        sampling temperature (cond/τ, as the guided ones are formed). ``cfg_index_mode: per_branch`` ranks each
        CFG row by its own branch entropy at the sampling temperature (FastVAR-like layout)."""
        ent = lambda x: self._entropy(x, spec.head_type, spec.head_dim_out)  # noqa: E731
        stat = ent(lc.mul(self._inv_tau) if self.cfg.entropy_branch == "cond" else lg)[:1]
        if self.cfg.cfg_index_mode == "per_branch" and lu is not None:
            return stat, torch.cat([ent(lc.mul(self._inv_tau)), ent(lu.mul(self._inv_tau))], 0)
        return stat, stat

    def _inverse_temperature(self, lctx: LayerCtx) -> float:
        """1/τ of this scale, read off the backbone's own guide(): it returns cond/uncond raw and guided = the CFG mix
        of cond/τ and uncond/τ, so guiding all-ones logits gives 1/τ whatever the CFG weight."""
        sc = lctx.scale
        probe = torch.ones(sc.rows, 1, sc.spec.head_out)
        return float(lctx.guide(probe)[2].float().mean())

    def _lens(self, lctx: LayerCtx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logit lens on a hidden state -> (stat map, rank map). ``entropy_branch: cond`` with a shared kept set
        needs the cond rows only, so the uncond rows' lens is not computed. ``lens: folded`` (with a shared kept set,
        on a backbone that offers ``lens_entropy``) takes the same entropies from the backbone's folded head: equal up
        to float rounding, about half the cost (the lens is most of NOVA's bookkeeping); ``exact`` applies the head
        and ``guide`` as sampling does."""
        spec, c = lctx.scale.spec, self.cfg
        if c.lens == "folded" and lctx.lens_entropy is not None and c.cfg_index_mode == "shared":
            if c.entropy_branch == "cond":
                e = lctx.lens_entropy(x[: lctx.scale.batch], "rows")
            else:
                e = lctx.lens_entropy(x, "guided")
            stat = self._unit(e, spec.head_type, spec.head_dim_out)[:1]
            return stat, stat
        if c.entropy_branch == "cond" and c.cfg_index_mode == "shared":
            return self._maps(lctx.head_logits(x[: lctx.scale.batch]), None, None, spec)
        return self._maps(*lctx.guide(lctx.head_logits(x)), spec)

    def _resized(self, m: torch.Tensor, hw, dst_hw) -> torch.Tensor:
        return m if tuple(hw) == tuple(dst_hw) else resize_grid(m[..., None], hw, dst_hw, self.cfg.interp)[..., 0]

    def _layer_maps(self, lctx: LayerCtx, x: torch.Tensor):
        """(H̄_{t,j} map, ranking map) of block j at scale t per ``layer_entropy_source`` / ``first_layer_score``."""
        c, li, hw = self.cfg, lctx.li, lctx.scale.hw
        if not (c.layer_linkage or c.selection == "entropy" or c.record_layer_entropy or li not in self.cache):
            return None, None
        if c.layer_entropy_source == "prev_scale_lens" and li in self.prev_lens:
            stat, rank, src = self.prev_lens[li]
            stat, rank = self._resized(stat, src, hw), self._resized(rank, src, hw)
        else:
            stat, rank = self._lens(lctx, x)
        final_rank = c.layer_entropy_source == "prev_scale_final" or (li == 0 and c.first_layer_score == "prev_scale_final")
        if final_rank and self.prev_final is not None:
            _, frank, src = self.prev_final
            rank = self._resized(frank, src, hw)
        return stat, rank

    def _active(self, si: int) -> bool:
        return self.t_star is not None and si + 1 >= self.t_star + 1

    def _records_cache(self, si: int) -> bool:
        """Eq. 15 is recorded from scale min(t_est+1, t_star) on: speculatively while t* is unknown (it is known only
        after scale t* ends), and at a fixed t_star <= t_est from scale t_star, whose residuals scale t*+1 needs."""
        c = self.cfg
        start = c.t_est + 1 if c.t_star is None else min(c.t_est + 1, c.t_star)
        return si + 1 >= start

    def _growth_for_ratio(self) -> float:
        """g_{t-g_lag} at scale t: the g_lag-th newest growth rate known (0 before two scales are known)."""
        lag, H = self.cfg.g_lag, self.H
        return H[-lag] - H[-lag - 1] if len(H) >= lag + 1 else 0.0

    def _base_ratio(self, sctx: ScaleCtx) -> float:
        t, c = sctx.si + 1, self.cfg
        if c.fixed_ratios:
            return c.fixed_ratios.get(sctx.rule_w, 0.0)
        return scale_ratio(t, self.t_star, self._growth_for_ratio(), c.sigmoid_tau, c.lam)

    def _layer_ratio(self, si: int) -> float:
        c = self.cfg
        if c.ratio_override is not None:   # capped at r_max like every computed ratio (the record is the ratio applied)
            return clip_ratio(c.ratio_override, c.r_max)
        if c.layer_linkage:   # Eq. 13 on Ratio_t (clipped first by default), then clipped
            return linked_layer_ratio(self._scale_base, self.layer_H[si], c.r_max, c.clip_scale_ratio)
        return clip_ratio(self._scale_base, c.r_max)

    def _kept(self, n: int, r: float) -> int:
        """Tokens kept of n at ratio r: K = n − floor(n·min(r, r_max)), at least ``min_keep`` (and at most n)."""
        return keep_count(n, r, self.cfg.r_max, self.cfg.min_keep)

    def _keep(self, score: torch.Tensor, k: int) -> Selection:
        """Keep the k highest-scoring tokens (highest entropy: pruning drops the lowest-entropy ones)."""
        return Selection.top_k(score, k)

    # -- hooks
    def select(self, lctx: LayerCtx, x: torch.Tensor) -> Selection | None:
        si, li, c = lctx.si, lctx.li, self.cfg
        if li == 0 and (c.entropy_branch == "cond" or c.cfg_index_mode == "per_branch"):
            self._inv_tau = self._inverse_temperature(lctx)
        if not self._active(si):
            return None
        if li == 0:
            raw = self._base_ratio(lctx.scale)
            self.scale_ratio_raw[si] = self._scale_base = raw
            self.ratios[si], self.layer_H[si] = [], []
        n = x.shape[1]
        stat, rank = self._layer_maps(lctx, x)
        if stat is not None:
            self.layer_H[si].append(stat.mean().item())
        r = self._layer_ratio(si)
        self.ratios[si].append(r)
        k = self._kept(n, r)
        self.claim(lctx, k)
        self._sel = None
        if k >= n:
            return None
        if c.selection == "attn" and (self.attn_map is not None or self.attn_prev is not None):
            score = self._attn_score(lctx, n)
        elif c.selection == "mse" and li in self.cache:
            res, hw = self.cache.get(li)
            score = resize_grid(res.float().pow(2).mean(-1, keepdim=True), hw, lctx.scale.hw, c.interp)[..., 0]
            score = score.mean(0, keepdim=True) if c.cfg_index_mode == "shared" else score
        else:
            score = rank
        self._sel = self._keep(score, k)
        return self._sel

    # -- NOVA w/ Attn (Table 4; our operational reading, methods.md §2.4): rank by the attention mass a token
    #    received from the current scale's queries in block j-1; block 1: block 1 at the previous scale, resized
    def _attn_score(self, lctx: LayerCtx, n: int) -> torch.Tensor:
        if lctx.li == 0 or self.attn_map is None:
            m, hw = self.attn_prev
            return resize_grid(m[..., None], hw, lctx.scale.hw, self.cfg.interp)[..., 0].mean(0, keepdim=True)
        return self.attn_map.mean(0, keepdim=True)

    def attention(self, lctx: LayerCtx):
        if self.cfg.selection != "attn" or not self._records_cache(lctx.si):
            return None
        if lctx.li == 0:
            self.attn_map = None

        def sink(stats):
            mass = stats["key_mass"]                       # [rows, Lk]; this scale's keys are the last Kq
            kq = stats["query_entropy"].shape[-1]
            n = lctx.scale.hw[0] * lctx.scale.hw[1]
            if self.attn_map is None or self.attn_map.shape != (mass.shape[0], n):
                self.attn_map = torch.zeros(mass.shape[0], n, device=mass.device)
            idx = (self._sel.keep_idx if self._sel is not None else torch.arange(n)[None]).to(mass.device)
            self.attn_map = self.attn_map.scatter(1, idx.expand(mass.shape[0], -1), mass[:, -kq:].float())
            if lctx.li == 0:
                self.attn_prev = (self.attn_map.clone(), lctx.scale.hw)

        return reference_attention(sink)

    def plan_scale(self, sctx: ScaleCtx):
        c = self.cfg
        if sctx.si == 0 and sctx.batch > 1:   # issue 25 item 4: the maps below keep one image ([:1])
            raise UserError(f"nova decides per image (t*, Ratio_t, H̄_t,j and the kept sets come from each image's own "
                            f"entropy, and one Selection serves the whole batch): generate() takes one prompt per "
                            f"call, got {sctx.batch} (the runner generates NOVA at batch_size=1)")
        if sctx.si == 0 and sctx.schedule:
            self.schedule_warning = self.check_schedule(sctx.schedule)
        skip = (c.ratio_one_means == "skip_scale" and bool(c.fixed_ratios) and self._active(sctx.si)
                and c.fixed_ratios.get(sctx.rule_w, 0.0) >= 1.0)
        if skip:
            self.claim_skip(sctx)
        return ScalePlan(skip=skip)

    def _restore_base(self, lctx: LayerCtx, x_in: torch.Tensor) -> torch.Tensor:
        """Eq. 16: input + the same block's residual at the previous scale, interpolated to this grid."""
        return self.cache.restore(lctx.li, x_in, lctx.scale.hw, self.cfg.interp)

    def restore(self, lctx, x_in, y_kept, sel):
        base = self._restore_base(lctx, x_in)
        return sel.scatter(y_kept, base, inplace=base is not x_in)

    def after_layer(self, lctx: LayerCtx, x_in, x_out) -> None:
        if self._records_cache(lctx.si):  # Eq. 15, recorded speculatively until t* is known
            res, dtype = x_out - x_in, CACHE_DTYPES[self.cfg.cache_dtype]
            self.cache.put(lctx.li, res if dtype is None else res.to(dtype), lctx.scale.hw)
            if self.cfg.layer_entropy_source == "prev_scale_lens":
                self.prev_lens[lctx.li] = (*self._lens(lctx, x_out), lctx.scale.hw)

    def after_logits(self, sctx: ScaleCtx, lc, lu, lg):
        stat, rank = self._maps(lc, lu, lg, sctx.spec)
        self.H.append(stat.mean().item())
        self.prev_final = (stat, rank, sctx.hw)
        if self.t_star is None:
            self.t_star = detect_inflection(self.H, self.cfg.t_est, self.cfg.alpha, self.cfg.eta_nonpositive)
        return None

    def summary(self) -> dict:
        H, c = self.H, self.cfg
        eta = early_baseline(H, c.t_est) if len(H) >= c.t_est else None
        return {"t_star": self.t_star, "activated": self.t_star is not None and self.t_star + 1 <= len(H),
                "first_pruned_si": None if self.t_star is None else self.t_star,  # 0-based index of scale t*+1
                "eta": eta, "entropy_per_scale": H, "growth": growth_rates(H),
                "scale_ratio_raw": {str(k): v for k, v in self.scale_ratio_raw.items()},
                "ratios": {str(k): v for k, v in self.ratios.items()},
                "layer_entropy": {str(k): v for k, v in self.layer_H.items()},
                "schedule_warning": self.schedule_warning}

    @classmethod
    def aggregate(cls, summaries: list[dict]) -> dict[str, tuple[float, int]]:
        """activation_rate (share of images where Eq. 10 fired in time to prune), the mean t*, and
        scale_ratio_clip_rate (share of pruned scales whose Ratio_t fell outside [0, 1] before clipping)."""
        out = {"activation_rate": (sum(bool(s.get("activated")) for s in summaries) / max(1, len(summaries)),
                                   len(summaries))}
        stars = [s["t_star"] for s in summaries if s.get("t_star") is not None]
        if stars:
            out["t_star_mean"] = (sum(stars) / len(stars), len(stars))
        raw = [r for s in summaries for r in (s.get("scale_ratio_raw") or {}).values()]
        if raw:
            out["scale_ratio_clip_rate"] = (sum(not 0.0 <= r <= 1.0 for r in raw) / len(raw), len(raw))
        return out

    @classmethod
    def report(cls, records: list[dict], out_dir, title: str = "") -> list:
        """Fig. 4b / Fig. 8: entropy per scale with the activation scale, and the distribution of t*."""
        png = plot_entropy_activation(records, Path(out_dir) / "entropy_activation.png", title)
        return [png] if png else []
