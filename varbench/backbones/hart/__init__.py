"""HART (mit-han-lab/hart) as a loop backbone: transformer (``model.py``), residual diffusion head
(``diffusion.py``), VQ tokenizer decode path (``vae.py``), text encoders (``text.py``), loop parts
(``backbone.py``) and building from a model config (``load.py``). Spec: ``shared/specs/hart_var.md`` Part A."""
