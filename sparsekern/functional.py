"""Functional API over the ops: logical shapes, padding, leading batch dims, bias."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from sparsekern import backends, ops
from sparsekern.bsr import BlockSparseMatrix


def bsr_linear(input: Tensor, weight: BlockSparseMatrix, bias: Tensor | None = None,
               backend: str = "auto") -> Tensor:
    """y = input @ W^T + bias with W block-sparse of logical shape [out, in].

    input [..., in] -> [..., out]. Differentiable w.r.t. input, weight.values and bias.
    backend: "auto" (or the innermost `sparsekern.backend(...)` scope), "cpu", "cuda", "reference".
    """
    out_features, in_features = weight.shape
    if input.dim() < 1 or input.shape[-1] != in_features:
        raise ValueError(f"bsr_linear: input has shape {tuple(input.shape)}, expected [..., "
                         f"{in_features}]")
    Mp, Kp = weight.padded_shape
    lead = input.shape[:-1]
    x = input.reshape(-1, in_features)
    if Kp != in_features:  # the padding stays invisible: zeros in, sliced out
        x = F.pad(x, (0, Kp - in_features))
    # Resolve the backend scope here, in traced Python, so torch.compile guards on it (a name
    # resolved inside the op's autograd would be frozen into the compiled backward).
    backend = backends.resolve_name(backend)
    y = ops.dds(x, weight.values, *weight.topology(), Mp, Kp, True, backend)
    if Mp != out_features:
        y = y[:, :out_features]
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, out_features)
