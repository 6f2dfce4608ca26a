"""Benchmark file formats and layouts the official scorers read: per-benchmark image format (png | jpg, quality),
ImageReward's metadata file for Infinity's cal_imagereward.py, and GenEval prompt rewriting from a user file."""
import json

import numpy as np
import pytest
from PIL import Image

from varbench.bench.layouts import (
    OFFICIAL_FORMAT,
    finalize,
    format_record,
    image_format,
    image_suffix,
    relpath,
    save_kwargs,
)
from varbench.bench.prompts import Prompt, apply_rewrites, load_rewrites
from varbench.errors import UserError

# libjpeg's (IJG) standard luminance quantisation table, natural order; cv2.imwrite and PIL both scale it by quality
IJG_LUMA = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
            14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
            49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]


def test_official_format_defaults_and_overrides():
    assert [image_format({"layout": b})[0] for b in ("geneval", "imagereward", "hpsv2", "dpg", "mjhq", "flat")] == \
        ["jpg", "jpg", "jpg", "png", "png", "png"]
    assert image_format({"layout": "geneval"}) == ("jpg", 95)
    assert image_format({"layout": "geneval", "image_format": "png"}) == ("png", None)
    assert image_format({"layout": "mjhq", "image_format": "JPEG", "jpg_quality": 90}) == ("jpg", 90)
    assert image_suffix({"layout": "imagereward"}) == ".jpg" and image_suffix({"layout": "dpg"}) == ".png"
    assert save_kwargs({"layout": "geneval"}) == {"format": "JPEG", "quality": 95}
    assert save_kwargs({"layout": "geneval", "image_format": "png"}) == {"format": "PNG"}
    assert format_record({"layout": "geneval"}) == {"image_format": "jpg", "jpg_quality": 95}
    for bad in ({"layout": "flat", "image_format": "gif"}, {"layout": "geneval", "jpg_quality": 0},
                {"layout": "geneval", "jpg_quality": 95.5}, {"layout": "hpsv2", "image_format": "png"}):
        with pytest.raises(UserError) as e:
            image_format(bad)
        assert "\n" not in str(e.value)


def test_bench_yamls_state_the_official_format():
    from conftest import REPO
    from omegaconf import OmegaConf

    for b in ("geneval", "imagereward", "hpsv2", "dpg", "mjhq"):
        cfg = OmegaConf.to_container(OmegaConf.load(REPO / f"conf/bench/{b}.yaml"))
        assert cfg["image_format"] == OFFICIAL_FORMAT[cfg["layout"]]
        assert image_format(cfg) == (("jpg", 95) if cfg["image_format"] == "jpg" else ("png", None))


def test_relpaths_follow_the_official_scripts():
    assert relpath("geneval", "00007", 7, 3, 4) == "00007/samples/00003.jpg"          # Infinity: f"{i:05}.jpg"
    assert relpath("geneval", "00007", 7, 3, 4, "png") == "00007/samples/00003.png"   # GenEval: f"{n:05}.png"
    assert relpath("imagereward", "000123", 0, 9, 10) == "000123/000123_9.jpg"        # f"{prompt_id}_{i}.jpg"
    assert relpath("hpsv2", "anime/00012", 12, 0, 1) == "anime/00012.jpg"
    assert relpath("mjhq", "food/abc", 0, 0, 1) == "food/abc.png"
    assert relpath("mjhq", "food/abc", 0, 0, 1, ".jpg") == "food/abc.jpg"
    assert relpath("dpg", "12", 0, 2, 4, "jpg") == "tiles/12_2.png"                   # tiles stay lossless


