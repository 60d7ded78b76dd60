"""sparsekern: truly block-sparse Linear and Conv2d with fast forward and backward kernels.

    import sparsekern
    layer = sparsekern.SparseLinear.from_dense(pruned_linear, block_size=(32, 32))
    with sparsekern.backend("cpu"):   # optional: force a backend in a scope
        y = layer(x)
"""
from sparsekern import ops  # noqa: F401  (defines the ops and loads sparsekern._C)
from sparsekern.backends import backend
from sparsekern.bsr import BlockSparseMatrix
from sparsekern.functional import bsr_conv2d, bsr_linear
from sparsekern.memory import retain_freed_cpu_memory
from sparsekern.nn import SparseConv2d, SparseLinear, SparsifyReport, sparsify
from sparsekern import triton  # noqa: E402,F401  (registers backend "triton"; imports triton lazily)

__all__ = ["BlockSparseMatrix", "SparseConv2d", "SparseLinear", "SparsifyReport", "backend",
           "bsr_conv2d", "bsr_linear", "ops", "retain_freed_cpu_memory", "sparsify", "triton"]
__version__ = "0.1.0"
