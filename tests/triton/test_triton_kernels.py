"""Backend "triton" against the float64 oracle: Linear and Conv2d, forward and backward.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by tests/conftest.py,
before anything imports triton); with one (benchmarks/gpu_suite.sh) the same tests run on CUDA
tensors with float32 in "ieee" mode, plus a TF32 check. Shapes stay tiny: the interpreter runs
every program in numpy.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
triton = pytest.importorskip("triton")

import sparsekern  # noqa: E402
from sparsekern import SparseLinear, backends, ops  # noqa: E402
from sparsekern import triton as sk_triton  # noqa: E402
from sparsekern.triton import kernels as sk_triton_kernels  # noqa: E402
from conftest import (assert_close, make_matrix, matrix_dense, oracle_dds, oracle_sdd,  # noqa: E402
                      randn)
from test_conv import check_bsr_conv2d  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(not ON_GPU and not sk_triton.interpreting(),
                                reason="the kernels were imported before TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def ieee_float32():
    """Full float32 dots, so float32 results meet the float32 tolerances (TF32 tested apart)."""
    sk_triton.set_float32_precision("ieee")
    yield
    sk_triton.set_float32_precision("tf32")


# ---- linear: the three products, every topology kind -----------------------------------------------
LINEAR_CASES = [((16, 16), "sparse"), ((32, 16), "sparse"), ((16, 32), "nnz0"),
                ((32, 32), "dense"), ((64, 64), "sparse")]


# Kernel variants (kernels.py): TILES row tiles per dds_nt program, SWAP = transposed
# accumulators in dds_nt and dds_nn, GROUP blocks of a block row per sdd program (4: more than
# the 3x3-block test matrices hold in a row, so groups run short), K_STEP columns per dds step
# (16-wide blocks: 2 or 4 to a step, 32-wide: 2, a row's last step short). BLOCK_R 16 so that
# the tiny shapes span several tiles.
VARIANTS = [dict(TILES=2, SWAP=False, GROUP=2, K_STEP=0),
            dict(TILES=1, SWAP=True, GROUP=1, K_STEP=32),
            dict(TILES=3, SWAP=True, GROUP=4, K_STEP=0),
            dict(TILES=1, SWAP=False, GROUP=1, K_STEP=64)]


@contextlib.contextmanager
def pinned_variant(variant):
    Config = triton.Config
    with sk_triton._ops().pinned_configs(
            dds_nt=Config({"BLOCK_R": 16, "TILES": variant["TILES"], "SWAP": variant["SWAP"],
                           "K_STEP": variant["K_STEP"]}, num_warps=4, num_stages=2),
            dds_nn=Config({"BLOCK_R": 16, "SWAP": variant["SWAP"], "K_STEP": variant["K_STEP"]},
                          num_warps=4, num_stages=2),
            sdd=Config({"BLOCK_R": 16, "GROUP": variant["GROUP"]}, num_warps=4, num_stages=2)):
        yield


def variant_id(variant):
    return (f"tiles{variant['TILES']}{'-swap' if variant['SWAP'] else ''}"
            f"-group{variant['GROUP']}" + (f"-k{variant['K_STEP']}" if variant["K_STEP"] else ""))


@pytest.mark.parametrize("block,kind", LINEAR_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_products_match_oracle(block, kind, dtype, gen):
    check_linear_products(block, kind, dtype, gen)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("block,kind", LINEAR_CASES)
def test_linear_kernel_variants_match_oracle(block, kind, variant, gen):
    with pinned_variant(variant):
        check_linear_products(block, kind, torch.float64, gen)


def check_linear_products(block, kind, dtype, gen, grid=(3, 3), density=0.5):
    m = make_matrix(block, kind, dtype, gen, grid=grid, density=density)
    Mp, Kp = m.padded_shape
    topo = [t.to(DEVICE) for t in m.topology()]
    values = m.values.to(DEVICE)
    x, dy = randn(37, Kp, generator=gen), randn(37, Mp, generator=gen)
    y = ops.dds(x.to(DEVICE, dtype), values, *topo, Mp, Kp, True, "triton")
    assert_close(y.cpu(), oracle_dds(x.to(dtype), m.values, m.row_offsets, m.col_idx, Mp, Kp,
                                     True), dtype, "x @ W^T")
    dx = ops.dds(dy.to(DEVICE, dtype), values, *topo, Mp, Kp, False, "triton")
    assert_close(dx.cpu(), oracle_dds(dy.to(dtype), m.values, m.row_offsets, m.col_idx, Mp, Kp,
                                      False), dtype, "dy @ W")
    dw = ops.sdd(dy.to(DEVICE, dtype), x.to(DEVICE, dtype), *topo, *block, "triton")
    assert dw.shape == m.values.shape and dw.dtype == dtype
    assert_close(dw.cpu(), oracle_sdd(dy.to(dtype), x.to(dtype), m.row_idx, m.col_idx, *block),
                 dtype, "sdd")


@pytest.mark.parametrize("line_major", [True, False], ids=["line-major", "tile-major"])
def test_program_orders_match_oracle(line_major, gen, backend_spy, monkeypatch):
    """dds's programs (one 1D grid of row tiles x lines) in either order (ops._line_major: by
    W's size against the L2), with row tiles and lines in unequal numbers: linear (3 row tiles
    x 2 block rows for x @ W^T, x 7 block columns for dy @ W), with TILES row tiles per
    program, and a strided conv (2 x 3 and 4 x 2)."""
    monkeypatch.setattr(sk_triton._ops(), "_line_major", lambda values: line_major)
    check_linear_products((16, 16), "random", torch.float64, gen, grid=(2, 7))
    with pinned_variant(VARIANTS[0]):
        check_linear_products((16, 32), "random", torch.float64, gen, grid=(2, 7))
        check_bsr_conv2d((2, 32, 48, 6, 5, 3, 2, 1, 1, (16, 16), "sparse"), "triton",
                         torch.float32, gen, spy=backend_spy, device=DEVICE)


@triton.jit
def _program_tile_probe(tiles_ptr, lines_ptr, n_tiles, LINE_MAJOR: triton.language.constexpr):
    tile, line = sk_triton_kernels._program_tile(n_tiles, LINE_MAJOR)
    pid = triton.language.program_id(0)
    triton.language.store(tiles_ptr + pid, tile)
    triton.language.store(lines_ptr + pid, line)


@pytest.mark.parametrize("line_major", [True, False], ids=["line-major", "tile-major"])
def test_program_tile_orders(line_major):
    """The order itself: line-major runs a row tile's lines one after the other, tile-major a
    line's row tiles (both visit every program once, so the products alone cannot tell)."""
    n_tiles, n_lines = 3, 5
    tiles = torch.full((n_tiles * n_lines,), -1, dtype=torch.int32, device=DEVICE)
    lines = torch.full_like(tiles, -1)
    _program_tile_probe[(n_tiles * n_lines,)](tiles, lines, n_tiles, LINE_MAJOR=line_major)
    pid = torch.arange(n_tiles * n_lines, dtype=torch.int32)
    if line_major:
        expected = (pid // n_lines, pid % n_lines)
    else:
        expected = (pid % n_tiles, pid // n_tiles)
    assert torch.equal(tiles.cpu(), expected[0]) and torch.equal(lines.cpu(), expected[1])


def test_line_major_while_w_fits_the_l2():
    """ops._line_major: W up to 5/4 of the L2 (50 MB without a CUDA device), by its bytes."""
    tops = sk_triton._ops()
    limit = 5 * (50 << 20) // 4
    for dtype in (torch.bfloat16, torch.float32):
        n = limit // dtype.itemsize
        assert tops._line_major(torch.empty(n, dtype=dtype, device="meta"))
        assert not tops._line_major(torch.empty(n + 1, dtype=dtype, device="meta"))


class _SaysCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA device `index` (what ops._launch reads)."""
    index = 0

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", self.index)

    def get_device(self):
        return self.index


def test_launches_on_the_operands_device(monkeypatch):
    """Triton launches on the current CUDA device: with the operands on cuda:1 and cuda:0
    current, ops._launch makes cuda:1 current for the launch (and only then). Simulated: an
    operand that says it is on a CUDA device and a device guard that records."""
    tops = sk_triton._ops()
    current, seen = [0], []

    @contextlib.contextmanager
    def device_guard(device):
        before, current[0] = current[0], torch.device(device).index
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device_guard)
    monkeypatch.setattr(tops, "interpreting", lambda: True)  # Triton's own path: the stub below
    launcher = type("Kernel", (), {"__getitem__": lambda self, grid: (
        lambda *args, **kwargs: seen.append((current[0], args)))})()
    for index in (1, 0, 1):
        operand = torch.Tensor._make_subclass(_SaysCuda, torch.zeros(1))
        operand.index = index
        tops._launch(launcher, None, operand, 7, FLAG=True)
        assert seen[-1][0] == index and seen[-1][1][0] is operand and current[0] == 0
    tops._launch(launcher, None, 5, FLAG=True)  # a first argument that is no tensor
    assert seen[-1] == (0, (5,)) and len(seen) == 4


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_linear_on_the_second_gpu():
    """A layer on cuda:1 while cuda:0 is current: forward and backward against the dense
    layer on the same device."""
    layer = SparseLinear(256, 128, block_size=(64, 64), density=0.5, backend="triton").to(
        "cuda:1", torch.bfloat16)
    x = torch.randn(32, 256, device="cuda:1", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(32, 128, device="cuda:1", dtype=torch.bfloat16)
    with torch.cuda.device(0):
        y = layer(x)
        y.backward(g)
    x_ref = x.detach().double().requires_grad_()
    ref = F.linear(x_ref, layer.weight.to_dense().double(), layer.bias.double())
    ref.backward(g.double())
    assert_close(y, ref)
    assert_close(x.grad, x_ref.grad)


def test_cuda_device_properties_asked_once(monkeypatch):
    """The launchers' L2 size (program order) and SM count (sdd's split) come from the device
    once per device, not from torch.cuda.get_device_properties on every call."""
    import types
    tops = sk_triton._ops()
    asked = []

    def properties(index):
        asked.append(index)
        return types.SimpleNamespace(L2_cache_size=(40 + index) << 20,
                                     multi_processor_count=100 + index)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(tops, "_DEVICE_PROPERTIES", {})
    for _ in range(3):
        for index in (0, 1):
            cuda = torch.device("cuda", index)
            assert tops._l2_bytes(cuda) == (40 + index) << 20
            # 4 programs per SM over 10 blocks, at most one split per 512 rows
            assert tops._sdd_splits(10, 1 << 20, cuda) == -(-4 * (100 + index) // 10)
            assert tops._sdd_splits(10, 1024, cuda) == 2
    assert sorted(asked) == [0, 0, 1, 1]  # one ask per (device, property)
    assert tops._l2_bytes(torch.device("cpu")) == 50 << 20


@pytest.mark.parametrize("block", [(16, 16), (16, 32), (32, 16)])
@pytest.mark.parametrize("swap", [False, True])
def test_k_step_on_wide_block_rows(block, swap, gen):
    """K_STEP: several blocks per step on rows and columns of up to 9 stored blocks (a short
    last step, an empty block row and column), x @ W^T, dy @ W and the fused ReLU's masked
    dy @ W, against the oracle."""
    Config = triton.Config
    for k_step in (32, 64):
        with sk_triton._ops().pinned_configs(
                dds_nt=Config({"BLOCK_R": 16, "TILES": 1, "SWAP": swap, "K_STEP": k_step}),
                dds_nn=Config({"BLOCK_R": 16, "SWAP": swap, "K_STEP": k_step})):
            check_linear_products(block, "sparse", torch.float64, gen, grid=(5, 9),
                                  density=0.7)
            check_fused_relu_linear(gen)


def test_direct_launch_cache_names_the_config_that_ran():
    """A compiled kernel's config is found by its constexprs, a config's omitted ones taken at
    the kernel's defaults: a K_STEP=64 kernel is not reported as its plain twin (the report's
    "configs the autotuner chose" would never show K_STEP)."""
    import types
    tops = sk_triton._ops()
    fn = tops.dds_nt.fn  # the interpreter's stand-in has no params: the JITFunction's own
    fn = fn if hasattr(fn, "params") else triton.runtime.jit.JITFunction(fn.fn)
    plain = triton.Config({"BLOCK_R": 128, "TILES": 1, "SWAP": False}, num_warps=4,
                          num_stages=3)
    k_step = triton.Config({**plain.kwargs, "K_STEP": 64}, num_warps=4, num_stages=3)
    kernel = types.SimpleNamespace(fn=fn, configs=[plain, k_step])
    n_args = next(i for i, p in enumerate(fn.params) if p.is_constexpr)
    others = dict(BM=32, BK=32, LINE_MAJOR=True, IS_CONV=False, ACC_DTYPE=None,
                  PRECISION="ieee", UPCAST=False, HAS_BIAS=False, RELU=False)
    for config in (plain, k_step):
        values = {**others, **config.kwargs, "K_STEP": config.kwargs.get("K_STEP", 0)}
        compiled = types.SimpleNamespace(
            src=types.SimpleNamespace(constants={(fn.arg_names.index(k),): v
                                                 for k, v in values.items()}),
            metadata=types.SimpleNamespace(num_warps=4, num_stages=3))
        assert tops._cache_entry(kernel, compiled, n_args)[3] is config


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdd_groups_and_row_splits(group, splits, dtype, gen, monkeypatch):
    """sdd on a wide matrix (up to 7 blocks per block row, an empty row, short last groups),
    with GROUP blocks per program and the reduction split over programs (fp32 partials summed
    by the launcher; only on a GPU unforced): each block against the oracle, in a's dtype."""
    tops = sk_triton._ops()
    monkeypatch.setattr(tops, "_sdd_splits", lambda nnz, n, device: splits)
    m = make_matrix((16, 16), "sparse", dtype, gen, grid=(3, 7))
    topo = [t.to(DEVICE) for t in m.topology()]
    x, dy = randn(37, 7 * 16, generator=gen), randn(37, 3 * 16, generator=gen)
    with tops.pinned_configs(sdd=triton.Config({"BLOCK_R": 16, "GROUP": group})):
        dw = ops.sdd(dy.to(DEVICE, dtype), x.to(DEVICE, dtype), *topo, 16, 16, "triton")
    assert dw.shape == m.values.shape and dw.dtype == dtype
    assert_close(dw.cpu(), oracle_sdd(dy.to(dtype), x.to(dtype), m.row_idx, m.col_idx, 16, 16),
                 dtype, "sdd")


