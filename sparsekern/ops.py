"""All op schemas, fake kernels, autograd and the entry to backend choice.

Two layers of ops in namespace ``sparsekern``:

* native ops ``_dds_native`` / ``_sdd_native``: schemas here, kernels registered by the compiled
  extension for the CPU key (csrc/cpu) and the CUDA key (csrc/cuda);
* public ops ``dds`` / ``sdd`` (torch.library.custom_op): check arguments, pick a backend
  (backends.py) and carry the autograd, written once in terms of dds and sdd themselves:

    y  = dds(x, W, trans_w=True)     x [B, Kp] @ W^T -> [B, Mp]
    dx = dds(dy, W, trans_w=False)   dy [B, Mp] @ W  -> [B, Kp]
    dW = sdd(dy, x, topology of W)   stored blocks of dy^T @ x -> [nnz, bm, bk]

A topology is the 6-tuple (row_offsets, col_idx, row_idx, t_offsets, t_rows, t_perm) of bsr.py.
All shapes here are the padded shapes; functional.py handles the logical ones.

Conv2d is the same three products on the implicit-GEMM view: pass ``conv`` = the geometry
[N, H, W, C, R, S, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, P, Q] (see conv_geometry);
W is [Mp, R*S*C] with the reduction ordered (r, s, c). Activations are then either NHWC rows,
x [N*H*W, C] and y [N*P*Q, Mp], or 4-D tensors, x [N, C, H, W] and y [N, Mp, P, Q], contiguous
(NCHW) or channels_last: the input's layout picks the output's. channels_last tensors run as
the NHWC rows they already are (no copy) and come back as channels_last tensors that are not
views, so in-place ops on them (ReLU(inplace=True)) cost no view bookkeeping. Backends without
an NCHW path get NHWC rows (converted here). The autograd below is the same for all.
"""
from __future__ import annotations

import importlib
import inspect
import operator
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

from sparsekern import backends
from sparsekern.bsr import INDEX_DTYPE, transpose_metadata

# ---- native ops (schemas; kernels come from sparsekern._C) ---------------------------------------
torch.library.define(
    "sparsekern::_dds_native",
    "(Tensor a, Tensor values, Tensor row_offsets, Tensor col_idx, Tensor t_offsets, "
    "Tensor t_rows, Tensor t_perm, int n_rows, int n_cols, bool trans_w, int[]? conv=None, "
    "Tensor? bias=None, bool relu=False, Tensor? relu_mask=None) -> Tensor",
)
torch.library.define(
    "sparsekern::_sdd_native",
    "(Tensor a, Tensor b, Tensor row_idx, Tensor col_idx, int bm, int bk, int[]? conv=None) "
    "-> Tensor",
)

CONV_FIELDS = ("N", "H", "W", "C", "R", "S", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h",
               "dil_w", "P", "Q")


def conv_geometry(x_shape, kernel_size, stride, padding, dilation) -> list[int]:
    """The conv argument of the ops for an input of shape [N, C, H, W]."""
    # a symbolic size stays one (a dynamic batch under export / compile); others become ints
    # (Dynamo takes a SymInt for an int)
    N, C, H, W = (v if isinstance(v, (int, torch.SymInt)) else operator.index(v)
                  for v in x_shape)
    (R, S), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    P = (H + 2 * ph - dh * (R - 1) - 1) // sh + 1
    Q = (W + 2 * pw - dw * (S - 1) - 1) // sw + 1
    if P < 1 or Q < 1:
        raise ValueError(f"conv output would be empty: input {H}x{W}, kernel {R}x{S}, stride "
                         f"{(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)}")
    return [N, H, W, C, R, S, sh, sw, ph, pw, dh, dw, P, Q]


def dds_out_shape(a, n_rows, n_cols, trans_w, conv):
    if conv:
        N, H, W, C, *_, P, Q = conv
        if a.dim() == 4:  # NCHW
            return (N, n_rows, P, Q) if trans_w else (N, C, H, W)
        return (N * P * Q, n_rows) if trans_w else (N * H * W, C)
    return (a.shape[0], n_rows if trans_w else n_cols)


def is_vmap_batched(t: Tensor) -> bool:
    """A tensor batched by vmap (torch.func's, or the older one gradcheck's batched checks use),
    at any depth of torch.func's wrappers (a grad or jvp transform's over a batched one): it
    has no storage to share and cannot tell its memory format. False under torch.compile
    (Dynamo cannot trace the test)."""
    if torch.compiler.is_compiling():
        return False
    functorch = torch._C._functorch
    while True:
        if functorch.is_batchedtensor(t) or functorch.is_legacy_batchedtensor(t):
            return True
        if not functorch.is_functorch_wrapped_tensor(t):
            return False
        t = functorch.get_unwrapped(t)


def _transforms() -> list:
    """The active torch.func transforms (TransformType), innermost last; none under
    torch.compile (Dynamo cannot trace the query)."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return []
    return [i.key() for i in torch._C._functorch.get_interpreter_stack()]


def under_vmap() -> bool:
    """A vmap transform is active (its tensors, tangents included, have no channels_last)."""
    return _VMAP in _transforms()


_VMAP = torch._C._functorch.TransformType.Vmap


def is_channels_last(t: Tensor) -> bool:
    """A 4-D tensor laid out NHWC (and not also plain contiguous, as 1-channel ones are)."""
    if t.dim() != 4 or t.is_contiguous() or is_vmap_batched(t):
        return False  # (a batched one is taken as NCHW: a copy)
    return t.is_contiguous(memory_format=torch.channels_last)


def _rows_view(t: Tensor) -> Tensor:
    """A channels_last [N, C, h, w] tensor as the NHWC rows [N*h*w, C] it holds (a view)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _rows_as_channels_last(rows: Tensor, N: int, h: int, w: int) -> Tensor:
    """NHWC rows [N*h*w, C] -> a channels_last [N, C, h, w] tensor on the same memory that is
    not a view of it (a custom autograd Function may not return views of its temporaries that
    callers modify in place)."""
    rows = rows.contiguous()
    C = rows.shape[1]
    if is_vmap_batched(rows):  # a jvp's tangents under vmap: no storage, and vmap clones to NCHW
        return rows_to_nchw(rows, N, h, w)  # only (a tangent's layout is free)
    if type(rows) is not torch.Tensor or torch._C._functorch.is_functionaltensor(rows):
        # traced (fake / functional tensors: no storage to share): a copy, which compilers fuse
        return rows.reshape(N, h, w, C).permute(0, 3, 1, 2).clone(
            memory_format=torch.channels_last)
    return rows.new_empty(0).set_(rows.untyped_storage(), rows.storage_offset(), (N, C, h, w),
                                  (h * w * C, 1, w * C, C))


