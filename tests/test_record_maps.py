"""record_maps=true: each record says which tokens every (scale, layer) computed (the report draws them as masks)."""
import torch
from test_methods_contract import backbone

from varbench.harness.registry import build_method
from varbench.loop import generate


def test_kept_maps_are_the_tokens_the_loop_computed():
    bb = backbone("tiny_random")
    m = build_method({"name": "fastvar", "family": "fastvar"})
    out = generate(bb, ["two green circles"], m, torch.Generator().manual_seed(0), record_maps=True)
    rec = out.record
    assert rec.kept_maps, "FastVAR prunes on tiny_random: some scale must have a kept map"
    for si, layers in rec.kept_maps.items():
        si = int(si)
        assert len(layers) == bb.spec.depth
        for li, kept in enumerate(layers):
            if kept is None:
                assert rec.tokens[si][li] == rec.scale_n[si]
            else:
                assert len(set(kept)) == len(kept) and all(0 <= k < rec.scale_n[si] for k in kept)
                if m.granularity == "block":
                    assert len(kept) == rec.tokens[si][li]
    assert "0" not in rec.kept_maps, "a scale where the method selected nothing has no map"
    assert any(k is not None and len(k) < rec.scale_n[int(si)] for si, ks in rec.kept_maps.items() for k in ks)
    plain = generate(bb, ["two green circles"], m, torch.Generator().manual_seed(0))
    assert plain.record.kept_maps is None and torch.equal(plain.images, out.images)
