"""Mutation check for NOVA (issue 12): run the NOVA tests against deliberately wrong NOVAs.

Each mutant replaces one attribute of ``nova.method`` (a module function or a ``Nova`` method) with a wrong version
written HERE; the library is never edited. Every mutant runs in its own pytest process: the patch is applied when
pytest configures (before the test modules import ``nova.method``), then the tests run. The table says which tests
each mutant fails; a mutant that fails none "survives" and the script exits 1.

    python scripts/nova_mutants.py                 # tests/test_nova_mutants.py + the unit tests of tests/test_nova.py
    python scripts/nova_mutants.py --all           # also test_nova.py's in-loop tests (slow)
    python scripts/nova_mutants.py --only keep_lowest_entropy
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).absolute().parents[1]
sys.path.insert(0, str(REPO))

import nova.method as nm  # noqa: E402
from varbench.tokens import Selection  # noqa: E402


# ------------------------------------------------------------------ the wrong NOVAs
def _no_moving_average(H, t_est, alpha, eta_nonpositive="literal"):
    """Eq. 10 on g_t itself instead of (g_t + g_{t-1})/2."""
    if len(H) < t_est + 1:
        return None
    eta = nm.early_baseline(H, t_est)
    if eta <= 0 and eta_nonpositive == "never":
        return None
    if eta <= 0 and eta_nonpositive == "activate_immediately":
        return t_est + 1
    g = nm.growth_rates(H)
    return next((t for t in range(t_est + 1, len(H) + 1) if g[t - 1] <= alpha * eta), None)


def _keep_lowest(self, score, k):
    return Selection.top_k(-score, k)


def _g_lag_2(self):
    H = self.H
    return H[-2] - H[-3] if len(H) >= 3 else 0.0


def _cond_maps(self, lc, lu, lg, spec):
    """Statistics and ranking from the raw cond logits whatever entropy_branch says."""
    e = self._entropy(lc, spec.head_type, spec.head_dim_out)[:1]
    return e, e


_entropy = nm.Nova._entropy


def _mean_bit(self, logits, head_type, d):
    e = _entropy(self, logits, head_type, d)
    return e / d if head_type == "bitwise" and self.cfg.entropy_reduction == "sum" else e


_maps = nm.Nova._maps


def _per_row_maps(self, lc, lu, lg, spec):
    """Each CFG row ranked by its own branch entropy although cfg_index_mode is shared."""
    stat, rank = _maps(self, lc, lu, lg, spec)
    if lu is None:
        return stat, rank
    ent = lambda x: self._entropy(x.mul(self._inv_tau), spec.head_type, spec.head_dim_out)  # noqa: E731
    return stat, torch.cat([ent(lc), ent(lu)], 0)


def _cache_only_active(self, si):
    return self._active(si)


def _clip_after_layer_only(r_t, layer_means, r_max=1.0, clip_scale_ratio="before_layer"):
    return nm.clip_ratio(nm.layer_ratio(r_t, layer_means), r_max)


_layer_ratio = nm.Nova._layer_ratio


def _kept_without_min_keep(self, n, r):
    return nm.keep_count(n, r, self.cfg.r_max)


def _override_raw(self, si):
    """ratio_override recorded and applied as given, whatever r_max says."""
    return self.cfg.ratio_override if self.cfg.ratio_override is not None else _layer_ratio(self, si)


def _kept_without_r_max(self, n, r):
    return nm.keep_count(n, r, 1.0, self.cfg.min_keep)


_token_entropy = nm.token_entropy


def _categorical_in_bits(logits, head_type):
    e = _token_entropy(logits, head_type)
    return e / math.log(2) if head_type == "categorical" else e


MUTANTS = {  # name -> [(owner, attribute, replacement)]
    "no_moving_average_eq10": [(nm, "detect_inflection", _no_moving_average)],
    "keep_lowest_entropy": [(nm.Nova, "_keep", _keep_lowest)],
    "eq11_uses_g_t_minus_2": [(nm.Nova, "_growth_for_ratio", _g_lag_2)],
    "cond_entropy_not_guided": [(nm.Nova, "_maps", _cond_maps)],
    "per_bit_mean_not_sum": [(nm.Nova, "_entropy", _mean_bit)],
    "separate_kept_sets_per_cfg_row": [(nm.Nova, "_maps", _per_row_maps)],
    "cache_only_at_active_scales": [(nm.Nova, "_records_cache", _cache_only_active)],
    "clip_ratio_t_after_layer_only": [(nm, "linked_layer_ratio", _clip_after_layer_only)],
    # issue 25 item 5
    "min_keep_not_applied": [(nm.Nova, "_kept", _kept_without_min_keep)],
    "ratio_override_not_capped": [(nm.Nova, "_layer_ratio", _override_raw), (nm.Nova, "_kept", _kept_without_r_max)],
    "ratio_override_recorded_uncapped": [(nm.Nova, "_layer_ratio", _override_raw)],
    "categorical_entropy_in_bits": [(nm, "token_entropy", _categorical_in_bits)],
    # issue 25 item 4 (killed by test_nova.py's in-loop tests: run with --all)
    "batches_as_if_rectangular": [(nm.Nova, "batch_rectangular", True)],
}


# ------------------------------------------------------------------ pytest plugin (runs inside the child process)
class _Plugin:
    def __init__(self, mutant: str | None, all_tests: bool, report: Path):
        self.mutant, self.all, self.report, self.failed, self.passed = mutant, all_tests, report, [], []

    def pytest_configure(self, config):
        for owner, attr, new in MUTANTS.get(self.mutant, []):
            setattr(owner, attr, new)

    def pytest_collection_modifyitems(self, config, items):
        if self.all:
            return
        keep, drop = [], []
        for it in items:  # test_nova.py: only the tests without a generation (no backbone fixture)
            slow = it.path.name == "test_nova.py" and {"tiny_backbone", "hot_backbone"} & set(it.fixturenames)
            (drop if slow else keep).append(it)
        items[:] = keep
        config.hook.pytest_deselected(items=drop)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome == "failed":
            name = report.nodeid.split("::", 1)[-1]
            (self.failed if report.outcome == "failed" else self.passed).append(name)

    def pytest_sessionfinish(self, session):
        self.report.write_text(json.dumps({"failed": sorted(set(self.failed)), "passed": len(self.passed)}))


def _child(mutant: str | None, all_tests: bool, report: Path) -> int:
    import pytest

    os.chdir(REPO)
    return pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_nova_mutants.py", "tests/test_nova.py"],
                       plugins=[_Plugin(mutant, all_tests, report)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="also run test_nova.py's in-loop tests")
    ap.add_argument("--only", nargs="*", help="mutant names (default: all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        return _child(a.child or None, a.all, Path(a.report))
    names = [""] + (a.only or list(MUTANTS))
    rows, survived = [], []
    for name in names:
        with tempfile.TemporaryDirectory() as d:
            rep = Path(d) / "r.json"
            cmd = [sys.executable, __file__, "--child", name, "--report", str(rep)] + (["--all"] if a.all else [])
            subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            r = json.loads(rep.read_text()) if rep.exists() else {"failed": ["<no report: the run crashed>"], "passed": 0}
        label = name or "(none: the library as is)"
        rows.append((label, r["failed"], r["passed"]))
        print(f"{label:34s} {len(r['failed']):2d} failed, {r['passed']:2d} passed", flush=True)
        if name and not r["failed"]:
            survived.append(name)
    print("\n| mutant | killing tests |\n|---|---|")
    for label, failed, _ in rows:
        print(f"| {label} | {', '.join(failed) if failed else 'NONE (survives)' if label[0] != '(' else '— (all pass)'} |")
    if rows and rows[0][1] and not a.only:
        print("the unmutated library fails tests: the table is meaningless", file=sys.stderr)
        return 1
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
