"""SparseConv2d (bsr_conv2d) vs dense F.conv2d (oneDNN), CPU, one process.

Correctness first (output, grad input, grad values against F.conv2d with the same masked weight),
then medians: forward, and forward+backward (grad input and grad weight), on the same input, in
NCHW and in channels_last.

    python benchmarks/bench_conv.py [--quick] [--json benchmarks/results/bench_conv_cpu.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_medians_ms, machine_info, print_table, write_json  # noqa: E402

from sparsekern import bsr_conv2d  # noqa: E402
from sparsekern.bsr import BlockSparseMatrix  # noqa: E402
from sparsekern.reference import dense_to_blocks  # noqa: E402

# (name, batch, C_in, C_out, H, kernel, padding, block, sparsity)
MAIN = [("3x3 256->256 16x16", 32, 256, 256, 16, 3, 1, (32, 32), s)
        for s in (0.0, 0.5, 0.75, 0.9, 0.95)]
MODELS = [
    ("LeNet-5 conv1 1->20", 64, 1, 20, 28, 5, 0, (1, 1), 0.9),
    ("LeNet-5 conv2 20->50", 64, 20, 50, 12, 5, 0, (1, 1), 0.9),
    ("VGG 64->64 32x32", 32, 64, 64, 32, 3, 1, (1, 1), 0.9),
    ("VGG 64->64 32x32", 32, 64, 64, 32, 3, 1, (16, 16), 0.9),
    ("VGG 128->128 16x16", 32, 128, 128, 16, 3, 1, (16, 16), 0.9),
    ("VGG 256->256 8x8", 32, 256, 256, 8, 3, 1, (16, 16), 0.9),
    ("ResNet 16->16 32x32", 128, 16, 16, 32, 3, 1, (1, 1), 0.9),
    ("ResNet 16->16 32x32", 128, 16, 16, 32, 3, 1, (16, 16), 0.9),
    ("ResNet 32->32 16x16", 128, 32, 32, 16, 3, 1, (16, 16), 0.9),
    ("ResNet 64->64 8x8", 128, 64, 64, 8, 3, 1, (16, 16), 0.9),
]


def run_case(name, N, C, O, H, k, pad, block, sparsity, fmt, repeats):
    torch.manual_seed(0)
    w = BlockSparseMatrix.random((O, k * k * C), block, 1.0 - sparsity)
    w_dense = w.to_dense().reshape(O, k, k, C).permute(0, 3, 1, 2).contiguous()
    x = torch.randn(N, C, H, H)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        w_dense = w_dense.contiguous(memory_format=torch.channels_last)
    values = w.values.clone().requires_grad_(True)
    w_train = w.with_values(values)
    w_ref = w_dense.clone().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    grad_out = torch.randn_like(F.conv2d(x, w_dense, padding=pad))

    def sparse_fwd():
        with torch.no_grad():
            return bsr_conv2d(x, w, padding=pad)

    def dense_fwd():
        with torch.no_grad():
            return F.conv2d(x, w_dense, padding=pad)

    def sparse_fwd_bwd():
        xg.grad = values.grad = None
        bsr_conv2d(xg, w_train, padding=pad).backward(grad_out)

    def dense_fwd_bwd():
        xg.grad = w_ref.grad = None
        F.conv2d(xg, w_ref, padding=pad).backward(grad_out)

    ref = dense_fwd()
    out = sparse_fwd()
    scale = ref.abs().max().item()
    if (out - ref).abs().max().item() > 1e-4 * scale + 1e-5:
        raise SystemExit(f"bsr_conv2d forward is wrong for {name} {block} {sparsity}")
    sparse_fwd_bwd()
    dx, dv = xg.grad.clone(), values.grad.clone()
    dense_fwd_bwd()
    dv_ref = dense_to_blocks(w_ref.grad.permute(0, 2, 3, 1).reshape(O, -1),
                             w.row_idx, w.col_idx, *block) if O % block[0] == 0 else dv
    for label, got, want in (("grad input", dx, xg.grad), ("grad values", dv, dv_ref)):
        if got.numel() and (got - want).abs().max().item() > 1e-4 * want.abs().max() + 1e-4:
            raise SystemExit(f"bsr_conv2d {label} is wrong for {name} {block} {sparsity}")
    t = interleaved_medians_ms({"dense_fwd": dense_fwd, "sparse_fwd": sparse_fwd}, repeats)
    t.update(interleaved_medians_ms({"dense_fwd_bwd": dense_fwd_bwd,
                                     "sparse_fwd_bwd": sparse_fwd_bwd}, repeats))
    return {"layer": name, "batch": N, "format": fmt, "block": f"{block[0]}x{block[1]}",
            "sparsity": sparsity, **t, "fwd_vs_dense": t["dense_fwd"] / t["sparse_fwd"],
            "fwd_bwd_vs_dense": t["dense_fwd_bwd"] / t["sparse_fwd_bwd"]}


COLUMNS = [("layer", "layer", "s"), ("format", "format", "s"), ("block", "block", "s"),
           ("sparsity", "sparsity", ".2f"), ("dense_fwd", "dense fwd", ".2f"),
           ("sparse_fwd", "ours fwd", ".2f"), ("fwd_vs_dense", "x dense", ".2f"),
           ("dense_fwd_bwd", "dense f+b", ".2f"), ("sparse_fwd_bwd", "ours f+b", ".2f"),
           ("fwd_bwd_vs_dense", "x dense", ".2f")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--json", default="benchmarks/results/bench_conv_cpu.json")
    args = parser.parse_args(argv)
    cases = [(c, fmt) for c in MAIN for fmt in ("nchw", "channels_last")]
    cases += [(c, "nchw") for c in MODELS]
    if args.quick:
        cases = [((n, 2, c, o, min(h, 8), k, p, b, s), f) for (n, _, c, o, h, k, p, b, s), f
                 in cases[::4]]
        args.repeats = 2
    info = machine_info()
    print(f"bench_conv: float32, times in ms (median of {args.repeats})\n{info}")
    rows = []
    for case, fmt in cases:
        row = run_case(*case, fmt, args.repeats)
        rows.append(row)
        print(f"  {row['layer']:22s} {fmt:13s} {row['block']:>5} {100 * row['sparsity']:3.0f}%  "
              f"fwd {row['sparse_fwd']:7.2f} ms ({row['fwd_vs_dense']:.2f}x)  "
              f"fwd+bwd {row['sparse_fwd_bwd']:7.2f} ms ({row['fwd_bwd_vs_dense']:.2f}x)",
              flush=True)
    print()
    print_table(rows, COLUMNS)
    write_json(args.json, info, rows)


if __name__ == "__main__":
    main()
