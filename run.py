"""varbench entry point: ``python run.py model=<m> method=<x> bench=<b> [key=value ...]`` (Hydra).

Everything happens in ``varbench.harness.runner.run``; this file only composes the config and turns user errors
(unknown names, missing weights, bad values) into one line on stderr and exit code 2.
"""
import re
import sys

import hydra
from omegaconf import DictConfig, OmegaConf


def _tag(override_dirname: str) -> str:
    """Run-directory leaf from the overrides that are not model/method/bench ('default' when none)."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", override_dirname)[:120] or "default"


OmegaConf.register_new_resolver("tag", _tag, replace=True)
from varbench.harness.registry import register_configs  # noqa: E402

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from pathlib import Path

    from varbench.errors import UserError

    try:
        from varbench.harness.runner import run

        plain = OmegaConf.to_container(cfg, resolve=True)
        return run(plain, Path(HydraConfig.get().runtime.output_dir))
    except UserError as e:
        print(f"varbench: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
