"""sparsekern.ops: the public ops dds/sdd and the native kernels behind backend "cpu".

Every result is compared with sparsekern.reference and with the loop-built float64 oracle of
conftest.py (never with another kernel of the package).
"""
from __future__ import annotations

import pytest
import torch

import sparsekern
from sparsekern import ops, reference
from conftest import (BATCHES, BLOCK_SHAPES, DTYPES, TOPOLOGY_KINDS, assert_close, make_matrix,
                      oracle_blocks, oracle_dds, oracle_dense, oracle_sdd, randn)

dds_native = torch.ops.sparsekern._dds_native
sdd_native = torch.ops.sparsekern._sdd_native

ids_shape = [f"{bm}x{bk}" for bm, bk in BLOCK_SHAPES]
ids_dtype = ["f32", "f64"]


def _sizes(m):
    Mp, Kp = m.padded_shape
    bm, bk = m.block_shape
    return Mp, Kp, bm, bk


# ---- 1. correctness against the reference and the oracle -----------------------------------------
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("kind", TOPOLOGY_KINDS)
@pytest.mark.parametrize("block_shape", BLOCK_SHAPES, ids=ids_shape)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids_dtype)
def test_dds_trans_w_true_cpu_matches_reference(dtype, block_shape, kind, batch, gen):
    m = make_matrix(block_shape, kind, dtype)
    Mp, Kp, _, _ = _sizes(m)
    x = randn(batch, Kp, dtype=dtype, generator=gen)
    y = ops.dds(x, m.values, *m.topology(), n_rows=Mp, n_cols=Kp, trans_w=True, backend="cpu")
    assert y.dtype == dtype and y.shape == (batch, Mp)
    ref = reference.dds(x, m.values, m.row_idx, m.col_idx, Mp, Kp, True)
    assert_close(y, ref.double(), dtype)
    assert_close(y, oracle_dds(x, m.values, m.row_offsets, m.col_idx, Mp, Kp, True), dtype)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("kind", TOPOLOGY_KINDS)
@pytest.mark.parametrize("block_shape", BLOCK_SHAPES, ids=ids_shape)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids_dtype)
def test_dds_trans_w_false_cpu_matches_reference(dtype, block_shape, kind, batch, gen):
    m = make_matrix(block_shape, kind, dtype)
    Mp, Kp, _, _ = _sizes(m)
    dy = randn(batch, Mp, dtype=dtype, generator=gen)
    y = ops.dds(dy, m.values, *m.topology(), n_rows=Mp, n_cols=Kp, trans_w=False, backend="cpu")
    assert y.dtype == dtype and y.shape == (batch, Kp)
    ref = reference.dds(dy, m.values, m.row_idx, m.col_idx, Mp, Kp, False)
    assert_close(y, ref.double(), dtype)
    assert_close(y, oracle_dds(dy, m.values, m.row_offsets, m.col_idx, Mp, Kp, False), dtype)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("kind", TOPOLOGY_KINDS)
@pytest.mark.parametrize("block_shape", BLOCK_SHAPES, ids=ids_shape)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids_dtype)
def test_sdd_cpu_matches_reference(dtype, block_shape, kind, batch, gen):
    m = make_matrix(block_shape, kind, dtype)
    Mp, Kp, bm, bk = _sizes(m)
    a = randn(batch, Mp, dtype=dtype, generator=gen)
    b = randn(batch, Kp, dtype=dtype, generator=gen)
    out = ops.sdd(a, b, *m.topology(), bm=bm, bk=bk, backend="cpu")
    assert out.dtype == dtype and out.shape == (m.nnz_blocks, bm, bk)
    ref = reference.sdd(a, b, m.row_idx, m.col_idx, bm, bk)
    assert_close(out, ref.double(), dtype)
    assert_close(out, oracle_sdd(a, b, m.row_idx, m.col_idx, bm, bk), dtype)


@pytest.mark.parametrize("block_shape", [(1, 1), (3, 5), (16, 8), (16, 16)], ids=str)
def test_reference_backend_matches_oracle(block_shape, gen):
    m = make_matrix(block_shape, "sparse", torch.float64)
    Mp, Kp, bm, bk = _sizes(m)
    x, dy = randn(5, Kp, generator=gen), randn(5, Mp, generator=gen)
    topo = m.topology()
    assert_close(ops.dds(x, m.values, *topo, Mp, Kp, True, "reference"),
                 oracle_dds(x, m.values, m.row_offsets, m.col_idx, Mp, Kp, True))
    assert_close(ops.dds(dy, m.values, *topo, Mp, Kp, False, "reference"),
                 oracle_dds(dy, m.values, m.row_offsets, m.col_idx, Mp, Kp, False))
    assert_close(ops.sdd(dy, x, *topo, bm, bk, "reference"),
                 oracle_sdd(dy, x, m.row_idx, m.col_idx, bm, bk))


def test_batch_zero(gen):
    m = make_matrix((4, 4), "sparse", torch.float32)
    Mp, Kp, bm, bk = _sizes(m)
    topo = m.topology()
    assert ops.dds(torch.empty(0, Kp), m.values, *topo, Mp, Kp, True, "cpu").shape == (0, Mp)
    assert ops.dds(torch.empty(0, Mp), m.values, *topo, Mp, Kp, False, "cpu").shape == (0, Kp)
    out = ops.sdd(torch.empty(0, Mp), torch.empty(0, Kp), *topo, bm, bk, "cpu")
    assert out.shape == (m.nnz_blocks, bm, bk)
    assert torch.equal(out, torch.zeros_like(out))  # an empty sum, not uninitialised memory


@pytest.mark.parametrize("dtype", DTYPES, ids=ids_dtype)
def test_large_segments_and_batch(dtype, gen):
    """Block rows/columns long enough for the L1-chunked paths, batch over several tiles.

    Thin blocks make the longest segments: (16, 1)/(8, 1) rows of 300 blocks for x @ W^T and
    (1, 16)/(1, 8) columns of 300 blocks for dy @ W (the batch-major paths), (1, 1) and (2, 4)
    for the feature-major ones.
    """
    for block_shape, grid in (((1, 1), (6, 700)), ((2, 4), (4, 150)), ((16, 16), (3, 40)),
                              ((16, 1), (2, 300)), ((8, 1), (2, 300)), ((1, 16), (300, 2)),
                              ((1, 8), (300, 2))):
        m = make_matrix(block_shape, "dense", dtype, grid=grid)
        Mp, Kp, bm, bk = _sizes(m)
        x, dy = randn(130, Kp, dtype=dtype, generator=gen), randn(130, Mp, dtype=dtype,
                                                                 generator=gen)
        topo = m.topology()
        w = oracle_dense(m.values, m.row_offsets, m.col_idx, Mp, Kp)
        assert_close(ops.dds(x, m.values, *topo, Mp, Kp, True, "cpu"), x.double() @ w.t(), dtype)
        assert_close(ops.dds(dy, m.values, *topo, Mp, Kp, False, "cpu"), dy.double() @ w, dtype)
        assert_close(ops.sdd(dy, x, *topo, bm, bk, "cpu"),
                     oracle_blocks(dy.double().t() @ x.double(), m.row_idx, m.col_idx, bm, bk),
                     dtype)


def test_auto_backend_uses_cpu_kernels_for_cpu_tensors(backend_spy, gen):
    m = make_matrix((4, 4), "sparse", torch.float32)
    Mp, Kp, bm, bk = _sizes(m)
    x = randn(3, Kp, dtype=torch.float32, generator=gen)
    y = ops.dds(x, m.values, *m.topology(), Mp, Kp, True)
    assert backend_spy.calls == [("cpu", "dds")]
    assert_close(y, oracle_dds(x, m.values, m.row_offsets, m.col_idx, Mp, Kp, True))


