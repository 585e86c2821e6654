"""The activation cache: the contract between harvest, train and eval (format version 1).

A cache is a Zarr v3 group directory. It holds `acts/<hook name>` arrays of shape (n_tokens, d_model) and a
`tokens` array of shape (n_tokens,), rows aligned, all sharded along rows in the same grid. Everything else
(what model, which data, how far, per-shard checksums) lives in the group attributes under `sae_cache`.
Any Zarr reader can read it; this module adds the dtype view (bfloat16 is stored as uint16 bits; an int8 cache
adds `scales/<hook>` arrays, sae_common/quantize.py), the chunk/shard sizing and verification.

Integrity: every inner chunk ends with its CRC32C (zarr's `crc32c` codec, the last bytes-to-bytes codec, so any
Zarr reader checks it on every read), and every shard file's SHA-256 is recorded in the attributes (`sae cache
verify`). Caches written before the CRC32C have only the SHA-256s; caches written by other tools may have
neither (they are read, and `Cache.checks` says what can be detected).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from sae_cache.sae_common.errors import UserError
from sae_cache.sae_common.quantize import QUANTIZED_DTYPES, SCALE_BYTES, QuantizedRows, dequantize, scales_path

FORMAT_VERSION = 1
DEFAULT_ROOT = Path("cache")  # where caches and runs go when the command line names no path
ATTRS_KEY = "sae_cache"
TOKENS = "tokens"
DTYPES = ("bfloat16", "float16", "float32", *QUANTIZED_DTYPES)
COMPRESSIONS = ("zstd", "lz4", "none")

# Zarr has no bfloat16: its raw bits are stored as uint16 and viewed back on read.
# int8 rows are codes with a float32 scale per row, read back as float32 (sae_common/quantize.py).
STORAGE_DTYPE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32, "int8": np.int8}
TORCH_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "int8": torch.int8}
# Measured compression ratios of residual-stream activations with Blosc zstd-1 + byte shuffle (DESIGN.md);
# used only to estimate the size of a cache before writing it. Anything unmeasured is assumed incompressible.
EXPECTED_RATIO = {("zstd", "bfloat16"): 1.45, ("zstd", "float16"): 1.17, ("zstd", "int8"): 1.07}

TARGET_CHUNK_BYTES = 4 << 20  # inner chunks of a few MB: the unit of decoding and random access
TARGET_SHARD_BYTES = 256 << 20  # shards of a few hundred MB: the unit of writing and checksumming
# The attributes the README's format section documents as the contract: a cache written by another tool that has
# these (and the arrays) is read; the rest (layout, shards, complete, ...) is this writer's bookkeeping.
REQUIRED_ATTRS = ("format_version", "model", "hooks", "d_model", "context_size", "prepend_bos", "dtype", "n_tokens")


def acts_path(hook: str) -> str:
    return f"acts/{hook}"


def itemsize(dtype: str) -> int:
    return np.dtype(STORAGE_DTYPE[dtype]).itemsize


def row_bytes(d_model: int, dtype: str) -> int:
    """Uncompressed bytes of one row of one hook (an int8 row carries its float32 scale)."""
    return d_model * itemsize(dtype) + (SCALE_BYTES if dtype in QUANTIZED_DTYPES else 0)


def empty_rows(n_rows: int, d_model: int, dtype: str) -> np.ndarray | QuantizedRows:
    """Room for `n_rows` rows as `to_storage` makes them, filled by slice assignment."""
    quantized = dtype in QUANTIZED_DTYPES
    return QuantizedRows.empty(n_rows, d_model) if quantized else np.empty((n_rows, d_model), STORAGE_DTYPE[dtype])


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray | QuantizedRows:
    """A float tensor -> the numpy array stored for the logical `dtype` (bf16 -> its uint16 bits; int8 -> codes
    and scales)."""
    if dtype in QUANTIZED_DTYPES:
        return QuantizedRows.of(x)
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


def compressors(compression: str, dtype: str) -> list:
    """The inner chunks' bytes-to-bytes codecs: Blosc with byte shuffle and 1 MiB blocks (unless "none"), then a
    CRC32C of the result, checked on every read by zarr and by sae_common/chunk_reader.py (its cost is in
    bench/loader_bench.py). Measured on bf16 residual activations (2-core dev machine, one core): zstd-1 1.47x,
    decoding 1.1-1.6 GB/s; lz4-5 1.15x, decoding 3.5-4 GB/s. DESIGN.md's 2.7 GB/s per core for zstd was not
    reached there."""
    if compression == "none":
        return [Crc32cCodec()]
    level = 1 if compression == "zstd" else 5
    return [BloscCodec(cname=compression, clevel=level, shuffle="shuffle", typesize=itemsize(dtype), blocksize=1 << 20),
            Crc32cCodec()]


def layout_for(d_model: int, dtype: str, context_size: int, rows_per_shard: int | None = None) -> dict[str, int]:
    """Rows per chunk and per shard: whole contexts per chunk, whole chunks per shard. An int8 cache takes a bf16
    cache's rows (chunks of half the bytes), so both hold out the same rows and train on the same ones."""
    dtype = "bfloat16" if dtype in QUANTIZED_DTYPES else dtype
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


