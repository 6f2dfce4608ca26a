"""Backbone families: name -> "module:builder" (imported lazily). A new family is one line here."""
BACKBONES = {
    "infinity": "varbench.backbones.infinity.load:build_infinity",
    "hart": "varbench.backbones.hart.load:build_hart",
    "var": "varbench.backbones.var.load:build_var",
}
