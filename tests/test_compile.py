"""``compile=true``: the opt-in torch.compile of Infinity's block parts (issue 16). Off by default; the eager path is
the one the golden fixtures pin. Compiling on a CPU takes tens of seconds, hence ``slow``."""
import pytest
import torch
import torch._dynamo

from nova.method import Nova, NovaConfig
from varbench.backbones.infinity.model import EAGER_KERNELS
from varbench.errors import UserError
from varbench.harness.registry import build_backbone
from varbench.loop import generate


def test_compile_is_off_by_default_and_refused_where_unsupported(tiny_cfg, tiny_backbone):
    assert all(b.kernels is EAGER_KERNELS and b.sa.kernels is EAGER_KERNELS for b in tiny_backbone.model.blocks)
    with pytest.raises(UserError, match="compile=true is implemented for Infinity"):
        build_backbone({"name": "hart_x", "family": "hart"}, "cpu", "fp32", compile=True)


def test_compile_option_is_checked_before_anything_loads(tmp_path):
    from conftest import compose

    from varbench.harness.runner import run
    cfg = compose("bench=smoke", "method=none", f"run_dir={tmp_path / 'r'}") | {"compile": "maybe"}
    with pytest.raises(UserError, match="compile must be true or false"):
        run(cfg)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_compiled_blocks_generate_what_eager_blocks_generate(tiny_cfg, tiny_backbone):
    """Same weights, same seed: the compiled model's images match eager to float rounding, for the baseline and for a
    method that steers the loop with variable token counts (NOVA); the compiled kernels are what ran."""
    torch._dynamo.reset()
    try:
        comp = build_backbone(tiny_cfg, "cpu", "fp32", compile=True)
        blk = comp.model.blocks[0]
        assert blk.kernels is not EAGER_KERNELS and blk.kernels is blk.sa.kernels
        assert all(b.kernels is blk.kernels for b in comp.model.blocks)   # one compiled function for every block
        for method in (None, Nova(NovaConfig(t_star=6))):
            args = (["a red circle"], method)
            eager = generate(tiny_backbone, *args, torch.Generator().manual_seed(0))
            compiled = generate(comp, *args, torch.Generator().manual_seed(0))
            assert compiled.record.tokens == eager.record.tokens
            assert (compiled.images - eager.images).abs().max() < 1e-3
        frames = torch._dynamo.utils.counters["frames"]
        assert frames["ok"] >= 2          # both kernels were compiled and run
        comp.model.compile_blocks(False)  # eager kernels back, on the same weights: eager's images bit for bit
        assert all(b.kernels is EAGER_KERNELS for b in comp.model.blocks)
        again = generate(comp, ["a red circle"], None, torch.Generator().manual_seed(0))
        assert torch.equal(again.images, generate(tiny_backbone, ["a red circle"], None,
                                                  torch.Generator().manual_seed(0)).images)
    finally:
        torch._dynamo.reset()
