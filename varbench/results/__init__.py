"""What a run leaves and how it becomes numbers: the tidy rows store (``store``), tables (``tables``, ``paper``),
speed and fidelity metrics from a run's records and images (``speed``, ``fidelity``), contact sheets (``plots``),
the Weights & Biases mirror (``wandb_log``). Reads records and images; never loads a model."""
