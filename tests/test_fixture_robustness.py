"""The golden checks hold on every CPU (issue 11, defect 1), yet still fail on a real mismatch.

FastVAR keeps the top-K tokens of a score with near-ties: float noise of 1e-6 (another CPU, another torch build)
flips a kept token, and a free-running comparison then diverges. "Another machine" is simulated here by a relative
perturbation of 1e-6 of the residual stream the selection sees (x·(1 + 1e-6·N(0,1)), seeded): with seed 1 it flips
two kept SETS at si 9 (and the kept order in ~85 of 150 rows).
"""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, shared_path

from varbench.harness import fixtures
from varbench.tokens import Selection


class NoisySelection(fixtures.Recorder):
    """Forwards every hook to ``inner``; the selection sees the residual stream x·(1 + eps·N(0, 1)) (seeded)."""

    def __init__(self, inner, eps=1e-6, seed=1):
        super().__init__(inner)
        self.eps, self.gen = eps, torch.Generator().manual_seed(seed)

    @property
    def cache(self):  # FastVAR's branch caches, for the dbg_cache checks
        return self.inner.cache

    def select(self, lctx, x):
        return super().select(lctx, x * (1 + self.eps * torch.randn(x.shape, generator=self.gen, dtype=x.dtype)))


def _method(monkeypatch, make):
    orig = fixtures.method_from_meta
    monkeypatch.setattr(fixtures, "method_from_meta", lambda meta: make(orig(meta)))


def _fastvar_checks(**kw):
    return fixtures.check_infinity_fixture(shared_path("fixtures", "fastvar", "meta.json"), **kw)


def _failing(checks):
    return [c.name for c in checks if not c.ok]


@pytest.mark.slow
def test_fastvar_check_holds_with_1e6_noise_before_selection(monkeypatch):
    _method(monkeypatch, NoisySelection)
    checks = _fastvar_checks()
    assert all(c.ok for c in checks), fixtures.format_checks(checks)
    sel = [c for c in checks if "our selection on the teacher-forced" in c.name]
    assert len(sel) == 2 and sum(c.near_ties for c in sel) > 0  # the noise did flip choices; they were accepted
    assert "near-tie selection differences accepted" in fixtures.format_checks(checks).splitlines()[-1]


@pytest.mark.slow
def test_free_running_check_diverges_with_the_same_noise(monkeypatch):
    """The old check (our selection drives the run) is machine-dependent: the same 1e-6 noise makes it FAIL."""
    _method(monkeypatch, NoisySelection)
    bad = _failing(_fastvar_checks(teacher_forced_selection=False, sampled_bits=False))
    assert any(n.startswith("logits_cfg_s09") for n in bad), bad


def _fastvar(ratio32=0.4, cache_width=24, blocks=(3, 27)):
    from varbench.harness.registry import method_class

    FastVAR = method_class("fastvar")
    return FastVAR(FastVAR.Config(prune_ratios={32: ratio32, 40: 0.5}, skip_widths=[48, 64], blocks=list(blocks),
                                  cache_width=cache_width))


@pytest.mark.slow
def test_wrong_keep_ratio_fails(monkeypatch):
    _method(monkeypatch, lambda m: NoisySelection(_fastvar(ratio32=0.5)))
    checks = _fastvar_checks(sampled_bits=False)
    bad = _failing(checks)
    s09 = next(c for c in checks if c.name.startswith("kept_idx_s09 our selection on the teacher-forced"))
    assert s09.max_abs_diff == 150 and "K=512 (official 615)" in s09.name
    assert any(n.startswith("kv_cache_len block03") for n in bad) and any(n.startswith("logits_cfg_s09") for n in bad)


@pytest.mark.slow
def test_wrong_cache_width_fails(monkeypatch):
    _method(monkeypatch, lambda m: NoisySelection(_fastvar(cache_width=20)))
    bad = _failing(_fastvar_checks(sampled_bits=False))
    assert {"dbg_cache_b03_sa", "dbg_cache_b03_ca", "dbg_cache_b03_ffn"} <= set(bad), bad
    assert any(n.startswith("logits_cfg_s09") for n in bad)


@pytest.mark.slow
def test_wrong_kv_cache_size_fails(monkeypatch):
    """A backbone that caches one K/V entry too many at the pruned scales (615 and 800 kept tokens)."""
    from varbench.backbones.infinity import model

    orig = model.KVCache.append

    def append(self, k, v):
        if k.shape[2] in (615, 800):
            k, v = torch.cat((k, k[:, :, -1:]), 2), torch.cat((v, v[:, :, -1:]), 2)
        return orig(self, k, v)

    monkeypatch.setattr(model.KVCache, "append", append)
    bad = _failing(_fastvar_checks(sampled_bits=False))
    assert any(n.startswith("kv_cache_len block03") for n in bad), bad
    assert not any(n.startswith("kv_cache_len block00") for n in bad), bad


@pytest.mark.slow
def test_wrong_block_range_fails(monkeypatch):
    _method(monkeypatch, lambda m: _fastvar(blocks=(3, 28)))  # prunes block 28 too: not in the official run
    checks = _fastvar_checks(sampled_bits=False)
    sel = [c for c in checks if "our selection on the teacher-forced" in c.name]
    assert all(c.max_abs_diff == 3 and "pruned where the official run did not" in c.name for c in sel), \
        fixtures.format_checks(checks)


