"""Conv2d on the implicit-GEMM view: sparsekern.bsr_conv2d, the conv geometry of the ops, and
sparsekern.SparseConv2d, against F.conv2d.

The expectation is always F.conv2d in float64 on the dense conv weight rebuilt from the stored
blocks by the loop oracle of conftest.py (never by the package's own to_dense / reference), with
random, never-constant inputs and output gradients.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import sparsekern
from sparsekern import BlockSparseMatrix, SparseConv2d, SparseLinear, bsr_conv2d, ops
from sparsekern.bsr import TOPOLOGY_FIELDS
from conftest import (assert_close, matrix_dense, oracle_blocks, padding_keep_mask, randn,
                      seeded_generator)

dds_native = torch.ops.sparsekern._dds_native
sdd_native = torch.ops.sparsekern._sdd_native

BACKENDS = ("cpu", "reference")
DTYPES = (torch.float32, torch.float64)
DTYPE_IDS = ("f32", "f64")
ANY_ERROR = (ValueError, RuntimeError, IndexError, TypeError)


# ---- helpers -------------------------------------------------------------------------------------
def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _block_mask(n_br: int, n_bc: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """kind: "dense" (all blocks), "nnz0" (none), "sparse" (random; with an empty block row and an
    empty block column whenever the grid has at least 2 of them, and at least one block)."""
    if kind == "dense":
        return torch.ones(n_br, n_bc, dtype=torch.bool)
    if kind == "nnz0":
        return torch.zeros(n_br, n_bc, dtype=torch.bool)
    assert kind == "sparse", kind
    mask = torch.rand(n_br, n_bc, generator=gen) < 0.5
    empty_row = int(torch.randint(n_br, (1,), generator=gen)) if n_br >= 2 else None
    empty_col = int(torch.randint(n_bc, (1,), generator=gen)) if n_bc >= 2 else None
    if empty_row is not None:
        mask[empty_row] = False
    if empty_col is not None:
        mask[:, empty_col] = False
    if not mask.any():
        r = 0 if empty_row != 0 else 1
        c = 0 if empty_col != 0 else 1
        mask[min(r, n_br - 1), min(c, n_bc - 1)] = True
    return mask


def make_conv_weight(c_out, c_in, kernel, block, kind, dtype, gen) -> BlockSparseMatrix:
    """A block-sparse implicit-GEMM conv weight [c_out, R*S*c_in] with random values (scaled by
    1/sqrt(fan-in)), zero in the padding rows."""
    R, S = _pair(kernel)
    bm, bk = block
    K = R * S * c_in
    n_br, n_bc = -(-c_out // bm), -(-K // bk)
    mask = _block_mask(n_br, n_bc, kind, gen)
    nnz = int(mask.sum())
    values = (torch.randn(nnz, bm, bk, generator=gen, dtype=torch.float64) / K ** 0.5)
    m = BlockSparseMatrix.from_block_mask(mask, block, (c_out, K), values=values.to(dtype))
    return m.with_values(m.values * padding_keep_mask(m).to(dtype))


def dense_conv_weight(m: BlockSparseMatrix, c_in: int, kernel) -> torch.Tensor:
    """float64 [C_out, C_in, R, S] of a GEMM-view weight, from the loop oracle."""
    R, S = _pair(kernel)
    c_out, K = m.shape
    gemm = matrix_dense(m)[:c_out, :K]
    return gemm.reshape(c_out, R, S, c_in).permute(0, 3, 1, 2).contiguous()


def gathered_weight_grad(grad4: torch.Tensor, m: BlockSparseMatrix) -> torch.Tensor:
    """A dense conv weight gradient [C_out, C_in, R, S] restricted to m's stored blocks."""
    c_out = grad4.shape[0]
    gemm = grad4.detach().double().permute(0, 2, 3, 1).reshape(c_out, -1)
    Mp, Kp = m.padded_shape
    padded = torch.zeros(Mp, Kp, dtype=torch.float64)
    padded[:c_out, : gemm.shape[1]] = gemm
    bm, bk = m.block_shape
    return oracle_blocks(padded, m.row_idx, m.col_idx, bm, bk)


def check_bsr_conv2d(case, backend, dtype, gen, spy=None, bias=True, device="cpu",
                     memory_format=torch.contiguous_format):
    """Forward, grad input, grad values and grad bias of bsr_conv2d against float64 F.conv2d
    (computed on the CPU; the operands of the backend under test live on `device`, the input in
    `memory_format`, which the output keeps)."""
    N, c_in, c_out, H, W, kernel, stride, padding, dilation, block, kind = case
    m = make_conv_weight(c_out, c_in, kernel, block, kind, dtype, gen)
    w4 = dense_conv_weight(m, c_in, kernel).requires_grad_()
    x64 = randn(N, c_in, H, W, generator=gen).requires_grad_()
    b64 = randn(c_out, generator=gen).requires_grad_() if bias else None
    y64 = F.conv2d(x64, w4, b64, stride, padding, dilation)
    g = randn(*y64.shape, generator=gen)
    y64.backward(g)

    x = x64.detach().to(device, dtype).contiguous(memory_format=memory_format).requires_grad_()
    values = m.values.detach().to(device).requires_grad_()
    b = b64.detach().to(device, dtype).requires_grad_() if bias else None
    weight = m.to(device).with_values(values)
    if spy is not None:
        spy.calls.clear()
    y = bsr_conv2d(x, weight, b, stride, padding, dilation, kernel_size=kernel, backend=backend)
    assert y.dtype == dtype and y.shape == y64.shape
    # (a 1-channel or 1x1 input is contiguous in both formats: NCHW wins, as for F.conv2d)
    assert y.is_contiguous(memory_format=torch.contiguous_format if x.is_contiguous()
                           else memory_format)
    y.backward(g.to(device, dtype))
    if spy is not None:  # the forced backend really ran forward, grad input and grad weight
        assert spy.names() == {backend}, spy.calls
        assert sorted(op for _, op in spy.calls) == ["dds", "dds", "sdd"], spy.calls

    assert_close(y.cpu(), y64, dtype, msg="forward")
    assert_close(x.grad.cpu(), x64.grad, dtype, msg="grad input")
    assert_close(values.grad.cpu(), gathered_weight_grad(w4.grad, m), dtype, msg="grad values")
    assert not values.grad.cpu()[~padding_keep_mask(m)].any(), "gradient reaches the padding"
    if bias:
        assert_close(b.grad.cpu(), b64.grad, dtype, msg="grad bias")
    return m


# ---- 1. bsr_conv2d against F.conv2d --------------------------------------------------------------
# (N, C_in, C_out, H, W, kernel, stride, padding, dilation, block, kind)
EXPLICIT_CASES = [
    (2, 4, 6, 7, 9, 3, 1, 1, 1, (1, 1), "sparse"),
    (1, 8, 10, 9, 8, 3, 2, 1, 1, (4, 4), "sparse"),      # C_out not a multiple of bm
    (3, 8, 16, 11, 10, 5, 1, 2, 1, (8, 8), "sparse"),
    (2, 16, 24, 7, 7, 3, 2, 0, 2, (16, 16), "sparse"),   # stride 2 + dilation 2, padded C_out
    (1, 32, 40, 8, 9, 3, 1, 1, 1, (32, 32), "sparse"),
    (2, 4, 5, 9, 9, 7, 1, 2, 1, (4, 4), "dense"),
    (2, 8, 8, 6, 7, 3, 1, 1, 1, (8, 8), "nnz0"),
    (1, 16, 20, 5, 6, 7, 1, 2, 1, (16, 16), "nnz0"),
    (1, 4, 4, 5, 5, 1, 2, 0, 1, (4, 4), "dense"),        # 1x1, stride 2
    (2, 32, 32, 5, 5, 1, 1, 0, 1, (32, 32), "dense"),
    (2, 6, 7, 13, 11, 5, 2, 2, 2, (1, 1), "sparse"),
    (1, 4, 4, 3, 3, 5, 1, 2, 1, (4, 4), "sparse"),       # kernel larger than the unpadded input
    (2, 8, 9, 6, 5, (3, 1), (2, 1), (1, 0), (1, 2), (4, 4), "sparse"),  # non-square everything
    (1, 4, 6, 5, 6, 3, 2, 4, 1, (4, 4), "sparse"),       # padding larger than the kernel
    # CPU paths (AVX-512 vector length 16 f32 / 8 f64; AVX2 8 / 4): blocks a multiple of it run
    # on per-thread 64-row tiles, narrower ones at stride 1 on the "shifted image" path, else
    # on chunked im2col tiles through the linear kernels.
    (1, 64, 40, 27, 29, 5, 1, 2, 1, (32, 32), "sparse"),  # many tiles, padded C_out
    (5, 16, 16, 5, 5, 3, 1, 1, 1, (16, 16), "sparse"),   # 64-row tiles straddle images
    (3, 16, 20, 9, 10, 3, 1, 1, 1, (16, 16), "sparse"),  # several tiles per image
    (3, 4, 6, 9, 7, 3, 1, (2, 1), 2, (4, 4), "sparse"),  # shifted: dilation, asymmetric padding
    (2, 3, 5, 7, 8, 7, 1, 0, 1, (1, 1), "dense"),        # shifted: 1x2 output of 7x8 input
    (2, 8, 20, 6, 7, 3, 1, 1, 1, (16, 4), "sparse"),     # tiles forward, shifted backward
    (2, 16, 10, 6, 7, 3, 1, 1, 2, (4, 16), "sparse"),    # shifted forward, tiles backward
    (2, 16, 16, 7, 6, 3, 2, 1, 1, (4, 16), "sparse"),    # chunked forward, tiles backward
    (2, 8, 16, 7, 6, 3, 2, 1, 1, (16, 4), "sparse"),     # tiles forward, chunked backward
    # wide blocks read straight from padded images: padding beyond the kernel's reach (the
    # gather-form grad input's dy needs no top/left margin), 1x1 with padding, asymmetric
    # padding with dilation at stride 1
    (2, 16, 16, 5, 6, 3, 1, 3, 1, (16, 16), "sparse"),
    (1, 32, 32, 4, 5, 1, 1, 1, 1, (32, 32), "sparse"),
    (2, 16, 24, 9, 7, 3, 1, (2, 0), 2, (16, 16), "sparse"),
    # narrow blocks, stride 2, R*S*C = 1600: 676 output pixels in two chunks of 655
    (1, 64, 10, 52, 51, 5, 2, 2, 1, (4, 4), "sparse"),
    # LeNet-5 shapes, unstructured
    (2, 1, 20, 28, 28, 5, 1, 0, 1, (1, 1), "sparse"),
    (2, 20, 50, 12, 12, 5, 1, 0, 1, (1, 1), "sparse"),
]
EXPLICIT_IDS = ["1x1-basic", "4x4-pad-cout", "8x8-k5", "16x16-s2d2", "32x32-k3", "4x4-k7-dense",
                "8x8-nnz0", "16x16-k7-nnz0", "4x4-1x1conv-s2", "32x32-1x1conv-dense",
                "1x1-k5-s2d2", "4x4-k5-on-3x3", "4x4-nonsquare", "4x4-pad4", "32x32-tiles-k5",
                "16x16-tiles-straddle", "16x16-tiles-per-image", "4x4-shifted-d2-asym",
                "1x1-shifted-k7-valid", "16x4-s1", "4x16-s1-d2", "4x16-s2", "16x4-s2",
                "16x16-s1-pad3", "32x32-1x1-pad1", "16x16-s1-d2-asym", "4x4-s2-multichunk",
                "lenet-conv1", "lenet-conv2"]


