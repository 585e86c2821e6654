"""The held-out rows (sae_common/holdout.py): spread over the whole cache for caches that record the rule, the
tail for caches that do not; the loader never yields a held-out row, and one epoch is every other row once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_cache.sae_common import cache_format
from sae_cache.sae_common.cache_format import holdout_start, open_cache
from sae_cache.sae_common.holdout import (SPREAD, heldout_mask, holdout_record, row_ranges, spread_block, spread_mask,
                                          training_ranges)
from sae_cache.train.loader import ActivationLoader
from tests.cache_utils import write_cache
from tests.test_loader import ID_BASE, row_ids

HOOK = "blocks.0.hook_resid_post"
CTX, ROWS_PER_CHUNK, N, D = 16, 64, 2000, 8  # 125 contexts, 4 per chunk; 32 chunks, the last one 16 rows


def make_cache(path, spread: bool):
    acts_ND = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
    acts_ND[:, 0], acts_ND[:, 1] = torch.arange(N) // ID_BASE, torch.arange(N) % ID_BASE  # row ids (test_loader)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache_format, "TARGET_CHUNK_BYTES", ROWS_PER_CHUNK * D * 4)
        write_cache(path, acts_ND, context_size=CTX, rows_per_shard=256,
                    extra_meta={"holdout": SPREAD} if spread else {})
    return open_cache(path)


def test_spread_mask_holds_out_the_end_of_every_block():
    mask = spread_mask(1000, 40, 0.05)
    held = np.flatnonzero(mask)
    assert list(held) == [c for b in range(0, 1000, 40) for c in (b + 38, b + 39)]  # 2 of every 40, at the end
    assert mask.mean() == pytest.approx(0.05)
    # a short last block of 10 holds out round(10 * 0.05) = 0 -> at least one; of 1, none (at most half)
    assert np.flatnonzero(spread_mask(50, 40, 0.05))[-1] == 49 and not spread_mask(41, 40, 0.05)[40]


def test_blocks_are_whole_chunks_that_hold_one_out():
    assert spread_block(125, 4, 0.02) == 13 * 4  # 4 contexts a chunk: 13 chunks hold out round(52 * 0.02) = 1
    assert spread_block(125, 4, 0.25) == 4  # one chunk holds out one
    assert spread_block(125, 4, 0.0) == 32 * 4  # nothing asked: the whole cache is one block, holding one out
    assert spread_block(64, 128, 0.02) == 128  # the quickstart's chunks of 128 contexts: one chunk, 3 held out


@pytest.mark.parametrize("fraction", [0.02, 0.25])
def test_loader_never_yields_held_out_rows_and_they_span_the_cache(tmp_path, fraction):
    cache = make_cache(tmp_path / "c.zarr", spread=True)
    record = holdout_record(cache, fraction)
    assert record["holdout"]["rule"] == SPREAD
    mask = heldout_mask(cache, record)
    held = np.flatnonzero(mask)
    block = record["holdout"]["block_contexts"]
    assert held[0] < block and np.diff(held).max() <= block and held[-1] >= 125 - block  # first block to the last
    assert len(held) > 1 and 0.5 * fraction <= mask.mean() <= 2 * fraction
    train = training_ranges(cache, fraction)
    n_train = sum(b - a for a, b in train)
    loader = ActivationLoader(cache, HOOK, batch_size=50, n_batches=n_train // 50, rows=train, seed=2,
                              shuffle_tokens=128)
    ids = np.concatenate([row_ids(x_BD) for x_BD in loader])
    assert loader.epochs == 1 and len(ids) == n_train // 50 * 50
    assert not mask[ids // CTX].any()  # never a held-out row
    assert len(np.unique(ids)) == len(ids)  # each training row at most once in an epoch
    every = ActivationLoader(cache, HOOK, batch_size=1, n_batches=n_train, rows=train, seed=2, shuffle_tokens=128)
    assert np.array_equal(np.sort(np.concatenate([row_ids(x) for x in every])), np.flatnonzero(~np.repeat(mask, CTX)))


def test_a_cache_without_the_record_keeps_the_tail(tmp_path):
    cache = make_cache(tmp_path / "old.zarr", spread=False)
    assert "holdout" not in cache.meta
    assert holdout_record(cache, 0.02) == {"holdout_start": 1984} and holdout_start(cache) == 1984
    assert training_ranges(cache, 0.02) == [(0, 1984)]
    assert row_ranges(heldout_mask(cache), CTX) == [(1984, 2000)]
    loader = ActivationLoader(cache, HOOK, batch_size=62, n_batches=32, seed=5, shuffle_tokens=200)  # its default
    assert np.array_equal(np.sort(np.concatenate([row_ids(x) for x in loader])), np.arange(1984))


def test_row_ranges_are_the_runs_of_contexts():
    mask = np.array([True, True, False, True, False, False, True])
    assert row_ranges(mask, 10) == [(0, 20), (30, 40), (60, 70)]
    assert row_ranges(~mask, 10) == [(20, 30), (40, 60)]
