"""The activation cache: the contract between harvest, train and eval (format version 1).

A cache is a Zarr v3 group directory. It holds `acts/<hook name>` arrays of shape (n_tokens, d_model) and a
`tokens` array of shape (n_tokens,), rows aligned, all sharded along rows in the same grid. Everything else
(what model, which data, how far, per-shard checksums) lives in the group attributes under `sae_cache`.
Any Zarr reader can read it; this module adds the dtype view (bfloat16 is stored as uint16 bits), the
chunk/shard sizing and verification.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from sae_cache.sae_common.errors import UserError

FORMAT_VERSION = 1
DEFAULT_ROOT = Path("cache")  # where caches and runs go when the command line names no path
ATTRS_KEY = "sae_cache"
TOKENS = "tokens"
DTYPES = ("bfloat16", "float16", "float32")
COMPRESSIONS = ("zstd", "lz4", "none")

# Zarr has no bfloat16: its raw bits are stored as uint16 and viewed back on read.
STORAGE_DTYPE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}
TORCH_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Measured compression ratios of residual-stream activations with Blosc zstd-1 + byte shuffle (DESIGN.md);
# used only to estimate the size of a cache before writing it. Anything unmeasured is assumed incompressible.
EXPECTED_RATIO = {("zstd", "bfloat16"): 1.45, ("zstd", "float16"): 1.17}

TARGET_CHUNK_BYTES = 4 << 20  # inner chunks of a few MB: the unit of decoding and random access
TARGET_SHARD_BYTES = 256 << 20  # shards of a few hundred MB: the unit of writing and checksumming


def acts_path(hook: str) -> str:
    return f"acts/{hook}"


def itemsize(dtype: str) -> int:
    return np.dtype(STORAGE_DTYPE[dtype]).itemsize


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A float tensor -> the numpy array stored for the logical `dtype` (bf16 -> its uint16 bits)."""
    return storage_view(x.detach().to("cpu", TORCH_DTYPE[dtype]).contiguous(), dtype)


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """The inverse of `to_storage`: stored rows -> a tensor of the logical dtype (no copy where possible)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == "bfloat16":
        return t.view(torch.bfloat16)
    return t


def storage_view(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A numpy view (no copy) of a tensor of the logical `dtype` as the stored array type (bf16 -> uint16 bits)."""
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def compressors(compression: str, dtype: str) -> list | None:
    """Blosc with byte shuffle and 1 MiB blocks. Measured on bf16 residual activations (2-core dev machine,
    one core): zstd-1 1.47x, decoding 1.1-1.6 GB/s; lz4-5 1.15x, decoding 3.5-4 GB/s. DESIGN.md's 2.7 GB/s
    per core for zstd was not reached there."""
    if compression == "none":
        return None
    level = 1 if compression == "zstd" else 5
    return [BloscCodec(cname=compression, clevel=level, shuffle="shuffle", typesize=itemsize(dtype), blocksize=1 << 20)]


def layout_for(d_model: int, dtype: str, context_size: int, rows_per_shard: int | None = None) -> dict[str, int]:
    """Rows per chunk and per shard: whole contexts per chunk, whole chunks per shard."""
    seq_bytes = context_size * d_model * itemsize(dtype)
    seqs_per_chunk = max(1, round(TARGET_CHUNK_BYTES / seq_bytes))
    rows_per_chunk = seqs_per_chunk * context_size
    if rows_per_shard is None:
        rows_per_shard = rows_per_chunk * max(1, round(TARGET_SHARD_BYTES / (rows_per_chunk * d_model * itemsize(dtype))))
    if rows_per_shard % context_size:
        raise ValueError(f"rows per shard ({rows_per_shard}) must be a multiple of the context size ({context_size})")
    rows_per_chunk = min(rows_per_chunk, rows_per_shard)
    while rows_per_shard % rows_per_chunk:  # shards hold whole chunks
        rows_per_chunk -= context_size
    return {"rows_per_chunk": rows_per_chunk, "rows_per_shard": rows_per_shard}


class CacheError(UserError):
    """A cache that is missing, not a cache, of another format version, or damaged."""