def nchw_to_rows(t: Tensor) -> Tensor:
    """NCHW [N, C, h, w] -> NHWC rows [N*h*w, C] (ATen's channels_last copy: the fast one)."""
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(
        -1, t.shape[1])


def rows_to_nchw(rows: Tensor, N: int, h: int, w: int) -> Tensor:
    """NHWC rows [N*h*w, C] -> contiguous NCHW [N, C, h, w], a new tensor (clone, not
    contiguous(): an already dense permutation would stay a view of rows)."""
    return rows.reshape(N, h, w, rows.shape[1]).permute(0, 3, 1, 2).clone(
        memory_format=torch.contiguous_format)


@torch.library.register_fake("sparsekern::_dds_native")
def _dds_native_fake(a, values, row_offsets, col_idx, t_offsets, t_rows, t_perm, n_rows, n_cols,
                     trans_w, conv=None, bias=None, relu=False, relu_mask=None):
    return a.new_empty(dds_out_shape(a, n_rows, n_cols, trans_w, conv))


@torch.library.register_fake("sparsekern::_sdd_native")
def _sdd_native_fake(a, b, row_idx, col_idx, bm, bk, conv=None):
    return a.new_empty(row_idx.shape[0], bm, bk)


_native = None
_native_error: Exception | None = None
try:
    _native = importlib.import_module("sparsekern._C")
except ImportError as err:  # the reference backend still works; backends.select warns
    _native_error = err


def native_extension():
    """The compiled module sparsekern._C, or None if it could not be imported."""
    return _native


# ---- argument checks (one place, every backend) ---------------------------------------------------
def _check_topology(topo, nnz: int, n_rows: int, n_cols: int, bm: int, bk: int, device) -> None:
    if len(topo) != 6:
        raise ValueError("a topology is (row_offsets, col_idx, row_idx, t_offsets, t_rows, t_perm)")
    if bm < 1 or bk < 1 or n_rows % bm or n_cols % bk:
        raise ValueError(f"matrix shape [{n_rows}, {n_cols}] is not a multiple of the block "
                         f"shape ({bm}, {bk})")
    sizes = (n_rows // bm + 1, nnz, nnz, n_cols // bk + 1, nnz, nnz)
    names = ("row_offsets", "col_idx", "row_idx", "t_offsets", "t_rows", "t_perm")
    for t, size, name in zip(topo, sizes, names):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != size:
            raise ValueError(f"{name} must be 1-D with {size} elements, got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the operands are on {device}")


def _check_dense(t: Tensor, name: str, width: int, dtype, device, other="the weight (block values)"
                 ) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, features], got shape {tuple(t.shape)}")
    if t.shape[1] != width:
        raise ValueError(f"{name} has {t.shape[1]} features, expected {width}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {other} has {dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {other} is on {device}")


def _check_conv_activation(t: Tensor, name: str, N: int, C: int, h: int, w: int, dtype, device,
                           other="the weight (block values)") -> None:
    """t: NHWC rows [N*h*w, C] or NCHW [N, C, h, w]."""
    if t.dim() == 4:
        if tuple(t.shape) != (N, C, h, w):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected NCHW {(N, C, h, w)}")
    elif t.dim() == 2:
        if tuple(t.shape) != (N * h * w, C):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected NHWC rows "
                             f"{(N * h * w, C)}")
    else:
        raise ValueError(f"{name} must be NHWC rows (2-D) or NCHW (4-D), got shape "
                         f"{tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {other} has {dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {other} is on {device}")


_checked_convs: set = set()  # (geometry, n_cols, bk) already found valid: a layer's every call


def _check_conv(conv, n_cols: int, bk: int) -> None:
    key = (tuple(conv), n_cols, bk)
    try:
        if key in _checked_convs:
            return
    except TypeError:  # symbolic sizes (tracing) do not hash: check every time
        _check_conv_geometry(conv, n_cols, bk)
        return
    _check_conv_geometry(conv, n_cols, bk)
    if len(_checked_convs) >= 4096:
        _checked_convs.clear()
    _checked_convs.add(key)


def _check_conv_geometry(conv, n_cols: int, bk: int) -> None:
    if len(conv) != len(CONV_FIELDS):
        raise ValueError(f"conv geometry must be {list(CONV_FIELDS)}, got {len(conv)} values")
    N, H, W, C, R, S, sh, sw, ph, pw, dh, dw, P, Q = conv
    if min(H, W, C, R, S, sh, sw, dh, dw) < 1 or min(N, ph, pw) < 0:
        raise ValueError(f"invalid conv geometry {dict(zip(CONV_FIELDS, conv))}")
    if [P, Q] != conv_geometry((N, C, H, W), (R, S), (sh, sw), (ph, pw), (dh, dw))[-2:]:
        raise ValueError(f"conv output size {(P, Q)} does not follow from the geometry")
    if n_cols != R * S * C:
        raise ValueError(f"conv weight has {n_cols} columns but R*S*C = {R * S * C}")
    if C % bk:
        raise ValueError(f"the block width {bk} must divide the {C} input channels (a block "
                         f"holds input channels of one filter tap)")


