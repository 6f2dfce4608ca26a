"""Benchmarks as the harness sees them: prompts (``prompts``: the ``Prompt`` item every prompt source yields, prompt
rewriting) and the official image file layouts (``layouts``). The prompt sources themselves are plug-ins
(``eval/datasets.py``), found through the ``varbench.sources`` entry points."""
