"""The plug-in entry points in pyproject.toml are generated from the tables beside the plug-ins; both agree, and the
installed metadata (what the registry reads) has them."""
import importlib.util

import pytest
from conftest import REPO

from varbench.harness import registry


def _script():
    spec = importlib.util.spec_from_file_location("entry_points", REPO / "scripts/entry_points.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pyproject_entry_points_agree_with_the_tables():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    ep = _script()
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    assert {g: declared.get(g) for g in ep.tables()} == ep.tables(), "run: python scripts/entry_points.py --write"
    assert ep.main([]) == 0


def test_the_check_fails_when_a_table_gains_a_line(monkeypatch, capsys):
    ep = _script()
    monkeypatch.setitem(ep.baselines.METHODS, "brand_new", "baselines.brand_new:BrandNew")
    assert ep.main([]) == 1
    assert '+"brand_new" = "baselines.brand_new:BrandNew"' in capsys.readouterr().out


def test_the_registry_reads_the_installed_entry_points_and_they_are_current():
    """Every name the tables declare resolves through importlib.metadata (a stale install fails here: pip install -e .)."""
    tables = _script().tables()
    kinds = {v: k for k, v in registry.GROUPS.items()}
    for group, table in tables.items():
        assert set(table) <= set(registry.names(kinds[group])), f"{group}: reinstall (pip install -e .)"
        for name, target in table.items():
            obj = registry.load(kinds[group], name)
            assert f"{obj.__module__}:{obj.__name__}" == target


def test_a_name_declared_but_not_installed_says_how_to_fix_it(monkeypatch):
    from varbench.errors import UserError

    monkeypatch.setattr(registry, "_declared_in_checkout", lambda group, name: True)
    with pytest.raises(UserError, match=r"declared in .*pyproject.toml but not installed: run `pip install -e \.`"):
        registry.method_class("not_installed_anywhere")
