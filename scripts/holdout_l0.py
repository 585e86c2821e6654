"""Inference L0 of a run's SAEs on its training rows and on its held-out rows: with held-out rows that look like
the training rows (sae_common/holdout.py) the two agree within noise.

    .venv/bin/python scripts/holdout_l0.py [RUN_DIR]      # default: the newest run under ./cache

Per SAE: the mean L0 (inference mode, BOS left out, as `sae eval` counts it) over the held-out contexts the SAE
recorded, and over as many training contexts picked evenly across the training rows, each ± the standard error
of the mean over contexts (contexts are the independent units: tokens within one are correlated).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from sae_cache.evaluate.sources import find_sae_dirs, keep_positions, load_targets, open_target_cache
from sae_cache.evaluate.splice import reconstruct
from sae_cache.sae_common.cache_format import Cache
from sae_cache.sae_common.console import make_console
from sae_cache.sae_common.holdout import heldout_mask


def context_l0(cache: Cache, sae, hook: str, contexts: np.ndarray, keep_T: torch.Tensor) -> np.ndarray:
    """[len(contexts)] mean L0 of each context's kept positions."""
    ctx, out = cache.meta["context_size"], []
    with torch.inference_mode():
        for c in contexts:
            x_TD = cache.read_rows(hook, int(c) * ctx, (int(c) + 1) * ctx)[keep_T].float()
            _, acts_TF = reconstruct(sae, x_TD, batch_mode=False)
            out.append((acts_TF != 0).sum(-1).double().mean().item())
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", help="run directory (default: the newest under ./cache)")
    args = ap.parse_args()
    console = make_console()
    targets = load_targets(find_sae_dirs((args.run,) if args.run else (), Path("cache"), console))
    cache = open_target_cache(targets, None)
    keep_T = keep_positions(cache, include_bos=False)
    print(f"cache {cache.path}: {cache.n_tokens:,} tokens, held-out rule "
          f"{cache.meta.get('holdout', 'tail (no record)')}")
    print("| SAE | held-out contexts | L0 held-out | L0 training | difference |")
    print("|---|---|---|---|---|")
    for t in targets:
        held_mask = heldout_mask(cache, t.record.get("extra", {}))
        held, train = np.flatnonzero(held_mask), np.flatnonzero(~held_mask)
        train = train[np.arange(len(held)) * len(train) // len(held)]  # as many, evenly over the training rows
        l0_held, l0_train = (context_l0(cache, t.sae, t.hook, c, keep_T) for c in (held, train))
        se_held, se_train = (x.std(ddof=1) / np.sqrt(len(x)) for x in (l0_held, l0_train))
        diff, se = l0_held.mean() - l0_train.mean(), float(np.hypot(se_held, se_train))
        in_se = f"{diff / se:+.1f} s.e." if se > 0 else "exact: L0 is fixed"  # topk: k on every token
        print(f"| {t.name} | {len(held)} | {l0_held.mean():.2f} ± {se_held:.2f} | {l0_train.mean():.2f} ± "
              f"{se_train:.2f} | {diff:+.2f} ± {se:.2f} ({in_se}) |")


if __name__ == "__main__":
    main()
