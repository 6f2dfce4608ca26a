"""THE next-scale generation loop, written once for every backbone and every method.

Backbone parts: ``varbench/backbones/base.py``. Hook points: ``varbench/hooks.py``. The loop never knows which
method runs: a method steers it only through the hooks, so ``Method()`` (no overrides) gives exactly the
backbone's own inference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from varbench.attention import sdpa_attention
from varbench.backbones.base import Backbone, Condition, ScaleInfo
from varbench.hooks import KVState, LayerCtx, Method, ScaleCtx
from varbench.profiling import prange
from varbench.records import (
    GenRecord,
    MemoryTracker,
    Stopwatch,
    kv_bytes,
    peak_memory_bytes,
    reset_peak_memory,
    rss_peak_bytes,
    tensor_bytes,
)


@dataclass
class GenOutput:
    images: torch.Tensor          # [B, 3, H, W] in [-1, 1]
    state: Any                    # the backbone's final state (accumulated codes, sampled codes per scale)
    record: GenRecord
    method_summary: dict


def _replace_kv(kv: Any, k: torch.Tensor, v: torch.Tensor) -> None:
    """Put an edited cache in place (``replace`` where the cache class offers one, else its ``k``/``v``)."""
    if hasattr(kv, "replace"):
        kv.replace(k, v)
    else:
        kv.k, kv.v = k, v


def _cat_positions(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate [r|1, h|1, L] position tables along L, broadcasting rows and heads."""
    shape = torch.broadcast_shapes(a.shape[:2], b.shape[:2])
    return torch.cat((a.expand(*shape, -1), b.expand(*shape, -1)), -1)


def _key_positions(before: torch.Tensor | None, kv_before: int, start: int, sel: Any, n: int,
                   device) -> torch.Tensor | None:
    """Token position (scale offset + grid index) of each key the kernel receives once this unit appended its keys,
    [r|1, h|1, L]; None while key j is token j (no token pruned, no key dropped, no scale skipped before this one)."""
    if before is None and sel is None and kv_before == start:
        return None
    if before is None:   # keys so far: tokens 0..kv_before-1 (a skipped scale only shifts the keys after it)
        before = torch.arange(kv_before, device=device)[None, None]
    new = (sel.keep_idx.to(device) if sel is not None else torch.arange(n, device=device)[None]) + start
    return _cat_positions(before.to(device), new[:, None, :])


def _edit_positions(p: torch.Tensor | None, length: int, edit: Any, device) -> torch.Tensor:
    """The positions of the keys a ``KVEdit`` keeps (-1 where it replaced them with pooled keys)."""
    if edit.keep_idx is None:
        return torch.full((1, 1, edit.k.shape[2]), -1, dtype=torch.long, device=device)
    p = torch.arange(length, device=device)[None, None] if p is None else p.to(device)
    idx = edit.keep_idx.to(device)
    shape = torch.broadcast_shapes(p.shape[:2], idx.shape[:2])
    return p.expand(*shape, -1).gather(2, idx.expand(*shape, -1))


