"""ToProVAR: attention-entropy token pruning for next-scale VAR models (ICLR 2026, arXiv 2602.22948).

RECONSTRUCTED from the paper (no public code); every reading below is ``shared/specs/toprovar_sparvar.md`` §3, and
each GUESS of §3.5 is a default with its alternatives as options:

  entropy   per-query attention entropy over all visible keys, head-mean, from the exact streaming accumulator
            (``varbench/attention_entropy.py``: H = m + ln l − A/l, chunked over keys; never the full matrix).
            The layer output stays SDPA's (``output: sdpa``) so that an inactive ToProVAR is bit-identical to
            ``method=none``; ``output: fae`` returns the streaming kernel's own output (the paper's fused kernel).
  depth D   ρ_s = share of tokens whose (layer- and head-mean) entropy is below the scale mean; tested from
            s_rep = 6 on (guard), D = the next scale after the first s whose ρ_s passes τ = 0.4 (one-scale lag;
            ``rho_source: first_layer`` tests layer 0 of the same scale instead). ``d_direction``: ge (Eq. 3),
            le (Eq. 13) or auto (GUESS: the direction ρ moved since scale 1). Never crossed: no pruning.
  layers    at s_rep the layer's entropy map (h×w) gives ϱ = σ1/σ2 (``torch.linalg.svdvals``) and
            R = exp(−β(ϱ − 1)); R → 0 Global (protected), R → 1 Detail.
  gate      q_i = φ(s)·R_l·Ĥ_i, φ = (si+1)/S_max, Ĥ = H / mean(H) (``normalize: mean``; the literal Eq. 5
            ``sum`` makes the gate ≈ α_min); p_prune = clip(α_min + (α_max − α_min)·q, 0, 1); keep
            K = N − round(Σ p_prune) lowest-q tokens (``keep: deterministic``; ``bernoulli`` samples, seeded).
            α_min = 0, α_max = 0.9, β = 1 (GUESS; ``scripts/calibrate_toprovar.py`` fits τ and β).
  H source  the map of the most recent computed layer of the same scale (pruned entries filled from the last map
            that had them; layer 0 from the previous scale resized) (``gate_entropy: same_scale``) or the same
            layer at the previous scale (``prev_scale_same_layer``).
  CFG rows  mean of cond and uncond maps, one kept set for both (``cfg_rows: mean|cond|per_row``).
  pruned    tokens skip the whole block (identity) and add no K/V at that layer (``granularity = "block"``).
  variants  ``variant: full|scale_only|scale_token|scale_layer|fixed_exit`` (paper Tables 4/10; spec §3.6);
            ``skip_last: 2`` reproduces the paper's likely Infinity-2B 11-scale setting (S_max = computed scales).

β must be calibrated per backbone: ϱ = σ1/σ2 of a positive entropy map is ≫ 1 (tiny models: tens to 10⁴), so with
β = 1 R ≈ 0 in every layer and nothing is pruned. Each image's summary records ϱ and R per layer; when R < 1e-3 in
every layer of every image of a run, :meth:`ToProVAR.report` prints one line naming the ϱ range and the calibration
command (``scripts/calibrate_toprovar.py``).

Method FLOPs (``method_flops`` in each image's summary, per image; outside the FLOP-ideal count of the model's own
work, ``varbench/flops.py``): the entropy pass over every cached key at every computed layer, rows·K·Lk·(2·C + 2·H)
(QKᵀ and the z·e^{z−m} accumulator, multiply-add = 2) with ``output: sdpa``; rows·K·Lk·2·H with ``output: fae``
(the fused pass is the layer's attention, only the accumulator is extra); plus the SVD at s_rep, 4·m·n² − 4n³/3 per
layer (m ≥ n, singular values only). Exponentials, logs and the gate's per-token arithmetic are not counted (as the
model's softmax is not). The kernel attends every cached key, so it sets no ``ctx.attn_keys``: the loop's fallback
(the whole cache after the layer) is what it computes.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from varbench.attention import sdpa_attention
from varbench.attention_entropy import streaming_attention_entropy
from varbench.errors import UserError
from varbench.hooks import LayerCtx, Method, MethodConfig, ScaleCtx, ScalePlan
from varbench.tokens import Selection, resize_grid

CITATION = "ToProVAR, arXiv 2602.22948 (ICLR 2026; no public code); shared/specs/toprovar_sparvar.md §3"
NOTICE_R = 1e-3          # run notice: R below this in every layer of every image = the layer gate prunes nothing
CALIBRATE = ("python scripts/calibrate_toprovar.py --model {model} (writes conf/method/toprovar_{model}.yaml; "
             "then method=toprovar_{model})")


def svd_flops(m: int, n: int) -> float:
    """Singular values of an m×n matrix by Golub–Kahan bidiagonalisation: 4·m·n² − 4n³/3 (m ≥ n)."""
    m, n = max(m, n), min(m, n)
    return 4.0 * m * n * n - 4.0 * n ** 3 / 3.0


# ------------------------------------------------------------------ equations (pure)
def low_entropy_ratio(H: torch.Tensor) -> float:
    """ρ_s: share of tokens whose entropy is below the mean of the map (any shape)."""
    H = H.flatten().float()
    return float((H < H.mean()).float().mean())


def depth_test(rhos: dict[int, float], si: int, tau: float, direction: str) -> bool:
    """Does ρ at scale si pass τ? ``ge``: ρ ≥ τ; ``le``: ρ ≤ τ; ``auto``: le if ρ fell since scale 1, else ge."""
    r = rhos[si]
    if direction == "auto":
        first = rhos.get(1, rhos[min(rhos)])
        direction = "le" if r < first else "ge"
    return r >= tau if direction == "ge" else r <= tau


def layer_score(X: torch.Tensor, beta: float) -> tuple[float, float]:
    """(ϱ = σ1/σ2 of the h×w map, R = exp(−β(ϱ − 1)))."""
    s = torch.linalg.svdvals(X.double())
    if s.numel() < 2 or s[1] <= 0:
        return math.inf, 0.0
    rho = float(s[0] / s[1])
    return rho, math.exp(-beta * (rho - 1.0))


def prune_probability(H: torch.Tensor, phi: float, R: float, a_min: float, a_max: float, normalize: str):
    """(q, p_prune) per token of a [rows, n] entropy map (Eqs. 5–6)."""
    H = H.float()
    denom = H.mean(-1, keepdim=True) if normalize == "mean" else H.sum(-1, keepdim=True)
    Hn = H / denom.clamp_min(1e-12)
    q = phi * R * Hn
    return q, (a_min + (a_max - a_min) * q).clamp(0.0, 1.0)


# ------------------------------------------------------------------ the method
@dataclass
class ToProVARConfig(MethodConfig):
    name: str = "toprovar"
    family: str = "toprovar"
    tau: float = 0.4
    d_direction: str = "auto"          # auto | ge (Eq. 3) | le (Eq. 13)
    rho_source: str = "mean_layers"    # mean_layers (D from the next scale) | first_layer (same scale, after layer 0)
    s_rep: int = 6                     # SVD scale and guard of the D test (0-based)
    beta: float = 1.0
    alpha_min: float = 0.0
    alpha_max: float = 0.9
    normalize: str = "mean"            # mean | sum (literal Eq. 5)
    keep: str = "deterministic"        # deterministic | bernoulli
    seed: int = 0                      # bernoulli only
    gate_entropy: str = "same_scale"   # same_scale | prev_scale_same_layer
    cfg_rows: str = "mean"             # mean | cond | per_row
    variant: str = "full"              # full | scale_only | scale_token | scale_layer | fixed_exit
    detail_threshold: float = 0.5      # scale_layer: Detail layers (R >= this) are skipped
    fixed_exit_from_end: int = 3       # fixed_exit: skip scales >= T - this (si 10 of 13)
    skip_last: int = 0                 # 2: the paper's likely Infinity-2B 11-scale setting
    output: str = "sdpa"               # sdpa | fae
    k_chunk: int = 1024

    def __post_init__(self):
        choices = {"d_direction": ("auto", "ge", "le"), "rho_source": ("mean_layers", "first_layer"),
                   "normalize": ("mean", "sum"), "keep": ("deterministic", "bernoulli"),
                   "gate_entropy": ("same_scale", "prev_scale_same_layer"), "cfg_rows": ("mean", "cond", "per_row"),
                   "variant": ("full", "scale_only", "scale_token", "scale_layer", "fixed_exit"),
                   "output": ("sdpa", "fae")}
        for k, ok in choices.items():
            if getattr(self, k) not in ok:
                raise UserError(f"toprovar.{k} must be one of {ok}, got {getattr(self, k)!r}")
        if not 0.0 <= self.alpha_min <= self.alpha_max <= 1.0:
            raise UserError(f"toprovar needs 0 <= alpha_min <= alpha_max <= 1 in [0, 1], got "
                            f"{self.alpha_min}, {self.alpha_max}")
        if self.beta <= 0 or self.k_chunk < 1:
            raise UserError("toprovar.beta must be > 0 and k_chunk >= 1")
        if self.keep == "bernoulli" and self.cfg_rows == "per_row":
            raise UserError("toprovar.keep=bernoulli needs one kept set for both CFG rows (cfg_rows mean|cond)")


class ToProVAR(Method):
    CITATION = CITATION
    STATUS = "reconstructed from the paper (no public code); GUESS defaults in the README"
    Config = ToProVARConfig
    NOOP = {"tau": 2.0, "d_direction": "ge"}   # ρ <= 1 never reaches τ: entropy is computed, nothing is pruned
    batch_rectangular = False                  # D and R are per image
    cfg: ToProVARConfig

    def reset(self) -> None:
        self.D: int | None = None
        self.rho: dict[int, float] = {}
        self.varrho: list[float] = []
        self.R: list[float] | None = None
        self.kept: dict[int, list[int]] = {}          # si -> K per layer (N when unpruned)
        self.skipped: list[int] = []
        self._cur: torch.Tensor | None = None         # filled map [rows, n] of the latest layer at this scale
        self._maps: dict[int, torch.Tensor] = {}      # li -> filled map at the current scale
        self._prev: tuple[torch.Tensor, tuple] | None = None   # (last layer's map, hw) of the previous scale
        self._prev_layers: dict[int, tuple] = {}      # li -> (map, hw) at the previous scale
        self._sel: Selection | None = None
        self._si = -1
        self.pruned_tokens = 0                        # Σ over (scale, layer) of N − K where K < N
        self._mflops = 0.0                            # method FLOPs of the batch (module doc)
        self._batch = 1

    # -- helpers
    def _combine(self, m: torch.Tensor, batch: int) -> torch.Tensor:
        """[rows, n] -> the rows the gate uses: mean of cond/uncond, cond only, or every row."""
        if m.shape[0] <= batch or self.cfg.cfg_rows == "per_row":
            return m
        return m[:batch] if self.cfg.cfg_rows == "cond" else (m[:batch] + m[batch:2 * batch]) / 2

    def _new_scale(self, sctx: ScaleCtx) -> None:
        if self._si == sctx.si:
            return
        if self._cur is not None:
            self._prev = (self._cur, self._hw)
            self._prev_layers = {li: (m, self._hw) for li, m in self._maps.items()}
        self._si, self._hw, self._cur, self._maps = sctx.si, sctx.hw, None, {}

    def _resized(self, hit, hw, rows: int, n: int) -> torch.Tensor | None:
        if hit is None:
            return None
        m, src = hit
        if m.shape[0] != rows:
            m = m[:rows]
        if m.shape[1] != src[0] * src[1]:     # HART's scale 0 (text-context tokens, no grid): its mean everywhere
            return m.mean(1, keepdim=True).expand(-1, n).contiguous()
        if tuple(src) == tuple(hw) and m.shape[1] == n:
            return m
        return resize_grid(m[..., None], src, hw, "bilinear")[..., 0]

    # -- the attention kernel: exact streaming entropy everywhere (the paper keeps FAE on)
    def attention(self, lctx: LayerCtx):
        self._new_scale(lctx.scale)
        return self._kernel

    def _kernel(self, q, k, v, *, scale, mask=None, ctx=None):
        fae = self.cfg.output == "fae"
        out, H = streaming_attention_entropy(q, k, v, scale=scale, mask=mask, k_chunk=self.cfg.k_chunk,
                                             want_output=fae)
        if not fae:
            out = sdpa_attention(q, k, v, scale=scale, mask=mask)
        rows, heads, K, d = q.shape
        per_key = 2 * heads if fae else 2 * heads * d + 2 * heads
        self._mflops += float(rows * K * k.shape[2] * per_key)
        self._batch = ctx.scale.batch
        self._record(ctx, H.mean(1))
        return out

    def _record(self, ctx: LayerCtx, e: torch.Tensor) -> None:
        rows, n = e.shape[0], ctx.scale.n
        if e.shape[1] == n:
            full = e
        else:
            base = self._cur if self._cur is not None else self._resized(self._prev, ctx.scale.hw, rows, n)
            if base is None:
                base = e.new_zeros(rows, n)
            full = self._sel.scatter(e[..., None], base[..., None])[..., 0]
        self._cur = self._maps[ctx.li] = full.float()

    # -- depth and layer decisions
    def _test_depth(self, si: int, H_scale: torch.Tensor, batch: int) -> bool:
        self.rho[si] = low_entropy_ratio(self._combine(H_scale, batch)[0])
        return si >= self.cfg.s_rep and depth_test(self.rho, si, self.cfg.tau, self.cfg.d_direction)

    def after_scale(self, sctx: ScaleCtx, state) -> None:
        si, c = sctx.si, self.cfg
        if not self._maps:
            return
        if si == c.s_rep and self.R is None:
            self.varrho, self.R = [], []
            for li in sorted(self._maps):
                X = self._combine(self._maps[li], sctx.batch)[0].view(*sctx.hw)
                vr, R = layer_score(X, c.beta)
                self._mflops += svd_flops(*X.shape)
                self.varrho.append(vr)
                self.R.append(R)
        if self.D is None and c.rho_source == "mean_layers":
            Hs = torch.stack([self._maps[li] for li in sorted(self._maps)]).mean(0)
            if self._test_depth(si, Hs, sctx.batch) and si + 1 < sctx.num_scales:
                self.D = si + 1

    def plan_scale(self, sctx: ScaleCtx) -> ScalePlan:
        c, T, si = self.cfg, sctx.num_scales, sctx.si
        skip = (c.skip_last > 0 and si >= T - c.skip_last) \
            or (c.variant == "scale_only" and self.D is not None and si >= self.D) \
            or (c.variant == "fixed_exit" and si >= T - c.fixed_exit_from_end)
        if skip:
            self.skipped.append(si)
            self.claim_skip(sctx)
        return ScalePlan(skip=skip)

    # -- token gate
    def select(self, lctx: LayerCtx, x: torch.Tensor) -> Selection | None:
        self._new_scale(lctx.scale)
        self._sel = None
        c, sctx, si, li = self.cfg, lctx.scale, lctx.si, lctx.li
        n = x.shape[1]
        if self.D is None and c.rho_source == "first_layer" and li >= 1 and si not in self.rho and 0 in self._maps:
            # ρ of every scale from layer 0 (the auto direction compares with scale 1); tested from s_rep + 1 on
            self.rho[si] = low_entropy_ratio(self._combine(self._maps[0], sctx.batch)[0])
            if si > c.s_rep and depth_test(self.rho, si, c.tau, c.d_direction):
                self.D = si
        if self.D is None or si < self.D or self.R is None or c.variant in ("scale_only", "fixed_exit"):
            return None
        R = 1.0 if c.variant == "scale_token" else self.R[li]
        if c.variant == "scale_layer":
            K = 0 if R >= c.detail_threshold else n
            self.kept.setdefault(si, []).append(K)
            if K == n:
                return None
            self.claim(lctx, K)
            self.pruned_tokens += n - K
            self._sel = Selection(torch.zeros(1, 0, dtype=torch.long, device=x.device), n)
            return self._sel
        if c.gate_entropy == "prev_scale_same_layer" or (li == 0 and self._cur is None):
            src = self._prev_layers.get(li) if c.gate_entropy == "prev_scale_same_layer" else self._prev
            Hm = self._resized(src, sctx.hw, x.shape[0], n)
        else:
            Hm = self._cur
        if Hm is None:
            return None
        Hg = self._combine(Hm, sctx.batch)
        phi = (si + 1) / (sctx.num_scales - c.skip_last)
        q, p = prune_probability(Hg, phi, R, c.alpha_min, c.alpha_max, c.normalize)
        if c.keep == "bernoulli":
            g = torch.Generator().manual_seed(c.seed * 1_000_003 + si * 1009 + li)
            keep = torch.rand(p.shape[-1], generator=g).to(p.device) >= p[0]
            idx = keep.nonzero()[:, 0][None]
            K = idx.shape[1]
        else:
            K = n - int(round(float(p[0].sum())))
            idx = None
        self.kept.setdefault(si, []).append(K)
        if K >= n:
            return None
        self.claim(lctx, K)
        self.pruned_tokens += n - K
        self._sel = Selection(idx, n) if idx is not None else Selection.top_k(-q, K)
        return self._sel

    def summary(self) -> dict:
        """Per image: D, ρ per scale, ϱ and R per layer (at s_rep), K per (scale, layer), pruned tokens (Σ N − K),
        skipped scales, β and variant (for the run notice), method FLOPs per image (module doc)."""
        return {"D": self.D, "rho": {str(k): v for k, v in self.rho.items()}, "varrho": self.varrho, "R": self.R,
                "kept": {str(k): v for k, v in self.kept.items()}, "pruned_tokens": self.pruned_tokens,
                "skipped_scales": list(self.skipped), "kernel": "streaming_entropy+" + self.cfg.output,
                "beta": self.cfg.beta, "variant": self.cfg.variant,
                "method_flops": self._mflops / max(1, self._batch)}

    @classmethod
    def aggregate(cls, summaries: list[dict]) -> dict[str, tuple[float, int]]:
        """activation_rate: share of images where ToProVAR removed work (a token pruned or a scale skipped);
        d_reached_rate: share of images where the depth test passed (D set), pruned or not; D_mean over those."""
        n = len(summaries)
        acted = sum(bool(s.get("pruned_tokens")) or bool(s.get("skipped_scales")) for s in summaries)
        out = {"activation_rate": (acted / max(1, n), n),
               "d_reached_rate": (sum(s.get("D") is not None for s in summaries) / max(1, n), n)}
        Ds = [s["D"] for s in summaries if s.get("D") is not None]
        if Ds:
            out["D_mean"] = (sum(Ds) / len(Ds), len(Ds))
        return out

    @classmethod
    def run_notice(cls, summaries: list[dict], model: str | None = None) -> str | None:
        """One line when R < NOTICE_R in every layer of every image that computed R (variants whose pruning R
        drives: full, scale_layer): the run is the baseline plus the entropy pass. None otherwise."""
        rs = [s for s in summaries if s.get("R")]
        if not rs or any(s.get("variant", "full") not in ("full", "scale_layer") for s in rs):
            return None
        if any(max(s["R"]) >= NOTICE_R for s in rs):
            return None
        vr = [v for s in rs for v in s.get("varrho") or [] if math.isfinite(v)]
        span = f"ϱ = σ1/σ2 in {min(vr):.4g}–{max(vr):.4g}" if vr else "ϱ infinite"
        betas = sorted({s.get("beta") for s in rs if s.get("beta") is not None})
        beta = f"β = {betas[0]:g}" if len(betas) == 1 else "β"
        return (f"toprovar: R = exp(−β(ϱ−1)) < {NOTICE_R:g} in every layer of all {len(rs)} images ({beta}, {span}): "
                f"the layer gate prunes nothing, this row is the baseline plus the entropy pass; calibrate β for this "
                f"backbone: {CALIBRATE.format(model=model or '<model>')}")

    @classmethod
    def report(cls, records: list[dict], out_dir, title: str = "") -> list:
        """Prints :meth:`run_notice` (one line per run; ``title`` = "<model> / <method> / <bench>")."""
        line = cls.run_notice([r.get("method_summary") or {} for r in records],
                              title.split(" / ")[0] if " / " in title else None)
        if line:
            print(f"[varbench] notice: {line}", file=sys.stderr)
        return []
