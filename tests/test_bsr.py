"""sparsekern.bsr: the BlockSparseMatrix format, its constructors, views and validate()."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sparsekern import BlockSparseMatrix
from sparsekern.bsr import TOPOLOGY_FIELDS, transpose_metadata
from conftest import (BLOCK_SHAPES, TOPOLOGY_KINDS, block_grid_for, csr_from_mask_loops,
                      make_block_mask, make_matrix, matrix_dense, oracle_blocks,
                      padding_keep_mask, randn, seeded_generator)

ids_shape = [f"{bm}x{bk}" for bm, bk in BLOCK_SHAPES]


def _topology_lists(m: BlockSparseMatrix):
    return tuple(t.tolist() for t in m.topology())


def _expand_block_mask(block_mask, bm, bk, M, K):
    return block_mask.repeat_interleave(bm, 0).repeat_interleave(bk, 1)[:M, :K]


# ---- the test topologies themselves --------------------------------------------------------------
@pytest.mark.parametrize("block_shape", BLOCK_SHAPES, ids=ids_shape)
def test_sparse_kind_has_empty_block_rows_and_columns(block_shape):
    m = make_matrix(block_shape, "sparse")
    mask = m.block_mask()
    assert m.nnz_blocks > 0
    assert (~mask.any(1)).any(), "no empty block row"
    assert (~mask.any(0)).any(), "no empty block column"
    assert make_matrix(block_shape, "nnz0").nnz_blocks == 0
    n_br, n_bc = block_grid_for(block_shape)
    assert make_matrix(block_shape, "dense").nnz_blocks == n_br * n_bc


# ---- construction --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TOPOLOGY_KINDS + ("random",))
@pytest.mark.parametrize("block_shape", [(1, 1), (4, 4), (3, 5), (16, 8)], ids=str)
def test_from_block_mask_topology(block_shape, kind):
    gen = seeded_generator("fbm", block_shape, kind)
    mask = make_block_mask(6, 7, kind, gen)
    bm, bk = block_shape
    values = randn(int(mask.sum()), bm, bk, dtype=torch.float32, generator=gen)
    m = BlockSparseMatrix.from_block_mask(mask, block_shape, (6 * bm, 7 * bk), values=values)
    assert _topology_lists(m) == csr_from_mask_loops(mask)
    for t in m.topology():
        assert t.dtype == torch.int32 and t.is_contiguous()
    assert m.values is values
    assert torch.equal(m.block_mask(), mask)
    assert m.validate() is m
    assert m.shape == (6 * bm, 7 * bk) and m.block_shape == (bm, bk)
    assert m.nnz_blocks == int(mask.sum())
    assert m.density == pytest.approx(int(mask.sum()) / 42)


def test_from_block_mask_zero_values_and_dtype():
    mask = torch.tensor([[True, False], [True, True]])
    m = BlockSparseMatrix.from_block_mask(mask, (2, 3), (4, 6), dtype=torch.float64)
    assert m.values.shape == (3, 2, 3) and m.values.dtype == torch.float64
    assert torch.equal(m.values, torch.zeros(3, 2, 3, dtype=torch.float64))


def test_from_block_mask_errors():
    with pytest.raises(ValueError, match=r"block mask has shape \(3, 3\), expected \(2, 3\)"):
        BlockSparseMatrix.from_block_mask(torch.ones(3, 3, dtype=torch.bool), (4, 4), (8, 12))
    with pytest.raises(ValueError, match=r"values have shape \(5, 4, 4\), expected \(6, 4, 4\)"):
        BlockSparseMatrix.from_block_mask(torch.ones(2, 3, dtype=torch.bool), (4, 4), (8, 12),
                                          values=torch.randn(5, 4, 4))
    with pytest.raises(ValueError, match="block shape must be positive"):
        BlockSparseMatrix.from_block_mask(torch.ones(2, 3, dtype=torch.bool), (0, 4), (8, 12))


@pytest.mark.parametrize("block_shape", BLOCK_SHAPES, ids=ids_shape)
def test_to_dense_matches_oracle(block_shape):
    m = make_matrix(block_shape, "sparse", torch.float32)
    dense = m.to_dense()
    assert dense.shape == m.padded_shape and dense.dtype == torch.float32
    torch.testing.assert_close(dense.double(), matrix_dense(m), rtol=0, atol=0)


@pytest.mark.parametrize("shape,block_shape", [((10, 13), (4, 4)), ((5, 7), (3, 5)),
                                                ((784 // 8, 300 // 8), (32, 32)),
                                                ((1, 1), (16, 8)), ((17, 3), (16, 8))], ids=str)
def test_padding_is_invisible(shape, block_shape):
    gen = seeded_generator("pad", shape, block_shape)
    dense = randn(*shape, dtype=torch.float64, generator=gen)
    m = BlockSparseMatrix.from_dense(dense, block_shape)
    bm, bk = block_shape
    n_br, n_bc = -(-shape[0] // bm), -(-shape[1] // bk)
    assert m.shape == shape
    assert m.block_grid == (n_br, n_bc)
    assert m.padded_shape == (n_br * bm, n_bc * bk)
    assert m.nnz_blocks == n_br * n_bc  # a random dense matrix has no zero block
    assert torch.equal(m.to_dense(), dense)
    # every stored entry in the padding is exactly zero
    pad = ~padding_keep_mask(m)
    assert torch.equal(m.values[pad], torch.zeros(int(pad.sum()), dtype=torch.float64))
    m.validate()


def test_from_dense_drops_zero_blocks():
    gen = seeded_generator("zero-blocks")
    dense = randn(12, 10, generator=gen)
    dense[0:4, 0:5] = 0    # block (0, 0) entirely zero: dropped
    dense[4:8, :] = 0      # block row 1 empty
    dense[9, 7] = 0        # a single zero inside a kept block: kept
    m = BlockSparseMatrix.from_dense(dense, (4, 5))
    expected = torch.tensor([[False, True], [False, False], [True, True]])
    assert torch.equal(m.block_mask(), expected)
    assert torch.equal(m.to_dense(), dense)
    m.validate()


def test_from_dense_element_mask():
    gen = seeded_generator("elem-mask")
    dense = randn(10, 13, generator=gen)
    mask = torch.rand(10, 13, generator=gen) < 0.1
    mask[:, 8:12] = False  # block column 2 of (4, 4) blocks gets no True
    m = BlockSparseMatrix.from_dense(dense, (4, 4), mask=mask)
    # kept blocks: those holding at least one True
    expected_blocks = torch.zeros(3, 4, dtype=torch.bool)
    for i, j in mask.nonzero().tolist():
        expected_blocks[i // 4, j // 4] = True
    assert torch.equal(m.block_mask(), expected_blocks)
    assert not m.block_mask()[:, 2].any()
    # masked-out elements inside kept blocks are zero
    assert torch.equal(m.to_dense(), dense * mask)
    assert torch.equal(m.values[~padding_keep_mask(m)].abs().sum(), torch.tensor(0.0).double())
    m.validate()


def test_from_dense_block_mask_keeps_whole_blocks():
    gen = seeded_generator("block-mask")
    dense = randn(10, 13, generator=gen)
    dense[0:4, 0:4] = 0  # an all-zero block that the block mask still keeps
    block_mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    m = BlockSparseMatrix.from_dense(dense, (4, 4), mask=block_mask)
    assert torch.equal(m.block_mask(), block_mask)
    assert m.nnz_blocks == 5
    expected = dense * _expand_block_mask(block_mask, 4, 4, 10, 13)
    assert torch.equal(m.to_dense(), expected)
    # values are a copy, not a view of the dense matrix
    dense.add_(1.0)
    assert torch.equal(m.to_dense(), expected)
    m.validate()


def test_from_dense_errors():
    with pytest.raises(ValueError, match="expects a 2-D matrix"):
        BlockSparseMatrix.from_dense(torch.randn(8), (4, 4))
    with pytest.raises(ValueError, match="expects a 2-D matrix"):
        BlockSparseMatrix.from_dense(torch.randn(2, 8, 8), (4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        BlockSparseMatrix.from_dense(torch.ones(8, 12, dtype=torch.long), (4, 4))
    with pytest.raises(ValueError, match=r"mask has shape \(3, 3\).*\(8, 12\).*\(2, 3\)"):
        BlockSparseMatrix.from_dense(torch.randn(8, 12), (4, 4), mask=torch.ones(3, 3))
    with pytest.raises(ValueError, match="block shape must be positive"):
        BlockSparseMatrix.from_dense(torch.randn(8, 12), (4, -1))


@pytest.mark.parametrize("density", [0.0, 0.1, 0.37, 1.0])
@pytest.mark.parametrize("shape,block_shape", [((20, 30), (4, 4)), ((23, 9), (3, 5)),
                                                ((7, 7), (1, 1))], ids=str)
def test_random(shape, block_shape, density):
    m = BlockSparseMatrix.random(shape, block_shape, density, dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(5))
    n_blocks = m.block_grid[0] * m.block_grid[1]
    assert m.nnz_blocks == (max(1, int(round(density * n_blocks))) if density else 0)
    assert m.values.dtype == torch.float64 and m.shape == shape
    m.validate()
    pad = ~padding_keep_mask(m)
    assert not m.values[pad].any()
    assert (m.values[~pad] != 0).all()  # N(0, 1) values inside the matrix, never zeros
    again = BlockSparseMatrix.random(shape, block_shape, density, dtype=torch.float64,
                                     generator=torch.Generator().manual_seed(5))
    assert torch.equal(again.values, m.values) and torch.equal(again.col_idx, m.col_idx)


def test_random_keeps_a_block_at_low_density():
    """2x2 blocks at density 0.1 round to 0: a layer without weights; one block is kept."""
    m = BlockSparseMatrix.random((8, 8), (4, 4), 0.1, generator=torch.Generator().manual_seed(0))
    assert m.nnz_blocks == 1
    assert BlockSparseMatrix.random((8, 8), (4, 4), 0.0).nnz_blocks == 0


def test_random_errors():
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\], got 1.5"):
        BlockSparseMatrix.random((8, 8), (4, 4), 1.5)
    with pytest.raises(ValueError, match="density must be in"):
        BlockSparseMatrix.random((8, 8), (4, 4), -0.1)
    with pytest.raises(ValueError, match="block shape must be positive"):
        BlockSparseMatrix.random((8, 8), (0, 4), 0.5)


def test_to_moves_values_keeps_index_dtype():
    m = make_matrix((4, 4), "sparse", torch.float32)
    m64 = m.to(torch.float64)
    assert m64.values.dtype == torch.float64
    for t in m64.topology():
        assert t.dtype == torch.int32
    assert torch.equal(m64.values, m.values.double())
    assert m64.shape == m.shape
    m64.validate()


def test_with_values_shares_topology():
    m = make_matrix((3, 5), "sparse", torch.float32)
    v = torch.randn_like(m.values)
    m2 = m.with_values(v)
    assert m2.values is v
    for a, b in zip(m.topology(), m2.topology()):
        assert a is b
    assert m2.shape == m.shape


def test_to_dense_is_differentiable():
    m = make_matrix((3, 5), "sparse", torch.float64, shape=(10, 17))
    values = m.values.clone().requires_grad_()
    dense = m.with_values(values).to_dense()
    assert dense.shape == (10, 17)
    g = randn(10, 17, generator=seeded_generator("g"))
    dense.backward(g)
    Mp, Kp = m.padded_shape
    g_pad = torch.zeros(Mp, Kp, dtype=torch.float64)
    g_pad[:10, :17] = g
    torch.testing.assert_close(values.grad, oracle_blocks(g_pad, m.row_idx, m.col_idx, 3, 5))


def test_transpose_metadata_matches_loops():
    gen = seeded_generator("tm")
    mask = make_block_mask(9, 11, "random", gen, density=0.4)
    rows, cols = mask.nonzero(as_tuple=True)
    t_off, t_rows, t_perm = transpose_metadata(rows.int(), cols.int(), 11)
    expected = csr_from_mask_loops(mask)
    assert (t_off.tolist(), t_rows.tolist(), t_perm.tolist()) == expected[3:]
    assert t_off.dtype == t_rows.dtype == t_perm.dtype == torch.int32


# ---- validate() ----------------------------------------------------------------------------------
@pytest.fixture
def good():
    """4 block rows x 5 block columns of (2, 3) blocks, rows with 0, 1, 2 and 3 blocks."""
    mask = torch.tensor([[0, 1, 0, 1, 0],
                         [0, 0, 0, 0, 0],
                         [1, 0, 1, 1, 0],
                         [0, 1, 0, 0, 0]], dtype=torch.bool)
    values = torch.randn(int(mask.sum()), 2, 3)
    m = BlockSparseMatrix.from_block_mask(mask, (2, 3), (8, 15), values=values)
    return m.validate()


def _with(m, **fields):
    return dataclasses.replace(m, **fields)


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


def test_validate_accepts_valid_matrices():
    for block_shape in BLOCK_SHAPES:
        for kind in TOPOLOGY_KINDS:
            m = make_matrix(block_shape, kind, torch.float32)
            assert m.validate() is m


def test_validate_unsorted_col_idx(good):
    # row 2 holds columns [0, 2, 3] at positions 2..4: swap two of them
    col = good.col_idx.clone()
    col[2], col[3] = good.col_idx[3], good.col_idx[2]
    with pytest.raises(ValueError, match="strictly increasing within each block row"):
        _with(good, col_idx=col).validate()


def test_validate_duplicate_block(good):
    col = good.col_idx.clone()
    col[3] = col[2]
    with pytest.raises(ValueError, match="no duplicate blocks"):
        _with(good, col_idx=col).validate()


@pytest.mark.parametrize("field,value,match", [
    ("t_perm", [2, 5, 0, 3, 1, 4], "transpose metadata"),   # order inside block column 1
    ("t_perm", [2, 0, 5, 3, 1, 1], "transpose metadata"),   # not a permutation
    ("t_rows", [2, 0, 3, 2, 2, 0], "transpose metadata"),
    ("t_offsets", [0, 1, 3, 4, 5, 6], "transpose metadata"),
    ("t_offsets", [0, 2, 3, 4, 6, 6], "transpose metadata"),
])
def test_validate_bad_transpose_metadata(good, field, value, match):
    # the fixture's correct metadata, worked out by hand
    assert good.t_offsets.tolist() == [0, 1, 3, 4, 6, 6]
    assert good.t_rows.tolist() == [2, 0, 3, 2, 0, 2]
    assert good.t_perm.tolist() == [2, 0, 5, 3, 1, 4]
    with pytest.raises(ValueError, match=match):
        _with(good, **{field: _i32(value)}).validate()


def test_validate_row_offsets(good):
    with pytest.raises(ValueError, match="non-decreasing"):
        _with(good, row_offsets=_i32([0, 2, 1, 5, 6])).validate()
    with pytest.raises(ValueError, match="start at 0 and end at nnz=6"):
        _with(good, row_offsets=_i32([0, 2, 2, 5, 5])).validate()
    with pytest.raises(ValueError, match="start at 0"):
        _with(good, row_offsets=_i32([1, 2, 2, 5, 6])).validate()
    with pytest.raises(ValueError, match="row_offsets must be 1-D with 5 elements"):
        _with(good, row_offsets=_i32([0, 2, 5, 6])).validate()


def test_validate_row_idx_mismatch(good):
    rows = good.row_idx.clone()
    rows[0] = 1
    with pytest.raises(ValueError, match="row_idx does not match row_offsets"):
        _with(good, row_idx=rows).validate()


@pytest.mark.parametrize("bad", [5, -1])
def test_validate_col_idx_out_of_range(good, bad):
    col = good.col_idx.clone()
    col[-1] = bad
    with pytest.raises(ValueError, match=r"col_idx out of range \[0, 5\)"):
        _with(good, col_idx=col).validate()


@pytest.mark.parametrize("field", TOPOLOGY_FIELDS)
def test_validate_index_dtype(good, field):
    with pytest.raises(TypeError, match=f"{field} must be int32, got torch.int64"):
        _with(good, **{field: getattr(good, field).long()}).validate()


def test_validate_values(good):
    with pytest.raises(ValueError, match=r"values must be \[nnz, bm, bk\]"):
        _with(good, values=good.values[0]).validate()
    with pytest.raises(TypeError, match="values must be floating point"):
        _with(good, values=good.values.long()).validate()
    with pytest.raises(ValueError, match="col_idx must be 1-D with 5 elements"):
        _with(good, values=good.values[:5]).validate()


def test_validate_shape_vs_topology(good):
    # a logical shape with another block grid than the topology
    with pytest.raises(ValueError, match="row_offsets must be 1-D"):
        _with(good, shape=(10, 15)).validate()
    with pytest.raises(ValueError, match="t_offsets must be 1-D"):
        _with(good, shape=(8, 16)).validate()
