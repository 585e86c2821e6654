"""The data path of `sae train`: shuffled batches of one hook's activations, read from a cache chunk by chunk.

The loader never reads row by row. Each epoch visits the inner chunks of a row range in a random order,
groups them into windows of whole chunks (about `shuffle_tokens` rows), and permutes the rows of each window.
The row stream is the concatenation of those windows over epochs, and batch i is rows [i*B, (i+1)*B) of it, so
a batch may straddle windows and epochs. The stream is a pure function of (seed, rows, chunk size, window
size): a checkpoint only needs the batch index to resume (`start_batch`), and resuming decodes nothing before
the window that holds the first row wanted.

Chunks are decoded by a thread pool (Blosc releases the GIL) one window ahead of the window being served,
straight from the shard files into the window's buffer (sae_common/chunk_reader.py), each chunk checked against
its CRC32C (or, in caches written before chunks carried one, its shard's SHA-256 on first touch) before its rows
are used; a damaged chunk stops training with the file named. One more thread gathers batches and keeps
`prefetch` of them ready, so decoding overlaps the training step. An int8 cache's rows travel as codes with their
per-row scales (a quarter of float32's bytes to a GPU) and are dequantised on the GPU, or on the CPU by that thread.
"""

from __future__ import annotations

import functools
import math
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from sae_cache.sae_common.background import put_unless_stopped
from sae_cache.sae_common.cache_format import TORCH_DTYPE, Cache, damaged, storage_view
from sae_cache.sae_common.chunk_reader import ChunkDamaged, ChunkReader
from sae_cache.sae_common.config import TrainConfig
from sae_cache.sae_common.holdout import training_ranges
from sae_cache.sae_common.quantize import QUANTIZED_DTYPES, dequantize, scales_path


# -- the stream: pure functions of the seed and the geometry ---------------------------------------------