@dataclass
class Cache:
    """An open cache: its group, its metadata and the dtype view of its arrays."""

    path: Path
    group: zarr.Group
    meta: dict[str, Any]

    @property
    def hooks(self) -> list[str]:
        return list(self.meta["hooks"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def d_model(self) -> int:
        return int(self.meta["d_model"])

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    def acts(self, hook: str) -> zarr.Array:
        if hook not in self.meta["hooks"]:
            raise CacheError(f"hook {hook!r} is not in the cache {self.path}; it has: {', '.join(self.hooks)}")
        return self.group[acts_path(hook)]

    def tokens(self) -> zarr.Array:
        return self.group[TOKENS]

    def read_rows(self, hook: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one hook as a tensor of the logical dtype."""
        return from_storage(self.acts(hook)[start:stop], self.dtype)

    def disk_bytes(self) -> int:
        """Bytes of the cache's files; a killed write's `*.partial` temporary files are not the cache's."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file() and f.suffix != ".partial")


def open_cache(path: str | Path) -> Cache:
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise CacheError(f"{path} is not an activation cache (no zarr.json there); `sae harvest` writes one")
    group = zarr.open_group(path, mode="r")
    meta = group.attrs.get(ATTRS_KEY)
    if meta is None:
        raise CacheError(f"{path} is a Zarr group but not an activation cache (no '{ATTRS_KEY}' attributes)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path} has cache format version {meta.get('format_version')}; this tool reads {FORMAT_VERSION}")
    return Cache(path=path, group=group, meta=dict(meta))


def shard_file(path: Path, array: zarr.Array, shard_index: int) -> Path:
    """Where shard `shard_index` (along rows) of `array` lives in a local directory store."""
    coords = (shard_index,) + (0,) * (array.ndim - 1)
    return path / array.path / array.metadata.encode_chunk_key(coords)


def file_sha256(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def array_names(meta: dict[str, Any]) -> list[str]:
    return [acts_path(h) for h in meta["hooks"]] + [TOKENS]


def verify(cache: Cache, checksums: bool = True) -> list[str]:
    """Every recorded shard of every array present and (if `checksums`) matching its checksum; returns the
    problems found. Without checksums it only looks at the files (instant, for a start-up check)."""
    problems = []
    shards = cache.meta["shards"]
    if sum(s["rows"] for s in shards) != cache.n_tokens:
        problems.append(f"the shards record {sum(s['rows'] for s in shards)} rows but n_tokens is {cache.n_tokens}")
    for name in array_names(cache.meta):
        if name not in cache.group:
            problems.append(f"array {name} is missing")
            continue
        array = cache.group[name]
        if array.shape[0] < cache.n_tokens:
            problems.append(f"array {name} has {array.shape[0]} rows, fewer than n_tokens={cache.n_tokens}")
        for i, shard in enumerate(shards):
            file = shard_file(cache.path, array, i)
            if not file.is_file():
                problems.append(f"shard {i} of {name} is missing ({file})")
            elif checksums and file_sha256(file) != shard["sha256"][name]:
                problems.append(f"shard {i} of {name} does not match its checksum ({file})")
    return problems


def find_caches(root: str | Path) -> list[Path]:
    """The caches under `root` that hold tokens, newest first (by last modification of their metadata). Empty
    ones (0 tokens: left by a harvest that failed before its first shard, before harvests removed them) and
    directories that are not caches are passed over: `sae train` without --cache must not pick them."""
    found = []
    for p in Path(root).rglob("zarr.json"):
        try:
            meta = json.loads(p.read_text()).get("attributes", {}).get(ATTRS_KEY) if p.parent.suffix == ".zarr" else None
        except (OSError, ValueError):  # unreadable: not something train could use
            continue
        if meta is not None and meta.get("n_tokens") != 0:  # another format version stays, for its message
            found.append(p.parent)
    return sorted(found, key=lambda p: (p / "zarr.json").stat().st_mtime, reverse=True)


def holdout_start(cache: Cache, fraction: float = 0.02) -> int:
    """First row of the held-out tail that training never reads and evaluation uses.

    The tail is whole chunks (so the loader never splits one), at least `fraction` of the rows and at least
    one chunk, but never more than half the cache. Rows are whole contexts, so the tail is too.
    """
    n, chunk = cache.n_tokens, cache.meta["layout"]["rows_per_chunk"]
    n_chunks = -(-n // chunk)
    tail_chunks = min(max(1, -(-int(n * fraction) // chunk)), n_chunks // 2)
    if tail_chunks == 0:
        raise CacheError(f"the cache {cache.path} has {n} tokens in {n_chunks} chunk(s): too few to hold any out")
    return (n_chunks - tail_chunks) * chunk