def _random_cases(n: int, seed: int = 20240611):
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        block = rng.choice([(1, 1), (4, 4), (8, 8), (16, 16), (32, 32)])
        bm, bk = block
        c_in = rng.randint(1, 6) if bk == 1 else bk * (rng.choice([1, 2]) if bk <= 8 else 1)
        c_out = rng.randint(1, 3 * bm) if bm < 32 else rng.choice([20, 32, 45])
        k = rng.choice([1, 3, 5, 7])
        s, p, d = rng.choice([1, 2]), rng.choice([0, 1, 2]), rng.choice([1, 2])
        H, W = rng.randint(3, 12), rng.randint(3, 12)
        if min(_out_size(H, k, s, p, d), _out_size(W, k, s, p, d)) < 1:
            continue
        kind = rng.choice(["sparse", "sparse", "dense", "nnz0"])
        cases.append((rng.randint(1, 3), c_in, c_out, H, W, k, s, p, d, block, kind))
    return cases


RANDOM_CASES = _random_cases(14)
CASES = EXPLICIT_CASES + RANDOM_CASES
CASE_IDS = EXPLICIT_IDS + [f"random{i}" for i in range(len(RANDOM_CASES))]


def test_case_list_covers_the_brief():
    blocks = {c[9] for c in CASES}
    assert blocks >= {(1, 1), (4, 4), (8, 8), (16, 16), (32, 32)}
    assert {c[5] for c in CASES} >= {1, 3, 5, 7}
    assert {c[6] for c in CASES} >= {1, 2} and {c[7] for c in CASES} >= {0, 1, 2}
    assert {c[8] for c in CASES} >= {1, 2}
    assert {c[10] for c in CASES} == {"sparse", "dense", "nnz0"}
    assert any(c[2] % c[9][0] for c in CASES), "no C_out that is not a multiple of bm"
    assert any(c[3] % 2 and c[4] % 2 for c in CASES), "no odd spatial size"


MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last)
MEMORY_FORMAT_IDS = ("nchw", "cl")


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=MEMORY_FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bsr_conv2d_matches_f_conv2d(case, backend, dtype, memory_format, backend_spy, gen):
    """Both layouts of the ops: NCHW input runs the ops on NCHW tensors, channels_last input on
    NHWC rows (see ops.py)."""
    m = check_bsr_conv2d(case, backend, dtype, gen, spy=backend_spy, memory_format=memory_format)
    kind = case[-1]
    n_br, n_bc = m.block_grid
    if kind == "nnz0":
        assert m.nnz_blocks == 0
    elif kind == "dense":
        assert m.nnz_blocks == n_br * n_bc
    elif n_br >= 2 and n_bc >= 2:  # the sparse topologies really have empty block rows/cols
        mask = m.block_mask()
        assert (~mask.any(1)).any() and (~mask.any(0)).any() and mask.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bsr_conv2d_without_bias(backend, gen):
    check_bsr_conv2d((2, 8, 10, 7, 6, 3, 2, 1, 1, (4, 4), "sparse"), backend, torch.float64,
                     gen, bias=False)