# ---- public ops ----------------------------------------------------------------------------------
def _dds_impl(a: Tensor, values: Tensor, row_offsets: Tensor, col_idx: Tensor,
              row_idx: Tensor, t_offsets: Tensor, t_rows: Tensor, t_perm: Tensor, n_rows: int,
              n_cols: int, trans_w: bool, backend: str = "auto",
              conv: Optional[list[int]] = None, bias: Optional[Tensor] = None,
              relu: bool = False, relu_mask: Optional[Tensor] = None) -> Tensor:
    topo = (row_offsets, col_idx, row_idx, t_offsets, t_rows, t_perm)
    if values.dim() != 3:
        raise ValueError(f"values must be [nnz, bm, bk], got shape {tuple(values.shape)}")
    nnz, bm, bk = values.shape
    _check_topology(topo, nnz, n_rows, n_cols, bm, bk, values.device)
    if conv:
        _check_conv(conv, n_cols, bk)
        N, H, W, C, *_, P, Q = conv
        if trans_w:
            _check_conv_activation(a, "conv input", N, C, H, W, values.dtype, values.device)
        else:
            _check_conv_activation(a, "conv grad output", N, n_rows, P, Q, values.dtype,
                                   values.device)
    else:
        _check_dense(a, "input", n_cols if trans_w else n_rows, values.dtype, values.device)
    if bias is not None:
        if not trans_w:
            raise ValueError("a bias is added to x @ W^T only (trans_w=True)")
        _check_dense(bias.unsqueeze(0), "bias", n_rows, values.dtype, values.device)
    if relu and not trans_w:
        raise ValueError("relu applies to x @ W^T only (trans_w=True)")
    if relu_mask is not None:
        relu_mask, a = _relu_mask_like(relu_mask, a, trans_w)
    return _dds_checked(a, values, topo, n_rows, n_cols, trans_w, backend, conv, bias, relu,
                        relu_mask)


def _dds_checked(a, values, topo, n_rows, n_cols, trans_w, backend, conv, bias, relu, relu_mask):
    """_dds_impl after its checks (a channels_last conv comes back as its rows, checked)."""
    bm, bk = values.shape[1], values.shape[2]
    if conv:
        N, H, W, *_, P, Q = conv
        out_hw = (P, Q) if trans_w else (H, W)  # the output's spatial size
    if conv and is_channels_last(a):  # run on the rows it holds, no copy
        out = _dds_checked(_rows_view(a), values, topo, n_rows, n_cols, trans_w, backend, conv,
                           bias, relu, None if relu_mask is None else _rows_view(relu_mask))
        return _rows_as_channels_last(out, N, *out_hw)
    impl = backends.select("dds", backend, a, values.dtype, trans_w, bool(conv), (bm, bk))
    fused = {"bias": bias} if bias is not None and impl.fused_bias else {}
    if impl.fused_relu:
        fused.update(relu=relu, relu_mask=relu_mask)
    elif relu_mask is not None:  # ReLU's backward as a pass of its own
        a = torch.ops.aten.threshold_backward(a, relu_mask, 0)
    if conv and a.dim() == 4 and not impl.nchw:
        if fused.get("relu_mask") is not None:  # read alongside a: the same rows
            fused["relu_mask"] = nchw_to_rows(fused["relu_mask"])
        out = impl.dds(nchw_to_rows(a), values, topo, n_rows, n_cols, trans_w, conv, **fused)
        out = rows_to_nchw(out, N, *out_hw)
    else:
        out = impl.dds(a, values, topo, n_rows, n_cols, trans_w, conv or None, **fused)
    if bias is not None and "bias" not in fused:
        out = out + (bias.view(1, -1, 1, 1) if out.dim() == 4 else bias)
    if relu and not impl.fused_relu:
        out = out.relu_()
    return out


def _relu_mask_like(relu_mask: Tensor, a: Tensor, trans_w: bool) -> tuple[Tensor, Tensor]:
    """(relu_mask, a): the mask checked against a (dy) and laid out as a (the kernels read both
    alike); a made dense where it overlaps itself (an expanded view), which no mask can
    copy."""
    if trans_w:
        raise ValueError("relu_mask applies to dy @ W only (trans_w=False)")
    if relu_mask.shape != a.shape:
        raise ValueError(f"relu_mask must have the grad output's shape {tuple(a.shape)}, got "
                         f"{tuple(relu_mask.shape)}")
    if relu_mask.dtype != a.dtype or relu_mask.device != a.device:
        raise TypeError(f"relu_mask is {relu_mask.dtype} on {relu_mask.device}, the grad output "
                        f"{a.dtype} on {a.device}")
    if relu_mask.stride() != a.stride():
        like = torch.empty_like(a)
        if like.stride() != a.stride():
            a = a.contiguous()
            like = torch.empty_like(a)
        relu_mask = like.copy_(relu_mask)
    return relu_mask, a


@torch.library.custom_op("sparsekern::dds", mutates_args=())
def dds(a: Tensor, values: Tensor, row_offsets: Tensor, col_idx: Tensor, row_idx: Tensor,
        t_offsets: Tensor, t_rows: Tensor, t_perm: Tensor, n_rows: int, n_cols: int,
        trans_w: bool, backend: str = "auto", conv: Optional[list[int]] = None,
        bias: Optional[Tensor] = None, relu: bool = False,
        relu_mask: Optional[Tensor] = None) -> Tensor:
    """Dense x block-sparse. W is [n_rows, n_cols] with blocks values [nnz, bm, bk].

    trans_w=True:  a [B, n_cols] -> a @ W^T [B, n_rows]
    trans_w=False: a [B, n_rows] -> a @ W   [B, n_cols]
    With conv (implicit GEMM), NHWC rows: trans_w=True: x [N*H*W, C] -> y [N*P*Q, n_rows];
    trans_w=False: dy [N*P*Q, n_rows] -> dx [N*H*W, C]. NCHW: x [N, C, H, W] -> y
    [N, n_rows, P, Q]; dy [N, n_rows, P, Q] -> dx [N, C, H, W].
    bias [n_rows] (trans_w=True only) is added to every output row / pixel, fused into the
    kernel's store where the backend can.
    A fused ReLU: relu=True (trans_w=True) returns max(a @ W^T + bias, 0); relu_mask
    (trans_w=False, a's shape) computes (a * [relu_mask > 0]) @ W, the backward of that ReLU
    given its output. Backends that cannot fuse them get the plain product and a pass of ATen.
    """
    return _dds_impl(a, values, row_offsets, col_idx, row_idx, t_offsets, t_rows, t_perm, n_rows,
                     n_cols, trans_w, backend, conv, bias, relu, relu_mask)


