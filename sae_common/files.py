"""Writing files safely, for every stage: atomic replacement (a reader, or a crash, never sees half a file) and
an exclusive lock on a directory (one writer at a time; the kernel releases it when the holder dies)."""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path


class Locked(Exception):
    """The lock is held by another process; `holder` is the pid it wrote into the lock file (or 'unknown')."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def acquire_lock(file: Path) -> int:
    """An exclusive flock on `file` (created if needed), which then holds our pid; returns the descriptor, whose
    closing releases the lock. The kernel releases it when the process dies, kill -9 included, so a crash never
    leaves a stale lock. Raises Locked at once, naming the holder, when another process has it."""
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise Locked(holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def write_atomic(path: Path, data: bytes) -> str:
    """Replace `path` with `data` and return its SHA-256 (hex).

    The bytes go to a temporary file beside it, are flushed to disk, and the file is renamed over `path`: a
    crash leaves the old content or the new, never part of either, and a file renamed later (a checkpoint's
    state.json) is never on disk before this one. Created like any other file (0666 less the umask, where
    safetensors' own writer makes 0600 files). A failed write (a full disk) removes its temporary file.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX: a rename is on disk once its directory is synced)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