def test_bsr_conv2d_batch_zero(gen):
    m = make_conv_weight(6, 4, 3, (2, 2), "sparse", torch.float64, gen)
    x = torch.empty(0, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    for backend in BACKENDS:
        y = bsr_conv2d(x, m, None, 1, 1, backend=backend)
        assert y.shape == (0, 6, 5, 5)
        y.sum().backward()
        assert x.grad.shape == x.shape


def test_auto_backend_runs_cpu_kernels_for_conv(backend_spy, gen):
    m = make_conv_weight(6, 4, 3, (2, 2), "sparse", torch.float32, gen)
    x = randn(2, 4, 6, 6, dtype=torch.float32, generator=gen).requires_grad_()
    values = m.values.clone().requires_grad_()
    bsr_conv2d(x, m.with_values(values), padding=1).square().sum().backward()
    assert backend_spy.names() == {"cpu"}
    backend_spy.calls.clear()
    with sparsekern.backend("reference"):
        bsr_conv2d(x, m.with_values(values), padding=1).square().sum().backward()
    assert backend_spy.names() == {"reference"}


def test_auto_backend_falls_back_to_reference_for_bfloat16(backend_spy, gen):
    m = make_conv_weight(4, 4, 3, (2, 2), "dense", torch.float64, gen)
    x = randn(1, 4, 5, 5, generator=gen)
    y = bsr_conv2d(x.bfloat16(), m.to(torch.bfloat16), padding=1)
    assert backend_spy.names() == {"reference"} and y.dtype == torch.bfloat16
    expected = F.conv2d(x.bfloat16().double(), dense_conv_weight(m.to(torch.bfloat16), 4, 3),
                        padding=1)
    assert_close(y, expected, torch.bfloat16)


def test_kernel_size_inferred_for_square_kernels(gen):
    m = make_conv_weight(5, 4, 3, (1, 2), "sparse", torch.float64, gen)
    x = randn(2, 4, 6, 7, generator=gen)
    expected = F.conv2d(x, dense_conv_weight(m, 4, 3), None, 1, 1)
    assert_close(bsr_conv2d(x, m, padding=1), expected)
    assert_close(bsr_conv2d(x, m, padding=(1, 1), kernel_size=3), expected)


# One case per CPU path (tiles, shifted image, chunked im2col) at both dtypes.
PATH_CASES = [
    (3, 16, 20, 9, 10, 3, 1, 1, 1, (16, 16), "sparse"),
    (3, 4, 6, 9, 7, 3, 1, (2, 1), 2, (4, 4), "sparse"),
    (2, 8, 6, 7, 6, 3, 2, 1, 1, (2, 2), "sparse"),
]


@pytest.mark.parametrize("threads", [1, 3])
def test_results_do_not_depend_on_the_thread_count(threads, gen):
    """Per-thread tiles, image ownership and private dW accumulators, with 1 and 3 threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for case in PATH_CASES:
            for dtype in DTYPES:
                check_bsr_conv2d(case, "cpu", dtype, gen)
    finally:
        torch.set_num_threads(old)


ISA_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, {tests!r})
import sparsekern
from test_conv import check_bsr_conv2d
from conftest import seeded_generator

checked = 0
for dtype in (torch.float32, torch.float64):
    for block in [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (4, 8), (8, 4), (16, 2)]:
        for stride, dilation in ((1, 1), (1, 2), (2, 1)):
            case = (2, 16, 13, 7, 6, 3, stride, 1, dilation, block, "sparse")
            check_bsr_conv2d(case, "cpu", dtype, seeded_generator(case, str(dtype)))
            checked += 1
print(json.dumps({{"isa": sparsekern.ops.native_extension().cpu_isa(), "checked": checked}}))
"""


@pytest.mark.parametrize("cap", ["avx2", "base"])
def test_conv_paths_under_capped_isa(cap):
    """SPARSEKERN_ISA caps the vector length (read once per process), which moves block shapes
    between the tiles, shifted-image and chunked paths: each cap runs in a subprocess."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, SPARSEKERN_ISA=cap, OMP_NUM_THREADS="2")
    script = ISA_SCRIPT.format(tests=str(Path(__file__).resolve().parent))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"SPARSEKERN_ISA={cap}: rc={proc.returncode}\n{proc.stderr}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    native = sparsekern.ops.native_extension().cpu_isa()
    level = {"base": 0, "avx2": 1, "avx512": 2}
    assert out["isa"] == (cap if level[native] >= level[cap] else native)
    assert out["checked"] == 2 * 8 * 3


# ---- 2. gradcheck of the ops with a conv geometry ------------------------------------------------
# (N, C, H, W, kernel, stride, padding, dilation, C_out, block)
GRAD_GEOMETRIES = [
    (2, 4, 5, 6, (3, 3), (2, 2), (1, 1), (1, 1), 4, (2, 2)),
    (1, 2, 6, 5, (3, 3), (1, 1), (2, 1), (2, 2), 3, (1, 1)),
    (2, 4, 7, 6, (3, 2), (2, 1), (0, 1), (2, 1), 6, (4, 4)),
    # 8x8 float64 blocks: the vector-length tile path on AVX-512 (stride 2, so the backward
    # scatters into overlapping taps)
    (2, 8, 5, 4, (3, 3), (2, 1), (1, 1), (1, 1), 8, (8, 8)),
    # ... and at stride 1 (gather-form grad input) with dilation and uneven padding
    (2, 8, 5, 4, (3, 3), (1, 1), (2, 1), (2, 1), 8, (8, 8)),
]
GRAD_IDS = ["s2", "d2", "mixed", "tiles", "tiles-s1"]
LAYOUTS = ("rows", "nchw", "cl")  # the activation layouts of the conv ops


def _conv_op_inputs(geom, gen, kind="sparse", layout="rows"):
    """Operands of the conv ops: x and dy as NHWC rows [N*H*W, C] / [N*P*Q, Mp], or 4-D NCHW
    ("nchw") or channels_last ("cl")."""
    N, C, H, W, kernel, stride, padding, dilation, c_out, block = geom
    conv = ops.conv_geometry((N, C, H, W), kernel, stride, padding, dilation)
    m = make_conv_weight(c_out, C, kernel, block, kind, torch.float64, gen)
    P, Q = conv[-2:]
    Mp, Kp = m.padded_shape
    if layout in ("nchw", "cl"):
        fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
        x = randn(N, C, H, W, generator=gen).contiguous(memory_format=fmt).requires_grad_()
        dy = randn(N, Mp, P, Q, generator=gen).contiguous(memory_format=fmt).requires_grad_()
    else:
        x = randn(N * H * W, C, generator=gen).requires_grad_()
        dy = randn(N * P * Q, Mp, generator=gen).requires_grad_()
    values = m.values.clone().requires_grad_()
    return m, conv, x, dy, values


def test_conv_geometry_follows_the_formula():
    assert ops.conv_geometry((2, 3, 9, 8), (3, 2), (2, 1), (1, 0), (2, 1)) == \
        [2, 9, 8, 3, 3, 2, 2, 1, 1, 0, 2, 1, 4, 7]
    x = torch.randn(2, 3, 9, 8)
    assert F.conv2d(x, torch.randn(1, 3, 3, 2), None, (2, 1), (1, 0), (2, 1)).shape[-2:] == (4, 7)
    import numpy as np  # sizes of other integer types come back as Python ints
    for shape in (np.array([2, 3, 9, 8]), torch.tensor([2, 3, 9, 8])):
        geometry = ops.conv_geometry(shape, (3, 2), (2, 1), (1, 0), (2, 1))
        assert geometry == [2, 9, 8, 3, 3, 2, 2, 1, 1, 0, 2, 1, 4, 7]
        assert all(type(v) is int for v in geometry)
    with pytest.raises(TypeError):
        ops.conv_geometry((2.0, 3, 9, 8), (3, 2), (2, 1), (1, 0), (2, 1))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("trans_w", [True, False])
@pytest.mark.parametrize("geom", GRAD_GEOMETRIES, ids=GRAD_IDS)
def test_conv_dds_gradcheck(geom, trans_w, layout, gen):
    m, conv, x, dy, values = _conv_op_inputs(geom, gen, layout=layout)
    Mp, Kp = m.padded_shape
    topo = m.topology()
    a = x if trans_w else dy
    out = ops.dds(a, values, *topo, Mp, Kp, trans_w, "cpu", conv)
    N, H, W, C, *_, P, Q = conv
    if layout in ("nchw", "cl"):
        fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
        assert out.shape == ((N, Mp, P, Q) if trans_w else (N, C, H, W))
        assert out.is_contiguous(memory_format=fmt) and out._base is None
    else:
        assert out.shape == ((N * P * Q, Mp) if trans_w else (N * H * W, C))
    assert_close(out, ops.dds(a, values, *topo, Mp, Kp, trans_w, "reference", conv))
    assert torch.autograd.gradcheck(
        lambda a, v: ops.dds(a, v, *topo, Mp, Kp, trans_w, "cpu", conv), (a, values))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("geom", GRAD_GEOMETRIES, ids=GRAD_IDS)
def test_conv_sdd_gradcheck(geom, layout, gen):
    m, conv, x, dy, _ = _conv_op_inputs(geom, gen, layout=layout)
    bm, bk = m.block_shape
    topo = m.topology()
    assert_close(ops.sdd(dy, x, *topo, bm, bk, "cpu", conv),
                 ops.sdd(dy, x, *topo, bm, bk, "reference", conv))
    assert torch.autograd.gradcheck(lambda a, b: ops.sdd(a, b, *topo, bm, bk, "cpu", conv),
                                    (dy, x))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's forward AD uses torch.jit.script
@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_forward_ad_and_batched_gradcheck(layout, gen):
    """The eager conv products (what SparseConv2d calls) under forward-mode AD and vmap over
    their backward and jvp: x @ W^T and dy @ W (stride 2) and sdd, in every layout."""
    m, conv, x, dy, values = _conv_op_inputs(GRAD_GEOMETRIES[0], gen, layout=layout)
    Mp, Kp = m.padded_shape
    bm, bk = m.block_shape
    topo = m.topology()
    checks = dict(check_forward_ad=True, check_batched_grad=True,
                  check_batched_forward_grad=True)
    for trans_w, a in ((True, x), (False, dy)):
        assert torch.autograd.gradcheck(
            lambda a, v: ops.dds_call(a, v, *topo, Mp, Kp, trans_w, "cpu", conv), (a, values),
            **checks)
    assert torch.autograd.gradcheck(
        lambda a, b: ops.sdd_call(a, b, *topo, bm, bk, "cpu", conv), (dy, x), **checks)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_vmap_stacks_the_images(layout, backend_spy, gen):
    """vmap of the conv products over x (dy) stacks the samples' images into one call (N ->
    samples * N), in every layout, as a loop; a strided geometry, so dy @ W's grad input too."""
    from torch.func import vmap

    m, conv, x, dy, values = _conv_op_inputs(GRAD_GEOMETRIES[0], gen, layout=layout)
    Mp, Kp = m.padded_shape
    topo = m.topology()
    v0 = values.detach()
    for trans_w, a in ((True, x.detach()), (False, dy.detach())):
        def product(t):
            return ops.dds_call(t, v0, *topo, Mp, Kp, trans_w, "cpu", conv)
        samples = [a, -2 * a, a.flip(0)]
        backend_spy.calls.clear()
        out = vmap(product)(torch.stack(samples))
        assert backend_spy.calls == [("cpu", "dds")]
        for i, sample in enumerate(samples):
            assert_close(out[i], product(sample))
    # with bias and the fused ReLU, samples at dimension 1; dy @ W with a ReLU mask, batched
    # with dy or shared
    bias = torch.randn(Mp, dtype=torch.float64)
    def nt(t):
        return ops.dds_call(t, v0, *topo, Mp, Kp, True, "cpu", conv, bias, True)
    def nn_masked(t, mask):
        return ops.dds_call(t, v0, *topo, Mp, Kp, False, "cpu", conv, None, False, mask)
    xs = torch.stack([x.detach(), x.detach().flip(0)], dim=1)
    dys = torch.stack([dy.detach(), -dy.detach()])
    masks = (dys > 0).to(dys.dtype)
    if layout == "cl":
        masks = torch.stack([m.contiguous(memory_format=torch.channels_last) for m in masks])
    for fn, in_dims, args, expected in (
            (nt, (1,), (xs,), [nt(xs[:, i]) for i in range(2)]),
            (nn_masked, (0, 0), (dys, masks), [nn_masked(dys[i], masks[i]) for i in range(2)]),
            (nn_masked, (0, None), (dys, masks[1]),
             [nn_masked(dys[i], masks[1]) for i in range(2)])):
        backend_spy.calls.clear()
        out = vmap(fn, in_dims=in_dims)(*args)
        assert backend_spy.calls == [("cpu", "dds")]
        for i in range(2):
            assert_close(out[i], expected[i])
    # a sample of the wrong shape: the message gives the sample's shape, not the stacked one
    bad = x.detach()[:-1] if layout == "rows" else x.detach()[:, :-1]
    with pytest.raises(ValueError, match=rf"{tuple(bad.shape)}".replace("(", r"\(")
                       .replace(")", r"\)")):
        vmap(lambda t: ops.dds_call(t, v0, *topo, Mp, Kp, True, "cpu", conv))(
            torch.stack([bad, bad]))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("geom", GRAD_GEOMETRIES[:3], ids=GRAD_IDS[:3])
def test_conv_vmap_side_by_side(layout, geom, backend_spy, gen):
    """vmap of the conv products with batched weights (x shared or batched, either transpose,
    bias and fused ReLU, ReLU masks) and of conv sdd (dy and / or x batched: per-sample weight
    gradients): one call on the samples' channels side by side within each filter tap, as a
    loop, in every layout and geometry (stride, dilation, padding, 1x1 blocks)."""
    from torch.func import vmap

    m, conv, x, dy, values = _conv_op_inputs(geom, gen, layout=layout)
    Mp, Kp = m.padded_shape
    bm, bk = m.block_shape
    topo = m.topology()
    x, dy, v0 = x.detach(), dy.detach(), values.detach()
    V = 3
    vs = torch.stack([v0, -2 * v0, v0.flip(0)])
    xs, dys = torch.stack([x, x.flip(0), 3 * x]), torch.stack([dy, -dy, dy.flip(0)])
    masks = (dys > 0.2).to(dys.dtype)
    bias = torch.randn(Mp, dtype=torch.float64)

    def nt(a, v):
        return ops.dds_call(a, v, *topo, Mp, Kp, True, "cpu", conv, bias, True)

    def nn_masked(a, v, msk):
        return ops.dds_call(a, v, *topo, Mp, Kp, False, "cpu", conv, None, False, msk)

    def sdd(a, b):
        return ops.sdd_call(a, b, *topo, bm, bk, "cpu", conv)

    def pick(t, d, i):
        return t if d is None or t is None else t.select(d, i)

    for fn, in_dims, args, op in (
            (nt, (None, 0), (x, vs), "dds"), (nt, (0, 0), (xs, vs), "dds"),
            (nn_masked, (None, 0, None), (dy, vs, None), "dds"),
            (nn_masked, (0, 0, 0), (dys, vs, masks), "dds"),
            (sdd, (0, 0), (dys, xs), "sdd"), (sdd, (0, None), (dys, x), "sdd"),
            (sdd, (None, 0), (dy, xs), "sdd")):
        backend_spy.calls.clear()
        out = vmap(fn, in_dims=in_dims)(*args)
        assert backend_spy.calls == [("cpu", op)], (fn.__name__, in_dims)
        expected = torch.stack([fn(*(pick(t, d, i) for t, d in zip(args, in_dims)))
                                for i in range(V)])
        assert_close(out, expected)


