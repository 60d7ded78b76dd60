"""Reference models of the robustness-vs-sparsity study (Guo et al., NeurIPS 2018), built dense
or directly block-sparse:

    from sparsekern.models import build_model
    model = build_model("resnet20", sparse=True, block_size=(4, 4), density=0.1, seed=0)

    name             input         weight layers                          keep_dense default
    lenet-300-100    [N,1,28,28]   fc1-fc3 (MLP 784-300-100-10)           ()  (all sparse)
    lenet-5          [N,1,28,28]   conv1, conv2, fc1, fc2 (Caffe)         ("first", "last")
    vgg-like         [N,3,32,32]   6 convs (BN), fc1, fc2                 ("first", "last")
    resnet20/32      [N,3,32,32]   19/31 convs (BN, option A), fc         ("first", "last")

Inputs are NCHW floats in [0, 1] (no normalisation layer; the attacks work in that range).
Every model has `input_shape` (C, H, W) and `keep_dense` (names of the layers the sparse build
keeps dense, set on dense builds too so a pruning recipe can skip the same layers, e.g.
`sparsify(model, include=lambda n, m: n not in model.keep_dense)`).

Sparse builds replace each other nn.Linear / nn.Conv2d with a SparseLinear / SparseConv2d of the
same geometry built by its constructor: a uniformly random block pattern keeping
round(density * n_blocks) blocks, values drawn like PyTorch's default dense init
(U(+-1/sqrt(fan_in))), so a sparse model starts as a masked dense one. The CNNs keep their first
conv dense (1 or 3 input channels: too few for a block, and < 1% of the weights) and their
classifier fc dense (a few thousand weights); LeNet-300-100's fc1 holds 88% of its weights, so
all three of its layers are sparse.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from sparsekern.bsr import _pair
from sparsekern.models.lenet import LeNet5, LeNet300100
from sparsekern.models.resnet import CifarResNet
from sparsekern.models.vgg import VGGLike
from sparsekern.nn import SparseConv2d, SparseLinear


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(32, num_classes, in_channels)


# name -> builder(num_classes=10, in_channels=<model default>) -> dense nn.Module
MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet-300-100": LeNet300100,
    "lenet-5": LeNet5,
    "vgg-like": VGGLike,
    "resnet20": resnet20,
    "resnet32": resnet32,
}

# Layers the sparse build keeps dense when keep_dense=None (see the module docstring).
DEFAULT_KEEP_DENSE: dict[str, tuple[str, ...]] = {
    "lenet-300-100": (),
    "lenet-5": ("first", "last"),
    "vgg-like": ("first", "last"),
    "resnet20": ("first", "last"),
    "resnet32": ("first", "last"),
}

# keep_dense tokens besides layer names.
KEEP_DENSE_ROLES = ("first", "last", "indivisible")


def model_names() -> list[str]:
    """The names build_model accepts."""
    return list(MODELS)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every dense nn.Linear / nn.Conv2d, in registration (= forward) order:
    the layers a sparse build may replace."""
    return [(n, m) for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and n]


def resolve_keep_dense(model: nn.Module, keep_dense: Sequence[str],
                       block_size=(1, 1)) -> tuple[str, ...]:
    """Layer names selected by keep_dense: layer names and the roles "first" / "last" (first /
    last weight layer) and "indivisible" (convs whose in_channels the block width does not
    divide: a SparseConv2d block holds input channels of one filter tap)."""
    if isinstance(keep_dense, str):
        keep_dense = (keep_dense,)
    layers = weight_layers(model)
    names = [n for n, _ in layers]
    _, bi = _pair(block_size)
    keep: list[str] = []
    for token in keep_dense:
        if token == "first":
            picked = names[:1]
        elif token == "last":
            picked = names[-1:]
        elif token == "indivisible":
            picked = [n for n, m in layers if isinstance(m, nn.Conv2d) and m.in_channels % bi]
        elif token in names:
            picked = [token]
        else:
            raise ValueError(f"keep_dense entry {token!r} is neither a role "
                             f"({', '.join(KEEP_DENSE_ROLES)}) nor a weight layer of the model "
                             f"({', '.join(names)})")
        keep += [n for n in picked if n not in keep]
    return tuple(n for n in names if n in keep)  # forward order


