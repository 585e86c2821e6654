"""Whole inner chunks of a cache array, read straight from their shard files: the training loader's hot path.

zarr-python sends every read through its asyncio event loop, builds the shard index, decodes into a fresh
buffer and copies that into the result. For the loader's 4 MB bf16 chunks this ran at 0.36-0.5 GB/s on two
cores, whatever the number of reading threads, while the same Blosc decode called directly ran at ~1.2 GB/s
on one core and 1.6-1.7 GB/s on two (the loader's rate is in bench/loader_bench.py). The bytes on disk follow the Zarr v3
sharding codec (https://zarr-specs.readthedocs.io/en/latest/v3/codecs/sharding-indexed/): each shard file
ends with its index, an (offset, nbytes) pair of little-endian uint64 per inner chunk in C order followed by
the CRC32C of those pairs, and each inner chunk is the chunk's bytes through the array's bytes-to-bytes codecs.
So a chunk is one positioned read and one Blosc decode into the caller's buffer.

Only the layout the cache writer produces takes this path (a local store, sharded along rows with inner
chunks spanning whole rows, little-endian bytes, Blosc or no compression, the index at the end with a
CRC32C); any other array is read through zarr, so the result is always what `array[start:stop]` returns
(tests/test_chunk_reader.py checks both against zarr).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import google_crc32c  # zarr's own CRC32C implementation (it checks shard indexes with it)
import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, Endian, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.storage import LocalStore

from sae_cache.sae_common.cache_format import shard_file

EMPTY = 2**64 - 1  # the index entry of a chunk that was never written


class ChunkReader:
    """Reads rows [start, stop) lying inside one inner chunk of a 2-D cache array into a caller's buffer."""

    def __init__(self, array: zarr.Array):
        self.array = array
        self.rows_per_chunk = array.chunks[0]
        self.root, self.compressed = self._direct_layout(array)
        self._index: dict[int, np.ndarray] = {}  # shard -> (chunks per shard, 2) offsets and sizes
        self._local = threading.local()  # per-thread scratch buffers

    @property
    def direct(self) -> bool:
        """Whether reads bypass zarr (the layout is the one the cache writer produces)."""
        return self.root is not None

    @staticmethod
    def _direct_layout(array: zarr.Array) -> tuple[Path | None, bool]:
        codecs = array.metadata.codecs if array.metadata.zarr_format == 3 else ()
        store = array.store_path.store
        if (sys.byteorder != "little" or array.ndim != 2 or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec)
                or not isinstance(store, LocalStore) or array.chunks[1] != array.shape[1]):
            return None, False
        sharding = codecs[0]
        inner, index = sharding.codecs, sharding.index_codecs
        if (sharding.index_location != ShardingCodecIndexLocation.end
                or not isinstance(inner[0], BytesCodec) or inner[0].endian not in (None, Endian.little)
                or not all(isinstance(c, BloscCodec) for c in inner[1:]) or len(inner) > 2
                or [type(c) for c in index] != [BytesCodec, Crc32cCodec] or index[0].endian not in (None, Endian.little)):
            return None, False
        return Path(store.root), len(inner) == 2

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
        with open(path, "rb") as f:
            offset, nbytes = (int(v) for v in self._shard_index(shard, f, chunks_per_shard)[inner])
            if offset == EMPTY:
                raise ValueError(f"chunk {chunk} (rows {start}:{stop}) was never written to {path}")
            f.seek(offset)
            # Reading into reused memory: a fresh multi-MB buffer per chunk costs a page fault per 4 KiB.
            encoded = self._scratch("encoded", nbytes)[:nbytes] if self.compressed else target.reshape(-1).view(np.uint8)
            got = f.readinto(encoded)
        if got != nbytes or encoded.nbytes != nbytes:
            raise ValueError(f"{path} ends inside chunk {chunk}: {got} of its {nbytes} bytes (a chunk of "
                             f"{target.nbytes} bytes)")
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

    def _shard_index(self, shard: int, f, chunks_per_shard: int) -> np.ndarray:
        index = self._index.get(shard)  # threads may both fill an entry; they write the same value
        if index is None:
            size = chunks_per_shard * 16 + 4
            f.seek(-size, 2)
            raw = f.read(size)
            if len(raw) != size or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise ValueError(f"the shard index at the end of {f.name} is damaged (its CRC32C does not match)")
            index = self._index[shard] = np.frombuffer(raw[:-4], "<u8").reshape(chunks_per_shard, 2)
        return index