def damaged(path: Path, problems: list[str]) -> CacheError:
    """The error for a cache whose data is missing or does not match its checksums: the first problem, and
    the command that lists them all."""
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return CacheError(f"the cache {path} is damaged: {problems[0]}{more}; `sae cache verify {path}` lists every "
                      "problem. Restore the damaged files from a copy, or harvest the cache again (--overwrite)")


def _unreadable(file: Path, e: Exception) -> CacheError:
    reason = (str(e).splitlines() or [""])[0]
    return CacheError(f"{file} is damaged ({type(e).__name__}: {reason}); the cache cannot be read without it: "
                      "restore the file or harvest the cache again")


@dataclass
class Cache:
    """An open cache: its group, its metadata and the dtype view of its arrays."""

    path: Path
    group: zarr.Group
    meta: dict[str, Any]
    _arrays: dict[str, zarr.Array] = field(default_factory=dict, repr=False)

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

    def array(self, name: str) -> zarr.Array:
        """One of the cache's arrays; a missing or unreadable array metadata file is named, never a traceback."""
        if name not in self._arrays:
            file = self.path / name / "zarr.json"
            if not file.is_file():
                raise CacheError(f"the cache {self.path} has no array {name} ({file} is missing)")
            try:
                array = self.group[name]
            except Exception as e:  # noqa: BLE001 - whatever zarr raises on a damaged file, name the file
                raise _unreadable(file, e) from None
            if not isinstance(array, zarr.Array):
                raise CacheError(f"{self.path / name} is a Zarr group; the cache format has an array there")
            self._arrays[name] = array
        return self._arrays[name]

    def acts(self, hook: str) -> zarr.Array:
        if hook not in self.meta["hooks"]:
            raise CacheError(f"hook {hook!r} is not in the cache {self.path}; it has: {', '.join(self.hooks)}")
        return self.array(acts_path(hook))

    def tokens(self) -> zarr.Array:
        return self.array(TOKENS)

    @property
    def layout(self) -> dict[str, int]:
        """Rows per inner chunk and per shard: as this project's writer records them, else (a cache written by
        another tool) from the first hook's array metadata."""
        if "layout" in self.meta:
            return self.meta["layout"]
        array = self.acts(self.hooks[0])
        return {"rows_per_chunk": array.chunks[0], "rows_per_shard": (array.shards or array.chunks)[0]}

    @property
    def compression(self) -> str:
        if self.meta.get("compression"):
            return self.meta["compression"]
        names = [getattr(c, "codec_id", None) or c.to_dict()["name"] for c in self.acts(self.hooks[0]).compressors
                 if not isinstance(c, Crc32cCodec)]
        return "+".join(names) or "none"

    @property
    def chunk_crc(self) -> bool:
        """Whether every array's inner chunks end with a CRC32C (checked by every read, ours and zarr's)."""
        return all(_has_crc(self.array(name)) for name in array_names(self.meta))

    @property
    def shard_checksums(self) -> bool:
        """Whether the SHA-256 of every shard file is recorded (this project's writer does; other tools may not)."""
        return isinstance(self.meta.get("shards"), list)

    @property
    def checks(self) -> str:
        """In words: what damage to the data can be detected, and when."""
        found = (["a SHA-256 per shard file"] if self.shard_checksums else []) + (
            ["a CRC32C per chunk, checked on every read"] if self.chunk_crc else [])
        return " and ".join(found) or "no checksums (damage to the data cannot be detected)"

    @property
    def complete(self) -> bool:
        """Whether all the rows asked for are in (or the dataset ran out). Without this writer's record (a cache
        from another tool), the format's own rule holds: the n_tokens rows are complete and readable."""
        return "complete" not in self.meta or bool(self.meta["complete"] or self.meta.get("exhausted"))

    def read_rows(self, hook: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one hook as a tensor of the logical dtype (float32 for an int8 cache)."""
        if self.dtype in QUANTIZED_DTYPES:
            return dequantize(torch.from_numpy(self._read(acts_path(hook), start, stop)),
                              torch.from_numpy(self._read(scales_path(hook), start, stop)))
        return from_storage(self._read(acts_path(hook), start, stop), self.dtype)

    def read_tokens(self, start: int, stop: int) -> np.ndarray:
        return self._read(TOKENS, start, stop)

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        array = self.array(name)
        try:
            return array[start:stop]
        except Exception as e:  # noqa: BLE001 - a chunk that fails its CRC32C or cannot be decoded: name it
            raise damaged(self.path, [f"rows {start}:{stop} of {name} cannot be read ({type(e).__name__}: {e})"]) from None

    def disk_bytes(self) -> int:
        """Bytes of the cache's files; a killed write's `*.partial` temporary files are not the cache's."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file() and f.suffix != ".partial")


def _has_crc(array: zarr.Array) -> bool:
    codecs = array.compressors
    return bool(codecs) and isinstance(codecs[-1], Crc32cCodec)


def open_cache(path: str | Path) -> Cache:
    """Open and check the structure of a cache: its attributes and every array's metadata (not the data)."""
    path = Path(path)
    file = path / "zarr.json"
    if not file.is_file():
        raise CacheError(f"{path} is not an activation cache (no zarr.json there); `sae harvest` writes one")
    try:
        group = zarr.open_group(path, mode="r")
        meta = group.attrs.get(ATTRS_KEY)
    except Exception as e:  # noqa: BLE001 - whatever zarr raises on a damaged file, name the file
        raise _unreadable(file, e) from None
    if not isinstance(meta, dict):
        raise CacheError(f"{path} is a Zarr group but not an activation cache (no '{ATTRS_KEY}' attributes in {file})")
    missing = [k for k in REQUIRED_ATTRS if k not in meta]
    if missing:
        raise CacheError(f"{file}: the '{ATTRS_KEY}' attributes have no {', '.join(map(repr, missing))}, which the "
                         "cache format requires (README.md, 'The cache format')")
    if meta["format_version"] != FORMAT_VERSION:
        raise CacheError(f"{path} has cache format version {meta['format_version']}; this tool reads {FORMAT_VERSION}")
    if meta["dtype"] not in DTYPES or not isinstance(meta["hooks"], list) or not meta["hooks"]:
        raise CacheError(f"{file}: '{ATTRS_KEY}' needs a dtype among {', '.join(DTYPES)} (it has {meta['dtype']!r}) "
                         f"and a non-empty list of hooks (it has {meta['hooks']!r})")
    cache = Cache(path=path, group=group, meta=dict(meta))
    if cache.n_tokens:  # an empty cache may be one whose creation was interrupted before its arrays: harvest redoes it
        for name in array_names(meta):
            _check_array(cache, name)
    return cache


def _check_array(cache: Cache, name: str) -> None:
    """The array's dtype and shape are the ones the attributes promise: a foreign cache that disagrees is named."""
    array = cache.array(name)
    scales = name.startswith(scales_path(""))  # an int8 cache's (n_tokens, 1) float32 scales
    shape = {TOKENS: (cache.n_tokens,)}.get(name, (cache.n_tokens, 1 if scales else cache.d_model))
    dtype = np.dtype({TOKENS: np.int32}.get(name, np.float32 if scales else STORAGE_DTYPE[cache.dtype]))
    if array.ndim != len(shape) or array.shape[0] < shape[0] or array.shape[1:] != shape[1:] or array.dtype != dtype:
        raise CacheError(f"the array {name} of {cache.path} is {array.dtype} {array.shape}, but the attributes call for "
                         f"{dtype} with at least {shape[0]:,} rows" + (f" of {shape[1]}" if len(shape) > 1 else ""))


def shard_file(path: Path, array: zarr.Array, shard_index: int) -> Path:
    """Where shard `shard_index` (along rows) of `array` lives in a local directory store."""
    coords = (shard_index,) + (0,) * (array.ndim - 1)
    return path / array.path / array.metadata.encode_chunk_key(coords)


def row_cell_files(path: Path, array: zarr.Array, index: int) -> list[Path]:
    """The files of row cell `index` of `array` (one shard, or one row of chunks when an array written by another
    tool is not sharded or splits the columns too)."""
    grid = array.shards or array.chunks
    columns = itertools.product(*(range(-(-n // g)) for n, g in zip(array.shape[1:], grid[1:])))
    return [path / array.path / array.metadata.encode_chunk_key((index, *c)) for c in columns]


def file_sha256(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hook_arrays(meta: dict[str, Any], hook: str) -> list[str]:
    """The arrays that hold one hook's rows: its activations, and an int8 cache's scales."""
    return [acts_path(hook)] + ([scales_path(hook)] if meta["dtype"] in QUANTIZED_DTYPES else [])


def array_names(meta: dict[str, Any]) -> list[str]:
    return [name for h in meta["hooks"] for name in hook_arrays(meta, h)] + [TOKENS]


def check_rows(cache: Cache, names: list[str], rows: tuple[int, int], checksums: bool = True) -> list[str]:
    """The problems of the shards of `names` that hold rows [start, stop): each shard present and (if `checksums`)
    matching its recorded SHA-256; without recorded checksums (a foreign cache), read back through zarr (which
    checks chunk CRC32Cs where there are some). Without `checksums`, only file presence (instant, for start-up)."""
    problems, records = [], cache.meta.get("shards") if cache.shard_checksums else None
    for name in names:
        array = cache.array(name)
        per = (array.shards or array.chunks)[0]
        for i in range(rows[0] // per, -(-rows[1] // per)):
            files = row_cell_files(cache.path, array, i)
            absent = [f for f in files if not f.is_file()]
            if absent:
                problems.append(f"shard {i} of {name} is missing ({absent[0]})")
            elif checksums and records is not None:
                recorded = records[i].get("sha256", {}).get(name) if i < len(records) else None
                if recorded is None:
                    problems.append(f"shard {i} of {name} has no recorded checksum ({files[0]})")
                elif file_sha256(files[0]) != recorded:
                    problems.append(f"shard {i} of {name} does not match its checksum ({files[0]})")
            elif checksums:
                try:
                    array[i * per:min((i + 1) * per, cache.n_tokens)]
                except Exception as e:  # noqa: BLE001 - any decoding failure is damage to report
                    problems.append(f"shard {i} of {name} cannot be read ({files[0]}: {type(e).__name__}: {e})")
    return problems


def verify(cache: Cache, checksums: bool = True) -> list[str]:
    """Every shard of every array present and (if `checksums`) intact (see `check_rows`); returns the problems
    found. Without checksums it only looks at the files (instant, for a start-up check)."""
    problems = []
    recorded = sum(s.get("rows", 0) for s in cache.meta["shards"]) if cache.shard_checksums else cache.n_tokens
    if recorded != cache.n_tokens:
        problems.append(f"the shards record {recorded} rows but n_tokens is {cache.n_tokens}")
    return problems + check_rows(cache, array_names(cache.meta), (0, cache.n_tokens), checksums)


def verified_summary(cache: Cache) -> str:
    """What `sae cache verify` checked, for a cache that passed."""
    if cache.shard_checksums:
        return f"{len(cache.meta['shards'])} shard(s), {cache.n_tokens:,} tokens, every checksum matches"
    return (f"{cache.n_tokens:,} tokens, every shard present and readable; the cache records no shard checksums "
            f"(it has {cache.checks})")


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
    n, chunk = cache.n_tokens, cache.layout["rows_per_chunk"]
    n_chunks = -(-n // chunk)
    tail_chunks = min(max(1, -(-int(n * fraction) // chunk)), n_chunks // 2)
    if tail_chunks == 0:
        raise CacheError(f"the cache {cache.path} has {n} tokens in {n_chunks} chunk(s): too few to hold any out")
    return (n_chunks - tail_chunks) * chunk
