"""Compile the Triton kernels the GPU benchmark will launch before it launches them: worker
processes replay bench_triton_gpu.py's launches (same shapes and seeds, so the same
specializations) on CPU tensors with triton_host.py's compile-only driver, each compiling its
share of the autotuning candidates into Triton's on-disk cache. The benchmark's autotuner then
loads them (~10 ms each) instead of compiling ~28 candidates per block shape one after another
(~1-2 s each) on the GPU machine's clock. gpu_suite.sh runs it in the background while the
tests run. No timing happens here, and none is cached: the workers' autotuners keep nothing.

    python benchmarks/triton_warm_cache.py [--quick] [--workers N]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def replays(quick: bool, tiny: bool = False):
    """(name, callable) issuing, on CPU tensors, the launches of bench_triton_gpu.main: the
    variant sweep's first (it runs first), then each case's forward and forward+backward
    (host_profile's case is one of them). `tiny`: small shapes, for the tests."""
    import bench_triton_gpu as bench

    import sparsekern

    cases, sweep_cases = bench.benchmark_cases(quick)
    if tiny:
        cases = [("linear", (64, 32, 16, 0.5)), ("conv", ("tiny", 32, 32, 4, 2, 16, 0.5, 2))]
        sweep_cases = ((16, 0.5),)
    n_sweep = 64 if tiny else 4096

    def sweep(blk, sparsity):
        from sparsekern.triton import ops as tops

        products = bench.sweep_products(*bench.linear_operands(n_sweep, n_sweep, blk, sparsity,
                                                               "cpu"))
        for kernel, tuner in (("dds_nt", tops.dds_nt), ("dds_nn", tops.dds_nn),
                              ("sdd", tops.sdd_k)):
            for config in tuner.configs:  # this worker's share of the candidates
                with tops.pinned_configs(**{kernel: config}):
                    products[kernel]()

    def linear(n, batch, blk, sparsity):
        w, x = bench.linear_operands(n, batch, blk, sparsity, "cpu")
        sparsekern.bsr_linear(x, w, backend="triton")
        values = w.values.clone().requires_grad_()
        x.requires_grad_()
        y = sparsekern.bsr_linear(x, w.with_values(values), backend="triton")
        torch.autograd.grad(y, (x, values), torch.randn_like(y))

    def conv(name, c_in, c_out, hw, batch, blk, sparsity, stride):
        layer = bench.conv_layer(c_in, c_out, blk, sparsity, "cpu", stride)
        x = torch.randn(batch, c_in, hw, hw, dtype=bench.DTYPE).to(
            memory_format=torch.channels_last)
        with sparsekern.backend("triton"):
            layer(x)
            layer(x.requires_grad_()).sum().backward()

    for blk, sparsity in sweep_cases:
        yield f"variant sweep {blk}x{blk} {sparsity:.0%}", lambda b=blk, s=sparsity: sweep(b, s)
    if not tiny:
        yield "program orders", lambda: bench.program_orders(timer=lambda fn: fn(), device="cpu")
    for kind, params in cases:
        yield f"{kind} {params}", lambda k=kind, p=params: (linear if k == "linear" else conv)(*p)


def worker(index: int, count: int, quick: bool, tiny: bool) -> int:
    """Compile candidates index, index + count, ... of each kernel for every replay."""
    import triton_host

    fake = triton_host.install()
    from sparsekern.triton import ops as tops

    for tuner in (tops.dds_nt, tops.dds_nn, tops.sdd_k):
        tuner.cache_results = False  # the compile-only driver's timings are no timings
        tuner.configs = tuner.configs[index::count] or tuner.configs[:1]
    if torch.cuda.is_available():  # split sdd's reduction, order dds's programs as on this GPU
        splits, l2_bytes = tops._sdd_splits, tops._l2_bytes
        tops._sdd_splits = lambda nnz, rows, device: splits(nnz, rows, torch.device("cuda"))
        tops._l2_bytes = lambda device: l2_bytes(torch.device("cuda", 0))
    failed = 0
    for name, replay in replays(quick, tiny):
        start = time.time()
        try:
            replay()
        except Exception as err:  # noqa: BLE001 - one failure must not stop the others
            failed += 1
            print(f"worker {index}: {name}: {type(err).__name__}: {err}", flush=True)
        print(f"worker {index}: {name} in {time.time() - start:.1f} s", flush=True)
    print(f"worker {index}: {fake.utils.loaded} kernels compiled or loaded", flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bench_triton_gpu --quick's cases")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="small shapes (the tests)")
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(args.worker, args.workers, args.quick, args.tiny)
    start = time.time()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    flags = [f"--workers={args.workers}"] + ["--quick"] * args.quick + ["--tiny"] * args.tiny
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--worker={i}", *flags],
                              env=env) for i in range(args.workers)]
    codes = [p.wait() for p in procs]
    print(f"triton_warm_cache: {args.workers} workers in {time.time() - start:.0f} s, exit codes "
          f"{codes}", flush=True)
    return max(codes)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.dirname(HERE))
    sys.exit(main())
