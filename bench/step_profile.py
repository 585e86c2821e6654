"""Where one training step's time goes: torch.profiler over a few of our steps, each op's own time put in one of
the parts the README names, one JSON line per architecture (milliseconds per step, and each part's share).

    .venv/bin/python bench/step_profile.py [--shape gpt2|gemma-2-2b] [--archs batchtopk] [--steps 3] [--density X]

The parts, by the op and the shape it ran on (B tokens, d inputs, F latents):
  encoder_gemm    the addmm of the [B, d] x [d, F] pre-activations (with the bias it adds)
  selection       passes over the [B, F] matrix or the kept entries that choose them (compare, nonzero, top-k,
                  sort, gather), and their bookkeeping
  sparse_products embedding_bag and sampled_addmm: decoder forward, its gradients, the encoder's gradient
  transpose       the encoder gradient brought from [F, d] to [d, F]
  aux_loss        products over the auxiliary loss's C candidate columns ([B, C] matrices)
  decoder         the decoder constraint's passes over [F, d]
  adam            the fused Adam step
  other           everything else: input normalisation, losses, metrics, the dead-latent bookkeeping
Profiling adds a little to every op; bench/train_bench.py gives the unprofiled rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_bench import SHAPES, our_step  # noqa: E402

from sae_cache.sae_common.allocator import retain_freed_memory  # noqa: E402

PARTS = ("encoder_gemm", "selection", "sparse_products", "transpose", "aux_loss", "decoder", "adam", "other")


def part(name: str, shapes: list, parents: list[str], d: int, F: int, B: int) -> str:
    """The part of the step one op belongs to (see the module docstring)."""
    first = shapes[0] if shapes else []
    if name == "aten::addmm" and len(shapes) > 2 and shapes[1] == [B, d] and shapes[2] == [d, F] or \
            "aten::addmm" in parents[:1] or name == "aten::mm" and shapes[:2] == [[B, d], [d, F]] or \
            name == "aten::add" and shapes[:2] == [[B, F], [F]]:
        return "encoder_gemm"  # (addmm, or as before this project's 2026-11-30 changes, mm then add)
    if name.startswith("aten::_fused_adam") or any(p.startswith("Optimizer.step") for p in parents):
        return "adam"
    if "embedding_bag" in name or "sampled_addmm" in name or \
            any("embedding_bag" in p or "sampled_addmm" in p for p in parents):
        return "sparse_products"
    if name == "aten::copy_" and first in ([d, 256], [d, F % 256], [d, F]):  # (blocked, or whole)
        return "transpose"
    if name == "aten::topk" and len(first) == 2 and first[1] == 128:
        return "selection"  # Feature Choice's top-m down the columns, 128 columns at a time
    usual = {B, d, F, 1, 256, 1024, F % 1024, F % 256}
    if any(len(s) == 2 and (B in s or d in s) and any(x not in usual for x in s) for s in shapes) or \
            name == "aten::index_select" and len(first) == 2 and \
            any(len(s) == 1 and s[0] not in usual for s in shapes) or \
            name == "aten::mm" and all(F not in s for s in shapes) or [B, B] in shapes:
        # a [B, C], [C, d] or [d, C] matrix: C candidate columns (C = B looks like [B, B]; the sparse path's only
        # plain mm are the auxiliary loss's)
        return "aux_loss"
    if len(first) == 2 and first[0] in (F, 1024, F % 1024) and first[1] in (d, 1) and name in (
            "aten::linalg_vector_norm", "aten::div_", "aten::mul", "aten::sum", "aten::addcmul_", "aten::linalg_vecdot"):
        return "decoder"  # (sae.py works on blocks of 1024 rows)
    if name in ("aten::gt", "aten::nonzero", "aten::kthvalue", "aten::topk", "aten::sort", "aten::argsort",
                "aten::index", "aten::index_select", "aten::bincount", "aten::cumsum", "aten::remainder", "aten::div",
                "aten::ge", "aten::__and__", "aten::bitwise_and", "aten::index_put_", "aten::_index_put_impl_") and \
            first and (first[0] * (first[1] if len(first) > 1 else 1) >= B * F // 64 or len(first) == 1):
        return "selection"
    return "other"


def breakdown(arch: str, d: int, F: int, B: int, k: int, steps: int, show_other: int = 0,
              density: float | None = None) -> dict[str, float]:
    step = our_step(arch, d, F, B, k, "cpu", "float32", density=density)
    step()
    with profile(record_shapes=True) as prof:
        for _ in range(steps):
            step()
    ms = dict.fromkeys(PARTS, 0.0)
    others: dict[str, float] = {}
    for e in prof.events():
        parents, p = [], e.cpu_parent
        while p is not None:
            parents.append(p.name)
            p = p.cpu_parent
        where = part(e.name, e.input_shapes or [], parents, d, F, B)
        ms[where] += e.self_cpu_time_total / 1e3 / steps
        if where == "other":
            key = f"{e.name} {e.input_shapes}"
            others[key] = others.get(key, 0.0) + e.self_cpu_time_total / 1e3 / steps
    for key, v in sorted(others.items(), key=lambda kv: -kv[1])[:show_other]:
        print(f"  other: {v:7.1f} ms {key[:150]}", file=sys.stderr)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gpt2", choices=sorted(SHAPES))
    ap.add_argument("--archs", default="batchtopk")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--density", type=float, default=None, help="relu/jumprelu: the fraction of active entries")
    ap.add_argument("--show-other", type=int, default=0, help="print the N largest ops counted as other (stderr)")
    args = ap.parse_args()
    retain_freed_memory()
    d, F, B = (SHAPES[args.shape][key] for key in ("d", "F", "B"))
    for arch in args.archs.split(","):
        ms = breakdown(arch, d, F, B, args.k, args.steps, args.show_other, args.density)
        total = sum(ms.values())
        print(json.dumps({"bench": "step_profile", "arch": arch, "shape": args.shape, "d": d, "F": F, "B": B,
                          "k": args.k, "step_ms": round(total, 1), "ms": {p: round(v, 1) for p, v in ms.items()},
                          "share": {p: round(v / total, 3) for p, v in ms.items()}}), flush=True)


if __name__ == "__main__":
    main()
