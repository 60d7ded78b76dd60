"""SPARSEKERN_ISA caps the CPU kernels' ISA (read once per process): every capped ISA must still
match the reference. Each ISA runs in its own subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sparsekern

TESTS = Path(__file__).resolve().parent

# Block shapes chosen so that, for each ISA's vector length (AVX-512: 16 f32 / 8 f64, AVX2: 8 / 4,
# base: 4 / 2), both kernel families run: block widths that are and are not multiples of it.
SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, {tests!r})
import sparsekern
from sparsekern import ops, reference
from conftest import assert_close, make_matrix, oracle_dds, oracle_sdd

checked = 0
for dtype in (torch.float32, torch.float64):
    for block_shape in [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (3, 5), (16, 8), (4, 12)]:
        for kind in ("sparse", "dense"):
            m = make_matrix(block_shape, kind, dtype)
            Mp, Kp = m.padded_shape
            bm, bk = block_shape
            topo = m.topology()
            for batch in (1, 37, 70):
                g = torch.Generator().manual_seed(batch)
                x = torch.randn(batch, Kp, generator=g, dtype=dtype)
                dy = torch.randn(Mp, batch, generator=g, dtype=dtype).t()  # non-contiguous
                y = ops.dds(x, m.values, *topo, Mp, Kp, True, "cpu")
                assert_close(y, reference.dds(x, m.values, m.row_idx, m.col_idx, Mp, Kp, True))
                assert_close(y, oracle_dds(x, m.values, m.row_offsets, m.col_idx, Mp, Kp, True))
                dx = ops.dds(dy, m.values, *topo, Mp, Kp, False, "cpu")
                assert_close(dx, oracle_dds(dy, m.values, m.row_offsets, m.col_idx, Mp, Kp,
                                            False))
                assert_close(dx, reference.dds(dy, m.values, m.row_idx, m.col_idx, Mp, Kp, False))
                dw = ops.sdd(dy, x, *topo, bm, bk, "cpu")
                assert_close(dw, oracle_sdd(dy, x, m.row_idx, m.col_idx, bm, bk))
                assert_close(dw, reference.sdd(dy, x, m.row_idx, m.col_idx, bm, bk))
                checked += 1
print(json.dumps({{"isa": sparsekern.ops.native_extension().cpu_isa(), "checked": checked}}))
"""


def _run(isa: str | None) -> dict:
    env = dict(os.environ)
    env.pop("SPARSEKERN_ISA", None)
    if isa is not None:
        env["SPARSEKERN_ISA"] = isa
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(TESTS))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"SPARSEKERN_ISA={isa}: rc={proc.returncode}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _native_isa() -> str:
    return sparsekern.ops.native_extension().cpu_isa()


@pytest.fixture(scope="module")
def native_isa():
    if os.environ.get("SPARSEKERN_ISA"):
        # this process is itself capped: ask a clean subprocess
        return _run(None)["isa"]
    return _native_isa()


LEVEL = {"base": 0, "avx2": 1, "avx512": 2}


@pytest.mark.parametrize("cap", ["avx2", "base"])
def test_capped_isa_matches_reference(cap, native_isa):
    out = _run(cap)
    expected = cap if LEVEL[native_isa] >= LEVEL[cap] else native_isa
    assert out["isa"] == expected
    assert out["checked"] == 2 * 8 * 2 * 3


def test_unknown_isa_value_is_ignored(native_isa):
    out = _run("sse9")
    assert out["isa"] == native_isa