def _run_layer(backbone: Backbone, method: Method, li: int, x: torch.Tensor, pos: Any, cond: Any, kv: Any,
               segs: list[int], scale: Any, sctx: ScaleCtx, rec_tokens: list[float],
               rec_keys: list[float], rec_kv: list[list] | None = None,
               mem: MemoryTracker | None = None, rec_kept: list | None = None,
               kpos: dict | None = None, start: int = 0) -> torch.Tensor:
    """One block: token selection and restoration per unit (the whole block, or each branch); then the method's
    ``compress_kv`` on the layer's cache. ``rec_kv``: [attended, kept, bytes] lists this layer appends to;
    ``rec_kept``: the first unit's kept token indices of row 0 (None: every token) are appended to it. ``kpos``:
    layer -> token positions of its cached keys (absent: key j is token j), kept up to date here and handed to the
    kernels as ``lctx.kv_positions`` — None when the method does not read them (``Method.needs_kv_positions``);
    ``start``: the token position of this scale's first token."""
    units = [backbone.spec.branches] if method.granularity == "block" else [(b,) for b in backbone.spec.branches]
    kv_before = kv.length
    lctx = LayerCtx(sctx, li, kv_len=kv_before, kv_segments=tuple(segs),
                    head_logits=lambda h: backbone.head(h, cond, scale),
                    guide=lambda logits: backbone.guide(logits, cond, scale),
                    lens_entropy=(lambda h, mix="guided": backbone.lens_entropy(h, cond, scale, mix))
                    if hasattr(backbone, "lens_entropy") else None)
    with prange("vb.method.attention"):
        attn_fn = method.attention(lctx) or sdpa_attention
    kv_hook, held, new_pos = method.uses_kv_hook(), {}, None
    if kv_hook:   # hand this scale's queries (as the kernel receives them) to compress_kv
        kernel = attn_fn

        def attn_fn(q, k, v, *, scale, mask=None, ctx=None):
            held["q"], held["scale"] = q, scale
            return kernel(q, k, v, scale=scale, mask=mask, ctx=ctx)
    x_block_in, counts = x, []
    for unit in units:
        lctx.branch = None if method.granularity == "block" else unit[0]
        with prange("vb.method.select"):
            sel = method.select(lctx, x)
        if rec_kept is not None and unit is units[0]:
            rec_kept.append(None if sel is None else sel.keep_idx[0].tolist())
        if sel is None:
            xk, pk = x, pos
        else:
            with prange("vb.method.gather"):
                xk, pk = sel.gather(x), backbone.gather_positions(pos, sel)
        if xk.shape[1] > 0:  # K = 0: the unit is bypassed (no compute, no K/V); restore fills every token
            unit_kv = kv.length
            if kpos is not None:
                lctx.kv_positions = _key_positions(kpos.get(li), unit_kv, start, sel, x.shape[1], x.device)
            for name in unit:
                with prange("vb.block." + name):
                    xk = xk + backbone.branch(li, name, xk, pk, cond, kv, attn_fn, lctx)
            if kv.length != unit_kv:
                if sel is not None:
                    new_pos = sel.keep_idx
                if kpos is not None and lctx.kv_positions is not None:
                    kpos[li] = lctx.kv_positions
        if sel is None:
            x = xk
        else:
            with prange("vb.method.restore"):
                x = method.restore(lctx, x, xk, sel)
        counts += [xk.shape[1]] * len(unit)
    lctx.branch = None
    if kpos is not None:
        lctx.kv_positions = kpos.get(li)   # the cache as it stands after the block
    with prange("vb.block.after"):
        x = backbone.after_block(li, x, cond, scale)
    with prange("vb.method.after_layer"):
        method.after_layer(lctx, x_block_in, x)
    attended = kv.length
    segs.append(attended - kv_before)
    rec_tokens.append(sum(counts) / len(counts))
    rec_keys.append(lctx.attn_keys if lctx.attn_keys is not None else float(attended))
    if mem is not None:
        mem.observe(li, kv_bytes(kv), x, x_block_in)
    if kv_hook and kv.k is not None:
        with prange("vb.method.compress_kv"):
            edit = method.compress_kv(lctx, KVState(kv.k, kv.v, held.get("q"), attended - kv_before, new_pos,
                                                    tuple(segs), held.get("scale"), lctx.raw_query))
        if edit is not None:
            if kpos is not None:
                kpos[li] = _edit_positions(kpos.get(li), kv.length, edit, kv.k.device)
            _replace_kv(kv, *edit.apply(kv.k, kv.v))
    if mem is not None:
        mem.kv[li] = kv_bytes(kv)
    if rec_kv is not None:
        rec_kv[0].append(attended)
        rec_kv[1].append(kv.length)
        rec_kv[2].append(kv_bytes(kv))
    return x


