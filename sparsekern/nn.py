"""Drop-in modules over truly block-sparse weights."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sparsekern.bsr import TOPOLOGY_FIELDS, BlockSparseMatrix, _pair
from sparsekern.functional import _pair as _int_pair
from sparsekern.functional import _fused_relu, bsr_conv2d, bsr_linear, conv_padding


def pruned_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight, element mask or None) of a dense layer; with torch.nn.utils.prune's
    weight_orig/weight_mask pair the weight is recomputed as weight_orig * weight_mask."""
    mask = getattr(module, "weight_mask", None)
    orig = getattr(module, "weight_orig", None)
    if mask is not None and orig is not None:
        return (orig * mask).detach(), mask
    return module.weight.detach(), mask


class _BlockSparseWeight(nn.Module):
    """Holds one BlockSparseMatrix as module state: ``values`` is the only weight Parameter
    (optimizers see only stored blocks); the topology tensors are buffers. A state_dict with a
    different topology (another nnz) loads: the topology comes from the state_dict."""

    # None, or "relu": the layer returns relu(output), fused into its kernels (sparsify's
    # fuse_relu sets it on layers followed by an nn.ReLU).
    activation: str | None = None

    def _set_activation(self, activation: str | None) -> None:
        _fused_relu(activation)  # validates
        self.activation = activation

    def _dense_with_activation(self, dense: nn.Module) -> nn.Module:
        return nn.Sequential(dense, nn.ReLU()) if self.activation == "relu" else dense

    def _activation_repr(self) -> str:
        return f", activation={self.activation!r}" if self.activation else ""

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
        activation: None, or "relu" for relu(x W^T + b) fused into the kernels.

    Shapes: input [..., in_features] -> output [..., out_features].
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 block_size=(32, 32), density: float = 0.1, device=None, dtype=None,
                 backend: str = "auto", activation: str | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.backend = backend
        self._set_activation(activation)
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
                   backend: str = "auto", activation: str | None = None) -> "SparseLinear":
        """A SparseLinear computing the same function as `linear` on its pruned weight.

        mask: element mask [out, in] or block mask; None uses torch.nn.utils.prune's weight_mask
        when present, else keeps every block holding a nonzero.
        """
        weight, prune_mask = pruned_weight(linear)
        mask = prune_mask if mask is None else mask
        w = BlockSparseMatrix.from_dense(weight, _pair(block_size), mask=mask)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.backend = backend
        module._set_activation(activation)
        module._set_weight(w)
        bias = linear.bias
        module.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        return module

    def to_dense(self) -> nn.Module:
        """An equivalent nn.Linear (zeros where no block is stored); with a fused activation,
        nn.Sequential(that Linear, nn.ReLU())."""
        values = self.values
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=values.device, dtype=values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return self._dense_with_activation(linear)

    def forward(self, input: Tensor) -> Tensor:
        return bsr_linear(input, self.weight, self.bias, self.backend,
                          activation=self.activation)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, "
                f"density={self.density:.4f}" + self._activation_repr())


def conv_weight_to_gemm(weight: Tensor) -> Tensor:
    """[C_out, C_in, R, S] -> the implicit-GEMM matrix [C_out, R*S*C_in], ordered (r, s, c)."""
    C_out = weight.shape[0]
    return weight.permute(0, 2, 3, 1).reshape(C_out, -1)


def gemm_to_conv_weight(matrix: Tensor, in_channels: int, kernel_size) -> Tensor:
    """Inverse of conv_weight_to_gemm."""
    R, S = kernel_size
    return matrix.reshape(matrix.shape[0], R, S, in_channels).permute(0, 3, 1, 2)


