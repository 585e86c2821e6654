"""The compression choice: ratio, encode and decode speed of Blosc codecs on real bf16 activations. JSON lines.

Activations of the built-in model (harvested into a temporary cache) are cut into chunks of the cache's size
(~4 MB) and run through each codec as the cache stores them (Blosc, byte shuffle over 2-byte items, 1 MiB
blocks). Decode is measured on one thread and on `--threads` threads (one chunk each at a time, as the loader
decodes); the baseline, in the same run, is a plain copy of the same bytes (what "no compression" costs).

    .venv/bin/python bench/codec_bench.py [--tokens 200K] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from numcodecs import Blosc

from sae_cache.harvest.run import harvest
from sae_cache.sae_common.cache_format import TARGET_CHUNK_BYTES, open_cache
from sae_cache.sae_common.config import HarvestConfig, parse_count
from sae_cache.sae_common.model import ASSETS

# (cname, clevel): the cache's choices (zstd-1, lz4-5) and the neighbours considered for them
CODECS = [("zstd", 1), ("zstd", 3), ("lz4", 5), ("lz4", 9), ("lz4hc", 1), ("lz4hc", 5), ("blosclz", 5)]


def best_rate(nbytes: int, fn, repeat: int) -> float:
    """GB/s of `fn` over `nbytes`, best of `repeat` runs (the least disturbed on a shared machine)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="200K")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="codec-bench-"))
    try:
        cfg = HarvestConfig(model="tiny-stdlib-gpt2", layers=(2,), dataset=str(ASSETS / "stdlib-sample.txt"),
                            tokens=parse_count(args.tokens), dtype="bfloat16", device="cpu")
        cache = open_cache(harvest(cfg, work / "cache.zarr"))
        rows_UD = np.ascontiguousarray(cache.acts(cache.hooks[0])[:]).view(np.uint16)  # bf16 bits
        per_chunk = max(1, TARGET_CHUNK_BYTES // rows_UD[0].nbytes)
        chunks = [np.ascontiguousarray(rows_UD[i:i + per_chunk]) for i in range(0, len(rows_UD), per_chunk)]
        chunks = [c for c in chunks if len(c) == per_chunk]
        nbytes = sum(c.nbytes for c in chunks)
        outs = [np.empty_like(c) for c in chunks]
        copy = best_rate(nbytes, lambda: [np.copyto(o, c) for o, c in zip(outs, chunks)], args.repeat)
        with ThreadPoolExecutor(args.threads) as pool:
            for cname, clevel in CODECS:
                codec = Blosc(cname=cname, clevel=clevel, shuffle=Blosc.SHUFFLE, blocksize=1 << 20)
                encode = best_rate(nbytes, lambda: [codec.encode(c) for c in chunks], max(1, args.repeat // 2))
                encoded = [codec.encode(c) for c in chunks]
                one = best_rate(nbytes, lambda: [codec.decode(e, out=o) for e, o in zip(encoded, outs)], args.repeat)
                many = best_rate(nbytes, lambda: list(pool.map(lambda eo: codec.decode(*eo), zip(encoded, outs))),
                                 args.repeat)
                assert all(np.array_equal(o, c) for o, c in zip(outs, chunks)), f"{cname}-{clevel} is not lossless"
                print(json.dumps({"bench": "codec", "codec": f"{cname}-{clevel}", "chunk_mb": round(chunks[0].nbytes / 1e6, 2),
                                  "mb": round(nbytes / 1e6), "ratio": round(nbytes / sum(map(len, encoded)), 3),
                                  "encode_gb_per_s": round(encode, 3), "decode_gb_per_s_1_thread": round(one, 3),
                                  f"decode_gb_per_s_{args.threads}_threads": round(many, 3),
                                  "copy_gb_per_s": round(copy, 3)}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
