"""Every config composes; every experiment names configs that exist; method yamls only override their schema."""
import pytest
from conftest import REPO, compose
from omegaconf import OmegaConf

from varbench.harness.registry import build_method, method_class

GROUP = {g: sorted(p.stem for p in (REPO / "conf" / g).glob("*.yaml")) for g in ("model", "method", "bench", "experiment")}


@pytest.mark.parametrize("name", GROUP["method"])
def test_method_configs_compose_build_and_only_override_their_schema(name):
    cfg = compose(f"method={name}")["method"]
    m = build_method(cfg)
    defaults = method_class(cfg["family"]).Config()
    raw = OmegaConf.to_container(OmegaConf.load(REPO / "conf/method" / f"{name}.yaml"))
    if raw.get("defaults", [None])[0] == f"_{cfg['family']}":   # directly on the schema: only overrides allowed
        for k, v in raw.items():  # a yaml value equal to the dataclass default would be a second source of truth
            if k not in ("defaults", "name"):
                assert v != getattr(defaults, k, object()), f"{name}.yaml repeats the default of {k}"
    assert m.name == name


@pytest.mark.parametrize("name", GROUP["model"] + GROUP["bench"])
def test_model_and_bench_configs_compose(name):
    group = "model" if name in GROUP["model"] else "bench"
    cfg = compose(f"{group}={name}")
    assert cfg[group]["name"] == name


@pytest.mark.parametrize("name", GROUP["experiment"])
def test_experiments_sweep_over_existing_configs(name):
    raw = OmegaConf.load(REPO / "conf/experiment" / f"{name}.yaml")
    for d in raw.defaults:
        (k, v), = d.items()
        assert v in GROUP[k.split("/")[-1]], (name, k, v)
    params = raw.hydra.sweeper.params
    for group, values in params.items():
        for v in str(values).split(","):
            missing = v.strip() not in GROUP[group]
            if missing and v.strip() in ("fastvar_hart",) and "hart_0.7b" not in GROUP["model"]:
                pytest.skip("HART configs not present yet")
            assert not missing, (name, group, v)


def test_a_derived_config_replaces_a_schedule_instead_of_merging_it():
    """Hydra merges dicts: a dict default in a schema leaked the 2B widths {32, 40} into fastvar_hart (seen failing)."""
    from varbench.harness.registry import build_method

    assert build_method(compose("method=fastvar")["method"]).cfg.prune_ratios == {32: 0.4, 40: 0.5}
    if (REPO / "conf/method/fastvar_hart.yaml").exists():
        assert build_method(compose("method=fastvar_hart")["method"]).cfg.prune_ratios == {48: 0.5, 64: 0.75}
    assert build_method(compose("method=fastvar", "method.prune_ratios={32:0.9}")["method"]).cfg.prune_ratios == {32: 0.9}
    assert build_method(compose("method=sparsevar", "method.ratios={64:0.1}")["method"]).cfg.ratios == {64: 0.1}
    m = build_method(compose("method=nova", "method.fixed_ratios={64:0.1}", "method.scale_linkage=false")["method"])
    assert m.cfg.fixed_ratios == {64: 0.1}


def test_readme_methods_table_is_what_list_methods_prints():
    """The README says its methods table is printed from the code "so it cannot drift": hold it to that (it had
    drifted: the VAR configs were missing)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "scripts/list_methods.py"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    printed = [ln for ln in r.stdout.splitlines() if ln.startswith("|")]
    lines = (REPO / "README.md").read_text().splitlines()
    i = lines.index(printed[0])
    assert lines[i:i + len(printed)] == printed and not lines[i + len(printed)].startswith("|"), \
        "README's methods table differs from `python scripts/list_methods.py`: paste its output"