def test_forced_forward_only_backend_leaves_the_backward_to_auto(monkeypatch, gen):
    """A backend forced by scope that has only the forward product (as the CUDA C++ one): the
    backward products it refuses run on "auto"'s choice, even inside the scope."""
    from sparsekern import backends

    class ForwardOnly(backends.Reference):
        name = "forward-only"

        def refuse(self, op, a, dtype, trans_w, conv, block=None):
            return None if op == "dds" and trans_w else "forward x @ W^T only"

    monkeypatch.setitem(backends.BACKENDS, "forward-only", ForwardOnly())
    m = make_matrix((4, 4), "sparse", torch.float64, grid=(3, 4))
    Mp, Kp, _, _ = _sizes(m)
    topo = m.topology()
    x = randn(5, Kp, generator=gen).requires_grad_()
    values = m.values.clone().requires_grad_()
    with sparsekern.backend("forward-only"):
        y = ops.dds_call(x, values, *topo, Mp, Kp, True)
        grads = torch.autograd.grad(y.square().sum(), [x, values])
        with pytest.raises(RuntimeError, match="forward-only.*forward x @ W"):
            ops.dds(y.detach(), values, *topo, Mp, Kp, False)  # forcing still forces forwards
    y_ref = ops.dds(x, values, *topo, Mp, Kp, True, "reference")
    for g, r in zip(grads, torch.autograd.grad(y_ref.square().sum(), [x, values])):
        assert_close(g, r)


def test_auto_backend_falls_back_to_reference_for_other_dtypes(backend_spy, gen):
    m = make_matrix((4, 4), "sparse", torch.float16)
    Mp, Kp, _, _ = _sizes(m)
    x = randn(3, Kp, dtype=torch.float16, generator=gen)
    y = ops.dds(x, m.values, *m.topology(), Mp, Kp, True)
    assert backend_spy.calls == [("reference", "dds")]
    assert y.dtype == torch.float16
    assert_close(y, oracle_dds(x, m.values, m.row_offsets, m.col_idx, Mp, Kp, True))


# ---- 5. non-contiguous and transposed inputs -----------------------------------------------------
LAYOUTS = ("contiguous", "transposed", "col_strided", "row_strided", "col_offset", "expanded")


def _layout(batch: int, width: int, layout: str, dtype, gen) -> torch.Tensor:
    if layout == "contiguous":
        x = randn(batch, width, dtype=dtype, generator=gen)
    elif layout == "transposed":   # [width, batch].t(): column-major
        x = randn(width, batch, dtype=dtype, generator=gen).t()
    elif layout == "col_strided":  # every other column of a wider matrix
        x = randn(batch, 2 * width, dtype=dtype, generator=gen)[:, ::2]
    elif layout == "row_strided":  # every other row, unit column stride, large row stride
        x = randn(2 * batch, width + 3, dtype=dtype, generator=gen)[::2, 3:]
    elif layout == "col_offset":   # unit column stride, row stride > width, storage offset
        x = randn(batch, width + 5, dtype=dtype, generator=gen)[:, 2:width + 2]
    elif layout == "expanded":     # row stride 0
        x = randn(1, width, dtype=dtype, generator=gen).expand(batch, width)
    else:
        raise ValueError(layout)
    assert x.shape == (batch, width)
    if layout != "contiguous" and batch > 1:
        assert not x.is_contiguous()
    return x


@pytest.mark.parametrize("batch", [1, 37])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_shape", [(1, 1), (4, 4), (16, 16), (16, 8), (3, 5), (8, 32)],
                         ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids_dtype)
def test_non_contiguous_inputs(dtype, block_shape, layout, batch, gen):
    m = make_matrix(block_shape, "sparse", dtype)
    Mp, Kp, bm, bk = _sizes(m)
    topo = m.topology()
    x = _layout(batch, Kp, layout, dtype, gen)
    dy = _layout(batch, Mp, layout, dtype, gen)
    w = oracle_dense(m.values, m.row_offsets, m.col_idx, Mp, Kp)
    assert_close(ops.dds(x, m.values, *topo, Mp, Kp, True, "cpu"), x.double() @ w.t(), dtype)
    assert_close(ops.dds(dy, m.values, *topo, Mp, Kp, False, "cpu"), dy.double() @ w, dtype)
    expected = oracle_sdd(dy, x, m.row_idx, m.col_idx, bm, bk)
    assert_close(ops.sdd(dy, x, *topo, bm, bk, "cpu"), expected, dtype)
    # mixed layouts: one operand contiguous, the other not
    assert_close(ops.sdd(dy.contiguous(), x, *topo, bm, bk, "cpu"), expected, dtype)
    assert_close(ops.sdd(dy, x.contiguous(), *topo, bm, bk, "cpu"), expected, dtype)


@pytest.mark.parametrize("block_shape", [(4, 4), (16, 16), (3, 5), (16, 8)], ids=str)
def test_non_contiguous_values(block_shape, gen):
    m = make_matrix(block_shape, "sparse", torch.float32)
    Mp, Kp, _, _ = _sizes(m)
    # same numbers, column-major inside each block
    values = m.values.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(values, m.values) and not values.is_contiguous()
    x = randn(5, Kp, dtype=torch.float32, generator=gen)
    dy = randn(5, Mp, dtype=torch.float32, generator=gen)
    w = oracle_dense(m.values, m.row_offsets, m.col_idx, Mp, Kp)
    assert_close(ops.dds(x, values, *m.topology(), Mp, Kp, True, "cpu"), x.double() @ w.t())
    assert_close(ops.dds(dy, values, *m.topology(), Mp, Kp, False, "cpu"), dy.double() @ w)


# ---- 2. autograd ---------------------------------------------------------------------------------
GRAD_CASES = [((1, 1), "sparse", (3, 4)), ((3, 5), "sparse", (3, 4)), ((4, 4), "dense", (3, 3)),
              ((8, 8), "sparse", (3, 3)), ((2, 8), "sparse", (3, 3)), ((3, 5), "nnz0", (3, 3))]
GRAD_IDS = [f"{bs[0]}x{bs[1]}-{kind}" for bs, kind, _ in GRAD_CASES]


def _grad_inputs(block_shape, kind, grid, gen, batch=4):
    m = make_matrix(block_shape, kind, torch.float64, grid=grid)
    Mp, Kp, bm, bk = _sizes(m)
    values = m.values.clone().requires_grad_()
    x = randn(batch, Kp, generator=gen).requires_grad_()
    dy = randn(batch, Mp, generator=gen).requires_grad_()
    return m, values, x, dy


@pytest.mark.parametrize("trans_w", [True, False])
@pytest.mark.parametrize("block_shape,kind,grid", GRAD_CASES, ids=GRAD_IDS)
def test_dds_gradcheck(block_shape, kind, grid, trans_w, gen):
    m, values, x, dy = _grad_inputs(block_shape, kind, grid, gen)
    Mp, Kp, _, _ = _sizes(m)
    topo = m.topology()
    a = x if trans_w else dy

    def f(a, values):
        return ops.dds(a, values, *topo, Mp, Kp, trans_w, "cpu")

    assert torch.autograd.gradcheck(f, (a, values))


@pytest.mark.parametrize("block_shape,kind,grid", GRAD_CASES, ids=GRAD_IDS)
def test_sdd_gradcheck(block_shape, kind, grid, gen):
    m, _, x, dy = _grad_inputs(block_shape, kind, grid, gen)
    _, _, bm, bk = _sizes(m)
    topo = m.topology()
    assert torch.autograd.gradcheck(lambda a, b: ops.sdd(a, b, *topo, bm, bk, "cpu"), (dy, x))


@pytest.mark.parametrize("trans_w", [True, False])
@pytest.mark.parametrize("block_shape", [(3, 5), (8, 8)], ids=str)
def test_dds_gradgradcheck(block_shape, trans_w, gen):
    m, values, x, dy = _grad_inputs(block_shape, "sparse", (3, 3), gen, batch=3)
    Mp, Kp, _, _ = _sizes(m)
    topo = m.topology()
    a = x if trans_w else dy
    assert torch.autograd.gradgradcheck(
        lambda a, v: ops.dds(a, v, *topo, Mp, Kp, trans_w, "cpu"), (a, values))


