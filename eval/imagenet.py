"""ImageNet class-conditional benchmark (VAR's evaluation): the class-label items and the ADM evaluator's metrics.

Items (``imagenet``, a ``varbench.sources`` plug-in): ``samples_per_class`` images of each class (VAR README: 50 per
class = 50,000), one item per (class c, sample k), **interleaved** (k outer, c inner), so the consecutive 5,000-image
splits of the Inception Score hold every class (spec shared/specs/imagenet_eval.md, pitfall 1; a class-sorted batch
caps IS near 100) and ``bench.limit=N`` takes one image of each of the first N classes. Each item carries its class
label (``Prompt.label``) and its own seed offset ``c * samples_per_class + k`` (``Prompt.seed``), so the image of
(c, k) does not depend on sharding, batching, ``bench.limit`` or ``bench.classes``. Files: ``s<k:04d>_c<c:04d>.png``
(flat, as VAR's ``create_npz_from_sample_folder`` globs ``*.png``), plus ``samples.npz`` (``arr_0`` uint8 NHWC in
item order, ``arr_1`` the labels, as guided-diffusion's ``image_sample.py`` writes) once every image exists
(``varbench/bench/layouts.py``).

Metrics (``imagenet``, a ``varbench.metrics`` plug-in): as openai/guided-diffusion ``evaluations/evaluator.py``
(@22e0df81, "EV") computes them, on a PyTorch port of its TF-2015 Inception (the graph's weights as converted by
torch-fidelity / pytorch-fid, ``weights-inception-2015-12-05-6726825d.pth``):

* input: ``arr_0`` uint8 NHWC as float32 in [0, 255] (EV L153), TF1 legacy bilinear resize to 299 (no half-pixel
  centres, no antialias; the graph's ``ResizeBilinear``), ``(x - 128) / 128``;
* FID: ``pool_3`` [N, 2048]; sFID: ``mixed_6/conv`` = ``Mixed_6d.branch1x1`` after its ReLU, NHWC, channels 0..6 of
  the last axis, flattened H, W, C (17*17*7 = 2023; EV L599); stats: ``np.mean`` (float32) and ``np.cov(rowvar=False)``
  (float64), or the reference file's ``mu``/``sigma``/``mu_s``/``sigma_s`` when present (EV L164-177); the Fréchet
  distance with ``scipy.linalg.sqrtm`` and EV's eps retry / imaginary-part rule (EV L72-115, the TTUR copy that
  ``eval/mjhq.py`` ``frechet_distance`` implements for clean-fid too);
* IS: softmax(pool_3 @ W) with W = the ``softmax/logits/MatMul`` weight (no bias, 1008 classes), float32, batches of
  512; consecutive splits of 5000, no shuffle, no epsilon; the mean of exp(mean KL) over the splits (EV L179-192);
* precision / recall, k = 3 (EV L194-430): squared distances ``max(|u|^2 - 2 u.v + |v|^2, 0)`` computed from
  float16 copies of the features with float16 results (a 10000 x 10000 block is recomputed in float32 only when some
  entry is not finite), radius = the 4th smallest entry of a point's row against its own set (self included),
  a point is inside when its distance is <= the radius of some point of the other set.

How the TF float16 ops are re-expressed: every op's result is rounded to float16 (squares, each norm, the matmul,
the subtraction, the addition), the norms and the matmul accumulated in float64 before their one rounding (TF's GPU
kernels accumulate in float32: the two differ only where the float32 sum lands on the other side of a float16
rounding boundary); the float32 fallback likewise rounds each op to float32. Blocks are 10000 x 10000 as EV's
(the fallback is per block, so block boundaries are part of the result). The network and the softmax run in exact
float32 (TF32 off): TF >= 2.4 would use TF32 on Ampere+ GPUs by default, a device-dependent default, not the protocol.

The Inception weights and the reference batch (``VIRTUAL_imagenet256_labeled.npz``, or ``VIRTUAL_imagenet512.npz``
for 512-px samples; chosen by the samples' size) cannot be downloaded here. ``bench.imagenet.inception``: ``real``
(a missing file is one line naming it and its URL), ``standin`` (the same network with seeded random weights and a
seeded synthetic reference batch: numbers that exercise the pipeline and nothing else), or ``auto`` (real when the
weights file is found, else the stand-in, said in a warning and in the table footnote via ``imagenet_standin = 1``).
"""
from __future__ import annotations

