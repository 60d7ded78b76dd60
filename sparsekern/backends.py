"""Backend choice: who runs a dds/sdd call.

Each backend states what it supports and, when it cannot take a call, why (``refuse`` returns a
reason or None). ``"auto"`` takes the first backend in ``AUTO_ORDER`` that accepts the call; when
none does the error lists every reason. A backend is forced per call (``backend=`` on the
functional API / ops) or per scope::

    with sparsekern.backend("reference"):
        y = layer(x)            # forward and the matching backward both use "reference"
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor

from sparsekern import reference

NATIVE_DTYPES = (torch.float32, torch.float64)


def _native():
    """The compiled extension, or None (import error kept for the message)."""
    from sparsekern import ops

    return ops.native_extension()


class Backend:
    name = ""
    auto_devices: tuple[str, ...] | None = None  # device types "auto" may pick it for (None: all)
    nchw = False  # conv on NCHW activations natively; if not, ops.py hands it NHWC rows
    fused_bias = False  # dds(..., bias=) adds the bias itself; if not, ops.py adds it after
    # dds(..., relu=, relu_mask=) applies the ReLU / its backward itself; if not, ops.py does
    fused_relu = False
    computes_dense = False  # materializes W (or a^T @ b) as a dense matrix

    def refuse(self, op: str, a: Tensor, dtype: torch.dtype, trans_w: bool, conv: bool,
               block: tuple[int, int] | None = None) -> str | None:
        """None if this backend takes the call, else the reason it does not."""
        raise NotImplementedError

    def dds(self, a, values, topo, n_rows, n_cols, trans_w, conv=None):  # pragma: no cover
        """(With fused_bias, also a keyword `bias`; with fused_relu, `relu` and `relu_mask`.)"""
        raise NotImplementedError

    def sdd(self, a, b, topo, bm, bk, conv=None):  # pragma: no cover - interface
        raise NotImplementedError


class NativeCPU(Backend):
    """C++ kernels in csrc/cpu: CPU tensors, float32/float64, every block shape."""

    name = "cpu"
    nchw = True
    fused_bias = True
    fused_relu = True

    def refuse(self, op, a, dtype, trans_w, conv, block=None):
        if _native() is None:
            return "the compiled extension sparsekern._C is not available"
        if a.device.type != "cpu":
            return f"runs on CPU tensors only, got {a.device}"
        if dtype not in NATIVE_DTYPES:
            return f"supports float32 and float64, got {dtype}"
        return None

    def dds(self, a, values, topo, n_rows, n_cols, trans_w, conv=None, bias=None, relu=False,
            relu_mask=None):
        row_offsets, col_idx, _, t_offsets, t_rows, t_perm = topo
        return torch.ops.sparsekern._dds_native(a, values, row_offsets, col_idx, t_offsets, t_rows,
                                                t_perm, n_rows, n_cols, trans_w, conv, bias, relu,
                                                relu_mask)

    def sdd(self, a, b, topo, bm, bk, conv=None):
        _, col_idx, row_idx, _, _, _ = topo
        return torch.ops.sparsekern._sdd_native(a, b, row_idx, col_idx, bm, bk, conv)


class NativeCUDA(NativeCPU):
    """CUDA C++ kernels in csrc/cuda: so far only the forward product x @ W^T."""

    name = "cuda"
    nchw = False
    fused_bias = False
    fused_relu = False

    def refuse(self, op, a, dtype, trans_w, conv, block=None):
        ext = _native()
        if ext is None:
            return "the compiled extension sparsekern._C is not available"
        if not ext.cuda_compiled:
            return "sparsekern._C was built without CUDA"
        if a.device.type != "cuda":
            return f"runs on CUDA tensors only, got {a.device}"
        if dtype not in NATIVE_DTYPES:
            return f"supports float32 and float64, got {dtype}"
        if op != "dds" or not trans_w or conv:
            return "implements only the linear dds with trans_w=True (x @ W^T) so far"
        return None


class Reference(Backend):
    """Pure PyTorch (reference.py): any device and dtype; materializes the dense matrix."""

    name = "reference"
    computes_dense = True

    def refuse(self, op, a, dtype, trans_w, conv, block=None):
        return None

    def dds(self, a, values, topo, n_rows, n_cols, trans_w, conv=None):
        _, col_idx, row_idx, _, _, _ = topo
        if conv:
            return reference.dds_conv(a, values, row_idx, col_idx, n_rows, n_cols, trans_w, conv)
        return reference.dds(a, values, row_idx, col_idx, n_rows, n_cols, trans_w)

    def sdd(self, a, b, topo, bm, bk, conv=None):
        _, col_idx, row_idx, _, _, _ = topo
        if conv:
            return reference.sdd_conv(a, b, row_idx, col_idx, bm, bk, conv)
        return reference.sdd(a, b, row_idx, col_idx, bm, bk)


BACKENDS: dict[str, Backend] = {b.name: b for b in (NativeCUDA(), NativeCPU(), Reference())}
AUTO_ORDER = ("cuda", "cpu", "reference")
_scope: list[str] = []


def register_backend(backend: Backend, before: str | None = None) -> None:
    """Adds a backend (e.g. triton) to the registry and to "auto", before `before` if given."""
    global AUTO_ORDER
    BACKENDS[backend.name] = backend
    order = [n for n in AUTO_ORDER if n != backend.name]
    order.insert(order.index(before) if before in order else len(order), backend.name)
    AUTO_ORDER = tuple(order)


def _check_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown sparsekern backend {name!r}; choose 'auto' or one of "
                         f"{sorted(BACKENDS)}")
    return name


@contextlib.contextmanager
def backend(name: str):
    """Forces backend `name` ("auto", "cpu", "cuda", "reference", ...) inside the block."""
    _scope.append(_check_name(name))
    try:
        yield
    finally:
        _scope.pop()


def resolve_name(requested: str) -> str:
    """An explicit per-call name wins; "auto" defers to the innermost `backend(...)` scope."""
    _check_name(requested)
    if requested == "auto" and _scope:
        return _scope[-1]
    return requested


_warned_fallback = False


def select(op: str, requested: str, a: Tensor, dtype: torch.dtype, trans_w: bool = True,
           conv: bool = False, block: tuple[int, int] | None = None) -> Backend:
    name = resolve_name(requested)
    if name != "auto":
        reason = BACKENDS[name].refuse(op, a, dtype, trans_w, conv, block)
        if reason is not None:
            raise RuntimeError(f"sparsekern backend {name!r} cannot run {op}: {reason}")
        return BACKENDS[name]
    return select_auto(op, a, dtype, trans_w, conv, block)


def select_for_backward(name: str, op: str, a: Tensor, dtype: torch.dtype, trans_w: bool,
                        conv: bool, block: tuple[int, int] | None) -> str:
    """The backend a backward product runs on: the one its forward ran on (`name`, already
    resolved), unless that one cannot run this product (the CUDA C++ backend has only the
    forward x @ W^T so far); then "auto"'s choice, whatever scope is active."""
    if name == "auto" or BACKENDS[name].refuse(op, a, dtype, trans_w, conv, block) is None:
        return name
    return select_auto(op, a, dtype, trans_w, conv, block).name


