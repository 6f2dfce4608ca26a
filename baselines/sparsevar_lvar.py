"""SparseVAR as Weepingchestnut/Lvar implements it (``models/sparsevar/``, commit "add SparseVAR (ICCV'2025)").

NOT the SparseVAR authors' code (theirs is unreleased: Caesarhhh/SparseVAR holds a README only) and not our paper
reconstruction ``sparsevar`` (``baselines/sparsevar.py``): this module reproduces Lvar's code at @f94b7ec
(``models/sparsevar/sparsevar_model.py`` unchanged since 8868a63; ``file:line`` below = that file), quirks included.
Walk-through: ``shared/specs/lvar_sparsevar_scalekv.md``. Per scale ``si`` (Lvar's loop, :707-821):

  * MSE map (:755-770), at every ``si >= start_prune_stage - 1``: per token, mean over channels of (output − input)²
    of block chunk ``specific_mse_layer`` (:156-158; a chunk of ``depth / block_chunks`` consecutive blocks), mean of
    the cond and uncond rows (:766). At a pruned scale the pruned tokens carry the chunk-0 input through every block,
    so their MSE is exactly 0 (:757-761) — in our loop this holds by construction (``restore`` keeps the input).
  * adaptive ratio (:770): ``r = max_b mean_l(mse / max(mse) > compress_ratio)`` (max over the whole batch, strict).
  * ``lf_anchor`` (:551-607) at ``si >= start_prune_stage`` on the previous scale's MSE and guided logits: both
    nearest-upsampled to this grid (:564-571); high-frequency tokens = the last ``int(N·N·r)`` of an ascending sort of
    the metric (:576); anchors every ``local_window_size`` rows/columns (:95-109); every token's best anchor = the
    most cosine-similar (upsampled logits as features) of 4 candidate anchors (:41-78: meant its 4 nearest; as
    written the first 4 of the list, ``quirk_corner_gather``); kept = high-frequency tokens
    (+ anchors, :594-597); low-frequency tokens = the rest (:600); recoverable if best similarity > beta (:603-604).
  * the kept tokens run through every block (:731-747; RoPE gathered, K/V of kept tokens only), the others keep the
    chunk-0 input; after the last block recoverable tokens copy their anchor's row (:772-779); the head runs on the
    full map; the codes of unrecovered low-frequency tokens are set to 0 before accumulation (:815-821).

Quirks of that code, each an option, on by default (``False`` = what the line evidently means):
  * ``quirk_beta_not_passed`` (:729 vs :632/:558): the caller's ``beta=0.99`` is never passed, ``lf_anchor``'s default
    0.8 is the recovery threshold.
  * ``quirk_logits_no_permute`` (:565): logits (B, l, V) are reshaped to (B, V, n, n) without a permute, so the
    "feature" of token (y, x) is a strided slice of the flat (l, V) buffer, not its logit vector.
  * ``quirk_b1_no_anchor_merge`` (:594): anchors are merged into the kept set only when B > 1.
  * ``quirk_anchor_mod`` (:100): ``N − 1`` is appended when ``n % N != 0`` (n = window, N = grid: always true), where
    ``N % n != 0`` is meant; duplicated anchors when ``(N − 1) % n == 0``.
  * ``quirk_codes_view`` (:818): ``codes.view(1, 32, -1)`` — only runs for batch 1 and d = 32 (the codes are a permuted,
    non-contiguous tensor there, so the view raises for batch > 1; for d ≠ 32 it raises or mismatches). On: batch > 1
    is refused in one line, as Lvar cannot run it (the runner uses batch 1: ``batch_rectangular = False``); d ≠ 32
    (tiny models; Infinity-8B, d = 56) gets the per-token zeroing the line performs at d = 32 — GUESS, Lvar fails
    there. Off: per-token zeroing per image for any batch.
  * ``quirk_zero_k_keeps_all`` (:576): ``[:, -int(N·N·r):]`` with ``int(...) == 0`` keeps every token (only when the
    MSE map is all zero). Off: keep none of the top-k (anchors may still be merged).
  * ``quirk_area_downsample`` (:824; not in the spec's walk-through): the next scale's input is the accumulated codes
    resized with ``z_interplote_down`` = ``'area'`` (models/vae/mutiscale_bsq.py:532), at EVERY scale, where Lvar's
    Infinity and its other methods use ``z_interplote_up`` = trilinear (infinity_model.py:700, fastvar_model.py:662,
    sparvar_model.py:677), as our backbone does. So the images differ from ``none`` even where nothing is pruned.
    Mapped to ``ScalePlan.input_resize``. Off: the backbone's trilinear.
  * ``quirk_corner_gather`` (:56-57; not in the spec's walk-through, found by running the function): the 4 nearest
    anchors are sorted out (:55) but gathered along dim 1, the position axis of ``anchor_indices`` expanded over
    positions, so every token's candidates are the first 4 anchors of the list — (0, 0), (0, s), (0, 2s), (0, 3s) —
    not its nearest; recovery copies rows from the top of the grid. Off: the 4 nearest anchors.

Mapping to our loop (GUESSes are marked): ``select`` at block 0 decides once per scale and returns the same
``Selection`` to every block (the loop gathers/scatters per block; pruned tokens keep their input, which equals
Lvar's single gather at :735 and scatter at :774); the chunk MSE comes from ``after_layer``; recovery runs in
``restore`` of the last block (before ``after_block``: differs from Lvar only with a CFG insertion at the last block);
logits from ``after_logits`` (our ``guide`` forms Lvar's ``logits_BlV``: /tau then CFG on logits, :783-784); code
zeroing through the ``code_mask`` hook. GUESSes: ``block_chunks`` (Infinity-2B/8B use 8; for a depth not divisible
by it the chunk is the layers ``[c·D // K, (c+1)·D // K)``, at least one); non-square grids use (h, w) where Lvar
assumes square; without CFG rows (Lvar requires them: ``repeat(2, 1)``, :732) the MSE is the rows' own.
``start_prune_stage`` is an absolute scale index as in Lvar (13-scale 1M schedule: scales 10-12, widths 40/48/64;
model=tiny: 10-11; the 10-scale 0.25M schedule is never pruned).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from varbench.errors import UserError
from varbench.hooks import LayerCtx, Method, MethodConfig, ScaleCtx, ScalePlan
from varbench.tokens import Selection


@dataclass
class SparseVARLvarConfig(MethodConfig):
    name: str = "sparsevar_lvar"
    family: str = "sparsevar_lvar"
    start_prune_stage: int = 10        # :626 (absolute scale index)
    compress_ratio: float = 0.6        # :629 (threshold on mse / max(mse))
    specific_mse_layer: int = 3        # :630 (block-chunk index)
    block_chunks: int = 8              # Infinity-2B/8B block_chunks (GUESS elsewhere: proportional chunks)
    local_window_size: int = 4         # :628 (anchor grid stride)
    beta: float = 0.99                 # :632, the caller's value (used only with quirk_beta_not_passed = false)
    lf_anchor_beta: float = 0.8        # :558, lf_anchor's default (used while the quirk is on)
    quirk_beta_not_passed: bool = True       # :729
    quirk_logits_no_permute: bool = True     # :565
    quirk_b1_no_anchor_merge: bool = True    # :594
    quirk_anchor_mod: bool = True            # :100
    quirk_codes_view: bool = True            # :818
    quirk_zero_k_keeps_all: bool = True      # :576
    quirk_corner_gather: bool = True         # :56-57
    quirk_area_downsample: bool = True       # :824

    def __post_init__(self):
        if int(self.start_prune_stage) < 1:
            raise UserError(f"sparsevar_lvar.start_prune_stage must be >= 1 (it reads scale si-1), got "
                            f"{self.start_prune_stage}")
        if int(self.block_chunks) < 1 or not 0 <= int(self.specific_mse_layer) < int(self.block_chunks):
            raise UserError(f"sparsevar_lvar.specific_mse_layer must be a chunk index in [0, block_chunks="
                            f"{self.block_chunks}), got {self.specific_mse_layer}")
        if int(self.local_window_size) < 1:
            raise UserError(f"sparsevar_lvar.local_window_size must be >= 1, got {self.local_window_size}")
        try:
            self.compress_ratio, self.beta, self.lf_anchor_beta = (float(self.compress_ratio), float(self.beta),
                                                                   float(self.lf_anchor_beta))
        except (TypeError, ValueError):
            raise UserError("sparsevar_lvar.compress_ratio, beta and lf_anchor_beta must be numbers") from None
        self.start_prune_stage, self.specific_mse_layer = int(self.start_prune_stage), int(self.specific_mse_layer)
        self.block_chunks, self.local_window_size = int(self.block_chunks), int(self.local_window_size)

    @property
    def recovery_beta(self) -> float:
        return self.lf_anchor_beta if self.quirk_beta_not_passed else self.beta


def chunk_layers(depth: int, chunk: int, chunks: int) -> tuple[int, int]:
    """First and last block of block chunk ``chunk`` of ``chunks`` (Infinity: ``depth // chunks`` blocks each)."""
    first = chunk * depth // chunks
    return first, max(first, (chunk + 1) * depth // chunks - 1)


def anchor_coords(size: int, stride: int, quirk_mod: bool) -> torch.Tensor:
    """Anchor coordinates along one axis (:97-101): every ``stride``-th, plus ``size - 1`` when the test passes."""
    idx = torch.arange(0, size, stride)
    if (stride % size if quirk_mod else size % stride) != 0:
        idx = torch.cat([idx, torch.tensor([size - 1])])
    return idx


def anchor_points(hw: tuple[int, int], stride: int, quirk_mod: bool) -> torch.Tensor:
    """[A, 2] (row, col) anchors: the 'ij' grid of the per-axis coordinates, row-major (:104-107)."""
    r, c = anchor_coords(hw[0], stride, quirk_mod), anchor_coords(hw[1], stride, quirk_mod)
    return torch.stack([r[:, None].expand(-1, len(c)).reshape(-1), c[None, :].expand(len(r), -1).reshape(-1)], -1)


def best_anchors(feat_BHWC: torch.Tensor, anchors: torch.Tensor, quirk_gather: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's candidate anchors and the most cosine-similar of them (:41-78).

    Meant: the token's 4 nearest anchors (squared distance, :50-55; the sort runs on the same [B, A, T] int64 tensor
    as Lvar's, torch's sort is not stable: equal distances are ordered as that op orders them). ``quirk_gather``
    (:56-57): the candidate positions are gathered along dim 1 — the position axis of the anchors expanded over
    positions — so the distance order is lost and every token's candidates are the FIRST 4 anchors of the list
    (row 0: columns 0, s, 2s, 3s). Returns (best anchor's flat index [B, T], similarities [B, T, 4])."""
    B, H, W, _ = feat_BHWC.shape
    dev = feat_BHWC.device
    pos = torch.arange(H * W, device=dev)[None].expand(B, -1)
    i, j = pos // W, pos % W
    a = anchors.to(dev)[None].expand(B, -1, -1)                                     # [B, A, 2]
    dist = (i[:, None, :] - a[..., 0, None]) ** 2 + (j[:, None, :] - a[..., 1, None]) ** 2   # [B, A, T]
    if quirk_gather:   # out[b, t, k] = a[b, k]: the index only picks among identical expanded rows
        cand = a[:, None, :4].expand(-1, H * W, -1, -1)                            # [B, T, 4, 2]
    else:
        near = dist.sort(1)[1][:, :4].permute(0, 2, 1)                              # [B, T, 4] anchor ids
        cand = torch.gather(a[:, None].expand(-1, H * W, -1, -1), 2, near[..., None].expand(-1, -1, -1, 2))
    b = torch.arange(B, device=dev)[:, None, None]
    corner = feat_BHWC[b, cand[..., 0], cand[..., 1]]                              # [B, T, 4, C]
    own = feat_BHWC[torch.arange(B, device=dev)[:, None], i, j]                    # [B, T, C]
    sims = F.cosine_similarity(own[:, :, None], corner, dim=-1)                    # [B, T, 4]
    best = cand.gather(2, sims.argmax(-1)[..., None, None].expand(-1, -1, -1, 2))[:, :, 0]   # [B, T, 2]
    return best[..., 0] * W + best[..., 1], sims


def adaptive_ratio(mse_BL: torch.Tensor, threshold: float) -> torch.Tensor:
    """:770 — the largest per-row fraction of tokens with mse / max(mse over the batch) > threshold (0-dim)."""
    return ((mse_BL / mse_BL.max()) > threshold).float().mean(1).max()


def complement(idx_BK: torch.Tensor, n: int) -> torch.Tensor:
    """:81-92 — per row, the indices not in ``idx`` (ascending)."""
    keep = torch.ones(idx_BK.shape[0], n, dtype=torch.bool, device=idx_BK.device).scatter_(1, idx_BK, False)
    return torch.arange(n, device=idx_BK.device)[None].expand(idx_BK.shape[0], -1)[keep].view(idx_BK.shape[0], -1)


@dataclass
class ScalePlanLvar:
    """One pruned scale's decision (per image rows; repeated over the CFG rows where used)."""

    si: int
    keep: torch.Tensor       # [B, K] kept (computed) tokens, in Lvar's order
    low: torch.Tensor        # [B, n-K] the others, ascending
    recover: torch.Tensor    # [B, n-K] bool: copied from their best anchor after the last block
    anchor: torch.Tensor     # [B, n-K] that anchor's flat index
    ratio: float
    sel: Selection


class SparseVARLvar(Method):
    CITATION = ("SparseVAR (arXiv 2507.20454) as implemented in Weepingchestnut/Lvar @f94b7ec "
                "models/sparsevar/sparsevar_model.py (not the SparseVAR authors' code, which is unreleased); "
                "shared/specs/lvar_sparsevar_scalekv.md")
    STATUS = "exact vs Lvar's port (quirks on; Infinity, batch 1); not the SparseVAR authors' code"
    FOOTNOTE = ("SparseVAR as Weepingchestnut/Lvar implements it (its quirks included); neither this nor `sparsevar` "
                "is the SparseVAR authors' code, which is unreleased.")
    Config = SparseVARLvarConfig
    NOOP = {"start_prune_stage": 1_000_000, "quirk_area_downsample": False}
    FAMILIES = ("infinity",)
    batch_rectangular = False   # decisions couple the images of a batch (:770, :596); Lvar itself runs batch 1
    cfg: SparseVARLvarConfig

    def reset(self) -> None:
        self.mse: tuple[int, torch.Tensor, tuple[int, int]] | None = None      # (si, [B, n] map, hw)
        self.ratio: torch.Tensor | None = None
        self.logits: tuple[int, torch.Tensor, tuple[int, int]] | None = None   # (si, guided [B, n, V], hw)
        self.chunk_in: torch.Tensor | None = None
        self.pre_recovery: torch.Tensor | None = None
        self.plan: ScalePlanLvar | None = None
        self.log: list[dict] = []

    # ------------------------------------------------------------------ decisions
    def plan_scale(self, sctx: ScaleCtx) -> ScalePlan:
        if (sctx.si == 0 and sctx.batch > 1 and self.cfg.quirk_codes_view
                and sctx.num_scales > self.cfg.start_prune_stage):
            raise UserError(f"{self.name}: Lvar's code runs batch 1 only (sparsevar_model.py:818 views the permuted "
                            f"codes as (1, 32, -1), which raises for batch > 1); generate one prompt at a time or "
                            f"set quirk_codes_view=false (per-image code zeroing)")
        self.plan = None
        return ScalePlan(input_resize="area" if self.cfg.quirk_area_downsample else None)

    def lf_anchor(self, hw: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """:551-607 on the stored previous-scale MSE map and guided logits. Returns (keep, low, recover, anchor)."""
        c = self.cfg
        _, logits, src = self.logits
        _, mse, _ = self.mse
        B, (H, W) = logits.shape[0], hw
        grid = logits.reshape(B, -1, *src) if c.quirk_logits_no_permute else logits.transpose(1, 2).reshape(B, -1, *src)
        feat = F.interpolate(grid, size=(H, W), mode="nearest").permute(0, 2, 3, 1)
        metric = F.interpolate(mse.reshape(B, 1, *src), size=(H, W), mode="nearest").reshape(B, -1)
        k = int(H * W * self.ratio)
        order = metric.sort(1)[1]
        keep = order[:, -k:] if (k > 0 or c.quirk_zero_k_keeps_all) else order[:, :0]
        anchors = anchor_points(hw, c.local_window_size, c.quirk_anchor_mod)
        best, sims = best_anchors(feat, anchors, c.quirk_corner_gather)
        if B > 1 or not c.quirk_b1_no_anchor_merge:
            flat = (anchors[:, 0] * W + anchors[:, 1]).to(keep.device)
            both = torch.cat([flat[None].expand(B, -1), keep], 1)
            m = min(row.unique().shape[0] for row in both)
            keep = torch.stack([row.unique(sorted=False)[:m] for row in both])
        low = complement(keep, H * W)
        recover = sims.max(-1)[0].gather(1, low) > c.recovery_beta
        return keep, low, recover, best.gather(1, low)

    def select(self, lctx: LayerCtx, x: torch.Tensor) -> Selection | None:
        sctx, c = lctx.scale, self.cfg
        if lctx.li == 0:
            self.plan = None
            prev = sctx.si - 1
            if (sctx.si >= c.start_prune_stage and self.mse is not None and self.logits is not None
                    and self.mse[0] == prev and self.logits[0] == prev):
                keep, low, recover, anchor = self.lf_anchor(sctx.hw)
                rows = x.shape[0]
                idx = keep if keep.shape[0] == 1 else keep.repeat(rows // keep.shape[0], 1)
                self.plan = ScalePlanLvar(sctx.si, keep, low, recover, anchor, float(self.ratio),
                                          Selection(idx, x.shape[1]))
                self.log.append({"si": sctx.si, "ratio": float(self.ratio), "kept": int(keep.shape[1]),
                                 "recovered": int(recover.sum()) // keep.shape[0],
                                 "zeroed": int((~recover).sum()) // keep.shape[0]})
        if self.plan is None:
            return None
        self.claim(lctx, self.plan.sel.k)
        return self.plan.sel

    def restore(self, lctx: LayerCtx, x_in, y_kept, sel):
        x = sel.scatter(y_kept, x_in)
        if lctx.li != lctx.scale.spec.depth - 1:
            return x
        # :772-779 — after the last block: recoverable low-frequency tokens take their anchor's row (read before
        # any write; the anchor may itself be an uncomputed token, then its row is the chunk-0 input)
        p, rows = self.plan, x.shape[0]
        rep = rows // p.low.shape[0]
        low, anc = p.low.repeat(rep, 1)[..., None], p.anchor.repeat(rep, 1)[..., None]
        C = x.shape[-1]
        src, dst = x.gather(1, anc.expand(-1, -1, C)), x.gather(1, low.expand(-1, -1, C))
        m = p.recover.to(dst).repeat(rep, 1)[..., None]
        self.pre_recovery = x
        return x.scatter(1, low.expand(-1, -1, C), dst * (1 - m) + m * src)

    def after_layer(self, lctx: LayerCtx, x_in, x_out) -> None:
        sctx, c = lctx.scale, self.cfg
        if sctx.si < c.start_prune_stage - 1:
            return
        first, last = chunk_layers(sctx.spec.depth, c.specific_mse_layer, c.block_chunks)
        if lctx.li == first:
            self.chunk_in = x_in
        if lctx.li == last:
            after = self.pre_recovery if (self.pre_recovery is not None and last == sctx.spec.depth - 1) else x_out
            d = ((after - self.chunk_in) ** 2).mean(-1)                      # :157, per row
            B = sctx.batch
            if d.shape[0] == 2 * B:
                d = torch.stack([d[:B], d[B:]]).mean(0)                       # :766
            self.mse = (sctx.si, d, sctx.hw)
            self.ratio = adaptive_ratio(d, c.compress_ratio)
            self.chunk_in = None
        if lctx.li == sctx.spec.depth - 1:
            self.pre_recovery = None

    def after_logits(self, sctx: ScaleCtx, logits_cond, logits_uncond, logits_guided):
        if sctx.si >= self.cfg.start_prune_stage - 1:
            self.logits = (sctx.si, logits_guided, sctx.hw)   # Lvar's deepcopy (:790): the sampler does not edit it
        return None

    def code_mask(self, sctx: ScaleCtx) -> torch.Tensor | None:
        """:815-821 — [B, n] True where the sampled codes are set to 0: low-frequency tokens not recovered."""
        if self.plan is None or self.plan.si != sctx.si:
            return None
        p = self.plan
        return torch.zeros(p.low.shape[0], sctx.hw[0] * sctx.hw[1], dtype=torch.bool,
                           device=p.low.device).scatter_(1, p.low, ~p.recover)

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict:
        return {"sparsevar_lvar_scales": list(self.log)}

    def check_schedule(self, schedule) -> str | None:
        if len(schedule) <= self.cfg.start_prune_stage:
            what = ("prunes nothing (only the area-resized scale inputs, quirk_area_downsample, differ from the "
                    "backbone's)" if self.cfg.quirk_area_downsample else "changes nothing")
            return (f"{self.name}: prunes from scale index {self.cfg.start_prune_stage} but this schedule has "
                    f"{len(schedule)} scales: it {what}, as Lvar's code on the 0.25M schedule")
        return None
