"""Print the README's comparison table (markdown) from the newest run's eval_summary.json, and copy its plots.

    make quickstart && .venv/bin/python scripts/claim_table.py [RUN_DIR] [--plots docs/]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from sae_cache.sae_common.sae_io import find_runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", type=Path, help="run directory (default: the newest under ./cache)")
    ap.add_argument("--plots", type=Path, help="copy the NMSE and CE plots here")
    args = ap.parse_args()
    run = args.run or find_runs()[0]
    summary = json.loads((run / "eval_summary.json").read_text())
    rows = sorted(summary["saes"], key=lambda r: (r["k"], r["arch"]))
    print(f"Held-out tokens: {rows[0]['tokens']:,}; CE clean {rows[0]['ce_clean']:.4f}, zero-ablated "
          f"{rows[0]['ce_zero_ablated']:.3f}, mean-ablated {rows[0]['ce_mean_ablated']:.3f} nats/token.\n")
    print("| SAE | k | L0 (eval) | NMSE | CE degradation (nats) | CE loss score | dead latents |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sae']} | {r['k']} | {r['l0']:.1f} | {r['nmse']:.4f} | {r['ce_degradation']:+.4f} | "
              f"{r['ce_loss_score']:.4f} | {r['dead_latents']} |")
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        for name in ("nmse_vs_l0", "ce_degradation_vs_l0"):
            shutil.copy(run / "plots" / f"{name}.png", args.plots / f"quickstart_{name}.png")


if __name__ == "__main__":
    main()