@pytest.mark.parametrize("fast", [False, True], ids=["custom_op", "eager_fast_path"])
def test_eager_fast_path_matches_the_registered_ops(fast, gen):
    """ops.dds_call / sdd_call (what functional.py uses in eager) give the custom ops' values,
    first and second derivatives."""
    m, values, x, dy = _grad_inputs((4, 4), "sparse", (3, 3), gen, batch=3)
    Mp, Kp, bm, bk = _sizes(m)
    topo = m.topology()
    dds = ops.dds_call if fast else ops.dds
    sdd = ops.sdd_call if fast else ops.sdd
    assert torch.autograd.gradgradcheck(
        lambda a, v: dds(a, v, *topo, Mp, Kp, True, "cpu"), (x, values), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b: sdd(a, b, *topo, bm, bk, "cpu"), (dy, x),
                                    fast_mode=True)
    y = dds(x, values, *topo, Mp, Kp, True, "cpu")
    assert_close(y, oracle_dds(x, values, m.row_offsets, m.col_idx, Mp, Kp, True))


def test_eager_fast_path_only_on_plain_tensors():
    """dds_call / sdd_call take the registered (traceable) ops under a dispatch mode or for tensor
    subclasses; plain tensors and Parameters keep the fast path (tests/triton checks a kernel
    under fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(3, 4)
    assert not ops._use_registered_ops(x)
    assert not ops._use_registered_ops(torch.nn.Parameter(x))
    with FakeTensorMode() as mode:
        assert ops._use_registered_ops(mode.from_tensor(x))


def test_sdd_gradgradcheck(gen):
    m, _, x, dy = _grad_inputs((3, 5), "sparse", (3, 3), gen, batch=3)
    _, _, bm, bk = _sizes(m)
    topo = m.topology()
    assert torch.autograd.gradgradcheck(lambda a, b: ops.sdd(a, b, *topo, bm, bk, "cpu"),
                                        (dy, x))


@pytest.mark.parametrize("block_shape", BLOCK_SHAPES, ids=ids_shape)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids_dtype)
def test_backward_matches_explicit_formulas(dtype, block_shape, gen):
    """y = x W^T: dx = g W and dW = stored blocks of g^T x, by hand in float64."""
    m = make_matrix(block_shape, "sparse", dtype)
    Mp, Kp, bm, bk = _sizes(m)
    values = m.values.clone().requires_grad_()
    x = randn(37, Kp, dtype=dtype, generator=gen).requires_grad_()
    g = randn(37, Mp, dtype=dtype, generator=gen)
    y = ops.dds(x, values, *m.topology(), Mp, Kp, True, "cpu")
    y.backward(g)
    w = oracle_dense(m.values, m.row_offsets, m.col_idx, Mp, Kp)
    assert_close(x.grad, g.double() @ w, dtype)
    assert_close(values.grad, oracle_blocks(g.double().t() @ x.double(), m.row_idx, m.col_idx,
                                            bm, bk), dtype)


# ---- 2b. the fused bias of dds (trans_w=True) ------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("block_shape,kind,grid", GRAD_CASES, ids=GRAD_IDS)
def test_dds_bias_gradcheck(block_shape, kind, grid, backend, gen):
    """y = x W^T + bias: the value against the oracle, and gradients in x, values and bias
    ("cpu" adds the bias in the kernel, "reference" through ops.py: both give the same)."""
    m, values, x, _ = _grad_inputs(block_shape, kind, grid, gen)
    Mp, Kp, _, _ = _sizes(m)
    topo = m.topology()
    bias = randn(Mp, generator=gen).requires_grad_()
    y = ops.dds(x, values, *topo, Mp, Kp, True, backend, None, bias)
    assert_close(y, oracle_dds(x, values, m.row_offsets, m.col_idx, Mp, Kp, True) + bias)
    for dds in (ops.dds, ops.dds_call):
        assert torch.autograd.gradcheck(
            lambda a, v, b: dds(a, v, *topo, Mp, Kp, True, backend, None, b), (x, values, bias))


def test_opcheck_dds_with_bias(gen):
    m = make_matrix((8, 8), "sparse", torch.float32, grid=(3, 4))
    Mp, Kp, _, _ = _sizes(m)
    ro, ci, ri, to, tr, tp = m.topology()
    x = randn(5, Kp, dtype=torch.float32, generator=gen).requires_grad_()
    values = m.values.clone().requires_grad_()
    bias = randn(Mp, dtype=torch.float32, generator=gen).requires_grad_()
    _opcheck(torch.ops.sparsekern.dds.default, (x, values, *m.topology(), Mp, Kp, True, "cpu",
                                                None, bias))
    _opcheck(dds_native.default, (x.detach(), m.values, ro, ci, to, tr, tp, Mp, Kp, True, None,
                                  bias.detach()))


# ---- 2c. the fused ReLU of dds (relu=True forward, relu_mask for its backward) ---------------------
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("block_shape,kind,grid", GRAD_CASES, ids=GRAD_IDS)
def test_dds_fused_relu(block_shape, kind, grid, backend, gen):
    """y = relu(x W^T + bias) and dx = (dy * [y > 0]) W against the oracle; gradcheck of both
    backward routes (weights wanted, input only) and of the masked product."""
    m, values, x, dy = _grad_inputs(block_shape, kind, grid, gen)
    Mp, Kp, _, _ = _sizes(m)
    topo = m.topology()
    bias = randn(Mp, generator=gen).requires_grad_()
    y = ops.dds(x, values, *topo, Mp, Kp, True, backend, None, bias, True)
    y_ref = (oracle_dds(x, values, m.row_offsets, m.col_idx, Mp, Kp, True) + bias).relu()
    assert_close(y, y_ref)
    dx = ops.dds(dy, values, *topo, Mp, Kp, False, backend, None, None, False, y.detach())
    assert_close(dx, oracle_dds(torch.where(y_ref > 0, dy, 0), values, m.row_offsets, m.col_idx,
                                Mp, Kp, False))
    v0 = values.detach()
    for dds in (ops.dds, ops.dds_call):
        assert torch.autograd.gradcheck(
            lambda a, v, b: dds(a, v, *topo, Mp, Kp, True, backend, None, b, True),
            (x, values, bias))
        assert torch.autograd.gradcheck(
            lambda a: dds(a, v0, *topo, Mp, Kp, True, backend, None, None, True), (x,))
        assert torch.autograd.gradcheck(
            lambda a, v: dds(a, v, *topo, Mp, Kp, False, backend, None, None, False,
                             y.detach()), (dy, values))


# ---- 2d. forward-mode AD and batched gradients (torch.func) --------------------------------------
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's forward AD uses torch.jit.script
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("product", ["x_wt_bias_relu", "dy_w_masked", "sdd"])
def test_forward_ad_and_batched_gradcheck(product, backend, gen):
    """The eager products (ops.dds_call / sdd_call, what the layers call) under forward-mode AD
    (jvp), vmap over their backward and over their jvp, and reverse mode, all by gradcheck in
    float64: x @ W^T + bias with the fused ReLU, the ReLU-masked dy @ W, and sdd."""
    m, values, x, dy = _grad_inputs((4, 4), "sparse", (3, 3), gen, batch=3)
    Mp, Kp, bm, bk = _sizes(m)
    topo = m.topology()
    bias = randn(Mp, generator=gen).requires_grad_()
    if product == "x_wt_bias_relu":
        fn, inputs = (lambda a, v, b: ops.dds_call(a, v, *topo, Mp, Kp, True, backend, None, b,
                                                   True)), (x, values, bias)
    elif product == "dy_w_masked":
        mask = ops.dds_call(x.detach(), values.detach(), *topo, Mp, Kp, True, backend, None,
                            None, True)  # a ReLU's output: some zeros
        fn, inputs = (lambda a, v: ops.dds_call(a, v, *topo, Mp, Kp, False, backend, None, None,
                                                False, mask)), (dy, values)
    else:
        fn, inputs = (lambda a, b: ops.sdd_call(a, b, *topo, bm, bk, backend)), (dy, x)
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)


def test_torch_func_grad_jvp_and_vmap_of_the_products(gen):
    """torch.func.grad, jvp (jacfwd against jacrev) and vmap of grad through the eager products:
    the registered ops' autograd cannot run under the grad transforms (pytorch#179652) and
    dropped the tangent under jvp (a zero tangent, silently)."""
    from torch.func import grad, jacfwd, jacrev, jvp, vmap

    m, values, x, _ = _grad_inputs((4, 4), "sparse", (3, 3), gen, batch=3)
    Mp, Kp, _, _ = _sizes(m)
    topo = m.topology()
    v0, x0 = values.detach(), x.detach()

    def f(a, v):
        return ops.dds_call(a, v, *topo, Mp, Kp, True, "cpu").square().sum()
    gx, gv = grad(f, argnums=(0, 1))(x0, v0)
    ex, ev = torch.autograd.grad(f(x, values), (x, values))
    assert_close(gx, ex, torch.float64)
    assert_close(gv, ev, torch.float64)
    tangent = torch.randn_like(x0)
    _, out = jvp(lambda a: ops.dds_call(a, v0, *topo, Mp, Kp, True, "cpu"), (x0,), (tangent,))
    assert out.abs().sum() > 0
    assert_close(out, ops.dds_call(tangent, v0, *topo, Mp, Kp, True, "reference"),
                 torch.float64)
    product = lambda a: ops.dds_call(a, v0, *topo, Mp, Kp, True, "cpu")  # noqa: E731
    assert_close(jacfwd(product)(x0), jacrev(product)(x0), torch.float64)
    per_sample = vmap(grad(lambda a, v: f(a.unsqueeze(0), v), argnums=1), in_dims=(0, None))(
        x0, v0)
    for i in range(x0.shape[0]):
        assert_close(per_sample[i], grad(f, argnums=1)(x0[i:i + 1], v0), torch.float64)


def test_torch_func_vmap_dims_and_refusals(gen):
    """vmap through the eager products at a batch dimension other than 0, over the weights'
    values (per-sample weights), against a loop, and over an empty batch; eager training keeps the cheaper classic
    Function; where the registered ops run (a dispatch mode here) forward-mode AD is refused
    instead of the silent zero tangent it got; functionalize over vmap keeps working."""
    from torch.func import functionalize, jvp, vmap
    from torch.utils.flop_counter import FlopCounterMode

    m, values, x, _ = _grad_inputs((4, 4), "sparse", (3, 3), gen, batch=3)
    Mp, Kp, _, _ = _sizes(m)
    topo = m.topology()
    v0, x0 = values.detach(), x.detach()

    def product(a, v):
        return ops.dds_call(a, v, *topo, Mp, Kp, True, "cpu")
    xs = torch.stack([x0, 2 * x0, -x0], dim=1)  # [3, 3 samples, Kp]: batched at dim 1
    out = vmap(product, in_dims=(1, None))(xs, v0)
    for i in range(3):
        assert_close(out[i], product(xs[:, i], v0), torch.float64)
    vs = torch.stack([v0, 0.5 * v0])
    out = vmap(product, in_dims=(None, 0), out_dims=1)(x0, vs)
    for i in range(2):
        assert_close(out[:, i], product(x0, vs[i]), torch.float64)
    assert vmap(product, in_dims=(0, None))(xs[:0], v0).shape == (0, 3, Mp)  # no sample
    assert type(product(x, values).grad_fn).__name__ == "_DdsFunctionBackward"
    assert type(ops.sdd_call(x, x, *topo, 4, 4, "cpu").grad_fn).__name__ == \
        "_SddFunctionBackward"
    with FlopCounterMode(display=False), pytest.raises(NotImplementedError, match="eager"):
        jvp(lambda a: product(a, v0), (x0,), (torch.ones_like(x0),))
    assert_close(functionalize(vmap(lambda a: product(a, v0)))(xs.transpose(0, 1)),
                 vmap(lambda a: product(a, v0))(xs.transpose(0, 1)), torch.float64)


def test_vmap_stacks_the_samples_of_dds(backend_spy, gen):
    """vmap of dds over x (or dy and its ReLU mask) alone makes one call on the samples stacked
    along the rows, not one per sample: the forward and dy @ W of per-sample gradients (their
    sdd: side by side, the next test). Through the eager products and the registered op
    (functionalize keeps it; called with keywords), against a loop."""
    from torch.func import functionalize, grad, vmap

    m, values, x, dy = _grad_inputs((4, 4), "sparse", (3, 3), gen, batch=3)
    Mp, Kp, _, _ = _sizes(m)
    topo = m.topology()
    v0, x0, dy0 = values.detach(), x.detach(), dy.detach()
    xs = torch.stack([x0, 2 * x0, -x0, x0.flip(0)], dim=1)  # [3, 4 samples, Kp]
    dys = torch.stack([dy0, -dy0, 0.5 * dy0, dy0.flip(0)])
    masks = (dys > 0.3).to(dys.dtype)

    def nt(a, v=v0):
        return ops.dds_call(a, v, *topo, Mp, Kp, True, "cpu", None, None, True)

    def nn_masked(a, mask):
        return ops.dds_call(a, v0, *topo, Mp, Kp, False, "cpu", None, None, False, mask)

    for fn, in_dims, args, expected in (
            (nt, (1,), (xs,), [nt(xs[:, i]) for i in range(4)]),
            (nn_masked, (0, 0), (dys, masks), [nn_masked(dys[i], masks[i]) for i in range(4)]),
            (nn_masked, (0, None), (dys, masks[0]),
             [nn_masked(dys[i], masks[0]) for i in range(4)]),
            (nn_masked, (None, 0), (dy0, masks), [nn_masked(dy0, masks[i]) for i in range(4)])):
        backend_spy.calls.clear()
        out = vmap(fn, in_dims=in_dims)(*args)
        assert backend_spy.calls == [("cpu", "dds")]
        assert_close(out, torch.stack(expected), torch.float64)
    # registered op: functionalize keeps it under vmap; relu and backend as keywords
    registered = lambda a: ops.dds(a, v0, *topo, Mp, Kp, True, relu=True,  # noqa: E731
                                   backend="cpu")
    backend_spy.calls.clear()
    out = functionalize(vmap(registered, in_dims=1))(xs)
    assert backend_spy.calls == [("cpu", "dds")]
    assert_close(out, vmap(nt, in_dims=1)(xs), torch.float64)
    # per-sample gradients: forward and dy @ W stacked, the samples' sdd side by side
    loss = lambda v, a: nt(a.unsqueeze(0), v).square().sum()  # noqa: E731
    backend_spy.calls.clear()
    per_sample = vmap(grad(loss), in_dims=(None, 0))(v0, x0)
    assert sorted(backend_spy.calls) == [("cpu", "dds"), ("cpu", "sdd")]
    for i in range(3):
        assert_close(per_sample[i], grad(loss)(v0, x0[i]), torch.float64)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's forward AD uses torch.jit.script
def test_vmap_lays_batched_weights_and_sdd_side_by_side(backend_spy, gen):
    """vmap of a linear dds with batched weights (ensembles, Jacobians over W), with x shared or
    batched, either transpose, bias, fused ReLU and ReLU mask, and of sdd with either or both
    operands batched: one call on the samples side by side over copies of the topology, as a
    loop; through the eager products and the registered ops; Jacobians over the weights."""
    from torch.func import functionalize, jacfwd, jacrev, vmap

    # several blocks a row and a column, an empty block row: copies that share block rows
    # interleave in them
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    m = sparsekern.BlockSparseMatrix.from_block_mask(
        mask, (2, 3), (6, 12), values=randn(int(mask.sum()), 2, 3, generator=gen))
    Mp, Kp, bm, bk = _sizes(m)
    topo = m.topology()
    v0, x0, dy0 = m.values, randn(5, Kp, generator=gen), randn(5, Mp, generator=gen)
    V = 3
    vs = torch.stack([v0, -2 * v0, v0.flip(0)])
    xs, dys = torch.stack([x0, x0.flip(0), 3 * x0]), torch.stack([dy0, -dy0, dy0.flip(0)])
    bias = randn(Mp, generator=gen)
    relu_mask = (dys > 0.2).to(dys.dtype)

    def nt(a, v):
        return ops.dds_call(a, v, *topo, Mp, Kp, True, "cpu", None, bias, True)

    def nn_masked(a, v, msk):
        return ops.dds_call(a, v, *topo, Mp, Kp, False, "cpu", None, None, False, msk)

    def sdd(a, b):
        return ops.sdd_call(a, b, *topo, bm, bk, "cpu")

    def pick(t, d, i):
        return t if d is None else t.select(d, i)

    for fn, in_dims, args, op in (
            (nt, (None, 0), (x0, vs), "dds"), (nt, (0, 0), (xs, vs), "dds"),
            (nt, (None, 1), (x0, vs.movedim(0, 1)), "dds"),
            (nn_masked, (None, 0, None), (dy0, vs, None), "dds"),
            (nn_masked, (0, 0, 0), (dys, vs, relu_mask), "dds"),
            (nn_masked, (None, 0, 0), (dy0, vs, relu_mask), "dds"),
            (sdd, (0, 0), (dys, xs), "sdd"), (sdd, (0, None), (dys, x0), "sdd"),
            (sdd, (None, 0), (dy0, xs), "sdd"), (sdd, (1, 0), (dys.movedim(0, 1), xs), "sdd")):
        backend_spy.calls.clear()
        out = vmap(fn, in_dims=in_dims)(*args)
        assert backend_spy.calls == [("cpu", op)], (fn, in_dims)
        expected = torch.stack([fn(*(pick(t, d, i) if t is not None else None
                                     for t, d in zip(args, in_dims))) for i in range(V)])
        assert_close(out, expected, torch.float64)
    # the registered ops (functionalize keeps them)
    backend_spy.calls.clear()
    out = functionalize(vmap(lambda a, b: ops.sdd(a, b, *topo, bm, bk, "cpu")))(dys, xs)
    assert backend_spy.calls == [("cpu", "sdd")]
    assert_close(out, vmap(sdd)(dys, xs), torch.float64)
    out = functionalize(vmap(lambda v: ops.dds(x0, v, *topo, Mp, Kp, True, "cpu")))(vs)
    assert_close(out[1], ops.dds(x0, vs[1], *topo, Mp, Kp, True, "cpu"), torch.float64)
    # Jacobians over the weights: jacrev (sdd over batched cotangents) as jacfwd
    product = lambda v: ops.dds_call(x0, v, *topo, Mp, Kp, True, "cpu")  # noqa: E731
    assert_close(jacrev(product)(v0), jacfwd(product)(v0), torch.float64)
    # a sample the op refuses gets its own message
    with pytest.raises(ValueError, match="t_offsets must be 1-D with 2 elements"):
        vmap(sdd)(dys, xs[:, :, :3])  # one sample's x: 1 block column (3 samples': 3)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's forward AD uses torch.jit.script
def test_vmap_side_by_side_edges(backend_spy, gen, monkeypatch):
    """The side-by-side layout's edges: samples of 0 rows, nnz=0 (Hessian over the weights), a
    shared width-1 dy with batched weights and ReLU masks (the expanded dy has stride 0), the
    reference backend (which would compute V^2 times the dense matrix: one call per sample),
    int32 indices that would overflow (one call per sample)."""
    from torch.func import hessian, vmap

    mask = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    m = sparsekern.BlockSparseMatrix.from_block_mask(
        mask, (2, 4), (6, 12), values=randn(int(mask.sum()), 2, 4, generator=gen))
    Mp, Kp, bm, bk = _sizes(m)
    topo = m.topology()
    vs = torch.stack([m.values, -m.values])

    def nt(a, v, backend="cpu"):
        return ops.dds_call(a, v, *topo, Mp, Kp, True, backend)

    def sdd(a, b, backend="cpu"):
        return ops.sdd_call(a, b, *topo, bm, bk, backend)
    assert vmap(nt, in_dims=(None, 0))(randn(0, Kp), vs).shape == (2, 0, Mp)
    assert vmap(sdd)(randn(2, 0, Mp), randn(2, 0, Kp)).shape == (2, *m.values.shape)
    assert vmap(sdd)(randn(2, 0, Mp), randn(2, 0, Kp)).abs().sum() == 0
    # reference: one call per sample, same results
    xs, dys = randn(2, 3, Kp, generator=gen), randn(2, 3, Mp, generator=gen)
    backend_spy.calls.clear()
    out = vmap(lambda a, b: sdd(a, b, "reference"))(dys, xs)
    assert backend_spy.calls == [("reference", "sdd")] * 2
    assert_close(out, vmap(sdd)(dys, xs), torch.float64)
    # indices past int32 (here a limit of 8): one call per sample
    with monkeypatch.context() as patch:
        patch.setattr(ops, "_INDEX_MAX", 8)
        backend_spy.calls.clear()
        assert_close(vmap(sdd)(dys, xs), out, torch.float64)
        assert backend_spy.calls == [("cpu", "sdd")] * 2
    # nnz = 0
    empty = make_matrix((2, 4), "nnz0", torch.float64, grid=(3, 3))
    e_topo = empty.topology()
    x0 = randn(3, 12, generator=gen)
    h = hessian(lambda v: ops.dds_call(x0, v, *e_topo, 6, 12, True, "cpu").square().sum())(
        empty.values)
    assert h.shape == (0, 2, 4, 0, 2, 4)
    # a width-1 dy shared by every sample, batched weights and ReLU masks
    thin = sparsekern.BlockSparseMatrix.from_block_mask(
        torch.tensor([[1, 0, 1]], dtype=torch.bool), (1, 4), (1, 12),
        values=randn(2, 1, 4, generator=gen))
    t_topo = thin.topology()
    dy = randn(5, 1, generator=gen)
    t_vs = torch.stack([thin.values, 2 * thin.values, -thin.values])
    masks = (randn(3, 5, 1, generator=gen) > 0).double()

    def nn_masked(a, v, msk):
        return ops.dds_call(a, v, *t_topo, 1, 12, False, "cpu", None, None, False, msk)
    out = vmap(nn_masked, in_dims=(None, 0, 0))(dy, t_vs, masks)
    for i in range(3):
        assert_close(out[i], nn_masked(dy, t_vs[i], masks[i]), torch.float64)
    # (and a direct call with a dy that overlaps itself)
    overlapping = randn(1, generator=gen).expand(5, 1)
    assert_close(nn_masked(overlapping, thin.values, masks[0]),
                 nn_masked(overlapping.contiguous(), thin.values, masks[0]), torch.float64)


def test_vmap_refusals_keep_the_samples_messages(gen):
    """Samples the op refuses (a 1-D x, a mask of another shape) get the op's message."""
    from torch.func import vmap

    m, values, x, dy = _grad_inputs((4, 4), "sparse", (3, 3), gen, batch=3)
    Mp, Kp, _, _ = _sizes(m)
    topo = m.topology()
    v0, x0, dy0 = values.detach(), x.detach(), dy.detach()
    dys = torch.stack([dy0, -dy0])
    masks = (dys > 0.3).to(dys.dtype)

    def nt(a, v=v0):
        return ops.dds_call(a, v, *topo, Mp, Kp, True, "cpu", None, None, True)

    def nn_masked(a, mask):
        return ops.dds_call(a, v0, *topo, Mp, Kp, False, "cpu", None, None, False, mask)

    # samples the op refuses: a 1-D x, a mask of another shape
    with pytest.raises(ValueError, match="input"):
        vmap(nt)(x0)
    with pytest.raises(ValueError, match="relu_mask must have"):
        vmap(nn_masked)(dys, masks[:, :2])
    # weights of one block too many, an int64 t_perm: one sample's messages
    vs = torch.stack([torch.cat([v0, v0[:1]]), torch.cat([v0, v0[:1]])])
    with pytest.raises(ValueError, match=f"col_idx must be 1-D with {v0.shape[0] + 1}"):
        vmap(lambda v: nt(x0, v))(vs)
    ro, ci, ri, to, tr, tp = topo
    with pytest.raises(TypeError, match="t_perm must be int32"):
        vmap(lambda v: ops.dds_call(x0, v, ro, ci, ri, to, tr, tp.long(), Mp, Kp, False,
                                    "cpu"))(torch.stack([v0, v0]))


