"""Launchers for the Triton kernels, registered with torch.library.triton_op (so torch.compile
sees the kernels), and the autotuning configurations.

    torch.ops.sparsekern.triton_dds(a, values, row_offsets, col_idx, t_offsets, t_rows, t_perm,
                                    n_rows, n_cols, trans_w, precision, conv, bias, relu,
                                    relu_mask) -> Tensor
    torch.ops.sparsekern.triton_sdd(a, b, row_offsets, row_idx, col_idx, bm, bk, precision,
                                    conv) -> Tensor

Arguments are the ops.py ones, already checked there; ``precision`` is the float32 dot mode
("tf32" or "ieee"). bias and relu (trans_w=True) are applied in dds_nt's epilogue, relu_mask
(trans_w=False, a's shape) in dds_nn's loads of a.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Optional

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton
from triton.runtime.driver import driver as _driver

from sparsekern.ops import dds_out_shape
from sparsekern.triton import interpreting, kernels


def _prune(configs, named_args, **kwargs):
    """Drop candidates that cannot pay off for this shape: K_STEP where it groups one block (or
    dds_nt's conv), an fp32 accumulator of BLOCK_R x 128 with BLOCK_R = 256 (or BM x GROUP*BK
    past 128 x 128) does not fit in registers, nor some fp32 pipelines (sdd groups, dds
    prefetching two tiles ahead) in shared memory; TILES row tiles per program need that many
    tiles to share out (n_out rows), or programs would idle, and 64-wide blocks at most
    (128-wide ones spill); sdd's GROUP gathers x per column, which for conv means per-column
    source rows."""
    def arg(name, default=16):
        return kwargs.get(name, named_args.get(name, default))

    n_out = arg("n_out", None)
    a = named_args.get("a_ptr")
    elem = a.element_size() if isinstance(a, torch.Tensor) else 2

    def fits(c):
        group, tiles = c.kwargs.get("GROUP", 1), c.kwargs.get("TILES", 1)
        rows = c.kwargs["BLOCK_R"]
        bm, bk = arg("BM"), arg("BK")
        # K_STEP groups dds_nt's block columns (BK wide; per-column conv sources: linear only)
        # or dds_nn's block rows (BM): timed only where it groups more than one block
        k_step, nt = c.kwargs.get("K_STEP", 0), "TILES" in c.kwargs
        per_step = max(1, k_step // (bk if nt else bm))
        if k_step and (per_step == 1 or nt and arg("IS_CONV", False)):
            return False
        # shared memory (wgmma pipelines; measured against the compiled kernels): sdd buffers
        # num_stages tiles of dy [BLOCK_R, BM] and x [BLOCK_R, GROUP*BK]; dds 1 + ahead tiles
        # of a and of W, ahead = (num_stages - 1) // 2, or, with the ReLU mask (a and the
        # mask read into registers), ahead tiles of each and 1 + ahead of W. TILES > 1 adds
        # the epilogue's scratch (a few KB more); within the 227 KB a block may have.
        ahead = (c.num_stages - 1) // 2
        # the a tile's width and W's tile: per_step blocks side by side with K_STEP
        width = max(bm, bk) if per_step == 1 else per_step * (bk if nt else bm)
        w_tile = per_step * bm * bk
        if "GROUP" in c.kwargs:
            smem = c.num_stages * rows * (bm + group * bk) * elem
        elif arg("HAS_MASK", False):
            smem = (ahead * 2 * rows * width + (1 + ahead) * w_tile) * elem
        else:
            smem = (1 + ahead) * (rows * width + w_tile) * elem
        return (rows * max(bm, bk) <= 128 * 128 and bm * group * bk <= 128 * 128
                and smem <= 232448
                # several row tiles' accumulators and prefetched 128-wide tiles spill registers
                and (tiles == 1 or max(bm, bk) <= 64)
                # so does conv's index math beside a 128 x 128 fp32 accumulator on 4 warps (128
                # registers a thread; compiled: 255, dds_nn spilling): 8 warps only. The
                # accumulator is BLOCK_R x BM for dds_nt, BLOCK_R x BK for dds_nn.
                and not (arg("IS_CONV", False) and "GROUP" not in c.kwargs
                         and rows * (bm if nt else bk) >= 128 * 128 and c.num_warps < 8)
                and (group == 1 or not arg("IS_CONV", False))
                and (tiles == 1 or n_out is None or n_out >= 4 * tiles * c.kwargs["BLOCK_R"]))

    return [c for c in configs if fits(c)] or configs[:1]


# Autotuning candidates: (BLOCK_R, num_warps, num_stages, the kernel's variant switches). The
# TILES/SWAP variants are untimed guesses from the H100 run (short K loops, a 64-wide MMA N
# dimension; see kernels.py): the autotuner keeps whichever wins, the plain ones included.
# dds's tile loads hang off a loaded block index, and Triton's pipeliner shares num_stages out
# between the two loads (latency (num_stages - 1) // (indirection levels + 1)): tiles are
# prefetched (num_stages - 1) // 2 iterations ahead, so 3 and 4 compile to the same code (one
# ahead; 2 buffers for a wgmma loop) and 5 gives two ahead (3 buffers); read off the TTGIR by
# benchmarks/triton_codegen.py, which flags candidates that compile alike.
_PLAIN = ((64, 4, 3), (64, 4, 5), (128, 4, 3), (128, 8, 3), (128, 4, 5), (256, 8, 3))
# K_STEP=64: blocks narrower than 64 (16, 32) several to a step (kernels.py), only timed for
# them; untimed guess: 32x32 ran at ~1.8 TB/s of modelled L2 traffic on the H100, 64x64 at
# ~3.2 (traffic_model.py), so per-step costs, not bytes, held the narrow blocks back.
_NARROW = ((128, 4, 3), (128, 4, 5), (256, 8, 3))
_DDS_NT_CANDIDATES = [(r, w, s, dict(TILES=1, SWAP=False)) for r, w, s in _PLAIN] + [
    (128, 4, 3, dict(TILES=1, SWAP=True)), (256, 8, 3, dict(TILES=1, SWAP=True)),
    (128, 4, 5, dict(TILES=4, SWAP=False)), (128, 4, 5, dict(TILES=4, SWAP=True)),
    (256, 8, 5, dict(TILES=2, SWAP=True)), (64, 4, 5, dict(TILES=8, SWAP=False))] + [
    (r, w, s, dict(TILES=1, SWAP=False, K_STEP=64)) for r, w, s in _NARROW]
_DDS_NN_CANDIDATES = [(r, w, s, dict(SWAP=False)) for r, w, s in _PLAIN] + [
    (128, 4, 3, dict(SWAP=True)), (256, 8, 3, dict(SWAP=True))] + [
    (r, w, s, dict(SWAP=False, K_STEP=64)) for r, w, s in _NARROW]
# sdd's GROUP (blocks of one block row per program, one dy tile for all): untimed, as above.
_SDD_CANDIDATES = [(32, 4, 3, dict(GROUP=1)), (64, 4, 3, dict(GROUP=1)), (64, 8, 3, dict(GROUP=1)),
                   (128, 8, 3, dict(GROUP=1)), (64, 8, 3, dict(GROUP=2)), (64, 8, 3, dict(GROUP=4)),
                   (32, 4, 4, dict(GROUP=4)), (128, 8, 3, dict(GROUP=2))]


def candidate_configs(candidates) -> list[triton.Config]:
    """triton.Configs of (BLOCK_R, num_warps, num_stages, variant switches) candidates."""
    return [triton.Config({"BLOCK_R": r, **variant}, num_warps=w, num_stages=s)
            for r, w, s, variant in candidates]


def _configs(candidates):
    """The autotuner's configs: all the candidates, except under the interpreter (it runs every
    program in numpy) or with SPARSEKERN_TRITON_AUTOTUNE=0 (tests: every new shape would
    otherwise compile every candidate; tests that cover the variants pin them with
    `pinned_configs`): only the first one's variant, with a small BLOCK_R."""
    if interpreting() or os.environ.get("SPARSEKERN_TRITON_AUTOTUNE", "1") == "0":
        candidates = [(16 if interpreting() else 64, 4, 2, candidates[0][3])]
    return candidate_configs(candidates)


