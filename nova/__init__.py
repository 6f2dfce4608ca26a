"""NOVA (arXiv 2602.01345): entropy-guided, dual-linkage token reduction. The method lives in ``nova/method.py``."""
METHODS = {  # method family -> "module:Class" (imported lazily by varbench.harness.registry)
    "nova": "nova.method:Nova",
}
