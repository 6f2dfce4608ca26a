"""Train the tiny Infinity-architecture model (``conf/model/tiny.yaml``) on the shapes world, on a CPU.

    python scripts/train_tiny.py             # the run of the shipped weights/tiny/ (MODEL_CARD.md): textured world,
                                             # anchored layouts, conf/model/tiny.yaml (12 scales)
    python scripts/train_tiny.py --world flat --layout random --steps 1600 --config <10-scale config>
                                             # the previous (flat-world) weights: git show 7891584:conf/model/tiny.yaml

The architecture, VAE, text encoder and scale schedule are read from the model config, so the script trains
exactly what ``model=tiny`` builds, with our own classes (the code path of Infinity-2B):

Data: ``--world textured`` (default) draws seeded textures on backgrounds and fills and names the background in half
the prompts; ``--world flat`` white backgrounds and flat fills. ``--layout anchored`` (default) places objects where
the prompt puts them (count, order, relation) up to sub-token jitter; ``--layout random`` anywhere
(``eval/shapes/world.py``, issue 18).
Stage 1: the tiny ``BSQVAE`` learns to reconstruct 64-px shape images through the multi-scale binary spherical
quantiser of the schedule, with straight-through gradients (``BSQVAE.encode_bits(straight_through=True)``); loss
L1 + L2.
Stage 2: the ``InfinityTransformer`` learns next-scale bitwise prediction, teacher-forced as the official
``Infinity.forward`` (block-causal mask; the input of scale k+1 is the trilinear resize of the summed codes of
scales <= k), jointly with the byte-level tiny T5 (trained here too: a frozen random T5 hardly separates
"left of" from "right of"). 10 % of prompts are replaced by the learned unconditional rows (classifier-free
guidance). Loss: bitwise cross-entropy with each token weighted by n_scale^-1/2 (OURS: coarse scales, which
carry layout, count and colour, have few tokens; uniform token weighting would let the last scale dominate).

Everything is seeded and data is a pure function of (seed, step, world): the same command on the same torch build
and thread count gives the same weights. Progress, losses and the per-scale CE (nats per token, the teacher-forced
estimate of NOVA's H̄_t) are printed; ``train_log.json`` records them.
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

SIZE = 64


def batch(step: int, n: int, seed: int, world: str = "flat", placement: str = "random"):
    """n (prompt, image in [-1, 1]) pairs, a pure function of (seed, step, world, placement)."""
    from eval.shapes.world import TAGS, make_prompt, sample, with_background

    rng = random.Random(seed * 1_000_003 + step)
    prompts, imgs = [], []
    for _ in range(n):
        meta = make_prompt(TAGS[rng.randrange(len(TAGS))], rng)
        if world == "textured":
            meta = with_background(meta, rng)
        im, _ = sample(meta, SIZE, seed=rng.randrange(1 << 30), textures=world == "textured",
                       placement=placement)
        prompts.append(meta["prompt"])
        imgs.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(SIZE, SIZE, 3))
    x = torch.stack(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    return prompts, x


def teacher_inputs(bits: list[torch.Tensor], hws, cd: int):
    """(x_BLd_wo_prefix, targets [B, L, d]) from per-scale bits [B, 1, h, w, d], as the official training builds them."""
    from varbench.backbones.infinity.vae import bits_to_codes

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


def cosine(step: int, total: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "conf/model/tiny.yaml")
    ap.add_argument("--out", type=Path, default=None, help="default: the config's package_weights folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world", choices=("flat", "textured"), default="textured",
                    help="flat: white background, flat fills (the previous weights); textured: seeded textures and "
                         "named backgrounds (issue 18; the shipped weights)")
    ap.add_argument("--layout", choices=("random", "anchored"), default="anchored",
                    help="random: objects anywhere (the previous flat weights); anchored: positions fixed by the "
                         "prompt up to sub-token jitter (eval/shapes/world.py SLOTS; the shipped weights)")
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--minutes", type=float, default=58.0,
                    help="safety stop for stage 2 (a stopped run is no longer reproducible; it says so)")
    a = ap.parse_args(argv)

    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from varbench.backbones.infinity.load import PACKAGE_WEIGHTS, seeded_modules
    from varbench.backbones.infinity.schedules import rope_cos_sin, rope_positions, schedule_from_config

    mcfg = OmegaConf.to_container(OmegaConf.load(a.config), resolve=True)
    mcfg["seed"] = a.seed
    out = a.out or PACKAGE_WEIGHTS / str(mcfg.get("package_weights") or mcfg["name"])
    torch.manual_seed(a.seed)
    t0 = time.time()
    sched = schedule_from_config(mcfg["schedule"])
    hws = list(sched.hws)
    tf, vae, text = seeded_modules(mcfg, "cpu")
    vae_hws = [(1, h, w) for h, w in hws]
    cd = mcfg["vae"]["codebook_dim"]
    print(f"model {a.config.name}: transformer {sum(p.numel() for p in tf.parameters()) / 1e6:.2f}M, "
          f"VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M, "
          f"T5 {sum(p.numel() for p in text.encoder.parameters()) / 1e6:.2f}M params; "
          f"{len(hws)} scales {hws[0]}..{hws[-1]}, {sched.total_tokens} tokens", flush=True)
    log = {"vae": [], "transformer": [], "ce_per_scale": []}

    # ---- stage 1: VAE
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    lr_vae = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, a.vae_steps, 20))
    for step in range(a.vae_steps):
        _, x = batch(step, a.vae_batch, a.seed, a.world, a.layout)
        rec = vae.decoder(vae.encode_bits(x, vae_hws, straight_through=True)[1][:, :, 0])
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_vae.step()
        if step % 50 == 0 or step == a.vae_steps - 1:
            el = time.time() - t0
            print(f"[vae] step {step:5d}/{a.vae_steps} loss {loss.item():.4f} ({el:.0f}s, "
                  f"eta {el / (step + 1) * (a.vae_steps - step - 1):.0f}s)", flush=True)
            log["vae"].append((step, round(loss.item(), 5)))
    vae.eval().requires_grad_(False)
    minutes_vae = round((time.time() - t0) / 60, 2)

    # ---- stage 2: transformer + text encoder
    text.encoder.train()
    cs = rope_cos_sin(rope_positions(sched), tf.head_dim)
    params = list(tf.parameters()) + list(text.encoder.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, betas=(0.9, 0.97))
    lr_tf = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, a.steps, 100))
    w_scale = torch.cat([torch.full((sc.n,), sc.n ** -0.5) for sc in sched.scales])
    w_tok = (w_scale / w_scale.sum())[None, :, None]
    g = torch.Generator().manual_seed(a.seed + 3)
    t1, stopped = time.time(), None
    ema = None
    for step in range(a.steps):
        prompts, x = batch(10_000_000 + step, a.batch, a.seed, a.world, a.layout)
        with torch.no_grad():
            bits, _ = vae.encode_bits(x, vae_hws)
        kv, lens = text.encode(prompts)   # with gradients: the text encoder is trained too
        x_in, tgt = teacher_inputs(bits, hws, cd)
        drop = torch.rand(len(prompts), generator=g) < 0.1
        rows, start = [], 0
        for i, n in enumerate(lens):
            rows.append(tf.cfg_uncond[:n] if drop[i] else kv[start:start + n])
            start += n
        logits = tf.forward_teacher_forced(torch.cat(rows, 0), lens, x_in, sched.scales, cs)
        ce = F.cross_entropy(logits.reshape(-1, 2), tgt.reshape(-1), reduction="none").view(tgt.shape)
        loss = (ce * w_tok).sum() / (len(prompts) * cd)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_tf.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0 or step == a.steps - 1:
            el = time.time() - t1
            last = ce[:, -sched.scales[-1].n:].mean().item()
            # per scale: mean bitwise CE x d = nats per token, the teacher-forced estimate of H̄_t (NOVA Eq. 7)
            per_scale = [round(v.mean().item() * cd, 4) for v in ce.detach().mean((0, 2)).split([sc.n for sc in sched.scales])]
            print(f"[transformer] step {step:5d}/{a.steps} loss {loss.item():.4f} (ema {ema:.4f}, last scale "
                  f"{last:.4f}) {time.time() - t0:.0f}s, eta {el / (step + 1) * (a.steps - step - 1):.0f}s", flush=True)
            print(f"[transformer]   CE per scale (nats/token): {' '.join(f'{v:.2f}' for v in per_scale)}", flush=True)
            log["transformer"].append((step, round(loss.item(), 5), round(ema, 5), round(last, 5)))
            log["ce_per_scale"].append((step, per_scale))
        if (time.time() - t1) / 60 > a.minutes:
            stopped = step
            print(f"[transformer] time budget of {a.minutes} min spent at step {step}: weights saved, but this run "
                  f"is not the reproducible one", flush=True)
            break

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in tf.state_dict().items()}, str(out / "infinity.safetensors"))
    save_file({k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}, str(out / "vae.safetensors"))
    save_file({k: v.detach().clone().contiguous() for k, v in text.encoder.state_dict().items()},
              str(out / "text.safetensors"))
    info = {"command": "python scripts/train_tiny.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "args": {k: str(v) for k, v in vars(a).items()}, "model_config": mcfg, "size": SIZE,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "stopped_early_at": stopped,
            "minutes": round((time.time() - t0) / 60, 2), "minutes_vae": minutes_vae, "loss": log}
    (out / "train_log.json").write_text(json.dumps(info, indent=1))
    print(f"saved to {out} after {(time.time() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