# Keys: JSON-serializable values only (cache_results writes them to disk; a tl.dtype there
# raised TypeError after the first tuning). The autotuner adds every tensor's dtype itself, which
# fixes ACC_DTYPE.
# nnz_log2 (stored blocks per line, log2): a sparsity gets its own tuning, not the first one's.
_DDS_KEY = ["n_out", "C", "nnz_log2", "BM", "BK", "LINE_MAJOR", "IS_CONV", "PRECISION"]


def _tuning_bench(kernel_call, quantiles):
    """The autotuner's timing of one candidate: the driver's do_bench (median) over 25 ms, not
    its default 100: every candidate of every new key (shape, density) is timed, on a GPU
    lent for minutes; a 0.1 ms kernel still runs ~250 times."""
    return _driver.active.get_benchmarker()(kernel_call, quantiles=quantiles, warmup=5, rep=25)


# cache_results (triton >= 3.4): the timings go to Triton's cache dir, so a new process skips
# the first call's tuning (~1 s of compiles per candidate, per kernel and shape). Both options
# only where this triton's autotune takes them.
_TUNE_OPTIONS = inspect.signature(triton.autotune).parameters
_TUNE = dict(prune_configs_by={"early_config_prune": _prune},
             **({"do_bench": _tuning_bench} if "do_bench" in _TUNE_OPTIONS else {}),
             **({"cache_results": True} if "cache_results" in _TUNE_OPTIONS else {}))
