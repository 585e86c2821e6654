"""Data-parallel training of one SAE (`sae train --parallel data`): the maths that makes N ranks, each holding a
contiguous slice of the rows of the GLOBAL batch, take the step one process takes on the whole batch.

What is global (computed over all ranks' rows, equal on every rank) and what is local:
- global: the batch-level selections (BatchTopK / Matryoshka / Mutual Choice: the top k·B of the B×F matrix;
  Feature Choice: each latent's best tokens), the θ statistic (smallest kept activation: all_reduce min), the
  dead-latent counters and densities (fired counts: all_reduce sum), the input scale (sum of norms and count),
  AuxK's normalisation (the residual's variance), the gradients (all_reduce sum), the history's metrics;
- local: the encoder GEMM, per-token selections (TopK, AuxK's top aux_k of each token), the decoder, backward.
Each rank's loss is its share of the global mean (its sum over the global B·D elements), so the sum of the
ranks' gradients is the one-process gradient. After that all-reduce the decoder constraint and Adam are
deterministic functions of identical inputs, so every rank holds the same weights without broadcasting them.

Exact global top-n: each rank's candidates are its own n largest values (the global n largest are a subset of
the union); the candidates are all-gathered, the threshold is the global n-th largest, and each rank keeps its
values above it. Ties AT the threshold are broken by global position, lowest first (rank order, then row-major
within a rank), so exactly n are kept; this is torch.topk's set except at exact ties, where torch.topk's choice
is unspecified (measure zero for continuous pre-activations).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from sae_cache.sae_common import distributed as D
from sae_cache.sae_common.sparse import batch_topk_flat


def global_rows(n_local: int, device: torch.device) -> int:
    """The global batch size: the sum of every rank's rows."""
    return int(D.all_reduce_(torch.tensor([n_local], dtype=torch.long, device=device)))


def keep_top(vals_RC: Tensor, cands_NMC: Tensor, capacity_C: Tensor, rank: int) -> Tensor:
    """[R, C] bool: the entries of rank `rank`'s vals_RC among the capacity_C[c] largest of column c over all ranks.

    cands_NMC holds every rank's M largest values of each column (-inf padded), so the c-th column's threshold
    is the capacity-th largest candidate. Entries above it are kept; of the entries equal to it, the first ones
    in global order (lower ranks, then lower rows) fill the remaining places."""
    N, M, C = cands_NMC.shape
    merged_KC = cands_NMC.flatten(0, 1).topk(int(capacity_C.max().clamp_min(1)), dim=0).values
    cap_C = capacity_C.to(torch.long)
    thresh_C = merged_KC.gather(0, (cap_C - 1).clamp_min(0)[None]).squeeze(0)
    thresh_C = torch.where(cap_C > 0, thresh_C, torch.full_like(thresh_C, torch.inf))
    need_C = cap_C - (cands_NMC > thresh_C).sum((0, 1))
    ties_NC = (cands_NMC == thresh_C).sum(1)
    allowed_C = torch.minimum((need_C - ties_NC[:rank].sum(0)).clamp_min(0), ties_NC[rank])
    tie_RC = vals_RC == thresh_C
    return (vals_RC > thresh_C) | (tie_RC & (tie_RC.cumsum(0) <= allowed_C))


def _pad_rows(top_MC: Tensor, m: int) -> Tensor:
    if top_MC.shape[0] == m:
        return top_MC
    return torch.cat([top_MC, top_MC.new_full((m - top_MC.shape[0], top_MC.shape[1]), -torch.inf)])


def batch_topk_flat_global(pre_BF: Tensor, n_keep: int) -> Tensor:
    """Sorted flat indices (into this rank's [B, F]) of its entries among the n_keep largest of the global
    batch's token × latent matrix (BatchTopK with n_keep = k·B_global)."""
    flat = pre_BF.flatten()
    local_idx = batch_topk_flat(pre_BF, min(n_keep, flat.numel()))  # the local candidates (a fast top-n)
    cands_NM1 = D.all_gather(_pad_rows(flat[local_idx][:, None], n_keep))
    keep = keep_top(flat[:, None], cands_NM1, torch.tensor([n_keep], device=flat.device), D.world().rank).squeeze(1)
    return keep.nonzero().squeeze(1)


def feature_choice_flat_global(pre_BF: Tensor, n_keep: int) -> Tensor:
    """Sorted flat indices of this rank's entries that Feature Choice keeps over the global batch: every latent
    its best m = n_keep // F tokens, and the n_keep mod F latents whose (m+1)-th best token is strongest one
    more (architectures.feature_choice_mask, with the capacities decided on the global candidates)."""
    B, F = pre_BF.shape
    m, extra = divmod(n_keep, F)
    cands_NMF = D.all_gather(_pad_rows(pre_BF.topk(min(m + 1, B), dim=0).values, m + 1))
    capacity_F = torch.full((F,), m, dtype=torch.long, device=pre_BF.device)
    if extra:
        next_F = cands_NMF.flatten(0, 1).topk(m + 1, dim=0).values[m]
        capacity_F[next_F.topk(extra).indices] += 1
    return keep_top(pre_BF, cands_NMF, capacity_F, D.world().rank).flatten().nonzero().squeeze(1)


@torch.no_grad()
def all_reduce_grads(params: Iterable[Tensor]) -> None:
    """Sum every parameter's gradient over the ranks, in one collective (a missing gradient counts as zero)."""
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = D.all_reduce_(torch.cat([p.grad.flatten() for p in params]))
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


@torch.no_grad()
def global_mean_norm(x_BD: Tensor) -> float:
    """Mean Euclidean norm of the global batch's rows (for SAE.set_input_scale)."""
    sums = D.all_reduce_(torch.stack([x_BD.double().norm(dim=-1).sum(), x_BD.new_tensor(x_BD.shape[0]).double()]))
    return (sums[0] / sums[1]).item()


@torch.no_grad()
def global_centred_sq(r_BD: Tensor, n_global: int) -> Tensor:
    """Σ_b ‖r_b − mean_b r‖² over the global batch (float64 moments, so the subtraction keeps its precision)."""
    sums = D.all_reduce_(torch.cat([r_BD.double().sum(0), r_BD.double().pow(2).sum().reshape(1)]))
    return (sums[-1] - sums[:-1].pow(2).sum() / n_global).to(r_BD.dtype)


@torch.no_grad()
def global_metrics(loss: Tensor, mse: Tensor, l0: Tensor, aux: Tensor, x_hat_BD: Tensor,
                   x_BD: Tensor) -> dict[str, Tensor]:
    """A data-parallel step's history metrics over the global batch, in one collective: the loss terms are the
    ranks' shares (summed), the FVU is Σ‖x̂ − x‖² / Σ‖x − mean x‖² from float64 moments of every rank's rows."""
    x = x_BD.double()
    sums = D.all_reduce_(torch.cat([torch.stack([loss, mse, l0, aux]).detach().double(),
                                    torch.stack([(x_hat_BD.double() - x).pow(2).sum(), x.pow(2).sum(),
                                                 x.new_tensor(x_BD.shape[0])]), x.sum(0)]))
    fvu = sums[4] / (sums[5] - sums[7:].pow(2).sum() / sums[6])
    return dict(zip(("loss", "mse", "fvu", "l0", "aux"), (*sums[:2].float(), fvu.float(), *sums[2:4].float())))
