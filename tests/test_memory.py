"""sparsekern.memory: freed large blocks are reused instead of faulted in again."""
import subprocess
import sys

import pytest

from sparsekern import memory

# Rounds of a loop that allocates and frees tensors of 64, 16 and 32 MiB (the first and last
# above glibc's largest adaptive mmap threshold); prints the minor page faults of the last four
# rounds, after the heap's layout has settled.
_SCRIPT = """
import resource, sys, torch
import sparsekern
if sys.argv[1] == "retain":
    assert sparsekern.retain_freed_cpu_memory()
    assert sparsekern.memory.retaining_freed_cpu_memory()
def loop_round():
    a = torch.empty(16 * 2**20).fill_(1.0)
    b = torch.empty(4 * 2**20).fill_(1.0)
    c = torch.empty(8 * 2**20).fill_(1.0)
for _ in range(10):
    loop_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    loop_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(memory._glibc() is None, reason="needs glibc's mallopt")
def test_retain_freed_cpu_memory_stops_refaulting_large_blocks():
    pages = 4 * 112 * 2**20 // 4096  # what four rounds of fresh blocks fault in
    assert _faults("default") > pages // 2  # glibc returns each block: faulted in again
    assert _faults("retain") < pages // 20  # reused


def test_retain_freed_cpu_memory_reports_what_it_did(monkeypatch):
    monkeypatch.setattr(memory, "_retaining", False)
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    assert memory.retain_freed_cpu_memory() is False
    assert memory.retaining_freed_cpu_memory() is False
