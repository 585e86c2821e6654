"""Building small caches without a model: synthetic activations written through the real cache writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sae_cache.sae_common.cache_format import layout_for, to_storage
from sae_cache.sae_common.cache_writer import CacheWriter


def write_cache(path: Path, acts_ND: torch.Tensor, *, tokens_N: torch.Tensor | None = None, context_size: int = 16,
                rows_per_shard: int | None = None, dtype: str = "float32", hook: str = "blocks.0.hook_resid_post",
                compression: str = "zstd", extra_meta: dict | None = None) -> Path:
    """Write `acts_ND` (rows = whole contexts) as a complete cache at `path`, shard by shard; `extra_meta`: more
    attributes (e.g. the held-out rule harvest records)."""
    n, d = acts_ND.shape
    assert n % context_size == 0, "rows are whole contexts"
    tokens_N = torch.arange(n) % 50 if tokens_N is None else tokens_N
    layout = layout_for(d, dtype, context_size, rows_per_shard)
    meta = {"model": "synthetic", "hooks": [hook], "d_model": d, "context_size": context_size, "prepend_bos": False,
            "dtype": dtype, "compression": compression, "layout": layout, "dataset": {"source": "synthetic"},
            "tokenizer": None, "versions": {}, "config": {}, **(extra_meta or {})}
    rows = layout["rows_per_shard"]
    with CacheWriter.open(path, meta, identity={"synthetic": True}) as writer:
        for start in range(0, n, rows):
            writer.write_shard({hook: to_storage(acts_ND[start:start + rows], dtype)},
                               np.asarray(tokens_N[start:start + rows], dtype=np.int32), progress={})
        writer.finish(complete=True)
    return Path(path)