@dds.register_fake
def _dds_fake(a, values, row_offsets, col_idx, row_idx, t_offsets, t_rows, t_perm, n_rows, n_cols,
              trans_w, backend="auto", conv=None, bias=None, relu=False, relu_mask=None):
    out = a.new_empty(dds_out_shape(a, n_rows, n_cols, trans_w, conv))
    if conv and is_channels_last(a):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _sdd_impl(a: Tensor, b: Tensor, row_offsets: Tensor, col_idx: Tensor, row_idx: Tensor,
              t_offsets: Tensor, t_rows: Tensor, t_perm: Tensor, bm: int, bk: int,
              backend: str = "auto", conv: Optional[list[int]] = None) -> Tensor:
    topo = (row_offsets, col_idx, row_idx, t_offsets, t_rows, t_perm)
    if not a.is_floating_point():
        raise TypeError(f"sdd operands must be floating point, got {a.dtype}")
    if conv:
        N, H, W, C, R, S, *_, P, Q = conv
        if a.dim() not in (2, 4) or b.dim() != a.dim():
            raise ValueError(f"conv sdd operands must be both NHWC rows (2-D) or both NCHW "
                             f"(4-D), got shapes {tuple(a.shape)} and {tuple(b.shape)}")
        if a.dim() == 4 and is_channels_last(a) != is_channels_last(b):  # one layout for both
            if is_vmap_batched(b):  # (vmap cannot lay b out channels_last: both NCHW)
                a = a.contiguous()
            b = b.contiguous(memory_format=torch.channels_last if is_channels_last(a)
                             else torch.contiguous_format)
        _check_topology(topo, col_idx.shape[0], a.shape[1], R * S * C, bm, bk, a.device)
        _check_conv(conv, R * S * C, bk)
        _check_conv_activation(a, "conv sdd left operand (grad output)", N, a.shape[1], P, Q,
                               a.dtype, a.device, "itself")
        _check_conv_activation(b, "conv sdd right operand (input)", N, C, H, W, a.dtype, a.device,
                               "the left operand")
    else:
        for t, name in ((a, "left"), (b, "right")):
            if t.dim() != 2:
                raise ValueError(f"sdd {name} operand must be 2-D, got shape {tuple(t.shape)}")
        _check_dense(b, "sdd right operand", b.shape[1], a.dtype, a.device, "the left operand")
        _check_topology(topo, col_idx.shape[0], a.shape[1], b.shape[1], bm, bk, a.device)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"sdd operands have batch {a.shape[0]} and {b.shape[0]}")
    if conv and is_channels_last(a):  # run on the rows they hold, no copy
        a, b = _rows_view(a), _rows_view(b)
    impl = backends.select("sdd", backend, a, a.dtype, True, bool(conv), (bm, bk))
    if conv and a.dim() == 4 and not impl.nchw:
        return impl.sdd(nchw_to_rows(a), nchw_to_rows(b), topo, bm, bk, conv)
    return impl.sdd(a, b, topo, bm, bk, conv or None)


@torch.library.custom_op("sparsekern::sdd", mutates_args=())
def sdd(a: Tensor, b: Tensor, row_offsets: Tensor, col_idx: Tensor, row_idx: Tensor,
        t_offsets: Tensor, t_rows: Tensor, t_perm: Tensor, bm: int, bk: int,
        backend: str = "auto", conv: Optional[list[int]] = None) -> Tensor:
    """Sampled dense x dense: the stored blocks of a^T @ b on the given topology.

    a [B, Mp], b [B, Kp] -> [nnz, bm, bk] with block p = a[:, rows of p]^T @ b[:, cols of p].
    With conv: a = dy [N*P*Q, Mp], b = x [N*H*W, C] (or NCHW: dy [N, Mp, P, Q], x [N, C, H, W]),
    and b's columns are the implicit im2col.
    """
    return _sdd_impl(a, b, row_offsets, col_idx, row_idx, t_offsets, t_rows, t_perm, bm, bk,
                     backend, conv)


@sdd.register_fake
def _sdd_fake(a, b, row_offsets, col_idx, row_idx, t_offsets, t_rows, t_perm, bm, bk,
              backend="auto", conv=None):
    return a.new_empty(col_idx.shape[0], bm, bk)


# ---- autograd, once, over the primitives ---------------------------------------------------------
def _dds_saved(inputs, output) -> tuple:
    """What dds's backward and jvp read: a, values, the topology, and a fused ReLU's output or a
    masked product's mask."""
    a, values, *topo, n_rows, n_cols, trans_w, backend, conv, bias, relu, relu_mask = inputs
    extra = (output,) if relu else (relu_mask,) if relu_mask is not None else ()
    return (a, values, *topo, *extra)


def _dds_unsaved(ctx) -> tuple:
    """_dds_saved back from ctx: (a, values, topology list, the ReLU output or mask or None)."""
    a, values, *topo = ctx.saved_tensors
    extra = topo.pop() if (ctx.relu or ctx.masked) else None
    return a, values, topo, extra


def _dds_setup_context(ctx, inputs, output):
    a, values, *topo, n_rows, n_cols, trans_w, backend, conv, bias, relu, relu_mask = inputs
    ctx.save_for_backward(*_dds_saved(inputs, output))
    ctx.conv = conv
    ctx.relu, ctx.masked = bool(relu), relu_mask is not None
    # Pin the backend the forward ran under, so a backward outside a `backend(...)` scope matches.
    # (Under torch.compile this runs at trace time; functional.py resolves the scope earlier,
    # where dynamo guards on it.)
    ctx.meta = (n_rows, n_cols, trans_w, backends.resolve_name(backend))


