"""sparsekern.nn.SparseLinear and sparsekern.functional.bsr_linear against nn.Linear."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import sparsekern
from sparsekern import SparseLinear, bsr_linear
from sparsekern.bsr import TOPOLOGY_FIELDS
from sparsekern.nn import conv_weight_to_gemm
from conftest import (TOPOLOGY_KINDS, assert_close, make_matrix, matrix_dense, oracle_blocks,
                      oracle_dds, padding_keep_mask, seeded_generator)


def _linear(in_f, out_f, seed, dtype=torch.float32, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias, dtype=dtype)


def _expand(block_mask, bm, bk, M, K):
    return block_mask.repeat_interleave(bm, 0).repeat_interleave(bk, 1)[:M, :K]


def _check_against_dense(layer: SparseLinear, weight: torch.Tensor, bias, x: torch.Tensor):
    """Forward and backward of `layer` against F.linear on the dense float64 `weight`.

    weight: the expected logical [out, in] matrix. Checks output, input grad, bias grad and that
    values.grad is the dense weight gradient restricted to the stored blocks (zero in padding).
    """
    dtype = layer.values.dtype
    x = x.clone().requires_grad_()
    y = layer(x)
    assert y.shape == (*x.shape[:-1], layer.out_features) and y.dtype == dtype
    g = torch.randn(y.shape, generator=seeded_generator("g", tuple(y.shape)),
                    dtype=torch.float64).to(dtype)
    layer.zero_grad(set_to_none=True)
    y.backward(g)

    w64 = weight.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y64 = F.linear(x64, w64, b64)
    y64.backward(g.double())
    assert_close(y, y64, dtype)
    assert_close(x.grad, x64.grad, dtype)
    if bias is not None:
        assert_close(layer.bias.grad, b64.grad, dtype)
    w = layer.weight
    Mp, Kp = w.padded_shape
    gw = torch.zeros(Mp, Kp, dtype=torch.float64)
    gw[: layer.out_features, : layer.in_features] = w64.grad
    bm, bk = w.block_shape
    expected = oracle_blocks(gw, w.row_idx, w.col_idx, bm, bk)
    assert_close(layer.values.grad, expected, dtype)
    pad = ~padding_keep_mask(w)
    assert not layer.values.grad[pad].any(), "gradient reaches the padding"


# ---- from_dense ----------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [(4, 4), (3, 5), (1, 1), (16, 8), (32, 32)], ids=str)
def test_from_dense_element_mask(block_size):
    lin = _linear(45, 22, 0)
    gen = seeded_generator("elem", block_size)
    mask = torch.rand(22, 45, generator=gen) < 0.15
    mask[:, :10] = False  # leaves empty block columns for the smaller blocks
    layer = SparseLinear.from_dense(lin, block_size, mask=mask)
    expected_w = lin.weight.detach() * mask
    assert torch.equal(layer.weight.to_dense(), expected_w)
    expected_blocks = torch.zeros(layer.weight.block_grid, dtype=torch.bool)
    for i, j in mask.nonzero().tolist():
        expected_blocks[i // block_size[0], j // block_size[1]] = True
    assert torch.equal(layer.weight.block_mask(), expected_blocks)
    x = torch.randn(7, 45, generator=gen)
    _check_against_dense(layer, expected_w, lin.bias, x)


@pytest.mark.parametrize("block_size", [(4, 4), (3, 5), (8, 16)], ids=str)
def test_from_dense_block_mask(block_size):
    lin = _linear(40, 27, 1)
    bm, bk = block_size
    grid = (-(-27 // bm), -(-40 // bk))
    gen = seeded_generator("blk", block_size)
    block_mask = torch.rand(grid, generator=gen) < 0.4
    block_mask[0, 0] = True
    block_mask[-1, :] = False  # an empty (partly padded) block row
    layer = SparseLinear.from_dense(lin, block_size, mask=block_mask)
    assert torch.equal(layer.weight.block_mask(), block_mask)
    expected_w = lin.weight.detach() * _expand(block_mask, bm, bk, 27, 40)
    assert torch.equal(layer.weight.to_dense(), expected_w)
    _check_against_dense(layer, expected_w, lin.bias, torch.randn(5, 40, generator=gen))


def test_from_dense_no_mask_uses_nonzero_blocks():
    lin = _linear(24, 16, 2)
    with torch.no_grad():
        lin.weight[0:8, 8:16] = 0   # block (0, 1) of 8x8 blocks
        lin.weight[8:16, 0:8] = 0   # block (1, 0)
        lin.weight[9, 20] = 0       # one zero in a kept block
    layer = SparseLinear.from_dense(lin, (8, 8))
    assert torch.equal(layer.weight.block_mask(),
                       torch.tensor([[True, False, True], [False, True, True]]))
    assert layer.density == pytest.approx(4 / 6)
    _check_against_dense(layer, lin.weight, lin.bias, torch.randn(9, 24))


def test_from_dense_uses_prune_weight_mask():
    lin = _linear(20, 12, 3)
    mask = torch.zeros(12, 20)
    mask[0:4, 0:5] = torch.rand(4, 5, generator=seeded_generator("p")) < 0.5
    mask[0, 0] = 1
    mask[8:12, 15:20] = 1
    with torch.no_grad():
        lin.weight[8:12, 15:20] = 0  # kept by the mask although every weight there is zero
    prune.custom_from_mask(lin, "weight", mask)
    assert hasattr(lin, "weight_mask")
    layer = SparseLinear.from_dense(lin, (4, 5))
    expected_blocks = torch.zeros(3, 4, dtype=torch.bool)
    expected_blocks[0, 0] = expected_blocks[2, 3] = True
    assert torch.equal(layer.weight.block_mask(), expected_blocks)  # the mask, not the nonzeros
    _check_against_dense(layer, lin.weight_orig * mask, lin.bias, torch.randn(6, 20))


def test_from_dense_random_unstructured_prune():
    lin = _linear(64, 32, 4)
    prune.random_unstructured(lin, "weight", amount=0.97)
    layer = SparseLinear.from_dense(lin, (8, 8))
    assert 0 < layer.weight.nnz_blocks < 32  # most 8x8 blocks are fully pruned
    _check_against_dense(layer, lin.weight, lin.bias, torch.randn(3, 64))


def test_from_dense_without_bias_and_float64():
    lin = _linear(30, 10, 5, dtype=torch.float64, bias=False)
    layer = SparseLinear.from_dense(lin, (4, 4))
    assert layer.bias is None and layer.values.dtype == torch.float64
    _check_against_dense(layer, lin.weight, None, torch.randn(4, 30, dtype=torch.float64))


def test_from_dense_copies_parameters():
    lin = _linear(16, 8, 6)
    layer = SparseLinear.from_dense(lin, (4, 4))
    x = torch.randn(2, 16)
    before = layer(x).detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
        lin.bias.add_(1.0)
    assert torch.equal(layer(x), before)


def test_from_dense_bad_mask():
    with pytest.raises(ValueError, match="mask has shape"):
        SparseLinear.from_dense(nn.Linear(12, 8), (4, 4), mask=torch.ones(5, 5))


# ---- shapes, padding -----------------------------------------------------------------------------
def test_leading_batch_dims_and_1d_input():
    lin = _linear(20, 9, 7)
    layer = SparseLinear.from_dense(lin, (4, 4))
    x = torch.randn(2, 3, 20)
    _check_against_dense(layer, lin.weight, lin.bias, x)
    assert layer(x).shape == (2, 3, 9)
    x1 = torch.randn(20)
    assert layer(x1).shape == (9,)
    assert_close(layer(x1), F.linear(x1.double(), lin.weight.double(), lin.bias.double()))
    assert layer(torch.randn(0, 20)).shape == (0, 9)


def test_non_contiguous_input():
    lin = _linear(20, 9, 8)
    layer = SparseLinear.from_dense(lin, (4, 4))
    _check_against_dense(layer, lin.weight, lin.bias, torch.randn(20, 11).t())
    _check_against_dense(layer, lin.weight, lin.bias, torch.randn(3, 40)[:, ::2])
    _check_against_dense(layer, lin.weight, lin.bias, torch.randn(5, 20, 3).transpose(1, 2))


def test_784_to_300_with_32x32_blocks_padding_stays_zero():
    torch.manual_seed(9)
    lin = nn.Linear(784, 300)
    gen = seeded_generator("784")
    block_mask = torch.rand(10, 25, generator=gen) < 0.3
    block_mask[-1, -1] = True  # the corner block: padded both ways
    layer = SparseLinear.from_dense(lin, (32, 32), mask=block_mask)
    w = layer.weight
    assert w.shape == (300, 784) and w.padded_shape == (320, 800)
    pad = ~padding_keep_mask(w)
    assert pad.any() and not layer.values[pad].any()
    expected_w = lin.weight.detach() * _expand(block_mask, 32, 32, 300, 784)
    _check_against_dense(layer, expected_w, lin.bias, torch.randn(37, 784, generator=gen))
    # train a few steps with weight decay and momentum: the padding stays exactly zero
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(5, 784, generator=gen)).square().mean().backward()
        opt.step()
    assert not layer.values[pad].any()
    assert layer.values[~pad].abs().sum() > 0


def test_constructor():
    layer = SparseLinear(784, 300, block_size=(16, 16), density=0.1)
    w = layer.weight
    assert w.shape == (300, 784) and w.block_shape == (16, 16)
    assert w.nnz_blocks == round(0.1 * 19 * 49)
    assert layer.density == pytest.approx(w.nnz_blocks / (19 * 49))
    bound = 1 / 784 ** 0.5
    assert layer.values.abs().max() <= bound and layer.values.abs().max() > bound / 2
    assert not layer.values[~padding_keep_mask(w)].any()
    assert layer.bias.shape == (300,) and layer.bias.abs().max() <= bound
    w.validate()
    square = SparseLinear(10, 10, bias=False, block_size=5, density=1.0, dtype=torch.float64)
    assert square.block_size == (5, 5) and square.bias is None
    assert square.values.dtype == torch.float64 and square.weight.nnz_blocks == 4
    assert "block_size=(5, 5)" in repr(square) and "density=1.0000" in repr(square)


def test_constructed_layer_matches_to_dense():
    layer = SparseLinear(50, 21, block_size=(3, 5), density=0.4)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear)
    assert dense.weight.shape == (21, 50)
    # to_dense goes through the package's reference; compare it with the loop oracle too
    assert_close(dense.weight, matrix_dense(layer.weight)[:21, :50])
    assert torch.equal(dense.bias, layer.bias)
    x = torch.randn(4, 50)
    _check_against_dense(layer, dense.weight, dense.bias, x)


def test_bsr_linear_functional():
    w = make_matrix((3, 5), "sparse", torch.float64, shape=(10, 17))
    values = w.values.clone().requires_grad_()
    bias = torch.randn(10, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, 17, dtype=torch.float64, requires_grad=True)
    y = bsr_linear(x, w.with_values(values), bias)
    dense = matrix_dense(w)[:10, :17]
    assert_close(y, F.linear(x.detach(), dense, bias.detach()))
    assert torch.autograd.gradcheck(
        lambda x, v, b: bsr_linear(x, w.with_values(v), b, backend="cpu"), (x, values, bias))
    with pytest.raises(ValueError, match=r"input has shape \(3, 16\), expected \[..., 17\]"):
        bsr_linear(torch.randn(3, 16, dtype=torch.float64), w)
    with pytest.raises(ValueError, match="expected"):
        bsr_linear(torch.tensor(1.0, dtype=torch.float64), w)
    with pytest.raises(TypeError, match="dtype"):
        bsr_linear(torch.randn(3, 17), w)
    with pytest.raises(ValueError, match="unknown sparsekern backend"):
        bsr_linear(torch.randn(3, 17, dtype=torch.float64), w, backend="gpu")


# ---- parameters, state_dict, dtype ---------------------------------------------------------------
def test_only_values_and_bias_are_parameters():
    layer = SparseLinear(40, 20, block_size=(4, 4), density=0.3)
    assert [n for n, _ in layer.named_parameters()] == ["values", "bias"]
    assert sorted(n for n, _ in layer.named_buffers()) == sorted(TOPOLOGY_FIELDS)
    for name in TOPOLOGY_FIELDS:
        t = getattr(layer, name)
        assert t.dtype == torch.int32 and not t.requires_grad
    n_params = sum(p.numel() for p in layer.parameters())
    assert n_params == layer.weight.nnz_blocks * 16 + 20
    no_bias = SparseLinear(40, 20, bias=False, block_size=(4, 4), density=0.3)
    assert [n for n, _ in no_bias.named_parameters()] == ["values"]
    assert set(layer.state_dict()) == {"values", "bias", *TOPOLOGY_FIELDS}


@pytest.mark.parametrize("target_density", [0.9, 0.0, 0.25])
def test_state_dict_round_trip(tmp_path, target_density):
    torch.manual_seed(10)
    src = SparseLinear(50, 30, block_size=(8, 8), density=0.25)
    path = tmp_path / "layer.pt"
    torch.save(src.state_dict(), path)
    state = torch.load(path, weights_only=True)
    dst = SparseLinear(50, 30, block_size=(8, 8), density=target_density)
    result = dst.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
        assert dst.state_dict()[key].dtype == value.dtype
    assert isinstance(dst.values, nn.Parameter) and dst.values.requires_grad
    dst.weight.validate()
    x = torch.randn(6, 50)
    assert torch.equal(dst(x), src(x))
    # the loaded layer trains: its optimizer sees the new values
    opt = torch.optim.SGD(dst.parameters(), lr=0.1)
    dst(x).sum().backward()
    opt.step()
    assert not torch.equal(dst.values, src.values)


def test_state_dict_into_module_with_other_block_size():
    src = SparseLinear(50, 30, block_size=(8, 8), density=0.5)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = SparseLinear(50, 30, block_size=(4, 4), density=0.5)
    dst.load_state_dict(torch.load(buf, weights_only=True))
    assert dst.block_size == (8, 8)
    x = torch.randn(3, 50)
    assert torch.equal(dst(x), src(x))


def test_state_dict_from_dense_converted_layer():
    lin = _linear(33, 17, 11)
    src = SparseLinear.from_dense(lin, (4, 8), mask=torch.rand(17, 33) < 0.2)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = SparseLinear(33, 17, block_size=(4, 8), density=0.9)
    dst.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(3, 33)
    assert torch.equal(dst(x), src(x))


def test_state_dict_of_another_shape_is_rejected():
    src = SparseLinear(50, 30, bias=False, block_size=(8, 8), density=0.5)
    dst = SparseLinear(50, 40, bias=False, block_size=(8, 8), density=0.5)
    with pytest.raises((RuntimeError, ValueError)):
        dst.load_state_dict(src.state_dict())


@pytest.mark.parametrize("convert", ["double", "to_dtype"])
def test_double(convert):
    torch.manual_seed(12)
    layer = SparseLinear(30, 14, block_size=(4, 4), density=0.5)
    dense32 = layer.to_dense()
    layer = layer.double() if convert == "double" else layer.to(torch.float64)
    assert layer.values.dtype == torch.float64 and layer.bias.dtype == torch.float64
    assert isinstance(layer.values, nn.Parameter)
    for name in TOPOLOGY_FIELDS:
        assert getattr(layer, name).dtype == torch.int32
    x = torch.randn(5, 30, dtype=torch.float64)
    _check_against_dense(layer, dense32.weight.double(), dense32.bias.double(), x)
    back = layer.float()
    assert back.values.dtype == torch.float32
    assert back(torch.randn(2, 30)).dtype == torch.float32


# ---- backend choice ------------------------------------------------------------------------------
def test_backend_scope_reference_gives_same_result(backend_spy):
    torch.manual_seed(13)
    layer = SparseLinear(40, 24, block_size=(4, 8), density=0.4)
    x = torch.randn(6, 40, requires_grad=True)
    y_auto = layer(x)
    g_auto = torch.autograd.grad(y_auto.square().sum(), [x, layer.values, layer.bias])
    assert backend_spy.names() == {"cpu"}
    backend_spy.calls.clear()
    with sparsekern.backend("reference"):
        y_ref = layer(x)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x, layer.values, layer.bias])
    assert backend_spy.names() == {"reference"}  # backward outside the scope too
    assert_close(y_ref, y_auto.double())
    for a, b in zip(g_ref, g_auto):
        assert_close(a, b.double())


def test_layer_backend_argument(backend_spy):
    lin = _linear(20, 8, 14)
    layer = SparseLinear.from_dense(lin, (4, 4), backend="reference")
    y = layer(torch.randn(3, 20))
    assert backend_spy.calls == [("reference", "dds")]
    assert y.shape == (3, 8)
    bad = SparseLinear.from_dense(lin, (4, 4), backend="nope")
    with pytest.raises(ValueError, match="unknown sparsekern backend 'nope'"):
        bad(torch.randn(3, 20))


# ---- torch.autocast ------------------------------------------------------------------------------
def _autocast_models(seed):
    """A dense layer feeding a sparse one (the sparse one gets autocast's bfloat16 activations
    and holds float32 weights), Linear and Conv2d, and the same models with the sparse layers
    made dense; with their inputs."""
    torch.manual_seed(seed)
    linear = nn.Sequential(nn.Linear(24, 32), SparseLinear(32, 16, block_size=(8, 8), density=0.5))
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), sparsekern.SparseConv2d(
        8, 8, 3, padding=1, block_size=(4, 4), density=0.5))
    pairs = []
    for model, x in ((linear, torch.randn(6, 24)), (conv, torch.randn(2, 3, 6, 6))):
        dense = nn.Sequential(model[0], model[1].to_dense())
        pairs.append((model, dense, x))
    return pairs


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_autocast_like_the_dense_layers(backend, backend_spy):
    """Under torch.autocast (bfloat16 on the CPU) the sparse layers take the previous layer's
    bfloat16 output with their float32 weights (a TypeError before) and cast as autocast casts:
    to bfloat16 where the backend that runs them in float32 takes it (the reference), else to
    float32 ("auto" and "cpu": the C++ kernels, float32/float64 only, keep the layer rather
    than the reference's dense product). Their weights' gradients stay float32 and match the
    dense layers'. Outside autocast, and for float64 layers inside it, nothing is cast."""
    expected = torch.bfloat16 if backend == "reference" else torch.float32
    for model, dense, x in _autocast_models(21):
        model[1].backend = backend
        backend_spy.calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_dense = model(x), dense(x)
        assert y.dtype == expected and y_dense.dtype == torch.bfloat16
        assert backend_spy.names() == {"reference" if backend == "reference" else "cpu"}
        torch.testing.assert_close(y.float(), y_dense.float(), rtol=2e-2, atol=2e-2)
        grads = torch.autograd.grad(y.float().square().sum(), list(model[1].parameters()))
        grads_dense = torch.autograd.grad(y_dense.float().square().sum(),
                                          list(dense[1].parameters()))
        assert all(g.dtype == torch.float32 for g in grads)
        # the weight's gradient on its stored blocks, the bias's whole
        blocks = model[1].weight.with_values(grads[0]).to_dense()
        mask = model[1].weight.with_values(torch.ones_like(grads[0])).to_dense().bool()
        weight_grad = grads_dense[0]
        if weight_grad.dim() == 4:  # [C_out, C_in, R, S] -> the GEMM matrix [C_out, R*S*C_in]
            weight_grad = conv_weight_to_gemm(weight_grad)
        torch.testing.assert_close(blocks, weight_grad * mask, rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(grads[1], grads_dense[1], rtol=3e-2, atol=3e-2)
        assert model(x).dtype == torch.float32  # autocast off again
        model64, x64 = model[1].double(), model[0](x).detach().double()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model64(x64).dtype == torch.float64


def test_autocast_dtype_follows_the_backend():
    """backends.autocast_dtype: autocast's dtype where the backend that runs the layer in
    float32 runs it in that dtype too; float32 where it refuses it or "auto" would move to
    another backend for it."""
    from sparsekern import backends
    x = torch.randn(2, 8)
    for requested, low, expected in (("auto", torch.bfloat16, torch.float32),
                                     ("cpu", torch.float16, torch.float32),
                                     ("reference", torch.bfloat16, torch.bfloat16),
                                     ("reference", torch.float16, torch.float16)):
        assert backends.autocast_dtype(requested, x, low, False, (4, 4)) == expected
    with sparsekern.backend("reference"):
        assert backends.autocast_dtype("auto", x, torch.bfloat16, True, (4, 4)) == torch.bfloat16


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_torch_compile_under_autocast_matches_eager(backend):
    """The autocast casts traced (fullgraph): float32 on the C++ backend, bfloat16 on the
    reference, as in eager mode."""
    torch._dynamo.reset()
    for model, _, x in _autocast_models(22):
        model[1].backend = backend
        compiled = torch.compile(model, fullgraph=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_eager, y_comp = model(x), compiled(x)
        assert y_comp.dtype == y_eager.dtype == (
            torch.bfloat16 if backend == "reference" else torch.float32)
        torch.testing.assert_close(y_comp, y_eager)


# ---- torch.func ----------------------------------------------------------------------------------
def test_torch_func_transforms_of_a_sparse_model():
    """torch.func over a model of sparse layers (strided conv and linear, fused ReLUs), float64:
    grad of the input and of the parameters (functional_call) as autograd's, per-sample
    gradients (vmap of grad) as a loop's, jacfwd as jacrev, jvp as finite differences, and a
    forward-over-reverse Hessian-vector product as finite differences of the gradient."""
    from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

    torch.manual_seed(24)
    model = nn.Sequential(
        sparsekern.SparseConv2d(8, 8, 3, stride=2, padding=1, block_size=(4, 4), density=0.5,
                                activation="relu"),
        nn.Flatten(), SparseLinear(8 * 2 * 2, 6, block_size=(2, 4), density=0.5,
                                   activation="relu"),
        SparseLinear(6, 5, block_size=(3, 3), density=0.6)).double()
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(p, xs):
        return functional_call(model, p, (xs,)).square().sum()
    g_x, g_p = grad(loss, argnums=(1, 0))(params, x)
    xr = x.clone().requires_grad_()
    expected = torch.autograd.grad(loss(dict(model.named_parameters()), xr),
                                   [xr, *model.parameters()])
    assert_close(g_x, expected[0])
    for got, want in zip(g_p.values(), expected[1:]):
        assert_close(got, want)
    per_sample = vmap(grad(lambda p, xi: loss(p, xi.unsqueeze(0))), in_dims=(None, 0))(params, x)
    for i in range(3):
        for name, g in grad(loss)(params, x[i:i + 1]).items():
            assert_close(per_sample[name][i], g)
    assert_close(jacfwd(model)(x[:1]), jacrev(model)(x[:1]))
    v, eps = torch.randn_like(x), 1e-6
    assert_close(jvp(model, (x,), (v,))[1], (model(x + eps * v) - model(x - eps * v)) / (2 * eps))
    grad_x = grad(lambda xs: loss(params, xs))
    assert_close(jvp(grad_x, (x,), (v,))[1], (grad_x(x + eps * v) - grad_x(x - eps * v)) / (2 * eps))


# ---- torch.compile -------------------------------------------------------------------------------
def _compiled_matches_eager(model, x):
    """torch.compile(model, fullgraph=True) against eager: output and the gradients of x and of
    every parameter. Returns (compiled output, eager gradients)."""
    compiled = torch.compile(model, fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager = model(xe)
    grads_eager = torch.autograd.grad(y_eager.sum(), [xe, *model.parameters()])
    y_comp = compiled(xc)
    grads_comp = torch.autograd.grad(y_comp.sum(), [xc, *model.parameters()])
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_comp, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return y_comp, grads_eager


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(15)
    model = nn.Sequential(SparseLinear(20, 12, block_size=(4, 4), density=0.5), nn.ReLU(),
                          SparseLinear(12, 7, block_size=(3, 5), density=0.6))
    x = torch.randn(5, 20)
    y_comp, _ = _compiled_matches_eager(model, x)
    # and both against the dense layers
    dense = nn.Sequential(model[0].to_dense(), nn.ReLU(), model[2].to_dense())
    torch.testing.assert_close(y_comp, dense(x), rtol=1e-5, atol=1e-5)


def test_torch_compile_fused_relu_matches_eager():
    """Fused ReLUs under torch.compile: forward, all gradients, and the input-only backward (the
    route that hands the ReLU's output to the next product as relu_mask)."""
    torch._dynamo.reset()
    torch.manual_seed(16)
    model = nn.Sequential(
        sparsekern.SparseConv2d(4, 8, 3, padding=1, block_size=(4, 4), density=0.5,
                                activation="relu"),
        nn.Flatten(), SparseLinear(8 * 5 * 5, 12, block_size=(4, 4), density=0.5,
                                   activation="relu"),
        SparseLinear(12, 3, block_size=(3, 4), density=0.6))
    x = torch.randn(2, 4, 5, 5)
    y_comp, grads_eager = _compiled_matches_eager(model, x)
    assert_close(y_comp, nn.Sequential(model[0].to_dense(), nn.Flatten(), model[2].to_dense(),
                                       model[3].to_dense())(x))
    for p in model.parameters():
        p.requires_grad_(False)
    xc = x.clone().requires_grad_()
    (dx_comp,) = torch.autograd.grad(torch.compile(model, fullgraph=True)(xc).sum(), [xc])
    torch.testing.assert_close(dx_comp, grads_eager[0], rtol=1e-5, atol=1e-5)


def test_dynamic_batch_under_export_and_compile():
    """A conv + linear model with a dynamic batch: torch.export (saved and loaded back) and
    torch.compile(dynamic=True) run other batch sizes as eager does, with one compiled frame
    (the conv geometry's batch size used to be made a Python int, which specialized it)."""
    import torch._dynamo.testing

    torch.manual_seed(17)
    model = nn.Sequential(
        sparsekern.SparseConv2d(4, 8, 3, padding=1, stride=2, block_size=(4, 4), density=0.5),
        nn.ReLU(), nn.Flatten(), SparseLinear(8 * 3 * 3, 10, block_size=(2, 4), density=0.5))
    exported = torch.export.export(model, (torch.randn(3, 4, 6, 6),),
                                   dynamic_shapes=({0: torch.export.Dim("batch")},))
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    for n in (2, 5, 9):
        x = torch.randn(n, 4, 6, 6)
        expected = model(x)
        assert_close(exported.module()(x), expected)
        assert_close(loaded(x), expected)
        xc = x.clone().requires_grad_()
        y = compiled(xc)
        assert_close(y, expected)
        (dx,) = torch.autograd.grad(y.sum(), [xc])
        xe = x.clone().requires_grad_()
        assert_close(dx, torch.autograd.grad(model(xe).sum(), [xe])[0])
    assert counter.frame_count == 1


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's forward AD uses torch.jit.script
def test_torch_compile_of_vmap_fullgraph():
    """torch.compile(vmap(layer), fullgraph=True): the forward-AD refusal's check of the
    functorch stack broke the graph (Dynamo cannot trace the query); compile(jvp) is still
    refused."""
    from torch.func import jvp, vmap

    torch._dynamo.reset()
    torch.manual_seed(18)
    layer = SparseLinear(8, 6, block_size=(2, 2), density=0.5)
    x = torch.randn(3, 5, 8)
    assert_close(torch.compile(vmap(layer), fullgraph=True, backend="aot_eager")(x),
                 vmap(layer)(x))
    with pytest.raises(Exception, match="eager mode only"):
        torch.compile(lambda a, t: jvp(layer, (a,), (t,)), fullgraph=True,
                      backend="aot_eager")(x[0], x[1])


def test_torch_compile_backward_follows_backend_scope(backend_spy):
    # no compile caches: a cached graph traced under another scope would change the first half.
    # (config.patch, not monkeypatch: monkeypatch's undo deleted the functorch setting, and
    # every later Inductor compile in the process failed. Not as decorators: those import
    # torch._inductor, and with it triton, while pytest collects; see tests/conftest.py.)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        _backward_follows_backend_scope(backend_spy)


def _backward_follows_backend_scope(backend_spy):
    torch._dynamo.reset()
    torch.manual_seed(16)
    layer = SparseLinear(20, 12, block_size=(4, 4), density=0.5)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 20, requires_grad=True)
    compiled(x).sum().backward()  # traced outside any scope: everything on "cpu"
    assert backend_spy.names() == {"cpu"}
    backend_spy.calls.clear()
    with sparsekern.backend("reference"):
        y = compiled(x)
    assert backend_spy.calls == [("reference", "dds")]  # the forward follows the scope
    y.sum().backward()
    # as in eager mode, the backward must run on the backend the forward resolved
    assert backend_spy.names() == {"reference"}, backend_spy.calls


# ---- CUDA ----------------------------------------------------------------------------------------
CUDA_SHAPES = [(1, 1), (4, 4), (16, 16), (32, 32), (16, 8), (3, 5)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("block_shape", CUDA_SHAPES, ids=str)
def test_cuda_backend_matches_reference(block_shape, dtype):
    from sparsekern import ops

    for kind in TOPOLOGY_KINDS:
        m = make_matrix(block_shape, kind, dtype)
        Mp, Kp = m.padded_shape
        for batch in (1, 37, 70):
            x = torch.randn(batch, Kp, dtype=dtype)
            mc = m.to("cuda")
            y = ops.dds(x.cuda(), mc.values, *mc.topology(), Mp, Kp, True, "cuda")
            assert y.is_cuda
            ref = ops.dds(x.cuda(), mc.values, *mc.topology(), Mp, Kp, True, "reference")
            assert_close(y.cpu(), ref.cpu().double(), dtype)
            assert_close(y.cpu(), oracle_dds(x, m.values, m.row_offsets, m.col_idx, Mp, Kp,
                                             True), dtype)
            xt = torch.randn(Kp, batch, dtype=dtype, device="cuda").t()  # non-contiguous
            assert_close(ops.dds(xt, mc.values, *mc.topology(), Mp, Kp, True, "cuda").cpu(),
                         xt.cpu().double() @ matrix_dense(m).t(), dtype)


@pytest.mark.cuda
def test_cuda_sparse_linear_forward_backward():
    lin = _linear(70, 45, 16)
    layer = SparseLinear.from_dense(lin, (8, 8), mask=torch.rand(45, 70) < 0.2)
    expected = layer.to_dense()
    layer = layer.cuda()
    x = torch.randn(9, 70)
    xc = x.cuda().requires_grad_()
    y = layer(xc)  # auto: cuda forward, backward on another backend
    y.square().sum().backward()
    xd = x.clone().requires_grad_()
    yd = expected(xd)
    yd.square().sum().backward()
    assert_close(y.cpu(), yd.double())
    assert_close(xc.grad.cpu(), xd.grad.double())
    assert_close(layer.bias.grad.cpu(), expected.bias.grad.double())
    with pytest.raises(RuntimeError, match="implements only the linear dds with trans_w=True"):
        sparsekern.ops.dds(torch.randn(2, layer.weight.padded_shape[0], device="cuda"),
                           layer.values.detach(), *layer.weight.topology(),
                           *layer.weight.padded_shape, False, "cuda")
