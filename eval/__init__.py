"""Scorers and prompt sources (plug-ins; the harness finds them through entry points generated from these tables).

``METRICS``: metric name (listed in a bench's ``metrics``) -> "module:function" ``run(bench, image_dir, out_dir,
device) -> {metric: value}``. ``PROMPT_SOURCES``: ``bench.source`` -> "module:function" ``(bench) -> list[Prompt]``.
"""
METRICS = {
    "geneval": "eval.geneval.scorer:run",
    "dpg": "eval.dpg:run",
    "mjhq": "eval.mjhq:run",
    "hpsv2": "eval.hpsv2:run",
    "imagereward": "eval.imagereward:run",
    "shapes": "eval.shapes.scorer:run",
    "imagenet": "eval.imagenet:run",
}

PROMPT_SOURCES = {
    "shapes": "eval.datasets:shapes",
    "geneval": "eval.datasets:geneval",
    "imagereward": "eval.datasets:imagereward",
    "dpg_bench": "eval.datasets:dpg_bench",
    "hpsv2": "eval.datasets:hpsv2",
    "mjhq30k": "eval.datasets:mjhq30k",
    "imagenet": "eval.imagenet:imagenet",
}