dds_nt = triton.autotune(_configs(_DDS_NT_CANDIDATES), key=_DDS_KEY,
                         **_TUNE)(kernels.dds_nt_kernel)
dds_nn = triton.autotune(_configs(_DDS_NN_CANDIDATES), key=_DDS_KEY,
                         **_TUNE)(kernels.dds_nn_kernel)
sdd_k = triton.autotune(_configs(_SDD_CANDIDATES),
                        key=["n_total", "per_split", "C", "nnz_log2", "BM", "BK", "Q_POW2",
                             "P_POW2", "IS_CONV", "PRECISION"], **_TUNE)(kernels.sdd_kernel)


@contextlib.contextmanager
def pinned_configs(**configs: triton.Config):
    """Within the block, run the named kernels (dds_nt, dds_nn, sdd) with one given config
    instead of autotuning, e.g. pinned_configs(dds_nt=triton.Config({"BLOCK_R": 16, "TILES": 2,
    "SWAP": True})): for tests of the variants and for timing them one by one."""
    tuners = {"dds_nt": dds_nt, "dds_nn": dds_nn, "sdd": sdd_k}
    unknown = set(configs) - set(tuners)
    if unknown:
        raise ValueError(f"no kernel named {sorted(unknown)}; the kernels are {sorted(tuners)}")
    saved = {name: tuners[name].configs for name in configs}
    try:
        _compiled.clear()  # launches by the tuned configs' kernels
        for name, config in configs.items():
            tuners[name].configs = [config]  # a single config is run as is, untuned
        yield
    finally:
        _compiled.clear()
        for name, kept in saved.items():
            tuners[name].configs = kept


def _acc_dtype(dtype: torch.dtype):
    return triton.language.float64 if dtype == torch.float64 else triton.language.float32


def _dot_mode(dtype: torch.dtype, precision: str):
    """(PRECISION, UPCAST) for tl.dot: tf32 applies to float32 only; the interpreter computes
    half-precision dots wrongly, so it upcasts them."""
    upcast = interpreting() and dtype in (torch.float16, torch.bfloat16)
    return (precision if dtype == torch.float32 else "ieee"), upcast


def _geometry(conv, n_cols: int):
    """(IS_CONV, H, W, C, R, S, P, Q, sh, sw, ph, pw, dh, dw); linear is the 1x1 image."""
    if conv:
        N, H, W, C, R, S, sh, sw, ph, pw, dh, dw, P, Q = conv
        return True, H, W, C, R, S, P, Q, sh, sw, ph, pw, dh, dw
    return False, 1, 1, n_cols, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1


# Eager launches of an autotuned kernel, by (kernel, device, argument specialization): the
# CompiledKernel Triton returned for the first such launch, its constexprs by name and its
# config. Not seen by a cached launch: a later change of Triton's debug/instrumentation knobs
# or of a tuner's configs outside pinned_configs (which clears the cache).
_compiled: dict = {}
_COMPILED_MAX = 4096  # entries (distinct shapes x kernels) before the cache starts over
_n_tensors: dict = {}  # kernel -> how many of its launch arguments are tensors (all leading)