def _dds_backward(ctx, grad):
    a, values, topo, extra = _dds_unsaved(ctx)
    n_rows, n_cols, trans_w, backend = ctx.meta
    n_inputs = len(ctx.needs_input_grad)
    want_a, want_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    want_bias = n_inputs > 13 and ctx.needs_input_grad[13]
    grad_a = grad_values = grad_bias = None
    mask = None  # ReLU output whose backward the next dds folds into its read of grad
    if ctx.relu:
        if want_values or want_bias:  # they need grad through the ReLU anyway: one pass
            grad = torch.ops.aten.threshold_backward(grad, extra, 0)
        else:  # input grad only (an attack step): folded into the kernel's copy of grad
            mask = extra
    if ctx.masked:  # forward was (a * [extra > 0]) @ W
        a = torch.ops.aten.threshold_backward(a, extra, 0)
    bm, bk = values.shape[1], values.shape[2]
    if want_a:
        name = backends.select_for_backward(backend, "dds", grad, values.dtype, not trans_w,
                                            bool(ctx.conv), (bm, bk))
        grad_a = dds_call(grad, values, *topo, n_rows, n_cols, not trans_w, name, ctx.conv,
                          None, False, mask)
        if ctx.masked:
            grad_a = torch.ops.aten.threshold_backward(grad_a, extra, 0)
    if want_values:
        left, right = (grad, a) if trans_w else (a, grad)
        name = backends.select_for_backward(backend, "sdd", left, left.dtype, True,
                                            bool(ctx.conv), (bm, bk))
        grad_values = sdd_call(left, right, *topo, bm, bk, name, ctx.conv)
    # bias: summed over rows, or over images and pixels (NCHW). (Callers that leave the bias
    # out may get input flags fewer.)
    if want_bias:
        grad_bias = grad.sum((0, 2, 3)) if grad.dim() == 4 else grad.sum(0)
    return ((grad_a, grad_values) + (None,) * 11 + (grad_bias, None, None))[:n_inputs]


def _sdd_saved(inputs, output) -> tuple:
    return tuple(inputs[:8])  # a, b and the topology


def _sdd_setup_context(ctx, inputs, output):
    a, b, *topo, bm, bk, backend, conv = inputs
    ctx.save_for_backward(*_sdd_saved(inputs, output))
    ctx.meta = (bm, bk, backends.resolve_name(backend))
    ctx.conv = conv


def _sdd_backward(ctx, grad):
    # out = S(a^T b)  =>  da = b @ G^T = dds(b, G, trans_w=True), db = a @ G = dds(a, G, False)
    a, b, *topo = ctx.saved_tensors
    bm, bk, backend = ctx.meta
    conv = ctx.conv
    n_rows = a.shape[1]
    n_cols = conv[4] * conv[5] * conv[3] if conv else b.shape[1]  # R*S*C for conv
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        name = backends.select_for_backward(backend, "dds", b, grad.dtype, True, bool(conv),
                                            (bm, bk))
        grad_a = dds_call(b, grad, *topo, n_rows, n_cols, True, name, conv)
    if ctx.needs_input_grad[1]:
        name = backends.select_for_backward(backend, "dds", a, grad.dtype, False, bool(conv),
                                            (bm, bk))
        grad_b = dds_call(a, grad, *topo, n_rows, n_cols, False, name, conv)
    return (grad_a, grad_b) + (None,) * 10


dds.register_autograd(_dds_backward, setup_context=_dds_setup_context)
sdd.register_autograd(_sdd_backward, setup_context=_sdd_setup_context)


# ---- forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) ------------------------
def _dds_jvp(ctx, t_a, t_values, *tangents):
    """The tangent of dds: products of each input's tangent with the other operand (the mask of
    a masked product applies to both; a fused ReLU passes the tangent where its output is
    positive), plus the bias's tangent."""
    a, values, topo, extra = _dds_unsaved(ctx)
    n_rows, n_cols, trans_w, backend = ctx.meta
    mask = extra if ctx.masked else None
    t_bias = tangents[11]  # input 13
    terms = [dds_call(t, v, *topo, n_rows, n_cols, trans_w, backend, ctx.conv, None, False, mask)
             for t, v in ((t_a, values), (a, t_values)) if v is not None and t is not None]
    out = terms[0] if terms else a.new_zeros(dds_out_shape(a, n_rows, n_cols, trans_w, ctx.conv))
    for term in terms[1:]:
        out = out + term
    if t_bias is not None:
        out = out + (t_bias.view(1, -1, 1, 1) if out.dim() == 4 else t_bias)
    if ctx.relu:
        out = torch.ops.aten.threshold_backward(out, extra, 0)
    return out


def _sdd_jvp(ctx, t_a, t_b, *tangents):
    """The tangent of sdd: sdd(t_a, b) + sdd(a, t_b) on the same blocks."""
    a, b, *topo = ctx.saved_tensors
    bm, bk, backend = ctx.meta
    terms = [sdd_call(left, right, *topo, bm, bk, backend, ctx.conv)
             for left, right in ((t_a, b), (a, t_b)) if left is not None and right is not None]
    if not terms:
        return a.new_zeros(topo[1].shape[0], bm, bk)
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


# ---- eager fast path ------------------------------------------------------------------------------
# The custom ops' dispatch (schema defaults, dynamo-disable wrappers, autograd redispatch) costs
# ~100 us of host time per call, more than the kernels of a small layer take. Eager callers
# (functional.py, the backward above) go through autograd.Functions that run the same checks,
# backends and backward formulas directly; under torch.compile, export or functorch transforms
# they use the registered ops, which those systems understand.
def _eager_function(name: str, impl, setup_context, backward) -> type:
    """An autograd.Function running `impl` with the op's own setup_context and backward.
    forward(ctx, ...) rather than a separate setup_context: apply() is ~5x cheaper (measured)."""
    def forward(ctx, *args):
        out = impl(*args)
        setup_context(ctx, args, out)
        return out

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


