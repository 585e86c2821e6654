"""`sae features` at scale: time and peak memory of the scan and of writing the page, for one SAE of many latents,
and what they come to at 10M held-out tokens. One JSON line.

    .venv/bin/python bench/features_bench.py [--tokens 64K] [--latents 16384] [--d 768] [--batch 32] [--top 20]

The baseline, measured in the same run over the same rows: reading them and encoding them with the SAE, nothing
else (the least any scan must do). `ratio` is the whole scan's time over it: what the running top-N, the
windows, the statistics and the histogram add. The scan is one pass with a fixed cost per batch, so its time
grows linearly with tokens; its memory does not grow with tokens at all (F × N × W buffers plus one batch's
[B, T, F] activations): run it at two --tokens to see the peak stay put. The extrapolation to 10M tokens is
tokens × the measured time per token, on whatever machine runs this (a busy 2-core CPU gives an upper bound).

The cache holds synthetic rows (random normal, bf16, context 128); the SAE is a BatchTopK SAE with random
weights whose inference threshold is set so that about 32 latents are active per token (the quickstart's k
range); the page uses the built-in model's tokenizer and a random 50,257-token unembedding (GPT-2's size).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sae_cache.evaluate.features import Lens, page_data  # noqa: E402
from sae_cache.evaluate.features_html import render_page  # noqa: E402
from sae_cache.evaluate.features_scan import LatentScan, ScanTarget, scan_rows  # noqa: E402
from sae_cache.evaluate.sources import Target  # noqa: E402
from sae_cache.sae_common.cache_format import open_cache  # noqa: E402
from sae_cache.sae_common.config import parse_count  # noqa: E402
from sae_cache.sae_common.model import BUILTIN_MODELS  # noqa: E402
from sae_cache.sae_common.sae import SAE, SAEConfig  # noqa: E402
from tests.cache_utils import write_cache  # noqa: E402

HOOK, CTX, L0 = "blocks.6.hook_resid_post", 128, 32


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def random_sae(d: int, latents: int, sample_ND: torch.Tensor) -> SAE:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=d, d_sae=latents, arch="batchtopk", k=L0, input_norm="none")).eval()
    with torch.no_grad():
        pre = sae.pre_activations(sample_ND).flatten()
        sae.theta_window[0] = pre.kthvalue(len(pre) - L0 * len(sample_ND)).values  # ~L0 active per token
        sae.n_batches.fill_(1)
    return sae


def measure(args: argparse.Namespace, cache_path: Path) -> dict:
    """In a process of its own (peak RSS then counts the scan, not the writing of the synthetic cache)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-stdlib-gpt2"])
    cache = open_cache(cache_path)
    n = cache.n_tokens
    sae = random_sae(args.d, args.latents, cache.read_rows(HOOK, 0, 1024).float())
    rss_start = peak_rss_gb()
    c0, t0 = time.process_time(), time.perf_counter()  # the baseline: read and encode, nothing kept
    with torch.inference_mode():
        for r0 in range(0, n, args.batch * CTX):
            cache.read_tokens(r0, min(r0 + args.batch * CTX, n))
            sae.encode(cache.read_rows(HOOK, r0, min(r0 + args.batch * CTX, n)).float(), batch_mode=False)
    c1, t1 = time.process_time(), time.perf_counter()
    rss_baseline = peak_rss_gb()
    scan = LatentScan(args.latents, args.top)
    scan_rows(cache, [ScanTarget(sae, HOOK, scan)], [(0, n)], args.batch, torch.ones(CTX, dtype=torch.bool), "cpu")
    c2, t2 = time.process_time(), time.perf_counter()
    rss_scan = peak_rss_gb()
    lens = Lens("random", tokenizer, torch.randn(args.d, 50257), centre=True)
    html = render_page(page_data(Target("bench", cache_path, sae, HOOK, {}), scan, lens, cache, (0, n))).encode()
    c3, t3 = time.process_time(), time.perf_counter()
    return {"tokens": n, "latents": args.latents, "d_model": args.d, "batch_tokens": args.batch * CTX,
            "top": args.top, "l0": round(scan.fired_F.sum().item() / scan.n_tokens, 1),
            "wall_s": {"baseline_read_encode": round(t1 - t0, 2), "scan": round(t2 - t1, 2), "page": round(t3 - t2, 2)},
            "cpu_s": {"baseline_read_encode": round(c1 - c0, 2), "scan": round(c2 - c1, 2), "page": round(c3 - c2, 2)},
            "ratio_scan_to_baseline": {"wall": round((t2 - t1) / (t1 - t0), 2), "cpu": round((c2 - c1) / (c1 - c0), 2)},
            "page_mb": round(len(html) / 1e6, 1),
            "peak_rss_gb": {"loaded": round(rss_start, 2), "baseline": round(rss_baseline, 2),
                            "scan": round(rss_scan, 2), "page": round(peak_rss_gb(), 2)},
            "extrapolated_10M_tokens_scan_h": {"wall": round((t2 - t1) / n * 10e6 / 3600, 2),
                                               "cpu": round((c2 - c1) / n * 10e6 / 3600, 2)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="64K")
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--batch", type=int, default=32, help="contexts per step (sae features --batch-size)")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)  # the measuring child reads this cache
    args = parser.parse_args()
    if args.cache is not None:
        print(json.dumps(measure(args, args.cache)))
        return
    n = parse_count(args.tokens) // CTX * CTX
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokens_N = torch.randint(0, 4096, (n,))  # the built-in tokenizer's vocabulary
        cache = write_cache(Path(tmp) / "c.zarr", torch.randn(n, args.d), context_size=CTX, hook=HOOK,
                            tokens_N=tokens_N, dtype="bfloat16")
        child = [sys.executable, __file__, *sys.argv[1:], "--cache", str(cache)]
        subprocess.run(child, check=True)


if __name__ == "__main__":
    main()
