"""Scorers and results. ``METRICS``: metric name (listed in a bench's ``metrics``) -> "module:function" (lazy)."""
METRICS = {
    "geneval": "eval.geneval.scorer:run",
    "dpg": "eval.dpg:run",
    "mjhq": "eval.mjhq:run",
    "hpsv2": "eval.hpsv2:run",
    "imagereward": "eval.imagereward:run",
    "shapes": "eval.shapes.scorer:run",
}