def _specialization(args, n_tensors: int) -> tuple:
    """What a compiled kernel is specialized on, or finer: each tensor's dtype and 16-byte
    alignment, every other argument's type and value (Triton: 32/64-bit, == 1, divisible by
    16; True and 1 compile differently). The launchers pass the tensors first."""
    rest = args[n_tensors:]
    return (tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in args[:n_tensors]]), rest,
            tuple(map(type, rest)))


def _hooked(hook) -> bool:
    """A launch hook is set (Triton's knobs hold an empty HookChain when none is)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _cache_entry(kernel, compiled, n_args: int):
    """(compiled, constexprs by name, the launcher's trailing constexpr arguments, config) for
    a kernel Triton just compiled or found for a launch, or None where a direct launch would
    skip something Triton does per launch (hooks) or the config is not known. The constexprs
    come from the compiled kernel itself, not the tuner's best_config, which another thread may
    have moved on since."""
    fn = kernel.fn
    if compiled is None or getattr(fn, "pre_run_hooks", None) or not all(
            p.is_constexpr for p in fn.params[n_args:]):
        return None
    meta = {fn.arg_names[path[0]]: value for path, value in compiled.src.constants.items()}
    defaults = {p.name: p.default for p in fn.params if p.has_default}  # what a config omits
    configs = [c for c in kernel.configs if c.pre_hook is None
               and c.num_warps == compiled.metadata.num_warps
               and c.num_stages == compiled.metadata.num_stages
               and all(meta.get(k) == c.kwargs.get(k, defaults.get(k))
                       for k in {**defaults, **c.kwargs} if k in meta)]
    if not configs:
        return None
    return compiled, meta, tuple(meta[name] for name in fn.arg_names[n_args:]), configs[0]


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Launch an autotuned kernel. torch.compile traces it through wrap_triton. Eager launches
    skip Triton's per-call path (the autotuner's key, the JIT's binder and cache lookup: ~25 us
    of host time per launch on this project's CPU, a third of an eager forward+backward's) after
    a first launch with the same specialization: the compiled kernel is launched directly.
    Arguments: the tensors first, then the ints, positionally; the constexprs (all of them) by
    keyword."""
    if torch.compiler.is_compiling():
        wrap_triton(kernel)[grid](*args, **kwargs)  # traced: Inductor's code guards the device
        return
    first = args[0]
    if isinstance(first, Tensor) and first.is_cuda and \
            first.get_device() != torch.cuda.current_device():
        # Triton launches on the current device: make it the operands' (a model on cuda:1
        # while cuda:0 is current would read another GPU's addresses)
        with torch.cuda.device(first.device):
            _launch_eager(kernel, grid, *args, **kwargs)
        return
    _launch_eager(kernel, grid, *args, **kwargs)


def _launch_eager(kernel, grid, *args, **kwargs) -> None:
    """_launch outside torch.compile, on the current device."""
    runtime = triton.knobs.runtime if hasattr(triton, "knobs") else None
    if (interpreting() or runtime is None or _hooked(runtime.launch_enter_hook)
            or _hooked(runtime.launch_exit_hook)):  # a profiler's launch hooks: Triton's path
        kernel[grid](*args, **kwargs)
        return
    device = _driver.active.get_current_device()
    n_tensors = _n_tensors.get(kernel)
    key = None if n_tensors is None else (
        kernel, device, _specialization(args, n_tensors), tuple(kwargs.items()))
    entry = None if key is None else _compiled.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)  # tunes (first time) and launches
        if key is None:  # the kernel's first launch: where its tensors end
            n_tensors = next((i for i, a in enumerate(args) if not isinstance(a, Tensor)),
                             len(args))
            if any(isinstance(a, Tensor) for a in args[n_tensors:]):
                return  # tensors after other arguments: not a launch the cache can key
            _n_tensors[kernel] = n_tensors
            key = (kernel, device, _specialization(args, n_tensors), tuple(kwargs.items()))
        entry = _cache_entry(kernel, compiled, len(args))
        if entry is not None:
            if len(_compiled) >= _COMPILED_MAX:
                _compiled.clear()
            _compiled[key] = entry
        return
    compiled, meta, constants, kernel.best_config = entry  # best_config: what reports read
    g = grid(meta)
    compiled.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1,
                 _driver.active.get_current_stream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *args, *constants)