import json
import sys
import zipfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from eval.datasets import data_dir
from eval.mjhq import frechet_distance
from varbench.bench.layouts import IMAGENET_NPZ, imagenet_key, imagenet_order, write_imagenet_npz
from varbench.bench.prompts import Prompt
from varbench.errors import UserError
from varbench.weights import find_file, weights_dir

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth (or pytorch-fid's pt_inception-2015-12-05-6726825d.pth, "
                 "the same conversion of EV's classify_image_graph_def.pb)")
_REF = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet"
REFERENCE_BATCHES = {256: ("VIRTUAL_imagenet256_labeled.npz", f"{_REF}/256/VIRTUAL_imagenet256_labeled.npz"),
                     512: ("VIRTUAL_imagenet512.npz", f"{_REF}/512/VIRTUAL_imagenet512.npz")}
EV_BATCH, EV_SOFTMAX_BATCH, EV_SPLIT, EV_BLOCK, EV_K = 64, 512, 5000, 10000, 3
MODES = ("auto", "real", "standin")


# ------------------------------------------------------------------ items
def imagenet(bench: dict) -> list[Prompt]:
    """The class-label items of ``bench=imagenet`` (see the module docstring for order, keys and seeds)."""
    n_cls = _pos_int(bench, "num_classes", 1000)
    spc = _pos_int(bench, "samples_per_class", 50)
    classes = bench.get("classes")
    if classes is None:
        classes = list(range(n_cls))
    else:
        bad = [c for c in classes if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < n_cls]
        if bad or not classes:
            raise UserError(f"bench.classes must be a non-empty list of class labels 0..{n_cls - 1}, got "
                            f"{bad[0] if bad else classes!r}")
        classes = sorted(set(classes))
    out = []
    for k in range(spc):
        for c in classes:
            out.append(Prompt(len(out), f"class {c}", imagenet_key(c, k), {"label": c, "sample": k}, label=c,
                              seed=c * spc + k))
    return out


def _pos_int(bench: dict, key: str, default: int) -> int:
    v = bench.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise UserError(f"bench.{key} must be a positive integer, got {v!r}")
    return v


# ------------------------------------------------------------------ the npz batch (EV's reader, streamed)
@contextmanager
def open_batch(path: Path, key: str = "arr_0", uint8: bool = True):
    """(shape, iterator factory) over ``key`` of an ``.npz``, read in batches without loading the whole array (the
    50K batch is 9.8 GB at 256 px); one-line error when the file or key is missing or not [N, H, W, 3] (uint8 unless
    ``uint8=False``: the reference batch's dtype is unverified, and EV casts whatever it holds to float32)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            if f"{key}.npy" not in z.namelist():
                raise UserError(f"{path} has no {key} (the ADM evaluator reads arr_0: uint8 images NHWC)")
            with z.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(f))
                bad_dtype = dtype != np.uint8 if uint8 else (dtype.hasobject or dtype.kind not in "uif")
                if fortran or bad_dtype or len(shape) != 4 or shape[-1] != 3:
                    raise UserError(f"{path}: {key} must be {'uint8 ' if uint8 else ''}[N, H, W, 3] (C order), got "
                                    f"{dtype} {shape}")
                row = int(np.prod(shape[1:])) * dtype.itemsize

                def batches(size: int = EV_BATCH):
                    for s in range(0, shape[0], size):
                        n = min(size, shape[0] - s)
                        yield np.frombuffer(bytearray(f.read(n * row)), dtype).reshape(n, *shape[1:])

                yield shape, batches
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as an .npz batch ({str(e).splitlines()[0] if str(e) else e!r})") from None


def sample_batch(image_dir: Path, out_dir: Path) -> Path:
    """The samples' ``.npz``: ``<image_dir>/samples.npz`` when it holds every image of the folder, else packed now
    (item order from the file names) into ``<out_dir>/samples.npz``; a folder of other names is packed in sorted
    order (IS depends on the order: said in a warning)."""
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    files, ordered = imagenet_order(image_dir)
    if not files:
        raise UserError(f"{image_dir} holds no .png images to score")
    here = image_dir / IMAGENET_NPZ
    if here.exists():
        with open_batch(here) as (shape, _):
            if shape[0] == len(files):
                return here
    if not ordered:
        print(f"[imagenet] warning: {image_dir}: file names are not s<k>_c<class>.png; packing in sorted name order "
              f"(the Inception Score depends on the order: consecutive splits of {EV_SPLIT})", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_imagenet_npz(files, out_dir / IMAGENET_NPZ)


# ------------------------------------------------------------------ the TF-2015 Inception (PyTorch port)
def tf1_resize_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """TF1 ``ResizeBilinear`` (align_corners=False, legacy: source = dst * in/out, no half-pixel offset, no
    antialias) of float NCHW: lerp along x on the two source rows, then along y (TF's ``compute_lerp`` order)."""
    def axis(n_in: int):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.floor().long()
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo.float())

    ylo, yhi, dy = axis(x.shape[2])
    xlo, xhi, dx = axis(x.shape[3])
    top, bot = x[:, :, ylo], x[:, :, yhi]
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * dx
    bot = bot[..., xlo] + (bot[..., xhi] - bot[..., xlo]) * dx
    return top + (bot - top) * dy[:, None]


