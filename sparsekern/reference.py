"""Pure-PyTorch oracle for every op: dense materialization, any device and dtype.

Slow by design (it builds the dense matrix); the tests compare every backend against it and
backend "reference" runs it where no kernel fits.
"""
from __future__ import annotations

import torch
from torch import Tensor


def blocks_to_dense(values: Tensor, row_idx: Tensor, col_idx: Tensor, n_rows: int, n_cols: int
                    ) -> Tensor:
    """[nnz, bm, bk] blocks at (row_idx, col_idx) -> dense [n_rows, n_cols] (differentiable)."""
    nnz, bm, bk = values.shape
    grid = values.new_zeros(n_rows // bm, n_cols // bk, bm, bk)
    grid = grid.index_put((row_idx.long(), col_idx.long()), values)
    return grid.transpose(1, 2).reshape(n_rows, n_cols)


def dense_to_blocks(dense: Tensor, row_idx: Tensor, col_idx: Tensor, bm: int, bk: int) -> Tensor:
    """The stored blocks of a dense [n_rows, n_cols] matrix -> [nnz, bm, bk]."""
    n_rows, n_cols = dense.shape
    grid = dense.reshape(n_rows // bm, bm, n_cols // bk, bk).transpose(1, 2)
    return grid[row_idx.long(), col_idx.long()]


def dds(a: Tensor, values: Tensor, row_idx: Tensor, col_idx: Tensor, n_rows: int, n_cols: int,
        trans_w: bool) -> Tensor:
    """a [B, n_cols] @ W^T -> [B, n_rows] if trans_w else a [B, n_rows] @ W -> [B, n_cols]."""
    w = blocks_to_dense(values, row_idx, col_idx, n_rows, n_cols)
    return a @ (w.t() if trans_w else w)


def sdd(a: Tensor, b: Tensor, row_idx: Tensor, col_idx: Tensor, bm: int, bk: int) -> Tensor:
    """Sampled a^T b: a [B, Mp], b [B, Kp] -> the stored blocks [nnz, bm, bk] of a^T @ b."""
    return dense_to_blocks(a.t() @ b, row_idx, col_idx, bm, bk)
