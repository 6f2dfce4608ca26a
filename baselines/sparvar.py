"""SparVAR: training-free sparse attention for next-scale VAR models (Li et al., CVPR 2026, arXiv 2602.04361).

Behaviour of the authors' first-party code (Weepingchestnut/Lvar @f94b7ec, ``models/sparvar/*``, the CVPR
"conference behaviour"), as written down in ``shared/specs/toprovar_sparvar.md`` §2; our own code. No token is
pruned: only the self-attention kernel changes, per (scale si, layer l), with S the decision scale and L_b the bound
layer (Infinity-1M, 13 scales: S = 10, L_b = 10):

  si < S,  l <= L_b      dense
  si = S,  l <= L_b      CS4A-decide: dense output; per 192-query group the top-k keys by exact column mass
                         (k = 112·round(0.2·P_S/112) = 784), and the O-cache C = O_dense − O_selected
  si > S,  l <= L_b      CS4A-sparse: the source group γ(g) = round((g+½)·G_src/G − ½) keeps its key set at absolute KV
                         positions; plus a contiguous run in the current scale covering the union of the group's
                         w×w windows (w = 7, 9), length aligned to 112 (560, 784); softmax over those keys only, plus
                         the O-cache bilinearly resized to the current grid. The set used at si is the source of si+1.
  si >= T−3, l > L_b     CSLA (dense at si < T−3): every query sees the first 5 scales (sinks) and a window of side
                         [1, 1, 3, 5, 7] on the last five key scales (centre round(y/n_q·n_a)); the mask is coarsened
                         to 128×128 tiles and a tile is computed entirely when any entry is set.

Scales are anchored as the authors' code anchors them (``scale_anchor: absolute``, the default): CSLA runs on the
last ``csla_scales`` (3) scales of the schedule whatever S is (Lvar @f94b7ec models/sparvar/sparvar_model.py:289-318
builds FlexAttention masks for si = 10, 11, 12 only and passes ``spattn_compile_list[si]`` at :632;
basic_sparvar.py:365-377 dispatches CSLA for l > L_b wherever that mask exists, CS4A-decide at si == S and CS4A-sparse
at si > S for l <= L_b, dense otherwise), and the CS4A local window of scale si is indexed by absolute scale
(sparse_attn.py:904-905 slices ``cs4a_ws`` = [1 × 11, 7, 9] at S+1 from its end): ``cs4a_windows`` lists the windows
of the last len() scales, earlier scales get ``cs4a_window_fill`` (1). With S = 9 on 13 scales this gives dense
layers > L_b at si = 9 and local runs 224/560/784 at si = 10/11/12. ``scale_anchor: decision`` keeps our former
reading (CSLA from S up, windows counted from S+1: runs 448/672/784 for S = 9); both agree at the default S = 10.

Other schedules (GUESS, spec §2.6 item 4; the code hard-codes the 13-scale one): everything is relative to the
schedule end — S = T − ``decision_from_end`` (3), CSLA on the last ``csla_scales`` (3) query scales, the CSLA windows
cover the last len(windows) key scales, the CS4A windows the last len(cs4a_windows) scales — and, on models shallower
than ``bound_layer_ref_depth`` (32), the bound layer is mapped proportionally: L_b' = round((L_b + 1)·depth/32) − 1
(``bound_layer_scaling: absolute`` keeps 10). A local run longer than its scale is the whole scale (never reaches
into the previous scale).

Kernels (``kernel: auto|reference|fast``; auto = fast on CUDA, reference elsewhere): the masked references are exact
softmaxes over the chosen key sets, chunked over query groups / tile rows; the fast paths are a gather + SDPA per
query group (CS4A) and ``flex_attention`` with a BlockMask built once per (schedule, scale) (CSLA). Which kernel ran
is in each image's summary. Kernels report the keys each query attended (``ctx.attn_keys``) for the FLOP-ideal
speedup: |J| for CS4A-sparse, keys in active tiles for CSLA, P at the decision scale (the dense pass that gives the
layer's output). The rest of the decision is the method's own work, counted apart as ``method_flops`` (per image,
in the summary; ``varbench/flops.py``): per decision layer rows·N_S·(0.5·P + k)·4·C in the Triton convention
(``decision_flops: triton``, default: the column-mass pass computes QKᵀ again without AV, 0.5·P, then the
selected-only pass over k keys; total with the dense pass 1.5·P + k) or rows·N_S·(1.5·P + k)·4·C (``cuda``: the
authors' CUDA provider runs ThunderKittens' dense pass and then Triton's dense + column-mass kernel, Lvar @f94b7ec
kernels/sparse_attn/sparse_attn_ops.py:127-132, ≈ 2.5·P + k in all). Top-k, the O-cache and its resize are not
counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from varbench.attention import sdpa_attention
from varbench.errors import UserError
from varbench.hooks import LayerCtx, Method, MethodConfig, ScaleCtx, ScalePlan

CITATION = ("SparVAR, arXiv 2602.04361 (CVPR 2026); first-party code Weepingchestnut/Lvar @f94b7ec models/sparvar/; "
            "shared/specs/toprovar_sparvar.md §2")


# ------------------------------------------------------------------ geometry (pure; spec §2.3, tested in §2.9)
def offsets(ns: list[int]) -> list[int]:
    """Start of each scale's block on the KV axis, plus the total: [0, n0, n0+n1, ...]."""
    out = [0]
    for n in ns:
        out.append(out[-1] + n)
    return out


