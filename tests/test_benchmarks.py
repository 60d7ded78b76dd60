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
