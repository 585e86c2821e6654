"""Writing a cache: create or resume, write whole shards, record each one only once it is on disk.

The completeness rule (DESIGN.md): a shard is either complete and recorded in the group attributes, or
absent. Arrays grow one shard at a time and the attributes (with the shard's checksums and how far into the
dataset it reached) are rewritten atomically after the shard's files are written, so a crash at any point
leaves a cache that reads as the shards recorded so far. Writers only write whole shards: zarr-python loses
data when parts of one shard are written concurrently. One writer at a time per cache, enforced by a lock.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from sae_cache.sae_common.cache_format import (
    ATTRS_KEY,
    FORMAT_VERSION,
    TOKENS,
    Cache,
    CacheError,
    STORAGE_DTYPE,
    acts_path,
    compressors,
    file_sha256,
    open_cache,
    shard_file,
)
from sae_cache.sae_common.files import Locked, acquire_lock

LOCK_FILE = ".writer.lock"


class CacheLockedError(CacheError):
    pass


class CacheWriter:
    """Owns a cache directory while it is being written: the lock, the arrays and the shard records."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path, self.meta = path, meta
        self.group = zarr.open_group(path, mode="r+")
        self._lock_fd: int | None = None

    # -- opening ---------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, meta: dict[str, Any], *, identity: dict[str, Any], overwrite: bool = False) -> "CacheWriter":
        """Create the cache at `path`, or reopen it to resume when its `identity` fields equal ours.

        `meta` holds the fixed attributes (model, hooks, d_model, dtype, layout, config, ...); `identity` is
        what must match for a resume; a mismatch raises naming the differing fields.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lock_fd = _acquire_lock(path)
        try:
            existing = open_cache(path).meta if (path / "zarr.json").exists() else None
            if existing is None or overwrite or existing["n_tokens"] == 0:
                # nothing to keep: leftovers of an interrupted creation, an empty cache, or --overwrite
                _clear_except_lock(path)
                existing = None
            if existing is not None:
                diff = {k: (existing["identity"].get(k), v) for k, v in identity.items() if existing["identity"].get(k) != v}
                diff.update({k: (v, None) for k, v in existing["identity"].items() if k not in identity})
                if diff:
                    lines = "; ".join(f"{k}: cache has {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
                    raise CacheError(f"{path} holds a cache made with a different config ({lines}). "
                                     "Use --overwrite to replace it, or --out to write elsewhere.")
                writer = cls(path, existing)
            else:
                writer = cls._create(path, meta, identity)
        except BaseException:
            os.close(lock_fd)
            raise
        writer._lock_fd = lock_fd
        return writer

    @classmethod
    def _create(cls, path: Path, meta: dict[str, Any], identity: dict[str, Any]) -> "CacheWriter":
        layout, dtype = meta["layout"], meta["dtype"]
        full = {"format_version": FORMAT_VERSION, **meta, "identity": identity,
                "n_tokens": 0, "shards": [], "complete": False}
        # The group is born with its attributes: a reader never sees a group that is not yet a cache.
        group = zarr.create_group(path, attributes={ATTRS_KEY: full})
        rows_c, rows_s = layout["rows_per_chunk"], layout["rows_per_shard"]
        codecs = compressors(meta["compression"], dtype)
        for hook in meta["hooks"]:
            group.create_array(acts_path(hook), shape=(0, meta["d_model"]), dtype=STORAGE_DTYPE[dtype],
                               chunks=(rows_c, meta["d_model"]), shards=(rows_s, meta["d_model"]),
                               compressors=codecs, fill_value=0)
        group.create_array(TOKENS, shape=(0,), dtype=np.int32, chunks=(rows_c,), shards=(rows_s,),
                           compressors=compressors(meta["compression"], "float32"), fill_value=0)
        return cls(path, full)

    # -- writing ---------------------------------------------------------------------------------------

    @property
    def n_shards(self) -> int:
        return len(self.meta["shards"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    def write_shard(self, acts: dict[str, np.ndarray], tokens: np.ndarray, progress: dict[str, Any]) -> int:
        """Append the next shard (every hook's rows and the tokens), then record it. Returns bytes written.

        Only the last shard of a cache may be shorter than `rows_per_shard`; `progress` is merged into the
        attributes with the record (e.g. how far into the dataset this shard reaches).
        """
        rows_s = self.meta["layout"]["rows_per_shard"]
        n = len(tokens)
        if self.n_tokens % rows_s:
            raise CacheError(f"{self.path} ends in a short shard; no shard can follow it")
        assert 0 < n <= rows_s and all(a.shape == (n, self.meta["d_model"]) for a in acts.values())
        start, index = self.n_tokens, self.n_shards
        arrays = {acts_path(h): a for h, a in acts.items()} | {TOKENS: tokens.astype(np.int32, copy=False)}
        sha, written = {}, 0
        for name, data in arrays.items():
            array = self.group[name]
            array.resize((start + n,) + array.shape[1:])
            array[start:start + n] = data  # one whole shard: one file, written atomically by the store
            file = shard_file(self.path, array, index)
            sha[name], written = file_sha256(file), written + file.stat().st_size
        self.meta = {**self.meta, **progress, "n_tokens": start + n,
                     "shards": [*self.meta["shards"], {"rows": n, "sha256": sha}]}
        self.group.attrs[ATTRS_KEY] = self.meta  # the store writes zarr.json atomically (temp file + rename)
        return written

    def finish(self, **fields: Any) -> None:
        """Mark the cache as complete (all tokens asked for are in) or record why it stopped early."""
        self.meta = {**self.meta, **fields}
        self.group.attrs[ATTRS_KEY] = self.meta

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def as_cache(self) -> Cache:
        return Cache(path=self.path, group=self.group, meta=self.meta)


def _acquire_lock(path: Path) -> int:
    """An exclusive flock on a file in the cache: released by the kernel when the process dies (kill -9 too)."""
    try:
        return acquire_lock(path / LOCK_FILE)
    except Locked as e:
        raise CacheLockedError(f"another process (pid {e.holder}) is writing the cache {path}; "
                               "wait for it to finish or stop it, then run again") from None


def _clear_except_lock(path: Path) -> None:
    for child in path.iterdir():
        if child.name == LOCK_FILE:
            continue
        shutil.rmtree(child) if child.is_dir() else child.unlink()

