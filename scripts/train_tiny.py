"""Train the tiny Infinity-architecture model on the shapes world (eval/shapes/world.py), on a CPU.

    python scripts/train_tiny.py --out nova/backbones/infinity/tiny_weights

Stage 1: a tiny BSQ-VAE (our ``BSQVAE`` class) learns to reconstruct 64-px shape images through multi-scale binary
spherical quantisation on the official 10-scale 0.25M schedule (straight-through gradients).
Stage 2: a tiny ``InfinityTransformer`` (the class Infinity-2B uses) learns next-scale bitwise prediction,
teacher-forced exactly as ``Infinity.forward`` (block-causal mask; inputs = trilinear resizes of the accumulated
codes), conditioned on a frozen seeded tiny T5 over the prompt bytes, with 10 % of prompts replaced by the learned
unconditional rows (for classifier-free guidance). Everything is seeded: the same command gives the same weights.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ARCH = {"depth": 3, "embed_dim": 64, "num_heads": 1, "mlp_ratio": 4, "block_chunks": 1, "text_channels": 128,
        "text_maxlen": 32}
VAE = {"codebook_dim": 8, "base_ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "patch_size": 2}
SIZE, PN = 64, "0.25M"


def batch(step: int, n: int, seed: int):
    """n (prompt, image in [-1, 1]) pairs, a pure function of (seed, step)."""
    from eval.shapes.world import TAGS, make_prompt, sample

    rng = random.Random(seed * 1_000_003 + step)
    prompts, imgs = [], []
    for i in range(n):
        meta = make_prompt(TAGS[rng.randrange(len(TAGS))], rng)
        im, _ = sample(meta, SIZE, seed=rng.randrange(1 << 30))
        prompts.append(meta["prompt"])
        imgs.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(SIZE, SIZE, 3))
    x = torch.stack(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    return prompts, x


def ste_multiscale(vae, img, hws):
    """Multi-scale BSQ of the encoder output with straight-through gradients (training only)."""
    h = vae.encode_raw(img)[:, :, None]
    full = tuple(h.shape[2:])
    residual, out = h, torch.zeros_like(h)
    for hh, ww in hws:
        r = residual if (1, hh, ww) == full else F.interpolate(residual, size=(1, hh, ww), mode="area")
        z = F.normalize(r, dim=1)
        q = z + ((torch.where(z > 0, 1.0, -1.0) / math.sqrt(z.shape[1])) - z).detach()
        if (1, hh, ww) != full:
            q = F.interpolate(q, size=full, mode="trilinear")
        residual, out = residual - q, out + q
    return out[:, :, 0]


def teacher_inputs(bits: list[torch.Tensor], hws, cd: int):
    """(x_BLd_wo_prefix, targets [B, L, d]) from per-scale bits [B, 1, h, w, d], as the official training builds them."""
    from nova.backbones.infinity.vae import bits_to_codes

    final = (1, *hws[-1])
    summed, xs = 0, []
    for si, b in enumerate(bits):
        codes = bits_to_codes(b.float(), cd)
        if si < len(bits) - 1:
            summed = summed + F.interpolate(codes, size=final, mode="trilinear")
            nxt = F.interpolate(summed, size=(1, *hws[si + 1]), mode="trilinear")[:, :, 0]
            xs.append(nxt.flatten(2).transpose(1, 2))
    tgt = torch.cat([b[:, 0].flatten(1, 2) for b in bits], 1).long()
    return torch.cat(xs, 1), tgt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "nova/backbones/infinity/tiny_weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=1200)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=55.0, help="stop stage 2 early when the budget is spent")
    a = ap.parse_args(argv)

    from safetensors.torch import save_file

    from nova.backbones.infinity.load import seeded_init_
    from nova.backbones.infinity.model import InfinityTransformer
    from nova.backbones.infinity.schedules import get_schedule, rope_cos_sin, rope_positions
    from nova.backbones.infinity.text import T5TextEncoder
    from nova.backbones.infinity.vae import BSQVAE

    torch.manual_seed(a.seed)
    t0 = time.time()
    sched = get_schedule(1.0, PN)
    hws = list(sched.hws)
    vae = seeded_init_(BSQVAE(VAE["codebook_dim"], VAE["base_ch"], tuple(VAE["ch_mult"]), VAE["num_res_blocks"],
                              VAE["patch_size"]), a.seed + 1)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    log = {"vae": [], "transformer": []}
    for step in range(a.vae_steps):
        _, x = batch(step, 16, a.seed)
        rec = vae.decoder(ste_multiscale(vae, x, hws))
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == a.vae_steps - 1:
            print(f"[vae] step {step:5d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
            log["vae"].append((step, loss.item()))
    vae.eval().requires_grad_(False)

    text = T5TextEncoder.tiny(d_model=ARCH["text_channels"], max_length=ARCH["text_maxlen"], seed=a.seed + 2)
    tf = InfinityTransformer(ARCH["depth"], ARCH["embed_dim"], ARCH["num_heads"], VAE["codebook_dim"],
                             ARCH["text_channels"], ARCH["text_maxlen"], ARCH["mlp_ratio"], ARCH["block_chunks"])
    seeded_init_(tf, a.seed)
    cs = rope_cos_sin(rope_positions(sched), tf.head_dim)
    opt = torch.optim.AdamW(tf.parameters(), lr=1e-3, weight_decay=0.01)
    sched_lr = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    g = torch.Generator().manual_seed(a.seed + 3)
    t1 = time.time()
    for step in range(a.steps):
        prompts, x = batch(10_000_000 + step, a.batch, a.seed)
        with torch.no_grad():
            bits, _ = vae.encode_bits(x, [(1, h, w) for h, w in hws])
            kv, lens = text(prompts)
        x_in, tgt = teacher_inputs(bits, hws, VAE["codebook_dim"])
        drop = torch.rand(len(prompts), generator=g) < 0.1
        rows, start = [], 0
        for i, n in enumerate(lens):
            rows.append(tf.cfg_uncond[:n] if drop[i] else kv[start:start + n])
            start += n
        logits = tf.forward_teacher_forced(torch.cat(rows, 0), lens, x_in, sched.scales, cs)
        loss = F.cross_entropy(logits.view(-1, 2), tgt.view(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tf.parameters(), 1.0)
        opt.step()
        sched_lr.step()
        if step % 50 == 0 or step == a.steps - 1:
            print(f"[transformer] step {step:5d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
            log["transformer"].append((step, loss.item()))
        if (time.time() - t1) / 60 > a.minutes:
            print(f"[transformer] time budget of {a.minutes} min spent at step {step}", flush=True)
            break
    a.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tf.state_dict().items()}, str(a.out / "infinity.safetensors"))
    save_file({k: v.clone().contiguous() for k, v in vae.state_dict().items()}, str(a.out / "vae.safetensors"))
    (a.out / "train_log.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "arch": ARCH,
                                                      "vae": VAE, "size": SIZE, "pn": PN, "loss": log,
                                                      "minutes": (time.time() - t0) / 60}, indent=1))
    print(f"saved to {a.out} after {(time.time() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
