"""Hypothesis fuzz of the CPU kernels and bsr_linear against the reference and a dense oracle."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsekern import BlockSparseMatrix, bsr_linear, ops, reference
from conftest import assert_close, oracle_dds, oracle_sdd, padding_keep_mask

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_MORE = settings(max_examples=400, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])

dims = st.integers(1, 48)
blocks = st.integers(1, 20)
dtypes = st.sampled_from([torch.float32, torch.float64])
layouts = st.sampled_from(["contiguous", "transposed", "strided"])


def _dense(batch, width, layout, dtype, gen):
    if layout == "transposed":
        return torch.randn(width, batch, generator=gen, dtype=dtype).t()
    if layout == "strided":
        return torch.randn(batch, 2 * width + 1, generator=gen, dtype=dtype)[:, 1::2]
    return torch.randn(batch, width, generator=gen, dtype=dtype)


@FUZZ_MORE
@given(M=dims, K=dims, batch=st.integers(0, 40), bm=blocks, bk=blocks,
       density=st.floats(0.0, 1.0), dtype=dtypes, layout=layouts, seed=st.integers(0, 2**31))
def test_fuzz_ops_cpu_vs_reference(M, K, batch, bm, bk, density, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    n_br, n_bc = -(-M // bm), -(-K // bk)
    mask = torch.rand(n_br, n_bc, generator=gen) < density
    values = torch.randn(int(mask.sum()), bm, bk, generator=gen, dtype=dtype)
    # shape = the padded shape: the ops see random numbers everywhere, padding included
    w = BlockSparseMatrix.from_block_mask(mask, (bm, bk), (n_br * bm, n_bc * bk), values=values)
    Mp, Kp = w.padded_shape
    topo = w.topology()
    x = _dense(batch, Kp, layout, dtype, gen)
    dy = _dense(batch, Mp, layout, dtype, gen)

    y = ops.dds(x, w.values, *topo, Mp, Kp, True, "cpu")
    assert_close(y, reference.dds(x, w.values, w.row_idx, w.col_idx, Mp, Kp, True), dtype)
    assert_close(y, oracle_dds(x, w.values, w.row_offsets, w.col_idx, Mp, Kp, True), dtype)

    dx = ops.dds(dy, w.values, *topo, Mp, Kp, False, "cpu")
    assert_close(dx, reference.dds(dy, w.values, w.row_idx, w.col_idx, Mp, Kp, False), dtype)
    assert_close(dx, oracle_dds(dy, w.values, w.row_offsets, w.col_idx, Mp, Kp, False), dtype)

    dw = ops.sdd(dy, x, *topo, bm, bk, "cpu")
    assert_close(dw, reference.sdd(dy, x, w.row_idx, w.col_idx, bm, bk), dtype)
    assert_close(dw, oracle_sdd(dy, x, w.row_idx, w.col_idx, bm, bk), dtype)


@FUZZ
@given(M=dims, K=dims, lead=st.lists(st.integers(0, 4), min_size=0, max_size=2), bm=blocks,
       bk=blocks, density=st.floats(0.0, 1.0), dtype=dtypes, bias=st.booleans(),
       seed=st.integers(0, 2**31))
def test_fuzz_bsr_linear_vs_dense(M, K, lead, bm, bk, density, dtype, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    w = BlockSparseMatrix.random((M, K), (bm, bk), density, dtype=dtype, generator=gen)
    values = w.values.clone().requires_grad_()
    b = torch.randn(M, generator=gen, dtype=dtype).requires_grad_() if bias else None
    x = torch.randn(*lead, K, generator=gen, dtype=dtype).requires_grad_()
    y = bsr_linear(x, w.with_values(values), b, backend="cpu")
    assert y.shape == (*lead, M)
    g = torch.randn(y.shape, generator=gen, dtype=dtype)
    y.backward(g)

    dense = torch.zeros(w.padded_shape, dtype=torch.float64)
    for p, (r, c) in enumerate(zip(w.row_idx.tolist(), w.col_idx.tolist())):
        dense[r * bm:(r + 1) * bm, c * bk:(c + 1) * bk] = w.values[p].double()
    wd = dense[:M, :K].clone().requires_grad_()
    xd = x.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    yd = F.linear(xd, wd, bd)
    yd.backward(g.double())
    assert_close(y, yd, dtype)
    assert_close(x.grad, xd.grad, dtype)
    if bias:
        assert_close(b.grad, bd.grad, dtype)
    keep = padding_keep_mask(w)
    assert not values.grad[~keep].any()
    expected = torch.zeros(w.nnz_blocks, bm, bk, dtype=torch.float64)
    for p, (r, c) in enumerate(zip(w.row_idx.tolist(), w.col_idx.tolist())):
        rows, cols = keep[p].any(1).sum(), keep[p].any(0).sum()
        expected[p, :rows, :cols] = wd.grad[r * bm:r * bm + rows, c * bk:c * bk + cols]
    assert_close(values.grad, expected, dtype)


FUZZ_CONV = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ_CONV
@given(N=st.integers(0, 3), c_in_blocks=st.integers(1, 3), c_out=st.integers(1, 40),
       H=st.integers(1, 11), W=st.integers(1, 11), k=st.sampled_from([1, 2, 3, 5]),
       stride=st.integers(1, 3), pad=st.integers(0, 2), dil=st.integers(1, 2),
       block=st.sampled_from([(1, 1), (2, 4), (4, 4), (8, 8), (16, 16), (8, 16)]),
       density=st.floats(0.0, 1.0), dtype=dtypes, channels_last=st.booleans(),
       bias=st.booleans(), seed=st.integers(0, 2**31))
def test_fuzz_bsr_conv2d_vs_conv2d(N, c_in_blocks, c_out, H, W, k, stride, pad, dil, block,
                                   density, dtype, channels_last, bias, seed):
    """bsr_conv2d forward and gradients (input, values, bias) against float64 F.conv2d, in both
    memory formats, on whatever CPU path the shape picks (tiles, shifted, chunked)."""
    from sparsekern import bsr_conv2d

    bm, bk = block
    C = c_in_blocks * bk
    if (H + 2 * pad - dil * (k - 1) - 1) < 0 or (W + 2 * pad - dil * (k - 1) - 1) < 0:
        return  # empty output: the op rejects it (tested elsewhere)
    gen = torch.Generator().manual_seed(seed)
    K = k * k * C
    n_br, n_bc = -(-c_out // bm), -(-K // bk)
    mask = torch.rand(n_br, n_bc, generator=gen) < density
    values = torch.randn(int(mask.sum()), bm, bk, generator=gen, dtype=dtype)
    w = BlockSparseMatrix.from_block_mask(mask, block, (c_out, K), values=values)
    w = w.with_values((w.values * padding_keep_mask(w).to(dtype)).requires_grad_())
    w4 = w.to_dense().double().reshape(c_out, k, k, C).permute(0, 3, 1, 2).detach()
    w4.requires_grad_()
    x = torch.randn(N, C, H, W, generator=gen, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    b = torch.randn(c_out, generator=gen, dtype=dtype).requires_grad_() if bias else None
    y = bsr_conv2d(x, w, b, stride, pad, dil, kernel_size=k)
    x64 = x.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    y64 = F.conv2d(x64, w4, b64, stride, pad, dil)
    assert y.shape == y64.shape and y._base is None
    g = torch.randn(y64.shape, generator=gen, dtype=torch.float64)
    y.backward(g.to(dtype))
    y64.backward(g)
    assert_close(y, y64, dtype)
    assert_close(x.grad, x64.grad, dtype)
    dense_grad = w4.grad.permute(0, 2, 3, 1).reshape(c_out, K)
    expected = torch.zeros(n_br * bm, n_bc * bk, dtype=torch.float64)
    expected[:c_out, :K] = dense_grad
    assert_close(w.values.grad, reference.dense_to_blocks(expected, w.row_idx, w.col_idx, bm, bk)
                 * padding_keep_mask(w), dtype)
    if bias:
        assert_close(b.grad, b64.grad, dtype)
