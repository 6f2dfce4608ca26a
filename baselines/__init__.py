"""The methods NOVA is compared with, one file each. A new method is a class + ``conf/method/<name>.yaml`` + one line here."""
METHODS = {  # method family -> "module:Class" (imported lazily by varbench.harness.registry)
    "fastvar": "baselines.fastvar:FastVAR",
    "skipvar": "baselines.skipvar:SkipVAR",
    "sparsevar": "baselines.sparsevar:SparseVAR",
    "sparsevar_lvar": "baselines.sparsevar_lvar:SparseVARLvar",
    "scalekv": "baselines.scalekv:ScaleKV",
    "sparvar": "baselines.sparvar:SparVAR",
    "toprovar": "baselines.toprovar:ToProVAR",
}
