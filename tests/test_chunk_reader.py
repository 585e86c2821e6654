"""The direct chunk reader: equal to zarr's own read for every layout the writer makes, and loud on damage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from zarr.codecs import Crc32cCodec

from sae_cache.sae_common import cache_format, cache_writer
from sae_cache.sae_common.cache_format import file_sha256, open_cache, shard_file
from sae_cache.sae_common.chunk_reader import ChunkDamaged, ChunkReader
from tests.cache_utils import write_cache

N, D, ROWS_PER_CHUNK, ROWS_PER_SHARD = 1000, 8, 48, 192  # 21 chunks (the last one 40 rows) in 6 shards


def without_crc(compression: str, dtype: str) -> list:
    """The inner codecs of caches written before chunks carried a CRC32C."""
    return [c for c in cache_format.compressors(compression, dtype) if not isinstance(c, Crc32cCodec)]


def make_array(path, dtype: str, compression: str, crc: bool = True) -> zarr.Array:
    acts_ND = torch.randn(N, D, generator=torch.Generator().manual_seed(0)) * 3
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache_format, "TARGET_CHUNK_BYTES", ROWS_PER_CHUNK * D * cache_format.itemsize(dtype))
        if not crc:
            mp.setattr(cache_writer, "compressors", without_crc)
        write_cache(path, acts_ND, context_size=8, rows_per_shard=ROWS_PER_SHARD, dtype=dtype, compression=compression)
    cache = open_cache(path)
    assert cache.meta["layout"] == {"rows_per_chunk": ROWS_PER_CHUNK, "rows_per_shard": ROWS_PER_SHARD}
    return cache.acts(cache.hooks[0])


def spans():
    """Whole chunks, their heads and tails, inner pieces, and the short last chunk."""
    for chunk in range(-(-N // ROWS_PER_CHUNK)):
        start, stop = chunk * ROWS_PER_CHUNK, min((chunk + 1) * ROWS_PER_CHUNK, N)
        yield from [(start, stop), (start, start + 1), (stop - 5, stop), (start + 7, stop - 3)]


@pytest.mark.parametrize("crc", [True, False], ids=["crc32c", "no-crc"])
@pytest.mark.parametrize("dtype,compression", [("bfloat16", "zstd"), ("float32", "lz4"), ("float16", "none")])
def test_equals_zarr_read(tmp_path, dtype, compression, crc):
    array = make_array(tmp_path / "c.zarr", dtype, compression, crc)
    reader = ChunkReader(array)
    assert reader.direct and reader.crc == crc
    for start, stop in spans():
        out = np.full((stop - start, D), 7, array.dtype)
        reader.read(start, stop, out)
        np.testing.assert_array_equal(out, array[start:stop], err_msg=f"rows {start}:{stop}")


def test_other_layouts_are_read_through_zarr(tmp_path):
    unsharded = zarr.create_array(tmp_path / "plain.zarr", shape=(N, D), chunks=(ROWS_PER_CHUNK, D), dtype=np.float32)
    unsharded[:] = np.random.default_rng(0).standard_normal((N, D), dtype=np.float32)
    reader = ChunkReader(unsharded)
    assert not reader.direct
    for start, stop in spans():
        out = np.empty((stop - start, D), np.float32)
        reader.read(start, stop, out)
        np.testing.assert_array_equal(out, unsharded[start:stop])


def test_damaged_shard_index_is_refused(tmp_path):
    array = make_array(tmp_path / "c.zarr", "bfloat16", "zstd")
    file = shard_file(tmp_path / "c.zarr", array, 1)
    data = bytearray(file.read_bytes())
    data[-10] ^= 0xFF  # inside the index, before its CRC32C
    file.write_bytes(bytes(data))
    out = np.empty((ROWS_PER_CHUNK, D), array.dtype)
    ChunkReader(array).read(0, ROWS_PER_CHUNK, out)  # shard 0 is intact
    with pytest.raises(ValueError, match=r"shard index at the end of .*c/1/0 is damaged"):
        ChunkReader(array).read(ROWS_PER_SHARD, ROWS_PER_SHARD + ROWS_PER_CHUNK, out)


def test_truncated_shard_is_refused(tmp_path):
    array = make_array(tmp_path / "c.zarr", "float32", "none")
    file = shard_file(tmp_path / "c.zarr", array, 2)
    reader = ChunkReader(array)
    out = np.empty((ROWS_PER_CHUNK, D), array.dtype)
    reader.read(2 * ROWS_PER_SHARD, 2 * ROWS_PER_SHARD + ROWS_PER_CHUNK, out)  # reads (and keeps) the index
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"ends inside chunk 8"):
        reader.read(2 * ROWS_PER_SHARD, 2 * ROWS_PER_SHARD + ROWS_PER_CHUNK, out)


def test_bad_requests_are_named(tmp_path):
    reader = ChunkReader(make_array(tmp_path / "c.zarr", "float32", "zstd"))
    with pytest.raises(ValueError, match=r"rows 40:60 are not a non-empty part of one chunk of 48 rows"):
        reader.read(40, 60, np.empty((20, D), np.float32))
    with pytest.raises(ValueError, match=r"rows 5:5"):
        reader.read(5, 5, np.empty((0, D), np.float32))
    with pytest.raises(ValueError, match=r"out must be a C-contiguous float32 array of shape \(10, 8\), not float64"):
        reader.read(0, 10, np.empty((10, D)))
    with pytest.raises(ValueError, match="C-contiguous"):
        reader.read(0, 10, np.empty((D, 10), np.float32).T)


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_a_flipped_bit_fails_the_chunk_crc32c(tmp_path, compression):
    array = make_array(tmp_path / "c.zarr", "bfloat16", compression)
    file = shard_file(tmp_path / "c.zarr", array, 1)
    reader = ChunkReader(array)
    with open(file, "rb") as f:
        offset = int(reader._shard_index(1, f, ROWS_PER_SHARD // ROWS_PER_CHUNK)[2, 0])  # chunk 6
    data = bytearray(file.read_bytes())
    data[offset + 40] ^= 0x10
    file.write_bytes(bytes(data))
    out = np.empty((ROWS_PER_CHUNK, D), array.dtype)
    reader.read(5 * ROWS_PER_CHUNK, 6 * ROWS_PER_CHUNK, out)  # chunk 5, in the same shard, is intact
    np.testing.assert_array_equal(out, array[5 * ROWS_PER_CHUNK:6 * ROWS_PER_CHUNK])
    with pytest.raises(ChunkDamaged, match=r"rows 290:300 \(chunk 6\) of acts/.*, in shard 1 \(.*c/1/0\), does not "
                                           r"match its CRC32C"):
        reader.read(290, 300, out[:10])


def test_without_chunk_crcs_each_shard_sha256_is_checked_once_on_first_touch(tmp_path, monkeypatch):
    array = make_array(tmp_path / "c.zarr", "float32", "zstd", crc=False)
    digests = [file_sha256(shard_file(tmp_path / "c.zarr", array, i)) for i in range(6)]
    hashed = []
    monkeypatch.setattr("sae_cache.sae_common.chunk_reader.file_sha256", lambda f: hashed.append(f) or file_sha256(f))
    reader = ChunkReader(array, digests)
    assert reader.checks == "each shard file's SHA-256, on first touch"
    out = np.empty((ROWS_PER_CHUNK, D), array.dtype)
    for chunk in (0, 1, 2, 3, 0):
        reader.read(chunk * ROWS_PER_CHUNK, (chunk + 1) * ROWS_PER_CHUNK, out)
    assert [f.parent.name for f in hashed] == ["0"]  # shard 0 (chunks 0-3), hashed once
    file = shard_file(tmp_path / "c.zarr", array, 2)
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(ChunkDamaged, match=r"c/2/0 \(shard 2\) does not match its recorded SHA-256"):
        reader.read(2 * ROWS_PER_SHARD, 2 * ROWS_PER_SHARD + ROWS_PER_CHUNK, out)
    assert ChunkReader(array).checks is None  # no digests, no CRC: nothing is checked, and it says so