_DdsFunction = _eager_function("_DdsFunction", _dds_impl, _dds_setup_context, _dds_backward)
_SddFunction = _eager_function("_SddFunction", _sdd_impl, _sdd_setup_context, _sdd_backward)


_DDS_ARGS, _CONV, _BIAS, _RELU_MASK = 16, 12, 13, 15  # dds's argument count and positions
_SDD_CONV = 11  # sdd's conv argument
_INDEX_MAX = 2**31 - 1  # the largest int32 index (INDEX_DTYPE)


def _vmap_rule(call, batch_size: int, in_dims: tuple, args: tuple) -> tuple[Tensor, int]:
    """(call's output batched at dim 0, 0) over `batch_size` samples of args batched at in_dims
    (None: shared), for vmap, in one call where it can:
    - dds with only a (and relu_mask) batched, as in per-sample gradients or Jacobians over x:
      the samples stacked along a's rows (conv: its images; `_stacked`);
    - dds with batched weights (ensembles, Jacobians over W) and sdd (the weight gradients of
      per-sample gradients): the samples side by side along the features (conv: channels), on
      V copies of the topology (`_side_by_side`);
    - otherwise (a backend that computes the dense matrix, arguments one sample's call would
      refuse, ...) one call per sample, what PyTorch does for an op without a batching rule."""
    def sample(pick):  # the arguments of one sample: pick(tensor, its batch dim)
        return [pick(a, d) if isinstance(a, Tensor) and d is not None else a
                for a, d in zip(args, in_dims)]
    if batch_size == 0:  # no sample: one of zeros gives the output's shape
        out = call(*sample(lambda a, d: a.new_zeros(a.shape[:d] + a.shape[d + 1:])))
        return out.new_empty((0, *out.shape)), 0
    plan = (_stacked if _stackable(args, in_dims) else _side_by_side)(batch_size, in_dims, args)
    if plan is None:
        return torch.stack([call(*sample(lambda a, d: a.select(d, i)))
                            for i in range(batch_size)]), 0
    together, unfold = plan
    try:
        return unfold(call(*together)), 0
    except (ValueError, TypeError):  # say it of one sample's shapes, not the joined ones
        call(*sample(lambda a, d: a.select(d, 0)))
        raise


def _unbatched(d) -> bool:
    """An in_dims entry of a shared argument (a list argument's, conv's, is a list of Nones)."""
    return d is None or isinstance(d, (list, tuple)) and all(map(_unbatched, d))


def _sample_shape(args: tuple, in_dims: tuple, i: int) -> tuple:
    """Argument i's shape in one sample."""
    shape, d = args[i].shape, in_dims[i]
    return shape if d is None else shape[:d] + shape[d + 1:]


def _stackable(args: tuple, in_dims: tuple) -> bool:
    """A dds whose samples differ in a and relu_mask alone, each sample's a at least 2-D and
    the mask (if any) of its shape: else the checks of one sample's call say what is wrong."""
    if len(args) != _DDS_ARGS or not all(_unbatched(d) for i, d in enumerate(in_dims)
                                         if i not in (0, _RELU_MASK)):
        return False
    one = _sample_shape(args, in_dims, 0)
    return len(one) >= 2 and (args[_RELU_MASK] is None
                              or _sample_shape(args, in_dims, _RELU_MASK) == one)


def _stacked(batch_size: int, in_dims: tuple, args: tuple):
    """(arguments of one call, its output -> [samples, ...]) for a `_stackable` dds: the
    samples' a (and relu_mask) stacked along the rows, [samples * rows, ...]; conv's images
    N -> samples * N."""
    stacked = list(args)
    for i in (0, _RELU_MASK):
        t, d = args[i], in_dims[i]
        if t is not None:
            t = t.movedim(d, 0) if d is not None else t.expand(batch_size, *t.shape)
            stacked[i] = t.reshape(-1, *t.shape[2:])
    if args[_CONV]:
        stacked[_CONV] = [batch_size * args[_CONV][0], *args[_CONV][1:]]
    return stacked, lambda out: out.reshape(batch_size, out.shape[0] // batch_size,
                                            *out.shape[1:])


