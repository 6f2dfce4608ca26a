"""The import graph has layers (scripts/import_graph.py): no upward import, no cycle, no import hidden in a function."""
import importlib.util

from conftest import REPO


def _graph():
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts/import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_upward_imports_no_cycles_no_hidden_imports():
    _, problems = _graph().analyse()
    assert problems == []


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    g = _graph()
    assert g.layer("varbench.loop")[0] == 0 and g.layer("nova.method")[0] == 2
    assert g.layer("varbench.harness.runner")[0] == 3 and g.layer("varbench.backbones.infinity.model")[0] == 1
    bad = tmp_path / "varbench" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("import nova.method\n\ndef f():\n    from varbench.harness import runner\n")
    monkeypatch.setattr(g, "REPO", tmp_path)
    (tmp_path / "run.py").write_text("")
    (tmp_path / "scripts").mkdir()
    for pkg in ("nova", "baselines", "eval"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "nova" / "method.py").write_text("")
    _, problems = g.analyse()
    assert any("upward" in p for p in problems) and any("inside a function" in p for p in problems)


def test_varbench_folder_imports_no_plug_in_folder():
    """At the level of top folders, varbench/ (core, backbones, harness) never imports nova/, baselines/ or eval/."""
    edges = _graph().folder_edges()
    assert not [(s, d) for (s, d) in edges if s == "varbench/" and d in ("nova/", "baselines/", "eval/")], edges
    assert ("nova/", "varbench/") in edges and ("eval/", "varbench/") in edges


def test_the_checker_catches_the_harness_importing_a_plug_in(tmp_path, monkeypatch):
    g = _graph()
    (tmp_path / "varbench" / "harness").mkdir(parents=True)
    (tmp_path / "varbench" / "harness" / "reg.py").write_text("import baselines.fastvar\n")
    (tmp_path / "run.py").write_text("")
    (tmp_path / "scripts").mkdir()
    for pkg in ("nova", "baselines", "eval"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "baselines" / "fastvar.py").write_text("")
    monkeypatch.setattr(g, "REPO", tmp_path)
    _, problems = g.analyse()
    assert any("calls up into a plug-in folder" in p for p in problems), problems