def test_conv_torch_func_channels_last():
    """torch.func through a strided SparseConv2d on channels_last input: jacfwd (vmap over jvp,
    the layout helpers taking batched tangents as NCHW) as jacrev, and vmap over a batch at
    dimension 1 as a loop."""
    from torch.func import jacfwd, jacrev, vmap

    torch.manual_seed(25)
    layer = SparseConv2d(4, 8, 3, stride=2, padding=1, block_size=(4, 4), density=0.5,
                         activation="relu").double()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert_close(jacfwd(layer)(x), jacrev(layer)(x))
    xs = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64)  # 3 samples at dimension 1
    out = vmap(layer, in_dims=1)(xs)
    for i in range(3):
        assert_close(out[i], layer(xs[:, i].contiguous(memory_format=torch.channels_last)))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's forward AD uses torch.jit.script
def test_conv_torch_func_channels_last_padded_channels():
    """Per-sample gradients (vmap of grad) and jacfwd of a conv model on channels_last input
    whose layers pad their output channels (5 and 6 channels in blocks of 4 and 2): dropping
    the padding cloned to channels_last inside vmap, which vmap refuses (a grad wrapper over a
    batched tensor read as channels_last; jacfwd's tangents are batched though x is not)."""
    from torch.func import functional_call, grad, jacfwd, jacrev, vmap

    torch.manual_seed(26)
    model = nn.Sequential(
        SparseConv2d(4, 6, 3, padding=1, block_size=(4, 2), density=0.5).double(), nn.ReLU(),
        SparseConv2d(6, 5, 3, padding=1, block_size=(4, 2), density=0.5).double())
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)

    def loss(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).sin().sum()
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(3):
        one = grad(loss)(params, x[i])
        for name in one:
            assert_close(per_sample[name][i], one[name])
    forward = jacfwd(lambda p: functional_call(model, p, (x,)))(params)
    reverse = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    for name in forward:
        assert_close(forward[name], reverse[name])
    assert model(x).is_contiguous(memory_format=torch.channels_last)  # eager keeps the format


def test_conv_ops_nchw_equal_rows(gen):
    """The same products in both layouts, on every CPU path (tiles, shifted, chunked)."""
    for geom in GRAD_GEOMETRIES + [(3, 16, 9, 10, (3, 3), (1, 1), (1, 1), (1, 1), 20, (16, 16)),
                                   (2, 8, 7, 6, (3, 3), (2, 2), (1, 1), (1, 1), 8, (2, 2))]:
        m, conv, x, dy, _ = _conv_op_inputs(geom, gen, layout="nchw")
        N, H, W, C, *_, P, Q = conv
        Mp, Kp = m.padded_shape
        bm, bk = m.block_shape
        topo = m.topology()
        x, dy = x.detach(), dy.detach()
        x_rows, dy_rows = ops.nchw_to_rows(x), ops.nchw_to_rows(dy)
        y = ops.dds(x, m.values, *topo, Mp, Kp, True, "cpu", conv)
        assert_close(y, ops.rows_to_nchw(ops.dds(x_rows, m.values, *topo, Mp, Kp, True, "cpu",
                                                 conv), N, P, Q))
        dx = ops.dds(dy, m.values, *topo, Mp, Kp, False, "cpu", conv)
        assert_close(dx, ops.rows_to_nchw(ops.dds(dy_rows, m.values, *topo, Mp, Kp, False,
                                                  "cpu", conv), N, H, W))
        assert_close(ops.sdd(dy, x, *topo, bm, bk, "cpu", conv),
                     ops.sdd(dy_rows, x_rows, *topo, bm, bk, "cpu", conv))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("geom", GRAD_GEOMETRIES + [
    (2, 16, 5, 6, (3, 3), (1, 1), (1, 1), (1, 1), 20, (16, 16)),  # tiles, padded C_out
    (2, 4, 6, 5, (3, 3), (1, 1), (1, 1), (1, 1), 6, (2, 2))], ids=GRAD_IDS + ["tiles16", "shift"])
def test_conv_dds_bias(geom, layout, gen):
    """The bias fused into the conv forward, on every CPU path and in both layouts: value
    against the reference backend (which adds it in ops.py), and gradcheck."""
    m, conv, x, _, values = _conv_op_inputs(geom, gen, layout=layout)
    Mp, Kp = m.padded_shape
    topo = m.topology()
    bias = randn(Mp, generator=gen).requires_grad_()
    y = ops.dds(x, values, *topo, Mp, Kp, True, "cpu", conv, bias)
    assert_close(y, ops.dds(x, values, *topo, Mp, Kp, True, "reference", conv) +
                 (bias.view(1, -1, 1, 1) if layout != "rows" else bias))
    if geom[-1][0] <= 8:  # gradcheck on the small cases (float64 16x16 blocks: the value only)
        assert torch.autograd.gradcheck(
            lambda a, v, b: ops.dds_call(a, v, *topo, Mp, Kp, True, "cpu", conv, b),
            (x, values, bias))
    torch.library.opcheck(torch.ops.sparsekern.dds.default,
                          (x, values, *topo, Mp, Kp, True, "cpu", conv, bias))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("geom", GRAD_GEOMETRIES + [
    (2, 16, 5, 6, (3, 3), (1, 1), (1, 1), (1, 1), 20, (16, 16)),
    (2, 4, 6, 5, (3, 3), (1, 1), (1, 1), (1, 1), 6, (2, 2))], ids=GRAD_IDS + ["tiles16", "shift"])
def test_conv_dds_fused_relu(geom, layout, gen):
    """relu=True (forward) and relu_mask (the product carrying its backward) on every CPU path
    and layout: values against the reference backend with explicit ReLU passes, gradcheck of
    both backward routes (weights wanted: one threshold pass; input only: the mask folded into
    the grad-input kernel), opcheck."""
    m, conv, x, dy, values = _conv_op_inputs(geom, gen, layout=layout)
    Mp, Kp = m.padded_shape
    topo = m.topology()
    bias = randn(Mp, generator=gen).requires_grad_()
    y = ops.dds(x, values, *topo, Mp, Kp, True, "cpu", conv, bias, True)
    y_ref = ops.dds(x, values, *topo, Mp, Kp, True, "reference", conv, bias).relu()
    assert_close(y, y_ref)
    assert 0 < int((y == 0).sum()) < y.numel()  # the ReLU cuts something, not everything
    for backend in ("cpu", "reference"):
        dx = ops.dds(dy, values, *topo, Mp, Kp, False, backend, conv, None, False, y.detach())
        assert_close(dx, ops.dds(torch.where(y > 0, dy, 0), values, *topo, Mp, Kp, False,
                                 "reference", conv))
    if geom[-1][0] <= 8:  # gradcheck on the small cases (float64 16x16 blocks: the value only)
        v0 = values.detach()
        assert torch.autograd.gradcheck(
            lambda a, v, b: ops.dds_call(a, v, *topo, Mp, Kp, True, "cpu", conv, b, True),
            (x, values, bias))
        assert torch.autograd.gradcheck(
            lambda a: ops.dds_call(a, v0, *topo, Mp, Kp, True, "cpu", conv, None, True), (x,))
        assert torch.autograd.gradcheck(
            lambda a, v: ops.dds_call(a, v, *topo, Mp, Kp, False, "cpu", conv, None, False,
                                      y.detach()), (dy, values))
    torch.library.opcheck(torch.ops.sparsekern.dds.default,
                          (x, values, *topo, Mp, Kp, True, "cpu", conv, bias, True))
    torch.library.opcheck(torch.ops.sparsekern.dds.default,
                          (dy, values, *topo, Mp, Kp, False, "cpu", conv, None, False,
                           y.detach()))


def test_conv_relu_mask_in_another_layout_is_matched(gen):
    """A channels_last mask for an NCHW grad output (or the reverse) is read as the values it
    holds, not its memory."""
    m, conv, x, dy, _ = _conv_op_inputs(GRAD_GEOMETRIES[4], gen, layout="cl")
    Mp, Kp = m.padded_shape
    topo = m.topology()
    mask = randn(*dy.shape, generator=gen)  # contiguous: the other layout
    dx = ops.dds(dy.detach(), m.values, *topo, Mp, Kp, False, "cpu", conv, None, False, mask)
    assert_close(dx, ops.dds(torch.where(mask > 0, dy.detach(), 0), m.values, *topo, Mp, Kp,
                             False, "reference", conv))


def test_conv_ops_channels_last_equal_nchw(gen):
    """channels_last operands give the NCHW results, in channels_last (not views); sdd with one
    operand in each format converts the right one."""
    m, conv, x, dy, _ = _conv_op_inputs((2, 16, 9, 10, (3, 3), (1, 1), (1, 1), (1, 1), 20,
                                         (16, 16)), gen, layout="nchw")
    Mp, Kp = m.padded_shape
    bm, bk = m.block_shape
    topo = m.topology()
    x, dy = x.detach(), dy.detach()
    xc, dyc = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    for backend in ("cpu", "reference"):
        y = ops.dds(xc, m.values, *topo, Mp, Kp, True, backend, conv)
        assert y.is_contiguous(memory_format=torch.channels_last) and y._base is None
        assert_close(y, ops.dds(x, m.values, *topo, Mp, Kp, True, backend, conv))
        dx = ops.dds(dyc, m.values, *topo, Mp, Kp, False, backend, conv)
        assert dx.is_contiguous(memory_format=torch.channels_last) and dx._base is None
        assert_close(dx, ops.dds(dy, m.values, *topo, Mp, Kp, False, backend, conv))
        expected = ops.sdd(dy, x, *topo, bm, bk, backend, conv)
        for a, b in ((dyc, xc), (dyc, x), (dy, xc)):
            assert_close(ops.sdd(a, b, *topo, bm, bk, backend, conv), expected)