def test_opcheck_dds_with_relu(gen):
    m = make_matrix((8, 8), "sparse", torch.float32, grid=(3, 4))
    Mp, Kp, _, _ = _sizes(m)
    ro, ci, ri, to, tr, tp = m.topology()
    x = randn(5, Kp, dtype=torch.float32, generator=gen).requires_grad_()
    dy = randn(5, Mp, dtype=torch.float32, generator=gen).requires_grad_()
    mask = randn(5, Mp, dtype=torch.float32, generator=gen)
    values = m.values.clone().requires_grad_()
    op = torch.ops.sparsekern.dds.default
    _opcheck(op, (x, values, *m.topology(), Mp, Kp, True, "cpu", None, None, True))
    _opcheck(op, (dy, values, *m.topology(), Mp, Kp, False, "cpu", None, None, False, mask))
    _opcheck(dds_native.default, (x.detach(), m.values, ro, ci, to, tr, tp, Mp, Kp, True, None,
                                  None, True))
    _opcheck(dds_native.default, (dy.detach(), m.values, ro, ci, to, tr, tp, Mp, Kp, False, None,
                                  None, False, mask))


def test_error_bad_relu_arguments(gen):
    m = make_matrix((4, 4), "sparse", torch.float32, grid=(3, 4))
    Mp, Kp, _, _ = _sizes(m)
    topo = m.topology()
    x = randn(5, Kp, dtype=torch.float32, generator=gen)
    dy = randn(5, Mp, dtype=torch.float32, generator=gen)
    with pytest.raises(ValueError, match="relu applies to x @ W"):
        ops.dds(dy, m.values, *topo, Mp, Kp, False, "cpu", None, None, True)
    with pytest.raises(ValueError, match="relu_mask applies to dy @ W"):
        ops.dds(x, m.values, *topo, Mp, Kp, True, "cpu", None, None, False, x)
    with pytest.raises(ValueError, match="shape"):
        ops.dds(dy, m.values, *topo, Mp, Kp, False, "cpu", None, None, False, dy[:4])
    with pytest.raises(TypeError, match="relu_mask"):
        ops.dds(dy, m.values, *topo, Mp, Kp, False, "cpu", None, None, False, dy.double())