def _cdiv(a: int, b: int) -> int:
    """Ceiling division (triton.cdiv is a constexpr function: ~4 us a call on the host)."""
    return -(-a // b)


def _nnz_log2(nnz: int, lines: int) -> int:
    """The autotuning key's density: bit length of the mean stored blocks per line."""
    return _cdiv(nnz, max(lines, 1)).bit_length()


_DEVICE_PROPERTIES: dict = {}  # (CUDA device index, property name) -> value: asked once


def _device_property(device: torch.device, name: str) -> int:
    """A property of a CUDA device (torch.cuda.get_device_properties: a few us a call, and the
    launchers ask on every call)."""
    key = (device.index if device.index is not None else torch.cuda.current_device(), name)
    value = _DEVICE_PROPERTIES.get(key)
    if value is None:
        value = _DEVICE_PROPERTIES[key] = getattr(torch.cuda.get_device_properties(key[0]), name)
    return value


def _l2_bytes(device: torch.device) -> int:
    """The device's L2 cache size; an H100's 50 MB where there is no CUDA device to ask (the
    interpreter, or compiling ahead on a CPU)."""
    return _device_property(device, "L2_cache_size") if device.type == "cuda" else 50 << 20


def _line_major(values: Tensor) -> bool:
    """dds's program order (kernels._program_tile): line-major while W's blocks take at most 5/4
    of the L2. An LRU model of the L2 (benchmarks/traffic_model.py; batch 4096, 64x64 blocks;
    memory reads tile-major -> line-major): 8192² at 90% (W 0.26 L2) 419 -> 81 MB, at 70% (0.8)
    574 -> 391, 16384² at 90% (1.02) 1769 -> 1064; 8192² at 50% (1.28) 606 -> 619, at 30% (1.8)
    634 -> 837."""
    return 4 * values.numel() * values.element_size() <= 5 * _l2_bytes(values.device)


def _unit_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def dds(a: Tensor, values: Tensor, row_offsets: Tensor, col_idx: Tensor, t_offsets: Tensor,
        t_rows: Tensor, t_perm: Tensor, n_rows: int, n_cols: int, trans_w: bool, precision: str,
        conv: Optional[list[int]] = None, bias: Optional[Tensor] = None, relu: bool = False,
        relu_mask: Optional[Tensor] = None) -> Tensor:
    """The launcher behind sparsekern::triton_dds (eager callers may call it directly)."""
    a = _unit_stride(a)
    if relu_mask is not None and relu_mask.stride() != a.stride():  # read with a's offsets
        relu_mask = torch.empty_like(a).copy_(relu_mask)
    values = values.contiguous()
    _, bm, bk = values.shape
    is_conv, H, W, C, R, S, P, Q, sh, sw, ph, pw, dh, dw = _geometry(conv, n_cols)
    mode, upcast = _dot_mode(values.dtype, precision)
    common = dict(BM=bm, BK=bk, LINE_MAJOR=_line_major(values), IS_CONV=is_conv,
                  ACC_DTYPE=_acc_dtype(values.dtype), PRECISION=mode, UPCAST=upcast)
    nnz = values.shape[0]
    if trans_w:  # y [rows, n_rows], rows = N*P*Q (conv) or the batch
        n_out = conv[0] * P * Q if conv else a.shape[0]
        out = a.new_empty(n_out, n_rows)
        if out.numel() == 0:
            return out
        # one dimension: (row tiles x block rows) can pass the 65535 of a second one
        grid = lambda meta: (  # noqa: E731
            _cdiv(n_out, meta["BLOCK_R"] * meta["TILES"]) * (n_rows // bm),)
        _launch(dds_nt, grid, a, values, row_offsets, col_idx, out,
                bias.contiguous() if bias is not None else out, n_out, a.stride(0),
                out.stride(0), H, W, C, S, P, Q, sh, sw, ph, pw, dh, dw,
                _nnz_log2(nnz, n_rows // bm), HAS_BIAS=bias is not None, RELU=relu, **common)
        return out
    n_out = conv[0] * H * W if conv else a.shape[0]  # dx [N*H*W, C] or a @ W [B, n_cols]
    out = a.new_empty(n_out, C)
    if out.numel() == 0:
        return out
    grid = lambda meta: (_cdiv(n_out, meta["BLOCK_R"]) * (C // bk),)  # noqa: E731
    _launch(dds_nn, grid, a, values, t_offsets, t_rows, t_perm, out,
            relu_mask if relu_mask is not None else a, n_out, a.stride(0), out.stride(0),
            H, W, C, R, S, P, Q, sh, sw, ph, pw, dh, dw, _nnz_log2(nnz, R * S * C // bk),
            HAS_MASK=relu_mask is not None, **common)
    return out


def _sdd_splits(nnz: int, n_rows_total: int, device: torch.device) -> int:
    """Split the reduction over rows when there are too few blocks to fill the GPU."""
    if nnz == 0 or device.type != "cuda":
        return 1
    programs = 4 * _device_property(device, "multi_processor_count")
    return max(1, min(_cdiv(programs, nnz), n_rows_total // 512))


def sdd(a: Tensor, b: Tensor, row_offsets: Tensor, row_idx: Tensor, col_idx: Tensor, bm: int,
        bk: int, precision: str, conv: Optional[list[int]] = None) -> Tensor:
    """The launcher behind sparsekern::triton_sdd (eager callers may call it directly)."""
    a, b = _unit_stride(a), _unit_stride(b)
    nnz = row_idx.shape[0]
    is_conv, H, W, C, R, S, P, Q, sh, sw, ph, pw, dh, dw = _geometry(conv, b.shape[1])
    n_block_cols = R * S * C // bk
    # the reduction: batch rows (linear) or image rows n*P + p (conv), split when blocks are few
    n_total = conv[0] * P if conv else a.shape[0]
    splits = min(_sdd_splits(nnz, a.shape[0], a.device), max(n_total, 1))
    per_split = _cdiv(n_total, splits) if n_total else 0
    # one split: the kernel stores the blocks in a's dtype; several: fp32 partials, summed here
    acc_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    out = torch.empty(splits, nnz, bm, bk, dtype=a.dtype if splits == 1 else acc_dtype,
                      device=a.device)
    if nnz and a.shape[0]:
        mode, upcast = _dot_mode(a.dtype, precision)
        grid = lambda meta: (nnz if meta["GROUP"] == 1 else  # noqa: E731
                             (row_offsets.shape[0] - 1) * _cdiv(n_block_cols, meta["GROUP"]),
                             splits)
        _launch(sdd_k, grid, a, b, row_offsets, row_idx, col_idx, out, nnz, n_block_cols, n_total,
                per_split, a.stride(0), b.stride(0), H, W, C, S, P, Q, sh, sw, ph, pw, dh, dw,
                _nnz_log2(nnz, row_offsets.shape[0] - 1), BM=bm, BK=bk,
                Q_POW2=1 << (Q - 1).bit_length(), P_POW2=P if P & (P - 1) == 0 else 0,
                IS_CONV=is_conv, ACC_DTYPE=_acc_dtype(a.dtype), PRECISION=mode, UPCAST=upcast)
    elif nnz:  # no reduction rows: the gradient is zero
        out.zero_()
    return out[0] if splits == 1 else out.sum(0).to(a.dtype)


triton_dds = triton_op("sparsekern::triton_dds", dds, mutates_args=())
triton_sdd = triton_op("sparsekern::triton_sdd", sdd, mutates_args=())


# Explicit fake kernels: the ones triton_op derives run the launcher, which under the
# interpreter would execute the kernels on fake tensors.
@triton_dds.register_fake
def _triton_dds_fake(a, values, row_offsets, col_idx, t_offsets, t_rows, t_perm, n_rows, n_cols,
                     trans_w, precision, conv=None, bias=None, relu=False, relu_mask=None):
    return a.new_empty(dds_out_shape(a, n_rows, n_cols, trans_w, conv))


@triton_sdd.register_fake
def _triton_sdd_fake(a, b, row_offsets, row_idx, col_idx, bm, bk, precision, conv=None):
    return a.new_empty(row_idx.shape[0], bm, bk)
