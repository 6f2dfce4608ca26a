"""Every module of the project's packages imports in the installed environment: a third-party import that
pyproject.toml does not declare fails here (CI installs exactly the declared dependencies into a fresh venv)."""
import importlib
import pkgutil

import pytest
from conftest import REPO

PACKAGES = ("varbench", "nova", "baselines", "eval")


def _modules():
    out = []
    for pkg in PACKAGES:
        out.append(pkg)
        for m in pkgutil.walk_packages([str(REPO / pkg)], prefix=pkg + "."):
            out.append(m.name)
    return out


@pytest.mark.parametrize("name", _modules())
def test_module_imports(name):
    importlib.import_module(name)


# import name -> distribution, for names whose distribution is not installed here (optional backends)
OPTIONAL = {"modelscope": "modelscope (DPG-Bench's official mPLUG VQA; asked for in a one-line error)"}
# needed at run time by a library we call, without an import of ours naming it
INDIRECT = {"scipy": "transformers' Mask2Former (GenEval detector) imports it when the model is built"}


def _declared() -> set[str]:
    import re

    import tomllib

    proj = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(proj.get("dependencies", [])) + [r for v in proj.get("optional-dependencies", {}).values() for r in v]
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in reqs}


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module names imported anywhere (module level or inside functions) in the packages."""
    import ast
    import sys

    local = set(PACKAGES) | {p.stem for p in REPO.glob("*.py")}
    found: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for f in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for n in names:
                    top = n.split(".")[0]
                    if top not in local and top not in sys.stdlib_module_names:
                        found.setdefault(top, set()).add(str(f.relative_to(REPO)))
    return found


def test_every_third_party_import_is_declared():
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    declared = _declared()
    undeclared = {}
    for top, files in _third_party_imports().items():
        if top in OPTIONAL:
            continue
        names = {d.lower().replace("_", "-") for d in dists.get(top, [])} or {top.lower().replace("_", "-")}
        if not names & declared:
            undeclared[top] = (sorted(names) or ["not installed"], sorted(files)[:3])
    undeclared.update({k: ("indirect", v) for k, v in INDIRECT.items() if k not in declared})
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
