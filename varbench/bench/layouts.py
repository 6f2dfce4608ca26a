"""Image file layouts and formats of each benchmark, so that the official scorers can read our output unchanged.

  layout       files (ext = the run's image format)                                          read by
  flat         <i:05d>.<ext>
  geneval      <prompt index:05d>/metadata.jsonl + <prompt index:05d>/samples/<k:05d>.<ext>  djghosh13/geneval (png
               only) and Infinity/FastVAR's fork of its evaluate_images.py (png or jpg)
  dpg          tiles/<item_id>_<k>.png (lossless), then the 2x2 grid <item_id>.<ext>           ELLA dpg_bench
  imagereward  <prompt id>/<prompt id>_<k>.<ext> + metadata.jsonl (a JSON list: each prompt     Infinity/FastVAR
               entry of benchmark-prompts.json plus ``gen_image_paths``)                       evaluation/image_reward
  hpsv2        <style>/<idx:05d>.jpg (the HPS scorer reads jpg only)                          Infinity eval_hpsv2.py
  mjhq         <category>/<id>.<ext>                                                           clean-fid (any ext)
  imagenet     s<k:04d>_c<class:04d>.png (flat) + samples.npz (arr_0 uint8 NHWC in item      ADM evaluator
               order, arr_1 labels) once every image exists                                   (guided-diffusion)

Image format (``bench.image_format``: png | jpg, ``bench.jpg_quality``): each benchmark's default is what the scripts
that produced the published numbers save. Infinity/FastVAR's ``evaluation/gen_eval/infer4eval.py``,
``evaluation/image_reward/infer4eval.py`` and ``evaluation/hpsv2/eval_hpsv2.py`` write ``.jpg`` with
``cv2.imwrite`` and no quality flag (OpenCV's default JPEG quality is 95); FastVAR's ``mjhq30k_fid_clip.py`` writes
``.png``; DPG-Bench's scorer reads any file (ELLA documents ``<item_id>.png`` grids).
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from varbench.errors import UserError

OFFICIAL_FORMAT = {"geneval": "jpg", "imagereward": "jpg", "hpsv2": "jpg", "dpg": "png", "mjhq": "png", "flat": "png",
                   "imagenet": "png"}
FORMATS = ("png", "jpg")
DEFAULT_JPG_QUALITY = 95   # cv2.imwrite's default IMWRITE_JPEG_QUALITY


def image_format(bench: dict) -> tuple[str, int | None]:
    """(format, jpeg quality or None) of a bench: ``image_format`` (png | jpg; null = the benchmark's official
    default) and ``jpg_quality`` (1..100, default 95). One-line UserError on a bad value."""
    layout = bench.get("layout", "flat")
    fmt = bench.get("image_format") or OFFICIAL_FORMAT.get(layout, "png")
    fmt = "jpg" if str(fmt).lower() == "jpeg" else str(fmt).lower()
    if fmt not in FORMATS:
        raise UserError(f"bench.image_format must be png or jpg, got {bench.get('image_format')!r}")
    if layout == "hpsv2" and fmt != "jpg":
        raise UserError("bench.image_format=png is not possible for hpsv2: the HPSv2 scorer reads only .jpg files")
    if layout == "imagenet" and fmt != "png":
        raise UserError("bench.image_format=jpg is not possible for imagenet: VAR's protocol saves PNG (a JPEG round "
                        "trip changes the Inception features)")
    if fmt == "png":
        return fmt, None
    q = bench.get("jpg_quality")
    q = DEFAULT_JPG_QUALITY if q is None else q
    if not isinstance(q, int) or isinstance(q, bool) or not 1 <= q <= 100:
        raise UserError(f"bench.jpg_quality must be an integer in 1..100, got {q!r}")
    return fmt, q


def image_suffix(bench: dict) -> str:
    """".png" or ".jpg": the suffix ``relpath`` gives the images of this bench."""
    return "." + image_format(bench)[0]


def save_kwargs(bench: dict) -> dict:
    """Keyword arguments for ``PIL.Image.save`` of this bench's images: {"format": "PNG"} or
    {"format": "JPEG", "quality": q} (PIL's defaults otherwise: 4:2:0 chroma subsampling, as cv2.imwrite)."""
    fmt, q = image_format(bench)
    return {"format": "PNG"} if fmt == "png" else {"format": "JPEG", "quality": q}


def format_record(bench: dict) -> dict:
    """What a run records about its image files (meta.json / result rows)."""
    fmt, q = image_format(bench)
    return {"image_format": fmt, "jpg_quality": q}


def _ext(layout: str, fmt: str | None) -> str:
    fmt = (fmt or OFFICIAL_FORMAT.get(layout, "png")).lstrip(".").lower()
    return "jpg" if fmt == "jpeg" else fmt


def relpath(layout: str, key: str, index: int, k: int, n_per: int, fmt: str | None = None) -> str:
    """Path of image k of a prompt, relative to the run's image folder. ``fmt``: "png"/"jpg" (or the suffix);
    None = the layout's official format."""
    ext = _ext(layout, fmt)
    if layout == "flat":
        return f"{index * n_per + k:05d}.{ext}" if n_per > 1 else f"{index:05d}.{ext}"
    if layout == "geneval":
        return f"{key}/samples/{k:05d}.{ext}"
    if layout == "dpg":
        return f"tiles/{key}_{k}.png"          # tiles stay lossless; the grid gets the run's format
    if layout == "imagereward":
        return f"{key}/{key}_{k}.{ext}"
    if layout == "hpsv2":
        return f"{key}.jpg"
    if layout in ("mjhq", "imagenet"):
        return f"{key}.{ext}"
    raise ValueError(f"unknown layout {layout!r}")


def _atomic_save(im, out: Path, kwargs: dict) -> None:
    tmp = out.with_name(out.name + ".tmp")
    im.save(tmp, **kwargs)
    tmp.replace(out)


def derived_files(layout: str, prompts, bench: dict) -> list[str]:
    """Image files ``finalize`` makes from a run's items (relative paths): DPG's 2x2 grids."""
    if layout != "dpg":
        return []
    return [f"{p.key}.{_ext(layout, image_format(bench)[0])}" for p in prompts]


def finalize(layout: str, image_dir: Path, prompts, n_per: int, fmt: str | None = None,
             jpg_quality: int = DEFAULT_JPG_QUALITY) -> None:
    """Write what the official scorer expects besides the images (GenEval metadata, DPG grids, ImageReward's
    metadata.jsonl)."""
    image_dir = Path(image_dir)
    if layout == "geneval":
        for p in prompts:
            d = image_dir / p.key
            if d.exists():
                (d / "metadata.jsonl").write_text(json.dumps(p.meta) + "\n")
    elif layout == "dpg":
        from PIL import Image

        ext = _ext(layout, fmt)
        kwargs = {"format": "PNG"} if ext == "png" else {"format": "JPEG", "quality": jpg_quality}
        for p in prompts:
            tiles = [image_dir / relpath("dpg", p.key, p.index, k, n_per) for k in range(n_per)]
            out = image_dir / f"{p.key}.{ext}"
            if out.exists() or not all(t.exists() for t in tiles):
                continue
            ims = [Image.open(t).convert("RGB") for t in tiles]
            R = ims[0].width
            grid = Image.new("RGB", (2 * R, 2 * R))
            for k, im in enumerate(ims[:4]):
                grid.paste(im, ((k % 2) * R, (k // 2) * R))
            _atomic_save(grid, out, kwargs)
    elif layout == "imagereward":
        # Infinity's infer4eval.py: a JSON list (json.dump, despite the .jsonl name) of the prompt entries, each with
        # ``gen_image_paths``; cal_imagereward.py --meta_file <this> opens those paths as written (absolute here, so
        # it runs from any working directory) and scores meta["prompt"].
        entries = []
        for p in prompts:
            paths = [image_dir / relpath("imagereward", p.key, p.index, k, n_per, fmt) for k in range(n_per)]
            paths = [str(x.resolve()) for x in paths if x.exists()]
            if paths:
                entries.append({**(p.meta or {"id": p.key, "prompt": p.prompt}), "gen_image_paths": paths})
        if entries:
            tmp = image_dir / "metadata.jsonl.tmp"
            tmp.write_text(json.dumps(entries))
            tmp.replace(image_dir / "metadata.jsonl")
    elif layout == "imagenet":
        files = [image_dir / relpath("imagenet", p.key, p.index, k, n_per) for p in prompts for k in range(n_per)]
        if files and all(f.exists() for f in files):
            write_imagenet_npz(files, image_dir / IMAGENET_NPZ)


# ------------------------------------------------------------------ the ImageNet sample batch (ADM evaluator input)
IMAGENET_NPZ = "samples.npz"
_IMAGENET_NAME = re.compile(r"s(\d+)_c(\d+)")


def imagenet_key(label: int, k: int) -> str:
    """File stem of sample k of a class: sorted names give the item order (k outer, class inner)."""
    return f"s{k:04d}_c{label:04d}"


def imagenet_order(image_dir: Path) -> tuple[list[Path], bool]:
    """The .png files of a folder (not recursive, as VAR's ``create_npz_from_sample_folder`` globs ``*.png``) in item
    order (sample k, then class) when every name is ``s<k>_c<class>``, else in sorted name order; and which it was."""
    files = sorted(p for p in Path(image_dir).glob("*.png") if p.is_file())
    keys = [_IMAGENET_NAME.fullmatch(p.stem) for p in files]
    if files and all(keys):
        return [f for _, f in sorted(zip([(int(m[1]), int(m[2])) for m in keys], files))], True
    return files, False


def write_imagenet_npz(files: list[Path], out: Path) -> Path:
    """``np.savez``-compatible ``out`` with ``arr_0`` = the images, uint8 [N, H, W, 3] in the given order, and ``arr_1``
    = their labels (int64; -1 where a name carries none), streamed image by image (the 50K batch at 256 px is 9.8 GB).
    Skipped when ``out`` is newer than every image and holds as many; written atomically (per-process temp name)."""
    from PIL import Image

    files, out = [Path(f) for f in files], Path(out)
    if out.exists() and out.stat().st_mtime >= max(f.stat().st_mtime for f in files):
        try:
            with np.load(out) as z:
                if len(z["arr_1"]) == len(files):
                    return out
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass
    with Image.open(files[0]) as im:
        w, h = im.size
    labels = []
    for f in files:
        m = _IMAGENET_NAME.fullmatch(f.stem)
        labels.append(int(m[2]) if m else -1)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(files), h, w, 3)}
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("arr_0.npy", "w", force_zip64=True) as fp:
            np.lib.format.write_array_header_1_0(fp, header)
            for f in files:
                with Image.open(f) as im:
                    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
                if arr.shape != (h, w, 3):
                    tmp.unlink(missing_ok=True)
                    raise UserError(f"{f} is {arr.shape[1]}x{arr.shape[0]} px, the others {w}x{h}: one .npz batch "
                                    f"needs one image size")
                fp.write(arr.tobytes())
        with z.open("arr_1.npy", "w", force_zip64=True) as fp:
            np.lib.format.write_array(fp, np.asarray(labels, np.int64))
    tmp.replace(out)
    return out
