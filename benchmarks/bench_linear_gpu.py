"""SparseLinear on a CUDA GPU: the "cuda" backend's forward against cuBLAS (F.linear) and
torch.sparse's bsr_dense_mm, one process, medians of triton.testing.do_bench when triton is
there (else CUDA events). Correctness first. Run by benchmarks/gpu_suite.sh.

    python benchmarks/bench_linear_gpu.py [--dtype float32] [--json ...]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, print_table, write_json  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.bsr import BlockSparseMatrix  # noqa: E402

CONFIGS = [(n, b, blk, s) for n in (4096, 8192) for b in (256, 4096) for blk in (32, 64)
           for s in (0.5, 0.9, 0.99)]


def gpu_ms(fn) -> float:
    try:
        import triton.testing

        return float(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0])
    except ImportError:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()
        times = []
        for _ in range(20):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--json", default="benchmarks/results/bench_linear_gpu.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_linear_gpu: no CUDA device here; run it on a GPU machine")
    dtype = getattr(torch, args.dtype)
    info = {**machine_info(), "gpu": torch.cuda.get_device_name()}
    print(info)
    rows = []
    for n, batch, blk, sparsity in CONFIGS:
        torch.manual_seed(0)
        w = BlockSparseMatrix.random((n, n), (blk, blk), 1 - sparsity, dtype=dtype).to("cuda")
        w_dense = w.to_dense().contiguous()
        w_bsr = w_dense.to_sparse_bsr((blk, blk))
        x = torch.randn(batch, n, device="cuda", dtype=dtype)
        ref = F.linear(x, w_dense)
        out = sparsekern.bsr_linear(x, w, backend="cuda")
        if (out - ref).abs().max().item() > 1e-3 * ref.abs().max().item() + 1e-3:
            raise SystemExit(f"cuda backend wrong for n={n} batch={batch} block={blk}")
        t = {"cublas": gpu_ms(lambda: F.linear(x, w_dense)),
             "bsr_dense_mm": gpu_ms(lambda: (w_bsr @ x.t()).t()),
             "ours": gpu_ms(lambda: sparsekern.bsr_linear(x, w, backend="cuda"))}
        rows.append({"n": n, "batch": batch, "block": blk, "sparsity": sparsity, **t,
                     "vs_cublas": t["cublas"] / t["ours"],
                     "vs_bsr_dense_mm": t["bsr_dense_mm"] / t["ours"]})
        print(rows[-1], flush=True)
    print_table(rows, [("n", "n", "d"), ("batch", "batch", "d"), ("block", "block", "d"),
                       ("sparsity", "sparsity", ".2f"), ("cublas", "cuBLAS ms", ".3f"),
                       ("bsr_dense_mm", "bsr_mm ms", ".3f"), ("ours", "ours ms", ".3f"),
                       ("vs_cublas", "x cuBLAS", ".2f"), ("vs_bsr_dense_mm", "x bsr_mm", ".2f")])
    write_json(args.json, info, rows)


if __name__ == "__main__":
    main()