def test_autotuning_prunes_what_cannot_pay_off():
    """Candidates whose accumulator or pipeline would not fit, TILES without enough row tiles,
    and sdd groups for conv (per-column source rows) are not timed."""
    tops = sk_triton._ops()

    def kept(candidates, dtype=torch.bfloat16, **args):
        named = {"a_ptr": torch.empty(0, dtype=dtype)}
        return [(c.kwargs["BLOCK_R"], c.kwargs.get("TILES", 1), c.kwargs.get("GROUP", 1))
                for c in tops._prune(tops.candidate_configs(candidates), named, **args)]

    sdd_linear = kept(tops._SDD_CANDIDATES, BM=64, BK=64, IS_CONV=False)
    assert {g for _, _, g in sdd_linear} == {1, 2, 4}
    assert {g for _, _, g in kept(tops._SDD_CANDIDATES, BM=64, BK=64, IS_CONV=True)} == {1}
    assert {g for _, _, g in
                                 kept(tops._SDD_CANDIDATES, BM=128, BK=128, IS_CONV=False)} == {1}
    assert all(r <= 128 for r, _, _ in kept(tops._DDS_NT_CANDIDATES, BM=128, BK=128, n_out=4096))
    assert all(t == 1 for _, t, _ in kept(tops._DDS_NT_CANDIDATES, BM=64, BK=64, n_out=300))
    # fp32 groups of 64-wide blocks: 3 stages of [64, 64 + 4*64] (or [128, 64 + 2*64]) floats
    # need 240 (288) KB of shared memory, past the 227 KB a block may have
    fp32 = kept(tops._SDD_CANDIDATES, torch.float32, BM=64, BK=64, IS_CONV=False)
    assert (64, 1, 4) not in fp32 and (128, 1, 2) not in fp32 and (64, 1, 2) in fp32
    assert (64, 1, 4) in sdd_linear
    # dds prefetching two tiles ahead (num_stages 5: 3 buffers): fp32 [256, 64] x tiles and
    # [64, 64] blocks take 240 KB; bf16, or fp32 one tile ahead (2 buffers), fit
    dds_fp32 = [(c.kwargs["BLOCK_R"], c.num_stages) for c in tops._prune(
        tops.candidate_configs(tops._DDS_NT_CANDIDATES),
        {"a_ptr": torch.empty(0, dtype=torch.float32)}, BM=64, BK=64, n_out=4096)]
    assert (256, 5) not in dds_fp32 and (256, 3) in dds_fp32 and (128, 5) in dds_fp32
    assert (256, 2, 1) in kept(tops._DDS_NT_CANDIDATES, BM=64, BK=64, n_out=4096)
    assert all(t == 1 for _, t, _ in kept(tops._DDS_NT_CANDIDATES, BM=128, BK=128, n_out=4096))
    # with the ReLU mask, a and the mask go through registers: fewer buffers (180 KB compiled)
    masked = [(c.kwargs["BLOCK_R"], c.num_stages) for c in tops._prune(
        tops.candidate_configs(tops._DDS_NN_CANDIDATES),
        {"a_ptr": torch.empty(0, dtype=torch.float32)}, BM=64, BK=64, HAS_MASK=True)]
    assert (128, 5) in masked
    # K_STEP (several narrow blocks per step): timed where it groups blocks, dds_nt's conv aside
    def k_steps(candidates, **args):
        return {c.kwargs.get("K_STEP", 0) for c in tops._prune(
            tops.candidate_configs(candidates), {"a_ptr": torch.empty(0)}, n_out=4096, **args)}
    assert k_steps(tops._DDS_NT_CANDIDATES, BM=64, BK=32) == {0, 64}
    assert k_steps(tops._DDS_NT_CANDIDATES, BM=32, BK=64) == {0}
    assert k_steps(tops._DDS_NT_CANDIDATES, BM=16, BK=16, IS_CONV=True) == {0}
    assert k_steps(tops._DDS_NN_CANDIDATES, BM=32, BK=64, IS_CONV=True) == {0, 64}
    assert k_steps(tops._DDS_NN_CANDIDATES, BM=64, BK=16) == {0}
    # conv beside a 128 x 128 accumulator: 8 warps (4 spill); linear keeps 4
    def warps(candidates, **args):
        named = {"a_ptr": torch.empty(0, dtype=torch.bfloat16)}
        return {c.num_warps for c in tops._prune(tops.candidate_configs(candidates), named,
                                                 n_out=4096, **args)
                if c.kwargs["BLOCK_R"] == 128}
    assert warps(tops._DDS_NN_CANDIDATES, BM=128, BK=128, IS_CONV=True) == {8}
    assert warps(tops._DDS_NT_CANDIDATES, BM=128, BK=128, IS_CONV=True) == {8}
    assert warps(tops._DDS_NN_CANDIDATES, BM=128, BK=128) == {4, 8}
    # the accumulator's width is BM for dds_nt, BK for dds_nn: 128 x 32 ones keep 4 warps
    assert warps(tops._DDS_NT_CANDIDATES, BM=32, BK=128, IS_CONV=True) == {4, 8}
    assert warps(tops._DDS_NN_CANDIDATES, BM=128, BK=32, IS_CONV=True) == {4, 8}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_half_precision(dtype, gen):
    # fp32 accumulation: the error is the rounding of the inputs and of the output only
    m = make_matrix((16, 32), "sparse", dtype, gen, grid=(3, 3))
    Mp, Kp = m.padded_shape
    x = randn(20, Kp, generator=gen).to(dtype)
    y = ops.dds(x.to(DEVICE), m.values.to(DEVICE), *[t.to(DEVICE) for t in m.topology()], Mp, Kp,
                True, "triton")
    assert y.dtype == dtype
    expected = x.double() @ matrix_dense(m).t()
    torch.testing.assert_close(y.cpu().double(), expected, rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_runs_the_layers_in_half_precision(dtype, gen):
    """Under torch.autocast the Triton backend gets the layers' operands in autocast's dtype
    (the float32 weights cast, as F.linear's are) and computes in it; the gradients of the
    input and of the weights come back float32, matching the float64 product of the same
    half-precision operands."""
    torch.manual_seed(23)
    layer = SparseLinear(48, 32, block_size=(16, 16), density=0.5).to(DEVICE)
    x = randn(9, 48, generator=gen).float().to(DEVICE).requires_grad_()
    g = randn(9, 32, generator=gen).to(dtype).to(DEVICE)
    with sparsekern.backend("triton"), torch.autocast(DEVICE, dtype=dtype):
        y = layer(x)
    y.backward(g)
    assert y.dtype == dtype and layer.weight.values.grad.dtype == x.grad.dtype == torch.float32
    # the reference: float64 products of the operands as autocast rounded them
    x_ref = x.detach().to(dtype).double().requires_grad_()
    w_ref = layer.weight.to_dense().detach().to(dtype).double().requires_grad_()
    ref = F.linear(x_ref, w_ref, layer.bias.detach().to(dtype).double())
    ref.backward(g.double())
    tolerance = dict(rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(y.detach().cpu().double(), ref.detach().cpu(), **tolerance)
    torch.testing.assert_close(x.grad.cpu().double(), x_ref.grad.cpu(), **tolerance)
    blocks = layer.weight.with_values(layer.weight.values.grad).to_dense()
    mask = layer.weight.with_values(torch.ones_like(layer.weight.values)).to_dense().bool()
    torch.testing.assert_close(blocks.cpu().double(), (w_ref.grad * mask).cpu(), **tolerance)


def test_sparse_linear_autograd_and_empty_batch(gen):
    layer = SparseLinear(48, 40, block_size=(16, 16), density=0.5, dtype=torch.float64).to(DEVICE)
    dense = layer.to_dense()
    x = randn(9, 48, generator=gen).to(DEVICE).requires_grad_()
    with sparsekern.backend("triton"):
        y = layer(x)
        y.square().sum().backward()
        assert layer(x[:0]).shape == (0, 40)
    xd = x.detach().clone().requires_grad_()
    dense(xd).square().sum().backward()
    assert_close(y.cpu(), dense(xd).detach().cpu())
    assert_close(x.grad.cpu(), xd.grad.cpu())
    assert_close(layer.bias.grad.cpu(), dense.bias.grad.cpu())


def test_per_sample_gradients(gen, backend_spy):
    """torch.func's per-sample gradients (vmap of grad) through the Triton kernels: the forward
    and dy @ W stacked into one launch for all samples, the samples' sdd side by side in one;
    against a loop."""
    from torch.func import functional_call, grad, vmap

    layer = SparseLinear(48, 40, block_size=(16, 16), density=0.5, dtype=torch.float64).to(DEVICE)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = randn(3, 48, generator=gen).to(DEVICE).requires_grad_()

    def loss(p, xi):
        return functional_call(layer, p, (xi.unsqueeze(0),)).sin().sum()
    with sparsekern.backend("triton"):
        per_sample = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, 0))(params, x.detach())
        assert sorted(backend_spy.calls) == [("triton", "dds")] * 2 + [("triton", "sdd")]
        for i in range(3):
            one = grad(loss, argnums=(0, 1))(params, x.detach()[i])
            assert_close(per_sample[1][i].cpu(), one[1].cpu())
            for name in params:
                assert_close(per_sample[0][name][i].cpu(), one[0][name].cpu())



