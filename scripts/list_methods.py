"""Every method config with its class's own statement of status, citation and footnote (the README's table).

    python scripts/list_methods.py            # markdown
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from varbench.harness.registry import build_method, method_class, register_configs  # noqa: E402


def main() -> int:
    register_configs()
    print("| `method=` | family | status | footnote / source |")
    print("|---|---|---|---|")
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        for p in sorted((REPO / "conf/method").glob("*.yaml")):
            cfg = OmegaConf.to_container(compose("config", overrides=[f"method={p.stem}"]).method, resolve=True)
            m = build_method(cfg)
            cls = method_class(cfg["family"])
            fam = ", ".join(cls.FAMILIES) if cls.FAMILIES else "all"
            note = m.footnote() or cls.CITATION
            print(f"| `{p.stem}` | {cfg['family']} ({fam}) | {cls.STATUS} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
