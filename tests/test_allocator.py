"""The allocator setting `sae` makes at start-up: large freed blocks stay in the heap for the next step."""

import ctypes
import json
import os
import subprocess
import sys

import pytest

from sae_cache.sae_common.allocator import USER_SETTINGS

# Run in a fresh interpreter: the setting is process-wide and one-way, so it must not leak into this one.
PROBE = r"""
import ctypes, json, sys
import numpy as np
from sae_cache.sae_common.allocator import retain_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
retained = retain_freed_memory() if sys.argv[1] == "retain" else None
before = libc.mallinfo2()
x = np.ones(64 << 20, np.uint8)  # 64 MiB: above the largest threshold glibc picks by itself (32 MiB)
mapped = libc.mallinfo2().hblkhd - before.hblkhd
del x
heap_kept = libc.mallinfo2().arena - before.arena
print(json.dumps({"retained": retained, "mapped": mapped, "heap_kept": heap_kept}))
"""


def probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS} | env
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=clean, check=True)
    return json.loads(done.stdout)


glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                           reason="glibc >= 2.33 only (mallinfo2)")


@glibc
def test_large_blocks_come_from_the_heap_and_stay_there_once_set():
    default = probe("default")
    assert default["mapped"] >= 64 << 20 and default["heap_kept"] < 16 << 20  # glibc alone: mapped, then unmapped
    retained = probe("retain")
    assert retained["retained"] is True
    assert retained["mapped"] == 0 and retained["heap_kept"] > 48 << 20  # from the heap, and kept after free


@glibc
def test_a_users_own_allocator_settings_are_left_alone():
    left = probe("retain", MALLOC_MMAP_THRESHOLD_="1048576")
    assert left["retained"] is False and left["mapped"] >= 64 << 20
