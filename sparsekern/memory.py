"""Keep freed CPU memory in the process, so large activations stop paying page faults.

glibc's malloc hands every block of 32 MiB or more to the kernel with mmap and gives it back with
munmap on free (its mmap threshold adapts to freed blocks, but only up to 32 MiB). A training
step allocates and frees the same large activations and gradients in every forward and backward
(a float [128, 64, 32, 32] batch is exactly 32 MiB), so each of them is faulted in again, page by
page: 8192 faults, ~6-10 ms per tensor on the Intel host of benchmarks/RESULTS.md, about a third
of a 90%-sparse adversarial-training step there (its dense twin hides the same cost behind
slower convolutions).

`retain_freed_cpu_memory()` tells malloc to serve large blocks from its heap and never to trim
the heap, so freed blocks are reused. It is the cure PyTorch's CPU performance guide gives with
jemalloc or tcmalloc (LD_PRELOAD), without a new dependency; setting MALLOC_MMAP_MAX_=0 and
MALLOC_TRIM_THRESHOLD_=<large> in the environment before Python starts does the same.

It is process-wide and one-way: memory freed after the call stays in the process for reuse, so
the resident size stays near the peak (plus some fragmentation: the first few rounds of a loop
can leave a block or two of their size behind before the pattern settles). Blocks of 1 GiB and
more still get their own mapping. Call it once, at the start of a CPU training or attack run.
"""
from __future__ import annotations

import ctypes
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
_HUGE = 2**30  # blocks of 1 GiB and more still get their own mapping (and go back on free)

_retaining = False


def _glibc():
    """The process's C library if it is glibc (mallopt with glibc's parameter numbers), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (raises AttributeError on musl and others)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def retain_freed_cpu_memory() -> bool:
    """Makes malloc keep and reuse freed memory instead of returning large blocks to the kernel.

    Returns True if the setting is in effect (glibc), False where it cannot be applied (another
    C library or OS: nothing changes). Safe to call more than once.
    """
    global _retaining
    if _retaining:
        return True
    libc = _glibc()
    if libc is None:
        return False
    # Both are needed: large blocks must come from the heap (a glibc that refuses an mmap
    # threshold above 32 MiB gets M_MMAP_MAX=0 instead: no block is mapped on its own), and
    # the heap must not be trimmed (a freed block at its top would be returned).
    from_heap = (libc.mallopt(_M_MMAP_THRESHOLD, _HUGE) == 1
                 or libc.mallopt(_M_MMAP_MAX, 0) == 1)
    ok = from_heap and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    _retaining = ok
    return ok


def retaining_freed_cpu_memory() -> bool:
    """Whether retain_freed_cpu_memory() took effect in this process."""
    return _retaining
