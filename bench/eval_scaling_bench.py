"""`sae eval` in one process vs under torchrun with N processes, on the same SAEs and held-out tokens. JSON lines.

The eval part of the scaling benchmark (training's is bench/scaling_bench.py). Under torchrun the SAEs are split
across ranks and every rank runs the model's clean pass and its hooks' ablations itself, so with S SAEs on one
hook a batch costs about 3 + S partial forward passes in one process and 3 + S/N per rank: the speed-up tends to
N only when S is large against 3. The whole command is timed (imports, model load, the check of the held-out
shards, plots), as a user waits for it. On a CPU the processes share the cores: the single process gets all
--threads, each of the N ranks --threads / N, so the comparison is at equal cores; a second baseline runs the
single process with a rank's threads, which isolates the split's gain from the kernels' thread scaling. The
metrics are compared too: equal at equal threads per process, and up to the float rounding that a different
number of threads gives otherwise.

    .venv/bin/python bench/eval_scaling_bench.py [--saes 8] [--nproc 2] [--threads 2] [--tokens 64K]

On a machine with G GPUs, the command it times is `torchrun --standalone --nproc-per-node G $(which sae) eval
<run dir> --device cuda` against `sae eval <run dir> --device cuda`: pass --nproc G --device cuda.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sae_cache.sae_common.cache_format import holdout_start, open_cache  # noqa: E402
from sae_cache.sae_common.sae import SAE, SAEConfig  # noqa: E402
from sae_cache.sae_common.sae_io import save_sae  # noqa: E402

SAE_CMD = [sys.executable, "-m", "sae_cache.sae_common.cli"]
HOOK = "blocks.2.hook_resid_post"


def run(cmd: list, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "COLUMNS": "200"}
    t0 = time.perf_counter()
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def make_saes(cache_path: Path, out: Path, n: int, expansion: int) -> list[Path]:
    """Random-weight TopK SAEs (eval's cost does not depend on training) recorded as trained on the cache."""
    cache = open_cache(cache_path)
    extra = {"cache": str(cache_path), "holdout_start": holdout_start(cache)}
    cfg = SAEConfig(d_in=cache.d_model, d_sae=expansion * cache.d_model, arch="topk", k=32, input_norm="none")
    saes = []
    for i in range(n):
        torch.manual_seed(i)
        saes.append(save_sae(SAE(cfg).eval(), out / f"sae{i}", model_name="tiny-stdlib-gpt2", hook_name=HOOK,
                             extra_record=extra))
    return saes


def max_rel_diff(one: Path, many: Path) -> float:
    """Largest relative difference between the two runs' SAE metrics (0 when the threads per process match:
    each SAE is evaluated whole on one rank; else the thread count's float rounding, ~1e-16)."""
    a, b = (json.loads((out / "eval_summary.json").read_text())["saes"] for out in (one, many))
    assert [s["sae"] for s in a] == [s["sae"] for s in b], "the two runs evaluated different SAEs"
    return max((abs(x[k] - y[k]) / max(abs(x[k]), 1e-30) for x, y in zip(a, b) for k in x
                if isinstance(x[k], float)), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--saes", type=int, default=8)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads in all (the N ranks share them)")
    ap.add_argument("--tokens", default="64K", help="harvested; eval reads the held-out tail")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eval-scaling-bench-"))
    try:
        measure(work, args)
    finally:
        shutil.rmtree(work)


def measure(work: Path, args: argparse.Namespace) -> None:
    cache = work / "c.zarr"
    run([*SAE_CMD, "harvest", "--model", "tiny-stdlib-gpt2", "--dataset", "stdlib-sample", "--layer", 2,
         "--tokens", args.tokens, "--device", args.device, "--out", cache], args.threads)
    saes = make_saes(cache, work / "saes", args.saes, args.expansion)
    common = ["eval", *saes, "--device", args.device, "--batch-size", 16]
    one = run([*SAE_CMD, *common, "--out", work / "one"], args.threads)
    per_rank = max(1, args.threads // args.nproc)
    # the second baseline: the split's gain alone, apart from how the kernels scale with threads
    one_thin = run([*SAE_CMD, *common, "--out", work / "thin"], per_rank)
    many = run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                "-m", "sae_cache.sae_common.cli", *common, "--out", work / "many"], per_rank)
    first = json.loads((work / "one" / "eval_summary.json").read_text())["saes"][0]
    print(json.dumps({"bench": "eval_scaling", "saes": args.saes, "d_sae": first["d_sae"],
                      "eval_tokens": first["tokens"], "nproc": args.nproc, "threads": args.threads,
                      "device": args.device, "one_process_s": round(one, 2), "torchrun_s": round(many, 2),
                      "speedup": round(one / many, 2), "one_process_rank_threads_s": round(one_thin, 2),
                      "speedup_at_rank_threads": round(one_thin / many, 2),
                      "max_rel_diff": max_rel_diff(work / "one", work / "many"),
                      "max_rel_diff_at_rank_threads": max_rel_diff(work / "thin", work / "many")}))


if __name__ == "__main__":
    main()
