"""The direct chunk reader: equal to zarr's own read for every layout the writer makes, and loud on damage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from sae_cache.sae_common import cache_format
from sae_cache.sae_common.cache_format import open_cache, shard_file
from sae_cache.sae_common.chunk_reader import ChunkReader
from tests.cache_utils import write_cache

N, D, ROWS_PER_CHUNK, ROWS_PER_SHARD = 1000, 8, 48, 192  # 21 chunks (the last one 40 rows) in 6 shards


def make_array(path, dtype: str, compression: str) -> zarr.Array:
    acts_ND = torch.randn(N, D, generator=torch.Generator().manual_seed(0)) * 3
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache_format, "TARGET_CHUNK_BYTES", ROWS_PER_CHUNK * D * cache_format.itemsize(dtype))
        write_cache(path, acts_ND, context_size=8, rows_per_shard=ROWS_PER_SHARD, dtype=dtype, compression=compression)
    cache = open_cache(path)
    assert cache.meta["layout"] == {"rows_per_chunk": ROWS_PER_CHUNK, "rows_per_shard": ROWS_PER_SHARD}
    return cache.acts(cache.hooks[0])


def spans():
    """Whole chunks, their heads and tails, inner pieces, and the short last chunk."""
    for chunk in range(-(-N // ROWS_PER_CHUNK)):
        start, stop = chunk * ROWS_PER_CHUNK, min((chunk + 1) * ROWS_PER_CHUNK, N)
        yield from [(start, stop), (start, start + 1), (stop - 5, stop), (start + 7, stop - 3)]


@pytest.mark.parametrize("dtype,compression", [("bfloat16", "zstd"), ("float32", "lz4"), ("float16", "none")])
def test_equals_zarr_read(tmp_path, dtype, compression):
    array = make_array(tmp_path / "c.zarr", dtype, compression)
    reader = ChunkReader(array)
    assert reader.direct
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
