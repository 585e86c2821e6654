"""The cache format: dtype views, layout, verification and the `sae cache` commands, on synthetic caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sae_cache.sae_common.cache_format import from_storage, holdout_start, layout_for, open_cache, to_storage, verify
from sae_cache.sae_common.cli import main
from sae_cache.sae_common.config import parse_count
from tests.cache_utils import write_cache


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_storage_round_trip_is_exact(dtype):
    x = torch.randn(64, 8) * 100
    stored = to_storage(x, dtype)
    assert stored.dtype == {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}[dtype]
    assert torch.equal(from_storage(stored, dtype), x.to(getattr(torch, dtype)))


def test_layout_has_whole_contexts_in_chunks_and_whole_chunks_in_shards():
    layout = layout_for(2304, "bfloat16", 128)  # gemma-2-2b
    chunk, shard = layout["rows_per_chunk"], layout["rows_per_shard"]
    assert chunk % 128 == 0 and shard % chunk == 0
    assert 2 << 20 <= chunk * 2304 * 2 <= 8 << 20 and 128 << 20 <= shard * 2304 * 2 <= 512 << 20
    assert layout_for(32, "float32", 32, rows_per_shard=512)["rows_per_shard"] == 512
    with pytest.raises(ValueError, match="multiple of the context size"):
        layout_for(32, "float32", 32, rows_per_shard=500)


@pytest.mark.parametrize("text,value", [("10M", 10_000_000), ("1B", 10**9), ("2.5k", 2500), ("4096", 4096)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.fixture
def small_cache(tmp_path):
    return write_cache(tmp_path / "c.zarr", torch.randn(1024, 8), context_size=16, rows_per_shard=256, dtype="bfloat16")


def test_verify_passes_then_names_a_corrupt_and_a_missing_shard(small_cache):
    cache = open_cache(small_cache)
    assert verify(cache) == []
    shard = small_cache / "acts" / "blocks.0.hook_resid_post" / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (small_cache / "tokens" / "c" / "3").unlink()
    problems = verify(cache)
    assert any("shard 1 of acts/blocks.0.hook_resid_post does not match its checksum" in p for p in problems)
    assert any("shard 3 of tokens is missing" in p for p in problems)
    result = CliRunner().invoke(main, ["cache", "verify", str(small_cache)])
    assert result.exit_code == 1
    assert "shard 1 of acts/blocks.0.hook_resid_post" in result.output and "2 problem(s)" in result.output


def test_cache_info_reports_tokens_size_and_ratio(small_cache):
    result = CliRunner().invoke(main, ["cache", "info", str(small_cache)])
    assert result.exit_code == 0, result.output
    assert "1,024 of 1,024 (complete)" in result.output and "ratio" in result.output
    assert "blocks.0.hook_resid_post" in result.output
    ok = CliRunner().invoke(main, ["cache", "verify", str(small_cache)])
    assert ok.exit_code == 0 and "every checksum matches" in ok.output


def test_holdout_is_a_whole_chunk_tail(small_cache):
    cache = open_cache(small_cache)
    start = holdout_start(cache, fraction=0.3)
    chunk = cache.meta["layout"]["rows_per_chunk"]
    assert start % chunk == 0 and cache.n_tokens - start >= 0.3 * cache.n_tokens
    assert holdout_start(cache, fraction=0.0) == cache.n_tokens - chunk  # at least one chunk