def topk_budget(P: int, ratio: float, align: int) -> int:
    """Keys kept per query group at the decision scale: align·round(ratio·P/align) (half-to-even), >= align, <= P."""
    return min(P, max(align, align * round(ratio * P / align)))


def group_map(g_src: int, g_tgt: int) -> torch.Tensor:
    """Source group of each target group: clamp(round((g+½)·G_src/G_tgt − ½), 0, G_src−1), half-to-even."""
    c = (torch.arange(g_tgt, dtype=torch.float32) + 0.5) / g_tgt * g_src - 0.5
    return torch.round(c).long().clamp_(0, g_src - 1)


def local_runs(h: int, w: int, win: int, group: int, align: int) -> tuple[torch.Tensor, int, list[int]]:
    """(start offset within the scale per query group [G], run length L, union size per group) for CS4A-sparse.

    The union of the clamped win×win windows of a group's queries; L = align·ceil(max union/align), at most h·w;
    each run starts at its union's smallest index, shifted left so that it ends inside the scale."""
    n = h * w
    G = math.ceil(n / group)
    marks = torch.zeros(G, n)
    for g in range(G):
        marks[g, g * group:(g + 1) * group] = 1.0
    r = win // 2
    cover = F.max_pool2d(marks.view(G, 1, h, w), win, stride=1, padding=r).view(G, n) > 0 if win > 1 \
        else marks > 0
    sizes = cover.sum(1).tolist()
    L = min(n, align * math.ceil(max(sizes) / align))
    first = cover.float().argmax(1)
    return (first.clamp(max=n - L)).long(), L, [int(s) for s in sizes]


def csla_windows_per_key_scale(T: int, windows: list[int]) -> list[int]:
    """Window side per key scale 0..T−1: ``windows`` on the last len(windows) scales, −1 (no local keys) before."""
    k = len(windows)
    return [-1] * max(0, T - k) + list(windows)[max(0, k - T):]


def csla_token_mask(hws: list[tuple[int, int]], ns: list[int], si: int, sink_scales: int,
                    windows: list[int]) -> torch.Tensor:
    """Boolean [N_si, P_si]: sink keys (first ``sink_scales`` scales) or keys within ⌊w_a/2⌋ of the query's centre
    round(y/n_q·n_a) (float32, half-to-even) on key scale a."""
    T = len(hws)
    wins = csla_windows_per_key_scale(T, windows)
    hq, wq = hws[si]
    parts = []
    for a in range(si + 1):
        if a < sink_scales:
            parts.append(torch.ones(hq * wq, ns[a], dtype=torch.bool))
            continue
        ha, wa = hws[a]
        rad = math.floor(wins[a] / 2)
        if rad < 0:
            parts.append(torch.zeros(hq * wq, ns[a], dtype=torch.bool))
            continue
        cy = torch.round(torch.arange(hq, dtype=torch.float32) / hq * ha)
        cx = torch.round(torch.arange(wq, dtype=torch.float32) / wq * wa)
        my = (cy[:, None] - torch.arange(ha, dtype=torch.float32)[None]).abs() <= rad    # [hq, ha]
        mx = (cx[:, None] - torch.arange(wa, dtype=torch.float32)[None]).abs() <= rad    # [wq, wa]
        parts.append((my[:, None, :, None] & mx[None, :, None, :]).reshape(hq * wq, ha * wa))
    return torch.cat(parts, 1)


