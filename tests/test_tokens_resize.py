"""The copy-free token-grid resize and the in-place restore (issue 16) give the values of the plain path bit for bit."""
import pytest
import torch
import torch.nn.functional as F

from varbench.tokens import ResidualCache, Selection, resize_grid

SIDES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 20, 24, 32]


def reference_resize(x_BLC, src_hw, dst_hw, mode):
    """Tokens -> contiguous NCHW -> interpolate -> tokens (the layout-naive path)."""
    B, L, C = x_BLC.shape
    g = x_BLC.transpose(1, 2).contiguous().reshape(B, C, *src_hw)
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    g = F.interpolate(g.float(), size=dst_hw, mode=mode, **kw).to(x_BLC.dtype)
    return g.reshape(B, C, -1).transpose(1, 2)


@pytest.mark.parametrize("mode", ["area", "bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("C", [1, 8, 64])
def test_resize_grid_matches_the_nchw_path_bit_for_bit(mode, C):
    g = torch.Generator().manual_seed(C)
    for a, b in list(zip(SIDES, SIDES[1:])) + [(6, 6), (16, 8)]:
        x = torch.randn(2, a * a, C, generator=g)
        assert torch.equal(resize_grid(x, (a, a), (b, b), mode), reference_resize(x, (a, a), (b, b), mode)), (a, b)
    x = torch.randn(2, 12, C, generator=g)                       # non-square grid, non-contiguous input
    xt = torch.randn(2, C, 12, generator=g).transpose(1, 2)
    for inp in (x, xt):
        assert torch.equal(resize_grid(inp, (3, 4), (6, 8), mode), reference_resize(inp, (3, 4), (6, 8), mode))


def test_restore_returns_a_fresh_sum_and_in_place_scatter_matches():
    cache = ResidualCache()
    res = torch.randn(2, 16, 8)
    cache.put(0, res, (4, 4))
    x_in = torch.randn(2, 36, 8)
    before_res, before_x = res.clone(), x_in.clone()
    base = cache.restore(0, x_in, (6, 6), "area")
    assert torch.equal(base, before_x + reference_resize(before_res, (4, 4), (6, 6), "area"))
    assert base.data_ptr() not in (x_in.data_ptr(), res.data_ptr())
    assert cache.restore(1, x_in, (6, 6), "area") is x_in         # nothing stored: x_in itself, never written
    sel = Selection.top_k(torch.randn(1, 36), 10)
    y = torch.randn(2, 10, 8)
    expected = sel.scatter(y, base)
    assert torch.equal(sel.scatter(y, base, inplace=True), expected)
    assert torch.equal(base, expected)                            # written into the caller's base
    assert torch.equal(x_in, before_x) and torch.equal(res, before_res)
