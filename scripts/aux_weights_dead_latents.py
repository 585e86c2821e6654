"""Dead latents of a mutual_choice (or feature_choice) SAE under four auxiliary-loss weightings: the same data,
init and steps.

    sae harvest --model tiny-stdlib-gpt2 --dataset stdlib-sample --layer 2 --tokens 320K --out /tmp/c.zarr
    .venv/bin/python scripts/aux_weights_dead_latents.py /tmp/c.zarr 175 zipf,zipf_s1,zipf_old,auxk [seed] [arch]

Weightings: zipf (aux_zipf as implemented: the low end below a least-squares Zipf fit, under-used latents
weighted zipf_underuse_scale·(1 − d/fit)), zipf_s1 (the same at scale 1), zipf_old (the previous target
k·r^(−1)/H_F, which also weighed the head of the distribution) and auxk (dead latents only).
Prints, every 25 batches of 1024 tokens, dead latents / auxiliary candidates / summed weight.
"""

import dataclasses
import sys

import torch

from sae_cache.sae_common import architectures as A
from sae_cache.sae_common.cache_format import open_cache
from sae_cache.sae_common.sae import SAE, SAEConfig


def zipf_old(sae: SAE) -> torch.Tensor:
    density_F, dead_F = sae.density, sae.dead_mask()
    rank_F = torch.empty_like(density_F)
    rank_F[density_F.argsort(descending=True, stable=True)] = torch.arange(1, len(density_F) + 1.0)
    target_F = sae.cfg.k * rank_F.reciprocal() / rank_F.reciprocal().sum()
    return torch.where(dead_F, 1.0, (1 - density_F / target_F).clamp(0, 1))


WEIGHTS = {"zipf": A._zipf_weights, "zipf_s1": A._zipf_weights, "zipf_old": zipf_old, "auxk": A._dead_weights}
SCALE = {"zipf_s1": 1.0}  # zipf_underuse_scale where a weighting sets it (else SAEConfig's default)


def main(cache_path: str, n_batches: int, names: list[str], seed: int, arch: str) -> None:
    torch.set_num_threads(1)  # the same float sums on any machine, and faster here than 2 contended threads
    cache = open_cache(cache_path)
    x_ND = cache.read_rows(cache.hooks[0], 0, n_batches * 1024).float()
    x_ND = x_ND[torch.randperm(len(x_ND), generator=torch.Generator().manual_seed(seed))]
    for name in names:
        A.ARCHS[arch] = dataclasses.replace(A.ARCHS[arch], aux_weights=WEIGHTS[name])
        torch.manual_seed(seed)
        extra = {"zipf_underuse_scale": SCALE[name]} if name in SCALE else {}
        sae = SAE(SAEConfig(d_in=cache.d_model, d_sae=8 * cache.d_model, arch=arch, k=16, **extra)).train()
        sae.set_input_scale(x_ND[:1024])
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.9, 0.99))
        line = []
        for i in range(n_batches):
            out = sae(x_ND[i * 1024:(i + 1) * 1024])
            opt.zero_grad()
            out.loss.backward()
            sae.constrain_decoder()
            opt.step()
            if (i + 1) % 25 == 0:
                w_F = sae.arch.aux_weights(sae)
                line.append(f"{i + 1}:{int(sae.dead_mask().sum())}/{int((w_F > 0).sum())}/{float(w_F.sum()):.0f}")
        print(f"{arch} seed {seed} {name:>8} batch:dead/candidates/sum(w)", " ".join(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), int(sys.argv[4]) if len(sys.argv) > 4 else 0,
         sys.argv[5] if len(sys.argv) > 5 else "mutual_choice")
