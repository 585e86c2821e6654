"""Keeping freed memory in the process, so that the tensors a training step allocates reuse warm pages.

glibc's malloc serves an allocation above M_MMAP_THRESHOLD (128 KiB, raised on the fly up to 32 MiB) with a fresh
mmap, unmaps it on free, and gives the top of its heap back to the kernel beyond M_TRIM_THRESHOLD. A training
step allocates its pre-activations (B x F float32: 200 MB at the BatchTopK paper's GPT-2 shape) and their
gradients anew each step, so the kernel zero-fills them page by page each time: on the 2-core CPU this was
~150,000 page faults and ~0.4 s of system time in a 0.9 s step. With freed memory kept, the same step ran in
0.68 s with almost no faults, for ~10% more peak memory (bench/train_bench.py --allocator default|retain).
The thresholds are process-wide, which is why the `sae` command sets them once, when it starts; code that
calls train() or harvest() from Python gets the same by calling retain_freed_memory() first.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
LIMIT = 2**31 - 1  # the largest value mallopt takes (an int): allocations below 2 GiB come from the heap
# The same setting for another process (e.g. a baseline in a benchmark), through glibc's environment variables
AS_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(LIMIT), "MALLOC_TRIM_THRESHOLD_": str(LIMIT)}
USER_SETTINGS = (*AS_ENVIRONMENT, "GLIBC_TUNABLES", "LD_PRELOAD")


def retain_freed_memory() -> bool:
    """Keep freed memory for reuse (glibc only); whether the setting was made.

    Does nothing where the C library is not glibc, or where the user already chose an allocator or its
    settings (GLIBC_TUNABLES, the MALLOC_*_ variables, or a preloaded malloc such as jemalloc or tcmalloc).
    """
    if not sys.platform.startswith("linux") or any(os.environ.get(name) for name in USER_SETTINGS):
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: mallopt is absent or a no-op
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, LIMIT)) and bool(libc.mallopt(M_TRIM_THRESHOLD, LIMIT))