def test_per_sample_conv_gradients(gen, backend_spy):
    """The same for a strided conv: the samples' images stacked (forward, grad input), their
    channels side by side for the weight gradients; one launch each."""
    from torch.func import functional_call, grad, vmap

    layer = sparsekern.SparseConv2d(16, 32, 3, stride=2, padding=1, block_size=(16, 16),
                                    density=0.5, dtype=torch.float64).to(DEVICE)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = randn(2, 16, 5, 5, generator=gen).to(DEVICE)

    def loss(p, xi):
        return functional_call(layer, p, (xi.unsqueeze(0),)).sin().sum()
    with sparsekern.backend("triton"):
        per_sample = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, 0))(params, x)
        assert sorted(backend_spy.calls) == [("triton", "dds")] * 2 + [("triton", "sdd")]
        for i in range(2):
            one = grad(loss, argnums=(0, 1))(params, x[i])
            assert_close(per_sample[1][i].cpu(), one[1].cpu())
            for name in params:
                assert_close(per_sample[0][name][i].cpu(), one[0][name].cpu())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_fused_bias_and_relu(channels_last, gen):
    """Bias and ReLU in dds_nt's epilogue, the ReLU's backward in dds_nn's loads: the layer
    equals conv + ReLU, forward and backward (the input-only route included)."""
    conv = torch.nn.Conv2d(16, 16, 3, padding=1).double()
    layer = sparsekern.SparseConv2d.from_dense(conv, (16, 16), activation="relu").to(DEVICE)
    x = torch.randn(2, 16, 5, 4, generator=gen, dtype=torch.float64).to(DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    xd = x.detach().clone().requires_grad_()
    with sparsekern.backend("triton"):
        y = layer(x)
        (dx_only,) = torch.autograd.grad(y.square().sum(), [x], retain_graph=True)
        y.square().sum().backward()
    expected = torch.relu(F.conv2d(xd.cpu(), conv.weight, conv.bias, padding=1))
    expected.square().sum().backward()
    assert_close(y.cpu(), expected.detach())
    assert_close(x.grad.cpu(), xd.grad)
    assert_close(dx_only.cpu(), xd.grad)
    assert_close(layer.bias.grad.cpu(), conv.bias.grad)


@pytest.mark.parametrize("variant", [None] + VARIANTS,
                         ids=lambda v: "plain" if v is None else variant_id(v))
def test_fused_relu_linear_matches_oracle(variant, gen):
    with pinned_variant(variant) if variant else contextlib.nullcontext():
        check_fused_relu_linear(gen)


def check_fused_relu_linear(gen):
    m = make_matrix((16, 16), "sparse", torch.float64, gen, grid=(3, 3))
    Mp, Kp = m.padded_shape
    topo = [t.to(DEVICE) for t in m.topology()]
    x = randn(7, Kp, generator=gen).to(DEVICE)
    bias = randn(Mp, generator=gen).to(DEVICE)
    v = m.values.to(DEVICE)
    y = ops.dds(x, v, *topo, Mp, Kp, True, "triton", None, bias, True)
    y_ref = (oracle_dds(x.cpu(), m.values, m.row_offsets, m.col_idx, Mp, Kp, True)
             + bias.cpu()).relu()
    assert_close(y.cpu(), y_ref)
    dy = randn(7, Mp, generator=gen).to(DEVICE)
    dx = ops.dds(dy, v, *topo, Mp, Kp, False, "triton", None, None, False, y)
    assert_close(dx.cpu(), oracle_dds(torch.where(y_ref > 0, dy.cpu(), 0), m.values,
                                      m.row_offsets, m.col_idx, Mp, Kp, False))


def test_gradcheck_float64(gen):
    m = make_matrix((16, 16), "sparse", torch.float64, gen, grid=(3, 3))
    Mp, Kp = m.padded_shape
    topo = [t.to(DEVICE) for t in m.topology()]
    x = randn(5, Kp, generator=gen).to(DEVICE).requires_grad_()
    v = m.values.to(DEVICE).requires_grad_()
    fn = lambda x, v: ops.dds(x, v, *topo, Mp, Kp, True, "triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, v), fast_mode=True)


# ---- conv: implicit GEMM, stride, padding, dilation --------------------------------------------
# (N, C_in, C_out, H, W, kernel, stride, padding, dilation, block, kind)
CONV_CASES = [
    (2, 16, 32, 6, 5, 3, 1, 1, 1, (16, 16), "sparse"),
    (2, 32, 16, 7, 6, 3, 2, 1, 1, (16, 32), "sparse"),     # stride 2: grad input gathers
    (1, 16, 20, 7, 7, 3, 2, 0, 2, (16, 16), "sparse"),     # dilation, C_out padded to 32
    (1, 16, 16, 5, 4, 1, 2, 0, 1, (16, 16), "dense"),      # 1x1 stride 2: unread pixels
    (1, 16, 16, 4, 4, 5, 1, 2, 1, (16, 16), "nnz0"),
    (1, 32, 32, 5, 5, 3, 1, 1, 1, (32, 32), "dense"),
    # non-square everything: an H/W or r/s mix-up in the index math fails here
    (2, 16, 16, 9, 7, (3, 1), (2, 1), (1, 0), (1, 2), (16, 16), "sparse"),
]


@pytest.mark.parametrize("case", CONV_CASES,
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in zip("kspd", c[5:9])))
def test_conv_matches_f_conv2d(case, gen, backend_spy):
    check_bsr_conv2d(case, "triton", torch.float32, gen, spy=backend_spy, device=DEVICE)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[2], CONV_CASES[4], CONV_CASES[6]],
                         ids=["stride2", "dilation", "nnz0", "nonsquare"])
