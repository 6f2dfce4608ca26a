"""GenEval: the rules on hand-made detections (one case per tag), the official layout, the scorer's real code path
on a tiny random Mask2Former, and the one-line error when detector weights are missing."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, shared_path

from eval.geneval.rules import Det, Options, evaluate, keep_detections, relative_position, summarize


def D(x1, y1, x2, y2, s=0.95):
    return Det((x1, y1, x2, y2), s)


no_color = lambda dets, cls: ["red"] * len(dets)  # noqa: E731


def test_single_and_two_object():
    meta = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    assert evaluate(meta, {"cat": [D(0, 0, 10, 10)], "dog": [D(20, 0, 30, 10)]}, no_color)[0]
    ok, why = evaluate(meta, {"cat": [D(0, 0, 10, 10)]}, no_color)
    assert not ok and "dog>=1" in why


def test_counting_threshold_and_exclude():
    meta = {"tag": "counting", "include": [{"class": "apple", "count": 2}], "exclude": [{"class": "apple", "count": 3}]}
    raw = {"apple": [D(0, 0, 5, 5, 0.95), D(10, 0, 15, 5, 0.92), D(20, 0, 25, 5, 0.5)]}
    objs = keep_detections(raw, "counting")          # the 0.5 one is below the counting threshold 0.9
    assert len(objs["apple"]) == 2 and evaluate(meta, objs, no_color)[0]
    objs = keep_detections(raw, "two_object")        # threshold 0.3: three apples -> excluded
    assert not evaluate(meta, objs, no_color)[0]


def test_colors_and_color_attr():
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "blue"},
                                             {"class": "bench", "count": 1, "color": "red"}]}
    objs = {"car": [D(0, 0, 5, 5)], "bench": [D(10, 0, 15, 5)]}
    palette = {"car": "blue", "bench": "red"}
    assert evaluate(meta, objs, lambda d, c: [palette[c]] * len(d))[0]
    assert not evaluate(meta, objs, lambda d, c: ["blue"] * len(d))[0]


def test_position_geometry_and_rule():
    a, b = D(0, 40, 10, 50), D(40, 40, 50, 50)           # a left of b
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    assert relative_position(D(0, 0, 10, 10), D(0, 40, 10, 50)) == {"above"}
    assert relative_position(D(0, 0, 10, 10), D(1, 1, 11, 11)) == set()   # overlapping: shrunk offset ~0
    # "a photo of a tie above a sink": include[0] = sink, include[1] = tie with position ["above", 0]
    meta = {"tag": "position", "include": [{"class": "sink", "count": 1},
                                           {"class": "tie", "count": 1, "position": ["above", 0]}]}
    assert evaluate(meta, {"sink": [D(0, 40, 10, 50)], "tie": [D(0, 0, 10, 10)]}, no_color)[0]
    assert not evaluate(meta, {"sink": [D(0, 0, 10, 10)], "tie": [D(0, 40, 10, 50)]}, no_color)[0]
    assert not evaluate(meta, {"tie": [D(0, 0, 10, 10)]}, no_color)[0]      # no target


def test_nms_option_and_max_objects():
    raw = {"cup": [D(0, 0, 10, 10, 0.9), D(1, 1, 11, 11, 0.8), D(30, 30, 40, 40, 0.7)] + [D(50, 50, 51, 51, 0.4)] * 20}
    assert len(keep_detections(raw, "single_object")["cup"]) == 16
    assert len(keep_detections(raw, "single_object", Options(max_overlap=0.5))["cup"]) == 3


def test_summary_is_mean_of_tag_means():
    res = [{"tag": "position", "correct": True}, {"tag": "position", "correct": False},
           {"tag": "counting", "correct": True}]
    s = summarize(res)
    assert s["position"] == 0.5 and s["counting"] == 1.0 and s["overall"] == 0.75


def _tiny_mask2former():
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    torch.manual_seed(0)
    bc = SwinConfig(embed_dim=24, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                    out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=bc, num_queries=10, num_labels=80, hidden_dim=32, mask_feature_size=32,
                            feature_size=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                            dim_feedforward=64, encoder_feedforward_dim=64, use_pretrained_backbone=False)
    return Mask2FormerForUniversalSegmentation(cfg)


def test_detector_postprocessing_on_tiny_random_mask2former():
    from eval.geneval.scorer import HFMask2Former, mmdet_preprocess

    x, rhw = mmdet_preprocess(np.zeros((100, 150, 3), np.uint8))
    assert rhw == (800, 1200) and x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0
    det = HFMask2Former("", model=_tiny_mask2former())
    names = [f"c{i}" for i in range(80)]
    img = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    out = det(img, names)
    dets = [d for ds in out.values() for d in ds]
    assert len(dets) == 100                          # top-100 (query, class) pairs, all returned
    for d in dets:
        assert 0 <= d.score <= 1 and d.mask.shape == (64, 96)
        x1, y1, x2, y2 = d.box
        if d.mask.any():
            assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 64
            ys, xs = np.nonzero(d.mask)
            assert (x1, y1, x2, y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


@pytest.mark.slow
def test_geneval_layout_and_missing_detector_weights(tmp_path):
    data = shared_path("benchmarks")
    env = dict(os.environ, VARBENCH_DATA=str(data), VARBENCH_RESULTS=str(tmp_path), VARBENCH_WEIGHTS=str(tmp_path / "w"),
               HF_HUB_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    args = [sys.executable, "run.py", "bench=geneval", "bench.limit=2", "method=none", "progress=false"]
    # stage=all checks the scorer's files before the first image (tests/test_workflows.py); stage=generate does not
    g = subprocess.run(args + ["stage=generate"], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert g.returncode == 0, g.stderr[-2000:]
    r = subprocess.run(args + ["stage=score"], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    img = tmp_path / "runs/tiny/geneval/none/default/images"
    for i in range(2):
        meta = json.loads((img / f"{i:05d}/metadata.jsonl").read_text())
        assert meta["prompt"] and "tag" in meta
        assert sorted(p.name for p in (img / f"{i:05d}/samples").iterdir()) == [f"{k:05d}.jpg" for k in range(4)]
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "mask2former" in lines[0] and "bench.geneval.weights_dir" in lines[0]
    # speed rows were stored before the scorer stopped
    assert (tmp_path / "rows.jsonl").exists()


def test_score_folder_runs_the_real_path_with_a_tiny_detector(tmp_path):
    from PIL import Image

    from eval.geneval.scorer import HFMask2Former, score_folder

    for i, meta in enumerate([{"tag": "single_object", "prompt": "a photo of a c1", "include": [{"class": "c1", "count": 1}]},
                              {"tag": "counting", "prompt": "two c2", "include": [{"class": "c2", "count": 2}],
                               "exclude": [{"class": "c2", "count": 3}]}]):
        d = tmp_path / f"{i:05d}"
        (d / "samples").mkdir(parents=True)
        (d / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        Image.new("RGB", (64, 64), (200, 30, 30)).save(d / "samples" / "00000.png")
        Image.new("RGB", (64, 64), (200, 30, 30)).save(d / "samples" / "00001.jpg")   # Infinity's regex: png or jpg
        Image.new("RGB", (64, 64), (200, 30, 30)).save(d / "samples" / "00002.webp")  # neither: not scored
        Image.new("RGB", (64, 64), (200, 30, 30)).save(d / "samples" / "00003.jpg.tmp", format="JPEG")
    det = HFMask2Former("", model=_tiny_mask2former())
    res, summary = score_folder(tmp_path, det, lambda im, d, o: ["red"] * len(d), [f"c{i}" for i in range(80)],
                                out_jsonl=tmp_path / "r.jsonl")
    assert len(res) == 4 and set(summary) == {"single_object", "counting", "overall"}
    assert sorted({r["filename"].rsplit("/", 1)[1] for r in res}) == ["00000.png", "00001.jpg"]
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 4


def test_scoring_resumes_from_the_cache(tmp_path):
    from PIL import Image

    from eval.cache import ScoreCache
    from eval.geneval.scorer import score_folder

    d = tmp_path / "img" / "00000"
    (d / "samples").mkdir(parents=True)
    (d / "metadata.jsonl").write_text(json.dumps({"tag": "single_object", "prompt": "p", "include": [{"class": "c1", "count": 1}]}))
    for k in range(2):
        Image.new("RGB", (32, 32)).save(d / "samples" / f"{k:04d}.png")
    calls = []

    def det(img, names):
        calls.append(1)
        return {"c1": [Det((0, 0, 5, 5), 0.9)]}

    cache = ScoreCache(tmp_path / "cache.jsonl", tmp_path / "img")
    r1, s1 = score_folder(tmp_path / "img", det, None, [], cache=cache)
    r2, s2 = score_folder(tmp_path / "img", det, None, [], cache=ScoreCache(tmp_path / "cache.jsonl", tmp_path / "img"))
    assert len(calls) == 2 and s1 == s2 == {"single_object": 1.0, "overall": 1.0}
    Image.new("RGB", (32, 32), (9, 9, 9)).save(d / "samples" / "0001.png")   # regenerated image: scored again
    score_folder(tmp_path / "img", det, None, [], cache=ScoreCache(tmp_path / "cache.jsonl", tmp_path / "img"))
    assert len(calls) == 3


def test_mmdet_preprocess_pads_with_grey_128_before_normalising():
    """mmdet's test pipeline: Resize -> Pad(size_divisor=32, pad_val img=128) -> Normalize."""
    from eval.geneval.scorer import MEAN, STD, mmdet_preprocess

    x, (h, w) = mmdet_preprocess(np.full((90, 150, 3), 200, np.uint8))
    assert (h, w) == (800, 1333) and x.shape[-2:] == (800, 1344)
    grey = (128 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(x[0, :, 10, -1], grey) and torch.allclose(x[0, :, 10, 5], (200 - torch.tensor(MEAN)) / torch.tensor(STD))


# ---------------------------------------------------------------- issue 25 item 7 (fail-first on the old code)
def test_threshold_compares_float32_scores_in_float32():
    """evaluate_images.py: ``bbox[index][ordering, 4] > confidence_threshold``, a float32 array against a Python
    float, is a float32 comparison: a score of exactly float32(0.3) is NOT above 0.3 (in float64 it would be)."""
    at = float(np.float32(0.3))                       # 0.30000001192092896 > 0.3 in float64
    above = float(np.nextafter(np.float32(0.3), np.float32(1)))
    raw = {"cat": [D(0, 0, 10, 10, at)], "dog": [D(0, 0, 10, 10, above)]}
    assert set(keep_detections(raw, "single_object")) == {"dog"}
    meta = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    assert not evaluate(meta, keep_detections(raw, "single_object"), no_color)[0]
    at9 = float(np.float32(0.9))                      # counting threshold: float32(0.9) is not above 0.9 either
    assert keep_detections({"cat": [D(0, 0, 1, 1, at9)]}, "counting") == {}


def test_tied_scores_are_ordered_as_the_reversed_argsort():
    """``np.argsort(scores)[::-1]``: among equal scores the later detection comes first (argsort keeps ties in
    index order for these sizes; the reversal flips them). The first kept objects are the ones colour and position
    are judged on, so the order decides images."""
    a, b, c = D(0, 0, 10, 10, 0.8), D(20, 0, 30, 10, 0.8), D(40, 0, 50, 10, 0.8)
    assert keep_detections({"cup": [a, b, c]}, "single_object")["cup"] == [c, b, a]
    lo1, hi1, lo2, hi2 = D(0, 0, 1, 1, 0.5), D(2, 0, 3, 1, 0.9), D(4, 0, 5, 1, 0.5), D(6, 0, 7, 1, 0.9)
    assert keep_detections({"cup": [lo1, hi1, lo2, hi2]}, "single_object")["cup"] == [hi2, hi1, lo2, lo1]
    # the rule decides: "a cup left of a bowl" with two tied cups, the later one (right of the bowl) is judged
    meta = {"tag": "position", "include": [{"class": "bowl", "count": 1},
                                           {"class": "cup", "count": 1, "position": ["left of", 0]}]}
    raw = {"bowl": [D(40, 0, 50, 10, 0.9)], "cup": [D(0, 0, 10, 10, 0.7), D(80, 0, 90, 10, 0.7)]}
    assert not evaluate(meta, keep_detections(raw, "position"), no_color)[0]
