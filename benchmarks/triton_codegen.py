"""The Triton kernels' code for a Hopper GPU, checked without one: every autotuning candidate
the autotuner would time is compiled for sm_90 (Triton's bundled ptxas, no driver needed) with
the specialization a real launch gets, and the tile loads are read off the TTGIR.

    python benchmarks/triton_codegen.py [--check] [--all-blocks]

Per kernel, variant and case it prints shared memory, registers, spilled bytes, the CTAs one SM
can hold, how many loop iterations ahead the tiles are loaded, wgmma / mma.sync counts and the
tile loads: "async xN" = pipelined cp.async of N contiguous elements (16 bytes is the goal),
"reg" = loaded into registers ahead of use. --check exits 1 if a candidate does not compile, an
async copy is narrower than it could be, more than a few registers spill, shared memory exceeds
a block's, a tile is loaded one element at a time (what the x tile of dds_nt did until col0 % C
got a divisibility hint: 2-byte loads, outside the async pipeline, found this way, not on a
GPU), or two candidates of a case compile to the same code (dds's num_stages=4 was 3's: the
autotuner timed it twice and never a deeper prefetch). Must run without
TRITON_INTERPRET (the interpreter replaces the kernels); the tests run it in a subprocess.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import re
import sys

import torch

_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                 torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64"}


def compile_sm90(kernel, args: tuple, kwargs: dict, config):
    """Compile `kernel` (a triton.autotune'd JITFunction) for sm_90 as a launch with these
    arguments and this autotuning config would: tensors are 16-byte aligned pointers, ints
    divisible by 16 carry that hint, ints equal to 1 become constants (Triton's rules)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit_fn = kernel.fn
    signature_ = inspect.signature(jit_fn.fn).parameters
    params = list(signature_)
    values = {name: p.default for name, p in signature_.items()  # as Triton's binder does
              if p.default is not inspect.Parameter.empty}
    values.update(zip(params, args))
    values.update(kwargs)
    values.update(config.kwargs)
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(params):
        v = values[name]
        if isinstance(v, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool) or not isinstance(v, int) or v == 1 or name in kwargs \
                or name in config.kwargs or jit_fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            constants[(i,)] = v
        else:
            signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0 and name not in jit_fn.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=jit_fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": config.num_warps,
                                   "num_stages": config.num_stages})


_ASYNC = re.compile(r"ttg\.async_copy_global_to_local .*?\{contiguity = (\d+) : i32\} : "
                    r"tensor<(\d+)x(\d+)x!tt\.ptr<(\w+)>")
_REG = re.compile(r"= tt\.load [^\n]*: tensor<(\d+)x(\d+)x!tt\.ptr<(\w+)>")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8}
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on H100/H200 (227 KB)


def _scalar_loads(ptx: str, bits: int) -> int:
    """Global loads of one `bits`-wide element (no .v2/.v4): an unvectorized tile."""
    return len(re.findall(rf"ld\.global(?:\.[a-z0-9_:]+)*?\.[bu]{bits}\b", ptx))