def tile_mask(mask: torch.Tensor, tile: int) -> torch.Tensor:
    """[ceil(N/tile), ceil(P/tile)]: a tile is active when any of its (zero-padded) entries is."""
    N, P = mask.shape
    tn, tp = math.ceil(N / tile), math.ceil(P / tile)
    m = F.pad(mask, (0, tp * tile - P, 0, tn * tile - N))
    return m.view(tn, tile, tp, tile).any(3).any(1)


def tiles_to_elements(tiles: torch.Tensor, tile: int, N: int, P: int) -> torch.Tensor:
    return tiles.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:N, :P]


# ------------------------------------------------------------------ kernels (shared helpers)
def _masked_softmax_attn(q, k, v, scale: float, vis, sdpa: bool = False) -> torch.Tensor:
    """Exact softmax attention restricted to ``vis`` (broadcastable bool, True = visible), fp32; ``sdpa``: the same
    through ``scaled_dot_product_attention`` with the mask (no materialised scores on a GPU; the dtype of q)."""
    if sdpa:
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=vis, scale=scale).float()
    s = torch.einsum("bhqc,bhkc->bhqk", q.float(), k.float()) * scale
    s = s.masked_fill(~vis, float("-inf"))
    return torch.einsum("bhqk,bhkc->bhqc", s.softmax(-1), v.float())


def _group_slices(n: int, group: int):
    for g in range(math.ceil(n / group)):
        yield g, slice(g * group, min(n, (g + 1) * group))


def _key_mask(idx, P: int, pos: torch.Tensor | None = None, n_tokens: int = 0) -> torch.Tensor:
    """[rows, H, K] token positions -> bool [rows, H, 1, P] over the cache: key j is visible when its token position
    (``pos`` [rows|1, H|1, P], each below ``n_tokens``; None: j) is in ``idx``."""
    m = torch.zeros(*idx.shape[:2], P if pos is None else n_tokens, dtype=torch.bool, device=idx.device)
    m = m.scatter_(2, idx, True)
    if pos is None:
        return m[:, :, None]
    return m.gather(2, pos.expand(*idx.shape[:2], -1))[:, :, None]


def _gather_keys(k, idx):
    """k [rows, H, P, c], idx [rows, H, G, K] -> [rows, H, G, K, c]."""
    rows, H, G, K = idx.shape
    flat = idx.reshape(rows, H, G * K)[..., None].expand(-1, -1, -1, k.shape[-1])
    return k.gather(2, flat).view(rows, H, G, K, k.shape[-1])


def cs4a_sparse_reference(q, k, v, J, group: int, scale: float, pos: torch.Tensor | None = None,
                          counts: list | None = None, sdpa: bool = False) -> torch.Tensor:
    """Softmax over each query group's key set J[:, :, g] (token positions), fp32; chunked per group. ``pos``: the
    token position of each cached key (a compressed cache: keys of J it dropped are not attended); ``counts``
    gets, per group, the mean number of keys a query attended (over rows and heads)."""
    out = torch.empty(*q.shape[:3], v.shape[-1], device=q.device, dtype=torch.float32)
    n_tokens = 0 if pos is None else int(torch.maximum(pos.max(), J.max())) + 1    # one device sync per call
    for g, sl in _group_slices(q.shape[2], group):
        vis = _key_mask(J[:, :, g], k.shape[2], pos, n_tokens)
        out[:, :, sl] = _masked_softmax_attn(q[:, :, sl], k, v, scale, vis, sdpa)
        if counts is not None:
            counts.append((sl.stop - sl.start) * float(vis.sum(-1).float().mean()))
    return out