def test_error_bad_bias(gen):
    m = make_matrix((4, 4), "sparse", torch.float32, grid=(3, 4))
    Mp, Kp, _, _ = _sizes(m)
    ro, ci, ri, to, tr, tp = m.topology()
    x = randn(5, Kp, dtype=torch.float32, generator=gen)
    dy = randn(5, Mp, dtype=torch.float32, generator=gen)
    b = torch.zeros(Mp)
    for bad, match in ((torch.zeros(Mp + 1), "bias"), (torch.zeros(1, Mp), "bias"),
                       (b.double(), "dtype")):
        with pytest.raises((ValueError, TypeError), match=match):
            ops.dds(x, m.values, *m.topology(), Mp, Kp, True, "cpu", None, bad)
        with pytest.raises((ValueError, TypeError), match=match):
            dds_native(x, m.values, ro, ci, to, tr, tp, Mp, Kp, True, None, bad)
    with pytest.raises(ValueError, match="trans_w=True"):
        ops.dds(dy, m.values, *m.topology(), Mp, Kp, False, "cpu", None, torch.zeros(Kp))
    with pytest.raises(ValueError, match="trans_w=True"):
        dds_native(dy, m.values, ro, ci, to, tr, tp, Mp, Kp, False, None, torch.zeros(Kp))