def test_conv_kernel_variants_match_f_conv2d(case, variant, gen, backend_spy):
    with pinned_variant(variant):
        check_bsr_conv2d(case, "triton", torch.float32, gen, spy=backend_spy, device=DEVICE)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("group", [1, 2])
def test_conv_sdd_pixel_tiles_and_image_splits(splits, group, gen, backend_spy, monkeypatch):
    """Conv sdd steps through pixel tiles of image rows: output maps wider than BLOCK_R (21
    columns, two column tiles per output row), narrower (3 columns, several rows per tile, P = 5
    not a power of two) and tiny (2x2: one tile spans four images, P a power of two: shifts),
    the image rows split over programs (fp32 partials)."""
    monkeypatch.setattr(sk_triton._ops(), "_sdd_splits", lambda nnz, n, device: splits)
    with sk_triton._ops().pinned_configs(sdd=triton.Config({"BLOCK_R": 16, "GROUP": group})):
        for case in [(2, 16, 16, 3, 21, 3, 1, 1, 1, (16, 16), "sparse"),
                     (2, 32, 16, 9, 5, 3, 2, 1, 1, (16, 16), "sparse"),
                     (5, 16, 16, 2, 2, 3, 1, 1, 1, (16, 16), "sparse")]:
            check_bsr_conv2d(case, "triton", torch.float32, gen, spy=backend_spy, device=DEVICE)