def cs4a_sparse_gather(q, k, v, J, group: int, scale: float) -> torch.Tensor:
    """The same as :func:`cs4a_sparse_reference` by gathering each group's keys and one batched SDPA."""
    rows, H, N, c = q.shape
    G = J.shape[2]
    qg = F.pad(q, (0, 0, 0, G * group - N)).view(rows, H, G, group, c)
    kg, vg = _gather_keys(k.to(q.dtype), J), _gather_keys(v.to(q.dtype), J)
    o = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)
    return o.reshape(rows, H, G * group, -1)[:, :, :N]


def cs4a_decide(q, k, v, kk: int, group: int, scale: float):
    """(O_dense, I [rows, H, G, kk] ascending cache positions, O_selected), fp32, exact column mass per group."""
    rows, H, N, _ = q.shape
    P = k.shape[2]
    out = torch.empty(rows, H, N, v.shape[-1], device=q.device, dtype=torch.float32)
    sel = torch.empty_like(out)
    idx = []
    for g, sl in _group_slices(N, group):
        s = torch.einsum("bhqc,bhkc->bhqk", q[:, :, sl].float(), k.float()) * scale
        p = s.softmax(-1)
        out[:, :, sl] = torch.einsum("bhqk,bhkc->bhqc", p, v.float())
        I = p.sum(2).topk(kk, dim=-1).indices.sort(-1).values                # [rows, H, kk]
        idx.append(I)
        sel[:, :, sl] = torch.einsum("bhqk,bhkc->bhqc", s.masked_fill(~_key_mask(I, P), float("-inf")).softmax(-1),
                                     v.float())
    return out, torch.stack(idx, 2), sel


def csla_reference(q, k, v, tiles, tile: int, scale: float, pos: torch.Tensor | None = None,
                   P_full: int | None = None, sdpa: bool = False) -> torch.Tensor:
    """Exact softmax over the keys of each query's active tiles (element mask expanded from tiles), per tile row.
    ``pos`` [rows|1, H|1, P]: the token position of each cached key (a compressed cache; the tiles are over the
    ``P_full`` token positions)."""
    N, P = q.shape[2], k.shape[2]
    out = torch.empty(*q.shape[:3], v.shape[-1], device=q.device, dtype=torch.float32)
    el = tiles_to_elements(tiles.to(q.device), tile, N, P if pos is None else P_full)
    for t in range(tiles.shape[0]):
        sl = slice(t * tile, min(N, (t + 1) * tile))
        vis = el[sl][None, None] if pos is None else el[sl][:, pos].permute(1, 2, 0, 3)
        out[:, :, sl] = _masked_softmax_attn(q[:, :, sl], k, v, scale, vis, sdpa)
    return out


