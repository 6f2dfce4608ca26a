"""Golden-fixture checks: rebuild a backbone from a fixture's meta file alone and compare with the official run.

Used by ``scripts/check_fixture.py`` and by the golden tests (one code path). Fixture format: see
``shared/fixtures/infinity/README.md``: ``<tag>_meta.json`` beside ``<tag>_infinity_weights.safetensors``,
``<tag>_vae_weights.safetensors`` and ``<tag>_tensors.safetensors`` (weights stored as float8_e4m3fn).

Compared (when the fixture holds them): teacher-forced cond / uncond / CFG logits, both entropies, the
KV-cached loop's CFG logits with the recorded bits replayed, the summed codes, the decoded image (float and
uint8 BGR), the bits our sampler draws with the fixture's seed, and the VAE encoder path.

Selection-based methods (FastVAR here; NOVA, SparseVAR, ToProVAR, SparVAR top-k with their fixtures) keep the
top-K tokens of a score with near-ties, so float noise of 1e-6 (another CPU, another torch build) can flip one kept
token, and a free-running comparison then diverges. The check therefore holds on every machine by **teacher
forcing of the selection** (:class:`ForcedSelection`): the official kept indices are replayed for every downstream
check (logits, K/V cache lengths, branch caches, codes, image, sampled bits), and OUR selection is checked
separately, unit by unit, on the block inputs of that replayed run and on the official block inputs the fixture
stores: a kept list that differs from the official one is accepted only where the scores are tied within
``SCORE_RTOL`` × the row's largest |score| (:func:`judge_selection`); the accepted near-ties are counted and printed.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from varbench.backbones.infinity.backbone import InfinityBackbone, Sampling
from varbench.backbones.infinity.model import InfinityTransformer
from varbench.backbones.infinity.schedules import rope_cos_sin, rope_positions, schedule_from_official
from varbench.backbones.infinity.vae import BSQVAE, load_vae_state_dict
from varbench.entropy import bitwise_entropy
from varbench.errors import UserError
from varbench.harness.checks import SCORE_RTOL, TOL, Check, _diff, format_checks  # noqa: F401
from varbench.harness.fixtures_hart import check_hart_fixture
from varbench.harness.fixtures_var import check_var_fixture, is_var_meta
from varbench.harness.registry import method_class
from varbench.hooks import Method
from varbench.io import to_uint8
from varbench.loop import generate
from varbench.tokens import Selection

REQUIRED_META = ("infinity", "vae", "sampling", "scale_schedule")
SUPPORTED = ("Infinity (infinity/*_meta.json), FastVAR on Infinity (fastvar/meta.json), SkipVAR (skipvar/meta.json), "
             "HART (hart/*_meta.json), VAR (var/*_meta.json)")


def read_meta(meta_path: str | Path) -> dict:
    """A fixture's meta file as a dict; a missing file, a folder or a corrupt JSON is a one-line UserError."""
    p = Path(meta_path)
    if p.is_dir():
        metas = sorted(q.name for q in p.glob("*meta.json"))
        hint = f"; pass one of its meta files: {', '.join(metas)}" if metas else "; pass a fixture's *meta.json file"
        raise UserError(f"{p}: is a folder{hint}")
    if not p.is_file():
        raise UserError(f"{p}: no such fixture meta file")
    try:
        meta = json.loads(p.read_text())
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not a JSON text file ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{p}: a fixture meta file holds a JSON object, got {type(meta).__name__}")
    return meta


def _require_infinity_meta(meta: dict, meta_path: Path) -> None:
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        src = meta.get("source", "")
        raise UserError(f"{meta_path}: unsupported fixture family (source {json.dumps(src)[:80]}; no "
                        f"{', '.join(missing)} in the meta file); supported: {SUPPORTED}")


