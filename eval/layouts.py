"""Image file layouts of each benchmark, so that the official scorers can read our output unchanged.

  flat         <i:05d>.png
  geneval      <prompt index:05d>/metadata.jsonl + <prompt index:05d>/samples/<k:04d>.png   (djghosh13/geneval)
  dpg          tiles/<item_id>_<k>.png, then the 2x2 grid <item_id>.png the DPG scorer reads    (ELLA dpg_bench)
  imagereward  <prompt id>/<k>.png                                                           (Infinity eval)
  hpsv2        <style>/<idx:05d>.jpg (the HPS scorer reads jpg only; JPEG quality 95 = cv2's default)
  mjhq         <category>/<id>.png                                                           (FastVAR's script)
"""
from __future__ import annotations

import json
from pathlib import Path


def relpath(layout: str, key: str, index: int, k: int, n_per: int) -> str:
    if layout == "flat":
        return f"{index * n_per + k:05d}.png" if n_per > 1 else f"{index:05d}.png"
    if layout == "geneval":
        return f"{key}/samples/{k:04d}.png"
    if layout == "dpg":
        return f"tiles/{key}_{k}.png"
    if layout == "imagereward":
        return f"{key}/{k}.png"
    if layout == "hpsv2":
        return f"{key}.jpg"
    if layout == "mjhq":
        return f"{key}.png"
    raise ValueError(f"unknown layout {layout!r}")


def finalize(layout: str, image_dir: Path, prompts, n_per: int) -> None:
    """Write what the official scorer expects besides the images (GenEval metadata, DPG grids)."""
    if layout == "geneval":
        for p in prompts:
            d = image_dir / p.key
            if d.exists():
                (d / "metadata.jsonl").write_text(json.dumps(p.meta) + "\n")
    elif layout == "dpg":
        from PIL import Image

        for p in prompts:
            tiles = [image_dir / relpath("dpg", p.key, p.index, k, n_per) for k in range(n_per)]
            out = image_dir / f"{p.key}.png"
            if out.exists() or not all(t.exists() for t in tiles):
                continue
            ims = [Image.open(t).convert("RGB") for t in tiles]
            R = ims[0].width
            grid = Image.new("RGB", (2 * R, 2 * R))
            for k, im in enumerate(ims[:4]):
                grid.paste(im, ((k % 2) * R, (k // 2) * R))
            tmp = out.with_name(out.name + ".tmp")
            grid.save(tmp, format="PNG")
            tmp.replace(out)