class _Conv(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU: the graph's conv units, named as the converted weights."""

    def __init__(self, cin: int, cout: int, k, stride: int = 1, pad=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, pad, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):   # TF's 3x3 SAME average pool ignores the padding (count_include_pad=False)
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class _BlockA(nn.Module):      # Mixed_5b/5c/5d (35x35)
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, pad=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 64, 1), _Conv(64, 96, 3, pad=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, pad=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class _BlockB(nn.Module):      # Mixed_6a (35 -> 17)
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 64, 1), _Conv(64, 96, 3, pad=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class _BlockC(nn.Module):      # Mixed_6b..6e (17x17); Mixed_6d.branch1x1 is EV's "mixed_6/conv" (sFID)
    def __init__(self, cin: int, c7: int):
        super().__init__()
        r, c = (1, 7), (7, 1)
        pr, pc = (0, 3), (3, 0)
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = _Conv(cin, c7, 1), _Conv(c7, c7, r, pad=pr)
        self.branch7x7_3 = _Conv(c7, 192, c, pad=pc)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = _Conv(cin, c7, 1), _Conv(c7, c7, c, pad=pc)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = _Conv(c7, c7, r, pad=pr), _Conv(c7, c7, c, pad=pc)
        self.branch7x7dbl_5 = _Conv(c7, 192, r, pad=pr)
        self.branch_pool = _Conv(cin, 192, 1)
        self.tap = None             # set to a list to receive branch1x1's output

    def forward(self, x):
        b1 = self.branch1x1(x)
        if self.tap is not None:
            self.tap.append(b1)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            d = m(d)
        return torch.cat([b1, b7, d, self.branch_pool(_avg3(x))], 1)


class _BlockD(nn.Module):      # Mixed_7a (17 -> 8)
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = _Conv(cin, 192, 1), _Conv(192, 192, (1, 7), pad=(0, 3))
        self.branch7x7x3_3, self.branch7x7x3_4 = _Conv(192, 192, (7, 1), pad=(3, 0)), _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        d = x
        for m in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            d = m(d)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), d, F.max_pool2d(x, 3, 2)], 1)


class _BlockE(nn.Module):      # Mixed_7b (average pool) / Mixed_7c (the TF graph max-pools here)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = _Conv(384, 384, (1, 3), pad=(0, 1)), _Conv(384, 384, (3, 1), pad=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448, 1), _Conv(448, 384, 3, pad=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), pad=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), pad=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)
        self.max_pool = max_pool

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(d),
                          self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


