"""ImageNet / ADM evaluator (eval/imagenet.py): our metrics against the evaluator's own functions on the same
features, the network port, the .npz batch, the class-label items and their seeds.

``_ev_*`` below re-express openai/guided-diffusion ``evaluations/evaluator.py`` (@22e0df81, "EV"): its numpy/scipy
parts as written there (FIDStatistics.frechet_distance, compute_statistics, compute_inception_score's loop,
ManifoldEstimator.manifold_radii / evaluate_pr with their blocks and _numpy_partition's thread pool), its TensorFlow
parts (the softmax graph; DistanceBlock: float16 distances, a block recomputed in float32 when not finite) in numpy
with every op's result rounded to the op's dtype. Ours (torch, other blocking, topk instead of partition) must
agree to 1e-6 relative.
"""
import zipfile
from functools import partial
from multiprocessing import cpu_count
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from scipy import linalg

from eval import imagenet as im
from varbench.bench.layouts import finalize, image_format, imagenet_order, relpath
from varbench.errors import UserError
from varbench.harness.registry import build_backbone
from varbench.harness.rundir import RunDir, Shard
from varbench.harness.runner import bench_items, generate_items
from varbench.hooks import Method
from varbench.io import to_uint8
from varbench.loop import generate

REPO = Path(__file__).resolve().parents[1]

REL = 1e-6


# ------------------------------------------------------------------ EV, re-expressed
def _ev_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))     # EV passes disp=False (deprecated in SciPy 1.17; same root)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError("Imaginary component")
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def _ev_stats(acts):
    return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def _ev_softmax(acts, w_tf, batch=512):    # tf.nn.softmax(tf.matmul(input, w)), float32, batches of 512
    out = []
    for i in range(0, len(acts), batch):
        logits = acts[i:i + batch].astype(np.float32) @ w_tf
        e = np.exp(logits - logits.max(1, keepdims=True))
        out.append((e / e.sum(1, keepdims=True)).astype(np.float32))
    return np.concatenate(out, axis=0)


def _ev_inception_score(preds, split_size=5000):
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _ev_batch_pairwise_distances(U, V, dt):
    """_batch_pairwise_distances with the graph's dtype ``dt``: each op's result in dt (the reductions and the matmul
    accumulated wide, then rounded once)."""
    norm_u = np.sum(np.square(U).astype(np.float64), 1).astype(dt).reshape(-1, 1)
    norm_v = np.sum(np.square(V).astype(np.float64), 1).astype(dt).reshape(1, -1)
    mm = (U.astype(np.float64) @ V.astype(np.float64).T).astype(dt)
    return np.maximum(norm_u - 2 * mm + norm_v, dt(0))


def _ev_distance_block(U, V):
    d16 = _ev_batch_pairwise_distances(U.astype(np.float16), V.astype(np.float16), np.float16)
    if np.all(np.isfinite(d16)):
        return d16.astype(np.float32)
    return _ev_batch_pairwise_distances(U.astype(np.float32), V.astype(np.float32), np.float32)


def _ev_less_thans(batch_1, radii_1, batch_2, radii_2):
    dist32 = _ev_distance_block(batch_1, batch_2).astype(np.float32)[..., None]
    return np.any(dist32 <= radii_2, axis=1), np.any(dist32 <= radii_1[:, None], axis=0)


def _ev_numpy_partition(arr, kth, **kwargs):
    num_workers = min(cpu_count(), len(arr))
    chunk_size = len(arr) // num_workers
    extra = len(arr) % num_workers
    start_idx, batches = 0, []
    for i in range(num_workers):
        size = chunk_size + (1 if i < extra else 0)
        batches.append(arr[start_idx:start_idx + size])
        start_idx += size
    with ThreadPool(num_workers) as pool:
        return list(pool.map(partial(np.partition, kth=kth, **kwargs), batches))


def _ev_manifold_radii(features, row_batch_size=10000, col_batch_size=10000, nhood_sizes=(3,)):
    num_images = len(features)
    radii = np.zeros([num_images, len(nhood_sizes)], dtype=np.float32)
    distance_batch = np.zeros([row_batch_size, num_images], dtype=np.float32)
    seq = np.arange(max(nhood_sizes) + 1, dtype=np.int32)
    for begin1 in range(0, num_images, row_batch_size):
        end1 = min(begin1 + row_batch_size, num_images)
        row_batch = features[begin1:end1]
        for begin2 in range(0, num_images, col_batch_size):
            end2 = min(begin2 + col_batch_size, num_images)
            distance_batch[0:end1 - begin1, begin2:end2] = _ev_distance_block(row_batch, features[begin2:end2])
        radii[begin1:end1, :] = np.concatenate(
            [x[:, list(nhood_sizes)] for x in _ev_numpy_partition(distance_batch[0:end1 - begin1, :], seq, axis=1)],
            axis=0)
    return radii


