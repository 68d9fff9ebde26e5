"""braid's C++ panel linear (kernels/cpu_ext/gemm.cpp) against float64 products, and
the layers that hold their weights in it."""
from __future__ import annotations

import pytest
import torch

from braid.engine.layers import linear as linear_mod
from braid.engine.parallel_state import GroupComm
from braid.kernels import cpu_ext

ext = cpu_ext.load()
pytestmark = pytest.mark.skipif(ext is None, reason="braid's C++ kernels are not built here")


def panels(w: torch.Tensor) -> torch.Tensor:
    """The layout by its definition: row n of W is column n % 16 of panel n // 16."""
    n, k = w.shape
    out = torch.zeros(-(-n // 16), k, 16, dtype=w.dtype)
    for row in range(n):
        out[row // 16, :, row % 16] = w[row]
    return out


def check(x: torch.Tensor, w: torch.Tensor, bias, simd: bool) -> None:
    got = ext.panel_linear(x, panels(w), bias, w.shape[0], simd)
    want = x.double() @ w.double().t() + (bias.double() if bias is not None else 0)
    assert got.shape == (*x.shape[:-1], w.shape[0]) and got.dtype == torch.float32
    # fp32 sums over k terms: error grows like sqrt(k) * eps * |x||w|
    tol = 1e-6 * (x.shape[-1] ** 0.5 + 1) * 4
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=1e-5)


@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("m", [1, 2, 5, 11, 12, 13, 33, 130])
@pytest.mark.parametrize("n,k", [(16, 64), (17, 7), (40, 1), (960, 576), (100, 600)])
def test_panel_linear_matches_float64(simd, m, n, k):
    if simd and not ext.panel_simd():
        pytest.skip("no AVX-512 on this CPU: braid keeps oneDNN's layout and never calls the fast tiles")
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    check(x, w, None, simd)
    check(x, w, torch.randn(n, generator=g), simd)


@pytest.mark.parametrize("simd", [True, False])
def test_panel_linear_blocked_path_and_views(simd):
    """Inputs over L2 (256 KB) go in K-blocks two panels at a time: odd panel counts,
    a K that is no multiple of the block, leading dims and a strided view of x."""
    if simd and not ext.panel_simd():
        pytest.skip("no AVX-512 on this CPU")
    g = torch.Generator().manual_seed(7)
    w = torch.randn(48 + 5, 700, generator=g)  # 4 panels, the last padded
    base = torch.randn(700, 2, 150, generator=g)
    x = base[:, 1, :].t()  # [150, 700], not contiguous
    check(x, w, None, simd)
    check(torch.randn(3, 50, 700, generator=g), w, torch.randn(53, generator=g), simd)
    check(torch.zeros(0, 700), w, None, simd)


def test_panel_linear_same_result_on_two_threads():
    """Threads split the panels, never a sum: the output is bit for bit the same."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(37, 320, generator=g), torch.randn(200, 320, generator=g)
    p = panels(w)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.panel_linear(x, p, None, 200)
        torch.set_num_threads(2)
        two = ext.panel_linear(x, p, None, 200)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_panel_linear_refuses_what_does_not_fit():
    p = panels(torch.randn(20, 8))
    with pytest.raises(RuntimeError, match="input size"):
        ext.panel_linear(torch.randn(2, 9), p, None, 20)
    with pytest.raises(RuntimeError, match="output size"):
        ext.panel_linear(torch.randn(2, 8), p, None, 40)
    with pytest.raises(RuntimeError, match="float32"):
        ext.panel_linear(torch.randn(2, 8, dtype=torch.float64), p, None, 20)


def test_prepacked_layers_match_plain_linear():
    """Every linear kind, packed the way this machine packs it (panels with AVX-512),
    equals F.linear on its plain weight; the lm-head path too (pack_weight/packed_linear)."""
    torch.manual_seed(0)
    tp = GroupComm([0], None, 0)
    layers = [
        linear_mod.ColumnParallelLinear(96, [40, 40], bias=True, tp=tp, dtype=torch.float32),
        linear_mod.QKVParallelLinear(96, 16, 4, 2, bias=False, tp=tp, dtype=torch.float32),
        linear_mod.RowParallelLinear(80, 33, bias=True, tp=tp, dtype=torch.float32),
        linear_mod.ReplicatedLinear(96, 7, bias=False, dtype=torch.float32),
    ]
    for layer in layers:
        for p in layer.parameters():
            p.data.normal_()
        w = layer.weight.detach().clone()
        b = layer.bias.detach().clone() if layer.bias is not None else None
        x = torch.randn(5, w.shape[1])
        want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
        assert layer.prepack()
        assert layer._packed.is_mkldnn != (bool(ext.panel_simd()) and w.shape[0] % 16 == 0)
        got = layer.linear(x, layer.bias if not isinstance(layer, linear_mod.RowParallelLinear) else None)
        if isinstance(layer, linear_mod.RowParallelLinear) and b is not None:
            got = got + b
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    head = torch.randn(1000, 64)
    x = torch.randn(3, 64)
    got = linear_mod.packed_linear(x, linear_mod.pack_weight(head), 1000)
    torch.testing.assert_close(got.double(), x.double() @ head.double().t(), atol=1e-4, rtol=1e-5)