def _sparse_twin(name: str, m: nn.Module, block_size, density: float) -> nn.Module:
    """A freshly initialised SparseLinear / SparseConv2d with m's geometry."""
    bias = m.bias is not None
    if isinstance(m, nn.Linear):
        return SparseLinear(m.in_features, m.out_features, bias=bias, block_size=block_size,
                            density=density)
    bo, bi = block_size
    if m.in_channels % bi:
        raise ValueError(
            f"layer {name!r} (Conv2d {m.in_channels}->{m.out_channels}): block width {bi} does "
            f"not divide in_channels={m.in_channels} (a block holds input channels of one filter "
            f"tap); use a block width dividing {m.in_channels}, or keep the layer dense: "
            f"keep_dense=(..., {name!r}), or 'indivisible' for every such layer")
    return SparseConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                        m.dilation, m.groups, bias, m.padding_mode, block_size=block_size,
                        density=density)


def make_sparse(model: nn.Module, block_size=(1, 1), density: float = 1.0,
                keep_dense: Sequence[str] = ("first", "last")) -> nn.Module:
    """Replaces (in place) every nn.Linear / nn.Conv2d not selected by keep_dense with a
    randomly patterned SparseLinear / SparseConv2d of the same geometry; returns the model.
    The weights are re-drawn (a random sparse init, not a pruning of the dense weights: for that
    use sparsekern.prune and sparsekern.sparsify)."""
    block_size = _pair(block_size)
    keep = resolve_keep_dense(model, keep_dense, block_size)
    for name, m in weight_layers(model):
        if name in keep:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _sparse_twin(name, m, block_size, density))
    model.keep_dense = keep
    return model


def build_model(name: str, sparse: bool = False, block_size=(1, 1), density: float = 1.0,
                num_classes: int = 10, in_channels: int | None = None, seed: int | None = None,
                keep_dense: Sequence[str] | None = None) -> nn.Module:
    """One of model_names(), dense or directly block-sparse; output logits [N, num_classes].

    sparse: replace the weight layers not in keep_dense by SparseLinear / SparseConv2d with
        block_size (bo, bi) and a random pattern keeping `density` of the blocks.
    in_channels: input channels (None: 1 for the MNIST models, 3 for the CIFAR ones).
    seed: if given, the build (init and sparsity pattern) is deterministic and leaves the global
        RNG untouched; None draws from the global RNG.
    keep_dense: layer names and/or roles "first", "last", "indivisible" (see
        resolve_keep_dense); None takes DEFAULT_KEEP_DENSE[name]. The result is recorded as
        model.keep_dense (layer names), on dense builds too.
    """
    builder = MODELS.get(name.lower())
    if builder is None:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(model_names())}")
    name = name.lower()
    if not sparse and density != 1.0:
        raise ValueError(f"density={density} needs sparse=True (a dense build stores every "
                         f"weight)")
    keep_dense = DEFAULT_KEEP_DENSE[name] if keep_dense is None else keep_dense
    kwargs = {"num_classes": num_classes}
    if in_channels is not None:
        kwargs["in_channels"] = in_channels
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = builder(**kwargs)
        if sparse:
            return make_sparse(model, block_size, density, keep_dense)
    model.keep_dense = resolve_keep_dense(model, keep_dense, block_size)
    return model


__all__ = ["DEFAULT_KEEP_DENSE", "KEEP_DENSE_ROLES", "MODELS", "CifarResNet", "LeNet300100",
           "LeNet5", "VGGLike", "build_model", "make_sparse", "model_names",
           "resolve_keep_dense", "resnet20", "resnet32", "weight_layers"]
