"""ShapesEval: a procedural world of flat-coloured shapes with GenEval-like prompts, and an exact scorer."""