# ---- the tie judgement itself (fast)
def test_judge_selection_accepts_only_near_ties():
    s = torch.tensor([10.0, 9.0, 5.0, 5.0 + 1e-5, 1.0, 0.0])  # 2 and 3 tie within 1e-5 · 10
    ref = torch.tensor([0, 1, 3])
    j = fixtures.judge_selection
    assert j(torch.tensor([0, 1, 3]), ref, s) == "same"
    assert j(torch.tensor([0, 1, 2]), ref, s) == "tie-set"
    assert j(torch.tensor([1, 0, 3]), ref, s).startswith("ours is not")   # 10 vs 9 is no tie: order matters
    assert j(torch.tensor([1, 0, 3]), ref, s, ordered=False) == "same"
    assert j(torch.tensor([0, 1, 4]), ref, s).startswith("ours is not")   # 1.0 is not tied with 5.0
    assert j(torch.tensor([0, 1, 2, 3]), ref, s) == "K=4 (official 3)"
    assert j(torch.tensor([0, 1, 1]), ref, s).startswith("ours is not")   # duplicates
    assert j(None, ref, s).startswith("no selection")
    assert j(torch.tensor([0, 1, 2]), ref, None).startswith("differs")
    s2 = s.clone()
    s2[3] = 5.0 + 1e-3  # no longer a tie: the same swap is a mismatch
    assert j(torch.tensor([0, 1, 2]), ref, s2).startswith("ours is not")
    # the official list must itself be a valid top-K of the reference scores
    assert j(torch.tensor([0, 1, 3]), torch.tensor([0, 1, 4]), s).startswith("official is not")
    t = torch.tensor([3.0, 2.0, 2.0 + 1e-6, 0.0])
    assert j(torch.tensor([0, 2, 1]), torch.tensor([0, 1, 2]), t) == "tie-order"


def test_forced_selection_replays_official_indices_and_records_ours():
    class Top2(fixtures.Method):
        granularity = "branch"

        def select(self, lctx, x):
            return Selection(x[..., 0].argsort(-1, descending=True)[:, : self.k], x.shape[1])

    inner = Top2()
    ref = torch.tensor([[1, 2], [2, 1]])
    fs = fixtures.ForcedSelection(inner, {(9, 3, "sa"): ref}, lambda lctx, x: x[..., 0], ordered=True)
    fs.start()
    lctx = lambda li: SimpleNamespace(si=9, li=li, branch="sa")  # noqa: E731
    x = torch.tensor([[5.0, 4.0, 4.0 + 1e-7, 0.0], [5.0, 4.0, 4.0, 0.0]])[..., None]
    inner.k = 2
    got = fs.select(lctx(3), x)
    assert torch.equal(got.keep_idx, ref)  # the official indices go downstream
    v = fs.verdicts(9)
    assert v["rows"] == 2 and v["wrong"] and "official is not" in v["wrong"][0][2]  # 0 (score 5) is not kept
    inner.k = 3
    fs.start()
    got = fs.select(lctx(3), x)
    assert got.k == 3  # another K: a structural mismatch is not replaced, the run goes our way
    assert fs.select(lctx(4), x).k == 3 and fs.verdicts(9)["wrong"][-1][2].startswith("pruned where")


# ---- scripts/check_fixture.py: one line and exit 2 on bad input
def _cli(*args):
    return subprocess.run([sys.executable, "scripts/check_fixture.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)


def _one_line_exit2(r, *words):
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_cli_corrupt_json(tmp_path):
    p = tmp_path / "meta.json"
    p.write_text('{"infinity": {"depth": 32,\n  "vae": ')
    _one_line_exit2(_cli(p), str(p), "not valid JSON", "line 2")


def test_cli_folder_and_missing_file(tmp_path):
    _one_line_exit2(_cli(tmp_path), "is a folder")
    (tmp_path / "x_meta.json").write_text("{}")
    _one_line_exit2(_cli(tmp_path), "is a folder", "x_meta.json")
    _one_line_exit2(_cli(tmp_path / "nope.json"), "no such fixture meta file")


def test_cli_unsupported_family(tmp_path):
    p = tmp_path / "meta.json"
    p.write_text(json.dumps({"source": {"hart": "mit-han-lab/hart @ 0000000"}, "tensors": {}}))
    _one_line_exit2(_cli(p), "unsupported fixture family", "supported:")
    p.write_text("[1, 2]")
    _one_line_exit2(_cli(p), "JSON object")


def test_cli_truncated_tensors(tmp_path):
    src = shared_path("fixtures", "infinity")
    for f in src.glob("tiny_2bstyle_*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    w = tmp_path / "tiny_2bstyle_vae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:5000])
    _one_line_exit2(_cli(tmp_path / "tiny_2bstyle_meta.json"), str(w), "not a readable safetensors file")
    w.unlink()
    _one_line_exit2(_cli(tmp_path / "tiny_2bstyle_meta.json"), str(w), "missing")
