"""Golden checks hold whatever thread count the caller uses (the fixtures were made with 2 threads; CPU reductions
depend on the count). Seen failing before the checker pinned its threads: FastVAR's 1024² image was off by 1.5e-3
with 1 thread (tolerance 1e-4), e.g. after an in-process run had set threads=1."""
import pytest
import torch
from conftest import shared_path


@pytest.mark.slow
def test_fastvar_fixture_passes_when_the_caller_uses_one_thread():
    from varbench.harness.fixtures import check_fixture

    meta = shared_path("fixtures", "fastvar", "meta.json")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        checks = check_fixture(meta)
        assert torch.get_num_threads() == 1          # the caller's setting is restored
    finally:
        torch.set_num_threads(before)
    bad = [c for c in checks if not c.ok]
    assert not bad, bad


def test_an_in_process_run_restores_the_callers_thread_count(tmp_path):
    from conftest import compose

    from varbench.harness.runner import run

    cfg = compose("model=tiny_random", "method=none", "bench.limit=1")
    cfg |= {"results_root": str(tmp_path), "progress": False, "warmup": 0, "reference": False, "stage": "generate"}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run(cfg, ["model=tiny_random", "method=none"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
