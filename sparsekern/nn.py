"""Drop-in modules over truly block-sparse weights."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sparsekern.bsr import TOPOLOGY_FIELDS, BlockSparseMatrix, _pair
from sparsekern.functional import bsr_linear


class _BlockSparseWeight(nn.Module):
    """Holds one BlockSparseMatrix as module state: ``values`` is the only weight Parameter
    (optimizers see only stored blocks); the topology tensors are buffers. A state_dict with a
    different topology (another nnz) loads: the topology comes from the state_dict."""

    def _set_weight(self, w: BlockSparseMatrix) -> None:
        self.weight_shape = tuple(w.shape)
        self.values = nn.Parameter(w.values)
        for name in TOPOLOGY_FIELDS:
            self.register_buffer(name, getattr(w, name))

    @property
    def weight(self) -> BlockSparseMatrix:
        """The weight as a BlockSparseMatrix view (shares storage with values and buffers)."""
        return BlockSparseMatrix(self.values, *(getattr(self, f) for f in TOPOLOGY_FIELDS),
                                 shape=self.weight_shape)

    @property
    def block_size(self) -> tuple[int, int]:
        return self.weight.block_shape

    @property
    def density(self) -> float:
        """Fraction of blocks stored."""
        return self.weight.density

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The incoming topology may differ (other nnz, other block shape) but must describe a
        # matrix of this layer's logical shape.
        values = state_dict.get(prefix + "values")
        row_offsets = state_dict.get(prefix + "row_offsets")
        t_offsets = state_dict.get(prefix + "t_offsets")
        if values is not None and row_offsets is not None and t_offsets is not None:
            M, K = self.weight_shape
            bm, bk = (int(values.shape[1]), int(values.shape[2])) if values.dim() == 3 else (0, 0)
            grid = (row_offsets.numel() - 1, t_offsets.numel() - 1)
            if bm < 1 or bk < 1 or grid != (-(-M // bm), -(-K // bk)):
                error_msgs.append(
                    f"size mismatch for {prefix}values/row_offsets/t_offsets: the checkpoint "
                    f"holds a block-sparse matrix of block grid {grid} with blocks {(bm, bk)}, "
                    f"which does not describe this layer's [{M}, {K}] weight")
                return
        # Adopt the incoming topology's sizes so the default loader can copy into them.
        for name in ("values",) + TOPOLOGY_FIELDS:
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if incoming is None or incoming.shape == current.shape:
                continue
            fresh = torch.empty(incoming.shape, dtype=current.dtype, device=current.device)
            if name == "values":
                self.values = nn.Parameter(fresh, requires_grad=current.requires_grad)
            else:
                setattr(self, name, fresh)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class SparseLinear(_BlockSparseWeight):
    """y = x W^T + b with W [out_features, in_features] block-sparse.

    Args:
        block_size: (bm, bk) block shape, an int for square blocks; (1, 1) is unstructured.
            Features that are not a multiple of the block are padded invisibly (see bsr.py).
        density: fraction of blocks kept at random by the constructor (from_dense keeps the
            pruned pattern instead).
        backend: "auto" or a backend name (see sparsekern.backends) for this layer's calls.

    Shapes: input [..., in_features] -> output [..., out_features].
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 block_size=(32, 32), density: float = 0.1, device=None, dtype=None,
                 backend: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.backend = backend
        dtype = dtype or torch.get_default_dtype()
        w = BlockSparseMatrix.random((out_features, in_features), _pair(block_size), density,
                                     dtype=dtype)
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        w = w.with_values(torch.empty_like(w.values).uniform_(-bound, bound))._zero_padding()
        self._set_weight(w.to(device) if device is not None else w)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)
                                     .uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(cls, linear: nn.Linear, block_size=(32, 32), mask: Tensor | None = None,
                   backend: str = "auto") -> "SparseLinear":
        """A SparseLinear computing the same function as `linear` on its pruned weight.

        mask: element mask [out, in] or block mask; None uses torch.nn.utils.prune's weight_mask
        when present, else keeps every block holding a nonzero.
        """
        weight = linear.weight.detach()
        if mask is None and hasattr(linear, "weight_mask"):
            mask = linear.weight_mask
        w = BlockSparseMatrix.from_dense(weight, _pair(block_size), mask=mask)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.backend = backend
        module._set_weight(w)
        bias = linear.bias
        module.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        return module

    def to_dense(self) -> nn.Linear:
        """An equivalent nn.Linear (zeros where no block is stored)."""
        values = self.values
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=values.device, dtype=values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, input: Tensor) -> Tensor:
        return bsr_linear(input, self.weight, self.bias, self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, "
                f"density={self.density:.4f}")