class SparseConv2d(_BlockSparseWeight):
    """nn.Conv2d (groups=1, zero padding) with a block-sparse weight.

    The weight is the implicit-GEMM matrix [out_channels, R*S*in_channels], reduction ordered
    (r, s, c): a block of block_size = (bo, bi) is bo output channels x bi input channels at one
    filter tap, so bi must divide in_channels ((1, 1) is unstructured and fits any channels).
    out_channels that are not a multiple of bo are padded invisibly.

    activation: None, or "relu" for relu(conv(x)) fused into the kernels (the forward's store
    and the copy of the grad output in the backward).

    Shapes: input [N, C_in, H, W] (NCHW or channels_last; also unbatched [C_in, H, W]) ->
    [N, C_out, P, Q] in the input's memory format.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 block_size=(32, 32), density: float = 0.1, device=None, dtype=None,
                 backend: str = "auto", activation: str | None = None):
        super().__init__()
        self._set_activation(activation)
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation,
                           groups, padding_mode, block_size, backend)
        dtype = dtype or torch.get_default_dtype()
        R, S = self.kernel_size
        fan_in = in_channels * R * S
        w = BlockSparseMatrix.random((out_channels, fan_in), _pair(block_size), density,
                                     dtype=dtype)
        bound = 1.0 / math.sqrt(fan_in)
        w = w.with_values(torch.empty_like(w.values).uniform_(-bound, bound))._zero_padding()
        self._set_weight(w.to(device) if device is not None else w)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, dtype=dtype, device=device)
                                     .uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def _set_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                      groups, padding_mode, block_size, backend):
        if groups != 1:
            raise ValueError(f"SparseConv2d supports groups=1 only, got groups={groups}")
        if padding_mode != "zeros":
            raise ValueError(f"SparseConv2d supports padding_mode='zeros' only, got "
                             f"{padding_mode!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _int_pair(kernel_size, "kernel_size")
        self.stride = _int_pair(stride, "stride")
        self.dilation = _int_pair(dilation, "dilation")
        self.padding = padding if isinstance(padding, str) else _int_pair(padding, "padding")
        conv_padding(self.padding, self.kernel_size, self.dilation, self.stride)  # validates
        self.groups, self.padding_mode, self.backend = 1, "zeros", backend
        bo, bi = _pair(block_size)
        if self.in_channels % bi:
            raise ValueError(f"block width {bi} does not divide in_channels={in_channels}: a "
                             f"block holds input channels of one filter tap; choose a block "
                             f"width dividing {in_channels} (e.g. (1, 1) for unstructured)")

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, block_size=(32, 32), mask: Tensor | None = None,
                   backend: str = "auto", activation: str | None = None) -> "SparseConv2d":
        """A SparseConv2d computing the same function as `conv` on its pruned weight.

        mask: element mask shaped like conv.weight [C_out, C_in, R, S], or a block mask over the
        GEMM view's block grid; None uses torch.nn.utils.prune's weight_mask when present, else
        keeps every block holding a nonzero. Usable as the `mapping` target of
        torch.ao.pruning's convert (called with the module alone).
        """
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._set_activation(activation)
        module._set_geometry(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                             conv.padding, conv.dilation, conv.groups, conv.padding_mode,
                             block_size, backend)
        weight, prune_mask = pruned_weight(conv)
        mask = prune_mask if mask is None else mask
        if mask is not None and mask.shape == weight.shape:
            mask = conv_weight_to_gemm(mask)
        w = BlockSparseMatrix.from_dense(conv_weight_to_gemm(weight), _pair(block_size), mask=mask)
        module._set_weight(w)
        bias = conv.bias
        module.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        return module

    def to_dense(self) -> nn.Module:
        """An equivalent nn.Conv2d (zeros where no block is stored); with a fused activation,
        nn.Sequential(that Conv2d, nn.ReLU())."""
        values = self.values
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, bias=self.bias is not None,
                         device=values.device, dtype=values.dtype)
        with torch.no_grad():
            conv.weight.copy_(gemm_to_conv_weight(self.weight.to_dense(), self.in_channels,
                                                  self.kernel_size))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return self._dense_with_activation(conv)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() in (3, 4) and input.shape[-3] != self.in_channels:
            raise ValueError(f"SparseConv2d expects {self.in_channels} input channels, got input "
                             f"of shape {tuple(input.shape)}")
        return bsr_conv2d(input, self.weight, self.bias, self.stride, self.padding,
                          self.dilation, kernel_size=self.kernel_size, backend=self.backend,
                          activation=self.activation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, "
                f"density={self.density:.4f}" + self._activation_repr())


@dataclass
class SparsifyEntry:
    name: str
    kind: str
    converted: bool
    reason: str
    sparsity: float  # fraction of zero weights in the dense layer
    density: float | None = None  # fraction of blocks stored after conversion


@dataclass
class SparsifyReport:
    """What sparsify() did: one entry per nn.Linear / nn.Conv2d found."""

    model: nn.Module
    entries: list[SparsifyEntry] = field(default_factory=list)
    fused: list[str] = field(default_factory=list)  # nn.ReLU modules folded into a layer

    @property
    def converted(self) -> list[str]:
        return [e.name for e in self.entries if e.converted]

    @property
    def skipped(self) -> list[str]:
        return [e.name for e in self.entries if not e.converted]

    def __str__(self) -> str:
        lines = [f"{'layer':30s} {'kind':8s} {'zeros':>7s} {'blocks':>7s}  result"]
        for e in self.entries:
            density = "-" if e.density is None else f"{100 * e.density:6.1f}%"
            lines.append(f"{e.name:30s} {e.kind:8s} {100 * e.sparsity:6.1f}% {density:>7s}  "
                         f"{'converted' if e.converted else 'skipped'}: {e.reason}")
        if self.fused:
            lines.append(f"ReLU fused into the layer before it: {', '.join(self.fused)}")
        return "\n".join(lines)


def _deepcopy_pruned(model: nn.Module) -> nn.Module:
    """copy.deepcopy that also works on torch.nn.utils.prune'd models, whose `weight` attribute is
    a non-leaf tensor (weight_orig * weight_mask, recomputed by prune's hook at every forward)."""
    derived = {m: m.weight for m in model.modules()
               if hasattr(m, "weight_orig") and hasattr(m, "weight_mask")
               and isinstance(getattr(m, "weight", None), Tensor)}
    try:
        for m, w in derived.items():
            m.weight = w.detach()
        return copy.deepcopy(model)
    finally:
        for m, w in derived.items():
            m.weight = w


def sparsify(model: nn.Module, block_size=(32, 32), min_sparsity: float = 0.0,
             include=None, inplace: bool = True, fuse_relu: bool = False) -> SparsifyReport:
    """Replaces every pruned nn.Linear / nn.Conv2d by SparseLinear / SparseConv2d.

    A layer counts as pruned when it carries torch.nn.utils.prune's weight_mask, or when more
    than `min_sparsity` of its weights are zero. block_size: a pair, or a function
    (name, module) -> pair for per-layer choices. include: optional predicate (name, module) ->
    bool restricting the candidates (e.g. to keep the first and last layers dense).
    fuse_relu: an nn.ReLU that directly follows a converted layer in an nn.Sequential is folded
    into it (activation="relu": applied in the kernels' store, its backward in the next
    product's read) and replaced by a FusedReLU placeholder (an nn.Identity, as
    torch.ao.quantization.fuse_modules leaves); saves ReLU's passes over memory. Off by default:
    the model's structure changes (sparsekern.attacks.activation_sparsity reports the
    placeholders under the ReLUs' names).
    Returns a SparsifyReport (report.model is the converted model; the same object if inplace).
    The converted model computes the same function (up to float rounding).
    """
    if not inplace:
        model = _deepcopy_pruned(model)
    report = SparsifyReport(model)
    candidates = [(n, m) for n, m in model.named_modules()
                  if type(m) in (nn.Linear, nn.Conv2d) and n]
    if type(model) in (nn.Linear, nn.Conv2d):
        raise ValueError("sparsify converts the layers inside a model; for a single layer use "
                         "SparseLinear.from_dense / SparseConv2d.from_dense")
    for name, module in candidates:
        kind = "Linear" if isinstance(module, nn.Linear) else "Conv2d"
        weight, mask = pruned_weight(module)
        zeros = int((weight == 0).sum()) / weight.numel() if weight.numel() else 0.0
        entry = SparsifyEntry(name, kind, False, "", zeros)
        report.entries.append(entry)
        if include is not None and not include(name, module):
            entry.reason = "excluded by `include`"
            continue
        if mask is None and zeros <= min_sparsity:
            entry.reason = (f"not pruned ({100 * zeros:.1f}% zeros <= min_sparsity "
                            f"{100 * min_sparsity:.1f}%)")
            continue
        block = block_size(name, module) if callable(block_size) else block_size
        try:
            if kind == "Linear":
                sparse = SparseLinear.from_dense(module, block_size=block)
            else:
                sparse = SparseConv2d.from_dense(module, block_size=block)
        except ValueError as err:
            entry.reason = str(err)
            continue
        sparse = sparse.to(device=weight.device)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, sparse)
        entry.converted, entry.density = True, sparse.density
        entry.reason = f"block {tuple(block)}"
    if fuse_relu:
        report.fused = _fuse_relus(model, set(report.converted))
    return report


class FusedReLU(nn.Identity):
    """Placeholder left by sparsify(fuse_relu=True) where an nn.ReLU was folded into the sparse
    layer before it: passes its input through (already rectified). Hooks on it see the ReLU's
    output, so per-ReLU statistics (attacks.activation_sparsity) keep their names."""


def _fuse_relus(model: nn.Module, converted: set[str]) -> list[str]:
    """Folds each nn.ReLU that follows a converted layer inside an nn.Sequential into that layer
    (leaving a FusedReLU placeholder); returns the names of the replaced ReLUs."""
    fused = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            layer, act = seq._modules[first], seq._modules[second]
            layer_name = f"{seq_name}.{first}" if seq_name else first
            if (layer_name in converted and type(act) is nn.ReLU
                    and getattr(layer, "activation", None) is None):
                layer.activation = "relu"
                layer.relu_placeholder = second  # its output is seen at the placeholder
                seq._modules[second] = FusedReLU()
                fused.append(f"{seq_name}.{second}" if seq_name else second)
    return fused