def _side_by_side(batch_size: int, in_dims: tuple, args: tuple):
    """(arguments of one call, its output -> [samples, ...]) for V = batch_size samples of a
    linear dds or sdd laid side by side: a sample's operand [rows, width] becomes columns
    v * width.. of one [rows, V * width] operand, and W becomes V copies of its topology, copy
    v's block rows and/or columns shifted by v where its operand on that side is the sample's
    own (`_replicated_topology`). Block-diagonal where both sides are; where one is shared
    (an x for every sample's W) the copies share its columns and it is not copied. Conv lays
    the samples' channels side by side (NCHW [N, V * C, H, W], or NHWC rows [N*H*W, V * C]),
    within each filter tap on W's side. None where this does not apply: a batched topology or
    bias, arguments one sample's call would refuse (its checks then say why), a backend that
    computes the dense matrix (V copies side by side would be V^2 times one sample's), int32
    indices that would overflow."""
    dds = len(args) == _DDS_ARGS
    conv = args[_CONV if dds else _SDD_CONV] or None
    if not all(_unbatched(d) for d in in_dims[2:8]) or (dds and not _unbatched(in_dims[_BIAS])) \
            or not _unbatched(in_dims[_CONV if dds else _SDD_CONV]):
        return None
    topo = args[2:8]
    row_offsets, col_idx, row_idx, t_offsets, t_rows, t_perm = topo
    nnz = col_idx.shape[0]
    n_br, n_bc = row_offsets.shape[0] - 1, t_offsets.shape[0] - 1  # the topology's grid
    if any(t.dtype != INDEX_DTYPE or t.dim() != 1 for t in topo) or any(
            t.shape[0] != nnz for t in (row_idx, t_rows, t_perm)) \
            or batch_size * max(nnz, n_br + 1, n_bc + 1) > _INDEX_MAX:
        return None

    def one_shape(i):
        return _sample_shape(args, in_dims, i)

    def apart(i):  # argument i [V, rows, width] -> [rows, V * width] (a shared one repeated);
        # conv's NCHW [V, N, C, H, W] -> [N, V * C, H, W]
        t, d = args[i], in_dims[i]
        t = t.movedim(d, 0) if d is not None else t.expand(batch_size, *t.shape)
        # contiguous: a shared width-1 operand would keep the expanded stride 0
        return t.movedim(0, 1).reshape(t.shape[1], batch_size * t.shape[2],
                                       *t.shape[3:]).contiguous()

    def unfold(out, width):  # [rows, V * width, ...] -> [V, rows, width, ...]
        return out.reshape(out.shape[0], batch_size, width, *out.shape[2:]).movedim(1, 0)

    # conv: the copies' channels side by side within each filter tap; C -> V * C where the
    # input side is apart
    taps, C = (conv[4] * conv[5], conv[3]) if conv else (1, None)
    if conv and (len(conv) != len(CONV_FIELDS) or n_bc % taps):
        return None

    def geometry(cols_apart):
        if not conv or not cols_apart:
            return conv
        return [*conv[:3], batch_size * C, *conv[4:]]

    if dds:
        a, values, *_, n_rows, n_cols, trans_w, backend, _, bias, relu, mask = args
        a_own = in_dims[0] is not None or mask is not None  # a mask is read alongside a
        sample_a, sample_values = one_shape(0), one_shape(1)
        if len(sample_values) != 3 or len(sample_a) != (4 if conv and len(sample_a) == 4
                                                          else 2) or sample_values[0] != nnz \
                or (mask is not None and one_shape(_RELU_MASK) != sample_a):
            return None
        bm, bk = sample_values[1:]
        if (n_rows, n_cols) != (n_br * bm, n_bc * bk) or (conv and C % bk) or \
                _computes_dense("dds", backend, a, values.dtype, trans_w, (bm, bk), conv):
            return None
        # the output's side always apart; a's side apart where a is each sample's own
        rows_apart, cols_apart = (True, a_own) if trans_w else (a_own, True)
        topo, order = _replicated_topology(row_idx, col_idx, n_br, n_bc, batch_size,
                                           rows_apart, cols_apart, taps)
        vs = values.movedim(in_dims[1], 0) if in_dims[1] is not None else \
            values.expand(batch_size, *values.shape)
        # the output's width: W's rows, or its columns (conv: the input's channels)
        width = n_rows if trans_w else (C if conv else n_cols)
        call = (apart(0) if a_own else a, vs.reshape(batch_size * nnz, bm, bk)[order], *topo,
                n_rows * (batch_size if rows_apart else 1),
                n_cols * (batch_size if cols_apart else 1), trans_w, backend,
                geometry(cols_apart), None if bias is None else bias.repeat(batch_size), relu,
                None if mask is None else apart(_RELU_MASK))
        return call, lambda out: unfold(out, width)
    a, b, *_, bm, bk, backend, _ = args
    a_own, b_own = in_dims[0] is not None, in_dims[1] is not None
    sample_a, sample_b = one_shape(0), one_shape(1)
    dims = 4 if conv and len(sample_a) == 4 else 2
    if len(sample_a) != dims or len(sample_b) != dims or (
            (sample_a[1], sample_b[1]) != ((n_br * bm, C) if conv else (n_br * bm, n_bc * bk))
            or (not conv and sample_a[0] != sample_b[0]) or (conv and C % bk)
            or _computes_dense("sdd", backend, a, a.dtype, True, (bm, bk), conv)):
        return None
    topo, order = _replicated_topology(row_idx, col_idx, n_br, n_bc, batch_size, a_own, b_own,
                                       taps)
    call = (apart(0) if a_own else a, apart(1) if b_own else b, *topo, bm, bk, backend,
            geometry(b_own))
    if a_own:  # each copy its own block rows: the blocks are in copy order already
        return call, lambda out: out.reshape(batch_size, nnz, bm, bk)
    unordered = torch.argsort(order)  # the copies' blocks back in copy order
    return call, lambda out: out[unordered].reshape(batch_size, nnz, bm, bk)


def _computes_dense(op: str, backend: str, a: Tensor, dtype: torch.dtype, trans_w: bool,
                    block: tuple, conv=None) -> bool:
    """True where the backend that would run the call materializes the dense matrix (or
    refuses it: one sample's call then says why)."""
    try:
        return backends.select(op, backend, a, dtype, trans_w, bool(conv),
                               block).computes_dense
    except (RuntimeError, ValueError):
        return True


