"""The loader: equal to a naive numpy reference, never reads held-out rows, resumes exactly, stops cleanly."""

from __future__ import annotations

import gc
import math
import threading

import numpy as np
import pytest
import torch
import zarr

from sae_cache.sae_common import cache_format
from sae_cache.sae_common.cache_format import Cache, CacheError, from_storage, holdout_start, open_cache, shard_file
from tests.cache_utils import write_cache
from sae_cache.train.loader import ActivationLoader

HOOK = "blocks.0.hook_resid_post"
N, D, ROWS_PER_CHUNK, ROWS_PER_SHARD = 2000, 8, 64, 256  # 32 chunks (the last one 16 rows) in 8 shards
ID_BASE = 64  # row i carries i // 64 and i % 64 in its first two columns: exact in bfloat16 too


def row_ids(x_BD: torch.Tensor) -> np.ndarray:
    return (x_BD[:, 0].double() * ID_BASE + x_BD[:, 1].double()).long().numpy()


def make_cache(path, dtype: str) -> Cache:
    acts_ND = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
    acts_ND[:, 0], acts_ND[:, 1] = torch.arange(N) // ID_BASE, torch.arange(N) % ID_BASE
    with pytest.MonkeyPatch.context() as mp:  # chunks of 64 rows, so that a shard holds several
        mp.setattr(cache_format, "TARGET_CHUNK_BYTES", ROWS_PER_CHUNK * D * cache_format.itemsize(dtype))
        write_cache(path, acts_ND, rows_per_shard=ROWS_PER_SHARD, dtype=dtype, hook=HOOK)
    cache = open_cache(path)
    assert cache.meta["layout"] == {"rows_per_chunk": ROWS_PER_CHUNK, "rows_per_shard": ROWS_PER_SHARD}
    return cache


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def cache(request, tmp_path_factory) -> Cache:
    return make_cache(tmp_path_factory.mktemp(request.param) / "c.zarr", request.param)


