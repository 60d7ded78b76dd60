"""The one block-sparse format (BSR with transpose metadata).

A matrix of logical shape [M, K] is stored on the padded grid [Mp, Kp] = [ceil(M/bm)*bm,
ceil(K/bk)*bk] as ``nnz`` blocks of shape [bm, bk]:

    values       [nnz, bm, bk]   float  the only trainable tensor
    row_offsets  [Mp/bm + 1]     int32  CSR offsets over block rows
    col_idx      [nnz]           int32  block column of each block, strictly increasing in a row
    row_idx      [nnz]           int32  block row of each block (COO view)
    t_offsets    [Kp/bk + 1]     int32  CSR offsets over block columns (transpose metadata)
    t_rows       [nnz]           int32  block row of each block, in block-column order
    t_perm       [nnz]           int32  index into values of each block, in block-column order

Padding decision: a dimension that is not a multiple of the block is padded up to one. The padded
rows/columns of the blocks hold zeros and stay zero under training (their gradients are zero
because the functional layer pads inputs with zeros and slices outputs), so the user only ever
sees the logical [M, K]. The ops themselves work on the padded shape.

The transpose metadata is computed once per topology, so x @ W (the grad-input product) walks W
column-wise without copying values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

INDEX_DTYPE = torch.int32
TOPOLOGY_FIELDS = ("row_offsets", "col_idx", "row_idx", "t_offsets", "t_rows", "t_perm")


def _pair(block_shape) -> tuple[int, int]:
    if isinstance(block_shape, int):
        block_shape = (block_shape, block_shape)
    bm, bk = (int(v) for v in block_shape)
    if bm < 1 or bk < 1:
        raise ValueError(f"block shape must be positive, got {tuple(block_shape)}")
    return bm, bk


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def transpose_metadata(row_idx: Tensor, col_idx: Tensor, n_block_cols: int):
    """Block-column CSR of a block-row-sorted topology.

    Returns (t_offsets [n_block_cols + 1], t_rows [nnz], t_perm [nnz]), all int32: the blocks
    of column j are t_perm[t_offsets[j]:t_offsets[j+1]], in increasing block row.
    """
    col = col_idx.long()
    t_perm = torch.sort(col, stable=True).indices
    counts = torch.bincount(col, minlength=n_block_cols)
    t_offsets = torch.zeros(n_block_cols + 1, dtype=torch.long, device=col.device)
    t_offsets[1:] = torch.cumsum(counts, 0)
    return (t_offsets.to(INDEX_DTYPE), row_idx[t_perm].to(INDEX_DTYPE), t_perm.to(INDEX_DTYPE))


@dataclass
class BlockSparseMatrix:
    """A block-sparse matrix of logical shape ``shape`` = (M, K). See the module docstring."""

    values: Tensor
    row_offsets: Tensor
    col_idx: Tensor
    row_idx: Tensor
    t_offsets: Tensor
    t_rows: Tensor
    t_perm: Tensor
    shape: tuple[int, int]

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def block_shape(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def padded_shape(self) -> tuple[int, int]:
        bm, bk = self.block_shape
        return _ceil_div(self.shape[0], bm) * bm, _ceil_div(self.shape[1], bk) * bk

    @property
    def block_grid(self) -> tuple[int, int]:
        bm, bk = self.block_shape
        return _ceil_div(self.shape[0], bm), _ceil_div(self.shape[1], bk)

    @property
    def nnz_blocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        """Fraction of blocks stored."""
        n_br, n_bc = self.block_grid
        return self.nnz_blocks / max(1, n_br * n_bc)

    def topology(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, f) for f in TOPOLOGY_FIELDS)

    def with_values(self, values: Tensor) -> "BlockSparseMatrix":
        """Same topology, other values (e.g. a gradient or a cast)."""
        return BlockSparseMatrix(values, *self.topology(), shape=self.shape)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_block_mask(cls, block_mask: Tensor, block_shape, shape, values: Tensor | None = None,
                        dtype=torch.float32) -> "BlockSparseMatrix":
        """Topology from a [Mp/bm, Kp/bk] bool block mask; values zero unless given [nnz, bm, bk]."""
        bm, bk = _pair(block_shape)
        M, K = int(shape[0]), int(shape[1])
        n_br, n_bc = _ceil_div(M, bm), _ceil_div(K, bk)
        if block_mask.shape != (n_br, n_bc):
            raise ValueError(f"block mask has shape {tuple(block_mask.shape)}, expected "
                             f"{(n_br, n_bc)} for a [{M}, {K}] matrix with {(bm, bk)} blocks")
        block_mask = block_mask.to(torch.bool)
        rows, cols = block_mask.nonzero(as_tuple=True)  # row-major order: sorted by (row, col)
        counts = block_mask.sum(1)
        row_offsets = torch.zeros(n_br + 1, dtype=torch.long, device=block_mask.device)
        row_offsets[1:] = torch.cumsum(counts, 0)
        nnz = rows.numel()
        if values is None:
            values = torch.zeros(nnz, bm, bk, dtype=dtype, device=block_mask.device)
        elif tuple(values.shape) != (nnz, bm, bk):
            raise ValueError(f"values have shape {tuple(values.shape)}, expected {(nnz, bm, bk)}")
        t_offsets, t_rows, t_perm = transpose_metadata(rows, cols, n_bc)
        return cls(values, row_offsets.to(INDEX_DTYPE), cols.to(INDEX_DTYPE), rows.to(INDEX_DTYPE),
                   t_offsets, t_rows, t_perm, shape=(M, K))

    @classmethod
    def from_dense(cls, dense: Tensor, block_shape, mask: Tensor | None = None
                   ) -> "BlockSparseMatrix":
        """Blocks of a dense [M, K] matrix.

        mask: None keeps every block holding a nonzero; an element mask [M, K] keeps the blocks
        holding a True and zeroes the masked-out elements inside them; a block mask
        [ceil(M/bm), ceil(K/bk)] keeps exactly those blocks (all their elements).
        """
        if dense.dim() != 2:
            raise ValueError(f"from_dense expects a 2-D matrix, got shape {tuple(dense.shape)}")
        if not dense.is_floating_point():
            raise TypeError(f"from_dense expects a floating-point matrix, got {dense.dtype}")
        bm, bk = _pair(block_shape)
        M, K = dense.shape
        n_br, n_bc = _ceil_div(M, bm), _ceil_div(K, bk)
        padded = dense.new_zeros(n_br * bm, n_bc * bk)
        padded[:M, :K] = dense.detach()
        if mask is None:
            elem = padded != 0
        elif tuple(mask.shape) == (M, K):
            elem = torch.zeros(padded.shape, dtype=torch.bool, device=dense.device)
            elem[:M, :K] = mask.to(torch.bool)
            padded = padded * elem
        elif tuple(mask.shape) == (n_br, n_bc):
            elem = None
            block_mask = mask.to(torch.bool)
        else:
            raise ValueError(f"mask has shape {tuple(mask.shape)}: expected an element mask "
                             f"{(M, K)} or a block mask {(n_br, n_bc)} for {(bm, bk)} blocks")
        blocks = padded.reshape(n_br, bm, n_bc, bk).transpose(1, 2)  # [n_br, n_bc, bm, bk]
        if elem is not None:
            block_mask = elem.reshape(n_br, bm, n_bc, bk).any(dim=3).any(dim=1)
        block_mask = block_mask.to(dense.device)
        values = blocks[block_mask].contiguous()
        return cls.from_block_mask(block_mask, (bm, bk), (M, K), values=values)

    @classmethod
    def random(cls, shape, block_shape, density: float, dtype=torch.float32, device=None,
               generator: torch.Generator | None = None) -> "BlockSparseMatrix":
        """round(density * n_blocks) blocks chosen uniformly, at least one when density > 0 (a
        small layer at low density would otherwise silently hold no weight), values ~ N(0, 1)."""
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {density}")
        bm, bk = _pair(block_shape)
        n_br, n_bc = _ceil_div(int(shape[0]), bm), _ceil_div(int(shape[1]), bk)
        n_keep = int(round(density * n_br * n_bc))
        if density > 0 and n_br * n_bc > 0:
            n_keep = max(n_keep, 1)
        keep = torch.randperm(n_br * n_bc, generator=generator)[:n_keep]
        block_mask = torch.zeros(n_br * n_bc, dtype=torch.bool)
        block_mask[keep] = True
        block_mask = block_mask.reshape(n_br, n_bc)
        values = torch.randn(n_keep, bm, bk, generator=generator, dtype=dtype)
        m = cls.from_block_mask(block_mask, (bm, bk), shape, values=values)
        m = m._zero_padding()
        return m.to(device) if device is not None else m

    def _zero_padding(self) -> "BlockSparseMatrix":
        """Zero the stored entries that fall in the padding (so it stays invisible)."""
        M, K = self.shape
        Mp, Kp = self.padded_shape
        if (M, K) == (Mp, Kp) or self.nnz_blocks == 0:
            return self
        bm, bk = self.block_shape
        r = self.row_idx.long()[:, None] * bm + torch.arange(bm, device=self.values.device)
        c = self.col_idx.long()[:, None] * bk + torch.arange(bk, device=self.values.device)
        inside = (r < M)[:, :, None] & (c < K)[:, None, :]
        return self.with_values(self.values * inside)

    def to(self, *args, **kwargs) -> "BlockSparseMatrix":
        """Moves values (device and dtype) and topology (device only)."""
        values = self.values.to(*args, **kwargs)
        topo = [t.to(device=values.device) for t in self.topology()]
        return BlockSparseMatrix(values, *topo, shape=self.shape)

    # ---- views ---------------------------------------------------------------------------------
    def to_dense(self) -> Tensor:
        """The logical [M, K] dense matrix (differentiable w.r.t. values)."""
        from sparsekern.reference import blocks_to_dense

        Mp, Kp = self.padded_shape
        dense = blocks_to_dense(self.values, self.row_idx, self.col_idx, Mp, Kp)
        return dense[: self.shape[0], : self.shape[1]]

    def block_mask(self) -> Tensor:
        n_br, n_bc = self.block_grid
        mask = torch.zeros(n_br, n_bc, dtype=torch.bool, device=self.values.device)
        mask[self.row_idx.long(), self.col_idx.long()] = True
        return mask

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> "BlockSparseMatrix":
        """Checks every invariant of the format; raises ValueError/TypeError naming the problem."""
        v = self.values
        if v.dim() != 3:
            raise ValueError(f"values must be [nnz, bm, bk], got shape {tuple(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"values must be floating point, got {v.dtype}")
        n_br, n_bc = self.block_grid
        nnz = v.shape[0]
        expected = {"row_offsets": n_br + 1, "col_idx": nnz, "row_idx": nnz,
                    "t_offsets": n_bc + 1, "t_rows": nnz, "t_perm": nnz}
        for name in TOPOLOGY_FIELDS:
            t = getattr(self, name)
            if t.dtype != INDEX_DTYPE:
                raise TypeError(f"{name} must be int32, got {t.dtype}")
            if t.dim() != 1 or t.numel() != expected[name]:
                raise ValueError(f"{name} must be 1-D with {expected[name]} elements, "
                                 f"got shape {tuple(t.shape)}")
            if t.device != v.device:
                raise ValueError(f"{name} is on {t.device} but values are on {v.device}")
        ro, ci, ri = (t.long().cpu() for t in (self.row_offsets, self.col_idx, self.row_idx))
        if ro[0] != 0 or ro[-1] != nnz:
            raise ValueError(f"row_offsets must start at 0 and end at nnz={nnz}, "
                             f"got {int(ro[0])} and {int(ro[-1])}")
        if (ro[1:] < ro[:-1]).any():
            raise ValueError("row_offsets must be non-decreasing")
        if nnz:
            if ci.min() < 0 or ci.max() >= n_bc:
                raise ValueError(f"col_idx out of range [0, {n_bc}): min {int(ci.min())}, "
                                 f"max {int(ci.max())}")
            expected_rows = torch.repeat_interleave(torch.arange(n_br), ro[1:] - ro[:-1])
            if not torch.equal(ri, expected_rows):
                raise ValueError("row_idx does not match row_offsets")
            same_row = ri[1:] == ri[:-1]
            if (same_row & (ci[1:] <= ci[:-1])).any():
                raise ValueError("col_idx must be strictly increasing within each block row "
                                 "(sorted, no duplicate blocks)")
        t_off, t_rows, t_perm = transpose_metadata(self.row_idx.cpu(), self.col_idx.cpu(), n_bc)
        if not (torch.equal(t_off, self.t_offsets.cpu()) and torch.equal(t_rows, self.t_rows.cpu())
                and torch.equal(t_perm, self.t_perm.cpu())):
            raise ValueError("transpose metadata (t_offsets, t_rows, t_perm) does not match the "
                             "topology: rebuild it with transpose_metadata()")
        return self