def _replicated_topology(row_idx: Tensor, col_idx: Tensor, n_br: int, n_bc: int, copies: int,
                         rows_apart: bool, cols_apart: bool, taps: int = 1
                         ) -> tuple[tuple, Tensor]:
    """(the 6 topology tensors, order) of `copies` copies of a topology of n_br x n_bc blocks,
    copy v shifted by v * n_br block rows (rows_apart) and / or, within each of the `taps`
    filter taps (conv's block columns: tap * (C / bk) + channel block; linear: one tap), by
    v * n_bc / taps block columns (cols_apart: the copies' channels side by side); order[k]:
    the copy-major index (v * nnz + p) of the k-th block in the result's block-row order
    (copies sharing block rows interleave in them)."""
    nnz = row_idx.shape[0]
    copy = torch.arange(copies, device=row_idx.device).repeat_interleave(nnz)
    rows = row_idx.long().repeat(copies) + (copy * n_br if rows_apart else 0)
    cols = col_idx.long().repeat(copies)
    if cols_apart:
        per_tap = n_bc // taps
        cols = cols + (cols // per_tap * (copies - 1) + copy) * per_tap
    n_br, n_bc = n_br * (copies if rows_apart else 1), n_bc * (copies if cols_apart else 1)
    order = (torch.arange(copies * nnz, device=row_idx.device) if rows_apart else
             torch.argsort(rows * n_bc + cols, stable=True))
    rows, cols = rows[order], cols[order]
    row_offsets = torch.zeros(n_br + 1, dtype=torch.long, device=row_idx.device)
    row_offsets[1:] = torch.cumsum(torch.bincount(rows, minlength=n_br), 0)
    topo = (row_offsets.to(INDEX_DTYPE), cols.to(INDEX_DTYPE), rows.to(INDEX_DTYPE),
            *transpose_metadata(rows, cols, n_bc))
    return topo, order


def _transform_function(name: str, impl, saved, setup_context, backward, jvp) -> type:
    """The same for torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, vmap and their
    compositions) and forward-mode AD: the registered ops' autograd (register_autograd) cannot
    run under the grad transforms (pytorch#179652), and under jvp it dropped the tangent.
    setup_context apart from forward, as the transforms need; a jvp; vmap by `_vmap_rule`."""
    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.save_for_forward(*saved(inputs, output))

    def vmap(info, in_dims, *args):
        return _vmap_rule(function.apply, info.batch_size, in_dims, args)

    function = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(lambda *args: impl(*args)), "setup_context": staticmethod(setup),
        "backward": staticmethod(backward), "jvp": staticmethod(jvp),
        "vmap": staticmethod(vmap)})
    return function


_DdsTransformFunction = _transform_function("_DdsTransformFunction", _dds_impl, _dds_saved,
                                            _dds_setup_context, _dds_backward, _dds_jvp)
_SddTransformFunction = _transform_function("_SddTransformFunction", _sdd_impl, _sdd_saved,
                                            _sdd_setup_context, _sdd_backward, _sdd_jvp)


def _register_vmap(op, impl) -> None:
    """The registered op's batching rule (vmap where the registered ops run, as under
    functionalize, and of torch.ops.sparsekern.* called directly): `_vmap_rule` over its
    arguments in order, keyword ones (never batched) and defaults included."""
    params = list(inspect.signature(impl).parameters.values())

    def rule(info, in_dims, *args, **kwargs):
        rest = [kwargs.get(p.name, p.default) for p in params[len(args):]]
        return _vmap_rule(op, info.batch_size, (*in_dims, *[None] * len(rest)), (*args, *rest))
    op.register_vmap(rule)


_register_vmap(dds, _dds_impl)
_register_vmap(sdd, _sdd_impl)


def _use_registered_ops(a: Tensor) -> bool:
    """True when a tracer may be watching: torch.compile, functorch transforms, a Python dispatch
    mode (make_fx, FakeTensorMode), or a tensor subclass operand. The last two catch AOT
    autograd tracing the backward (FunctionalTensor around FakeTensor), where torch 2.11 reports
    is_compiling() False and the fast path would hand a fake tensor to a kernel launcher."""
    return (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or _get_current_dispatch_mode() is not None
            or type(a) not in (Tensor, torch.nn.Parameter))


def _under_transform() -> bool:
    """True in eager mode with a torch.func grad, jvp or vmap transform innermost: the products
    go through the autograd.Functions above. Not under functionalize at any depth (functorch
    has no functionalize rule for an autograd.Function: the registered ops stay)."""
    stack = _transforms()
    return (bool(stack) and stack[-1] in _TRANSFORMS and _FUNCTIONALIZE not in stack
            and _get_current_dispatch_mode() is None)


_FUNCTIONALIZE = torch._C._functorch.TransformType.Functionalize
_TRANSFORMS = tuple(getattr(torch._C._functorch.TransformType, name)
                    for name in ("Grad", "Jvp", "Vmap"))


def _check_no_tangent() -> None:
    """The registered ops have no forward-mode AD rule (torch.library has none to register):
    refuse a forward-AD level or a jvp transform there (under torch.compile, a dispatch mode,
    functionalize) rather than drop the tangent, as they did, silently, with a zero."""
    if forward_ad._current_level >= 0 or _JVP in _transforms():
        raise NotImplementedError(
            "forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) through "
            "sparsekern's products runs in eager mode only, not under torch.compile, a "
            "dispatch mode, functionalize or with a tensor subclass operand")


_JVP = torch._C._functorch.TransformType.Jvp


def _call(args: tuple, registered, transform, eager, impl) -> Tensor:
    """The route of an eager product call (dds_call / sdd_call): the registered op where a tracer
    may watch, the transform Function under torch.func or forward-mode AD, the classic Function
    while grad mode records, else the implementation alone."""
    if _use_registered_ops(args[0]):
        if _under_transform():
            return transform.apply(*args)
        _check_no_tangent()
        return registered(*args)
    if forward_ad._current_level >= 0:  # forward-mode AD may be on (it ignores grad mode)
        return transform.apply(*args)
    return eager.apply(*args) if torch.is_grad_enabled() else impl(*args)


def dds_call(a, values, row_offsets, col_idx, row_idx, t_offsets, t_rows, t_perm, n_rows, n_cols,
             trans_w, backend="auto", conv=None, bias=None, relu=False, relu_mask=None) -> Tensor:
    """ops.dds with the same arguments and result; the fast path in eager mode."""
    return _call((a, values, row_offsets, col_idx, row_idx, t_offsets, t_rows, t_perm, n_rows,
                  n_cols, trans_w, backend, conv, bias, relu, relu_mask),
                 dds, _DdsTransformFunction, _DdsFunction, _dds_impl)


def sdd_call(a, b, row_offsets, col_idx, row_idx, t_offsets, t_rows, t_perm, bm, bk,
             backend="auto", conv=None) -> Tensor:
    """ops.sdd with the same arguments and result; the fast path in eager mode."""
    return _call((a, b, row_offsets, col_idx, row_idx, t_offsets, t_rows, t_perm, bm, bk,
                  backend, conv), sdd, _SddTransformFunction, _SddFunction, _sdd_impl)
