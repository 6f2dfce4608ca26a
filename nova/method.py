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

Where the paper is ambiguous we follow ``shared/specs/methods.md`` §2.3 and expose the alternatives:
  entropy         sum of the bits' binary entropies in nats (``entropy_reduction: sum|mean_bit``, ``log_base: e|2``)
  entropy_branch  ``guided`` (CFG-mixed logits after temperature, before top-k/top-p; default) | ``cond``
  g_t causality   Eq. 11 at scale t uses g_{t−1}, the newest growth rate known when scale t starts (§2.3 d)
  H̄_{t,j}         mean logit-lens entropy of block j's *input* at scale t (``layer_entropy_source: input_lens``);
                  the same map ranks the tokens (keep the highest-entropy ones)
  CFG rows        one kept set for both rows from the guided lens map (``cfg_index_mode: shared|per_branch``)
  caching         residuals recorded from scale t_est+1 on (t* is known only after scale t* ends); ``interp: area``
  clipping        computed ratios clipped to [0, r_max]; ratio 1 bypasses the block (no compute, no K/V)
  η ≤ 0           ``eta_nonpositive: literal|activate_immediately|never``
Ablations are configs of this class (``conf/method/nova_*.yaml``): ``scale_linkage``, ``layer_linkage``,
``fixed_ratios`` (per grid side, Table 5), ``selection: entropy|mse`` (Table 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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




# ------------------------------------------------------------------ the method
@dataclass
class NovaConfig(MethodConfig):
    name: str = "nova"
    family: str = "nova"
    t_est: int = 5
    alpha: float = 0.5
    sigmoid_tau: float = 0.8          # NOVA's τ in Eq. 11 (not the sampling temperature)
    lam: float = 0.1                  # λ in Eq. 11
    r_max: float = 1.0
    min_keep: int = 0
    scale_linkage: bool = True        # Eq. 11; False requires fixed_ratios
    layer_linkage: bool = True        # Eqs. 12-13
    fixed_ratios: dict | None = None  # {grid width: ratio}: Table 5's baseline schedules instead of Eq. 11
    selection: str = "entropy"        # entropy | mse | attn (Table 4)
    ratio_one_means: str = "bypass_blocks"  # bypass_blocks | skip_scale (a fixed ratio of 1 skips the scale)
    entropy_branch: str = "guided"    # guided | cond
    entropy_reduction: str = "sum"    # sum | mean_bit
    log_base: str = "e"               # e | 2
    cfg_index_mode: str = "shared"    # shared | per_branch
    interp: str = "area"              # area | bilinear | bicubic | nearest
    eta_nonpositive: str = "literal"  # literal | activate_immediately | never
    t_star: int | None = None         # fix the activation scale (1-based) instead of detecting it
    ratio_override: float | None = None  # force every (scale, layer) ratio at active scales (tests, sweeps)
    record_layer_entropy: bool = True

    def __post_init__(self):
        choices = {"selection": ("entropy", "mse", "attn"), "ratio_one_means": ("bypass_blocks", "skip_scale"), "entropy_branch": ("guided", "cond"),
                   "entropy_reduction": ("sum", "mean_bit"), "log_base": ("e", "2"),
                   "cfg_index_mode": ("shared", "per_branch"), "interp": ("area", "bilinear", "bicubic", "nearest"),
                   "eta_nonpositive": ("literal", "activate_immediately", "never")}
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
        if self.t_est < 2 or not 0 < self.alpha:
            raise UserError("nova.t_est must be >= 2 and nova.alpha > 0")


class Nova(Method):
    CITATION = CITATION
    STATUS = "reimplemented from the paper (no official code); readings in the README"
    Config = NovaConfig
    NOOP = {"r_max": 0.0}      # every ratio clipped to 0: the lens runs, every token is computed
    batch_rectangular = False  # t* and the kept sets are per image
    cfg: NovaConfig

    def reset(self) -> None:
        self.H: list[float] = []                 # H̄_t per computed scale
        self.t_star: int | None = self.cfg.t_star
        self.cache = ResidualCache()             # li -> residual [rows, n, C] of block li at the last scale
        self.ratios: dict[int, list] = {}        # si -> [ratio per layer]
        self.layer_H: dict[int, list] = {}       # si -> [H̄_{t,j} per layer]
        self._scale_base: float | None = None
        self.attn_map: torch.Tensor | None = None   # [rows, n]: attention mass each token of this scale received
        self.attn_prev: tuple | None = None         # the last layer's map at the previous scale, (map, hw)
        self._sel: Selection | None = None

    # -- entropy of a logits tensor in the configured unit
    def _entropy(self, logits: torch.Tensor, head_type: str, d: int) -> torch.Tensor:
        e = token_entropy(logits, head_type)
        if self.cfg.entropy_reduction == "mean_bit" and head_type == "bitwise":
            e = e / d
        return e / math.log(2) if self.cfg.log_base == "2" else e

    def _maps(self, lc, lu, lg, spec) -> tuple[torch.Tensor, torch.Tensor]:
        """(statistics map [1, n], ranking map [1 or rows, n]) from (cond, uncond, guided) logits.

        Statistics (H̄_t, H̄_{t,j}) use ``entropy_branch``: the guided logits, or the raw conditional ones.
        ``cfg_index_mode: per_branch`` ranks each CFG row by its own raw branch entropy (FastVAR-like layout)."""
        ent = lambda x: self._entropy(x, spec.head_type, spec.head_dim_out)  # noqa: E731
        stat = ent(lc if self.cfg.entropy_branch == "cond" else lg)[:1]
        if self.cfg.cfg_index_mode == "per_branch" and lu is not None:
            return stat, torch.cat([ent(lc), ent(lu)], 0)
        return stat, stat

    def _active(self, si: int) -> bool:
        return self.t_star is not None and si + 1 >= self.t_star + 1

    def _base_ratio(self, sctx: ScaleCtx) -> float:
        t, c = sctx.si + 1, self.cfg
        if c.fixed_ratios:
            return c.fixed_ratios.get(sctx.rule_w, 0.0)
        g_prev = self.H[-1] - self.H[-2] if len(self.H) >= 2 else 0.0
        return scale_ratio(t, self.t_star, g_prev, c.sigmoid_tau, c.lam)

    # -- hooks
    def select(self, lctx: LayerCtx, x: torch.Tensor) -> Selection | None:
        si, li, c = lctx.si, lctx.li, self.cfg
        if not self._active(si):
            return None
        spec = lctx.scale.spec
        if li == 0:
            self._scale_base = self._base_ratio(lctx.scale)
            self.ratios[si], self.layer_H[si] = [], []
        n = x.shape[1]
        need_lens = c.layer_linkage or c.selection == "entropy" or c.record_layer_entropy or li not in self.cache
        stat, rank = self._maps(*lctx.guide(lctx.head_logits(x)), spec) if need_lens else (None, None)
        if stat is not None:
            self.layer_H[si].append(stat.mean().item())
        if c.ratio_override is not None:
            r = c.ratio_override
        elif c.layer_linkage:
            r = layer_ratio(self._scale_base, self.layer_H[si])
        else:
            r = self._scale_base
        r = min(max(r, 0.0), c.r_max)
        self.ratios[si].append(r)
        k = keep_count(n, r, c.r_max, c.min_keep)
        self.claim(lctx, min(k, n))
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
        self._sel = Selection.top_k(score, k)
        return self._sel

    # -- NOVA w/ Attn (Table 4; our operational reading, methods.md §2.4): rank by the attention mass a token
    #    received from the current scale's queries in block j-1 (block 1: the previous scale's last block, resized)
    def _attn_score(self, lctx: LayerCtx, n: int) -> torch.Tensor:
        if lctx.li == 0 or self.attn_map is None:
            m, hw = self.attn_prev
            return resize_grid(m[..., None], hw, lctx.scale.hw, self.cfg.interp)[..., 0].mean(0, keepdim=True)
        return self.attn_map.mean(0, keepdim=True)

    def attention(self, lctx: LayerCtx):
        if self.cfg.selection != "attn" or lctx.si + 1 < self.cfg.t_est + 1:
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
            if lctx.li == lctx.scale.spec.depth - 1:
                self.attn_prev = (self.attn_map.clone(), lctx.scale.hw)

        return reference_attention(sink)

    def plan_scale(self, sctx: ScaleCtx):
        c = self.cfg
        skip = (c.ratio_one_means == "skip_scale" and bool(c.fixed_ratios) and self._active(sctx.si)
                and c.fixed_ratios.get(sctx.rule_w, 0.0) >= 1.0)
        if skip:
            self.claim_skip(sctx)
        return ScalePlan(skip=skip)

    def _restore_base(self, lctx: LayerCtx, x_in: torch.Tensor) -> torch.Tensor:
        """Eq. 16: input + the same block's residual at the previous scale, interpolated to this grid."""
        return self.cache.restore(lctx.li, x_in, lctx.scale.hw, self.cfg.interp)

    def restore(self, lctx, x_in, y_kept, sel):
        return sel.scatter(y_kept, self._restore_base(lctx, x_in))

    def after_layer(self, lctx: LayerCtx, x_in, x_out) -> None:
        if lctx.si + 1 >= self.cfg.t_est + 1:  # Eq. 15, recorded speculatively until t* is known
            self.cache.put(lctx.li, x_out - x_in, lctx.scale.hw)

    def after_logits(self, sctx: ScaleCtx, lc, lu, lg):
        stat, _ = self._maps(lc, lu, lg, sctx.spec)
        self.H.append(stat.mean().item())
        if self.t_star is None:
            self.t_star = detect_inflection(self.H, self.cfg.t_est, self.cfg.alpha, self.cfg.eta_nonpositive)
        return None

    def summary(self) -> dict:
        H, c = self.H, self.cfg
        eta = early_baseline(H, c.t_est) if len(H) >= c.t_est else None
        return {"t_star": self.t_star, "activated": self.t_star is not None and self.t_star + 1 <= len(H),
                "first_pruned_si": None if self.t_star is None else self.t_star,  # 0-based index of scale t*+1
                "eta": eta, "entropy_per_scale": H, "growth": growth_rates(H),
                "ratios": {str(k): v for k, v in self.ratios.items()},
                "layer_entropy": {str(k): v for k, v in self.layer_H.items()}}

    @classmethod
    def aggregate(cls, summaries: list[dict]) -> dict[str, tuple[float, int]]:
        """activation_rate (share of images where Eq. 10 fired in time to prune) and the mean t*."""
        out = {"activation_rate": (sum(bool(s.get("activated")) for s in summaries) / max(1, len(summaries)),
                                   len(summaries))}
        stars = [s["t_star"] for s in summaries if s.get("t_star") is not None]
        if stars:
            out["t_star_mean"] = (sum(stars) / len(stars), len(stars))
        return out