# ---- 3. opcheck ----------------------------------------------------------------------------------
OPCHECK_CASES = [((4, 4), "sparse", torch.float64), ((16, 8), "dense", torch.float32),
                 ((8, 8), "sparse", torch.float32), ((3, 5), "nnz0", torch.float64)]
OPCHECK_IDS = [f"{bs[0]}x{bs[1]}-{kind}-{str(dt)[6:]}" for bs, kind, dt in OPCHECK_CASES]


def _opcheck(op, args):
    torch.library.opcheck(op, args, raise_exception=True)


@pytest.mark.parametrize("block_shape,kind,dtype", OPCHECK_CASES, ids=OPCHECK_IDS)
def test_opcheck_public_ops(block_shape, kind, dtype, gen):
    m = make_matrix(block_shape, kind, dtype, grid=(3, 4))
    Mp, Kp, bm, bk = _sizes(m)
    topo = m.topology()
    values = m.values.clone().requires_grad_()
    x = randn(5, Kp, dtype=dtype, generator=gen).requires_grad_()
    dy = randn(5, Mp, dtype=dtype, generator=gen).requires_grad_()
    _opcheck(torch.ops.sparsekern.dds.default, (x, values, *topo, Mp, Kp, True))
    _opcheck(torch.ops.sparsekern.dds.default, (dy, values, *topo, Mp, Kp, False))
    _opcheck(torch.ops.sparsekern.dds.default, (x, values, *topo, Mp, Kp, True, "cpu"))
    _opcheck(torch.ops.sparsekern.sdd.default, (dy, x, *topo, bm, bk))
    _opcheck(torch.ops.sparsekern.sdd.default, (dy, x, *topo, bm, bk, "reference"))


@pytest.mark.parametrize("block_shape,kind,dtype", OPCHECK_CASES, ids=OPCHECK_IDS)
def test_opcheck_native_ops(block_shape, kind, dtype, gen):
    m = make_matrix(block_shape, kind, dtype, grid=(3, 4))
    Mp, Kp, bm, bk = _sizes(m)
    ro, ci, ri, to, tr, tp = m.topology()
    x = randn(5, Kp, dtype=dtype, generator=gen)
    dy = randn(5, Mp, dtype=dtype, generator=gen)
    _opcheck(dds_native.default, (x, m.values, ro, ci, to, tr, tp, Mp, Kp, True))
    _opcheck(dds_native.default, (dy, m.values, ro, ci, to, tr, tp, Mp, Kp, False))
    _opcheck(sdd_native.default, (dy, x, ri, ci, bm, bk))
    # and the native results are right, not only well-formed
    assert_close(dds_native(x, m.values, ro, ci, to, tr, tp, Mp, Kp, True),
                 oracle_dds(x, m.values, ro, ci, Mp, Kp, True), dtype)
    assert_close(dds_native(dy, m.values, ro, ci, to, tr, tp, Mp, Kp, False),
                 oracle_dds(dy, m.values, ro, ci, Mp, Kp, False), dtype)
    assert_close(sdd_native(dy, x, ri, ci, bm, bk), oracle_sdd(dy, x, ri, ci, bm, bk), dtype)


# ---- 4. bad inputs -------------------------------------------------------------------------------
@pytest.fixture
def w44():
    """A float32 4x4-block matrix [12, 16] with 3 block rows and 4 block columns."""
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    values = torch.randn(int(mask.sum()), 4, 4, generator=torch.Generator().manual_seed(3))
    return sparsekern.BlockSparseMatrix.from_block_mask(mask, (4, 4), (12, 16), values=values)


def _replace(topo, index, tensor):
    topo = list(topo)
    topo[index] = tensor
    return topo


def test_error_wrong_feature_count(w44):
    topo = w44.topology()
    with pytest.raises(ValueError, match="input has 15 features, expected 16"):
        ops.dds(torch.randn(3, 15), w44.values, *topo, 12, 16, True, "cpu")
    with pytest.raises(ValueError, match="input has 16 features, expected 12"):
        ops.dds(torch.randn(3, 16), w44.values, *topo, 12, 16, False, "cpu")
    with pytest.raises(ValueError, match="batch 3 and 4"):
        ops.sdd(torch.randn(3, 12), torch.randn(4, 16), *topo, 4, 4, "cpu")


@pytest.mark.parametrize("shape", [(16,), (2, 3, 16), ()], ids=["1d", "3d", "0d"])
def test_error_input_not_2d(w44, shape):
    topo = w44.topology()
    with pytest.raises(ValueError, match="must be 2-D"):
        ops.dds(torch.randn(shape), w44.values, *topo, 12, 16, True, "cpu")
    with pytest.raises(ValueError, match="must be 2-D"):
        ops.sdd(torch.randn(shape), torch.randn(3, 16), *topo, 4, 4, "cpu")
    with pytest.raises(ValueError, match="must be 2-D"):
        ops.sdd(torch.randn(3, 12), torch.randn(shape), *topo, 4, 4, "cpu")


