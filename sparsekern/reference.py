"""Pure-PyTorch oracle for every op: dense materialization, any device and dtype.

Slow by design (it builds the dense matrix); the tests compare every backend against it and
backend "reference" runs it where no kernel fits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
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


# ---- conv2d on the implicit-GEMM view (geometry as in ops.conv_geometry) ------------------------
def im2col(x_rows: Tensor, conv) -> Tensor:
    """NHWC rows [N*H*W, C] -> [N*P*Q, R*S*C], reduction ordered (r, s, c), zero padding."""
    N, H, W, C, R, S, sh, sw, ph, pw, dh, dw, P, Q = conv
    x = x_rows.reshape(N, H, W, C).permute(0, 3, 1, 2)
    cols = F.unfold(x, (R, S), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
    return cols.reshape(N, C, R * S, P * Q).permute(0, 3, 2, 1).reshape(N * P * Q, R * S * C)


def col2im(cols: Tensor, conv) -> Tensor:
    """Adjoint of im2col: [N*P*Q, R*S*C] -> NHWC rows [N*H*W, C] (overlaps summed)."""
    N, H, W, C, R, S, sh, sw, ph, pw, dh, dw, P, Q = conv
    c = cols.reshape(N, P * Q, R * S, C).permute(0, 3, 2, 1).reshape(N, C * R * S, P * Q)
    x = F.fold(c, (H, W), (R, S), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
    return x.permute(0, 2, 3, 1).reshape(N * H * W, C)


def dds_conv(a: Tensor, values: Tensor, row_idx: Tensor, col_idx: Tensor, n_rows: int,
             n_cols: int, trans_w: bool, conv) -> Tensor:
    """trans_w: x [N*H*W, C] -> y [N*P*Q, n_rows]; else dy [N*P*Q, n_rows] -> dx [N*H*W, C]."""
    if trans_w:
        return dds(im2col(a, conv), values, row_idx, col_idx, n_rows, n_cols, True)
    return col2im(dds(a, values, row_idx, col_idx, n_rows, n_cols, False), conv)


def sdd_conv(a: Tensor, b: Tensor, row_idx: Tensor, col_idx: Tensor, bm: int, bk: int, conv
             ) -> Tensor:
    """a = dy [N*P*Q, Mp], b = x [N*H*W, C] -> stored blocks of dy^T @ im2col(x)."""
    return sdd(a, im2col(b, conv), row_idx, col_idx, bm, bk)