def _ev_evaluate_pr(features_1, radii_1, features_2, radii_2, row_batch_size=10000, col_batch_size=10000):
    features_1_status = np.zeros([len(features_1), radii_2.shape[1]], dtype=bool)
    features_2_status = np.zeros([len(features_2), radii_1.shape[1]], dtype=bool)
    for begin_1 in range(0, len(features_1), row_batch_size):
        end_1 = begin_1 + row_batch_size
        batch_1 = features_1[begin_1:end_1]
        for begin_2 in range(0, len(features_2), col_batch_size):
            end_2 = begin_2 + col_batch_size
            batch_2 = features_2[begin_2:end_2]
            b1_in, b2_in = _ev_less_thans(batch_1, radii_1[begin_1:end_1], batch_2, radii_2[begin_2:end_2])
            features_1_status[begin_1:end_1] |= b1_in
            features_2_status[begin_2:end_2] |= b2_in
    return (np.mean(features_2_status.astype(np.float64), axis=0), np.mean(features_1_status.astype(np.float64), axis=0))


def _ev_prec_recall(ref, sample, block=10000):
    r1 = _ev_manifold_radii(ref, block, block)
    r2 = _ev_manifold_radii(sample, block, block)
    pr = _ev_evaluate_pr(ref, r1, sample, r2, block, block)
    return float(pr[0][0]), float(pr[1][0])


def _close(ours, theirs, rel=REL):
    assert abs(ours - theirs) <= rel * max(abs(theirs), 1e-30), (ours, theirs)


# ------------------------------------------------------------------ synthetic pool_3-like features
def _features(seed: int, n_ref: int, n_sample: int, dim: int, shift: float = 0.02):
    """Non-negative clustered features of pool_3's scale (mean ~0.4, squared norms ~ 10^3, where float16 spacing is
    0.5: many tied distances)."""
    rng = np.random.default_rng(seed)
    centers = rng.gamma(2.0, 0.2, (24, dim))
    ref = centers[rng.integers(0, 24, n_ref)] + rng.normal(0, 0.12, (n_ref, dim))
    sample = centers[rng.integers(0, 18, n_sample)] + shift + rng.normal(0, 0.12, (n_sample, dim))
    return np.abs(ref).astype(np.float32), np.abs(sample).astype(np.float32)


def test_precision_recall_match_the_evaluator_with_ties_and_blocks():
    ref, sample = _features(0, 230, 310, 2048)
    for block in (10000, 64):     # one block, and several (including ragged last blocks)
        theirs = _ev_prec_recall(ref, sample, block)
        r_ref, r_s = im.manifold_radii(ref, block=block), im.manifold_radii(sample, block=block)
        np.testing.assert_array_equal(r_ref, _ev_manifold_radii(ref, block, block)[:, 0])
        np.testing.assert_array_equal(r_s, _ev_manifold_radii(sample, block, block)[:, 0])
        ours = im.precision_recall(ref, r_ref, sample, r_s, block=block)
        assert ours == theirs
        assert 0.05 < theirs[0] < 0.95 and 0.05 < theirs[1] < 0.95, theirs   # neither metric is saturated


def test_distances_are_float16_with_the_per_block_float32_fallback():
    ref, sample = _features(1, 150, 200, 2048)
    sample[:7] *= 30          # squared norms above float16's 65504: the blocks holding these rows overflow
    theirs = _ev_prec_recall(ref, sample, 64)
    r_ref, r_s = im.manifold_radii(ref, block=64), im.manifold_radii(sample, block=64)
    np.testing.assert_array_equal(r_s, _ev_manifold_radii(sample, 64, 64)[:, 0])
    assert im.precision_recall(ref, r_ref, sample, r_s, block=64) == theirs
    # the rule matters: the overflowing block is float32, the others float16 (not all float32, not all float16)
    d_over = im.pairwise_distances(torch.from_numpy(sample[:64]), torch.from_numpy(sample[:64])).numpy()
    d_fine = im.pairwise_distances(torch.from_numpy(sample[64:128]), torch.from_numpy(sample[64:128])).numpy()
    with np.errstate(over="ignore"):
        assert np.isfinite(d_over).all() and not np.array_equal(d_over, d_over.astype(np.float16).astype(np.float32))
    assert np.array_equal(d_fine, d_fine.astype(np.float16).astype(np.float32))
    all32 = _ev_batch_pairwise_distances(sample[64:128], sample[64:128], np.float32)
    assert not np.array_equal(d_fine, all32)


