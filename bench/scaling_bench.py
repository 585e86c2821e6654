"""`sae train` scaling under torchrun, sweep-parallel: training tokens/s of one process vs N ranks on this machine.

Three figures, each against a baseline taken in the same run:
1. train tokens/s of a sweep (default 4 TopK SAEs) in one plain process vs `torchrun --nproc-per-node N`
   (each rank trains its share of the SAEs and reads every batch itself); the ratio is the speed-up.
2. the loader's rows/s in one process vs in each of N processes reading the same cache at once: what it costs
   that every rank reads (decodes) the cache itself rather than once per node.
3. the per-batch stop-flag agreement (distributed.any_rank, one all_reduce on the CPU) in µs, against the time
   of one training batch.
On the CPU each rank is one process with one thread (OMP_NUM_THREADS=1), standing for one device; the one
process gets one thread too. Timings on a busy machine are indicative only.

    .venv/bin/python bench/scaling_bench.py [--nproc 2] [--saes 4] [--d-model 128] [--tokens 131072]
    .venv/bin/python bench/scaling_bench.py --device cuda --nproc 8 --saes 8 --d-model 2304 --tokens 4194304
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(cmd: list, nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    launch = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                                if nproc > 1 else [])]
    done = subprocess.run([*launch, *map(str, cmd)], capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(map(str, cmd))}\n{done.stderr[-3000:]}")
    return done


def train_rate(cache: Path, out: Path, nproc: int, a: argparse.Namespace) -> float:
    """The training loop's own tokens/s (the progress table's, so start-up is not counted)."""
    ks = ",".join(str(8 * (i + 1)) for i in range(a.saes))
    cmd = ["-m", "sae_cache.sae_common.cli", "train", "--cache", cache, "--out", out, "--arch", "topk", "--k", ks,
           "--expansion", a.expansion, "--batch-size", a.batch_size, "--tokens", a.tokens, "--device", a.device,
           "--parallel", "sweep", "--log-every", 10**6, "--checkpoint-every", 10**12]
    rates = re.findall(r"([\d,]+) tok/s", run(cmd, nproc).stderr)
    return float(rates[-1].replace(",", ""))


def worker(mode: str, cache: str, a: argparse.Namespace) -> None:
    """Under torchrun (or alone): print this rank's loader rows/s, or the stop flag's µs per call."""
    from sae_cache.sae_common import distributed as D
    from sae_cache.sae_common.cache_format import open_cache
    from sae_cache.train.loader import ActivationLoader

    D.world()  # joins the process group under torchrun
    if mode == "flag":
        D.any_rank(False)  # joins the group
        t0, n = time.perf_counter(), 2000
        for _ in range(n):
            D.any_rank(False)
        print(f"flag {(time.perf_counter() - t0) / n * 1e6:.1f}", flush=True)
    else:
        c = open_cache(cache)
        loader = ActivationLoader(c, c.hooks[0], batch_size=a.batch_size, n_batches=a.tokens // a.batch_size)
        t0 = time.perf_counter()
        rows = sum(len(x_BD) for x_BD in loader)
        print(f"rows {rows / (time.perf_counter() - t0):.0f}", flush=True)
    D.barrier()
    D.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--saes", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", choices=["flag", "loader"], help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.cache, a)
    from tests.cache_utils import write_cache

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "c.zarr"
        torch.manual_seed(0)
        x_ND = torch.randn(a.tokens + a.tokens // 8, a.d_model) @ torch.randn(a.d_model, a.d_model)  # + holdout
        write_cache(cache, x_ND[: len(x_ND) // 128 * 128], context_size=128)
        one, many = (train_rate(cache, Path(tmp) / f"run{n}", n, a) for n in (1, a.nproc))
        print(f"train tokens/s, {a.saes} SAEs d={a.d_model} x{a.expansion}, batch {a.batch_size}, {a.device}: "
              f"1 process {one:,.0f}, {a.nproc} ranks {many:,.0f}: speed-up {many / one:.2f}x (ideal {a.nproc}x)")
        me = [str(Path(__file__).resolve()), "--cache", cache, "--batch-size", a.batch_size, "--tokens", a.tokens]
        alone = float(run([*me, "--worker", "loader"], 1).stdout.split()[1])
        each = [float(line.split()[1]) for line in run([*me, "--worker", "loader"], a.nproc).stdout.splitlines()]
        print(f"loader rows/s: 1 process alone {alone:,.0f}; each of {a.nproc} reading at once "
              f"{', '.join(f'{r:,.0f}' for r in each)} ({min(each) / alone:.2f}x of alone)")
        flag_us = float(run([*me, "--worker", "flag"], a.nproc).stdout.split()[1])
        batch_us = a.batch_size / many * 1e6
        print(f"stop-flag agreement: {flag_us:.0f} µs per batch = {flag_us / batch_us:.2%} of a {a.nproc}-rank batch "
              f"({batch_us / 1e3:.1f} ms)")
    print("on N GPUs: torchrun --standalone --nproc-per-node N -m sae_cache.sae_common.cli train --cache CACHE "
          "--device cuda --parallel sweep --arch topk --k 8,16,...  (or: .venv/bin/python bench/scaling_bench.py "
          "--device cuda --nproc N --saes N --d-model 2304 --tokens 4194304)")


if __name__ == "__main__":
    main()