class InceptionTF2015(nn.Module):
    """EV's ``classify_image_graph_def.pb`` as the converted weights lay it out (module names = state-dict keys).
    ``forward(uint8 NHWC)`` -> (pool_3 [N, 2048], spatial [N, 2023]) float32; ``logits_weight`` [1008, 2048]."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = _Conv(3, 32, 3, stride=2), _Conv(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = _Conv(32, 64, 3, pad=1), _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _BlockA(192, 32), _BlockA(256, 64), _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b, self.Mixed_6c = _BlockC(768, 128), _BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _BlockC(768, 160), _BlockC(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = _BlockD(768), _BlockE(1280, False), _BlockE(2048, True)
        self.fc = nn.Linear(2048, 1008)
        self.source = "unset"      # "real: <path>" or "standin: seed <s>" (recorded with the scores)

    @property
    def logits_weight(self) -> torch.Tensor:
        return self.fc.weight

    @torch.no_grad()
    def forward(self, images_nhwc_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images_nhwc_uint8.to(self.fc.weight.device).permute(0, 3, 1, 2).float()   # EV: batch.astype(float32)
        x = (tf1_resize_bilinear(x, 299) - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)
        tap: list = []
        self.Mixed_6d.tap = tap
        try:
            for m in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
                x = m(x)
        finally:
            self.Mixed_6d.tap = None
        pool = x.mean((2, 3))
        spatial = tap[0].permute(0, 2, 3, 1)[..., :7].reshape(x.shape[0], -1)     # NHWC, channels 0..6 (EV L599)
        return pool.float(), spatial.float()


def standin_inception(seed: int = 0) -> InceptionTF2015:
    """The same network with seeded random weights (He-normal convolutions, unit BatchNorm, logit weights
    N(0, 100/2048) so that the softmax is not flat): the stand-in the tests and weight-less runs use. Deterministic
    on every machine (drawn on the CPU)."""
    net = InceptionTF2015()
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("conv.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
            elif name == "fc.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 10 / 2048 ** 0.5)
            elif name.endswith("bn.weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    net.source = f"standin: seed {seed}"
    return net.eval()


def load_inception(path: Path) -> InceptionTF2015:
    """The converted TF-2015 weights, strictly (every tensor and shape; BatchNorm's ``num_batches_tracked`` aside)."""
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types; one line each
        raise UserError(f"cannot read the Inception weights {path} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''}); expected {INCEPTION_FILE}") from None
    net = InceptionTF2015()
    want = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    have = {k: v.shape for k, v in sd.items() if not k.endswith("num_batches_tracked")} if isinstance(sd, dict) else {}
    if want != have:
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        shape = [k for k in want if k in have and want[k] != have[k]]
        what = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else
                f"{shape[0]} is {tuple(have[shape[0]])}, expected {tuple(want[shape[0]])}")
        raise UserError(f"{path} is not the TF-2015 Inception ({INCEPTION_FILE}): {what}")
    net.load_state_dict({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, strict=False)
    net.source = f"real: {path}"
    return net.eval()


def inception_for(m: dict) -> InceptionTF2015:
    """``bench.imagenet.inception``: real | standin | auto (see the module docstring)."""
    mode = str(m.get("inception", "auto"))
    if mode not in MODES:
        raise UserError(f"bench.imagenet.inception must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "standin":
        return standin_inception(int(m.get("standin_seed", 0)))
    wdir = weights_dir(m.get("weights_dir"))
    path = find_file(INCEPTION_FILE, wdir, None) or find_file("pt_inception-2015-12-05-6726825d.pth", wdir, None)
    if path is not None:
        return load_inception(path)
    line = f"missing Inception weights {wdir / INCEPTION_FILE} (published at {INCEPTION_URL}; bench.imagenet.weights_dir)"
    if mode == "real":
        raise UserError(line)
    print(f"[imagenet] warning: {line}: scoring with the STAND-IN Inception (seeded random weights); the numbers are "
          f"not comparable with any published one", file=sys.stderr)
    return standin_inception(int(m.get("standin_seed", 0)))


@contextmanager
def _exact_fp32():
    """No TF32 in convolutions or matmuls (EV's graph runs in float32)."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def activations(net: InceptionTF2015, batches) -> tuple[np.ndarray, np.ndarray]:
    """(pool_3 [N, 2048], spatial [N, 2023]) float32 of uint8 NHWC batches (EV ``compute_activations``)."""
    pools, spatials = [], []
    with _exact_fp32():
        for b in batches:
            p, s = net(torch.from_numpy(np.ascontiguousarray(b)))
            pools.append(p.cpu().numpy())
            spatials.append(s.cpu().numpy())
    return np.concatenate(pools), np.concatenate(spatials)


# ------------------------------------------------------------------ the metrics (EV's math)
def statistics(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """EV ``compute_statistics``: np.mean (float32 stays float32) and np.cov(rowvar=False) (float64)."""
    return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def softmax_probs(pool: np.ndarray, weight: torch.Tensor, batch: int = EV_SOFTMAX_BATCH) -> np.ndarray:
    """EV ``_create_softmax_graph``: softmax(pool_3 @ W) in float32, no bias, in batches of 512."""
    w = weight.detach().float()
    out = []
    with _exact_fp32():
        for s in range(0, len(pool), batch):
            x = torch.from_numpy(np.ascontiguousarray(pool[s:s + batch], np.float32)).to(w.device)
            out.append(torch.softmax(x @ w.T, dim=1).cpu().numpy())
    return np.concatenate(out).astype(np.float32, copy=False)


def inception_score(probs: np.ndarray, split_size: int = EV_SPLIT) -> float:
    """EV ``compute_inception_score`` after the softmax: consecutive splits, no shuffle, no epsilon, float32."""
    scores = []
    for s in range(0, len(probs), split_size):
        part = probs[s:s + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def _dists(u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """max(|u|^2 - 2 u.v + |v|^2, 0) with every op's result rounded to ``dtype`` (inputs already ``dtype``), sums
    and the matmul accumulated in float64 first."""
    u64, v64 = u.double(), v.double()
    nu = (u * u).double().sum(1).to(dtype)[:, None]        # tf.square (rounded), tf.reduce_sum (rounded)
    nv = (v * v).double().sum(1).to(dtype)[None, :]
    mm = (u64 @ v64.T).to(dtype)
    return torch.clamp((nu - 2 * mm) + nv, min=0)


def pairwise_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """EV ``DistanceBlock.pairwise_distances`` of one block: float16, or float32 when float16 is not finite."""
    d = _dists(u.half(), v.half(), torch.float16)
    if not bool(torch.isfinite(d).all()):
        d = _dists(u.float(), v.float(), torch.float32)
    return d.float()


def manifold_radii(feats: np.ndarray, device: str = "cpu", block: int = EV_BLOCK, k: int = EV_K) -> np.ndarray:
    """EV ``manifold_radii``: per point the (k+1)-th smallest entry of its distance row to its own set (self
    included, so the k-th nearest other point), row and column blocks of ``block``. float32 [N]."""
    x = torch.from_numpy(np.ascontiguousarray(feats, np.float32)).to(device)
    out = []
    for r in range(0, len(x), block):
        best = None
        for c in range(0, len(x), block):
            d = pairwise_distances(x[r:r + block], x[c:c + block])
            best = d if best is None else torch.cat([best, d], 1)
            best = torch.topk(best, min(k + 1, best.shape[1]), dim=1, largest=False).values
        if best.shape[1] < k + 1:
            raise UserError(f"precision/recall need at least {k + 1} images per set (k = {k}), got {len(x)}")
        out.append(best[:, k])
    return torch.cat(out).cpu().numpy()


def precision_recall(ref: np.ndarray, ref_radii: np.ndarray, sample: np.ndarray, sample_radii: np.ndarray,
                     device: str = "cpu", block: int = EV_BLOCK) -> tuple[float, float]:
    """EV ``evaluate_pr(ref, radii_ref, sample, radii_sample)``: distances of ref rows x sample columns; a sample is
    in (precision) when d <= the radius of some ref point, a ref point is in (recall) when d <= the radius of some
    sample."""
    a = torch.from_numpy(np.ascontiguousarray(ref, np.float32)).to(device)
    b = torch.from_numpy(np.ascontiguousarray(sample, np.float32)).to(device)
    ra = torch.from_numpy(np.asarray(ref_radii, np.float32).reshape(-1)).to(device)
    rb = torch.from_numpy(np.asarray(sample_radii, np.float32).reshape(-1)).to(device)
    ref_in = torch.zeros(len(a), dtype=torch.bool, device=device)
    sample_in = torch.zeros(len(b), dtype=torch.bool, device=device)
    for r in range(0, len(a), block):
        for c in range(0, len(b), block):
            d = pairwise_distances(a[r:r + block], b[c:c + block])
            ref_in[r:r + block] |= (d <= rb[None, c:c + block]).any(1)
            sample_in[c:c + block] |= (d <= ra[r:r + block, None]).any(0)
    return float(sample_in.double().mean()), float(ref_in.double().mean())


def adm_metrics(sample: tuple[np.ndarray, np.ndarray], probs: np.ndarray, ref: tuple[np.ndarray, np.ndarray],
                ref_stats: tuple | None = None, device: str = "cpu", block: int = EV_BLOCK) -> dict[str, float]:
    """EV ``main`` on activations: IS of the samples, FID and sFID against the reference (its stored stats when
    given), precision and recall (k = 3) on pool_3."""
    (pool, spatial), (ref_pool, ref_spatial) = sample, ref
    if ref_stats is None:
        ref_stats = (*statistics(ref_pool), *statistics(ref_spatial))
    mu, sigma, mu_s, sigma_s = ref_stats
    prec, rec = precision_recall(ref_pool, manifold_radii(ref_pool, device, block), pool,
                                 manifold_radii(pool, device, block), device, block)
    return {"imagenet_is": inception_score(probs),
            "imagenet_fid": frechet_distance(*statistics(pool), mu, sigma),
            "imagenet_sfid": frechet_distance(*statistics(spatial), mu_s, sigma_s),
            "imagenet_precision": prec, "imagenet_recall": rec}


# ------------------------------------------------------------------ references
def reference_path(m: dict, bench: dict, side: int) -> tuple[Path, str]:
    if m.get("reference_batch"):
        return Path(str(m["reference_batch"])).expanduser(), "bench.imagenet.reference_batch"
    if side not in REFERENCE_BATCHES:
        raise UserError(f"no ADM reference batch for {side}-px images (published: 256, 512); set "
                        f"bench.imagenet.reference_batch")
    name, url = REFERENCE_BATCHES[side]
    return data_dir(bench.get("data_dir")) / "imagenet" / name, url


@lru_cache(maxsize=4)
def _standin_reference(seed: int, n: int, side: int, net_seed: int):
    """A seeded synthetic reference batch (smooth random colour fields) through the stand-in network."""
    g = torch.Generator().manual_seed(int(seed))
    low = torch.rand(n, 3, 8, 8, generator=g)
    imgs = (F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False) * 255).to(torch.uint8)
    imgs = imgs.permute(0, 2, 3, 1).numpy()
    net = standin_inception(net_seed)
    return activations(net, (imgs[s:s + EV_BATCH] for s in range(0, n, EV_BATCH)))


def _ref_stats_from_file(path: Path):
    with np.load(path) as z:
        if "mu" in z.files:
            return z["mu"], z["sigma"], z["mu_s"], z["sigma_s"]
    return None


def run(bench: dict, image_dir: Path, out_dir: Path, device: str = "cpu") -> dict[str, float]:
    """The ``imagenet`` metric: IS, FID, sFID, precision, recall of the run's samples (EV's protocol), and
    ``imagenet_standin`` (1 when the stand-in Inception scored them: the table footnote says so)."""
    m = dict(bench.get("imagenet") or {})
    block = int(m.get("block", EV_BLOCK))
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    npz = sample_batch(Path(image_dir), Path(out_dir))
    with open_batch(npz) as (shape, batches):
        side = int(shape[1])
        net = inception_for(m)
        real = net.source.startswith("real")
        if real:   # fail on a missing reference before the long pass over the samples
            ref_path, url = reference_path(m, bench, side)
            if not ref_path.exists():
                raise UserError(f"missing ADM reference batch {ref_path} (published at {url})")
        net = net.to(device)
        acts = activations(net, batches(EV_BATCH))
    if len(acts[0]) < EV_K + 1:
        raise UserError(f"the ImageNet metrics need at least {EV_K + 1} images, got {len(acts[0])}")
    probs = softmax_probs(acts[0], net.logits_weight)
    if real:
        with open_batch(ref_path, uint8=False) as (_, ref_batches):
            ref = activations(net, ref_batches(EV_BATCH))
        ref_stats, ref_name = _ref_stats_from_file(ref_path), str(ref_path)
    else:
        n_ref = int(m.get("standin_reference_n", 64))
        ref = _standin_reference(int(m.get("standin_seed", 0)), n_ref, side, int(m.get("standin_seed", 0)))
        ref_stats, ref_name = None, f"standin: {n_ref} seeded synthetic images"
    out = adm_metrics(acts, probs, ref, ref_stats, device, block)
    out["imagenet_standin"] = 0.0 if real else 1.0
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "imagenet_eval.json").write_text(json.dumps(
        {"sample_batch": str(npz), "n": int(shape[0]), "size": list(shape[1:3]), "inception": net.source,
         "reference": ref_name, "reference_stats": "file mu/sigma" if ref_stats is not None else "computed",
         "metrics": out}, indent=1))
    return out


__all__ = ["imagenet", "run", "InceptionTF2015", "standin_inception", "load_inception", "tf1_resize_bilinear",
           "statistics", "softmax_probs", "inception_score", "pairwise_distances", "manifold_radii",
           "precision_recall", "adm_metrics", "open_batch", "sample_batch"]