def test_pinned_configs_names_the_kernels():
    with pytest.raises(ValueError, match="no kernel named"):
        with sk_triton._ops().pinned_configs(dds=triton.Config({})):
            pass


def test_conv_module_channels_last(gen):
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    layer = sparsekern.SparseConv2d.from_dense(conv, (16, 16)).to(DEVICE)
    x = torch.randn(2, 16, 5, 6, generator=gen).to(DEVICE).to(memory_format=torch.channels_last)
    with sparsekern.backend("triton"):
        y = layer(x)
    expected = F.conv2d(x.cpu().double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert_close(y.cpu(), expected, torch.float32)


# ---- backend choice, refusals, registration ----------------------------------------------------
def test_auto_never_picks_the_interpreter_for_cpu_tensors(gen, backend_spy):
    m = make_matrix((16, 16), "sparse", torch.float32, gen, grid=(3, 3))
    ops.dds(randn(3, 48, dtype=torch.float32), m.values, *m.topology(), 48, 48, True)
    assert "triton" not in backend_spy.names()
    assert backends.AUTO_ORDER.index("triton") < backends.AUTO_ORDER.index("cuda")


@pytest.mark.parametrize("block", [(8, 8), (16, 8), (24, 16), (256, 16)])
def test_unsupported_block_is_refused_with_reason(block, gen):
    m = make_matrix(block, "dense", torch.float32, gen, grid=(1, 1))
    Mp, Kp = m.padded_shape
    with pytest.raises(RuntimeError, match=r"backend 'triton' cannot run dds: block shape"):
        ops.dds(randn(2, Kp, dtype=torch.float32).to(DEVICE), m.values.to(DEVICE),
                *[t.to(DEVICE) for t in m.topology()], Mp, Kp, True, "triton")


def test_unsupported_dtype_and_precision_errors(gen):
    m = make_matrix((16, 16), "dense", torch.float32, gen, grid=(1, 1))
    with pytest.raises(RuntimeError, match="supports float16, bfloat16, float32 and float64"):
        ops.dds(torch.ones(2, 16, dtype=torch.int32, device=DEVICE), m.values.int().to(DEVICE),
                *[t.to(DEVICE) for t in m.topology()], 16, 16, True, "triton")
    with pytest.raises(ValueError, match="float32 precision must be one of"):
        sk_triton.set_float32_precision("fp8")


@pytest.mark.skipif(not ON_GPU, reason="TF32 exists on the GPU only")
def test_tf32_default_is_close_but_not_ieee(gen):
    sk_triton.set_float32_precision("tf32")
    m = make_matrix((64, 64), "dense", torch.float32, gen, grid=(4, 4))
    x = randn(256, 256, generator=gen)
    y = ops.dds(x.float().cuda(), m.values.cuda(), *[t.cuda() for t in m.topology()], 256, 256,
                True, "triton")
    ref = x @ matrix_dense(m).t()
    rel = ((y.cpu().double() - ref).norm() / ref.norm()).item()
    assert rel < 3e-3


def test_opcheck_triton_ops(gen):
    sk_triton._ops()  # registers the triton_ops (on first use; this test may run alone)
    m = make_matrix((16, 16), "sparse", torch.float32, gen, grid=(3, 3))
    topo = [t.to(DEVICE) for t in m.topology()]
    x = randn(5, 48, dtype=torch.float32, generator=gen).to(DEVICE)
    values = m.values.to(DEVICE)
    ro, ci, ri, to, tr, tp = topo
    torch.library.opcheck(torch.ops.sparsekern.triton_dds.default,
                          (x, values, ro, ci, to, tr, tp, 48, 48, True, "ieee", None),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.sparsekern.triton_sdd.default,
                          (x, x, ro, ri, ci, 16, 16, "ieee", None),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph(gen):
    layer = SparseLinear(48, 32, block_size=(16, 16), density=0.5, backend="triton").to(DEVICE)
    x = torch.randn(6, 48, generator=gen).to(DEVICE)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))


