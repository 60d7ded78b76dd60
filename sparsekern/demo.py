"""Prune an nn.Linear by block magnitude, convert it to SparseLinear, check it, time it."""
import torch
from torch import nn

from sparsekern.nn import SparseLinear
from sparsekern.timing import median_ms


def block_magnitude_mask(weight: torch.Tensor, block: int, sparsity: float) -> torch.Tensor:
    """Block mask keeping the (1 - sparsity) fraction of blocks with the largest L2 norm."""
    M, K = weight.shape
    norms = weight.reshape(M // block, block, K // block, block).pow(2).sum((1, 3))
    n_keep = int(round((1 - sparsity) * norms.numel()))
    mask = torch.zeros(norms.numel(), dtype=torch.bool)
    mask[norms.flatten().topk(n_keep).indices] = True
    return mask.reshape(norms.shape)


def main(features=4096, batch=256, sparsity=0.9, block=32):
    torch.manual_seed(0)
    dense = nn.Linear(features, features)
    mask = block_magnitude_mask(dense.weight.detach(), block, sparsity)
    sparse = SparseLinear.from_dense(dense, block_size=(block, block), mask=mask)
    masked = sparse.to_dense()  # the dense layer with the same pruned weight
    x = torch.randn(batch, features, requires_grad=True)
    err = (sparse(x) - masked(x)).abs().max().item()
    print(f"SparseLinear {features}x{features}, {block}x{block} blocks, "
          f"{100 * (1 - sparse.density):.0f}% block sparsity, batch {batch}; "
          f"max |sparse - dense| = {err:.2e}")

    def fwd(layer):
        with torch.no_grad():
            layer(x)

    def fwd_bwd(layer):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).sum().backward()

    for name, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
        t_dense = median_ms(lambda: fn(masked))
        t_sparse = median_ms(lambda: fn(sparse))
        print(f"  {name:17s} dense {t_dense:8.2f} ms   sparse {t_sparse:8.2f} ms   "
              f"speed-up {t_dense / t_sparse:5.2f}x")
