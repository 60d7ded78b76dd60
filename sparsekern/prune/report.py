"""Per-layer weight-sparsity report, for dense (masked) and converted (block-sparse) models."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sparsekern.nn import SparseConv2d, SparseLinear, pruned_weight

REPORTED_TYPES = (nn.Linear, nn.Conv2d, SparseLinear, SparseConv2d)


@dataclass(frozen=True)
class LayerSparsity:
    """One layer: `numel` logical weights of which `zeros` are zero; sparsity = zeros / numel."""

    name: str
    kind: str  # the module's class name: Linear, Conv2d, SparseLinear, SparseConv2d
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def __iter__(self):  # unpacks as (name, kind, numel, zeros, sparsity)
        return iter((self.name, self.kind, self.numel, self.zeros, self.sparsity))


@dataclass
class SparsityReport:
    """Result of sparsity_report: `layers` (LayerSparsity rows) and `total` over all of them."""

    layers: list[LayerSparsity] = field(default_factory=list)

    @property
    def total(self) -> LayerSparsity:
        return LayerSparsity("total", "-", sum(r.numel for r in self.layers),
                             sum(r.zeros for r in self.layers))

    @property
    def sparsity(self) -> float:
        return self.total.sparsity

    def by_name(self) -> dict[str, LayerSparsity]:
        return {r.name: r for r in self.layers}

    def __str__(self) -> str:
        lines = [f"{'layer':30s} {'kind':13s} {'weights':>10s} {'zeros':>10s} {'sparsity':>9s}"]
        for r in self.layers + [self.total]:
            lines.append(f"{r.name:30s} {r.kind:13s} {r.numel:10d} {r.zeros:10d} "
                         f"{100 * r.sparsity:8.2f}%")
        return "\n".join(lines)


def effective_weight(module: nn.Module) -> Tensor:
    """The weight a layer computes with, detached, in its logical dense shape.

    nn.Linear [out, in] / nn.Conv2d [C_out, C_in, R, S]: weight_orig * weight_mask when a
    weight_orig/weight_mask pair is present (torch.nn.utils.prune or sparsekern.prune.dns), else
    weight. SparseLinear / SparseConv2d: the logical GEMM matrix [M, K] (padding excluded).
    """
    if isinstance(module, (SparseLinear, SparseConv2d)):
        return module.weight.to_dense().detach()
    return pruned_weight(module)[0]


@torch.no_grad()
def sparsity_report(model: nn.Module, layers=None) -> SparsityReport:
    """Per-layer weight sparsity of every nn.Linear, nn.Conv2d, SparseLinear and SparseConv2d.

    Zeros are counted in the weight the layer computes with (weight_orig * weight_mask for
    masked layers). For SparseLinear / SparseConv2d the count is over the logical weight (the
    [M, K] GEMM matrix, block padding excluded), and zeros = weights in blocks that are not
    stored + stored weights that are exactly zero; so a masked dense model and the model
    sparsify() converts from it give the same numbers. Bias is not counted.

    layers: None (all such layers), a list of names, or a predicate (name, module) -> bool.
    """
    report = SparsityReport()
    for name, module in model.named_modules():
        if not isinstance(module, REPORTED_TYPES):
            continue
        if layers is not None:
            if callable(layers):
                if not layers(name, module):
                    continue
            elif name not in layers:
                continue
        w = effective_weight(module)
        report.layers.append(LayerSparsity(name or "(root)", type(module).__name__, w.numel(),
                                           int((w == 0).sum())))
    return report