def test_error_values_not_3d(w44):
    with pytest.raises(ValueError, match=r"values must be \[nnz, bm, bk\]"):
        ops.dds(torch.randn(3, 16), w44.values[0], *w44.topology(), 12, 16, True, "cpu")


@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
def test_error_mixed_dtypes(w44, backend):
    topo = w44.topology()
    with pytest.raises(TypeError, match="float32.*float64"):
        ops.dds(torch.randn(3, 16), w44.values.double(), *topo, 12, 16, True, backend)
    with pytest.raises(TypeError, match="float64.*float32"):
        ops.dds(torch.randn(3, 12).double(), w44.values, *topo, 12, 16, False, backend)
    with pytest.raises(TypeError, match="dtype"):
        ops.sdd(torch.randn(3, 12), torch.randn(3, 16).double(), *topo, 4, 4, backend)


@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
def test_error_int_input(w44, backend):
    topo = w44.topology()
    with pytest.raises(TypeError, match="torch.int64"):
        ops.dds(torch.ones(3, 16, dtype=torch.long), w44.values, *topo, 12, 16, True, backend)
    with pytest.raises(TypeError, match="floating point"):
        ops.sdd(torch.ones(3, 12, dtype=torch.long), torch.ones(3, 16, dtype=torch.long),
                *topo, 4, 4, backend)


def test_error_cpu_backend_refuses_int_values(w44):
    with pytest.raises(RuntimeError, match="'cpu' cannot run dds: supports float32 and float64"):
        ops.dds(torch.ones(3, 16, dtype=torch.long), w44.values.long(), *w44.topology(), 12, 16,
                True, "cpu")


@pytest.mark.parametrize("bad", [4, 100, -1])
def test_error_col_idx_out_of_range(w44, bad):
    col = w44.col_idx.clone()
    col[2] = bad
    topo = _replace(w44.topology(), 1, col)
    with pytest.raises(IndexError, match=f"index {bad} at position 2 is out of range"):
        ops.dds(torch.randn(3, 16), w44.values, *topo, 12, 16, True, "cpu")
    with pytest.raises(IndexError, match=f"col_idx {bad} at position 2 is out of range"):
        ops.sdd(torch.randn(3, 12), torch.randn(3, 16), *topo, 4, 4, "cpu")


def test_error_row_idx_out_of_range_sdd(w44):
    rows = w44.row_idx.clone()
    rows[0] = 3
    topo = _replace(w44.topology(), 2, rows)
    with pytest.raises(IndexError, match="row_idx 3 at position 0 is out of range"):
        ops.sdd(torch.randn(3, 12), torch.randn(3, 16), *topo, 4, 4, "cpu")


def test_error_decreasing_row_offsets(w44):
    # starts at 0 and ends at nnz=6, but decreases in the middle
    topo = _replace(w44.topology(), 0, torch.tensor([0, 4, 3, 6], dtype=torch.int32))
    with pytest.raises(IndexError, match="non-decreasing"):
        ops.dds(torch.randn(3, 16), w44.values, *topo, 12, 16, True, "cpu")
    topo = _replace(w44.topology(), 0, torch.tensor([0, 3, 3, 5], dtype=torch.int32))
    with pytest.raises(IndexError, match="end at nnz=6"):
        ops.dds(torch.randn(3, 16), w44.values, *topo, 12, 16, True, "cpu")


def test_error_bad_transpose_offsets(w44):
    topo = _replace(w44.topology(), 3, torch.tensor([0, 2, 1, 3, 6], dtype=torch.int32))
    with pytest.raises(IndexError, match="non-decreasing"):
        ops.dds(torch.randn(3, 12), w44.values, *topo, 12, 16, False, "cpu")
    perm = w44.t_perm.clone()
    perm[0] = 6
    with pytest.raises(IndexError, match="permutation entry 6 is out of range"):
        ops.dds(torch.randn(3, 12), w44.values, *_replace(w44.topology(), 5, perm), 12, 16,
                False, "cpu")


@pytest.mark.parametrize("index,name", list(enumerate(
    ["row_offsets", "col_idx", "row_idx", "t_offsets", "t_rows", "t_perm"])))
def test_error_int64_topology(w44, index, name):
    topo = _replace(w44.topology(), index, w44.topology()[index].long())
    with pytest.raises(TypeError, match=f"{name} must be int32, got torch.int64"):
        ops.dds(torch.randn(3, 16), w44.values, *topo, 12, 16, True, "cpu")
    with pytest.raises(TypeError, match=f"{name} must be int32"):
        ops.sdd(torch.randn(3, 12), torch.randn(3, 16), *topo, 4, 4, "reference")


def test_error_topology_wrong_length(w44):
    topo = _replace(w44.topology(), 1, w44.col_idx[:-1].contiguous())
    with pytest.raises(ValueError, match="col_idx must be 1-D with 6 elements"):
        ops.dds(torch.randn(3, 16), w44.values, *topo, 12, 16, True, "cpu")


def test_error_block_shape_vs_matrix_shape(w44):
    with pytest.raises(ValueError, match=r"not a multiple of the block shape \(4, 4\)"):
        ops.dds(torch.randn(3, 18), w44.values, *w44.topology(), 12, 18, True, "cpu")
    with pytest.raises(ValueError, match="not a multiple of the block shape"):
        ops.sdd(torch.randn(3, 12), torch.randn(3, 16), *w44.topology(), 5, 4, "cpu")
    with pytest.raises(ValueError, match="not a multiple of the block shape"):
        ops.sdd(torch.randn(3, 12), torch.randn(3, 16), *w44.topology(), 0, 4, "cpu")


def test_error_unknown_backend(w44):
    with pytest.raises(ValueError, match="unknown sparsekern backend 'tpu'.*'cpu'"):
        ops.dds(torch.randn(3, 16), w44.values, *w44.topology(), 12, 16, True, "tpu")
    with pytest.raises(ValueError, match="unknown sparsekern backend 'tpu'"):
        ops.sdd(torch.randn(3, 12), torch.randn(3, 16), *w44.topology(), 4, 4, "tpu")
    with pytest.raises(ValueError, match="unknown sparsekern backend 'tpu'"):
        with sparsekern.backend("tpu"):
            pass


def test_failed_scope_leaves_no_scope_behind(w44, backend_spy):
    with pytest.raises(ValueError, match="unknown sparsekern backend"):
        with sparsekern.backend("reference"):
            with sparsekern.backend("tpu"):
                pass
    ops.dds(torch.randn(3, 16), w44.values, *w44.topology(), 12, 16, True)
    assert backend_spy.calls == [("cpu", "dds")]


def test_error_forcing_cuda_backend_on_cpu_tensors(w44):
    x = torch.randn(3, 16)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run dds: .+"):
        ops.dds(x, w44.values, *w44.topology(), 12, 16, True, "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run sdd: .+"):
        ops.sdd(torch.randn(3, 12), x, *w44.topology(), 4, 4, "cuda")
    with sparsekern.backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run dds: .+"):
            ops.dds(x, w44.values, *w44.topology(), 12, 16, True)
    if sparsekern.ops.native_extension().cuda_compiled:
        with pytest.raises(RuntimeError, match="runs on CUDA tensors only, got cpu"):
            ops.dds(x, w44.values, *w44.topology(), 12, 16, True, "cuda")


# native ops called directly: every bad index must raise, never reach a kernel
def _native_dds_args(w, trans_w=True):
    ro, ci, _, to, tr, tp = w.topology()
    a = torch.randn(3, 16 if trans_w else 12)
    return [a, w.values, ro, ci, to, tr, tp, 12, 16, trans_w]


@pytest.mark.parametrize("case", [
    "col_big", "col_neg", "row_offsets_end", "row_offsets_decreasing", "t_rows_big",
    "t_perm_big", "t_perm_neg", "t_offsets_end", "short_col_idx", "int64_index",
    "non_contiguous_index", "wrong_features", "mixed_dtype", "values_2d", "zero_block"])