def test_inception_score_matches_the_evaluator_and_depends_on_order():
    rng = np.random.default_rng(2)
    n, labels = 11000, np.arange(11000) % 50        # 3 splits (5000, 5000, 1000); interleaved classes
    w = torch.from_numpy((rng.normal(0, 1, (1008, 64)) * 0.3).astype(np.float32))
    centers = rng.gamma(2.0, 1.0, (50, 64))
    pool = np.abs(centers[labels] + rng.normal(0, 0.4, (n, 64))).astype(np.float32)
    ours_p = im.softmax_probs(pool, w)
    theirs_p = _ev_softmax(pool, w.numpy().T)
    np.testing.assert_allclose(ours_p, theirs_p, rtol=1e-5, atol=1e-9)
    _close(im.inception_score(ours_p), _ev_inception_score(theirs_p))
    # pitfall 1: the same images class-sorted give another IS (consecutive splits, no shuffle)
    order = np.argsort(labels, kind="stable")
    sorted_is = _ev_inception_score(theirs_p[order])
    _close(im.inception_score(ours_p[order]), sorted_is)
    assert sorted_is < 0.8 * _ev_inception_score(theirs_p)


def test_all_metrics_match_the_evaluator_main():
    """EV ``main`` on the same activations: IS, FID, sFID (computed reference stats and the file's stored ones),
    precision, recall."""
    ref_pool, pool = _features(3, 180, 260, 96)
    ref_sp, sp = _features(4, 180, 260, 70, shift=0.05)
    w = torch.from_numpy(np.random.default_rng(5).normal(0, 0.5, (1008, 96)).astype(np.float32))
    probs = im.softmax_probs(pool, w)
    ours = im.adm_metrics((pool, sp), probs, (ref_pool, ref_sp), block=128)
    mu, sigma = _ev_stats(pool)
    mu_s, sigma_s = _ev_stats(sp)
    rmu, rsig = _ev_stats(ref_pool)
    rmu_s, rsig_s = _ev_stats(ref_sp)
    p, r = _ev_prec_recall(ref_pool, pool, 128)
    theirs = {"imagenet_is": _ev_inception_score(_ev_softmax(pool, w.numpy().T)),
              "imagenet_fid": _ev_frechet(mu, sigma, rmu, rsig), "imagenet_sfid": _ev_frechet(mu_s, sigma_s, rmu_s, rsig_s),
              "imagenet_precision": p, "imagenet_recall": r}
    assert set(ours) == set(theirs)
    for k in theirs:
        _close(ours[k], theirs[k])
    assert theirs["imagenet_fid"] > 0.1 and theirs["imagenet_sfid"] > 0.01
    # stored reference statistics (float64 in the file) are used as given
    stored = (rmu.astype(np.float64) + 0.01, rsig * 1.1, rmu_s.astype(np.float64), rsig_s)
    ours2 = im.adm_metrics((pool, sp), probs, (ref_pool, ref_sp), stored, block=128)
    _close(ours2["imagenet_fid"], _ev_frechet(mu, sigma, stored[0], stored[1]))
    assert abs(ours2["imagenet_fid"] - ours["imagenet_fid"]) > 1e-3


# ------------------------------------------------------------------ the network port
def _tf1_resize_reference(img: np.ndarray, out: int) -> np.ndarray:
    """TF1 resize_bilinear (legacy, align_corners=False) written per pixel: in = i * (in/out), lower = floor,
    upper = min(ceil, n-1), lerp = in - floor; top/bottom lerps along x, then along y."""
    c, h, w = img.shape
    res = np.zeros((c, out, out), np.float32)
    sy, sx = np.float32(h / out), np.float32(w / out)
    for y in range(out):
        iy = np.float32(y) * sy
        y0, y1 = int(np.floor(iy)), min(int(np.ceil(iy)), h - 1)
        ly = np.float32(iy - np.floor(iy))
        for x in range(out):
            ix = np.float32(x) * sx
            x0, x1 = int(np.floor(ix)), min(int(np.ceil(ix)), w - 1)
            lx = np.float32(ix - np.floor(ix))
            top = img[:, y0, x0] + (img[:, y0, x1] - img[:, y0, x0]) * lx
            bot = img[:, y1, x0] + (img[:, y1, x1] - img[:, y1, x0]) * lx
            res[:, y, x] = top + (bot - top) * ly
    return res