def test_channels_last_output_takes_inplace_relu(gen):
    """A channels_last conv output is not a view: ReLU(inplace=True) after it needs no view
    bookkeeping (CopySlices) and the gradients stay right."""
    m = make_conv_weight(16, 16, 3, (16, 16), "sparse", torch.float64, gen)
    w4 = dense_conv_weight(m, 16, 3).requires_grad_()
    b = randn(16, generator=gen)
    x = randn(2, 16, 6, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    values = m.values.clone().requires_grad_()
    x1 = x.clone().requires_grad_()
    y = bsr_conv2d(x1, m.with_values(values), b, padding=1)
    assert y._base is None and y.is_contiguous(memory_format=torch.channels_last)
    torch.relu_(y)
    assert "CopySlices" not in type(y.grad_fn).__name__
    g = randn(*y.shape, generator=gen)
    y.backward(g)
    x2 = x.clone().requires_grad_()
    F.relu(F.conv2d(x2, w4, b, padding=1)).backward(g)
    assert_close(x1.grad, x2.grad)
    assert_close(values.grad, gathered_weight_grad(w4.grad, m))


@pytest.mark.native_errors
def test_conv_ops_reject_mixed_layouts(gen):
    m, conv, x, dy, _ = _conv_op_inputs(GRAD_GEOMETRIES[0], gen, layout="nchw")
    bm, bk = m.block_shape
    with pytest.raises(ValueError, match="both NHWC rows .* or both NCHW"):
        ops.sdd(dy, ops.nchw_to_rows(x), *m.topology(), bm, bk, "cpu", conv)
    with pytest.raises(ValueError, match="expected NCHW"):
        ops.dds(x.transpose(2, 3), m.values, *m.topology(), *m.padded_shape, True, "cpu", conv)
    with pytest.raises(ValueError, match="NCHW"):  # native op: a 3-D activation
        dds_native(x[0], m.values, *[t for i, t in enumerate(m.topology()) if i != 2],
                   *m.padded_shape, True, conv)


def test_conv_dds_gradgradcheck(gen):
    m, conv, x, dy, values = _conv_op_inputs(
        (1, 2, 5, 5, (3, 3), (2, 2), (1, 1), (2, 2), 4, (2, 2)), gen)
    Mp, Kp = m.padded_shape
    topo = m.topology()
    assert torch.autograd.gradgradcheck(
        lambda a, v: ops.dds(a, v, *topo, Mp, Kp, True, "cpu", conv), (x, values))


def test_conv_ops_match_dense_products(gen):
    """The three conv products of the ops on "cpu" equal explicit unfold/fold formulas."""
    geom = (2, 4, 7, 6, (3, 3), (2, 1), (1, 2), (1, 2), 6, (2, 2))
    m, conv, x, dy, values = _conv_op_inputs(geom, gen)
    N, H, W, C, R, S, sh, sw, ph, pw, dh, dw, P, Q = conv
    Mp, Kp = m.padded_shape
    bm, bk = m.block_shape
    w = matrix_dense(m)  # [Mp, R*S*C], ordered (r, s, c)
    x4 = x.detach().reshape(N, H, W, C).permute(0, 3, 1, 2)
    cols = F.unfold(x4, (R, S), (dh, dw), (ph, pw), (sh, sw))  # [N, C*R*S, P*Q], ordered (c, r, s)
    cols = cols.reshape(N, C, R, S, P * Q).permute(0, 4, 2, 3, 1).reshape(N * P * Q, R * S * C)
    topo = m.topology()
    assert_close(ops.dds(x.detach(), m.values, *topo, Mp, Kp, True, "cpu", conv), cols @ w.t())
    dcols = (dy.detach() @ w).reshape(N, P * Q, R, S, C).permute(0, 4, 2, 3, 1)
    dx = F.fold(dcols.reshape(N, C * R * S, P * Q), (H, W), (R, S), (dh, dw), (ph, pw), (sh, sw))
    assert_close(ops.dds(dy.detach(), m.values, *topo, Mp, Kp, False, "cpu", conv),
                 dx.permute(0, 2, 3, 1).reshape(N * H * W, C))
    assert_close(ops.sdd(dy.detach(), x.detach(), *topo, bm, bk, "cpu", conv),
                 oracle_blocks(dy.detach().t() @ cols, m.row_idx, m.col_idx, bm, bk))


# ---- 3. opcheck ----------------------------------------------------------------------------------
OPCHECK_GEOMS = [((2, 4, 5, 6, (3, 3), (2, 2), (1, 1), (1, 1), 6, (2, 2)), "sparse"),
                 ((1, 4, 6, 5, (3, 3), (1, 1), (2, 2), (2, 2), 4, (4, 4)), "nnz0")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("geom,kind", OPCHECK_GEOMS, ids=["s2-sparse", "d2-nnz0"])
def test_opcheck_public_ops_with_conv(geom, kind, layout, gen):
    m, conv, x, dy, values = _conv_op_inputs(geom, gen, kind, layout)
    Mp, Kp = m.padded_shape
    bm, bk = m.block_shape
    topo = m.topology()
    op_dds, op_sdd = torch.ops.sparsekern.dds.default, torch.ops.sparsekern.sdd.default
    torch.library.opcheck(op_dds, (x, values, *topo, Mp, Kp, True, "auto", conv))
    torch.library.opcheck(op_dds, (dy, values, *topo, Mp, Kp, False, "cpu", conv))
    torch.library.opcheck(op_sdd, (dy, x, *topo, bm, bk, "auto", conv))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("geom,kind", OPCHECK_GEOMS, ids=["s2-sparse", "d2-nnz0"])
def test_opcheck_native_ops_with_conv(geom, kind, layout, gen):
    m, conv, x, dy, _ = _conv_op_inputs(geom, gen, kind, layout)
    Mp, Kp = m.padded_shape
    bm, bk = m.block_shape
    ro, ci, ri, to, tr, tp = m.topology()
    x, dy = x.detach(), dy.detach()
    torch.library.opcheck(dds_native.default, (x, m.values, ro, ci, to, tr, tp, Mp, Kp, True,
                                               conv))
    torch.library.opcheck(dds_native.default, (dy, m.values, ro, ci, to, tr, tp, Mp, Kp, False,
                                               conv))
    torch.library.opcheck(sdd_native.default, (dy, x, ri, ci, bm, bk, conv))
    # and the native results are the reference's
    topo = m.topology()
    assert_close(dds_native(x, m.values, ro, ci, to, tr, tp, Mp, Kp, True, conv),
                 ops.dds(x, m.values, *topo, Mp, Kp, True, "reference", conv))
    assert_close(dds_native(dy, m.values, ro, ci, to, tr, tp, Mp, Kp, False, conv),
                 ops.dds(dy, m.values, *topo, Mp, Kp, False, "reference", conv))
    assert_close(sdd_native(dy, x, ri, ci, bm, bk, conv),
                 ops.sdd(dy, x, *topo, bm, bk, "reference", conv))


# ---- 4. memory formats, unbatched and non-contiguous input ---------------------------------------
def _layout_setup(gen, c_out=8, block=(4, 4), dtype=torch.float64):
    m = make_conv_weight(c_out, 8, 3, block, "sparse", dtype, gen)
    w4 = dense_conv_weight(m, 8, 3)
    return m, w4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c_out,bias", [(8, True), (8, False), (10, True), (10, False)],
                         ids=["bias", "nobias", "padded-cout-bias", "padded-cout-nobias"])
def test_channels_last_in_channels_last_out(backend, c_out, bias, gen):
    m, w4 = _layout_setup(gen, c_out=c_out)
    b = randn(c_out, generator=gen) if bias else None
    x64 = randn(2, 8, 7, 9, generator=gen)
    x = x64.to(memory_format=torch.channels_last).requires_grad_()
    assert not x.is_contiguous()
    y = bsr_conv2d(x, m, b, 2, 1, backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    x_ref = x64.clone().requires_grad_()
    y_ref = F.conv2d(x_ref, w4, b, 2, 1)
    assert_close(y, y_ref)
    g = randn(*y.shape, generator=gen)
    y.backward(g)
    y_ref.backward(g)
    assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c_out", [8, 10])
def test_nchw_in_contiguous_out(backend, c_out, gen):
    m, w4 = _layout_setup(gen, c_out=c_out)
    x = randn(2, 8, 6, 5, generator=gen)
    for b in (None, randn(c_out, generator=gen)):
        y = bsr_conv2d(x, m, b, 1, 1, backend=backend)
        assert y.is_contiguous()
        assert_close(y, F.conv2d(x, w4, b, 1, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_input(backend, gen):
    m, w4 = _layout_setup(gen, c_out=10)
    b = randn(10, generator=gen)
    x = randn(8, 7, 6, generator=gen).requires_grad_()
    y = bsr_conv2d(x, m, b, 2, 2, 2, backend=backend)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.conv2d(x_ref, w4, b, 2, 2, 2)
    assert y.shape == y_ref.shape == (10, 4, 3)
    assert_close(y, y_ref)
    g = randn(*y.shape, generator=gen)
    y.backward(g)
    y_ref.backward(g)
    assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["rows_step2", "transposed_hw", "channel_slice", "cl_slice"])
def test_non_contiguous_input(view, backend, gen):
    m, w4 = _layout_setup(gen, c_out=10)
    b = randn(10, generator=gen)
    if view == "rows_step2":
        base = randn(2, 8, 14, 9, generator=gen)
        x = base[:, :, ::2, :]
    elif view == "transposed_hw":
        x = randn(2, 8, 9, 7, generator=gen).transpose(2, 3)
    elif view == "channel_slice":
        x = randn(2, 12, 7, 9, generator=gen)[:, 2:10]
    else:
        x = randn(2, 8, 14, 9, generator=gen).to(memory_format=torch.channels_last)[:, :, 1::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    x = x.requires_grad_() if x.is_leaf else x.detach().requires_grad_()
    y = bsr_conv2d(x, m, b, 1, 1, backend=backend)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.conv2d(x_ref, w4, b, 1, 1)
    assert_close(y, y_ref)
    g = randn(*y.shape, generator=gen)
    y.backward(g)
    y_ref.backward(g)
    assert_close(x.grad, x_ref.grad)


# ---- 5. SparseConv2d -----------------------------------------------------------------------------
def _conv(c_in, c_out, k, seed, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, k, dtype=dtype, **kw)


def _gemm(t4):
    return t4.permute(0, 2, 3, 1).reshape(t4.shape[0], -1)


def _expected_block_mask(gemm_mask, block):
    """Block grid mask of an element mask over the GEMM view (a block is kept if any element)."""
    bm, bk = block
    M, K = gemm_mask.shape
    padded = torch.zeros(-(-M // bm) * bm, -(-K // bk) * bk, dtype=torch.bool)
    padded[:M, :K] = gemm_mask
    return padded.reshape(padded.shape[0] // bm, bm, -1, bk).any(3).any(1)


def check_layer_against_dense(layer: SparseConv2d, w4, bias, x, stride, padding, dilation):
    """layer forward/backward against F.conv2d(x, w4, bias) in float64 (w4 the expected dense
    weight); values.grad against the dense weight gradient at the stored blocks."""
    dtype = layer.values.dtype
    x = x.detach().to(dtype).requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    g = randn(*y.shape, generator=seeded_generator("g", tuple(y.shape)))
    y.backward(g.to(dtype))
    w64 = w4.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y64 = F.conv2d(x64, w64, b64, stride, padding, dilation)
    y64.backward(g)
    assert_close(y, y64, dtype)
    assert_close(x.grad, x64.grad, dtype)
    if bias is not None:
        assert_close(layer.bias.grad, b64.grad, dtype)
    assert_close(layer.values.grad, gathered_weight_grad(w64.grad, layer.weight), dtype)


def test_from_dense_element_mask(gen):
    conv = _conv(8, 10, 3, 1, stride=2, padding=1)
    mask = torch.rand(conv.weight.shape, generator=gen) < 0.1
    layer = SparseConv2d.from_dense(conv, (4, 4), mask=mask)
    assert torch.equal(layer.weight.block_mask(), _expected_block_mask(_gemm(mask), (4, 4)))
    assert 0 < layer.density < 1
    x = randn(2, 8, 9, 7, generator=gen)
    check_layer_against_dense(layer, conv.weight * mask, conv.bias, x, 2, 1, 1)


def test_from_dense_block_mask(gen):
    conv = _conv(8, 10, 3, 2, padding=2, dilation=2)
    grid = (3, 3 * 3 * 8 // 4)  # C_out 10 -> 3 block rows of 4; K = 72 -> 18 block columns
    block_mask = torch.rand(grid, generator=gen) < 0.4
    layer = SparseConv2d.from_dense(conv, (4, 4), mask=block_mask)
    assert torch.equal(layer.weight.block_mask(), block_mask)
    keep = block_mask.repeat_interleave(4, 0).repeat_interleave(4, 1)[:10]
    w4 = (_gemm(conv.weight.detach()) * keep).reshape(10, 3, 3, 8).permute(0, 3, 1, 2)
    x = randn(2, 8, 8, 9, generator=gen)
    check_layer_against_dense(layer, w4, conv.bias, x, 1, 2, 2)


def test_from_dense_no_mask_keeps_nonzero_blocks(gen):
    conv = _conv(4, 6, 3, 3, padding=1)
    with torch.no_grad():  # zero whole taps of some channels, and single elements elsewhere
        conv.weight[:, :, 0, :] = 0
        conv.weight[:3, :2, 1, 1] = 0
        conv.weight[5, 3, 2, 2] = 0
    layer = SparseConv2d.from_dense(conv, (2, 2))
    assert torch.equal(layer.weight.block_mask(),
                       _expected_block_mask(_gemm(conv.weight.detach() != 0), (2, 2)))
    assert layer.density < 1
    check_layer_against_dense(layer, conv.weight, conv.bias, randn(1, 4, 6, 6, generator=gen),
                              1, 1, 1)


def test_from_dense_uses_prune_mask(gen):
    conv = _conv(6, 7, 3, 4, padding=1)
    prune.l1_unstructured(conv, "weight", amount=0.7)
    layer = SparseConv2d.from_dense(conv, (1, 1))
    assert layer.values.shape[0] == int(conv.weight_mask.sum())
    x = randn(2, 6, 7, 5, generator=gen)
    check_layer_against_dense(layer, conv.weight, conv.bias, x, 1, 1, 1)
    # the pruned dense layer itself agrees, forward and backward (grad of weight_orig is the
    # dense gradient masked: equal to values.grad at the stored (1, 1) blocks)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer.zero_grad()
    ys, yd = layer(xs), conv(xd)
    assert_close(ys, yd.detach())
    g = randn(*ys.shape, generator=gen)
    ys.backward(g)
    yd.backward(g)
    assert_close(xs.grad, xd.grad)
    assert_close(layer.values.grad, gathered_weight_grad(conv.weight_orig.grad, layer.weight))


def test_from_dense_prune_mask_keeps_blocks_with_zero_weights(gen):
    # a block whose kept weights all happen to be 0 is still stored: the prune mask decides
    conv = _conv(4, 4, 1, 5, bias=False)
    mask = torch.zeros_like(conv.weight)
    mask[:2, :2] = 1
    prune.custom_from_mask(conv, "weight", mask)
    with torch.no_grad():
        conv.weight_orig[:2, :2] = 0
    layer = SparseConv2d.from_dense(conv, (2, 2))
    assert layer.weight.block_mask().tolist() == [[True, False], [False, False]]
    assert layer.bias is None


def test_to_dense_round_trip(gen):
    conv = _conv(8, 10, 3, 6, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    mask = torch.rand(conv.weight.shape, generator=gen) < 0.3
    layer = SparseConv2d.from_dense(conv, (4, 4), mask=mask)
    dense = layer.to_dense()
    assert type(dense) is nn.Conv2d
    assert (dense.in_channels, dense.out_channels, dense.kernel_size, dense.stride,
            dense.padding, dense.dilation) == (8, 10, (3, 3), (2, 1), (1, 2), (1, 2))
    assert dense.weight.dtype == torch.float64
    torch.testing.assert_close(dense.weight, conv.weight * mask, rtol=0, atol=0)
    torch.testing.assert_close(dense.bias, conv.bias, rtol=0, atol=0)
    again = SparseConv2d.from_dense(dense, (4, 4))
    assert torch.equal(again.weight.block_mask(), layer.weight.block_mask())
    torch.testing.assert_close(again.values, layer.values, rtol=0, atol=0)
    x = randn(2, 8, 9, 8, generator=gen)
    assert_close(again(x), dense(x).detach())
    assert_close(layer(x), dense(x).detach())


@pytest.mark.parametrize("block", [(1, 1), (2, 2)], ids=str)
def test_constructed_layer_matches_to_dense(block, gen):
    torch.manual_seed(7)
    layer = SparseConv2d(6, 9, 3, stride=2, padding=1, block_size=block, density=0.4,
                         dtype=torch.float64)
    assert layer.block_size == block and abs(layer.density - 0.4) < 0.05
    assert not layer.values.grad_fn and layer.values.requires_grad
    assert not layer.values[~padding_keep_mask(layer.weight)].any()
    w4 = dense_conv_weight(layer.weight, 6, 3)
    check_layer_against_dense(layer, w4, layer.bias, randn(2, 6, 7, 8, generator=gen), 2, 1, 1)


@pytest.mark.parametrize("dilation", [1, 2])
def test_padding_same(dilation, gen):
    torch.manual_seed(8)
    layer = SparseConv2d(4, 6, 3, padding="same", dilation=dilation, block_size=(2, 2),
                         density=0.5, dtype=torch.float64)
    x = randn(2, 4, 7, 6, generator=gen)
    y = layer(x)
    assert y.shape == (2, 6, 7, 6)
    w4 = dense_conv_weight(layer.weight, 4, 3)
    assert_close(y, F.conv2d(x, w4, layer.bias, 1, "same", dilation).detach())
    dense = layer.to_dense()
    assert dense.padding == "same"
    assert_close(y, dense(x).detach())
    check_layer_against_dense(layer, w4, layer.bias, x, 1, dilation, dilation)
    # from_dense of a dense 'same' conv
    conv = _conv(4, 6, 5, 9, padding="same")
    layer2 = SparseConv2d.from_dense(conv, (2, 2))
    assert_close(layer2(x), conv(x).detach())


def test_padding_valid(gen):
    torch.manual_seed(10)
    layer = SparseConv2d(4, 6, 3, padding="valid", block_size=(2, 2), density=0.5,
                         dtype=torch.float64)
    x = randn(2, 4, 7, 6, generator=gen)
    y = layer(x)
    assert y.shape == (2, 6, 5, 4)
    w4 = dense_conv_weight(layer.weight, 4, 3)
    assert_close(y, F.conv2d(x, w4, layer.bias, 1, "valid").detach())
    assert_close(y, layer.to_dense()(x).detach())


def test_functional_padding_strings(gen):
    m = make_conv_weight(6, 4, 5, (2, 2), "sparse", torch.float64, gen)
    w4 = dense_conv_weight(m, 4, 5)
    x = randn(1, 4, 8, 9, generator=gen)
    assert_close(bsr_conv2d(x, m, padding="same", dilation=(1, 2)),
                 F.conv2d(x, w4, padding="same", dilation=(1, 2)))
    assert_close(bsr_conv2d(x, m, padding="valid", stride=2),
                 F.conv2d(x, w4, padding="valid", stride=2))


def test_only_values_and_bias_are_parameters():
    layer = SparseConv2d(8, 6, 3, block_size=(2, 4), density=0.5)
    assert [n for n, _ in layer.named_parameters()] == ["values", "bias"]
    assert [n for n, _ in layer.named_buffers()] == list(TOPOLOGY_FIELDS)
    assert all(b.dtype == torch.int32 for b in layer.buffers())
    nobias = SparseConv2d(8, 6, 3, bias=False, block_size=(2, 4))
    assert [n for n, _ in nobias.named_parameters()] == ["values"]
    assert sorted(layer.state_dict()) == sorted(["values", "bias", *TOPOLOGY_FIELDS])


def test_state_dict_round_trip(tmp_path, gen):
    torch.manual_seed(11)
    src = SparseConv2d(8, 10, 3, padding=1, block_size=(4, 4), density=0.3)
    path = tmp_path / "conv.pt"
    torch.save(src.state_dict(), path)
    torch.manual_seed(12)
    dst = SparseConv2d(8, 10, 3, padding=1, block_size=(4, 4), density=0.7)
    assert dst.values.shape != src.values.shape
    dst.load_state_dict(torch.load(path, weights_only=True))
    assert dst.values.shape == src.values.shape and isinstance(dst.values, nn.Parameter)
    for name in ("values", "bias", *TOPOLOGY_FIELDS):
        assert torch.equal(getattr(dst, name), getattr(src, name)), name
    x = torch.randn(2, 8, 6, 7, generator=gen)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    dst(x).sum().backward()
    assert dst.values.grad.shape == src.values.shape


def test_state_dict_with_another_block_shape_loads(gen):
    torch.manual_seed(18)
    src = SparseConv2d(8, 10, 3, padding=1, block_size=(2, 2), density=0.5)
    dst = SparseConv2d(8, 10, 3, padding=1, block_size=(4, 4), density=0.5)
    dst.load_state_dict(src.state_dict())
    assert dst.block_size == (2, 2)
    x = torch.randn(2, 8, 5, 6, generator=gen)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_state_dict_of_another_shape_is_rejected():
    src = SparseConv2d(8, 10, 3, block_size=(4, 4))
    dst = SparseConv2d(8, 10, 5, block_size=(4, 4))
    with pytest.raises(RuntimeError, match="does not describe this layer"):
        dst.load_state_dict(src.state_dict())


def test_double(gen):
    torch.manual_seed(13)
    layer = SparseConv2d(4, 6, 3, padding=1, block_size=(2, 2), density=0.5).double()
    assert layer.values.dtype == torch.float64 and layer.bias.dtype == torch.float64
    assert all(getattr(layer, f).dtype == torch.int32 for f in TOPOLOGY_FIELDS)
    w4 = dense_conv_weight(layer.weight, 4, 3)
    check_layer_against_dense(layer, w4, layer.bias, randn(2, 4, 5, 6, generator=gen), 1, 1, 1)


def test_unbatched_and_channels_last_through_the_module(gen):
    torch.manual_seed(14)
    layer = SparseConv2d(4, 8, 3, padding=1, block_size=(4, 4), density=0.6,
                         dtype=torch.float64)
    w4 = dense_conv_weight(layer.weight, 4, 3)
    x = randn(4, 6, 5, generator=gen)
    assert_close(layer(x), F.conv2d(x, w4, layer.bias, 1, 1).detach())
    xb = randn(2, 4, 6, 5, generator=gen).to(memory_format=torch.channels_last)
    y = layer(xb)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, F.conv2d(xb, w4, layer.bias, 1, 1).detach())


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=MEMORY_FORMAT_IDS)
def test_torch_compile_fullgraph_matches_eager(memory_format, gen):
    torch._dynamo.reset()
    torch.manual_seed(15)
    model = nn.Sequential(SparseConv2d(4, 6, 3, padding=1, block_size=(2, 2), density=0.5),
                          nn.ReLU(inplace=True), nn.Flatten(),
                          SparseLinear(6 * 5 * 5, 7, block_size=(4, 5), density=0.5))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 4, 5, 5, generator=gen).contiguous(memory_format=memory_format)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 7, generator=gen)
    y_eager = model(xe)
    grads_eager = torch.autograd.grad(y_eager, [xe, *model.parameters()], g)
    y_comp = compiled(xc)
    grads_comp = torch.autograd.grad(y_comp, [xc, *model.parameters()], g)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    assert len(grads_comp) == 5
    for a, b in zip(grads_comp, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and eager against the dense model
    conv = model[0]
    w4 = dense_conv_weight(conv.weight, 4, 3)
    h = F.relu(F.conv2d(x.double(), w4, conv.bias.double(), 1, 1)).flatten(1)
    lin = model[3]
    expected = h @ matrix_dense(lin.weight)[:7, :150].t() + lin.bias.double()
    assert_close(y_comp, expected.detach())


# ---- 6. bad inputs -------------------------------------------------------------------------------
@pytest.fixture
def w_conv():
    """A float32 GEMM-view weight for C_in=4, C_out=6, 3x3 kernel, (2, 2) blocks."""
    return make_conv_weight(6, 4, 3, (2, 2), "sparse", torch.float32, seeded_generator("w"))


def test_error_channel_mismatch(w_conv):
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(ValueError, match="input has 3 channels but the weight expects"):
        bsr_conv2d(x, w_conv, kernel_size=3)
    with pytest.raises(ValueError, match="input has 3 channels but the weight has 36 columns"):
        bsr_conv2d(x, w_conv)
    layer = SparseConv2d(4, 6, 3, block_size=(2, 2))
    with pytest.raises(ValueError, match="expects 4 input channels"):
        layer(x)
    with pytest.raises(ValueError, match="expects 4 input channels"):
        layer(torch.randn(3, 6, 6))


@pytest.mark.parametrize("shape", [(4, 6), (1, 1, 4, 6, 6), (4,)], ids=["2d", "5d", "1d"])
def test_error_wrong_rank(w_conv, shape):
    x = torch.randn(shape)
    with pytest.raises(ValueError, match="expects a 3-D or 4-D input"):
        bsr_conv2d(x, w_conv, kernel_size=3)
    with pytest.raises(ValueError, match="expects a 3-D or 4-D input"):
        SparseConv2d(4, 6, 3, block_size=(2, 2))(x)


def test_error_block_width_does_not_divide_in_channels():
    with pytest.raises(ValueError, match=r"block width 4 does not divide in_channels=6"):
        SparseConv2d(6, 8, 3, block_size=(4, 4))
    with pytest.raises(ValueError, match=r"block width 4 does not divide in_channels=6"):
        SparseConv2d.from_dense(nn.Conv2d(6, 8, 3), block_size=(4, 4))
    # the functional API checks the same
    m = BlockSparseMatrix.random((8, 54), (2, 4), 0.5)
    with pytest.raises(ValueError, match="block width 4 does not divide the 6 input channels"):
        bsr_conv2d(torch.randn(1, 6, 5, 5), m, kernel_size=3)


def test_error_groups_and_padding_mode():
    with pytest.raises(ValueError, match="groups=1 only, got groups=2"):
        SparseConv2d(4, 4, 3, groups=2, block_size=(1, 1))
    with pytest.raises(ValueError, match="groups=1 only, got groups=2"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), block_size=(1, 1))
    with pytest.raises(ValueError, match="padding_mode='zeros' only, got 'reflect'"):
        SparseConv2d(4, 4, 3, padding=1, padding_mode="reflect", block_size=(1, 1))
    with pytest.raises(ValueError, match="padding_mode='zeros' only, got 'circular'"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
                                block_size=(1, 1))


def test_error_negative_padding(w_conv):
    with pytest.raises(ValueError, match="padding must be non-negative"):
        SparseConv2d(4, 6, 3, padding=-1, block_size=(2, 2))
    with pytest.raises(ValueError, match="padding must be non-negative"):
        bsr_conv2d(torch.randn(1, 4, 6, 6), w_conv, padding=(1, -1))
    with pytest.raises(ValueError, match="padding must be an int, a pair, 'valid' or 'same'"):
        bsr_conv2d(torch.randn(1, 4, 6, 6), w_conv, padding="full")
    with pytest.raises(ValueError, match="padding must be an int or a pair"):
        bsr_conv2d(torch.randn(1, 4, 6, 6), w_conv, padding=(1, 1, 1))


def test_error_same_padding_strided_or_even_kernel(w_conv):
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        bsr_conv2d(torch.randn(1, 4, 6, 6), w_conv, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        SparseConv2d(4, 6, 3, stride=(1, 2), padding="same", block_size=(2, 2))
    with pytest.raises(ValueError, match="odd effective kernel"):
        SparseConv2d(4, 6, (3, 4), padding="same", block_size=(2, 2))


@pytest.mark.parametrize("what", ["stride", "dilation"])
def test_error_stride_or_dilation_zero(w_conv, what):
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match="stride and dilation must be positive"):
        bsr_conv2d(x, w_conv, **{what: 0})
    with pytest.raises(ValueError, match="stride and dilation must be positive"):
        bsr_conv2d(x, w_conv, **{what: (1, -1)})
    layer = SparseConv2d(4, 6, 3, block_size=(2, 2), **{what: 0})  # as nn.Conv2d: at forward
    with pytest.raises(ValueError, match="stride and dilation must be positive"):
        layer(x)


def test_error_kernel_larger_than_padded_input(w_conv):
    with pytest.raises(ValueError, match="conv output would be empty"):
        bsr_conv2d(torch.randn(1, 4, 2, 6), w_conv, kernel_size=3)
    with pytest.raises(ValueError, match="conv output would be empty"):
        bsr_conv2d(torch.randn(1, 4, 6, 6), w_conv, dilation=3)
    # with padding 1 the same input is fine
    assert bsr_conv2d(torch.randn(1, 4, 2, 6), w_conv, padding=1).shape == (1, 6, 2, 6)
    layer = SparseConv2d(4, 6, 5, block_size=(2, 2))
    with pytest.raises(ValueError, match="conv output would be empty"):
        layer(torch.randn(1, 4, 4, 8))


def test_error_dtype_mismatch(w_conv):
    with pytest.raises(TypeError,
                       match=r"conv input has dtype torch.float64 but the weight \(block values\)"):
        bsr_conv2d(torch.randn(1, 4, 5, 5, dtype=torch.float64), w_conv, padding=1)


def test_error_cuda_backend_refuses_conv(w_conv):
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run dds"):
        bsr_conv2d(torch.randn(1, 4, 5, 5), w_conv, backend="cuda")


# direct op calls with a bad geometry
def _native_setup():
    gen = seeded_generator("native-bad")
    m = make_conv_weight(6, 4, 3, (2, 2), "sparse", torch.float64, gen)
    conv = ops.conv_geometry((2, 4, 5, 6), (3, 3), (1, 1), (1, 1), (1, 1))
    x = randn(2 * 5 * 6, 4, generator=gen)
    dy = randn(2 * 5 * 6, 6, generator=gen)
    return m, conv, x, dy


def _with(conv, **changes):
    from sparsekern.ops import CONV_FIELDS
    conv = list(conv)
    for k, v in changes.items():
        conv[CONV_FIELDS.index(k)] = v
    return conv


# (changes to a valid geometry, match for dds, match for sdd): the native op and the public op
BAD_GEOMETRIES = [
    (dict(P=6), "does not follow from the geometry", "does not follow from the geometry"),
    (dict(Q=5), "does not follow from the geometry", "does not follow from the geometry"),
    # R*S*C still 36, but P no longer follows
    (dict(C=2, R=6), "does not follow from the geometry", "does not follow from the geometry"),
    # consistent P, Q but R*S*C = 4 != the weight's 36 columns (sdd cannot know the weight width:
    # the blocks fall outside the 4-column grid)
    (dict(R=1, S=1, P=5, Q=6, pad_h=0, pad_w=0), r"R\*S\*C", "out of range|t_offsets must be"),
    (dict(stride_h=0), "invalid conv geometry", "invalid conv geometry"),
    (dict(pad_w=-1), "invalid conv geometry", "invalid conv geometry"),
    (dict(dil_h=0), "invalid conv geometry", "invalid conv geometry"),
    (dict(H=0), "invalid conv geometry", "invalid conv geometry"),
    # x rows != N*H*W
    (dict(N=3), r"conv (input|grad output) (must be|has shape)", "conv sdd"),
]
BAD_IDS = ["P", "Q", "C-R", "RS", "stride0", "negpad", "dil0", "H0", "N"]


@pytest.mark.parametrize("changes,match,_", BAD_GEOMETRIES, ids=BAD_IDS)
@pytest.mark.parametrize("trans_w", [True, False])
@pytest.mark.native_errors
def test_error_native_dds_inconsistent_geometry(changes, match, _, trans_w):
    m, conv, x, dy = _native_setup()
    bad = _with(conv, **changes)
    ro, ci, ri, to, tr, tp = m.topology()
    Mp, Kp = m.padded_shape
    a = x if trans_w else dy
    with pytest.raises(ANY_ERROR, match=match):
        dds_native(a, m.values, ro, ci, to, tr, tp, Mp, Kp, trans_w, bad)
    with pytest.raises(ANY_ERROR, match=match):  # and the public op
        ops.dds(a, m.values, *m.topology(), Mp, Kp, trans_w, "cpu", bad)


@pytest.mark.parametrize("changes,_,match", BAD_GEOMETRIES, ids=BAD_IDS)
@pytest.mark.native_errors
def test_error_native_sdd_inconsistent_geometry(changes, _, match):
    m, conv, x, dy = _native_setup()
    bad = _with(conv, **changes)
    bm, bk = m.block_shape
    with pytest.raises(ANY_ERROR, match=match):
        sdd_native(dy, x, m.row_idx, m.col_idx, bm, bk, bad)
    with pytest.raises(ANY_ERROR, match=match):
        ops.sdd(dy, x, *m.topology(), bm, bk, "cpu", bad)


@pytest.mark.native_errors
def test_error_native_geometry_wrong_length_and_block_width():
    m, conv, x, dy = _native_setup()
    ro, ci, ri, to, tr, tp = m.topology()
    Mp, Kp = m.padded_shape
    with pytest.raises(ANY_ERROR, match="conv geometry must"):
        dds_native(x, m.values, ro, ci, to, tr, tp, Mp, Kp, True, conv[:13])
    with pytest.raises(ANY_ERROR, match="conv geometry must"):
        sdd_native(dy, x, ri, ci, 2, 2, conv + [1])
    # block width 3 does not divide C = 4 (though it divides K = 36)
    m3 = make_conv_weight(6, 4, 3, (2, 3), "dense", torch.float64, seeded_generator("bk3"))
    conv6 = ops.conv_geometry((1, 4, 4, 4), (3, 3), (1, 1), (1, 1), (1, 1))
    x6 = torch.randn(16, 4, dtype=torch.float64)
    with pytest.raises(ANY_ERROR, match="block width 3 must divide"):
        dds_native(x6, m3.values, *[m3.topology()[i] for i in (0, 1, 3, 4, 5)], 6, 36, True,
                   conv6)
    with pytest.raises(ANY_ERROR, match="block width 3 must divide"):
        sdd_native(torch.randn(16, 6, dtype=torch.float64), x6, m3.row_idx, m3.col_idx, 2, 3,
                   conv6)
    with pytest.raises(ANY_ERROR, match="block width 3 must divide"):
        ops.dds(x6, m3.values, *m3.topology(), 6, 36, True, "reference", conv6)


# Regression: the native check once computed P, Q with C++ truncating division and accepted this
# geometry (fixed in 516942d).
@pytest.mark.native_errors
def test_error_native_rejects_kernel_larger_than_input_with_stride():
    values = torch.randn(16, 1, 1, dtype=torch.float64)
    m = BlockSparseMatrix.from_block_mask(torch.ones(1, 16, dtype=torch.bool), (1, 1), (1, 16),
                                          values=values)
    with pytest.raises(ValueError, match="conv output would be empty"):
        ops.conv_geometry((1, 1, 3, 3), (4, 4), (2, 2), (0, 0), (1, 1))
    bad = [1, 3, 3, 1, 4, 4, 2, 2, 0, 0, 1, 1, 1, 1]  # claims P = Q = 1
    x = torch.randn(9, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="conv output would be empty"):  # the Python check
        ops.dds(x, m.values, *m.topology(), 1, 16, True, "reference", bad)
    ro, ci, ri, to, tr, tp = m.topology()
    with pytest.raises(ANY_ERROR, match="conv output size"):
        dds_native(x, m.values, ro, ci, to, tr, tp, 1, 16, True, bad)
    with pytest.raises(ANY_ERROR, match="conv output size"):
        dds_native(torch.randn(1, 1, dtype=torch.float64), m.values, ro, ci, to, tr, tp, 1, 16,
                   False, bad)
    with pytest.raises(ANY_ERROR, match="conv output size"):
        sdd_native(torch.randn(1, 1, dtype=torch.float64), x, ri, ci, 1, 1, bad)


@pytest.mark.parametrize("bad", [-1, 18], ids=["neg", "past_end"])
@pytest.mark.native_errors
def test_error_native_conv_index_out_of_range(bad):
    m, conv, x, dy = _native_setup()
    ro, ci, ri, to, tr, tp = m.topology()
    Mp, Kp = m.padded_shape
    bm, bk = m.block_shape
    ci_bad = ci.clone()
    ci_bad[0] = bad
    with pytest.raises(IndexError, match="out of range"):
        dds_native(x, m.values, ro, ci_bad, to, tr, tp, Mp, Kp, True, conv)
    tr_bad = tr.clone()
    tr_bad[-1] = -1 if bad < 0 else 3
    with pytest.raises(IndexError, match="out of range"):
        dds_native(dy, m.values, ro, ci, to, tr_bad, tp, Mp, Kp, False, conv)
    tp_bad = tp.clone()
    tp_bad[0] = bad if bad < 0 else m.nnz_blocks
    with pytest.raises(IndexError, match="out of range"):
        dds_native(dy, m.values, ro, ci, to, tr, tp_bad, Mp, Kp, False, conv)
    with pytest.raises(IndexError, match="out of range"):
        sdd_native(dy, x, ri, ci_bad, bm, bk, conv)
    ri_bad = ri.clone()
    ri_bad[0] = -1 if bad < 0 else 3
    with pytest.raises(IndexError, match="out of range"):
        sdd_native(dy, x, ri_bad, ci, bm, bk, conv)
    ro_bad = ro.clone()
    ro_bad[-1] = m.nnz_blocks + 1
    with pytest.raises(IndexError, match="offsets must start at 0 and end at nnz"):
        dds_native(x, m.values, ro_bad, ci, to, tr, tp, Mp, Kp, True, conv)


@pytest.mark.native_errors
def test_error_native_conv_operand_shapes_and_dtypes():
    m, conv, x, dy = _native_setup()
    ro, ci, ri, to, tr, tp = m.topology()
    Mp, Kp = m.padded_shape
    with pytest.raises(ValueError, match="conv input must be"):
        dds_native(x[:, :2], m.values, ro, ci, to, tr, tp, Mp, Kp, True, conv)
    with pytest.raises(ValueError, match="conv grad output must be"):
        dds_native(dy[:-1], m.values, ro, ci, to, tr, tp, Mp, Kp, False, conv)
    with pytest.raises(TypeError, match="dtype"):
        dds_native(x.float(), m.values, ro, ci, to, tr, tp, Mp, Kp, True, conv)
    with pytest.raises(ValueError, match="conv sdd right operand"):
        sdd_native(dy, x[:-1], ri, ci, 2, 2, conv)
    with pytest.raises(ValueError, match="conv sdd left operand"):
        sdd_native(dy[:-1], x, ri, ci, 2, 2, conv)
    with pytest.raises(TypeError, match="dtype"):
        sdd_native(dy, x.float(), ri, ci, 2, 2, conv)
    with pytest.raises(ValueError, match=r"conv input has shape \(59, 4\), expected NHWC rows \(60, 4\)"):
        ops.dds(x[:-1], m.values, *m.topology(), Mp, Kp, True, "cpu", conv)
    with pytest.raises(ValueError, match="conv sdd right operand"):
        ops.sdd(dy, x[:-1], *m.topology(), 2, 2, "cpu", conv)


# ---- 7. CUDA -------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_sparse_conv2d_matches_f_conv2d(backend_spy):
    # The expectation is float64 on the CPU: cuDNN's float32 conv uses TF32 by default on
    # Ampere and later, which is less accurate than the reference path it would judge.
    torch.manual_seed(17)
    conv = nn.Conv2d(8, 10, 3, stride=2, padding=1)
    mask = torch.rand(conv.weight.shape) < 0.3
    layer = SparseConv2d.from_dense(conv, (4, 4), mask=mask).cuda()
    expected = layer.to_dense().cpu().double()
    x = torch.randn(2, 8, 9, 7, device="cuda", requires_grad=True)
    y = layer(x)
    assert y.is_cuda
    assert backend_spy.names() == {"reference"}  # auto: conv on CUDA falls back to reference
    g = torch.randn_like(y)
    y.backward(g)
    xd = x.detach().cpu().double().requires_grad_()
    yd = expected(xd)
    yd.backward(g.cpu().double())
    assert_close(y.cpu(), yd, torch.float32)
    assert_close(x.grad.cpu(), xd.grad, torch.float32)
    assert_close(layer.bias.grad.cpu(), expected.bias.grad, torch.float32)
    w = layer.weight
    assert_close(layer.values.grad.cpu(),
                 gathered_weight_grad(expected.weight.grad, w.to("cpu")), torch.float32)
    xc = x.detach().to(memory_format=torch.channels_last)
    assert_close(layer(xc).cpu(), expected(xc.cpu().double()), torch.float32)