def test_jpeg_quality_95_uses_the_ijg_tables_scaled_like_cv2(tmp_path):
    """cv2.imwrite(.jpg) = libjpeg at quality 95: table = max(1, (t * (200 - 2q) + 50) // 100). PIL with
    save_kwargs writes the same tables (and 4:2:0 subsampling, cv2's default)."""
    arr = (np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.jpg", **save_kwargs({"layout": "geneval"}))
    with Image.open(tmp_path / "a.jpg") as im:
        from PIL import JpegImagePlugin

        luma = list(im.quantization[0])
        assert JpegImagePlugin.get_sampling(im) == 2                     # 4:2:0
    assert luma == [max(1, (t * 10 + 50) // 100) for t in IJG_LUMA]     # quality 95 -> scale 10%


def test_imagereward_metadata_is_what_cal_imagereward_reads(tmp_path):
    """Infinity's cal_imagereward.py: json.load(meta_file) -> list; per entry meta['prompt'] and
    meta['gen_image_paths'] (opened as written)."""
    items = [{"id": "000001", "prompt": "a cat", "extra": 1}, {"id": "000002", "prompt": "a dog"}]
    prompts = [Prompt(i, it["prompt"], it["id"], it) for i, it in enumerate(items)]
    for p in prompts:
        for k in range(3):
            f = tmp_path / relpath("imagereward", p.key, p.index, k, 3)
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(f, **save_kwargs({"layout": "imagereward"}))
    finalize("imagereward", tmp_path, prompts, 3)
    meta = json.loads((tmp_path / "metadata.jsonl").read_text())
    assert [m["prompt"] for m in meta] == ["a cat", "a dog"] and meta[0]["extra"] == 1
    for m in meta:
        assert [p.rsplit("/", 1)[1] for p in m["gen_image_paths"]] == [f"{m['id']}_{k}.jpg" for k in range(3)]
        assert all(Image.open(p).size == (8, 8) for p in m["gen_image_paths"])


def test_dpg_grid_takes_the_run_format(tmp_path):
    p = Prompt(0, "x", "5")
    for k in range(4):
        f = tmp_path / relpath("dpg", "5", 0, k, 4)
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (60 * k, 0, 0)).save(f)
    finalize("dpg", tmp_path, [p], 4, fmt="jpg")
    with Image.open(tmp_path / "5.jpg") as im:
        assert im.format == "JPEG" and im.size == (16, 16)


def test_rewrite_prompts_from_a_user_file(tmp_path):
    f = tmp_path / "prompt_rewrite_cache.json"
    f.write_text(json.dumps({"a photo of a cat": "A photo of a fluffy cat on a sofa, warm light",
                             "a photo of a dog": "<prompt:A photo of a dog in a park><cfg:3>"}))
    ps = [Prompt(0, "a photo of a cat", "00000", {"prompt": "a photo of a cat", "tag": "single_object"}),
          Prompt(1, "a photo of a dog", "00001", {"prompt": "a photo of a dog", "tag": "single_object"})]
    assert apply_rewrites({"rewrite_prompts": False, "rewrite_prompts_file": str(f)}, ps) == ps
    out = apply_rewrites({"rewrite_prompts": True, "rewrite_prompts_file": str(f)}, ps)
    assert [p.prompt for p in out] == ["A photo of a fluffy cat on a sofa, warm light", "A photo of a dog in a park"]
    assert [p.original for p in out] == ["a photo of a cat", "a photo of a dog"]
    assert [p.meta["prompt"] for p in out] == ["a photo of a cat", "a photo of a dog"]   # scorers read the original
    (tmp_path / "00000").mkdir()
    finalize("geneval", tmp_path, out[:1], 4)
    assert json.loads((tmp_path / "00000/metadata.jsonl").read_text())["prompt"] == "a photo of a cat"


def test_rewrite_file_errors_are_one_line_naming_the_file(tmp_path):
    ps = [Prompt(0, "a photo of a cat", "00000")]
    for bench, needle in (({"rewrite_prompts": True, "rewrite_prompts_file": str(tmp_path / "nope.json")}, "nope.json"),
                          ({"rewrite_prompts": True}, "rewrite_prompts_file")):
        with pytest.raises(UserError) as e:
            apply_rewrites(bench, ps)
        assert needle in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "other.json").write_text(json.dumps({"a photo of a dog": "x"}))
    with pytest.raises(UserError, match="not in .*other.json"):
        apply_rewrites({"rewrite_prompts": True, "rewrite_prompts_file": str(tmp_path / "other.json")}, ps)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="bad.json"):
        load_rewrites(tmp_path / "bad.json")
