"""Writing a cache: create or resume, write whole shards, record each one only once it is on disk.

The completeness rule (DESIGN.md): a shard is either complete and recorded in the group attributes, or
absent. Arrays grow one shard at a time and the attributes (with the shard's checksums and how far into the
dataset it reached) are rewritten atomically after the shard's files are written, so a crash at any point
leaves a cache that reads as the shards recorded so far. Writers only write whole shards: zarr-python loses
data when parts of one shard are written concurrently. One writer at a time per cache, enforced by a lock.
Under torchrun that writer is rank 0's: every rank writes its own shards' files (`write_shard_files`, no lock,
nothing recorded) and rank 0 records them (`record_shard`) once they are all on disk.

The Zarr group is created with the first shard (or by `prepare`, before other processes write shards), and a
writer closed before recording anything removes what it made: a harvest that fails before its first shard
(the dataset, the model, the disk) leaves no empty cache for `sae train` to find. A kill -9 during a write
leaves `*.partial` temporary files; the next writer removes them under the lock, and `prepare` removes the
files of shards that were written but never recorded.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import MemoryStore

from sae_cache.sae_common.cache_format import (
    ATTRS_KEY,
    FORMAT_VERSION,
    TOKENS,
    Cache,
    CacheError,
    STORAGE_DTYPE,
    acts_path,
    array_names,
    compressors,
    file_sha256,
    open_cache,
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
        # The group is born with its attributes: a reader never sees a group that is not yet a cache.
        group = zarr.create_group(self.path, attributes={ATTRS_KEY: self.meta})
        for name, spec in array_specs(self.meta).items():
            group.create_array(name, shape=(0, *spec.pop("shape")[1:]), **spec)
        self.group = group

    def prepare(self) -> None:
        """Make the arrays exist, and drop every shard file past the recorded ones (left by a killed run), before
        other processes write shards into the cache with `write_shard_files`: a resize here never deletes them."""
        if self.group is None:
            self._create()
            return
        for name in array_names(self.meta):
            array = self.group[name]
            if array.shape[0] != self.n_tokens:
                array.resize((self.n_tokens,) + array.shape[1:])
            _remove_shards_from(self.path / name, self.n_shards)

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
        self._check_appendable(len(tokens))
        if self.group is None:
            self._create()
        sha, written = write_shard_files(self.path, self.meta, self.n_shards, acts, tokens)
        self.record_shard(len(tokens), sha, progress)
        return written

    def record_shard(self, rows: int, sha: dict[str, str], progress: dict[str, Any]) -> None:
        """Record the next shard, whose files (checksums `sha`) are on disk: the arrays grow over it and the
        attributes are rewritten atomically. Files of later shards, written by other processes, are left alone."""
        self._check_appendable(rows)
        start = self.n_tokens
        for name in array_names(self.meta):
            array = self.group[name]
            array.resize((start + rows,) + array.shape[1:])  # growing: no file is touched
        self.meta = {**self.meta, **progress, "n_tokens": start + rows,
                     "shards": [*self.meta["shards"], {"rows": rows, "sha256": sha}]}
        self.group.attrs[ATTRS_KEY] = self.meta  # the store writes zarr.json atomically (temp file + rename)

    def _check_appendable(self, rows: int) -> None:
        rows_s = self.meta["layout"]["rows_per_shard"]
        if self.n_tokens % rows_s:
            raise CacheError(f"{self.path} ends in a short shard; no shard can follow it")
        assert 0 < rows <= rows_s

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


def array_specs(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each array's creation arguments (its full shape at `meta["n_tokens"]` rows): the one definition of how a
    cache's arrays are chunked, sharded and compressed."""
    layout, dtype, d, n = meta["layout"], meta["dtype"], meta["d_model"], meta["n_tokens"]
    rows_c, rows_s = layout["rows_per_chunk"], layout["rows_per_shard"]
    specs = {acts_path(h): {"shape": (n, d), "dtype": STORAGE_DTYPE[dtype], "chunks": (rows_c, d),
                            "shards": (rows_s, d), "compressors": compressors(meta["compression"], dtype),
                            "fill_value": 0} for h in meta["hooks"]}
    if dtype in QUANTIZED_DTYPES:  # each row's scale, beside its codes
        for h in meta["hooks"]:
            specs[scales_path(h)] = {"shape": (n, 1), "dtype": np.float32, "chunks": (rows_c, 1), "shards": (rows_s, 1),
                                     "compressors": compressors(meta["compression"], "float32"), "fill_value": 0}
    specs[TOKENS] = {"shape": (n,), "dtype": np.int32, "chunks": (rows_c,), "shards": (rows_s,),
                     "compressors": compressors(meta["compression"], "float32"), "fill_value": 0}
    return specs


def write_shard_files(path: Path, meta: dict[str, Any], index: int, acts: dict[str, np.ndarray | QuantizedRows],
                      tokens: np.ndarray) -> tuple[dict[str, str], int]:
    """Write shard `index`'s file of every array whole, recording nothing; returns (SHA-256 per array, bytes).

    Any process may call this for a shard no other process writes (under torchrun each rank writes its own):
    the shard is encoded by zarr in memory, as an array of its own rows with the cache's settings (a shard's
    bytes depend only on its rows), then written beside its place as a `*.partial` file and renamed over it.
    The arrays' directories must exist (`CacheWriter.prepare`); they are never made here, so a rank cannot
    recreate a cache that rank 0 has just removed."""
    n = len(tokens)
    assert 0 < n <= meta["layout"]["rows_per_shard"]
    data = {TOKENS: tokens.astype(np.int32, copy=False)}
    for h, a in acts.items():  # `acts` holds what `to_storage` makes: arrays, or an int8 cache's codes and scales
        data |= ({acts_path(h): a.codes_ND, scales_path(h): a.scales_N1} if isinstance(a, QuantizedRows)
                 else {acts_path(h): a})
    assert all(len(a) == n for a in data.values()) and all(data[acts_path(h)].shape[1] == meta["d_model"] for h in acts)
    sha, written = {}, 0
    for name, spec in array_specs({**meta, "n_tokens": n}).items():
        encoded: dict = {}
        memory = zarr.create_array(MemoryStore(encoded), **spec)
        memory[:] = data[name]
        (key,) = [k for k in encoded if k != "zarr.json"]  # the one shard file
        target = path / name / memory.metadata.encode_chunk_key((index,) + (0,) * (memory.ndim - 1))
        _write_file(target, encoded[key].to_bytes(), stop=path / name)
        sha[name], written = file_sha256(target), written + target.stat().st_size
    return sha, written


def _write_file(target: Path, data: bytes, stop: Path) -> None:
    """Write `target` whole: a temporary file named like zarr's (removed by the next writer if killed), then a
    rename. Missing directories between `stop` (which must exist) and the file are made."""
    missing = [d for d in target.parents if d != stop and stop in d.parents and not d.exists()]
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)  # never parents=True: `stop` must exist
    tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_shards_from(array_dir: Path, first: int) -> None:
    """Remove the files of shards `first`, `first` + 1, ... of an array (zarr's default keys: c/<shard>/...)."""
    chunks = array_dir / "c"
    for entry in chunks.iterdir() if chunks.is_dir() else []:
        if entry.name.isdigit() and int(entry.name) >= first:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


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

