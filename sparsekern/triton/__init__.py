"""Backend "triton": the dds/sdd kernels of sparsekern/triton/kernels.py, for Linear and Conv2d.

"auto" prefers it for CUDA tensors when triton is importable. Under TRITON_INTERPRET=1 it also
takes CPU tensors (the interpreter; tiny shapes, used by the tests), but only when asked for by
name. Block dimensions must be powers of two from 16 to 128 (tl.dot tiles); other shapes are
refused with the reason, so "auto" moves on to another backend.

Float32 products use TF32 by default; ``set_float32_precision("ieee")`` asks for full float32.
Triton itself is imported on first use, so ``import sparsekern`` stays light.
"""
from __future__ import annotations

import importlib
import os
import sys

import torch

from sparsekern import backends

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BLOCK_DIMS = (16, 32, 64, 128)
_PRECISIONS = ("tf32", "ieee")
_float32_precision = "tf32"


def set_float32_precision(mode: str) -> None:
    """"tf32" (default: tensor cores, ~1e-3 relative error) or "ieee" (full float32)."""
    global _float32_precision
    if mode not in _PRECISIONS:
        raise ValueError(f"float32 precision must be one of {_PRECISIONS}, got {mode!r}")
    _float32_precision = mode


def float32_precision() -> str:
    return _float32_precision


_ops_module = None
_import_error: Exception | None = None
_interpreted: bool | None = None  # whether the kernels were compiled for the interpreter
_TRUE = ("1", "true", "on", "yes", "y")


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: kernels run on CPU tensors through numpy. Once the kernels
    are imported, whether they were compiled for the interpreter (Triton reads the variable
    then, and a later change does not recompile them); before, what Triton will read."""
    global _interpreted
    if _interpreted is None:
        kernels = sys.modules.get("sparsekern.triton.kernels")
        if getattr(kernels, "sdd_kernel", None) is None:
            return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE
        _interpreted = type(kernels.sdd_kernel).__name__ == "InterpretedFunction"
    return _interpreted


def _ops():
    """sparsekern.triton.ops (imports triton and registers the triton_ops), or None."""
    global _ops_module, _import_error
    if _ops_module is None and _import_error is None:
        try:
            _ops_module = importlib.import_module("sparsekern.triton.ops")
        except ImportError as err:
            _import_error = err
    return _ops_module


class TritonBackend(backends.Backend):
    name = "triton"
    auto_devices = ("cuda",)
    fused_bias = True  # dds_nt's epilogue
    fused_relu = True  # dds_nt's epilogue, dds_nn's loads

    def refuse(self, op, a, dtype, trans_w, conv, block=None):
        if a.device.type == "cpu" and not interpreting():
            return "runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        if a.device.type not in ("cuda", "cpu"):
            return f"runs on CUDA tensors, got {a.device}"
        if dtype not in DTYPES:
            return f"supports float16, bfloat16, float32 and float64, got {dtype}"
        if block is not None and not all(d in BLOCK_DIMS for d in block):
            return (f"block shape {tuple(block)}: its kernels need each block dimension in "
                    f"{BLOCK_DIMS} (tl.dot tiles)")
        if _ops() is None:
            return f"triton is not importable ({_import_error})"
        return None

    # Eager calls the launchers directly (the op dispatch costs more host time than a small
    # kernel); traced code goes through the triton_ops, which torch.compile understands.
    def dds(self, a, values, topo, n_rows, n_cols, trans_w, conv=None, bias=None, relu=False,
            relu_mask=None):
        row_offsets, col_idx, _, t_offsets, t_rows, t_perm = topo
        fn = torch.ops.sparsekern.triton_dds if torch.compiler.is_compiling() else _ops().dds
        return fn(a, values, row_offsets, col_idx, t_offsets, t_rows, t_perm, n_rows, n_cols,
                  trans_w, _float32_precision, conv, bias, relu, relu_mask)

    def sdd(self, a, b, topo, bm, bk, conv=None):
        row_offsets, col_idx, row_idx, _, _, _ = topo
        fn = torch.ops.sparsekern.triton_sdd if torch.compiler.is_compiling() else _ops().sdd
        return fn(a, b, row_offsets, row_idx, col_idx, bm, bk, _float32_precision, conv)


backends.register_backend(TritonBackend(), before="cuda")
