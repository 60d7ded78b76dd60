"""Smoke runs of the demo and the benchmarks on tiny shapes: they must keep working (their own
correctness checks raise SystemExit on a wrong result)."""
import os
import sys

import sparsekern.demo

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_conv  # noqa: E402
import bench_linear  # noqa: E402


def test_demo_prints_speedups(capsys):
    sparsekern.demo.main(features=256, batch=16, sparsity=0.75, block=32)
    out = capsys.readouterr().out
    assert "forward+backward" in out and "speed-up" in out


def test_bench_linear_rows():
    rows = bench_linear.run(128, 8, 1, [((32, 32), 0.5), ((1, 1), 0.9)])
    assert [r["block"] for r in rows] == ["32x32", "1x1"]
    assert all(r["sparse_fwd"] > 0 and r["fwd_bwd_vs_dense"] > 0 for r in rows)


def test_bench_conv_row():
    row = bench_conv.run_case("tiny", 2, 16, 32, 6, 3, 1, (16, 16), 0.5, "channels_last", 1)
    assert row["format"] == "channels_last" and row["sparse_fwd"] > 0


def test_traffic_model():
    """benchmarks/traffic_model.py: bytes per product by hand on a tiny case, the bandwidth
    bound's independence of sparsity, and the L2 model's program orders."""
    import traffic_model as tm

    # 2 blocks of 2x2, batch 4 in one row tile, 1-byte elements: per block x [4, 2] (or dy
    # [4, 2]) + the block, then y [4, 4] (dx [4, 6]); sdd: x and dy [4, 2] per block + dW
    assert tm.product_bytes("nt", 2, 4, 2, 2, 4, 6, block_r=4, elem=1) == 2 * (8 + 4) + 16
    assert tm.product_bytes("nn", 2, 4, 2, 2, 4, 6, block_r=4, elem=1) == 2 * (8 + 4) + 24
    assert tm.product_bytes("sdd", 2, 4, 2, 2, 4, 6, elem=1) == 2 * 8 + 2 * 8 + 2 * 4
    assert tm.product_bytes("sdd", 2, 4, 2, 2, 4, 6, group=2, elem=1) == 2 * 8 + 8 + 2 * 4
    intensity = [tm.product_flops(nnz, 4096, 64, 64) / tm.product_bytes(
        "nt", nnz, 4096, 64, 64, 4096, 4096, block_r=256) for nnz in (410, 2048)]
    assert abs(intensity[0] / intensity[1] - 1) < 0.1 and max(intensity) < 64
    # an L2 too small for a few row tiles: line-major reads less from memory; a large one
    # holds everything: both read each tile once
    small = [tm.l2_reads(order, n=512, batch=512, blk=64, density=0.25, block_r=64, l2_mb=0.2,
                         in_flight=16)[0] for order in (False, True)]
    assert small[1] < small[0]
    large = [tm.l2_reads(order, n=512, batch=512, blk=64, density=0.25, block_r=64, l2_mb=64,
                         in_flight=16) for order in (False, True)]
    assert large[0] == large[1] and large[0][0] < small[1]
