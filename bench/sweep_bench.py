"""A sweep in one pass vs the same SAEs trained one run each, with the real loader in the loop. JSON lines.

Four SAEs (TopK and BatchTopK at k=16 and 32) on a synthetic bf16 cache: one `train()` with all four, then
four `train()` runs of one SAE each, then the data pass alone (the loader with no training). One pass should
cost about 4x one SAE's compute plus ONE data pass; separate runs pay the data pass four times.

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
from sae_common.cache_format import open_cache  # noqa: E402
from sae_common.config import TrainConfig  # noqa: E402
from tests.cache_utils import write_cache  # noqa: E402
from train.loader import ActivationLoader  # noqa: E402
from train.run import train  # noqa: E402

SAES = [("topk", 16), ("topk", 32), ("batchtopk", 16), ("batchtopk", 32)]


def timed_train(cache: Path, out: Path, archs: tuple, ks: tuple, args) -> float:
    cfg = TrainConfig(cache=str(cache), archs=archs, ks=ks, dict_sizes=(args.latents,), batch_size=args.batch,
                      tokens=args.batches * args.batch, log_every=1000, checkpoint_every=10**12)
    t0 = time.perf_counter()
    train(cfg, out=out)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--latents", type=int, default=6144)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=12)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    try:
        rows = (args.batches + 2) * args.batch * 2  # training rows beyond the held-out tail
        cache = write_cache(work / "c.zarr", torch.randn(rows, args.d), context_size=128, dtype="bfloat16")
        timed_train(cache, work / "warm-up", ("topk",), (16,), argparse.Namespace(**{**vars(args), "batches": 1}))
        one_pass = timed_train(cache, work / "sweep", ("topk", "batchtopk"), (16, 32), args)
        separate = [timed_train(cache, work / f"{a}{k}", (a,), (k,), args) for a, k in SAES]
        c = open_cache(cache)
        t0 = time.perf_counter()
        for _ in ActivationLoader(c, c.hooks[0], batch_size=args.batch, n_batches=args.batches):
            pass
        data_pass = time.perf_counter() - t0
        print(json.dumps({"bench": "sweep", "saes": len(SAES), "d": args.d, "latents": args.latents,
                          "batch": args.batch, "batches": args.batches, "one_pass_s": round(one_pass, 2),
                          "separate_runs_s": round(sum(separate), 2), "speedup": round(sum(separate) / one_pass, 2),
                          "each_separate_run_s": [round(s, 2) for s in separate],
                          "data_pass_alone_s": round(data_pass, 2)}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
