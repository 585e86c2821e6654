"""Run under torchrun by tests/test_data_parallel.py: trains tiny SAEs data-parallel (this rank's rows of each
global batch) and, in the same process, the one-process reference on the whole global batches; saves both
(state, metrics record) to OUT/rank{R}.pt for the test to compare."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sae_cache.sae_common import distributed as D
from sae_cache.sae_common.sae import SAE, SAEConfig
from sae_cache.train.trainer import Member

D_IN, F, B, K, STEPS = 16, 64, 47, 4, 6  # B odd: the ranks hold 23 and 24 rows
# (name, arch, sparse path, extra config): both paths for BatchTopK, Feature Choice and ReLU; dead_tokens = one batch
# so that latents die within the run and the auxiliary losses (AuxK, aux_zipf) take part
CASES = [("batchtopk_sparse", "batchtopk", True, {}), ("batchtopk_dense", "batchtopk", False, {}),
         ("feature_choice_sparse", "feature_choice", True, {}), ("feature_choice_dense", "feature_choice", False, {}),
         ("matryoshka", "matryoshka_batchtopk", True, {"group_fractions": (0.25, 0.75)}),
         ("mutual_choice", "mutual_choice", True, {"aux_normalised": True}),
         ("topk_standardize", "topk", True, {"input_norm": "standardize"}),
         ("relu", "relu", False, {"l1_coeff": 1e-3}), ("relu_sparse", "relu", True, {"l1_coeff": 1e-3}),
         ("jumprelu_sparse", "jumprelu", True, {"l0_coeff": 1e-3, "jumprelu_init_threshold": 0.5, "bandwidth": 0.4})]


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    mix = torch.randn(D_IN, D_IN, generator=g)
    return [torch.randn(B, D_IN, generator=g) @ mix + 2 for _ in range(STEPS)]


def train(arch: str, sparse: bool, extra: dict, data: list[torch.Tensor], data_parallel: bool) -> dict:
    torch.manual_seed(0)  # the same initial weights on every rank and in the reference
    cfg = dict(d_in=D_IN, d_sae=F, arch=arch, k=K, dead_tokens=B, aux_k=4, stats_window=4, input_norm="scalar")
    sae = SAE(SAEConfig(**{**cfg, **extra}))
    sae.sparse_training, sae.data_parallel = sparse, data_parallel
    sae.sparse_max_density = 1.0  # relu and jumprelu on the path asked for, whatever their density
    if sae.cfg.input_norm == "scalar":
        sae.set_input_scale(data[0])
    sae.train()
    member = Member(arch, sae, torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=True))
    # the smallest non-zero |gradient| each parameter entry had over the run (the test's tolerance depends on it:
    # Adam); an exact zero is structural (no kept entry touches it), the same in every run
    min_grad = {n: torch.full_like(p, torch.inf) for n, p in sae.named_parameters()}
    for x_BD in data:
        member.step(x_BD)
        for n, p in sae.named_parameters():
            min_grad[n] = torch.where(p.grad != 0, torch.minimum(min_grad[n], p.grad.abs()), min_grad[n])
    return {"state": {k: v.clone() for k, v in sae.state_dict().items()}, "record": member.flush(len(data) * B),
            "min_grad": min_grad}


def main(out: Path) -> None:
    w = D.world()
    data = batches()
    lo, hi = w.rank * B // w.size, (w.rank + 1) * B // w.size  # this rank's rows of each global batch
    result = {"dp": {}, "ref": {}}
    for name, arch, sparse, extra in CASES:
        result["dp"][name] = train(arch, sparse, extra, [x[lo:hi] for x in data], data_parallel=True)
        if w.is_main:
            result["ref"][name] = train(arch, sparse, extra, data, data_parallel=False)
    torch.save(result, out / f"rank{w.rank}.pt")
    D.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
