"""The held-out rows: whole contexts of a cache that `sae train` never reads and `sae eval` measures on.

Caches harvested from now on record `"holdout": "spread"` in their metadata: the held-out contexts are spread
over the whole cache, so that they come from the same text as the training rows even when the harvest did not
shuffle (an unshuffled sample's tail can be one kind of text: on the built-in sample, the reference-manual
topics after the docstrings). The cache is cut into blocks of whole chunks (one chunk when a chunk holds enough
contexts), and each block holds out its last `round(fraction * contexts in the block)` contexts (at least one). A
block's training rows are one contiguous span, so the loader decodes each chunk once, in one read; evaluation
decodes only the chunks that end a block.

A cache without the record (written before it, or by another tool) keeps the rule it had: a tail of whole
chunks (`holdout_start`). Training records which rule and fraction it used (run.json and each SAE's record),
and evaluation reads the rows that every SAE it evaluates held out.
"""

from __future__ import annotations

import math

import numpy as np

from sae_cache.sae_common.cache_format import Cache, CacheError, holdout_start

SPREAD = "spread"  # the value of the metadata key "holdout" in caches whose held-out rows are spread
DEFAULT_FRACTION = 0.02  # TrainConfig.holdout_fraction's default, for SAEs that record no rule


def spread_block(n_contexts: int, contexts_per_chunk: int, fraction: float) -> int:
    """Contexts per block: whole chunks, enough of them that a block holds out at least one context at
    `fraction` (the whole cache when even that is too few)."""
    n_chunks = -(-n_contexts // contexts_per_chunk)
    chunks = min(n_chunks, math.ceil(1 / (fraction * contexts_per_chunk))) if fraction > 0 else n_chunks
    return max(1, chunks) * contexts_per_chunk


def spread_mask(n_contexts: int, block_contexts: int, fraction: float) -> np.ndarray:
    """[n_contexts] bool, True where a context is held out: the last round(fraction * length) contexts (at least
    one, at most half) of each block of `block_contexts`; a short last block may hold out none."""
    mask = np.zeros(n_contexts, dtype=bool)
    for start in range(0, n_contexts, block_contexts):
        length = min(block_contexts, n_contexts - start)
        held = min(max(1, round(length * fraction)), length // 2)
        mask[start + length - held:start + length] = True
    return mask


def tail_mask(n_contexts: int, first_heldout: int) -> np.ndarray:
    mask = np.zeros(n_contexts, dtype=bool)
    mask[first_heldout:] = True
    return mask


def holdout_record(cache: Cache, fraction: float) -> dict:
    """What training records of its held-out rows (run.json, each SAE's record), so that evaluation finds the
    same rows whatever the layout of the cache it is given (--cache: a copy, a rewrite by another tool)."""
    if cache.meta.get("holdout") == SPREAD:
        ctx = cache.meta["context_size"]
        block = spread_block(cache.n_tokens // ctx, cache.layout["rows_per_chunk"] // ctx, fraction)
        return {"holdout": {"rule": SPREAD, "fraction": fraction, "block_contexts": block}}
    return {"holdout_start": holdout_start(cache, fraction)}


def heldout_mask(cache: Cache, record: dict | None = None) -> np.ndarray:
    """[contexts] bool of the rows held out under a training record (`holdout_record`'s keys; None or neither
    key: the cache's own rule at the default fraction)."""
    ctx = cache.meta["context_size"]
    n_contexts = cache.n_tokens // ctx
    record = record or {}
    if "holdout" in record:
        rule = record["holdout"]
        mask = spread_mask(n_contexts, rule["block_contexts"], rule["fraction"])
    elif record.get("holdout_start") is not None:
        start = record["holdout_start"]
        assert start % ctx == 0, "the held-out tail is whole contexts"
        mask = tail_mask(n_contexts, start // ctx)
    else:
        return heldout_mask(cache, holdout_record(cache, DEFAULT_FRACTION))
    if not mask.any():
        raise CacheError(f"the cache {cache.path} has {cache.n_tokens:,} tokens ({n_contexts} contexts): too few to "
                         "hold any out")
    return mask


def row_ranges(mask: np.ndarray, context_size: int) -> list[tuple[int, int]]:
    """The runs of True contexts in `mask` as row ranges [start, stop), in order."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
    return [(int(a) * context_size, int(b) * context_size) for a, b in zip(edges[::2], edges[1::2])]


def training_ranges(cache: Cache, fraction: float) -> list[tuple[int, int]]:
    """The row ranges training reads: every context the cache's rule does not hold out at `fraction`."""
    mask = heldout_mask(cache, holdout_record(cache, fraction))
    ranges = row_ranges(~mask, cache.meta["context_size"])
    if not ranges:
        raise CacheError(f"the cache {cache.path} holds out all of its {cache.n_tokens:,} tokens; nothing is left to "
                         "train on")
    return ranges
