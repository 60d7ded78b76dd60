"""Functional API over the ops: logical shapes, padding, leading batch dims, bias."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsekern import backends, ops
from sparsekern.bsr import BlockSparseMatrix


def bsr_linear(input: Tensor, weight: BlockSparseMatrix, bias: Tensor | None = None,
               backend: str = "auto", *, activation: str | None = None) -> Tensor:
    """y = input @ W^T + bias with W block-sparse of logical shape [out, in].

    input [..., in] -> [..., out]. Differentiable w.r.t. input, weight.values and bias.
    backend: "auto" (or the innermost `sparsekern.backend(...)` scope), "cpu", "cuda", "reference".
    activation: None, or "relu" for relu(y) fused into the kernels (forward and backward).
    """
    relu = _fused_relu(activation)
    input, weight, bias = _autocast(input, weight, bias, backend, conv=False)
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
    y = ops.dds_call(x, weight.values, *weight.topology(), Mp, Kp, True, backend, None,
                     _padded_bias(bias, Mp), relu)
    if Mp != out_features:
        y = y[:, :out_features]
    return y.reshape(*lead, out_features)


def _autocast(input: Tensor, weight: BlockSparseMatrix, bias: Tensor | None, backend: str,
              conv: bool):
    """Under torch.autocast for the input's device, the operands cast as autocast casts
    F.linear's and F.conv2d's: to autocast's dtype where the backend that runs the layer takes
    it, else to float32 (backends.autocast_dtype); the output is in that dtype and the gradients
    flow back through the casts to the float32 weights. Float64 operands are left alone (as
    autocast leaves them)."""
    device = input.device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return input, weight, bias
    dtype = backends.autocast_dtype(backend, input, torch.get_autocast_dtype(device), conv,
                                    weight.block_shape)

    def cast(t):
        return t.to(dtype) if t is not None and t.dtype in (torch.float32, torch.float16,
                                                            torch.bfloat16) else t
    return cast(input), weight.with_values(cast(weight.values)), cast(bias)


def _fused_relu(activation: str | None) -> bool:
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation == "relu"


def _padded_bias(bias: Tensor | None, Mp: int) -> Tensor | None:
    """The bias over the padded output rows (the op adds it in the kernel's store)."""
    if bias is None or bias.shape[-1] == Mp:
        return bias
    return F.pad(bias, (0, Mp - bias.shape[-1]))


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v!r}")
    return int(v[0]), int(v[1])


def conv_padding(padding, kernel_size, dilation, stride) -> tuple[int, int]:
    """Resolves int / pair / 'valid' / 'same' (symmetric only) to (pad_h, pad_w)."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions")
        pads = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            if total % 2:
                raise ValueError("padding='same' needs an odd effective kernel size here")
            pads.append(total // 2)
        return tuple(pads)
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    pad = _pair(padding, "padding")
    if min(pad) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return pad


def bsr_conv2d(input: Tensor, weight: BlockSparseMatrix, bias: Tensor | None = None, stride=1,
               padding=0, dilation=1, *, kernel_size=None, backend: str = "auto",
               activation: str | None = None) -> Tensor:
    """2-D convolution (groups=1, zero padding) with a block-sparse weight.

    weight: the implicit-GEMM matrix [C_out, R*S*C_in], reduction ordered (r, s, c): a block is
    bm output channels x bk input channels at one filter tap (bk must divide C_in).
    input [N, C_in, H, W] (NCHW or channels_last) or [C_in, H, W] -> [N, C_out, P, Q], in the
    input's memory format. kernel_size defaults to the square kernel R*S = K / C_in implies.
    activation: None, or "relu" for relu(y) fused into the kernels (forward and backward).
    """
    relu = _fused_relu(activation)
    input, weight, bias = _autocast(input, weight, bias, backend, conv=True)
    if input.dim() == 3:
        return bsr_conv2d(input.unsqueeze(0), weight, bias, stride, padding, dilation,
                          kernel_size=kernel_size, backend=backend,
                          activation=activation).squeeze(0)
    if input.dim() != 4:
        raise ValueError(f"bsr_conv2d expects a 3-D or 4-D input, got shape {tuple(input.shape)}")
    N, C, H, W = input.shape
    C_out, K = weight.shape
    if kernel_size is None:
        taps = K // C if C and K % C == 0 else 0
        side = int(round(taps ** 0.5))
        if side * side != taps or taps == 0:
            raise ValueError(f"input has {C} channels but the weight has {K} columns: not "
                             f"C_in * R * S for a square kernel (pass kernel_size)")
        kernel_size = (side, side)
    R, S = _pair(kernel_size, "kernel_size")
    if K != R * S * C:
        raise ValueError(f"input has {C} channels but the weight expects {K // (R * S)} "
                         f"(weight [C_out, R*S*C_in] = [{C_out}, {K}], kernel {R}x{S})")
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"stride and dilation must be positive, got {stride} and {dilation}")
    pad = conv_padding(padding, (R, S), dilation, stride)
    bm, bk = weight.block_shape
    if C % bk:
        raise ValueError(f"block width {bk} does not divide the {C} input channels: a block holds "
                         f"input channels of one filter tap; choose a block width dividing {C}")
    geometry = ops.conv_geometry((N, C, H, W), (R, S), stride, pad, dilation)
    # channels_last input stays channels_last, anything else goes in as contiguous NCHW: the
    # ops take both and return (and differentiate) in the format they get.
    channels_last = ops.is_channels_last(input)
    x = input if channels_last else input.contiguous()
    Mp, Kp = weight.padded_shape
    backend = backends.resolve_name(backend)
    y = ops.dds_call(x, weight.values, *weight.topology(), Mp, Kp, True, backend, geometry,
                     _padded_bias(bias, Mp), relu)
    if Mp != C_out:  # drop the padded channels: a fresh dense tensor in the input's format (a
        # clone, not contiguous(), which would keep a view when the slice happens to be dense)
        # (vmap has no channels_last: under jacfwd y's tangent is batched though x is not)
        y = y[:, :C_out].clone(memory_format=torch.channels_last if channels_last
                               and not ops.under_vmap() else torch.contiguous_format)
    return y