def test_eager_fast_path_steps_aside_for_fake_tensors(gen):
    """AOT autograd traces the backward on FunctionalTensor/FakeTensor operands, where torch 2.11
    reports is_compiling() False: dds_call / sdd_call must still take the registered ops (fake
    kernels: shapes only), never hand fake tensors to a Triton launcher. Failed on an H100 as
    test_torch_compile_fullgraph ("Cannot access data pointer of Tensor")."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = make_matrix((16, 16), "sparse", torch.float32, grid=(3, 3)).to(DEVICE)
    Mp, Kp = m.padded_shape
    real = [t.detach() for t in (randn(5, Kp, dtype=torch.float32, generator=gen).to(DEVICE),
                                 randn(5, Mp, dtype=torch.float32, generator=gen).to(DEVICE),
                                 m.values, *m.topology())]
    with FakeTensorMode() as mode:
        x, dy, values, *topo = (mode.from_tensor(t) for t in real)
        assert ops.dds_call(x, values, *topo, Mp, Kp, True, "triton").shape == (5, Mp)
        assert ops.sdd_call(dy, x, *topo, 16, 16, "triton").shape == values.shape


@pytest.mark.skipif(ON_GPU, reason="the GPU suite runs the benchmark itself")
def test_bench_triton_gpu_smoke(monkeypatch):
    """benchmarks/bench_triton_gpu.py on tiny shapes under the interpreter (timing stubbed): the
    GPU suite's rare runs must not die on a Python error. Covers the per-product breakdown and
    the variant sweep (every autotuning candidate, checked against the dense product)."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import bench_triton_gpu as bench

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "ms", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(bench, "graph_ms", lambda fn: (fn(), 1.0)[1])
    row = bench.linear_case(64, 20, 16, 0.5)
    assert row["rel_err"] < 2e-2 and row["x_nt"] == 1.0 and set(row["configs"]) == {
        "dds_nt", "dds_nn", "sdd"}
    assert all(row[f"{p}_tbs"] > 0 for p in ("nt", "nn", "sdd"))
    conv = bench.conv_case("tiny s2", 32, 32, 4, 2, 16, 0.5, 2)  # a ResNet downsampling conv
    assert conv["rel_err"] < 2e-2 and conv["shape"] == "tiny s2 b2"
    sweep = bench.variant_sweep(n=64, batch=20, cases=((16, 0.5),))
    tops = sk_triton._ops()
    assert len(sweep) == len(tops._DDS_NT_CANDIDATES) + len(tops._DDS_NN_CANDIDATES) + len(
        tops._SDD_CANDIDATES)
    assert all(r["ms"] == 1.0 for r in sweep)  # no variant failed
    assert all(r["rel_err"] < 2e-2 for r in sweep)
    profile = bench.host_profile(n=64, batch=20, blk=16, calls=2, top=5)
    assert profile.startswith("host profile") and "tottime" in profile
    chosen, launch, launched = tops._line_major, tops._launch, []

    def spy(kernel, grid, *args, **kwargs):  # the order the launches were given
        launched.append(kwargs.get("LINE_MAJOR"))
        launch(kernel, grid, *args, **kwargs)
    monkeypatch.setattr(tops, "_launch", spy)
    orders = bench.program_orders(n=64, batch=20, blk=16, sparsity=0.5)
    assert [(r["kernel"], r["line_major"]) for r in orders] == [
        ("dds_nt", False), ("dds_nn", False), ("dds_nt", True), ("dds_nn", True)]
    assert set(launched) == {False, True} and launched.index(True) > len(launched) - 1 - \
        launched[::-1].index(False)  # every tile-major launch before the first line-major one
    assert tops._line_major is chosen and all("config" in r for r in orders)
    bench.print_report(sweep, [bench.with_ratios(row)], profile, orders)
    failures = []  # a failing part is recorded and the run goes on
    assert bench._attempt("part", failures, lambda d: 1 // d, "fallback", 0) == "fallback"
    assert bench._attempt("part", failures, lambda d: 1 // d, "fallback", 1) == 1
    assert len(failures) == 1 and failures[0].startswith("part: ") and "ZeroDivision" in \
        failures[0]
    # the targets' lines: measured, met or missed, or not measured
    target = {"kind": "linear", "shape": "4096x4096 b4096", "block": 64, "sparsity": 0.9,
              "x_dense_fwd": 6.5, "x_dense_fb": 0.8, "x_bsr_mm_fwd": 2.0}
    lines = bench.target_lines([target, {**target, "block": 128, "x_bsr_mm_fwd": 1.2},
                                {**target, "block": 32, "x_dense_fwd": float("nan")},
                                {"kind": "linear", "shape": "s", "block": 16, "sparsity": 0.5}])
    assert lines[0].endswith("6.50x, met") and lines[1].endswith("not measured")
    assert lines[2].endswith("0.80x, missed")
    assert lines[3].endswith("1.20x at worst (4096x4096 b4096, 128x128, 90%) over 3 rows, missed")


def test_bench_triton_gpu_covers_the_cifar_conv_layers():
    """The suite's full matrix times every distinct conv layer of the CIFAR models the backend
    takes (the issue's "conv layers of the CIFAR models"), read off the models themselves:
    VGG-like's five sparse convs and ResNet-20's five, its two downsampling ones at stride 2."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import bench_triton_gpu as bench

    layers = bench.cifar_conv_layers()
    assert [layer[1:] for layer in layers] == [
        (64, 64, 32, 1), (64, 128, 16, 1), (128, 128, 16, 1), (128, 256, 8, 1), (256, 256, 8, 1),
        (16, 16, 32, 1), (16, 32, 32, 2), (32, 32, 16, 1), (32, 64, 16, 2), (64, 64, 8, 1)]
    full, _ = bench.benchmark_cases(quick=False)
    convs = {params[1:] for kind, params in full if kind == "conv"}
    for _, c_in, c_out, hw, stride in layers:
        blk = min(32, c_in, c_out)
        assert {(c_in, c_out, hw, 128, blk, s, stride) for s in (0.5, 0.9)} <= convs
    quick, _ = bench.benchmark_cases(quick=True)
    assert [p[0] for k, p in quick if k == "conv"] == ["vgg 128->128 16x16", "vgg 256->256 8x8"]


def _run_compiled(*args: str, **env: str) -> str:
    """Run `python args...` from the repository root with the kernels compiled (no
    TRITON_INTERPRET: the kernels of this process are the interpreter's) and every autotuning
    candidate; skip where Triton has no ptxas for sm_90; fail on a nonzero exit. Its stdout."""
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("TRITON_INTERPRET", "SPARSEKERN_TRITON_AUTOTUNE")}, **env}
    proc = subprocess.run([sys.executable, *args], env=env, cwd=root, capture_output=True,
                          text=True, timeout=900)
    if "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("this triton has no ptxas for sm_90")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.skipif(ON_GPU, reason="the GPU suite runs triton_codegen.py --check itself")
def test_kernels_compile_for_sm90_with_wide_tile_loads():
    """benchmarks/triton_codegen.py --check: every candidate the autotuner would time compiles
    for sm_90 (Triton's ptxas, no GPU needed) and loads its tiles in 16-byte async copies. The
    interpreter cannot see either: a dead return of another shape failed only in compiled code,
    and dds_nt's x tile was loaded 2 bytes at a time outside the pipeline until col0 % C got a
    divisibility hint."""
    out = _run_compiled("benchmarks/triton_codegen.py", "--check")
    assert "0 with a compile error or a narrow tile load" in out


def test_tuned_and_direct_launches_without_gpu():
    """benchmarks/triton_host.py --check: with a driver that compiles for sm_90 and records
    launches instead of making them, the autotuner's path (two candidates per kernel, timings
    written to a fresh disk cache and read back) works, and ops._launch's direct launches hand
    the launcher the same kernel, grid and arguments as Triton's own path, across
    specializations (unaligned x, a batch not a multiple of 16) of the same kernels. The
    interpreter runs neither path: a tl.dtype in a tuning key failed only in the compiled one
    (TypeError writing the cache; it would have on the GPU too)."""
    assert "tuned and direct launches agree" in _run_compiled("benchmarks/triton_host.py",
                                                              "--check")


@pytest.mark.skipif(ON_GPU, reason="the GPU suite runs triton_warm_cache.py itself")
def test_warm_cache_compiles_what_the_benchmark_loads(tmp_path):
    """benchmarks/triton_warm_cache.py: two workers replaying bench_triton_gpu's launches
    (tiny shapes) compile every candidate into Triton's cache, so a process then making the
    benchmark's launches with all candidates (triton_host's driver) compiles nothing new: the
    GPU suite's autotuner would load them instead of compiling one after another."""
    import glob

    cache = str(tmp_path)
    _run_compiled("benchmarks/triton_warm_cache.py", "--tiny", "--workers=2",
                  TRITON_CACHE_DIR=cache)
    compiled = len(glob.glob(os.path.join(cache, "*", "*.cubin")))
    replay = ("import sys; sys.path[:0] = ['benchmarks', '.']\n"
              "import triton_host, triton_warm_cache\n"
              "fake = triton_host.install()\n"
              "for name, replay in triton_warm_cache.replays(False, tiny=True): replay()\n"
              "print('loaded', fake.utils.loaded)\n")
    loaded = int(_run_compiled("-c", replay, TRITON_CACHE_DIR=cache).split("loaded")[-1])
    assert compiled > 20 and loaded == compiled, (compiled, loaded)
    assert len(glob.glob(os.path.join(cache, "*", "*.cubin"))) == compiled  # nothing new