def summarize(compiled, num_warps: int, elem_bytes: int) -> dict:
    """Shared memory, MMA instructions and the 2-D tile loads of one compiled kernel: "async
    xN" (cp.async, N contiguous elements per copy), "reg" (loaded into registers a few
    iterations ahead, e.g. an mma.sync operand used transposed). `bad`: async copies under 16
    bytes that could be wider (a thread holds more elements than one copy moves), global loads
    of the operands' element one at a time (an unvectorized tile), register spills, more shared
    memory than a block may have."""
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    loads, bad = [], []
    for contiguity, rows, cols, ty in _ASYNC.findall(ttgir):
        loads.append(f"{rows}x{cols} async x{contiguity}")
        per_thread = int(rows) * int(cols) // (32 * num_warps)
        if ty in _BYTES and int(contiguity) * _BYTES[ty] < 16 and int(contiguity) < per_thread:
            bad.append(loads[-1])
    loads += [f"{rows}x{cols} reg" for rows, cols, ty in _REG.findall(ttgir) if ty in _BYTES]
    # a few scalar loads are indices (32-bit) or an epilogue vector in a transposed layout
    # (SWAP's bias); a tile loaded one element at a time takes dozens (64 for dds_nt's x tile
    # before its hint)
    scalar = _scalar_loads(ptx, 8 * elem_bytes)
    if scalar >= 12:
        bad.append(f"{scalar} scalar {8 * elem_bytes}-bit loads")
    regs, local = resource_usage(compiled)
    if local > 32:  # a few spilled masks cost a few L1 hits; a spilled accumulator, much more
        bad.append(f"{local} bytes of local memory (register spills)")
    if compiled.metadata.shared > SHARED_LIMIT:
        bad.append(f"{compiled.metadata.shared} bytes of shared memory (limit {SHARED_LIMIT})")
    # CTAs one SM can hold: 64K registers, 228 KB shared memory (H100/H200)
    threads = 32 * num_warps
    ctas = min(65536 // max(1, regs * threads), (228 * 1024) // max(1, compiled.metadata.shared),
               2048 // threads)
    # tiles in flight: a pipelined wgmma loop keeps N buffers of each tile, N - 1 loaded ahead
    # (wgmma reads the current one from shared memory); an mma.sync loop copies the tile to
    # registers first, so all N can be ahead
    buffers = [int(n) for n in re.findall(r"!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]
    wgmma = ptx.count("wgmma.mma_async")
    code = "\n".join(line for line in ptx.splitlines()
                     if not line.lstrip().startswith(("//", ".loc", ".file")))
    return {"shared": compiled.metadata.shared, "regs": regs, "spill": local, "ctas_per_sm": ctas,
            "ahead": max(buffers, default=1) - (1 if wgmma else 0),
            "code": hashlib.sha256(code.encode()).hexdigest(),
            "wgmma": wgmma, "mma": ptx.count("mma.sync"), "loads": loads,
            "bad": bad}


def resource_usage(compiled) -> tuple[int, int]:
    """(registers per thread, local memory bytes per thread) from the cubin, with the
    cuobjdump that ships with Triton; (0, 0) if it is missing."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    if not os.path.exists(tool):
        print(f"triton_codegen: no {tool}: registers and spills unknown", flush=True)
        return 0, 0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if not found:
        raise RuntimeError(f"cuobjdump's resource usage not understood: {out[-300:]!r}")
    return int(found.group(1)), int(found.group(2)) + int(found.group(3))


def launches(block=(64, 64), dtype=torch.bfloat16, fused=False):
    """(name, autotuner, args, kwargs) of the three products, as the launchers of
    sparsekern/triton/ops.py issue them for a 1024x1024 Linear (batch 2048) and a VGG-like
    3x3 128->128 conv on 16x16 maps (batch 8, NHWC rows): enough rows that the autotuner
    keeps the TILES variants. No kernel runs."""
    from sparsekern.bsr import BlockSparseMatrix
    from sparsekern.triton import ops as tops

    captured = []
    saved = tops._launch
    tops._launch = lambda kernel, grid, *args, **kwargs: captured.append((kernel, args, kwargs))
    try:
        bm, bk = block
        for case in ("linear", "conv"):
            if case == "linear":
                n_out, n_in, conv, rows_in, rows_out = 1024, 1024, None, 2048, 2048
            else:
                N, H, C, O = 8, 16, 128, 128
                conv = [N, H, H, C, 3, 3, 1, 1, 1, 1, 1, 1, H, H]
                n_out, n_in, rows_in, rows_out = O, 9 * C, N * H * H, N * H * H
            w = BlockSparseMatrix.random((n_out, n_in), block, 0.25, dtype=dtype)
            ro, ci, ri, to, tr, tp = w.topology()
            width_in = conv[3] if conv else n_in
            x = torch.zeros(rows_in, width_in, dtype=dtype)
            dy = torch.zeros(rows_out, n_out, dtype=dtype)
            bias = torch.zeros(n_out, dtype=dtype) if fused else None
            tops.dds(x, w.values, ro, ci, to, tr, tp, n_out, n_in, True, "tf32", conv, bias,
                     relu=fused)
            tops.dds(dy, w.values, ro, ci, to, tr, tp, n_out, n_in, False, "tf32", conv,
                     relu_mask=dy if fused else None)
            tops.sdd(dy, x, ro, ri, ci, bm, bk, "tf32", conv)
            for name, (kernel, args, kwargs) in zip(("dds_nt", "dds_nn", "sdd"), captured[-3:]):
                yield f"{name} {case}", kernel, args, {**kwargs, "UPCAST": False}
    finally:
        tops._launch = saved


def candidates(kernel, args, kwargs):
    """The configs the autotuner would time for this launch (after its pruning)."""
    from sparsekern.triton import ops as tops

    table = {tops.dds_nt: tops._DDS_NT_CANDIDATES, tops.dds_nn: tops._DDS_NN_CANDIDATES,
             tops.sdd_k: tops._SDD_CANDIDATES}[kernel]
    configs = tops.candidate_configs(table)
    named = dict(zip(kernel.fn.arg_names, args))
    return tops._prune(configs, named, **kwargs)


def run(cases, every_candidate=True) -> list[dict]:
    rows = []
    for block, dtype, fused in cases:
        for name, kernel, args, kwargs in launches(block, dtype, fused):
            configs = candidates(kernel, args, kwargs)
            seen = {}  # code hash -> the first candidate that compiled to it
            for config in configs if every_candidate else configs[:1]:
                label = " ".join(f"{k}={int(v)}" for k, v in config.kwargs.items())
                row = {"kernel": name, "block": f"{block[0]}x{block[1]}",
                       "dtype": _TRITON_TYPES[dtype] + (" fused" if fused else ""),
                       "config": f"{label} w{config.num_warps} s{config.num_stages}"}
                try:
                    row.update(summarize(compile_sm90(kernel, args, kwargs, config),
                                         config.num_warps, dtype.itemsize))
                except Exception as err:  # noqa: BLE001 - a candidate that fails is the finding
                    row.update(error=str(err).strip().splitlines()[-1][:200], bad=["compile"])
                if "code" in row:  # a twin only costs tuning time (dds num_stages 4 was 3's)
                    if row["code"] in seen:
                        row["bad"].append(f"the same code as {seen[row['code']]}")
                    seen.setdefault(row["code"], row["config"])
                rows.append(row)
                print(f"{row['kernel']:12s} {row['block']:6s} {row['dtype']:10s} "
                      f"{row['config']:34s} " + (f"ERROR {row['error']}" if "error" in row else
                      f"smem {row['shared']:6d}  regs {row['regs']:3d}  spill {row['spill']:3d}"
                      f"  CTAs/SM {row['ctas_per_sm']}  ahead {row['ahead']}  "
                      f"wgmma {row['wgmma']:2d}  "
                      f"mma {row['mma']:2d}  {', '.join(row['loads'])}"), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a compile failure or a narrow tile load")
    parser.add_argument("--all-blocks", action="store_true",
                        help="every candidate for every block shape and dtype (slow)")
    args = parser.parse_args(argv)
    from sparsekern.triton import interpreting

    if interpreting():
        raise SystemExit("triton_codegen: unset TRITON_INTERPRET (the interpreter replaces the "
                         "kernels)")
    # every candidate on the target block shapes (32x32: the K_STEP ones); the first one the
    # autotuner keeps elsewhere
    rows = run([((64, 64), torch.bfloat16, False), ((64, 64), torch.bfloat16, True),
                ((32, 32), torch.bfloat16, False)])
    others = [((b, b), torch.bfloat16, False) for b in (16, 128)]
    others += [((32, 64), torch.float16, False), ((64, 64), torch.float32, False)]
    rows += run(others, every_candidate=args.all_blocks)
    bad = [r for r in rows if r["bad"]]
    print(f"\n{len(rows)} compiled for sm_90, {len(bad)} with a compile error or a narrow tile "
          "load (or another of those problems)")
    for r in bad:
        print(f"  {r['kernel']} {r['block']} {r['dtype']} {r['config']}: "
              f"{r.get('error') or ', '.join(r['bad'])}")
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