def chunk_spans(rows: tuple[int, int], rows_per_chunk: int) -> np.ndarray:
    """[start, stop) of each inner chunk's part of `rows`, shape (U, 2); the first and last may be partial."""
    start, stop = rows
    edges = np.arange(start // rows_per_chunk * rows_per_chunk, stop, rows_per_chunk)
    return np.stack([np.maximum(edges, start), np.minimum(edges + rows_per_chunk, stop)], axis=1)


@functools.lru_cache(maxsize=4)  # asked for once per window; a permutation of all the chunks is not free
def epoch_windows(seed: int, epoch: int, n_chunks: int, chunks_per_window: int) -> tuple[np.ndarray, ...]:
    """The chunk indices of each window of an epoch: a fresh permutation, split into near-equal windows.

    Splitting evenly (rather than full windows and a short remainder) keeps the last window as well shuffled
    as the others.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n_chunks)
    return tuple(np.array_split(order, math.ceil(n_chunks / chunks_per_window)))


def window_order(seed: int, epoch: int, window: int, n_rows: int) -> np.ndarray:
    """The permutation of a window's rows (rows laid out in the window's chunk order)."""
    return np.random.default_rng([seed, epoch, window]).permutation(n_rows)


# -- the loader ------------------------------------------------------------------------------------------

class ActivationLoader:
    """`n_batches` batches `x_BD` of one hook (the CLI asks for tokens: n_batches = tokens // batch_size).

    rows: the [start, stop) row range read, or a list of them (in order, disjoint); default: the training rows
    (every row the cache's held-out rule leaves to training, sae_common/holdout.py).
    shuffle_tokens: rows per shuffle window, rounded to whole chunks; two windows are held in memory.
    workers: threads decoding chunks; prefetch: batches kept ready ahead of the consumer.
    start_batch: resume here; batches start_batch..n_batches-1 are yielded, equal to an uninterrupted run's.
    part: (rank, size) yields only rows [rank*B//size, (rank+1)*B//size) of each batch of B: this rank's slice
    of the global batch a one-process run sees (data-parallel training); (0, 1) yields whole batches.
    Iterating starts fresh background threads each time; closing or dropping the iterator stops them.
    """

    def __init__(self, cache: Cache, hook: str, *, batch_size: int, n_batches: int,
                 rows: tuple[int, int] | list[tuple[int, int]] | None = None,
                 seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 shuffle_tokens: int = TrainConfig.shuffle_tokens, workers: int = 2, prefetch: int = 4, start_batch: int = 0,
                 part: tuple[int, int] = (0, 1)):
        given = rows
        rows = training_ranges(cache, TrainConfig.holdout_fraction) if rows is None else (
            [rows] if isinstance(rows, tuple) else rows)
        bounds = [0] + [int(r) for span in rows for r in span] + [cache.n_tokens]
        if not rows or any(a > b for a, b in zip(bounds, bounds[1:])) or any(a >= b for a, b in rows):
            raise ValueError(f"rows {given} are not non-empty, ordered, disjoint ranges inside the cache's "
                             f"{cache.n_tokens} rows")
        if not 0 <= start_batch <= n_batches:
            raise ValueError(f"start_batch={start_batch} must be between 0 and n_batches={n_batches}")
        if batch_size < 1 or workers < 1 or prefetch < 1:
            raise ValueError(f"batch_size ({batch_size}), workers ({workers}) and prefetch ({prefetch}) must be >= 1")
        rank, size = part
        if not 0 <= rank < size <= batch_size:
            raise ValueError(f"part={part} must be (rank, size) with 0 <= rank < size <= batch_size ({batch_size})")
        self.slice = slice(rank * batch_size // size, (rank + 1) * batch_size // size)
        self.array, self.path, self.cache_dtype = cache.acts(hook), cache.path, cache.dtype
        self.reader = ChunkReader(self.array, shard_digests(cache, self.array.path))
        # An int8 cache: each row's scale, read chunk by chunk beside the codes (same rows per chunk).
        self.scales = (ChunkReader(cache.array(scales_path(hook)), shard_digests(cache, scales_path(hook)))
                       if cache.dtype in QUANTIZED_DTYPES else None)
        self.rows, self.d_model = rows, cache.d_model
        self.rows_per_chunk = self.reader.rows_per_chunk
        self.spans_U2 = np.concatenate([chunk_spans(r, self.rows_per_chunk) for r in rows])
        self.chunks_per_window = max(1, round(shuffle_tokens / self.rows_per_chunk))
        self.batch_size, self.n_batches, self.start_batch, self.seed = batch_size, n_batches, start_batch, seed
        self.device, self.dtype = torch.device(device), dtype
        self.workers, self.prefetch = workers, prefetch

    @property
    def n_rows(self) -> int:
        return sum(stop - start for start, stop in self.rows)

    @property
    def epochs(self) -> int:
        """How many passes over the rows `n_batches` batches take (the last one possibly partial)."""
        return math.ceil(self.n_batches * self.batch_size / self.n_rows)

    def __len__(self) -> int:
        return self.n_batches - self.start_batch

    def windows(self, epoch: int) -> tuple[np.ndarray, ...]:
        return epoch_windows(self.seed, epoch, len(self.spans_U2), self.chunks_per_window)

    def locate(self, row: int) -> tuple[int, int, int]:
        """(epoch, window, offset in the window) of row `row` of the stream; decodes nothing."""
        epoch, offset = divmod(row, self.n_rows)
        lengths_U = self.spans_U2[:, 1] - self.spans_U2[:, 0]
        ends = np.cumsum([lengths_U[w].sum() for w in self.windows(epoch)])
        window = int(np.searchsorted(ends, offset, side="right"))
        return epoch, window, offset - (int(ends[window - 1]) if window else 0)

    def source_rows(self, batch: int, rows_in_batch: list[int]) -> list[int]:
        """Cache row indices of some rows of batch `batch` as yielded (this part's; to name bad data); decodes
        nothing."""
        found = []
        for i in rows_in_batch:
            epoch, window, offset = self.locate(batch * self.batch_size + self.slice.start + i)
            spans_W2 = self.spans_U2[self.windows(epoch)[window]]
            lengths = spans_W2[:, 1] - spans_W2[:, 0]
            r = int(window_order(self.seed, epoch, window, int(lengths.sum()))[offset])
            c = int(np.searchsorted(np.cumsum(lengths), r, side="right"))
            found.append(int(spans_W2[c, 0]) + r - int(np.cumsum(lengths)[c - 1] if c else 0))
        return found

    def __iter__(self) -> Iterator[torch.Tensor]:
        if len(self) == 0:
            return
        batches: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="loader-decode")
        producer = threading.Thread(target=self._produce, args=(batches, stop, pool), name="loader-batches", daemon=True)
        producer.start()
        try:
            for _ in range(len(self)):
                got = batches.get()
                if isinstance(got, BaseException):
                    raise got
                x_BD, scales_B1 = got
                # this part's rows (a view: the rows of the other parts are gathered but never copied on)
                x_BD = x_BD[self.slice]
                scales_B1 = None if scales_B1 is None else scales_B1[self.slice]
                if self.device.type == "cuda":
                    # Copy the pinned storage-dtype rows first and convert on the GPU: `.to(device, dtype)` would
                    # convert on the CPU into unpinned memory, doubling the bytes and making the copy synchronous.
                    x_BD = x_BD.to(self.device, non_blocking=True)
                    scales_B1 = None if scales_B1 is None else scales_B1.to(self.device, non_blocking=True)
                yield x_BD.to(self.dtype) if scales_B1 is None else dequantize(x_BD, scales_B1, self.dtype)
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            producer.join()
            pool.shutdown(wait=True)

    # -- background: decode windows, gather batches ----------------------------------------------------

    def _produce(self, batches: queue.Queue, stop: threading.Event, pool: ThreadPoolExecutor) -> None:
        # This thread's gathers run single-threaded: a torch op called from a new thread gets an OpenMP team of
        # its own, whose threads spin after each op on the cores the decoders and the training step need
        # (loader 1.0 -> 1.5 GB/s in bench/loader_bench.py). The setting is per thread; the caller's is unchanged.
        torch.set_num_threads(1)
        try:
            epoch, window, offset = self.locate(self.start_batch * self.batch_size)
            B, wanted = self.batch_size, len(self) * self.batch_size  # rows still to hand out
            # Two window buffers take turns (one served, one being decoded into): a fresh buffer per window
            # would cost the kernel a page fault per 4 KiB, which halved the decode rate (bench/loader_bench.py).
            buffers = [(torch.empty(0), torch.empty(0)), (torch.empty(0), torch.empty(0))]
            pending = self._submit(pool, epoch, window, buffers, 0)
            x_BD, filled, turn = None, 0, 1
            while wanted and not stop.is_set():
                window_RD, scales_R1, order_R = self._collect(pending)
                if len(window_RD) - offset < wanted:  # decode the next window while this one is served
                    epoch, window = (epoch, window + 1) if window + 1 < len(self.windows(epoch)) else (epoch + 1, 0)
                    pending, turn = self._submit(pool, epoch, window, buffers, turn), 1 - turn
                while offset < len(window_RD) and wanted:
                    if x_BD is None:
                        pin = self.device.type == "cuda"
                        x_BD = torch.empty((B, self.d_model), dtype=window_RD.dtype, pin_memory=pin)
                        scales_B1 = None if scales_R1 is None else torch.empty((B, 1), pin_memory=pin)
                    take = min(B - filled, len(window_RD) - offset)
                    order_T = order_R[offset:offset + take]
                    torch.index_select(window_RD, 0, order_T, out=x_BD[filled:filled + take])
                    if scales_R1 is not None:
                        torch.index_select(scales_R1, 0, order_T, out=scales_B1[filled:filled + take])
                    offset, filled, wanted = offset + take, filled + take, wanted - take
                    if filled == B:
                        if scales_B1 is not None and self.device.type == "cpu":  # here, overlapping the step
                            x_BD, scales_B1 = dequantize(x_BD, scales_B1, self.dtype), None
                        if not put_unless_stopped(batches, (x_BD, scales_B1), stop):
                            return
                        x_BD, filled = None, 0
                offset = 0
        except BaseException as e:  # surfaces in the consumer, with the chunk named by `_read_chunk`
            put_unless_stopped(batches, e, stop)

    def _submit(self, pool: ThreadPoolExecutor, epoch: int, window: int, buffers: list[tuple], turn: int) -> tuple:
        """Start decoding a window's chunks into `buffers[turn]` (rows and, for an int8 cache, scales; grown if
        short), in the window's chunk order."""
        spans_W2 = self.spans_U2[self.windows(epoch)[window]]
        lengths = spans_W2[:, 1] - spans_W2[:, 0]
        n_rows = int(lengths.sum())
        if len(buffers[turn][0]) < n_rows:
            buffers[turn] = (torch.empty((n_rows, self.d_model), dtype=TORCH_DTYPE[self.cache_dtype]),
                             torch.empty((n_rows if self.scales is not None else 0, 1)))
        window_RD, scales_R1 = (b[:n_rows] for b in buffers[turn])
        at = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        futures = [pool.submit(self._read_chunk, window_RD, int(a), int(s), int(e)) for a, (s, e) in zip(at, spans_W2)]
        if self.scales is not None:
            futures += [pool.submit(self._read_chunk, scales_R1, int(a), int(s), int(e), self.scales)
                        for a, (s, e) in zip(at, spans_W2)]
        return epoch, window, window_RD, scales_R1 if self.scales is not None else None, futures

    def _collect(self, pending: tuple) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        epoch, window, window_RD, scales_R1, futures = pending
        for future in futures:
            future.result()
        return window_RD, scales_R1, torch.from_numpy(window_order(self.seed, epoch, window, len(window_RD)))

    def _read_chunk(self, window_RD: torch.Tensor, at: int, start: int, stop: int, reader: ChunkReader | None = None) -> None:
        """Rows [start, stop) of the activations (or, given their `reader`, an int8 cache's scales) into the window."""
        try:
            if reader is None:
                self.reader.read(start, stop, storage_view(window_RD[at:at + stop - start], self.cache_dtype))
            else:
                reader.read(start, stop, window_RD[at:at + stop - start].numpy())
        except ChunkDamaged as e:  # it names the rows, chunk, shard and file
            raise damaged(self.path, [str(e)]) from e
        except Exception as e:
            array = (reader or self.reader).array
            raise damaged(self.path, [f"rows {start}:{stop} (chunk {start // self.rows_per_chunk}) of {array.path} "
                                      f"could not be read: {type(e).__name__}: {e}"]) from e


def shard_digests(cache: Cache, name: str) -> list[str] | None:
    """The recorded SHA-256 of each shard file of array `name`, if the cache records them all."""
    if not cache.shard_checksums:
        return None
    digests = [s.get("sha256", {}).get(name) for s in cache.meta["shards"]]
    return None if None in digests else digests

