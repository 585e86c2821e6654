"""Training-step throughput, ours vs SAELens and vs the encoder-GEMM bound; one JSON line each.

Same invocation, same machine, same shapes, same kind of data: for every architecture, our step (forward,
backward, decoder constraint, Adam: what `sae train` runs per SAE and batch) and, for those SAELens has, its
TrainingSAE step (training_forward_pass, backward, Adam), run in a separate virtualenv so SAELens never enters
the project's. The bound is the encoder GEMM alone, addmm(b_enc, x, W_enc) (2·B·d·F FLOPs, the only dense work a
TopK-family step needs), timed in the same process, alternating with our step: each figure is the best of
--steps alternating runs, so a busy neighbour slows both alike and the fraction of the bound stays honest. Our
steps run with learning rate 0 (Adam's full work, no change to the SAE), so every timed step has the sparsity
and dead latents set up for it.

Shapes: --shape gpt2 (the BatchTopK paper's d=768, 12288 latents, batch 4096) or gemma-2-2b (layer 12's
d=2304, 16384 latents, batch 2048), k=32; --d/--latents/--batch override. No latent is dead unless --dead marks
that fraction dead (their encoder bias lowered so they stay dead; SAELens gets the same mask): the auxiliary
loss's cost is then in both steps.

Our steps run with the allocator setting `sae` makes when it starts (sae_common/allocator.py; --allocator
default leaves glibc as it is). SAELens runs both ways: as its users run it, and with the same setting (through
glibc's environment variables), so the ratio it gets from the allocator alone is visible.

    .venv/bin/python bench/train_bench.py [--shape gpt2|gemma-2-2b] [--archs batchtopk,topk] [--steps 5]
    .venv/bin/python bench/train_bench.py --device cuda --dtype bfloat16 --shape gemma-2-2b
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from saelens_env import DEFAULT_VENV, saelens_python  # noqa: E402

from sae_cache.sae_common.allocator import AS_ENVIRONMENT, retain_freed_memory  # noqa: E402

SAELENS_ARCHS = {"relu": "standard", "topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu"}
SHAPES = {"gpt2": dict(d=768, F=12288, B=4096), "gemma-2-2b": dict(d=2304, F=16384, B=2048)}

# Runs inside the SAELens virtualenv: prints tokens/s of its training step for one architecture (best step).
SAELENS_STEP = r"""
import json, sys, time, torch
from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig, \
    BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
arch, d, F, B, k, steps, device, dead = json.loads(sys.argv[1])
torch.manual_seed(0)
kinds = {"standard": (StandardTrainingSAE, StandardTrainingSAEConfig, {}),
         "topk": (TopKTrainingSAE, TopKTrainingSAEConfig, {"k": k}),
         "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, {"k": k}),
         "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, {})}
cls, cfg_cls, extra = kinds[arch]
sae = cls(cfg_cls(d_in=d, d_sae=F, device=device, **extra))
opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.99))
coefficients = {name: getattr(c, "value", c) for name, c in sae.get_coefficients().items()}
x = torch.randn(B, d, device=device) * 3 + 1
mask = torch.zeros(F, dtype=torch.bool, device=device)
mask[torch.randperm(F, generator=torch.Generator().manual_seed(1))[:int(dead * F)].to(device)] = True
def step(i):
    opt.zero_grad()
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=mask,
                                                   n_training_steps=i, is_logging_step=False))
    out.loss.backward()
    opt.step()
step(0)
times = []
for i in range(steps):
    if device.startswith("cuda"): torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(i + 1)
    if device.startswith("cuda"): torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
print(json.dumps({"tokens_per_s": B / min(times)}))
"""


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def best_alternating(runs: dict, rounds: int, device: str) -> dict[str, float]:
    """Each callable once (a warm-up), then `rounds` rounds running each in turn: the best seconds of each."""
    for fn in runs.values():
        _time(fn, device)
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            best[name] = min(best[name], _time(fn, device))
    return best


def our_step(arch: str, d: int, F: int, B: int, k: int, device: str, dtype: str, sparse: bool = True,
             density: float | None = None, max_density: float | None = None, dead: float = 0.0, **cfg):
    """A callable running one of our training steps (Member.step) on a fixed batch. relu and jumprelu: b_enc
    shifted so that `density` of the entries are active (a trained SAE's sparsity; at init about half are), and
    max_density (1.0: always sparse) overriding the measured decision. dead: that fraction of the latents dead
    (and kept dead: their encoder bias lowered); none otherwise, whatever the bench's length. cfg: SAEConfig fields."""
    from sae_cache.sae_common.sae import SAE, SAEConfig
    from sae_cache.train.trainer import Member

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=d, d_sae=F, arch=arch, k=k, dead_tokens=2**62, **cfg)).to(device)
    sae.sparse_training = sparse
    if max_density is not None:
        sae.sparse_max_density = max_density
    x = torch.randn(B, d, device=device) * 3 + 1
    sae.set_input_scale(x) if sae.cfg.input_norm == "scalar" else None
    with torch.no_grad():
        if density is not None and sae.arch.active is not None:
            sample = sae.pre_activations(sae.normalize(x)[0]).flatten()[::101]
            sae.b_enc -= sample.kthvalue(max(1, int((1 - density) * sample.numel()))).values
        dead_F = torch.randperm(F, generator=torch.Generator().manual_seed(1))[:int(dead * F)].to(device)
        sae.b_enc[dead_F] -= 1e3
        sae.tokens_since_fired[dead_F] = sae.cfg.dead_tokens
    # lr 0: Adam does all its work, but no step moves the SAE off the state set up here (a JumpReLU bench at 3%
    # density drifted past the sparse path's 5% within its first steps, and timed dense steps)
    member = Member(arch, sae, torch.optim.Adam(sae.parameters(), lr=0.0, betas=(0.9, 0.99), fused=True),
                    autocast=torch.bfloat16 if dtype == "bfloat16" else None)
    sae.train()
    return lambda: member.step(x)


