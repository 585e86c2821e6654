"""The data path: decode throughput of the loader, and whether it slows a training step. JSON lines.

1. GB/s of bf16 rows the loader hands out (whole chunks, background decode, windowed shuffle) from caches of
   the same rows written with each compression: zstd (the default), lz4 (faster to decode, larger) and none
   (the loader's own ceiling: nothing to decode); and from an int8 zstd cache of them (`--dtype int8`: codes and
   a scale per row, dequantised by the loader; its GB/s count the bf16 rows handed out, like the others). The baseline: the same rows in the same order gathered from
   an uncompressed memory map (what every uncompressed cache pays: page-cache reads and the shuffle).
2. A BatchTopK training step (the paper's GPT-2 shape) fed by the loader vs by a batch already in memory.
3. What checking the bytes costs the loader (zstd): the same rows with a CRC32C per chunk (caches as written now),
   without one (older caches: each shard's SHA-256 on first touch, once per run), and with no check at all (the
   baseline, the loader before checks). The three alternate, `--check-runs` times, best of each; ratios vs none.

    .venv/bin/python bench/loader_bench.py [--mb 512] [--epochs 3] [--d 768] [--workers 2] [--checks-only]

Each rate follows a one-epoch warm-up and runs with the allocator setting `sae` makes (sae_common/allocator.py).
It is given over the whole stream and after the first batch (the first window is decoded before anything is
served, once per run). The caches are flushed to disk first, so the kernel's write-back does not run meanwhile.

The cache holds synthetic rows (random normal, bf16; Blosc zstd-1 compresses them about as much as real
activations, ~1.45x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sae_cache.sae_common import cache_writer  # noqa: E402
from sae_cache.sae_common.allocator import retain_freed_memory  # noqa: E402
from sae_cache.sae_common.cache_format import compressors, open_cache  # noqa: E402
from tests.cache_utils import write_cache  # noqa: E402
from sae_cache.train.loader import ActivationLoader, epoch_windows, window_order  # noqa: E402


def loader_gbps(cache, hook: str, batch: int, workers: int, epochs: int, check: bool = True) -> tuple[float, float]:
    """GB/s over the whole stream, and after the first batch (the steady rate of a long run: the first window is
    decoded into fresh memory before anything is served, and the window buffers are faulted in, once per run).
    `check=False` turns off the shard SHA-256 of a cache without chunk CRC32Cs (the baseline of part 3)."""
    n_batches = epochs * cache.n_tokens // batch
    loader = ActivationLoader(cache, hook, batch_size=batch, n_batches=n_batches, rows=(0, cache.n_tokens),
                              dtype=torch.bfloat16, workers=workers)
    if not check:
        assert not loader.reader.crc, "a chunk CRC32C is always checked"
        loader.reader.shard_sha256 = None
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    for _ in it:
        pass
    t2 = time.perf_counter()
    gb = batch * cache.d_model * 2 / 1e9
    return n_batches * gb / (t2 - t0), (n_batches - 1) * gb / (t2 - t1)


def memmap_gbps(path: Path, rows: int, d: int, rows_per_chunk: int, batch: int, shuffle_tokens: int,
                epochs: int) -> float:
    """The same stream (chunk order, windows, row permutations) gathered from an uncompressed memory map."""
    mm = np.memmap(path, dtype=np.uint16, mode="r", shape=(rows, d))
    n_chunks = -(-rows // rows_per_chunk)
    t0 = time.perf_counter()
    handed = 0
    for epoch in range(epochs):
        for w, chunks in enumerate(epoch_windows(0, epoch, n_chunks, max(1, round(shuffle_tokens / rows_per_chunk)))):
            window = np.concatenate([mm[c * rows_per_chunk:(c + 1) * rows_per_chunk] for c in chunks])
            order = torch.from_numpy(window_order(0, epoch, w, len(window)))
            t = torch.from_numpy(window).view(torch.bfloat16)
            for i in range(0, len(order) - batch + 1, batch):
                t.index_select(0, order[i:i + batch])
                handed += batch
    return handed * d * 2 / (time.perf_counter() - t0) / 1e9


def step_time(batches, sae_step, n: int) -> float:
    it = iter(batches)
    sae_step(next(it))  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        sae_step(next(it))
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=512, help="raw bf16 size of the benchmark cache")
    ap.add_argument("--epochs", type=int, default=3, help="passes over it: the rate a long run sees, the first "
                    "window (decoded before anything is served, into fresh memory) amortised as in training")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--latents", type=int, default=12288)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--check-runs", type=int, default=3, help="alternating runs of part 3 (best of each)")
    ap.add_argument("--checks-only", action="store_true", help="only part 3")
    args = ap.parse_args()
    retain_freed_memory()  # as `sae` does when it starts
    work = Path(tempfile.mkdtemp(prefix="loader-bench-"))
    try:
        rows = (args.mb << 20) // (2 * args.d) // 128 * 128
        x = torch.randn(rows, args.d).to(torch.bfloat16)
        if args.checks_only:
            return check_costs(work, x, args)
        raw = work / "raw.u16"
        x.view(torch.int16).numpy().tofile(raw)
        caches = {(c, "bfloat16"): open_cache(write_cache(work / f"{c}.zarr", x, context_size=128, dtype="bfloat16",
                                                          compression=c)) for c in ("zstd", "lz4", "none")}
        caches["zstd", "int8"] = open_cache(write_cache(work / "int8.zarr", x, context_size=128, dtype="int8"))
        del x
        os.sync()  # the kernel's write-back of the new caches would otherwise run during the first measurements
        cache = caches["zstd", "bfloat16"]
        hook = cache.hooks[0]
        geometry = (raw, rows, args.d, cache.meta["layout"]["rows_per_chunk"], args.batch, 131072)
        memmap_gbps(*geometry, 1)
        base = memmap_gbps(*geometry, args.epochs)
        for (compression, dtype), c in caches.items():  # "none": the loader's own ceiling, with no decoding to do
            loader_gbps(c, hook, args.batch, args.workers, 1)  # warm-up: the heap's first growth, as in any long run
            gbps, steady = loader_gbps(c, hook, args.batch, args.workers, args.epochs)
            print(json.dumps({"bench": "loader_decode", "compression": compression, "dtype": dtype, "rows": rows, "d": args.d,
                              "epochs": args.epochs, "workers": args.workers, "disk_mb": round(c.disk_bytes() / 1e6),
                              "raw_mb": round(rows * args.d * 2 / 1e6), "loader_gb_per_s": round(gbps, 3),
                              "after_first_batch_gb_per_s": round(steady, 3),
                              "memmap_gb_per_s": round(base, 3), "ratio_vs_memmap": round(gbps / base, 3)}),
                  flush=True)

        from sae_cache.sae_common.sae import SAE, SAEConfig
        from sae_cache.train.trainer import Member

        torch.manual_seed(0)
        sae = SAE(SAEConfig(d_in=args.d, d_sae=args.latents, arch="batchtopk", k=32)).train()
        member = Member("b", sae, torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.99), fused=True))
        n = args.steps
        loader = ActivationLoader(cache, hook, batch_size=args.batch, n_batches=n + 1, rows=(0, cache.n_tokens),
                                  workers=args.workers)
        first = next(iter(loader))
        sae.set_input_scale(first)
        in_memory = step_time([first] * (n + 1), member.step, n)
        with_loader = step_time(loader, member.step, n)
        print(json.dumps({"bench": "train_step_with_loader", "arch": "batchtopk", "d": args.d, "latents": args.latents,
                          "batch": args.batch, "in_memory_s_per_step": round(in_memory, 3),
                          "with_loader_s_per_step": round(with_loader, 3),
                          "slowdown": round(with_loader / in_memory - 1, 3)}), flush=True)
        check_costs(work, torch.from_numpy(np.fromfile(raw, np.int16)).view(torch.bfloat16).reshape(rows, args.d), args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_costs(work: Path, x: torch.Tensor, args: argparse.Namespace) -> None:
    """Part 3: the loader on the same zstd rows with each kind of check, alternating, best of `check_runs`."""
    crc = open_cache(write_cache(work / "crc.zarr", x, context_size=128, dtype="bfloat16"))
    original = cache_writer.compressors
    cache_writer.compressors = lambda c, dtype: [codec for codec in compressors(c, dtype)
                                                 if codec.to_dict()["name"] != "crc32c"]  # as written before the CRC
    try:
        old = open_cache(write_cache(work / "old.zarr", x, context_size=128, dtype="bfloat16"))
    finally:
        cache_writer.compressors = original
    assert crc.chunk_crc and not old.chunk_crc
    os.sync()
    hook = crc.hooks[0]
    variants = {"none": (old, False), "chunk_crc32c": (crc, True), "shard_sha256_first_touch": (old, True)}
    loader_gbps(crc, hook, args.batch, args.workers, 1)  # warm-up
    best = {name: 0.0 for name in variants}
    for _ in range(args.check_runs):
        for name, (cache, check) in variants.items():
            best[name] = max(best[name], loader_gbps(cache, hook, args.batch, args.workers, args.epochs, check)[0])
    for name in ("chunk_crc32c", "shard_sha256_first_touch"):
        print(json.dumps({"bench": "loader_checks", "check": name, "rows": len(x), "d": args.d, "epochs": args.epochs,
                          "workers": args.workers, "runs": args.check_runs, "loader_gb_per_s": round(best[name], 3),
                          "unchecked_gb_per_s": round(best["none"], 3),
                          "ratio_vs_unchecked": round(best[name] / best["none"], 3)}), flush=True)


if __name__ == "__main__":
    main()
