"""Training-step throughput, ours vs SAELens, at the BatchTopK paper's GPT-2 shape; one JSON line each.

Same invocation, same machine, same shapes (default d=768, 12288 latents, batch 4096, k=32), same kind of
data: for every architecture, our step (forward, backward, decoder constraint, Adam) and, for those SAELens
has, its TrainingSAE step (training_forward_pass, backward, Adam), run in a separate virtualenv so SAELens
never enters the project's. Also the encoder GEMM alone (2·B·d·F FLOPs, the only dense work a TopK-family
step needs), which bounds the TopK family's tokens/s on this machine.

Our steps run with the allocator setting `sae` makes when it starts (sae_common/allocator.py; --allocator
default leaves glibc as it is). SAELens runs both ways: as its users run it, and with the same setting (through
glibc's environment variables), so the ratio it gets from the allocator alone is visible.

    .venv/bin/python bench/train_bench.py [--archs batchtopk,topk] [--steps 3] [--venv /tmp/sae-lens-venv]
    .venv/bin/python bench/train_bench.py --device cuda --dtype bfloat16 --d 2304 --latents 16384
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

# Runs inside the SAELens virtualenv: prints tokens/s of its training step for one architecture.
SAELENS_STEP = r"""
import json, sys, time, torch
from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig, \
    BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
arch, d, F, B, k, steps, device = json.loads(sys.argv[1])
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
dead = torch.zeros(F, dtype=torch.bool, device=device)
def step(i):
    opt.zero_grad()
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=dead,
                                                   n_training_steps=i, is_logging_step=False))
    out.loss.backward()
    opt.step()
step(0)
if device.startswith("cuda"): torch.cuda.synchronize()
t0 = time.perf_counter()
for i in range(steps): step(i + 1)
if device.startswith("cuda"): torch.cuda.synchronize()
print(json.dumps({"tokens_per_s": steps * B / (time.perf_counter() - t0)}))
"""


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ours(arch: str, d: int, F: int, B: int, k: int, steps: int, device: str, dtype: str, sparse: bool,
         density: float | None = None, max_density: float | None = None) -> float:
    """Tokens/s of our step. relu and jumprelu: b_enc shifted so that `density` of the entries are active (a
    trained SAE's sparsity; at init about half are), and max_density (1.0: always sparse) overriding the
    measured decision."""
    from sae_cache.sae_common.sae import SAE, SAEConfig
    from sae_cache.train.trainer import Member

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=d, d_sae=F, arch=arch, k=k)).to(device)
    sae.sparse_training = sparse
    if max_density is not None:
        sae.sparse_max_density = max_density
    x = torch.randn(B, d, device=device) * 3 + 1
    sae.set_input_scale(x) if sae.cfg.input_norm == "scalar" else None
    if density is not None and sae.arch.active is not None:
        with torch.no_grad():
            sample = sae.pre_activations(sae.normalize(x)[0]).flatten()[::101]
            sae.b_enc -= sample.kthvalue(max(1, int((1 - density) * sample.numel()))).values
    member = Member(arch, sae, torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.99), fused=True),
                    autocast=torch.bfloat16 if dtype == "bfloat16" else None)
    sae.train()
    member.step(x)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        member.step(x)
    sync(device)
    return steps * B / (time.perf_counter() - t0)


def encoder_gemm_bound(d: int, F: int, B: int, steps: int, device: str, dtype: str) -> float:
    """Tokens/s of x @ W_enc alone: what a TopK-family step could reach if nothing else cost anything."""
    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    x, W = torch.randn(B, d, device=device, dtype=dt), torch.randn(d, F, device=device, dtype=dt)
    x @ W
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        x @ W
    sync(device)
    return steps * B / (time.perf_counter() - t0)


def saelens(venv: Path, arch: str, d: int, F: int, B: int, k: int, steps: int, device: str,
            env: dict[str, str] | None = None) -> float | None:
    python = saelens_python(venv)
    if python is None:
        return None
    done = subprocess.run([str(python), "-c", SAELENS_STEP, json.dumps([SAELENS_ARCHS[arch], d, F, B, k, steps,
                                                                        device])], capture_output=True, text=True,
                          env=None if env is None else os.environ | env)
    if done.returncode:
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="batchtopk,topk,relu,jumprelu,feature_choice,mutual_choice")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--latents", type=int, default=12288)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--no-saelens", action="store_true")
    ap.add_argument("--density", type=float, default=None,
                    help="relu/jumprelu: the fraction of active entries (b_enc shifted; at init about half are); "
                         "also times them forced onto the sparse and onto the dense path")
    ap.add_argument("--allocator", default="retain", choices=["retain", "default"],
                    help="retain: keep freed memory, as `sae` does (the default); default: glibc's own behaviour")
    args = ap.parse_args()
    retained = args.allocator == "retain" and retain_freed_memory()
    shape = dict(d=args.d, F=args.latents, B=args.batch, k=args.k, steps=args.steps, device=args.device)
    bound = encoder_gemm_bound(args.d, args.latents, args.batch, args.steps, args.device, args.dtype)
    flops = 2 * args.batch * args.d * args.latents
    print(json.dumps({"bench": "encoder_gemm", **shape, "dtype": args.dtype, "tokens_per_s": round(bound),
                      "tflops": round(flops * bound / args.batch / 1e12, 3)}), flush=True)
    for arch in args.archs.split(","):
        fast = ours(arch, args.d, args.latents, args.batch, args.k, args.steps, args.device, args.dtype, True,
                    args.density)
        row = {"bench": "train_step", "arch": arch, **shape, "dtype": args.dtype, "freed_memory_retained": retained,
               "ours_tokens_per_s": round(fast),
               "fraction_of_encoder_gemm_bound": round(fast / bound, 3)}
        from sae_cache.sae_common.architectures import ARCHS

        if ARCHS[arch].active is not None and args.density is not None:
            row["density"] = args.density  # the measured decision (above) against each path forced
            row["ours_sparse_path_tokens_per_s"] = round(
                ours(arch, args.d, args.latents, args.batch, args.k, args.steps, args.device, args.dtype, True,
                     args.density, max_density=1.0))
        if ARCHS[arch].select is not None or ARCHS[arch].active is not None:  # the dense reference path
            row["ours_dense_path_tokens_per_s"] = round(
                ours(arch, args.d, args.latents, args.batch, args.k, args.steps, args.device, args.dtype, False,
                     args.density))
        if arch in SAELENS_ARCHS and not args.no_saelens:
            theirs = saelens(args.venv, arch, args.d, args.latents, args.batch, args.k, args.steps, args.device)
            if theirs:
                row.update(sae_lens_tokens_per_s=round(theirs), ratio_vs_sae_lens=round(fast / theirs, 2))
            if theirs and retained:
                same = saelens(args.venv, arch, args.d, args.latents, args.batch, args.k, args.steps, args.device,
                               AS_ENVIRONMENT)
                if same:
                    row.update(sae_lens_same_allocator_tokens_per_s=round(same),
                               ratio_vs_sae_lens_same_allocator=round(fast / same, 2))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