def naive_batches(cache: Cache, *, batch_size: int, n_batches: int, rows: list[tuple[int, int]], seed: int,
                  shuffle_tokens: int) -> list[torch.Tensor]:
    """The stream as specified, built one window at a time with plain numpy from a plain Zarr read."""
    stored = zarr.open_array(cache.path / "acts" / HOOK, mode="r")[:]
    chunks = [np.arange(max(s, a), min(s + ROWS_PER_CHUNK, b)) for a, b in rows
              for s in range(a // ROWS_PER_CHUNK * ROWS_PER_CHUNK, b, ROWS_PER_CHUNK)]
    per_window = max(1, round(shuffle_tokens / ROWS_PER_CHUNK))
    stream, epoch = [], 0
    while sum(map(len, stream)) < batch_size * n_batches:
        order = np.random.default_rng([seed, epoch]).permutation(len(chunks))
        for w, window in enumerate(np.array_split(order, math.ceil(len(chunks) / per_window))):
            window_rows = stored[np.concatenate([chunks[c] for c in window])]
            stream.append(window_rows[np.random.default_rng([seed, epoch, w]).permutation(len(window_rows))])
        epoch += 1
    stream = np.concatenate(stream)
    return [from_storage(stream[i * batch_size:(i + 1) * batch_size], cache.dtype).float() for i in range(n_batches)]


@pytest.mark.parametrize("rows", [None, (40, 1990)], ids=["training-rows", "unaligned-with-short-chunk"])
def test_batches_equal_naive_reference(cache, rows):
    kw = dict(batch_size=100, n_batches=45, seed=3, shuffle_tokens=256)  # 4 chunks a window, 2+ epochs
    loader = ActivationLoader(cache, HOOK, rows=rows, **kw)
    got = list(loader)
    want = naive_batches(cache, rows=loader.rows, **kw)
    assert loader.epochs == math.ceil(45 * 100 / loader.n_rows) >= 2
    assert len(got) == len(loader) == 45
    assert all(g.dtype == torch.float32 and g.shape == (100, D) for g in got)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_never_yields_held_out_rows(cache):
    loader = ActivationLoader(cache, HOOK, batch_size=128, n_batches=60, seed=1, shuffle_tokens=300)
    assert loader.rows == [(0, holdout_start(cache))] == [(0, 1984)]  # no holdout record: the tail rule
    ids = np.concatenate([row_ids(x_BD) for x_BD in loader])
    assert loader.epochs == 4 and ids.max() < holdout_start(cache)


def test_one_epoch_is_every_training_row_once(cache):
    loader = ActivationLoader(cache, HOOK, batch_size=62, n_batches=32, seed=5, shuffle_tokens=200)
    ids = np.concatenate([row_ids(x_BD) for x_BD in loader])
    assert loader.epochs == 1
    assert np.array_equal(np.sort(ids), np.arange(holdout_start(cache)))
    assert not np.array_equal(ids, np.arange(holdout_start(cache)))  # and shuffled


def test_rows_are_shuffled_across_chunks_within_a_window(cache):
    loader = ActivationLoader(cache, HOOK, batch_size=256, n_batches=1, seed=0, shuffle_tokens=512)
    chunks_in_batch = np.unique(row_ids(next(iter(loader))) // ROWS_PER_CHUNK)
    assert len(chunks_in_batch) == 8  # a window of 8 chunks, all mixed into the first batch


@pytest.mark.parametrize("start_batch", [1, 7, 20, 31, 44])  # mid-window, window edges, across epochs
def test_resume_equals_fresh_stream(cache, start_batch):
    kw = dict(batch_size=90, n_batches=45, seed=11, shuffle_tokens=256)
    fresh = list(ActivationLoader(cache, HOOK, **kw))
    resumed = list(ActivationLoader(cache, HOOK, start_batch=start_batch, **kw))
    assert len(resumed) == 45 - start_batch
    assert all(torch.equal(a, b) for a, b in zip(fresh[start_batch:], resumed))


def test_resume_decodes_nothing_before_its_window(cache):
    loader = ActivationLoader(cache, HOOK, batch_size=16, n_batches=155, seed=2, shuffle_tokens=256, start_batch=150)
    epoch, window, offset = loader.locate(150 * 16)
    read, read_chunk = [], loader._read_chunk
    loader._read_chunk = lambda window_RD, at, start, stop: read.append(start) or read_chunk(window_RD, at, start, stop)
    assert len(list(loader)) == 5
    windows = [loader.spans_U2[w, 0].tolist() for w in loader.windows(epoch)]
    straddles = offset + 5 * 16 > len(windows[window]) * ROWS_PER_CHUNK  # then the next window is read too
    assert epoch == 1 and sorted(read) == sorted(windows[window] + (windows[window + 1] if straddles else []))


@pytest.mark.parametrize("size", [2, 3])  # 90 rows in 2 equal parts, and in 3 parts
def test_parts_of_each_batch_concatenate_to_the_whole_batch(cache, size):
    kw = dict(batch_size=90, n_batches=12, seed=4, shuffle_tokens=256, start_batch=3)
    whole = list(ActivationLoader(cache, HOOK, **kw))
    parts = [list(ActivationLoader(cache, HOOK, part=(r, size), **kw)) for r in range(size)]
    assert [len(p) for p in parts] == [9] * size
    assert all(torch.equal(torch.cat([p[i] for p in parts]), w) for i, w in enumerate(whole))
    assert [len(p[0]) for p in parts] == [90 * (r + 1) // size - 90 * r // size for r in range(size)]
    last = ActivationLoader(cache, HOOK, part=(size - 1, size), **kw)  # names its rows in the cache, not the part's
    first_row = 90 * (size - 1) // size
    assert last.source_rows(5, [0, 1]) == ActivationLoader(cache, HOOK, **kw).source_rows(5, [first_row, first_row + 1])


def test_seed_determines_the_order(cache):
    kw = dict(batch_size=64, n_batches=3, shuffle_tokens=256)
    a, again, b = (torch.cat(list(ActivationLoader(cache, HOOK, seed=s, **kw))) for s in (0, 0, 1))
    assert torch.equal(a, again) and not torch.equal(a, b)


def test_output_dtype(cache):
    x_BD = next(iter(ActivationLoader(cache, HOOK, batch_size=32, n_batches=1, dtype=torch.bfloat16)))
    assert x_BD.dtype == torch.bfloat16 and x_BD.shape == (32, D)


def test_the_single_threaded_gather_leaves_the_callers_thread_count_alone(cache):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # even on a 1-core machine, so a process-wide change would show
        gathered_in = []
        loader = ActivationLoader(cache, HOOK, batch_size=32, n_batches=3)
        produce = loader._produce
        loader._produce = lambda *a: (produce(*a), gathered_in.append(torch.get_num_threads()))
        assert len(list(loader)) == 3
        assert gathered_in == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches(cache):
    kw = dict(batch_size=100, n_batches=25, seed=4, shuffle_tokens=256)
    on_cpu = list(ActivationLoader(cache, HOOK, **kw))
    on_gpu = list(ActivationLoader(cache, HOOK, device="cuda", **kw))
    assert all(g.is_cuda and g.dtype == torch.float32 and torch.equal(g.cpu(), c) for g, c in zip(on_gpu, on_cpu))


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("loader-")]


def test_threads_stop_when_closed_or_dropped(cache):
    loader = ActivationLoader(cache, HOOK, batch_size=16, n_batches=100, prefetch=2)
    it = iter(loader)
    next(it), next(it)
    assert loader_threads()
    it.close()
    assert not loader_threads()
    it = iter(loader)
    next(it)
    del it
    gc.collect()
    assert not loader_threads()


def test_corrupt_chunk_is_named_in_the_error(tmp_path):
    cache = make_cache(tmp_path / "c.zarr", "bfloat16")
    file = shard_file(cache.path, cache.acts(HOOK), 2)
    file.write_bytes(b"\xff" * 16 + file.read_bytes()[16:])  # the Blosc header of chunk 8 (rows 512:576)
    loader = ActivationLoader(cache, HOOK, batch_size=100, n_batches=19, shuffle_tokens=256)
    with pytest.raises(CacheError, match=r"rows 512:576 \(chunk 8\) of acts/blocks.0.hook_resid_post"):
        list(loader)
    assert not loader_threads()


def test_bad_arguments_are_named(cache):
    with pytest.raises(ValueError, match=r"rows \(0, 2001\)"):
        ActivationLoader(cache, HOOK, batch_size=8, n_batches=1, rows=(0, 2001))
    with pytest.raises(ValueError, match="start_batch=5"):
        ActivationLoader(cache, HOOK, batch_size=8, n_batches=4, start_batch=5)
    with pytest.raises(ValueError, match=r"part=\(2, 2\)"):
        ActivationLoader(cache, HOOK, batch_size=8, n_batches=4, part=(2, 2))
    with pytest.raises(CacheError, match="blocks.9"):
        ActivationLoader(cache, "blocks.9.hook_resid_post", batch_size=8, n_batches=1)
