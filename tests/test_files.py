"""Atomic writes (mode from the umask, nothing left by a failed write) and the exclusive lock."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from sae_cache.sae_common import files
from sae_cache.sae_common.files import Locked, acquire_lock, write_atomic


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_write_atomic_replaces_the_file_with_the_umask_mode_and_returns_its_sha256(tmp_path, umask_027):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    assert write_atomic(path, b"new content") == hashlib.sha256(b"new content").hexdigest()
    assert path.read_bytes() == b"new content"
    assert os.stat(path).st_mode & 0o777 == 0o640  # 0666 less the umask, as open() makes files: not 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)  # the data is written, flushing it to disk fails
    with pytest.raises(OSError) as raised:
        write_atomic(path, b"x" * 10_000)
    assert raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_the_lock_is_exclusive_names_its_holder_and_is_freed_on_close(tmp_path):
    fd = acquire_lock(tmp_path / "lock")
    with pytest.raises(Locked) as raised:
        acquire_lock(tmp_path / "lock")  # a second open file description conflicts, even in one process
    assert raised.value.holder == str(os.getpid())
    os.close(fd)
    os.close(acquire_lock(tmp_path / "lock"))