def _load_tensors(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing (a fixture's files lie beside its meta file)")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors reports a torn or corrupt file with its own error types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable safetensors file ({msg})") from None


def _load_weights(path: Path) -> dict:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in _load_tensors(path).items()}


class FixedText:
    """A 'text encoder' that returns the fixture's T5 features (kv_compact, lens)."""

    def __init__(self, kv_compact: torch.Tensor, lens: list[int]):
        self.kv, self.lens = kv_compact, lens

    def __call__(self, prompts):
        return self.kv, list(self.lens)


def _files(meta_path: Path) -> tuple[str, dict]:
    tag = read_meta(meta_path).get("tag", "")
    pre = f"{tag}_" if tag else ""
    d = meta_path.parent
    return tag, {"tf": d / f"{pre}infinity_weights.safetensors", "vae": d / f"{pre}vae_weights.safetensors",
                 "tensors": d / f"{pre}tensors.safetensors"}


def build_from_meta(meta_path: Path):
    """(backbone, tensors, meta): an Infinity backbone built from the meta file, with the fixture's weights."""

    meta_path = Path(meta_path)
    meta = read_meta(meta_path)
    _require_infinity_meta(meta, meta_path)
    _, files = _files(meta_path)
    I, V = meta["infinity"], meta["vae"]
    patchify = bool(V.get("apply_spatial_patchify", 0))
    d_bits = I.get("d_vae(bits per token)") or I.get("d(bits per token)") or V["codebook_dim"] * (4 if patchify else 1)
    tf = InfinityTransformer(I["depth"], I["embed_dim"], I["num_heads"], d_bits, I["text_channels"], I["text_maxlen"],
                             I.get("mlp_ratio", 4), I["block_chunks"])
    tf.load_state_dict(_load_weights(files["tf"]), strict=True)
    vae = BSQVAE(V["codebook_dim"], V["base_ch"], tuple(V["ch_mult"]), V.get("num_res_blocks", 2),
                 V.get("patch_size(stride)", V.get("patch_size")))
    load_vae_state_dict(vae, _load_weights(files["vae"]))
    t = _load_tensors(files["tensors"])
    cu = t["cu_seqlens_k"].long()
    lens = (cu[1:] - cu[:-1]).tolist()
    s = meta["sampling"]
    cil = s.get("cfg_insertion_layer", [0])
    smp = Sampling(cfg=s["cfg"], tau=s["tau"], top_k=s["top_k"], top_p=s["top_p"],
                   cfg_insertion_layer=int(cil[0] if isinstance(cil, list) else cil))
    sched = schedule_from_official(meta["scale_schedule"])
    bb = InfinityBackbone(tf.eval(), vae.eval(), FixedText(t["kv_compact"], lens), sched, smp, patchify, "cpu", "fp32")
    return bb, t, meta


class MethodWrapper(Method):
    """Forwards every hook to ``inner`` (a method, or None: the backbone's own inference). Subclasses override the
    hooks they watch or steer; ``inner`` keeps the wrapped method's own state (and its token claims)."""

    def __init__(self, inner: Method | None = None):
        self.inner = inner if inner is not None else Method()
        self.granularity = self.inner.granularity
        super().__init__(self.inner.cfg)

    def start(self):
        self.inner.start()

    def plan_scale(self, sctx):
        return self.inner.plan_scale(sctx)

    def attention(self, lctx):
        return self.inner.attention(lctx)

    def select(self, lctx, x):
        return self.inner.select(lctx, x)

    def restore(self, lctx, x_in, y_kept, sel):
        return self.inner.restore(lctx, x_in, y_kept, sel)

    def after_layer(self, lctx, x_in, x_out):
        self.inner.after_layer(lctx, x_in, x_out)

    def after_logits(self, sctx, lc, lu, lg):
        return self.inner.after_logits(sctx, lc, lu, lg)

    def after_scale(self, sctx, state):
        self.inner.after_scale(sctx, state)

    def summary(self):
        return self.inner.summary()


def innermost(m: Method | None) -> Method | None:
    """The method under any stack of :class:`MethodWrapper`."""
    while isinstance(m, MethodWrapper):
        m = m.inner
    return m


class Recorder(MethodWrapper):
    """Records the logits handed to ``after_logits`` and the kept index sets the loop used, for comparison with a
    fixture."""

    def start(self):
        super().start()
        self.logits, self.kept_sets = {}, {}

    def select(self, lctx, x):
        sel = super().select(lctx, x)
        if sel is not None and sel.k < sel.n_total:
            self.kept_sets[(lctx.si, lctx.li, lctx.branch)] = sel.keep_idx.clone()
        return sel

    def after_logits(self, sctx, lc, lu, lg):
        self.logits[sctx.si] = {"cfg": lg.clone(), "cond": lc.clone(), "uncond": None if lu is None else lu.clone()}
        return super().after_logits(sctx, lc, lu, lg)


# ---------------------------------------------------------------- teacher forcing of token selections
ScoreFn = Callable[..., torch.Tensor]  # (lctx, x_BNC) -> [rows, N], higher = kept first


def distance_to_mean_scores(lctx, x_BNC: torch.Tensor) -> torch.Tensor:
    """FastVAR's score as the fixture README states it, Σ_c (x − mean over the scale's tokens)², per row, in float64.
    Written from the spec, independently of ``baselines/fastvar.py``: the reference that ties are judged on."""
    x = x_BNC.double()
    return (x - x.mean(1, keepdim=True)).pow(2).sum(-1)


# method family -> (reference score of a unit's input, whether the kept ORDER is part of the decision: FastVAR
# appends the kept tokens' K/V in descending-score order). NOVA / SparseVAR / ToProVAR / SparVAR fixtures add a line.
SELECTION_SCORES: dict[str, tuple[ScoreFn, bool]] = {"fastvar": (distance_to_mean_scores, True)}


def _valid_top_k(idx: torch.Tensor, score: torch.Tensor, tau: float, ordered: bool) -> bool:
    """``idx`` is a top-K of ``score`` (and, if ``ordered``, in descending order) when gaps ≤ tau count as ties."""
    if idx.unique().numel() != idx.numel() or (idx.numel() and (idx.min() < 0 or idx.max() >= score.numel())):
        return False
    kept = score[idx]
    rest = torch.ones_like(score, dtype=torch.bool)
    rest[idx] = False
    if kept.numel() and rest.any() and kept.min() < score[rest].max() - tau:
        return False
    if ordered and kept.numel() > 1:
        later_max = kept.flip(0).cummax(0).values.flip(0)[1:]  # max(kept[i+1:]) for each i
        if (kept[:-1] < later_max - tau).any():
            return False
    return True


def judge_selection(ours: torch.Tensor | None, ref: torch.Tensor, score: torch.Tensor | None,
                    rtol: float = SCORE_RTOL, ordered: bool = True) -> str:
    """One row's kept indices against the official ones (1-D). Returns "same"; "tie-set" / "tie-order" when they
    differ but BOTH are a valid top-K of ``score`` (descending if ``ordered``) with gaps ≤ rtol·max|score| counted as
    ties, i.e. they disagree only on near-tied tokens; otherwise the reason (a mismatch)."""
    if ours is None:
        return "no selection where the official run selected"
    ours, ref = ours.long().flatten(), ref.long().flatten()
    if ours.numel() != ref.numel():
        return f"K={ours.numel()} (official {ref.numel()})"
    same_set = torch.equal(ours.sort().values, ref.sort().values)
    if torch.equal(ours, ref) or (same_set and not ordered):
        return "same"
    if score is None:
        return "differs (no reference score to judge ties)"
    score = score.double().flatten()
    tau = rtol * score.abs().max().item()
    for who, idx in (("ours", ours), ("official", ref)):
        if not _valid_top_k(idx, score, tau, ordered):
            return f"{who} is not a {'descending ' if ordered else ''}top-K of the scores within rtol {rtol:g}"
    return "tie-order" if same_set else "tie-set"


class ForcedSelection(MethodWrapper):
    """Teacher forcing of a selection-based method's token choice (FastVAR; NOVA, SparseVAR, ToProVAR, SparVAR top-k).

    ``forced``: (si, li, branch or None) -> the official kept indices [rows or 1, K], in the official order. At
    these units the inner method selects as usual (its own state and claims run); the wrapper records that choice
    with the reference ``score_fn(lctx, x)`` of the unit's input, then hands the loop the OFFICIAL indices -- so
    every downstream tensor (K/V caches, logits, codes, image) follows the official run and a near-tie cannot make
    it diverge. A structural mismatch (no selection, another K or row count) is not replaced: the run then goes our
    way and the downstream checks show it. ``replay=False`` records only (the free-running, machine-dependent check).
    ``capture``: units whose (lctx, input) are kept, to rerun our selection on the official input afterwards.
    """

    def __init__(self, inner: Method | None, forced: dict, score_fn: ScoreFn | None = None, ordered: bool = True,
                 rtol: float = SCORE_RTOL, replay: bool = True, capture=()):
        super().__init__(inner)
        self.forced = {k: v.long().reshape(-1, v.shape[-1]) for k, v in forced.items()}
        self.forced_scales = {k[0] for k in self.forced}
        self.score_fn, self.ordered, self.rtol, self.replay = score_fn, ordered, rtol, replay
        self.capture = set(capture)
        self.seen, self.unexpected, self.inputs = {}, [], {}

    def start(self):
        super().start()
        self.seen: dict = {}        # unit -> (our keep_idx [rows|1, K] or None, reference score [rows, N] or None)
        self.unexpected: list = []  # units of a forced scale where we pruned and the official run did not
        self.inputs: dict = {}      # captured unit -> (lctx copy, input)

    def select(self, lctx, x):
        ours = self.inner.select(lctx, x)
        key = (lctx.si, lctx.li, lctx.branch)
        ref = self.forced.get(key)
        if ref is None:
            if lctx.si in self.forced_scales and ours is not None and ours.k < ours.n_total:
                self.unexpected.append(key)
            return ours
        score = None if self.score_fn is None else self.score_fn(lctx, x).detach()
        self.seen[key] = (None if ours is None else ours.keep_idx.detach().clone(), score)
        if key in self.capture:
            self.inputs[key] = (dataclasses.replace(lctx), x.detach().clone())
        if (not self.replay or ours is None or ours.k != ref.shape[-1] or ours.n_total != x.shape[1]
                or ref.shape[0] not in (1, x.shape[0])):
            return ours
        return Selection(ref.to(ours.keep_idx.device), ours.n_total)

    def judge(self, ours: torch.Tensor | None, ref: torch.Tensor, score: torch.Tensor | None) -> list[str]:
        """Per-row verdicts of :func:`judge_selection` (``ours`` / ``score`` may hold one row shared by all)."""
        return [judge_selection(None if ours is None else ours[min(r, ours.shape[0] - 1)], ref[r],
                                None if score is None else score[min(r, score.shape[0] - 1)], self.rtol, self.ordered)
                for r in range(ref.shape[0])]

    def verdicts(self, si: int) -> dict:
        """Scale ``si``: rows compared, "same", "tie-set", "tie-order" counts and the mismatches [(unit, row, why)]."""
        out: dict = {"rows": 0, "same": 0, "tie-set": 0, "tie-order": 0, "wrong": []}
        for key, ref in sorted(self.forced.items(), key=lambda kv: str(kv[0])):
            if key[0] != si:
                continue
            seen = self.seen.get(key)
            rows = ["unit never ran"] * ref.shape[0] if seen is None else self.judge(seen[0], ref, seen[1])
            for r, v in enumerate(rows):
                out["rows"] += 1
                if v in out:
                    out[v] += 1
                else:
                    out["wrong"].append((key, r, v))
        out["wrong"] += [(k, None, "pruned where the official run did not") for k in self.unexpected if k[0] == si]
        return out

    def rerun(self, key, x: torch.Tensor) -> list[str]:
        """Our selection at a captured unit on another input (the official block input): per-row verdicts, ties
        judged on the reference score of THAT input."""
        lctx, _ = self.inputs[key]
        sel = self.inner.select(lctx, x)
        score = None if self.score_fn is None else self.score_fn(lctx, x)
        return self.judge(None if sel is None else sel.keep_idx, self.forced[key], score)


def forced_from_fixture(t: dict, meta: dict, branches) -> dict:
    """The official kept indices of a FastVAR-style fixture: ``kept_idx_sNN`` [block, branch, row, K] (global blocks
    from ``meta.pruned.blocks[0]``, branches in the backbone's order) -> {(si, li, branch): [row, K]}."""
    out = {}
    for key in sorted(k for k in t if re.fullmatch(r"kept_idx_s\d+", k)):
        si, ref = int(key[len("kept_idx_s"):]), t[key].long()
        if ref.shape[1] != len(branches):
            raise UserError(f"{key}: {ref.shape[1]} branches in the fixture, the backbone has {list(branches)}")
        if not (meta.get("pruned") or {}).get("blocks"):
            raise UserError(f"{key}: the meta file names no pruned.blocks [first, last] for its block axis")
        b0 = int(meta["pruned"]["blocks"][0])
        for bi in range(ref.shape[0]):
            for br, name in enumerate(branches):
                out[(si, b0 + bi, name)] = ref[bi, br]
    return out


def _wrong_text(v: dict) -> str:
    if not v["wrong"]:
        return ""
    (si, li, br), row, why = v["wrong"][0]
    return f"; first: block {li} {br} row {row}: {why}"


def method_from_meta(meta: dict):
    """The method a fixture was made with: FastVAR (its schedule read from the meta file) or none."""
    if "fastvar" not in json.dumps(meta.get("source", "")).lower():
        return None

    pr = meta["pruned"]
    ratios = {int(m.group(2)): v["ratio"] for k, v in pr.items() if (m := re.match(r"s\d+\((\d+)x(\d+)\)", k))}
    cache_w = int(re.match(r"s\d+\((\d+)x(\d+)\)", pr["cache_scale"]).group(2))
    skip_w = sorted({meta["scale_schedule"][si][2] for si in meta.get("scales_skipped", [])})
    FastVAR = method_class("fastvar")
    return FastVAR(FastVAR.Config(prune_ratios=ratios, skip_widths=skip_w, blocks=list(pr["blocks"]), cache_width=cache_w))


def _forcing(method: Method | None, forced: dict, replay: bool, capture=()) -> Method | None:
    """``method`` under teacher forcing of the fixture's selection (unchanged when the fixture records none)."""
    if not forced:
        return method
    fam = getattr(getattr(innermost(method), "cfg", None), "family", None)
    score_fn, ordered = SELECTION_SCORES.get(fam, (None, True))
    return ForcedSelection(method, forced, score_fn, ordered, replay=replay, capture=capture)


@torch.no_grad()
def check_infinity_fixture(meta_path: str | Path, *, teacher_forced_selection: bool = True,
                           sampled_bits: bool = True) -> list[Check]:
    """Every comparison an Infinity / FastVAR fixture holds. ``teacher_forced_selection=False``: our own selection
    drives the run (the old, machine-dependent check: a near-tie flip makes it diverge) -- diagnostics only.
    ``sampled_bits=False`` leaves out the second generation (our sampler with the fixture's seed)."""
    meta_path = Path(meta_path)
    bb, t, meta = build_from_meta(meta_path)
    m, sched = bb.model, bb.schedule
    n_sc = len(sched.hws)
    lens = bb.text(None)[1]
    B = len(lens)
    cfg, tau = meta["sampling"]["cfg"], meta["sampling"]["tau"]
    out: list[Check] = []
    bits = [t[f"bits_s{si:02d}"] for si in range(n_sc) if f"bits_s{si:02d}" in t]
    forced = forced_from_fixture(t, meta, bb.spec.branches)
    dbg_x = {}  # "dbg_x_in_bLL_sSS" -> the unit whose input it is (the block's first unit)
    for key in t:
        if mm := re.fullmatch(r"dbg_x_in_b(\d+)_s(\d+)", key):
            si, li = int(mm.group(2)), int(mm.group(1))
            dbg_x[key] = (si, li, bb.spec.branches[0] if (si, li, bb.spec.branches[0]) in forced else None)

    # 1. teacher-forced full-sequence forward (block-causal mask)
    if "tf_x_BLC_wo_prefix" in t:
        cs = rope_cos_sin(rope_positions(sched), m.head_dim)
        x = t["tf_x_BLC_wo_prefix"]
        lc = m.forward_teacher_forced(t["kv_compact"], lens, x, sched.scales, cs)
        lu = m.forward_teacher_forced(m.uncond_text(lens), lens, x, sched.scales, cs)
        lg = cfg * lc.mul(1 / tau) + (1 - cfg) * lu.mul(1 / tau)
        out += [Check("tf_logits_cond", _diff(lc, t["tf_logits_cond"]), TOL["logits_cond"]),
                Check("tf_logits_uncond", _diff(lu, t["tf_logits_uncond"]), TOL["logits_uncond"]),
                Check("tf_logits_cfg", _diff(lg, t["tf_logits_cfg"]), TOL["logits_cfg"]),
                Check("tf_entropy_cfg", _diff(bitwise_entropy(lg), t["tf_entropy_cfg"]), TOL["entropy"]),
                Check("tf_entropy_cond", _diff(bitwise_entropy(lc / tau), t["tf_entropy_cond"]), TOL["entropy"])]

    # 2. the KV-cached loop (with the fixture's method, its selection teacher-forced) and the recorded bits replayed
    #    (official gt_leak-style)
    fs = _forcing(method_from_meta(meta), forced, teacher_forced_selection, capture=dbg_x.values())
    rec = Recorder(fs)
    bb.forced_bits = bits
    res = generate(bb, [""] * B, rec)
    bb.forced_bits = None
    if "infer_logits_cfg" in t:
        infer = torch.cat([rec.logits[si]["cfg"] for si in sorted(rec.logits)], 1)
        out.append(Check("infer_logits_cfg (KV cache, replayed bits)", _diff(infer, t["infer_logits_cfg"]), TOL["logits_cfg"]))
    for si in range(n_sc):  # per-scale logits (FastVAR-style fixtures)
        for kind in ("cfg", "cond", "uncond"):
            key = f"logits_{kind}_s{si:02d}"
            if key in t:
                got = rec.logits.get(si, {}).get(kind)
                out.append(Check(key, float("inf") if got is None else _diff(got, t[key]), TOL["logits_cfg"]))
    if meta.get("scales_skipped") is not None:
        out.append(Check("skipped scales (count differing)",
                         float(len(set(meta["scales_skipped"]) ^ set(res.record.skipped_scales))), TOL["exact"]))
    ran = [i for i in range(len(res.record.kv_len)) if i not in res.record.skipped_scales]
    for name, ref_len in sorted((meta.get("kv_cache_len_after_each_run_scale") or {}).items()):
        li = int(re.match(r"block(\d+)", name).group(1))
        ours = [res.record.kv_len[i][li] for i in ran]
        bad = sum(a != b for a, b in zip(ours, ref_len)) + abs(len(ours) - len(ref_len))
        out.append(Check(f"kv_cache_len {name} (scales differing)", float(bad), TOL["exact"]))
    if isinstance(fs, ForcedSelection):
        how = "teacher-forced" if teacher_forced_selection else "free-running (NOT teacher-forced)"
        for si in sorted(fs.forced_scales):
            v = fs.verdicts(si)
            out.append(Check(f"kept_idx_s{si:02d} our selection on the {how} block inputs (rows wrong of {v['rows']}; "
                             f"near-ties accepted: {v['tie-set']} set, {v['tie-order']} order{_wrong_text(v)})",
                             float(len(v["wrong"])), TOL["exact"], near_ties=v["tie-set"] + v["tie-order"]))
        for key, unit in sorted(dbg_x.items()):
            if unit not in fs.inputs:
                out.append(Check(f"{key} (block input: the unit never ran)", float("inf"), TOL["codes"]))
                continue
            out.append(Check(f"{key} (block input, official selection replayed)", _diff(fs.inputs[unit][1], t[key]),
                             TOL["codes"]))
            rows = fs.rerun(unit, t[key])
            wrong = [v for v in rows if v not in ("same", "tie-set", "tie-order")]
            ties = sum(v in ("tie-set", "tie-order") for v in rows)
            out.append(Check(f"{key} our selection on the official block input (rows wrong of {len(rows)}; near-ties "
                             f"accepted: {ties}{'; ' + wrong[0] if wrong else ''})", float(len(wrong)), TOL["exact"],
                             near_ties=ties))
    for key in sorted(k for k in t if k.startswith("dbg_cache_b")):  # FastVAR's per-branch caches (cache scale)
        li, branch = int(key[len("dbg_cache_b"):][:2]), key.rsplit("_", 1)[-1]
        inner = innermost(rec)
        got = inner.cache.get((li, branch)) if hasattr(inner, "cache") else None
        out.append(Check(key, float("inf") if got is None else _diff(got[0], t[key]), TOL["codes"]))
    if "summed_codes" in t:
        out.append(Check("summed_codes", _diff(res.state.summed, t["summed_codes"]), TOL["codes"]))
    if "image_pm1" in t:
        out.append(Check("image_pm1", _diff(res.images, t["image_pm1"]), TOL["image"]))
    if "image_pm1_crop256" in t:
        c = t["image_pm1_crop256"]
        out.append(Check("image_pm1_crop256", _diff(res.images[..., : c.shape[-2], : c.shape[-1]], c), TOL["image"]))
    if "image_uint8_bgr_hwc" in t:
        ours = to_uint8(res.images).flip(-1)
        out.append(Check("image_uint8_bgr", _diff(ours, t["image_uint8_bgr_hwc"]), TOL["uint8"]))

    # 3. our sampler with the fixture's seed draws the recorded bits (same method, same forced selection)
    g_seed = meta["sampling"].get("g_seed")
    if sampled_bits and g_seed is not None and bits:
        rng = torch.Generator().manual_seed(int(g_seed))
        res2 = generate(bb, [""] * B, Recorder(_forcing(method_from_meta(meta), forced, teacher_forced_selection)), rng)
        drawn = torch.cat([b.reshape(B, -1) for b in res2.state.bits], 1)
        ref_bits = torch.cat([b.reshape(B, -1) for b in bits], 1)
        diff = (drawn != ref_bits).float().mean().item() if drawn.shape == ref_bits.shape else float("inf")
        out.append(Check("sampled_bits (g_seed, fraction differing)", diff, TOL["exact"]))

    # 4. VAE encoder path (multi-scale BSQ on the VAE schedule)
    if "enc_image_pm1" in t:
        vae = bb.vae
        raw = vae.encode_raw(t["enc_image_pm1"])
        out.append(Check("enc_raw_features", _diff(raw, t["enc_raw_features"]), TOL["image"]))
        enc_bits, q = vae.encode_bits(t["enc_image_pm1"], [tuple(s) for s in meta["vae_scale_schedule"]])
        nb = sum(int((b.to(torch.uint8) != t[f"enc_bits_s{i:02d}"]).sum()) for i, b in enumerate(enc_bits))
        out.append(Check("enc_bits (count differing)", float(nb), TOL["exact"]))
        out.append(Check("enc_quantized_out", _diff(q.reshape(t["enc_quantized_out"].shape), t["enc_quantized_out"]), TOL["codes"]))
        out.append(Check("enc_recon_pm1", _diff(vae.decode(t["enc_quantized_out"]), t["enc_recon_pm1"]), TOL["image"]))
    return out


@torch.no_grad()
def check_skipvar_fixture(meta_path: str | Path) -> list[Check]:
    """SkipVAR fixture: decision features/decisions on six code pairs, and three full generation traces."""
    meta_path = Path(meta_path)
    meta = read_meta(meta_path)
    bb, _, _ = build_from_meta(meta_path.parent.parent / "fastvar" / "meta.json")  # same weights (README)
    t = _load_tensors(meta_path.parent / "tensors.safetensors")
    out: list[Check] = []
    tol_feat = 1e-5
    SkipVAR = method_class("skipvar")
    m = SkipVAR()
    for p in meta["pairs"]:
        k = f"pair{p['pair']}_"
        small_old = F.interpolate(t[k + "summed_codes_s08"], size=(1, *bb.vae_hws[4]), mode="trilinear")
        small_new = F.interpolate(t[k + "summed_codes_s09"], size=(1, *bb.vae_hws[4]), mode="trilinear")
        out.append(Check(k + "small_codes", max(_diff(small_old, t[k + "small_codes_old"]),
                                                _diff(small_new, t[k + "small_codes_new"])), TOL["codes"]))
        old, new = bb.preview_codes(t[k + "summed_codes_s08"], 4), bb.preview_codes(t[k + "summed_codes_s09"], 4)
        out.append(Check(k + "decoded", max(_diff(old, t[k + "decoded_old"]), _diff(new, t[k + "decoded_new"])), TOL["image"]))
        x = list(SkipVAR.features(old, new))
        out.append(Check(k + "features", max(abs(x[0] - p["diff_hf"]), abs(x[1] - p["hf_ratio"])), tol_feat))
        sk = m.skip_model.scores(x)
        out.append(Check(k + "skip_scores", max(abs(a - b) for a, b in zip(sk, p["skip_scores"])), 1e-3))
        un = m.uncond_model.predict(x)
        wrong = int(m.skip_model.predict(x) != p["skip_pred"]) + int(un != p["uncond_pred_raw"])
        out.append(Check(k + "decisions (wrong)", float(wrong), TOL["exact"]))
    for li, lp in enumerate(meta["loops"]):
        k = f"loop{li}_"
        cu = t[k + "cu_seqlens_k"].long()
        bb.text = FixedText(t[k + "kv_compact"], (cu[1:] - cu[:-1]).tolist())
        bb.sampling.tau = lp["tau"]
        bits = [t[f"{k}bits_s{si:02d}"] for si in range(13) if f"{k}bits_s{si:02d}" in t]
        rec = Recorder(SkipVAR())
        bb.forced_bits = bits
        res = generate(bb, [""], rec)
        bb.forced_bits = None
        d = rec.inner.decision
        out.append(Check(k + "features", max(abs(d["diff_hf"] - lp["features"][0]), abs(d["hf_ratio"] - lp["features"][1])), tol_feat))
        ran = [si for si in range(13) if si not in res.record.skipped_scales]
        wrong = int(ran != lp["scales_run"]) + int(res.record.cond_only_from != lp["cond_only_from"])
        wrong += int(d["skip_pred"] != lp["skip_pred"]) + int(d.get("uncond_pred") != lp["uncond_pred"])
        out.append(Check(k + "scales run / cond-only / decisions (wrong)", float(wrong), TOL["exact"]))
        worst = 0.0
        for si in lp["scales_run"]:
            for kind in ("cfg", "cond", "uncond"):
                key = f"{k}logits_{kind}_s{si:02d}"
                got = rec.logits.get(si, {}).get(kind)
                if key in t:
                    worst = max(worst, float("inf") if got is None else _diff(got, t[key]))
                elif got is not None and kind == "uncond":
                    worst = float("inf")  # an uncond branch ran where the official one did not
        out.append(Check(k + "logits (all scales, cfg/cond/uncond)", worst, TOL["logits_cfg"]))
        out.append(Check(k + "summed_codes", _diff(res.state.summed, t[k + "summed_codes"]), TOL["codes"]))
        out.append(Check(k + "image_crop128", _diff(res.images[..., :128, :128], t[k + "image_pm1_crop128"]), TOL["image"]))
        out.append(Check(k + "image_uint8_bgr_crop128", _diff(to_uint8(res.images[..., :128, :128]).flip(-1),
                                                             t[k + "image_uint8_bgr_hwc_crop128"]), TOL["uint8"]))
        rng = torch.Generator().manual_seed(int(lp["g_seed"]))
        res2 = generate(bb, [""], SkipVAR(), rng)
        same = len(res2.state.bits) == len(bits) and all(torch.equal(a, b) for a, b in zip(res2.state.bits, bits))
        out.append(Check(k + "sampled bits with g_seed (0 = identical)", 0.0 if same else 1.0, TOL["exact"]))
    return out


FIXTURE_THREADS = 2   # shared/fixtures/*/README.md: made on CPU with 2 threads


def check_fixture(meta_path: str | Path) -> list[Check]:
    """Dispatch on the fixture kind (Infinity / FastVAR: the same checker; SkipVAR: decisions and traces; HART, whose
    meta has a ``transformer_config`` of model_type hart_transformer_t2i: ``varbench/harness/fixtures_hart.py``).

    CPU reductions (the VAE decoder's convolutions and norms at 1024²) depend on the number of threads: the FastVAR
    fixture's image differs by 1.5e-3 / 3e-5 / 7.4e-4 / 5.7e-4 with 1 / 2 / 3 / 4 threads (measured). The fixtures
    were made with 2 threads, so every check runs with 2 threads, whatever the machine (the numerics depend on the
    number of threads, not of cores), and the caller's setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(FIXTURE_THREADS)
    try:
        return _check_fixture(meta_path)
    finally:
        torch.set_num_threads(before)


def _check_fixture(meta_path: str | Path) -> list[Check]:
    meta = read_meta(meta_path)
    if (meta.get("transformer_config") or {}).get("model_type") == "hart_transformer_t2i":
        return check_hart_fixture(meta_path)
    if is_var_meta(meta):  # VAR: a "config" with num_classes (varbench/harness/fixtures_var.py)
        try:
            return check_var_fixture(meta_path, meta)
        except SafetensorError as e:   # a torn file beside the meta: one line, as the other families
            raise UserError(f"{meta_path}: a file of this fixture is not a readable safetensors file "
                            f"({str(e).splitlines()[0]})") from None
    src = json.dumps(meta.get("source", "")).lower()
    return check_skipvar_fixture(meta_path) if "skipvar" in src else check_infinity_fixture(meta_path)
