"""Speed and fidelity metrics of a run against the unpruned reference (method=none, same prompts and seeds).

  latency_s     mean wall time per image (text encoding + all scales + decode; device-synchronised)
  speedup       mean reference latency / mean latency, over the same images
  flop_speedup  Σ reference FLOPs / Σ FLOPs (varbench/flops.py): what the token counts alone would give
  method_gflops  mean FLOPs per image a method spends on itself (varbench/flops.py::method_flops; ToProVAR's
                entropy pass, SparVAR's decision passes), only for methods that report them
  flop_speedup_with_method  Σ reference FLOPs / Σ (FLOPs + method FLOPs): the FLOP-ideal speedup with them
  tokens_frac   transformer tokens computed (Σ over scales, layers, rows) / the reference's
  psnr          10·log10(1 / mean MSE) over the images, each against the reference image of the same prompt and
                seed (identical images contribute MSE 0; absent when every image is identical)
  ssim          mean SSIM to the reference images
  identical_frac  share of images bit-identical to their reference
  peak_mem_gb   max over images of peak_memory_bytes, GiB (tables show it as peak MB, from memory_metrics)
and, for methods that report them in their summary, activation_rate and t_star_mean (NOVA).
Reference latencies come from the reference run's records: when that run was cached from an earlier process,
the ratio compares two processes on the same machine; ``scripts/bench_speed.py`` times both in one process.
"""
from __future__ import annotations

from pathlib import Path

from varbench.backbones.base import BackboneSpec
from varbench.flops import generation_flops, method_flops
from varbench.results.fidelity import fidelity_per_image, psnr_of_mse

PSNR_CAP = 100.0   # display cap for a single identical image's PSNR (report grids); never enters a run's mean


def _tokens(rec: dict) -> float:
    return sum(r * sum(t) for r, t in zip(rec.get("rows") or [1] * len(rec["tokens"]), rec["tokens"]))


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def memory_metrics(recs: list[dict]) -> dict[str, tuple[float, int]]:
    """``kv_mb``: the most KV-cache bytes held at once (all layers; records' ``kv_peak_bytes``), max over images, MiB;
    ``peak_mb``: ``peak_memory_bytes`` (GPU: the allocator's peak; CPU: the bytes of the tensors the loop holds at
    once, varbench/records.py), max over images, MiB. Records written before these fields existed give neither."""
    out = {}
    for metric, key in (("kv_mb", "kv_peak_bytes"), ("peak_mb", "peak_memory_bytes")):
        vals = [r[key] for r in recs if r.get(key) and (key != "peak_memory_bytes" or "kv_peak_bytes" in r)]
        if vals and len(vals) == len(recs):
            out[metric] = (max(vals) / 2**20, len(vals))
    return out


def run_metrics(recs: dict[int, dict], spec: BackboneSpec, ref: dict[int, dict] | None = None,
                image_dir: Path | None = None, ref_dir: Path | None = None,
                per_image: list | None = None) -> dict[str, tuple[float, int]]:
    """metric -> (value, n). ``recs``/``ref``: index -> per-image record (records.jsonl). ``per_image``: a list the
    per-image fidelity values (mse, psnr, ssim, identical) are appended to."""
    idx = sorted(recs)
    out = {"latency_s": (_mean([recs[i]["time_per_image_s"] for i in idx]), len(idx)),
           "peak_mem_gb": (max(recs[i]["peak_memory_bytes"] for i in idx) / 2**30, len(idx))}
    flops = {i: generation_flops(recs[i], spec) for i in idx}
    out["gflops"] = (_mean(list(flops.values())) / 1e9, len(idx))
    reports = any("method_flops" in (recs[i].get("method_summary") or {}) for i in idx)
    mflops = {i: method_flops(recs[i]) for i in idx}
    if reports:
        out["method_gflops"] = (_mean(list(mflops.values())) / 1e9, len(idx))
    out.update(memory_metrics([recs[i] for i in idx]))
    if ref is None:
        return out
    # speed compares images made on the same device (rows from mixed devices would divide unrelated timings)
    common = [i for i in idx if i in ref and recs[i].get("device_name") == ref[i].get("device_name")]
    if not common:
        return out
    lat, rlat = _mean([recs[i]["time_per_image_s"] for i in common]), _mean([ref[i]["time_per_image_s"] for i in common])
    out["speedup"] = (rlat / lat, len(common))
    rflops = sum(generation_flops(ref[i], spec) for i in common)
    out["flop_speedup"] = (rflops / sum(flops[i] for i in common), len(common))
    if reports:
        rall = rflops + sum(method_flops(ref[i]) for i in common)
        out["flop_speedup_with_method"] = (rall / sum(flops[i] + mflops[i] for i in common), len(common))
    out["tokens_frac"] = (sum(_tokens(recs[i]) for i in common) / sum(_tokens(ref[i]) for i in common), len(common))
    if image_dir is not None and ref_dir is not None:
        fid = fidelity_per_image(image_dir, ref_dir, [recs[i]["image"] for i in common])
        if fid:
            out["psnr"] = (psnr_of_mse(_mean([f["mse"] for f in fid])), len(fid))
            out["ssim"] = (_mean([f["ssim"] for f in fid]), len(fid))
            out["identical_frac"] = (sum(f["identical"] for f in fid) / len(fid), len(fid))
            if per_image is not None:
                per_image += fid
    return out
