"""A sweep in one pass vs the same SAEs trained one run each, with the real loader in the loop. JSON lines.

Four SAEs (TopK and BatchTopK at k=16 and 32) on a synthetic bf16 cache: one `train()` with all four, then
four `train()` runs of one SAE each, then the data pass alone (the loader with no training) and each SAE's
compute alone (its steps on batches already in memory). One pass should cost the four computes plus ONE data
pass (`one_pass_over_compute_plus_one_data_pass` near 1; the rest is setup, checkpoints and export); separate
runs pay the data pass, and the setup, four times.

    .venv/bin/python bench/sweep_bench.py [--d 768] [--latents 6144] [--batches 12]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sae_cache.sae_common.allocator import retain_freed_memory  # noqa: E402
from sae_cache.sae_common.cache_format import open_cache  # noqa: E402
from sae_cache.sae_common.config import TrainConfig  # noqa: E402
from tests.cache_utils import write_cache  # noqa: E402
from sae_cache.train.loader import ActivationLoader  # noqa: E402
from sae_cache.train.run import build_members, train  # noqa: E402
from sae_cache.train.sweep import expand  # noqa: E402

SAES = [("topk", 16), ("topk", 32), ("batchtopk", 16), ("batchtopk", 32)]


def timed_train(cache: Path, out: Path, archs: tuple, ks: tuple, args) -> float:
    cfg = TrainConfig(cache=str(cache), archs=archs, ks=ks, dict_sizes=(args.latents,), batch_size=args.batch,
                      tokens=args.batches * args.batch, log_every=1000, checkpoint_every=10**12)
    t0 = time.perf_counter()
    train(cfg, out=out)
    return time.perf_counter() - t0


def compute_alone(batches: list[torch.Tensor], arch: str, k: int, args) -> float:
    """One SAE's training steps on batches already in memory, built as `sae train` builds it: its compute."""
    cfg = TrainConfig(archs=(arch,), ks=(k,), dict_sizes=(args.latents,), batch_size=args.batch)
    (member,) = build_members(expand(cfg, args.d), "cpu", cfg.seed)
    member.sae.set_input_scale(batches[0])
    t0 = time.perf_counter()
    for x_BD in batches:
        member.step(x_BD)
    member.flush(0)  # reads the metrics, as the loop does when it logs
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--latents", type=int, default=6144)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=12)
    args = ap.parse_args()
    retain_freed_memory()  # as `sae` does when it starts
    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    try:
        rows = (args.batches + 2) * args.batch * 2  # training rows beyond the held-out tail
        cache = write_cache(work / "c.zarr", torch.randn(rows, args.d), context_size=128, dtype="bfloat16")
        timed_train(cache, work / "warm-up", ("topk",), (16,), argparse.Namespace(**{**vars(args), "batches": 1}))
        one_pass = timed_train(cache, work / "sweep", ("topk", "batchtopk"), (16, 32), args)
        separate = [timed_train(cache, work / f"{a}{k}", (a,), (k,), args) for a, k in SAES]
        c = open_cache(cache)
        t0 = time.perf_counter()
        batches = list(ActivationLoader(c, c.hooks[0], batch_size=args.batch, n_batches=args.batches))
        data_pass = time.perf_counter() - t0
        compute = [compute_alone(batches, arch, k, args) for arch, k in SAES]
        predicted = sum(compute) + data_pass
        print(json.dumps({"bench": "sweep", "saes": len(SAES), "d": args.d, "latents": args.latents,
                          "batch": args.batch, "batches": args.batches, "one_pass_s": round(one_pass, 2),
                          "separate_runs_s": round(sum(separate), 2), "speedup": round(sum(separate) / one_pass, 2),
                          "each_separate_run_s": [round(s, 2) for s in separate],
                          "each_compute_alone_s": [round(s, 2) for s in compute],
                          "data_pass_alone_s": round(data_pass, 2),
                          "compute_plus_one_data_pass_s": round(predicted, 2),
                          "one_pass_over_compute_plus_one_data_pass": round(one_pass / predicted, 3)}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