@torch.no_grad()
def generate(backbone: Backbone, conditions: list[Condition], method: Method | None = None,
             rng: torch.Generator | list[torch.Generator] | None = None, record_maps: bool = False) -> GenOutput:
    """Generate one batch of images, one per condition: a prompt (str) or a class label (int), as the backbone
    takes (it checks the kind: one line otherwise). ``rng`` drives sampling: one generator, one per image (a
    batch then draws what single runs would), or None (the global RNG). ``record_maps``: the record keeps which
    tokens each (scale, layer) computed (``kept_maps``; large at 1024², so off by default)."""
    method = method or Method()
    dev, spec = backbone.device, backbone.spec
    rec = GenRecord(batch=len(conditions))
    reset_peak_memory(dev)
    total = Stopwatch(dev)
    with backbone.precision():
        cond = backbone.condition(conditions)
        rec.text_len = backbone.text_lengths(cond)
        state = backbone.init_state(cond)
        kvs = [backbone.new_kv_cache() for _ in range(spec.depth)]
        if method.uses_kv_hook():   # a cache preallocated for the whole schedule would hold what compression drops
            for kv in kvs:
                if getattr(kv, "capacity", 0):
                    kv.capacity = 0
        mem = MemoryTracker(spec.depth)
        segs: list[list[int]] = [[] for _ in range(spec.depth)]
        # layer -> token positions of its cached keys, once they are not 0..L-1 (only for a method that reads them)
        kpos: dict[int, torch.Tensor] | None = {} if method.needs_kv_positions else None
        scales = backbone.scales()
        schedule = tuple(ScaleInfo.of(s) for s in scales)
        method.start()
        watch = Stopwatch(dev)
        for scale, info in zip(scales, schedule):
            sctx = ScaleCtx(info.si, len(scales), (info.h, info.w), cond.rows, cond.batch, spec, schedule,
                            info.rule_w, backbone.preview)
            rec.scale_hw.append((info.h, info.w))
            rec.scale_n.append(info.n)
            with prange("vb.method.plan"):
                plan = method.plan_scale(sctx)
            if plan.skip:
                rec.rows.append(0)
                rec.skipped_scales.append(info.si)
                rec.tokens.append([0.0] * spec.depth)
                rec.kv_len.append([kv.length for kv in kvs])
                rec.kv_kept.append([kv.length for kv in kvs])
                rec.kv_bytes.append(list(mem.kv))
                rec.attn_keys.append([0.0] * spec.depth)
                for s in segs:
                    s.append(0)
                rec.scale_time_s.append(watch.lap())
                continue
            if plan.cond_only and cond.rows > cond.batch:
                cond = backbone.cond_only(cond)
                for kv in kvs:
                    kv.keep_rows(cond.rows)
                if kpos is not None:
                    kpos = {li: p[:cond.rows] for li, p in kpos.items()}
                rec.cond_only_from = info.si
                sctx.rows = cond.rows
            rec.rows.append(cond.rows)
            with prange("vb.sample.input"):
                x = (backbone.scale_input(state, cond, scale) if plan.input_resize is None
                     else backbone.scale_input(state, cond, scale, resize=plan.input_resize))
                pos = backbone.positions(cond, scale)
            tokens, keys, kvrec = [], [], ([], [], [])
            mem.held = tensor_bytes(cond, state)
            kept = [] if record_maps else None
            start = sum(s.n for s in schedule[:info.si])
            for li in range(spec.depth):
                x = _run_layer(backbone, method, li, x, pos, cond, kvs[li], segs[li], scale, sctx, tokens, keys,
                               kvrec, mem, kept, kpos, start)
            if kept and any(k is not None for k in kept):
                rec.kept_maps = (rec.kept_maps or {}) | {str(info.si): kept}
            rec.tokens.append(tokens)
            rec.attn_keys.append(keys)
            rec.kv_len.append(kvrec[0])     # keys each layer attended at this scale (FLOPs), before compression
            rec.kv_kept.append(kvrec[1])
            rec.kv_bytes.append(kvrec[2])
            with prange("vb.head"):
                logits = backbone.head(x, cond, scale)
            mem.observe(None, None, x, logits)
            with prange("vb.sample.guide"):
                l_cond, l_uncond, guided = backbone.guide(logits, cond, scale)
            with prange("vb.method.after_logits"):
                replaced = method.after_logits(sctx, l_cond, l_uncond, guided)
            with prange("vb.sample.draw"):
                codes = backbone.sample(guided if replaced is None else replaced, x, cond, scale, rng)
            with prange("vb.sample.update"):
                zero = method.code_mask(sctx)
                state = (backbone.update(state, codes, scale) if zero is None
                         else backbone.update(state, codes, scale, zero=zero))
            with prange("vb.method.after_scale"):
                method.after_scale(sctx, state)
            rec.scale_time_s.append(watch.lap())
        images = backbone.decode(state)
        rec.decode_time_s = watch.lap()
    rec.total_time_s = total.lap()
    rec.kv_peak_bytes, rec.loop_peak_bytes, rec.rss_peak_bytes = mem.kv_peak, mem.loop_peak, rss_peak_bytes()
    if torch.device(dev).type == "cuda":
        rec.peak_memory_bytes, rec.peak_memory_kind = peak_memory_bytes(dev)
    else:
        rec.peak_memory_bytes, rec.peak_memory_kind = mem.loop_peak, "cpu_loop_tensors"
    return GenOutput(images.float(), state, rec, method.summary())
