"""Writing a cache: create or resume, write whole shards, record each one only once it is on disk.

The completeness rule (DESIGN.md): a shard is either complete and recorded in the group attributes, or
absent. Arrays grow one shard at a time and the attributes (with the shard's checksums and how far into the
dataset it reached) are rewritten atomically after the shard's files are written, so a crash at any point
leaves a cache that reads as the shards recorded so far. Writers only write whole shards: zarr-python loses
data when parts of one shard are written concurrently. One writer at a time per cache, enforced by a lock.

The Zarr group is created with the first shard, and a writer closed before recording anything removes what it
made: a harvest that fails before its first shard (the dataset, the model, the disk) leaves no empty cache
for `sae train` to find. A kill -9 during a write leaves the store's `*.partial` temporary files; the next
writer removes them under the lock.
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
from sae_cache.sae_common.quantize import QUANTIZED_DTYPES, QuantizedRows, scales_path

LOCK_FILE = ".writer.lock"
PARTIAL = "*.partial"  # zarr's LocalStore writes each file as <name>.<uuid>.partial, then renames it


class CacheLockedError(CacheError):
    pass


class CacheWriter:
    """Owns a cache directory while it is being written: the lock, the arrays and the shard records."""

    def __init__(self, path: Path, meta: dict[str, Any], *, created: bool = True):
        self.path, self.meta = path, meta
        self.group = zarr.open_group(path, mode="r+") if created else None  # None until the first shard
        self._lock_fd: int | None = None
        self._made: Path | None = None  # the topmost directory open() made, removed if nothing gets recorded
        self._finished = False

    # -- opening ---------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, meta: dict[str, Any], *, identity: dict[str, Any], overwrite: bool = False) -> "CacheWriter":
        """Open the cache at `path` to create it, or to resume it when its `identity` fields equal ours.

        `meta` holds the fixed attributes (model, hooks, d_model, dtype, layout, config, ...); `identity` is
        what must match for a resume; a mismatch raises naming the differing fields.
        """
        path = Path(path)
        made = next((p for p in [*reversed(path.parents), path] if not p.exists()), None)
        path.mkdir(parents=True, exist_ok=True)
        lock_existed = (path / LOCK_FILE).exists()
        lock_fd = _acquire_lock(path)
        try:
            existing = open_cache(path).meta if (path / "zarr.json").exists() else None
            if existing is None:
                refuse_foreign(path)  # --overwrite replaces a cache, never a folder of other files
            _remove_partials(path)  # under the lock: no other writer can be mid-write
            if existing is None or overwrite or existing["n_tokens"] == 0:
                # nothing to keep: a creation killed before its first shard was recorded, or --overwrite
                _clear_except_lock(path)
                existing = None
            if existing is not None and "identity" not in existing:
                raise CacheError(f"{path} holds a cache written by another tool (no 'identity' record to resume "
                                 "against); use --overwrite to replace it, or --out to write elsewhere")
            if existing is not None:
                diff = {k: (existing["identity"].get(k), v) for k, v in identity.items() if existing["identity"].get(k) != v}
                diff.update({k: (v, None) for k, v in existing["identity"].items() if k not in identity})
                if diff:
                    lines = "; ".join(f"{k}: cache has {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
                    raise CacheError(f"{path} holds a cache made with a different config ({lines}). "
                                     "Use --overwrite to replace it, or --out to write elsewhere.")
                writer = cls(path, existing)
            else:
                full = {"format_version": FORMAT_VERSION, **meta, "identity": identity,
                        "n_tokens": 0, "shards": [], "complete": False}
                writer = cls(path, full, created=False)
        except BaseException:  # leave the directory as it was
            if not lock_existed:
                (path / LOCK_FILE).unlink(missing_ok=True)
            _remove_made(path, made)
            os.close(lock_fd)
            raise
        writer._lock_fd, writer._made = lock_fd, made
        return writer

    def _create(self) -> None:
        path, meta = self.path, self.meta
        layout, dtype = meta["layout"], meta["dtype"]
        # The group is born with its attributes: a reader never sees a group that is not yet a cache.
        group = zarr.create_group(path, attributes={ATTRS_KEY: meta})
        rows_c, rows_s = layout["rows_per_chunk"], layout["rows_per_shard"]
        codecs = compressors(meta["compression"], dtype)
        for hook in meta["hooks"]:
            group.create_array(acts_path(hook), shape=(0, meta["d_model"]), dtype=STORAGE_DTYPE[dtype],
                               chunks=(rows_c, meta["d_model"]), shards=(rows_s, meta["d_model"]),
                               compressors=codecs, fill_value=0)
            if dtype in QUANTIZED_DTYPES:  # each row's scale, beside its codes
                group.create_array(scales_path(hook), shape=(0, 1), dtype=np.float32, chunks=(rows_c, 1),
                                   shards=(rows_s, 1), compressors=compressors(meta["compression"], "float32"),
                                   fill_value=0)
        group.create_array(TOKENS, shape=(0,), dtype=np.int32, chunks=(rows_c,), shards=(rows_s,),
                           compressors=compressors(meta["compression"], "float32"), fill_value=0)
        self.group = group

    # -- writing ---------------------------------------------------------------------------------------

    @property
    def n_shards(self) -> int:
        return len(self.meta["shards"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    def write_shard(self, acts: dict[str, np.ndarray | QuantizedRows], tokens: np.ndarray, progress: dict[str, Any]) -> int:
        """Append the next shard (every hook's rows and the tokens), then record it. Returns bytes written.

        `acts` holds what `to_storage` makes for the cache's dtype: arrays, or an int8 cache's codes and scales.
        Only the last shard of a cache may be shorter than `rows_per_shard`; `progress` is merged into the
        attributes with the record (e.g. how far into the dataset this shard reaches).
        """
        rows_s = self.meta["layout"]["rows_per_shard"]
        n = len(tokens)
        if self.n_tokens % rows_s:
            raise CacheError(f"{self.path} ends in a short shard; no shard can follow it")
        assert 0 < n <= rows_s and all(a.shape == (n, self.meta["d_model"]) for a in acts.values())
        if self.group is None:
            self._create()
        start, index = self.n_tokens, self.n_shards
        arrays = {}
        for h, a in acts.items():
            arrays |= ({acts_path(h): a.codes_ND, scales_path(h): a.scales_N1} if isinstance(a, QuantizedRows)
                       else {acts_path(h): a})
        arrays[TOKENS] = tokens.astype(np.int32, copy=False)
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
        if self.group is None:
            self._create()  # asked for explicitly: a cache that records why it holds nothing
        self.group.attrs[ATTRS_KEY] = self.meta
        self._finished = True

    def close(self) -> None:
        if self._lock_fd is None:
            return
        if self.n_tokens == 0 and not self._finished:  # nothing recorded: leave nothing for `sae train` to find
            _clear_except_lock(self.path)
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            _remove_made(self.path, self._made)
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


def _remove_partials(path: Path) -> None:
    for leftover in path.rglob(PARTIAL):
        leftover.unlink(missing_ok=True)


def refuse_foreign(path: Path) -> None:
    """Refuse to clear a directory that holds anything but what a cache's creation leaves before zarr.json is
    in place: the lock, and zarr.json's own temporary file if it was killed writing it."""
    foreign = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE and not p.match("zarr.*.partial"))
    if foreign:
        raise CacheError(f"{path} is a directory that is not an activation cache (it holds {', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); choose another --out, or remove it yourself")


def _remove_made(path: Path, made: Path | None) -> None:
    """Remove the directories open() made, from `path` up to `made`, where they are empty."""
    if made is None:
        return
    for directory in [path, *path.parents]:
        try:
            directory.rmdir()
        except OSError:  # not empty (or gone): leave it and everything above it
            return
        if directory == made:
            return


def _clear_except_lock(path: Path) -> None:
    for child in path.iterdir():
        if child.name == LOCK_FILE:
            continue
        shutil.rmtree(child) if child.is_dir() else child.unlink()

