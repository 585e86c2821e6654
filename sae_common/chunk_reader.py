"""Whole inner chunks of a cache array, read straight from their shard files: the training loader's hot path.

zarr-python sends every read through its asyncio event loop, builds the shard index, decodes into a fresh
buffer and copies that into the result. For the loader's 4 MB bf16 chunks this ran at 0.36-0.5 GB/s on two
cores, whatever the number of reading threads, while the same Blosc decode called directly ran at ~1.2 GB/s
on one core and 1.6-1.7 GB/s on two (the loader's rate is in bench/loader_bench.py). The bytes on disk follow the Zarr v3
sharding codec (https://zarr-specs.readthedocs.io/en/latest/v3/codecs/sharding-indexed/): each shard file
ends with its index, an (offset, nbytes) pair of little-endian uint64 per inner chunk in C order followed by
the CRC32C of those pairs, and each inner chunk is the chunk's bytes through the array's bytes-to-bytes codecs.
So a chunk is one positioned read and one Blosc decode into the caller's buffer.

Every chunk read is checked before its rows are used: the chunk's own CRC32C (the last 4 bytes of an inner
chunk, zarr's `crc32c` codec, as the cache writer has written since caches carried it), or, for a cache
written before that, the SHA-256 recorded for the shard file, computed the first time a read touches that shard
(one extra sequential read of each shard per reader, spread over the run instead of a wait at start-up; the
shard index's CRC32C covers only offsets). A mismatch raises `ChunkDamaged` naming the file, shard and chunk.

Only the layout the cache writer produces takes this path (a local store, sharded along rows with inner
chunks spanning whole rows, little-endian bytes, Blosc or no compression, optionally a CRC32C, the index at the
end with a CRC32C); any other array is read through zarr (which checks a `crc32c` codec itself), so the result
is always what `array[start:stop]` returns (tests/test_chunk_reader.py checks both against zarr).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import google_crc32c  # zarr's own CRC32C implementation (it checks shard indexes with it)
import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, Endian, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.storage import LocalStore

from sae_cache.sae_common.cache_format import file_sha256, shard_file

EMPTY = 2**64 - 1  # the index entry of a chunk that was never written
CRC_BYTES = 4


class ChunkDamaged(ValueError):
    """A shard file or chunk whose bytes are not the ones written: missing, short, or failing its checksum."""


class ChunkReader:
    """Reads rows [start, stop) lying inside one inner chunk of a 2-D cache array into a caller's buffer."""

    def __init__(self, array: zarr.Array, shard_sha256: Sequence[str] | None = None):
        """`shard_sha256`: the recorded SHA-256 of each shard file, checked on first touch when the chunks carry
        no CRC32C of their own (caches written before they did)."""
        self.array = array
        self.rows_per_chunk = array.chunks[0]
        self.root, self.compressed, self.crc = self._direct_layout(array)
        self.shard_sha256 = None if self.crc or not self.direct else shard_sha256
        self._verified: set[int] = set()  # shards whose SHA-256 matched
        self._verifying: dict[int, threading.Lock] = {}  # one hash per shard, whichever thread touches it first
        self._lock = threading.Lock()
        self._index: dict[int, np.ndarray] = {}  # shard -> (chunks per shard, 2) offsets and sizes
        self._local = threading.local()  # per-thread scratch buffers

    @property
    def direct(self) -> bool:
        """Whether reads bypass zarr (the layout is the one the cache writer produces)."""
        return self.root is not None

    @property
    def checks(self) -> str | None:
        """What every read is checked against, in words; None when nothing is (damage would go unseen)."""
        if self.crc or (not self.direct and self.array.compressors and isinstance(self.array.compressors[-1], Crc32cCodec)):
            return "each chunk's CRC32C"
        return "each shard file's SHA-256, on first touch" if self.shard_sha256 is not None else None

    @staticmethod
    def _direct_layout(array: zarr.Array) -> tuple[Path | None, bool, bool]:
        """(store root, Blosc-compressed, CRC32C-terminated) for the writer's layout; (None, False, False) else."""
        codecs = array.metadata.codecs if array.metadata.zarr_format == 3 else ()
        store = array.store_path.store
        if (sys.byteorder != "little" or array.ndim != 2 or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec)
                or not isinstance(store, LocalStore) or array.chunks[1] != array.shape[1]):
            return None, False, False
        sharding = codecs[0]
        inner, index = list(sharding.codecs), sharding.index_codecs
        crc = isinstance(inner[-1], Crc32cCodec)
        inner = inner[:-1] if crc else inner
        if (sharding.index_location != ShardingCodecIndexLocation.end
                or not isinstance(inner[0], BytesCodec) or inner[0].endian not in (None, Endian.little)
                or not all(isinstance(c, BloscCodec) for c in inner[1:]) or len(inner) > 2
                or [type(c) for c in index] != [BytesCodec, Crc32cCodec] or index[0].endian not in (None, Endian.little)):
            return None, False, False
        return Path(store.root), len(inner) == 2, crc

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Rows [start, stop) (within one inner chunk) into `out`, a C-contiguous array of the storage dtype."""
        chunk, first = divmod(start, self.rows_per_chunk)
        if not 0 < stop - start <= self.rows_per_chunk - first:
            raise ValueError(f"rows {start}:{stop} are not a non-empty part of one chunk of {self.rows_per_chunk} rows")
        if out.shape != (stop - start, self.array.shape[1]) or out.dtype != self.array.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {self.array.dtype} array of shape "
                             f"{(stop - start, self.array.shape[1])}, not {out.dtype} {out.shape}")
        if not self.direct:
            out[...] = self.array[start:stop]
            return
        chunks_per_shard = self.array.shards[0] // self.rows_per_chunk
        shard, inner = divmod(chunk, chunks_per_shard)
        path = shard_file(self.root, self.array, shard)
        whole = first == 0 and stop - start == self.rows_per_chunk
        target = out if whole else self._scratch("chunk", self.rows_per_chunk * out.strides[0]).view(out.dtype).reshape(
            self.rows_per_chunk, -1)
        where = f"rows {start}:{stop} (chunk {chunk}) of {self.array.path}, in shard {shard} ({path}),"
        if not path.is_file():
            raise ChunkDamaged(f"{path} (shard {shard}) is missing")
        self._check_shard(shard, path)
        with open(path, "rb") as f:
            offset, nbytes = (int(v) for v in self._shard_index(shard, f, chunks_per_shard)[inner])
            if offset == EMPTY:
                raise ChunkDamaged(f"{where} was never written")
            payload = nbytes - CRC_BYTES if self.crc else nbytes
            f.seek(offset)
            # Reading into reused memory: a fresh multi-MB buffer per chunk costs a page fault per 4 KiB.
            encoded = self._scratch("encoded", payload)[:payload] if self.compressed else target.reshape(-1).view(np.uint8)
            if encoded.nbytes != payload:
                raise ChunkDamaged(f"{where} has {nbytes} bytes; a chunk of {target.nbytes} bytes needs "
                                   f"{target.nbytes + nbytes - payload}: the shard index is not this array's")
            got = f.readinto(encoded)
            stored = f.read(CRC_BYTES) if self.crc else b""
            got += len(stored)
        if got != nbytes:
            raise ChunkDamaged(f"{path} ends inside chunk {chunk} (rows {start}:{stop}, shard {shard}): {got} of its "
                               f"{nbytes} bytes")
        if self.crc and google_crc32c.value(encoded) != int.from_bytes(stored, "little"):
            raise ChunkDamaged(f"{where} does not match its CRC32C: the file is damaged")
        if self.compressed:
            Blosc().decode(encoded, out=target)  # Blosc frames describe themselves; the decoder needs no settings
        if not whole:
            out[...] = target[first:first + stop - start]

    def _scratch(self, name: str, nbytes: int) -> np.ndarray:
        """A byte buffer of at least `nbytes` owned by the calling thread, reused across its reads."""
        buf = getattr(self._local, name, None)
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(nbytes, np.uint8)
            setattr(self._local, name, buf)
        return buf

    def _check_shard(self, shard: int, path: Path) -> None:
        """For a cache whose chunks carry no CRC32C: the shard file's SHA-256, once, before any of it is used."""
        if self.shard_sha256 is None or shard in self._verified:
            return
        with self._lock:
            lock = self._verifying.setdefault(shard, threading.Lock())
        with lock:  # a second thread touching the shard waits for the first one's verdict
            if shard in self._verified:
                return
            if shard >= len(self.shard_sha256) or file_sha256(path) != self.shard_sha256[shard]:
                raise ChunkDamaged(f"{path} (shard {shard}) does not match its recorded SHA-256: the file is damaged")
            self._verified.add(shard)

    def _shard_index(self, shard: int, f, chunks_per_shard: int) -> np.ndarray:
        index = self._index.get(shard)  # threads may both fill an entry; they write the same value
        if index is None:
            size = chunks_per_shard * 16 + 4
            if f.seek(0, 2) < size:
                raise ChunkDamaged(f"{f.name} (shard {shard}) is cut short: {f.tell()} bytes, less than its index")
            f.seek(-size, 2)
            raw = f.read(size)
            if len(raw) != size or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise ChunkDamaged(f"the shard index at the end of {f.name} is damaged (shard {shard}: its CRC32C "
                                   "does not match; the file is cut short or altered)")
            index = self._index[shard] = np.frombuffer(raw[:-4], "<u8").reshape(chunks_per_shard, 2)
        return index