def csla_keys_per_query(tiles, tile: int, N: int, pos: torch.Tensor, P_full: int) -> float:
    """Mean keys a query attends under CSLA on a compressed cache (rows, heads and queries averaged): per row and
    head, the cached keys in each tile column, summed over the query's active tiles (no element mask built)."""
    cols = torch.zeros(*pos.shape[:2], tiles.shape[1], device=pos.device)
    cols.scatter_add_(2, pos // tile, torch.ones(pos.shape, device=pos.device))      # [r, h, tile columns]
    rows = torch.tensor([min(N, (i + 1) * tile) - i * tile for i in range(tiles.shape[0])], device=pos.device)
    return float((torch.einsum("nt,rht->rhn", tiles.to(pos.device).float(), cols) * rows).sum(-1).mean() / N)


_FLEX = {}


def flex_block_mask(tiles: torch.Tensor, tile: int, N: int, P: int, device):
    from torch.nn.attention.flex_attention import create_block_mask  # heavy third-party import, GPU path only

    t = tiles.to(device)

    def mask_mod(b, h, qi, kj):
        return t[qi // tile, kj // tile]

    return create_block_mask(mask_mod, None, None, N, P, device=str(device), BLOCK_SIZE=tile)


def csla_flex(q, k, v, block_mask, scale: float) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if q.is_cuda:
        fn = _FLEX.get("compiled")
        if fn is None:
            fn = _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    return fn(q, k.to(q.dtype), v.to(q.dtype), block_mask=block_mask, scale=scale)


# ------------------------------------------------------------------ the method
@dataclass
class SparVARConfig(MethodConfig):
    name: str = "sparvar"
    family: str = "sparvar"
    decision_scale: int | None = None      # absolute si of the decision scale; None: T − decision_from_end
    decision_from_end: int = 3             # 13 scales: S = 10 (the code's value)
    bound_layer: int = 10                  # layers <= L_b use CS4A, > L_b CSLA (code: 10 for 2B and 8B)
    bound_layer_scaling: str = "proportional"   # proportional (on depth < ref_depth; GUESS) | absolute
    bound_layer_ref_depth: int = 32
    topk_ratio: float = 0.2
    group_size: int = 192
    align: int = 112                       # ThunderKittens tile (the Triton provider would use 64)
    cs4a_windows: list = field(default_factory=lambda: [7, 9])   # absolute: windows of the last len() scales;
    #                                      decision: windows at S+1, S+2, ... (last repeats)
    cs4a_window_fill: int = 1              # absolute: window of earlier scales (the code's cs4a_ws: 1 for si 0-10)
    scale_anchor: str = "absolute"         # absolute (the authors' code) | decision (our former reading; module doc)
    csla_scales: int = 3                   # absolute: CSLA on the last csla_scales scales (code: si 10, 11, 12 of 13)
    o_cache: bool = True
    upsample: str = "bilinear"
    cs4a: bool = True
    csla: bool = True
    sink_scales: int = 5
    csla_windows: list = field(default_factory=lambda: [1, 1, 3, 5, 7])   # on the last len() key scales
    tile: int = 128
    skip_last: int = 0                     # "+ skip 2": do not compute the last scales (decode accumulated codes)
    kernel: str = "auto"                   # auto (fast on CUDA) | reference | fast
    decision_flops: str = "triton"         # method FLOPs of the decision: triton (0.5·P + k) | cuda (1.5·P + k)
    compressed_topk: str = "held"          # on a compressed cache (a stack with ScaleKV; no authors' code): k from the
    #                                        keys the layer holds (held) | from the full cache's P, capped (full)

    def __post_init__(self):
        if self.kernel not in ("auto", "reference", "fast"):
            raise UserError(f"sparvar.kernel must be auto|reference|fast, got {self.kernel!r}")
        if self.compressed_topk not in ("held", "full"):
            raise UserError(f"sparvar.compressed_topk must be held|full, got {self.compressed_topk!r}")
        if self.decision_flops not in ("triton", "cuda"):
            raise UserError(f"sparvar.decision_flops must be triton|cuda, got {self.decision_flops!r}")
        if self.scale_anchor not in ("absolute", "decision"):
            raise UserError(f"sparvar.scale_anchor must be absolute|decision, got {self.scale_anchor!r}")
        if self.bound_layer_scaling not in ("proportional", "absolute"):
            raise UserError(f"sparvar.bound_layer_scaling must be proportional|absolute, got {self.bound_layer_scaling!r}")
        if not 0.0 < float(self.topk_ratio) <= 1.0:
            raise UserError(f"sparvar.topk_ratio must be in (0, 1], got {self.topk_ratio}")
        if self.group_size < 1 or self.align < 1 or self.tile < 1 or not self.cs4a_windows:
            raise UserError("sparvar.group_size, align, tile must be >= 1 and cs4a_windows non-empty")
        self.cs4a_windows = [int(w) for w in self.cs4a_windows]
        self.csla_windows = [int(w) for w in self.csla_windows]


def effective_bound_layer(cfg: SparVARConfig, depth: int) -> int:
    lb = cfg.bound_layer
    if cfg.bound_layer_scaling == "proportional" and depth < cfg.bound_layer_ref_depth:
        lb = round((lb + 1) * depth / cfg.bound_layer_ref_depth) - 1
    return max(-1, min(depth - 1, lb))


class SparVAR(Method):
    CITATION = CITATION
    STATUS = ("sparvar, sparvar_skip2, sparvar_hart: exact vs the authors' code (Lvar @f94b7ec; HART CSLA file @cebf20f); "
              "sparvar_cs4a_only: GUESS (L_b = depth − 1); other schedules: our mapping")
    Config = SparVARConfig
    NOOP = {"cs4a": False, "csla": False}  # neither module runs: every layer stays dense
    needs_kv_positions = True              # key sets are token positions: a compressed cache is read through them
    cfg: SparVARConfig

    def reset(self) -> None:
        self.state: dict[int, dict] = {}       # li -> {"C": O-cache, "hw": grid of S, "src": key sets}
        self.kernels: dict[str, str] = {}
        self.keys: dict[str, dict] = {}        # module -> {si: mean keys per query}
        self.density: dict[int, float] = {}    # si -> CSLA tile density
        self.skipped: list[int] = []
        self.decision_keys: dict[int, float] = {}   # si -> key-passes per query of the whole decision (1.5·P + k)
        self._mflops = 0.0                     # method FLOPs of the batch (decision passes beyond the dense one)
        self._batch = 1
        self._geo = getattr(self, "_geo", {})  # schedule-level caches survive across images

    # -- schedule facts
    def decision_si(self, T: int) -> int:
        return self.cfg.decision_scale if self.cfg.decision_scale is not None else T - self.cfg.decision_from_end

    def _geometry(self, sctx: ScaleCtx) -> dict:
        key = tuple((s.h, s.w, s.n) for s in sctx.schedule)
        g = self._geo.get(key)
        if g is None:
            g = self._geo[key] = {"hws": [(s.h, s.w) for s in sctx.schedule], "ns": [s.n for s in sctx.schedule],
                                  "off": offsets([s.n for s in sctx.schedule]), "tiles": {}, "runs": {}, "bm": {}}
        return g

    def _tiles(self, geo: dict, si: int) -> torch.Tensor:
        if si not in geo["tiles"]:
            m = csla_token_mask(geo["hws"], geo["ns"], si, self.cfg.sink_scales, self.cfg.csla_windows)
            geo["tiles"][si] = tile_mask(m, self.cfg.tile)
        return geo["tiles"][si]

    def cs4a_window(self, si: int, T: int) -> int:
        """Local window side of CS4A-sparse at scale si (module doc: ``scale_anchor``)."""
        wins = self.cfg.cs4a_windows
        if self.cfg.scale_anchor == "decision":
            return wins[min(si - self.decision_si(T) - 1, len(wins) - 1)]
        back = T - 1 - si                                  # 0 = the last scale
        return wins[len(wins) - 1 - back] if back < len(wins) else self.cfg.cs4a_window_fill

    def csla_from(self, T: int) -> int:
        """First query scale of CSLA."""
        return self.decision_si(T) if self.cfg.scale_anchor == "decision" else T - self.cfg.csla_scales

    def local_run_keys(self, geo: dict, si: int) -> torch.Tensor:
        """[G, L] absolute KV positions of each query group's local run at scale si (CS4A-sparse)."""
        key = (si, self.cfg.scale_anchor)
        if key not in geo["runs"]:
            h, w = geo["hws"][si]
            win = self.cs4a_window(si, len(geo["hws"]))
            starts, L, _ = local_runs(h, w, win, self.cfg.group_size, self.cfg.align)
            geo["runs"][key] = (starts + geo["off"][si])[:, None] + torch.arange(L)[None]
        return geo["runs"][key]

    def _fast(self, q) -> bool:
        return self.cfg.kernel == "fast" or (self.cfg.kernel == "auto" and q.is_cuda)

    # -- hooks
    def plan_scale(self, sctx: ScaleCtx) -> ScalePlan:
        skip = self.cfg.skip_last > 0 and sctx.si >= sctx.num_scales - self.cfg.skip_last
        if skip:
            self.skipped.append(sctx.si)
            self.claim_skip(sctx)
        return ScalePlan(skip=skip)

    def attention(self, lctx: LayerCtx):
        sctx = lctx.scale
        T, si = sctx.num_scales, lctx.si
        S = self.decision_si(T)
        if not sctx.schedule:
            return None
        if lctx.li > effective_bound_layer(self.cfg, sctx.spec.depth):      # basic_sparvar.py:365-367
            return self._csla_kernel if self.cfg.csla and si >= self.csla_from(T) else None
        if not self.cfg.cs4a or si < S:                                      # :369-377, else dense (:383-386)
            return None
        return self._cs4a_decide_kernel if si == S else self._cs4a_sparse_kernel

    def _check(self, q, k, ctx: LayerCtx, geo: dict) -> torch.Tensor | None:
        """The token positions of the cached keys (None: the full cache, key j = token j). A cache compressed by
        another method (``compress_kv``: ScaleKV in a stack) is taken as it is: SparVAR's key sets are token
        positions, and a key the cache dropped is simply not attended (``lctx.kv_positions``). Tokens pruned upstream
        are refused: the query groups and local runs are laid out on the full grid."""
        si, pos = ctx.si, ctx.kv_positions
        if list(ctx.kv_segments) != geo["ns"][:si] or q.shape[2] != geo["ns"][si]:
            raise UserError(f"method sparvar needs every token of every scale computed (scale {si}: {q.shape[2]} "
                            f"queries of {geo['ns'][si]}, earlier scales appended {list(ctx.kv_segments)}): another "
                            f"method in the stack pruned tokens")
        if pos is None:
            if k.shape[2] != geo["off"][si + 1]:
                raise RuntimeError(f"SparVAR: scale {si} sees {k.shape[2]} keys, expected {geo['off'][si + 1]}")
            return None
        if pos.shape[-1] != k.shape[2] or int(pos.min()) < 0:
            raise UserError(f"method sparvar: the cache of layer {ctx.li} holds keys at no token position (pooled by "
                            f"another method); SparVAR's key sets need each key's token position")
        return pos.to(q.device)

    def _cs4a_decide_kernel(self, q, k, v, *, scale, mask=None, ctx=None):
        geo = self._geometry(ctx.scale)
        pos = self._check(q, k, ctx, geo)
        P = k.shape[2]     # a compressed cache: the keys it holds (compressed_topk: held = 20 % of those; full = 20 %
        #                    of the full cache's, capped at what is held; our reading, README)
        P_k = geo["off"][ctx.si + 1] if pos is not None and self.cfg.compressed_topk == "full" else P
        kk = min(P, topk_budget(P_k, self.cfg.topk_ratio, self.cfg.align))
        dense, I, sel = cs4a_decide(q, k, v, kk, self.cfg.group_size, scale)
        out = sdpa_attention(q, k, v, scale=scale) if self._fast(q) else dense.to(q.dtype)
        if pos is not None:   # the key sets are kept as token positions (what later scales' caches are indexed by)
            r, h, G, _ = I.shape
            I = pos.expand(r, h, -1).gather(2, I.reshape(r, h, -1)).view(r, h, G, -1)
        self.state[ctx.li] = {"C": (dense - sel) if self.cfg.o_cache else None, "hw": ctx.scale.hw, "src": I}
        self.kernels["cs4a_decide"] = "sdpa+colmass" if self._fast(q) else "reference"
        self.keys.setdefault("cs4a", {})[ctx.si] = float(P)
        ctx.attn_keys = float(P)
        extra = (0.5 if self.cfg.decision_flops == "triton" else 1.5) * P + kk
        self.decision_keys[ctx.si] = extra + P
        self._mflops += q.shape[0] * q.shape[2] * extra * 4 * q.shape[1] * q.shape[3]
        self._batch = ctx.scale.batch
        return out

    def _cs4a_sparse_kernel(self, q, k, v, *, scale, mask=None, ctx=None):
        geo = self._geometry(ctx.scale)
        pos = self._check(q, k, ctx, geo)
        st = self.state.get(ctx.li)
        if st is None:
            raise RuntimeError(f"SparVAR: no CS4A decision for layer {ctx.li} before scale {ctx.si}")
        rows = q.shape[0]
        src = st["src"][:rows]                            # cond-only scales: keep the cond rows, as the code does
        runs = self.local_run_keys(geo, ctx.si).to(q.device)    # [G, L]
        G = runs.shape[0]
        J = torch.cat([src[:, :, group_map(src.shape[2], G).to(q.device)],
                       runs[None, None].expand(rows, q.shape[1], -1, -1)], -1)
        st["src"] = J
        counts: list = []
        if pos is not None:   # a compressed cache: J ∩ the keys it holds, a mask per query group (the gather needs
            #                   all of J); fast: SDPA with that mask
            out = cs4a_sparse_reference(q, k, v, J, self.cfg.group_size, scale, pos, counts, self._fast(q))
            self.kernels["cs4a"] = ("masked_sdpa" if self._fast(q) else "reference") + " (compressed cache)"
        elif self._fast(q):
            out = cs4a_sparse_gather(q, k, v, J, self.cfg.group_size, scale)
            self.kernels["cs4a"] = "gather_sdpa"
        else:
            out = cs4a_sparse_reference(q, k, v, J, self.cfg.group_size, scale)
            self.kernels["cs4a"] = "reference"
        if st["C"] is not None:
            C = st["C"][:rows]
            hs, ws = st["hw"]
            h, w = ctx.scale.hw
            rh, H_, _, c = C.shape
            up = F.interpolate(C.permute(0, 1, 3, 2).reshape(rh * H_, c, hs, ws), size=(h, w), mode=self.cfg.upsample,
                               **({"align_corners": False} if self.cfg.upsample in ("bilinear", "bicubic") else {}))
            out = out.float() + up.reshape(rh, H_, c, h * w).permute(0, 1, 3, 2)
        keys = sum(counts) / q.shape[2] if counts else float(J.shape[-1])
        self.keys.setdefault("cs4a", {})[ctx.si] = keys
        ctx.attn_keys = keys
        return out.to(q.dtype)

    def _csla_kernel(self, q, k, v, *, scale, mask=None, ctx=None):
        geo = self._geometry(ctx.scale)
        pos = self._check(q, k, ctx, geo)
        si, N, P = ctx.si, q.shape[2], geo["off"][ctx.si + 1]
        tiles = self._tiles(geo, si)
        if pos is None:
            keys_per_tile_col = torch.tensor([min(P, (j + 1) * self.cfg.tile) - j * self.cfg.tile
                                              for j in range(tiles.shape[1])], dtype=torch.float32)
            rows_per_tile = torch.tensor([min(N, (i + 1) * self.cfg.tile) - i * self.cfg.tile
                                          for i in range(tiles.shape[0])], dtype=torch.float32)
            keys = float((tiles.float() @ keys_per_tile_col * rows_per_tile).sum() / N)
        else:
            keys = csla_keys_per_query(tiles, self.cfg.tile, N, pos, P)
        self.density[si] = float(tiles.float().mean())
        self.keys.setdefault("csla", {})[si] = keys
        ctx.attn_keys = keys
        if pos is not None:   # tiles are over token positions; a compressed cache is not laid out in them: a mask
            #                   per tile row (fast: SDPA with it)
            self.kernels["csla"] = ("masked_sdpa" if self._fast(q) else "reference") + " (compressed cache)"
            return csla_reference(q, k, v, tiles, self.cfg.tile, scale, pos, P, self._fast(q)).to(q.dtype)
        if self._fast(q):
            bkey = (si, str(q.device))
            if bkey not in geo["bm"]:
                geo["bm"][bkey] = flex_block_mask(tiles, self.cfg.tile, N, P, q.device)
            self.kernels["csla"] = "flex_attention"
            return csla_flex(q, k, v, geo["bm"][bkey], scale)
        self.kernels["csla"] = "reference"
        return csla_reference(q, k, v, tiles, self.cfg.tile, scale).to(q.dtype)

    def summary(self) -> dict:
        return {"kernels": dict(self.kernels), "skipped_scales": list(self.skipped),
                "attn_keys": {m: {str(s): v for s, v in d.items()} for m, d in self.keys.items()},
                "csla_tile_density": {str(s): v for s, v in self.density.items()},
                "decision_keys": {str(s): v for s, v in self.decision_keys.items()},
                "method_flops": self._mflops / max(1, self._batch)}

    @classmethod
    def aggregate(cls, summaries: list[dict]) -> dict[str, tuple[float, int]]:
        d = [v for s in summaries for v in (s.get("csla_tile_density") or {}).values()]
        return {"csla_tile_density": (sum(d) / len(d), len(d))} if d else {}