def encoder_gemm(d: int, F: int, B: int, device: str, dtype: str):
    """A callable running x @ W_enc + b_enc alone (one addmm): what a TopK-family step could reach if nothing
    else cost anything."""
    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    x, W, b = (torch.randn(*s, device=device, dtype=dt) for s in ((B, d), (d, F), (F,)))
    return lambda: torch.addmm(b, x, W)


def ours(arch: str, d: int, F: int, B: int, k: int, steps: int, device: str, dtype: str, sparse: bool,
         density: float | None = None, max_density: float | None = None) -> float:
    """Tokens/s of our step, the best of `steps`."""
    step = our_step(arch, d, F, B, k, device, dtype, sparse, density, max_density)
    return B / best_alternating({"step": step}, steps, device)["step"]


def encoder_gemm_bound(d: int, F: int, B: int, steps: int, device: str, dtype: str) -> float:
    """Tokens/s of the encoder GEMM alone, the best of `steps`."""
    return B / best_alternating({"gemm": encoder_gemm(d, F, B, device, dtype)}, steps, device)["gemm"]


def saelens(venv: Path, arch: str, d: int, F: int, B: int, k: int, steps: int, device: str,
            env: dict[str, str] | None = None, dead: float = 0.0) -> float | None:
    python = saelens_python(venv)
    if python is None:
        return None
    done = subprocess.run([str(python), "-c", SAELENS_STEP, json.dumps([SAELENS_ARCHS[arch], d, F, B, k, steps,
                                                                        device, dead])], capture_output=True,
                          text=True, env=None if env is None else os.environ | env)
    if done.returncode:
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="batchtopk,topk,relu,jumprelu,feature_choice,mutual_choice,"
                                       "matryoshka_batchtopk")
    ap.add_argument("--shape", default="gpt2", choices=sorted(SHAPES))
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--latents", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="alternating runs of each; the best counts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--dead", type=float, default=0.0, help="the fraction of latents dead (AuxK's candidates)")
    ap.add_argument("--without-aux", action="store_true",
                    help="also time each architecture with an auxiliary loss without it (aux_coeff 0): its share")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--no-saelens", action="store_true")
    ap.add_argument("--density", type=float, default=None,
                    help="relu/jumprelu: the fraction of active entries (b_enc shifted; at init about half are); "
                         "also times them forced onto the sparse and onto the dense path")
    ap.add_argument("--allocator", default="retain", choices=["retain", "default"],
                    help="retain: keep freed memory, as `sae` does (the default); default: glibc's own behaviour")
    args = ap.parse_args()
    from sae_cache.sae_common.architectures import ARCHS

    retained = args.allocator == "retain" and retain_freed_memory()
    d, F, B = (given or SHAPES[args.shape][key] for given, key in ((args.d, "d"), (args.latents, "F"),
                                                                   (args.batch, "B")))
    shape = dict(shape=args.shape, d=d, F=F, B=B, k=args.k, steps=args.steps, device=args.device,
                 dtype=args.dtype, dead=args.dead)
    gemm = encoder_gemm(d, F, B, args.device, args.dtype)
    for arch in args.archs.split(","):
        runs = {"gemm": gemm, "ours": our_step(arch, d, F, B, args.k, args.device, args.dtype, True, args.density,
                                               dead=args.dead)}
        if ARCHS[arch].active is not None and args.density is not None:  # the measured decision vs each path forced
            runs["sparse_path"] = our_step(arch, d, F, B, args.k, args.device, args.dtype, True, args.density, 1.0,
                                           dead=args.dead)
        if ARCHS[arch].select is not None or ARCHS[arch].active is not None:  # the dense reference path
            runs["dense_path"] = our_step(arch, d, F, B, args.k, args.device, args.dtype, False, args.density,
                                          dead=args.dead)
        if args.without_aux and ARCHS[arch].aux_weights is not None:
            runs["without_aux"] = our_step(arch, d, F, B, args.k, args.device, args.dtype, dead=args.dead,
                                           aux_coeff=0.0)
        best = best_alternating(runs, args.steps, args.device)
        del runs
        rate = B / best["ours"]
        row = {"bench": "train_step", "arch": arch, **shape, "freed_memory_retained": retained,
               "ours_tokens_per_s": round(rate), "encoder_gemm_tokens_per_s": round(B / best["gemm"]),
               "encoder_gemm_tflops": round(2 * d * F / best["gemm"] * B / 1e12, 3),
               "fraction_of_encoder_gemm_bound": round(best["gemm"] / best["ours"], 3)}
        if args.density is not None and ARCHS[arch].active is not None:
            row["density"] = args.density
        for path in ("sparse_path", "dense_path", "without_aux"):
            if path in best:
                row[f"ours_{path}_tokens_per_s"] = round(B / best[path])
        if arch in SAELENS_ARCHS and not args.no_saelens:
            theirs = saelens(args.venv, arch, d, F, B, args.k, args.steps, args.device, dead=args.dead)
            if theirs:
                row.update(sae_lens_tokens_per_s=round(theirs), ratio_vs_sae_lens=round(rate / theirs, 2))
            if theirs and retained:
                same = saelens(args.venv, arch, d, F, B, args.k, args.steps, args.device, AS_ENVIRONMENT, args.dead)
                if same:
                    row.update(sae_lens_same_allocator_tokens_per_s=round(same),
                               ratio_vs_sae_lens_same_allocator=round(rate / same, 2))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
