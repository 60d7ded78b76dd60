"""SparseLinear vs dense F.linear vs torch.sparse BSR, CPU, one process.

Correctness first (every configuration against the dense product with the same masked weight),
then medians over repeats: forward, and forward+backward (dX and dW). torch.sparse has no CPU
backward for BSR, so it appears in the forward columns only.

    python benchmarks/bench_linear.py [--quick] [--json benchmarks/results/bench_linear_cpu.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_medians_ms, machine_info, print_table, write_json  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.bsr import BlockSparseMatrix  # noqa: E402

CONFIGS = [((32, 32), s) for s in (0.0, 0.5, 0.75, 0.9, 0.95, 0.99)] + [((1, 1), 0.95)]


def torch_sparse_weight(w_dense: torch.Tensor, block):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse (BSR|CSR) tensor support is in beta.*")
        if block == (1, 1):
            return w_dense.to_sparse_csr()
        return w_dense.to_sparse_bsr(block)


def run(features: int, batch: int, repeats: int, configs) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(batch, features)
    grad_out = torch.randn(batch, features)
    rows = []
    for block, sparsity in configs:
        w = BlockSparseMatrix.random((features, features), block, 1.0 - sparsity)
        w_dense = w.to_dense().contiguous()
        w_ts = torch_sparse_weight(w_dense, block)
        values = w.values.clone().requires_grad_(True)
        w_train = w.with_values(values)
        w_ref = w_dense.clone().requires_grad_(True)
        xg = x.clone().requires_grad_(True)

        def sparse_fwd():
            with torch.no_grad():
                return sparsekern.bsr_linear(x, w)

        def dense_fwd():
            with torch.no_grad():
                return F.linear(x, w_dense)

        def ts_fwd():
            with torch.no_grad():
                return (w_ts @ x.t()).t()

        def sparse_fwd_bwd():
            xg.grad = values.grad = None
            sparsekern.bsr_linear(xg, w_train).backward(grad_out)

        def dense_fwd_bwd():
            xg.grad = w_ref.grad = None
            F.linear(xg, w_ref).backward(grad_out)

        # ---- correctness first ----
        ref = dense_fwd()
        tol = 1e-4 * ref.abs().max().item() + 1e-5
        for name, out in (("sparsekern", sparse_fwd()), ("torch.sparse", ts_fwd())):
            err = (out - ref).abs().max().item()
            if err > tol:
                raise SystemExit(f"{name} forward is wrong for {block} at {sparsity}: {err}")
        sparse_fwd_bwd()
        dx_s, dv_s = xg.grad.clone(), values.grad.clone()
        dense_fwd_bwd()
        dv_ref = sparsekern.reference.dense_to_blocks(w_ref.grad, w.row_idx, w.col_idx, *block)
        for name, got, want in (("dX", dx_s, xg.grad), ("dW", dv_s, dv_ref)):
            err = (got - want).abs().max().item()
            if err > 1e-4 * want.abs().max().item() + 1e-5:
                raise SystemExit(f"sparsekern {name} is wrong for {block} at {sparsity}: {err}")

        # ---- timing, side by side (round-robin: a drifting machine slows all alike) ----
        t = interleaved_medians_ms({"dense_fwd": dense_fwd, "sparse_fwd": sparse_fwd,
                                    "torch_sparse_fwd": ts_fwd}, repeats)
        t.update(interleaved_medians_ms({"dense_fwd_bwd": dense_fwd_bwd,
                                         "sparse_fwd_bwd": sparse_fwd_bwd}, repeats))
        row = {"block": f"{block[0]}x{block[1]}", "sparsity": sparsity, "nnz_blocks": w.nnz_blocks,
               **t,
               "fwd_vs_dense": t["dense_fwd"] / t["sparse_fwd"],
               "fwd_vs_torch_sparse": t["torch_sparse_fwd"] / t["sparse_fwd"],
               "fwd_bwd_vs_dense": t["dense_fwd_bwd"] / t["sparse_fwd_bwd"]}
        rows.append(row)
        print(f"  {row['block']:>5} {100 * sparsity:4.0f}%  fwd {t['sparse_fwd']:7.2f} ms "
              f"({row['fwd_vs_dense']:.2f}x dense, {row['fwd_vs_torch_sparse']:.2f}x torch.sparse)"
              f"  fwd+bwd {t['sparse_fwd_bwd']:7.2f} ms ({row['fwd_bwd_vs_dense']:.2f}x dense)",
              flush=True)
    return rows


COLUMNS = [("block", "block", "s"), ("sparsity", "sparsity", ".2f"),
           ("dense_fwd", "dense fwd", ".2f"), ("torch_sparse_fwd", "t.sparse", ".2f"),
           ("sparse_fwd", "ours fwd", ".2f"), ("fwd_vs_dense", "x dense", ".2f"),
           ("fwd_vs_torch_sparse", "x t.sparse", ".2f"), ("dense_fwd_bwd", "dense f+b", ".2f"),
           ("sparse_fwd_bwd", "ours f+b", ".2f"), ("fwd_bwd_vs_dense", "x dense", ".2f")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--json", default="benchmarks/results/bench_linear_cpu.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.features, args.batch, args.repeats = 512, 64, 3
    info = machine_info()
    print(f"bench_linear: W {args.features}x{args.features}, batch {args.batch}, float32, "
          f"times in ms (median of {args.repeats})\n{info}")
    rows = run(args.features, args.batch, args.repeats, CONFIGS)
    print()
    print_table(rows, COLUMNS)
    write_json(args.json, {**info, "features": args.features, "batch": args.batch}, rows)


if __name__ == "__main__":
    main()