def test_tf1_legacy_bilinear_resize():
    rng = np.random.default_rng(6)
    img = rng.integers(0, 256, (3, 13, 13)).astype(np.float32)
    ours = im.tf1_resize_bilinear(torch.from_numpy(img)[None], 40)[0].numpy()
    np.testing.assert_allclose(ours, _tf1_resize_reference(img, 40), rtol=0, atol=1e-4)
    half_pixel = torch.nn.functional.interpolate(torch.from_numpy(img)[None], size=(40, 40), mode="bilinear",
                                                 align_corners=False)[0].numpy()
    assert np.abs(ours - half_pixel).max() > 1.0          # not PyTorch's half-pixel bilinear
    same = im.tf1_resize_bilinear(torch.from_numpy(img)[None], 13)[0].numpy()
    np.testing.assert_array_equal(same, img)


def test_inception_layout_is_the_converted_weights_layout():
    """Module names and shapes = torchvision's Inception3(num_classes=1008, aux_logits=False), which pytorch-fid and
    torch-fidelity load the converted TF-2015 weights into (their TF-patched blocks have the same parameters)."""
    tv = pytest.importorskip("torchvision")
    ref = tv.models.Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    ours = im.InceptionTF2015().state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.fixture(scope="module")
def standin():
    return im.standin_inception(0)


def test_spatial_features_are_mixed_6d_branch1x1_nhwc_first_7_channels(standin):
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.integers(0, 256, (2, 40, 48, 3), dtype=np.uint8))
    seen = []
    h = standin.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        pool, spatial = standin(x)
    finally:
        h.remove()
    assert pool.shape == (2, 2048) and spatial.shape == (2, 17 * 17 * 7)
    want = seen[0].permute(0, 2, 3, 1)[..., :7].reshape(2, -1)
    torch.testing.assert_close(spatial, want, rtol=0, atol=0)
    assert (spatial >= 0).all() and spatial.std() > 0