def autocast_dtype(requested: str, a: Tensor, low: torch.dtype, conv: bool,
                   block: tuple[int, int]) -> torch.dtype:
    """The dtype a layer computes in under torch.autocast (whose lower precision is `low`):
    `low` where the backend that runs the layer in float32 runs it in `low` too, else float32,
    as autocast runs its float32-only ops. So a forced C++ backend (float32/float64) keeps
    working, and "auto" on the CPU keeps its C++ kernels rather than moving to the reference
    backend, which would compute the dense product."""
    name = resolve_name(requested)

    def runner(dtype):
        if name != "auto":
            return name if BACKENDS[name].refuse("dds", a, dtype, True, conv, block) is None \
                else None
        try:
            return select_auto("dds", a, dtype, True, conv, block).name
        except RuntimeError:
            return None
    chosen = runner(low)
    return low if chosen is not None and chosen == runner(torch.float32) else torch.float32


def select_auto(op: str, a: Tensor, dtype: torch.dtype, trans_w: bool = True,
                conv: bool = False, block: tuple[int, int] | None = None) -> Backend:
    """The first backend of AUTO_ORDER that accepts (scopes are not consulted)."""
    global _warned_fallback
    reasons = []
    for candidate in AUTO_ORDER:
        devices = BACKENDS[candidate].auto_devices
        if devices is not None and a.device.type not in devices:
            continue  # e.g. triton on CPU tensors: the interpreter only when asked for by name
        reason = BACKENDS[candidate].refuse(op, a, dtype, trans_w, conv, block)
        if reason is None:
            if candidate == "reference" and _native() is None and not _warned_fallback:
                _warned_fallback = True
                warnings.warn("sparsekern._C is not available; falling back to the slow "
                              "pure-PyTorch reference backend", RuntimeWarning, stacklevel=3)
            return BACKENDS[candidate]
        reasons.append(f"{candidate}: {reason}")
    raise RuntimeError(f"no sparsekern backend can run {op}: " + "; ".join(reasons))