@pytest.mark.native_errors
def test_native_dds_bad_arguments_raise(w44, case):
    trans_w = case not in ("t_rows_big", "t_perm_big", "t_perm_neg", "t_offsets_end")
    args = _native_dds_args(w44, trans_w)
    expected, match = IndexError, "out of range"
    if case == "col_big":
        args[3] = args[3].clone(); args[3][-1] = 1 << 20
    elif case == "col_neg":
        args[3] = args[3].clone(); args[3][0] = -3
    elif case == "row_offsets_end":
        args[2] = args[2].clone(); args[2][-1] = 1000; match = "end at nnz"
    elif case == "row_offsets_decreasing":
        args[2] = torch.tensor([0, 4, 3, 6], dtype=torch.int32); match = "non-decreasing"
    elif case == "t_rows_big":
        args[5] = args[5].clone(); args[5][1] = 3
    elif case == "t_perm_big":
        args[6] = args[6].clone(); args[6][1] = 6
    elif case == "t_perm_neg":
        args[6] = args[6].clone(); args[6][1] = -1
    elif case == "t_offsets_end":
        args[4] = torch.tensor([0, 2, 2, 2, 2], dtype=torch.int32); match = "end at nnz"
    elif case == "short_col_idx":
        args[3] = args[3][:-1].contiguous(); expected, match = ValueError, "1-D with 6"
    elif case == "int64_index":
        args[3] = args[3].long(); expected, match = TypeError, "must be int32"
    elif case == "non_contiguous_index":
        args[3] = torch.stack([args[3], args[3]], 1)[:, 0]; expected, match = ValueError, "contig"
    elif case == "wrong_features":
        args[0] = torch.randn(3, 13); expected, match = ValueError, "13 features"
    elif case == "mixed_dtype":
        args[0] = args[0].double(); expected, match = TypeError, "dtype"
    elif case == "values_2d":
        args[1] = args[1][0]; expected, match = ValueError, r"\[nnz, bm, bk\]"
    elif case == "zero_block":
        args[1] = torch.randn(6, 0, 4); expected, match = ValueError, "block shape"
    with pytest.raises(expected, match=match):
        dds_native(*args)


@pytest.mark.parametrize("case", ["row_big", "col_big", "row_neg", "length_mismatch", "int64",
                                  "batch_mismatch", "width", "int_operands", "mixed_dtype"])
@pytest.mark.native_errors
def test_native_sdd_bad_arguments_raise(w44, case):
    a, b = torch.randn(3, 12), torch.randn(3, 16)
    ri, ci = w44.row_idx.clone(), w44.col_idx.clone()
    bm, bk = 4, 4
    expected, match = IndexError, "out of range"
    if case == "row_big":
        ri[-1] = 3
    elif case == "col_big":
        ci[0] = 1 << 30
    elif case == "row_neg":
        ri[0] = -1
    elif case == "length_mismatch":
        ci = ci[:-1].contiguous(); expected, match = ValueError, "1-D with 6"
    elif case == "int64":
        ri = ri.long(); expected, match = TypeError, "int32"
    elif case == "batch_mismatch":
        b = torch.randn(2, 16); expected, match = ValueError, "batch 3 and 2"
    elif case == "width":
        bm = 5; expected, match = ValueError, "not multiples of the block shape"
    elif case == "int_operands":
        a, b = a.long(), b.long(); expected, match = TypeError, "floating point"
    elif case == "mixed_dtype":
        b = b.double(); expected, match = TypeError, "dtype"
    with pytest.raises(expected, match=match):
        sdd_native(a, b, ri, ci, bm, bk)


# ---- backend scopes and autograd pinning ---------------------------------------------------------
def test_backend_scope_forces_backend(backend_spy, w44):
    x = torch.randn(3, 16)
    with sparsekern.backend("reference"):
        y_ref = ops.dds(x, w44.values, *w44.topology(), 12, 16, True)
    y_cpu = ops.dds(x, w44.values, *w44.topology(), 12, 16, True)
    assert backend_spy.calls == [("reference", "dds"), ("cpu", "dds")]
    assert_close(y_ref, y_cpu.double())


def test_backend_scope_nesting_and_per_call_override(backend_spy, w44):
    x = torch.randn(3, 16)
    topo = w44.topology()
    with sparsekern.backend("reference"):
        with sparsekern.backend("cpu"):
            ops.dds(x, w44.values, *topo, 12, 16, True)
        ops.dds(x, w44.values, *topo, 12, 16, True)
        ops.dds(x, w44.values, *topo, 12, 16, True, "cpu")  # explicit per-call name wins
    assert [n for n, _ in backend_spy.calls] == ["cpu", "reference", "cpu"]


def test_backend_scope_is_restored_after_exception(w44, backend_spy):
    with pytest.raises(RuntimeError, match="boom"):
        with sparsekern.backend("reference"):
            raise RuntimeError("boom")
    ops.dds(torch.randn(3, 16), w44.values, *w44.topology(), 12, 16, True)
    assert backend_spy.calls == [("cpu", "dds")]


@pytest.mark.parametrize("block_shape", [(1, 1), (3, 5), (16, 16), (16, 8)], ids=str)
def test_single_thread_matches_oracle(block_shape, gen):
    """The kernels' scheduling over threads must not change results (1 thread vs the default)."""
    m = make_matrix(block_shape, "sparse", torch.float32)
    Mp, Kp, bm, bk = _sizes(m)
    topo = m.topology()
    x = randn(37, Kp, dtype=torch.float32, generator=gen)
    dy = randn(37, Mp, dtype=torch.float32, generator=gen)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            results.append((ops.dds(x, m.values, *topo, Mp, Kp, True, "cpu"),
                            ops.dds(dy, m.values, *topo, Mp, Kp, False, "cpu"),
                            ops.sdd(dy, x, *topo, bm, bk, "cpu")))
    finally:
        torch.set_num_threads(threads)
    w = oracle_dense(m.values, m.row_offsets, m.col_idx, Mp, Kp)
    for y, dx, dw in results:
        assert_close(y, x.double() @ w.t())
        assert_close(dx, dy.double() @ w)
        assert_close(dw, oracle_sdd(dy, x, m.row_idx, m.col_idx, bm, bk))


def test_backward_reuses_forward_backend(backend_spy, w44):
    x = torch.randn(5, 16, requires_grad=True)
    values = w44.values.clone().requires_grad_()
    with sparsekern.backend("reference"):
        y = ops.dds(x, values, *w44.topology(), 12, 16, True)
    y.sum().backward()  # outside the scope: still the reference backend
    assert backend_spy.calls[0] == ("reference", "dds")
    assert set(backend_spy.calls[1:]) == {("reference", "dds"), ("reference", "sdd")}
    w = oracle_dense(w44.values, w44.row_offsets, w44.col_idx, 12, 16)
    g = torch.ones(5, 12, dtype=torch.float64)
    assert_close(x.grad, g @ w, torch.float32)
    assert_close(values.grad, oracle_blocks(g.t() @ x.detach().double(), w44.row_idx,
                                            w44.col_idx, 4, 4), torch.float32)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's forward AD uses torch.jit.script
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_grad_mode_off_runs_the_products_without_autograd(backend, monkeypatch):
    """With grad mode off (inference, a backward without create_graph) the products skip the
    autograd.Function: same values, no graph. Forward-mode AD ignores grad mode, so a dual
    input still reaches an autograd.Function, whose jvp carries the tangent (not dropped)."""
    import torch.autograd.forward_ad as fwAD

    m = make_matrix((8, 8), "sparse", torch.float64, grid=(3, 3))
    topo = m.topology()
    x = torch.randn(5, 24, dtype=torch.float64)
    applied = []
    monkeypatch.setattr(ops._DdsFunction, "apply",
                        lambda *a: applied.append(1) or ops._dds_impl(*a))
    with torch.no_grad():
        y = ops.dds_call(x, m.values, *topo, 24, 24, True, backend)
    assert not applied and not y.requires_grad
    assert_close(y, ops.dds_call(x, m.values, *topo, 24, 24, True, "reference"), torch.float64)
    monkeypatch.undo()
    with fwAD.dual_level(), torch.no_grad():
        tangent = torch.randn_like(x)
        y = ops.dds_call(fwAD.make_dual(x, tangent), m.values, *topo, 24, 24, True, backend)
        assert_close(fwAD.unpack_dual(y).tangent,
                     ops.dds_call(tangent, m.values, *topo, 24, 24, True, "reference"),
                     torch.float64)