def test_real_weights_load_strictly_and_reproduce(tmp_path, standin):
    path = tmp_path / im.INCEPTION_FILE
    torch.save(standin.state_dict(), path)
    net = im.inception_for({"inception": "real", "weights_dir": str(tmp_path)})
    assert net.source == f"real: {path}"
    x = torch.from_numpy(np.random.default_rng(8).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    for a, b in zip(net(x), standin(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    sd = standin.state_dict()
    sd["Mixed_6d.branch1x1.conv.weight"] = sd["Mixed_6d.branch1x1.conv.weight"][:100]
    torch.save(sd, path)
    with pytest.raises(UserError, match=r"Mixed_6d\.branch1x1\.conv\.weight is \(100, 768, 1, 1\)"):
        im.inception_for({"inception": "real", "weights_dir": str(tmp_path)})


def test_missing_inception_weights(tmp_path, capsys):
    with pytest.raises(UserError) as e:
        im.inception_for({"inception": "real", "weights_dir": str(tmp_path)})
    msg = str(e.value)
    assert "\n" not in msg and im.INCEPTION_FILE in msg and "https://github.com/toshas/torch-fidelity" in msg
    net = im.inception_for({"inception": "auto", "weights_dir": str(tmp_path)})
    assert net.source == "standin: seed 0"
    assert "STAND-IN" in capsys.readouterr().err
    with pytest.raises(UserError, match="inception must be one of"):
        im.inception_for({"inception": "tf"})


# ------------------------------------------------------------------ items, files, the .npz batch
def _bench(**kw):
    return {"name": "imagenet", "source": "imagenet", "num_classes": 1000, "samples_per_class": 50, "classes": None,
            "images_per_prompt": 1, "layout": "imagenet", "image_format": "png", "metrics": ["imagenet"],
            "imagenet": {"inception": "standin", "standin_reference_n": 4, "block": 10000}} | kw


def test_items_interleave_classes_with_per_class_seeds():
    items = im.imagenet(_bench())
    assert len(items) == 50000 and [p.index for p in items[:3]] == [0, 1, 2]
    assert [p.label for p in items[:3]] == [0, 1, 2] and items[1000].label == 0 and items[1000].meta["sample"] == 1
    assert all(p.label == p.index % 1000 for p in items)
    # each 5000-item IS split holds every class 5 times
    assert all(np.bincount([p.label for p in items[s:s + 5000]], minlength=1000).tolist() == [5] * 1000
               for s in range(0, 50000, 5000))
    seeds = {(p.label, p.meta["sample"]): p.seed for p in items}
    assert len(set(seeds.values())) == 50000 and seeds[(7, 3)] == 7 * 50 + 3
    sub = im.imagenet(_bench(classes=[9, 3, 3], samples_per_class=50))   # a subset: the same (class, k) -> same seed
    assert [p.label for p in sub[:4]] == [3, 9, 3, 9]
    assert all(seeds[(p.label, p.meta["sample"])] == p.seed for p in sub)
    assert relpath("imagenet", items[1003].key, 1003, 0, 1, "png") == "s0001_c0003.png"
    with pytest.raises(UserError, match="bench.classes"):
        im.imagenet(_bench(classes=[1000]))
    with pytest.raises(UserError, match="samples_per_class"):
        im.imagenet(_bench(samples_per_class=0))


def _write_items(folder, prompts, side=16):
    rng = np.random.default_rng(9)
    pixels = {}
    for p in prompts:
        arr = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / relpath("imagenet", p.key, p.index, 0, 1, "png"))
        pixels[p.index] = arr
    return pixels


def _ev_read_arr0(path):
    """EV open_npz_array + StreamingNpzArrayReader: the arr_0 header, then the raw bytes in batches of 64."""
    with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(f))
        assert not fortran
        out, idx = [], 0
        while idx < shape[0]:
            bs = min(64, shape[0] - idx)
            idx += bs
            out.append(np.frombuffer(f.read(bs * int(np.prod(shape[1:])) * dtype.itemsize), dtype).reshape(bs, *shape[1:]))
    return np.concatenate(out)


def test_npz_batch_in_item_order_as_the_evaluator_reads_it(tmp_path):
    prompts = im.imagenet(_bench(num_classes=10, samples_per_class=7))[:67]   # 67 > EV's batch of 64
    pixels = _write_items(tmp_path, prompts[::-1])
    finalize("imagenet", tmp_path, prompts[:-1], 1, "png")       # the batch of the first 66 items
    with np.load(tmp_path / "samples.npz") as z:
        arr0, arr1 = z["arr_0"], z["arr_1"]
    assert arr0.dtype == np.uint8 and arr0.shape == (66, 16, 16, 3)
    np.testing.assert_array_equal(arr0, np.stack([pixels[p.index] for p in prompts[:-1]]))
    np.testing.assert_array_equal(arr1, [p.label for p in prompts[:-1]])
    np.testing.assert_array_equal(_ev_read_arr0(tmp_path / "samples.npz"), arr0)
    files, ordered = imagenet_order(tmp_path)                    # the scorer's order from the names alone
    assert ordered and [f.stem for f in files] == [p.key for p in prompts]
    # the scorer repacks when the folder holds more images than the npz
    npz = im.sample_batch(tmp_path, tmp_path / "out")
    assert npz == tmp_path / "out" / "samples.npz"
    with im.open_batch(npz) as (shape, batches):
        got = np.concatenate(list(batches(64)))
    np.testing.assert_array_equal(got, np.stack([pixels[p.index] for p in prompts]))


def test_incomplete_items_write_no_batch(tmp_path):
    prompts = im.imagenet(_bench(num_classes=10, samples_per_class=1))
    _write_items(tmp_path, prompts[:5])
    finalize("imagenet", tmp_path, prompts, 1, "png")
    assert not (tmp_path / "samples.npz").exists()


@pytest.mark.slow   # the two 2048-d matrix square roots: minutes on 2 shared cores
def test_scorer_runs_with_the_standin_and_says_so(tmp_path):
    prompts = im.imagenet(_bench(num_classes=10, samples_per_class=1))[:4]
    _write_items(tmp_path, prompts, side=24)
    finalize("imagenet", tmp_path, prompts, 1, "png")
    out = im.run(_bench(), tmp_path, tmp_path / "scores", "cpu")
    assert set(out) == {"imagenet_is", "imagenet_fid", "imagenet_sfid", "imagenet_precision", "imagenet_recall",
                        "imagenet_standin"}
    assert out["imagenet_standin"] == 1.0 and all(np.isfinite(v) for v in out.values())
    assert out["imagenet_is"] > 1.0 and out["imagenet_fid"] > 0
    # real network + missing reference batch: one line naming the file and where it is published
    torch.save(im.standin_inception(0).state_dict(), tmp_path / im.INCEPTION_FILE)
    real = _bench(imagenet={"inception": "real", "weights_dir": str(tmp_path),
                            "reference_batch": str(tmp_path / "nope.npz")})
    with pytest.raises(UserError, match="missing ADM reference batch .*nope.npz"):
        im.run(real, tmp_path, tmp_path / "scores", "cpu")
    with pytest.raises(UserError, match="no ADM reference batch for 24-px"):
        im.run(_bench(imagenet={"inception": "real", "weights_dir": str(tmp_path)}), tmp_path, tmp_path / "s", "cpu")


def test_reference_file_stats_and_dtype(tmp_path):
    """EV ``read_statistics``: the file's mu/sigma/mu_s/sigma_s when it has them; its arr_0 is read whatever its
    numeric dtype (EV casts to float32); a sample batch must be uint8."""
    arr = np.random.default_rng(11).integers(0, 256, (5, 8, 8, 3)).astype(np.float32)
    np.savez(tmp_path / "ref.npz", arr_0=arr, mu=np.ones(3), sigma=np.eye(3), mu_s=np.zeros(2), sigma_s=np.eye(2))
    stats = im._ref_stats_from_file(tmp_path / "ref.npz")
    np.testing.assert_array_equal(stats[0], np.ones(3))
    np.testing.assert_array_equal(stats[3], np.eye(2))
    with im.open_batch(tmp_path / "ref.npz", uint8=False) as (shape, batches):
        np.testing.assert_array_equal(np.concatenate(list(batches(2))), arr)
    with pytest.raises(UserError, match="must be uint8"):
        with im.open_batch(tmp_path / "ref.npz"):
            pass
    np.savez(tmp_path / "plain.npz", arr_0=arr.astype(np.uint8))
    assert im._ref_stats_from_file(tmp_path / "plain.npz") is None
    with pytest.raises(UserError, match="has no arr_1"):
        with im.open_batch(tmp_path / "plain.npz", "arr_1"):
            pass
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(UserError, match="cannot read"):
        with im.open_batch(tmp_path / "bad.npz"):
            pass


def test_reference_batch_url_and_jpg_refused():
    path, url = im.reference_path({}, {"data_dir": "/x"}, 256)
    assert path.name == "VIRTUAL_imagenet256_labeled.npz" and url.endswith("/256/VIRTUAL_imagenet256_labeled.npz")
    assert im.reference_path({}, {"data_dir": "/x"}, 512)[0].name == "VIRTUAL_imagenet512.npz"
    with pytest.raises(UserError, match="PNG"):
        image_format({"layout": "imagenet", "image_format": "jpg"})


# ------------------------------------------------------------------ seeds: images independent of sharding/batching
@pytest.mark.slow
def test_per_class_seeds_make_images_independent_of_sharding_and_batching():
    """var_tiny_random (10 classes): each item generated from its label with its own generator seeded by
    run seed + the item's per-class seed; shards (i % N) and batches give every image the same sampled tokens, and
    the same pixels up to batched-kernel rounding (uint8 +-1, as tests/test_var.py's batch test)."""
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/var_tiny_random.yaml"), resolve=True)
    bb = build_backbone(cfg, "cpu", "fp32")
    items = im.imagenet(_bench(num_classes=10, samples_per_class=2))[8:12]     # classes 8, 9, 0, 1

    def make(order, batch):
        out = {}
        for s in range(0, len(order), batch):
            chunk = order[s:s + batch]
            rngs = [torch.Generator().manual_seed(100 + p.seed) for p in chunk]
            g = generate(bb, [p.label for p in chunk], None, rngs if len(rngs) > 1 else rngs[0])
            for j, (p, img) in enumerate(zip(chunk, to_uint8(g.images))):
                out[p.index] = ([x[j] for x in g.state.idx], img.int())
        return out

    single = make(items, 1)
    shard0, shard1 = [p for p in items if p.index % 2 == 0], [p for p in items if p.index % 2 == 1]
    batched = make(shard1[::-1], 2) | make(shard0, 1)
    for i, (idx, img) in single.items():
        assert all(torch.equal(a, b) for a, b in zip(idx, batched[i][0])), i
        assert (img - batched[i][1]).abs().max() <= 1, i
    assert not torch.equal(single[8][1], single[10][1])


@pytest.mark.slow
def test_the_runner_gives_each_item_its_class_and_seed_whatever_the_shards_and_batches(tmp_path):
    """The runner's own items (Item.label, seed = run seed + c*samples_per_class + k) and generate_items: two shards
    with batches of 2 write the images of one unsharded batch-1 run (pixels up to batched-kernel rounding)."""
    bench = _bench(num_classes=10, samples_per_class=2)
    items = bench_items(bench, 100, im.imagenet(bench)[8:12])        # classes 8, 9 (k=0), 0, 1 (k=1)
    assert [(it.label, it.condition, it.prompt) for it in items[:2]] == [(8, 8, "class 8"), (9, 9, "class 9")]
    assert [it.seed for it in items] == [100 + 8 * 2, 100 + 9 * 2, 100 + 1, 100 + 3]
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/var_tiny_random.yaml"), resolve=True)
    bb = build_backbone(cfg, "cpu", "fp32")
    generate_items(bb, Method(), items, RunDir(tmp_path / "whole", Shard(0, 1)), bench, 1, progress=False)
    for k in range(2):
        generate_items(bb, Method(), items, RunDir(tmp_path / "sharded", Shard(k, 2)), bench, 2, progress=False)
    for it in items:
        a = np.asarray(Image.open(tmp_path / "whole/images" / it.relpath), np.int16)
        b = np.asarray(Image.open(tmp_path / "sharded/images" / it.relpath), np.int16)
        assert np.abs(a - b).max() <= 1, it.relpath
    assert (tmp_path / "whole/images/samples.npz").exists() is False      # finalize is the stage's, not generate_items'


# ------------------------------------------------------------------ tables: the stand-in footnote
def test_table_footnote_says_when_the_standin_scored():
    import pandas as pd

    from varbench.results import paper, tables

    def rows(run, method, standin):
        vals = {"imagenet_fid": 12.5, "imagenet_is": 3.2, "speedup": 1.4, "imagenet_standin": standin}
        return [{"model": "var_d30", "bench": "imagenet", "method": method, "overrides": "default", "run": run,
                 "metric": k, "value": v, "n": 20, "note": None, "device": "cpu", "time": 1.0, "family": method}
                for k, v in vals.items()]

    df = pd.DataFrame(rows("a", "none", 0.0) + rows("b", "nova", 1.0))
    w = tables.wide(df, "var_d30", "imagenet")
    text = tables.markdown(w, quality=tables.quality_columns(w, ["imagenet"]))
    assert "imagenet standin" not in text and "imagenet_standin" not in text and "imagenet fid" in text
    lines = text.splitlines()
    assert "STAND-IN" in lines[-1] and lines[-1].startswith("[1] imagenet:")
    assert [ln.split("|")[3].strip() for ln in lines[2:4]] == ["none", "nova[1]"]
    p = paper.render(15, df)
    assert "var_d30/nova" in p.splitlines()[-1] and "STAND-IN" in p and "1.92" in p


# ------------------------------------------------------------------ on CUDA (scripts/gpu_check.py runs pytest -m gpu)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False here)")
def test_metrics_on_cuda_equal_the_evaluator_and_the_cpu(standin):
    """The radii, precision and recall on CUDA are the evaluator's (float16 rounding of float64 sums: device
    independent), and the port runs there in float32 without TF32 (features within 1e-4 of the CPU's)."""
    ref, sample = _features(0, 230, 310, 2048)
    r_ref, r_s = im.manifold_radii(ref, "cuda", 64), im.manifold_radii(sample, "cuda", 64)
    np.testing.assert_array_equal(r_ref, _ev_manifold_radii(ref, 64, 64)[:, 0])
    np.testing.assert_array_equal(r_s, _ev_manifold_radii(sample, 64, 64)[:, 0])
    assert im.precision_recall(ref, r_ref, sample, r_s, "cuda", 64) == _ev_prec_recall(ref, sample, 64)
    x = torch.from_numpy(np.random.default_rng(10).integers(0, 256, (4, 256, 256, 3), dtype=np.uint8))
    cpu = standin(x)
    gpu = im.standin_inception(0).cuda()(x)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)
