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


def test_traffic_model(capsys):
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
    # ceilings: unbounded tiles re-read only x (1/bm bytes per FLOP) in the forward, so
    # 64x64 at 90% (410 blocks, 13.8 GFLOP) at 1 TB/s takes 13.8e9 / 64 bytes: 215 us; the
    # kernels' tiles move more, and a sparser W gains more
    c = tm.ceilings(64, 64, 0.9, tbs=1.0, dense_us=430, dense_fb_us=1000)
    flops = 2 * 410 * 64 * 64 * 4096
    assert abs(c["fwd_unbounded_us"] - flops / 64 / 1e6) < 1e-6
    assert abs(c["x_dense_unbounded"] - 430 / (flops / 64 / 1e6)) < 1e-9
    assert abs(c["fb_unbounded_us"] - 3 * flops / 64 / 1e6) < 1e-6
    assert c["fwd_us"] > c["fwd_unbounded_us"] and c["fb_us"] > c["fb_unbounded_us"]
    assert tm.ceilings(64, 64, 0.99, 1.0, 430, 1000)["x_dense"] > c["x_dense"]
    # tall blocks: x's slice serves bm = 128 outputs, dy's (dy @ W) bk = 32 inputs
    tall = tm.ceilings(128, 32, 0.9, 1.0, 430, 1000)
    flops = 2 * 410 * 128 * 32 * 4096
    assert abs(tall["fwd_unbounded_us"] - flops / 128 / 1e6) < 1e-6
    assert abs(tall["fb_unbounded_us"] - flops * (1 / 128 + 1 / 32 + 1 / 128) / 1e6) < 1e-6
    # RESULTS.md's figures: the TB/s each target needs against the H100's dense times
    def needs(bm, sparsity, target, key):
        return round(target / tm.ceilings(bm, bm, sparsity, 1.0, 165, 498)[key], 1)
    assert needs(64, 0.9, 6, "x_dense_unbounded") == 7.8
    assert needs(32, 0.9, 4, "x_dense_unbounded") == 10.4
    assert needs(64, 0.9, 4, "x_dense_fb") == 7.0
    assert needs(64, 0.9, 4, "x_dense_fb_unbounded") == 5.2
    assert tm.main([]) == 0 and "Ceilings at 5.5 TB/s" in capsys.readouterr().out
