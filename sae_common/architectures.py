"""The SAE architectures: one small `Arch` entry per sparsifying activation, in the plain dict `ARCHS`.

Architectures differ only in (DESIGN.md, "SAEs"):
- the training activation: pre-activations -> sparse latents, possibly looking at the whole batch;
- for batch-level ones, inference uses a threshold estimated in training instead (held by the SAE);
- the reconstruction loss (the MSE of x̂, or matryoshka's mean over nested prefixes), an optional penalty
  (relu: L1, jumprelu: L0) and an optional auxiliary loss (AuxK, aux_zipf);
- the settings it uses that a training run may sweep (sae_config.SWEEPS: k, l1_coeff, l0_coeff, aux_k, ...),
  which also name its SAEs;
- the SAELens architecture it is exported as.
Everything else (decoder constraint, dead-latent bookkeeping, input normalisation, the loss's assembly on
the dense and sparse paths, the sweep, saving) is shared and lives in sae.py / sparse.py / train/sweep.py /
sae_io.py. To add an architecture: write its activation (and whatever else it has) as functions below and
add one `Arch(...)` line to ARCHS.

Math here is pure functions of tensors. Entry functions take the SAE (`sae`) only to read its config,
parameters and bookkeeping buffers. Shapes: B tokens, D d_in, F latents, K kept per row.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from sae_cache.sae_common.checks import bad
from sae_cache.sae_common.data_parallel import batch_topk_flat_global, feature_choice_flat_global
from sae_cache.sae_common.jumprelu_ste import jump_relu, step
from sae_cache.sae_common.sae_config import (AUX_COEFF, AUX_K, BANDWIDTH, GROUP_FRACTIONS, JUMPRELU_INIT_THRESHOLD,
                                             K, L0, L1, ZIPF_UNDERUSE_SCALE, Sweep)
from sae_cache.sae_common.sparse import Latents, batch_topk_flat, mask_flat, topk_flat

if TYPE_CHECKING:
    from sae_cache.sae_common.sae import SAE, SAEConfig


# ---------------------------------------------------------------- sparsifying selections (pure)

def topk_per_token(acts_BF: Tensor, k: int) -> Tensor:
    """Keep the k largest latents of each token (Gao et al. 2024)."""
    vals_BK, idx_BK = acts_BF.topk(k, dim=-1)
    return torch.zeros_like(acts_BF).scatter(-1, idx_BK, vals_BK)


def batch_topk(acts_BF: Tensor, n_keep: int) -> Tensor:
    """Keep the n_keep largest entries of the whole token x latent matrix (BatchTopK paper, n_keep = k*B)."""
    vals, idx = acts_BF.flatten().topk(n_keep)
    return torch.zeros_like(acts_BF).flatten().scatter(0, idx, vals).view_as(acts_BF)


def feature_choice(acts_BF: Tensor, n_keep: int) -> Tensor:
    """Feature Choice activation: acts where `feature_choice_mask` keeps them."""
    return acts_BF * feature_choice_mask(acts_BF, n_keep)


def topk_down_columns(acts_BF: Tensor, m: int, block: int = 128) -> tuple[Tensor, Tensor]:
    """acts_BF.topk(m, dim=0), a contiguous block of columns at a time: down the columns of the whole [B, F]
    matrix every step strides through memory; a [B, 128] block sits in cache (measured ~2x faster at B=4096,
    F=12288, and faster than transposing first). Same values and indices."""
    if acts_BF.shape[1] <= block:
        return acts_BF.topk(m, dim=0)
    parts = [acts_BF[:, lo:lo + block].contiguous().topk(m, dim=0) for lo in range(0, acts_BF.shape[1], block)]
    return torch.cat([v for v, _ in parts], 1), torch.cat([i for _, i in parts], 1)


def feature_choice_mask(acts_BF: Tensor, n_keep: int) -> Tensor:
    """Each latent keeps its best m_f tokens of the batch, with sum_f m_f = n_keep (Ayonrinde 2024, Feature Choice).

    Capacities are as equal as the budget allows: m_f = floor(n_keep/F) for every latent, and the
    remaining n_keep mod F slots go, one each, to the latents whose next-best token is strongest (so the
    result is deterministic and each latent gets floor or ceil of n_keep/F). Needs n_keep/F < B (k < F).
    """
    B, F = acts_BF.shape
    m, extra = divmod(n_keep, F)
    vals_MF, idx_MF = topk_down_columns(acts_BF, min(m + 1, B))
    keep_MF = torch.zeros_like(vals_MF, dtype=torch.bool)
    keep_MF[:m] = True
    if extra:
        keep_MF[m, vals_MF[m].topk(extra).indices] = True
    return torch.zeros_like(acts_BF, dtype=torch.bool).scatter(0, idx_MF, keep_MF)


# ---------------------------------------------------------------- auxiliary losses (pure)

def aux_keep(pre_BC: Tensor, weight_C: Tensor, aux_k: int) -> Tensor:
    """[B, C] bool: the entries of the auxiliary reconstruction, each token's aux_k largest w ⊙ ReLU(z) (all of
    them when there are no more candidates than that) that are positive (the rest add nothing)."""
    scores_BC = torch.relu(pre_BC.detach()) * weight_C
    keep_BC = scores_BC > 0
    if aux_k < pre_BC.shape[1]:
        keep_BC &= torch.zeros_like(keep_BC).scatter_(1, scores_BC.topk(aux_k, dim=-1, sorted=False).indices, True)
    return keep_BC


def aux_reconstruction_loss(pre_BF: Tensor, weight_F: Tensor, W_dec_FD: Tensor, residual_BD: Tensor,
                            aux_k: int, keep_BC: Tensor | None = None) -> Tensor:
    """mean_{b,d} (ê − e)², ê = TopK_aux(w ⊙ ReLU(z)) · W_dec: the weighted latents reconstruct the residual.

    With w = 1 on dead latents and 0 elsewhere this is AuxK (Gao et al. 2024, §A.2), with the mean over
    all B*D elements as the BatchTopK reference (no b_dec in ê). The residual e = x − x̂ is DETACHED, as in
    Gao et al. and openai/sparse_autoencoder: the auxiliary loss should move the candidate latents, not
    pull the main reconstruction towards them. (The BatchTopK reference does not detach it.)
    keep_BC: aux_keep of the candidates, when the caller has it (pre_BF, weight_F, W_dec_FD then hold only them).
    """
    cand_F = weight_F > 0
    n_cand = int(cand_F.sum())
    if n_cand == 0:
        return pre_BF.new_zeros(())
    if n_cand < len(weight_F):  # (callers that pass only the candidates skip this copy)
        pre_BF, weight_F, W_dec_FD = pre_BF[:, cand_F], weight_F[cand_F], W_dec_FD[cand_F]
    if keep_BC is None:
        keep_BC = aux_keep(pre_BF, weight_F, aux_k)
    e_hat_BD = (torch.relu(pre_BF) * weight_F * keep_BC) @ W_dec_FD
    return torch.nn.functional.mse_loss(e_hat_BD, residual_BD.detach())


def zipf_fit(density_F: Tensor, exponent: float | None = None) -> Tensor:
    """The Zipf law d(r) = C · r^(−α) fitted to the observed densities, evaluated at each latent's rank.

    Latents are ranked by density (r = 1 the most frequent); the fit is least squares in log-log over the
    live latents (density > 0): log d_r ≈ log C − α·log r, both C and α fitted unless `exponent` fixes α.
    Returns [F], the fitted density at each latent's rank (dead latents included).
    """
    F = density_F.numel()
    d = density_F.double()
    rank_F = torch.empty_like(d)
    rank_F[d.argsort(descending=True, stable=True)] = torch.arange(1, F + 1, dtype=d.dtype, device=d.device)
    live_F = d > 0
    log_r, log_d = rank_F[live_F].log(), d[live_F].log()
    if exponent is not None:
        alpha = torch.tensor(float(exponent), dtype=d.dtype, device=d.device)
    elif live_F.sum() >= 2:
        centred_r = log_r - log_r.mean()
        alpha = -(centred_r * (log_d - log_d.mean())).sum() / centred_r.pow(2).sum()
    else:  # one live latent: no slope to fit
        alpha = d.new_zeros(())
    log_c = (log_d + alpha * log_r).mean() if live_F.any() else d.new_zeros(())
    return (log_c - alpha * rank_F.log()).exp().to(density_F.dtype)


def zipf_underuse_weights(density_F: Tensor, dead_F: Tensor, exponent: float | None = None,
                          scale: float = 1.0) -> Tensor:
    """Per-latent weight of aux_zipf_loss: dead latents 1; live latents in the low end of the density
    distribution (below the live latents' median density) by how far they fall below the Zipf fit of the
    observed densities, scale · clamp(1 − d_f / fit(r_f), 0, 1); every other latent 0.

    Ayonrinde 2024: latent densities follow a Zipf law except at the low end, where latents are dying or
    under-used. Restricting the weight to the low end keeps the head out: there the observed curve is
    flatter than any power law, so the densest latents lie below the fit too, and they are not under-used.
    """
    fit_F = zipf_fit(density_F, exponent)
    live_F = (density_F > 0) & ~dead_F
    low_end_F = live_F & (density_F < density_F[live_F].quantile(0.5)) if live_F.any() else live_F
    weight_F = torch.where(low_end_F, scale * (1 - density_F / fit_F).clamp(0, 1), torch.zeros_like(density_F))
    return torch.where(dead_F, torch.ones_like(weight_F), weight_F)


# ---------------------------------------------------------------- the entries' functions (read the SAE)

def _relu(sae: SAE, pre_BF: Tensor, cols: Tensor | slice = slice(None)) -> Tensor:
    return torch.relu(pre_BF)


def _topk(sae: SAE, pre_BF: Tensor) -> Tensor:
    return topk_per_token(torch.relu(pre_BF), sae.cfg.k)


def _batchtopk(sae: SAE, pre_BF: Tensor) -> Tensor:
    return batch_topk(torch.relu(pre_BF), sae.cfg.k * pre_BF.shape[0])


def _feature_choice(sae: SAE, pre_BF: Tensor) -> Tensor:
    return feature_choice(torch.relu(pre_BF), sae.cfg.k * pre_BF.shape[0])


def _jumprelu(sae: SAE, pre_BF: Tensor, cols: Tensor | slice = slice(None)) -> Tensor:
    return jump_relu(pre_BF, sae.log_threshold.exp()[cols], sae.cfg.bandwidth)


# Penalties take (sae, pre, acts, cols, n_rows): on the dense path pre and acts are [B, F] and cols is
# slice(None); on the sparse path they are [1, N], the kept entries, with cols_N their latents. Either way
# the per-entry terms are the same and sum over the entries they cover, divided by the batch's rows.

def _l1_penalty(sae: SAE, pre: Tensor, acts: Tensor, cols: Tensor | slice, n_rows: int) -> Tensor:
    """l1_coeff · mean_b Σ_f f_bf ‖W_dec,f‖: weighting by decoder norm makes the penalty independent of how
    the scale is split between latent and decoder row (Anthropic, April 2024 update)."""
    return sae.cfg.l1_coeff * (acts * sae.W_dec.norm(dim=1)[cols]).sum(-1).sum() / n_rows


def _l0_penalty(sae: SAE, pre: Tensor, acts: Tensor, cols: Tensor | slice, n_rows: int) -> Tensor:
    """l0_coeff · mean_b Σ_f H(z_bf − θ_f), the step taken on PRE-activations (JumpReLU paper, eq. 9)."""
    return sae.cfg.l0_coeff * step(pre, sae.log_threshold.exp()[cols], sae.cfg.bandwidth).sum(-1).sum() / n_rows


def _relu_active(sae: SAE, pre_BF: Tensor) -> Tensor:
    """ReLU's sparse path: every positive entry (the only ones with a value or a gradient)."""
    return pre_BF > 0


def _jumprelu_active(sae: SAE, pre_BF: Tensor) -> Tensor:
    """JumpReLU's sparse path: the entries above θ (a value) and those within the kernel's reach below it
    (a θ gradient, from the activation and from the L0 step), where rectangle((z − θ)/ε) is nonzero: z > θ − ε/2.
    It keeps z > θ − ε, a margin far beyond rounding; the entries between add exactly zero to every value and
    gradient (both H and the kernel are 0 there), and one comparison is one pass over [B, F]."""
    return pre_BF > sae.log_threshold.exp() - sae.cfg.bandwidth


def _dead_weights(sae: SAE) -> Tensor:
    """AuxK (Gao et al. 2024): the dead latents, each with weight 1."""
    return sae.dead_mask().to(sae.W_dec.dtype)


# README block: aux_zipf_loss (feature_choice, mutual_choice) -------------------------------------------
# Ayonrinde (2024) observes that latent densities follow a Zipf law except at the low end, and proposes
# aux_zipf_loss, a generalisation of AuxK (Gao et al. 2024) to dead AND under-used latents. The paper
# describes it in words; this project implements it as:
#
#     d_f    running fraction of training tokens on which latent f fires (EMA, time constant stats_window)
#     r_f    rank of latent f by d_f (1 = most frequent)
#     ẑ_f  = C · r_f^(−α)    the Zipf law fitted to the live latents' (d_f, r_f) by least squares in log-log
#                            (C and α fitted; zipf_exponent fixes α instead)
#     w_f  = 1 if f is dead; s · clamp(1 − d_f / ẑ_f, 0, 1) if d_f is below the live latents' median (the
#            low end of the distribution); else 0       (s = zipf_underuse_scale, 1/4)
#     ê_b  = Σ_{f ∈ TopK_aux_k(w ⊙ ReLU(z_b))} w_f · ReLU(z_bf) · W_dec,f
#     L_aux = aux_coeff · mean_{b,d} (ê_bd − sg(x_bd − x̂_bd))²       (aux_k = 512, aux_coeff = 1/32)
#
# z are the encoder pre-activations, sg the stop-gradient, everything in the normalised input space.
# With w ∈ {0, 1} marking only the dead latents this is exactly AuxK. s < 1 was measured, not derived
# (scripts/aux_weights_dead_latents.py: 187-210 dead at s = 1, 39-42 at s = 1/4, 106-133 with AuxK); the
# likely reason: the candidates share one reconstruction of the residual, and at s = 1 the live under-used
# latents take it over, so the dead ones get little of its gradient.
# -----------------------------------------------------------------------------------------------------

def _zipf_weights(sae: SAE) -> Tensor:
    """aux_zipf_loss (see the README block above): dead latents weigh 1, latents of the low end below the
    Zipf fit of the densities up to zipf_underuse_scale, all others 0. Dead latents are left out of the fit."""
    dead_F = sae.dead_mask()
    density_F = sae.density.masked_fill(dead_F, 0)
    return zipf_underuse_weights(density_F, dead_F, sae.cfg.zipf_exponent,
                                 sae.cfg.zipf_underuse_scale).to(sae.W_dec.dtype)


def _jumprelu_params(cfg: SAEConfig) -> dict[str, Tensor]:
    # log-parameterised so θ stays positive (JumpReLU paper, appendix J)
    return {"log_threshold": torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold))}


def _jumprelu_threshold(sae: SAE) -> Tensor:
    return sae.log_threshold.exp()


# ---------------------------------------------------------------- reconstruction losses

def plain_reconstruction(sae: SAE, latents: Latents, xn_BD: Tensor) -> tuple[Tensor, Tensor]:
    """x̂ = f·W_dec + b_dec and its MSE, the mean over all B·D elements (the BatchTopK reference's convention)."""
    xhat_n_BD = latents.decode(sae.W_dec) + sae.b_dec
    return xhat_n_BD, torch.nn.functional.mse_loss(xhat_n_BD, xn_BD)  # one pass each way (sub, pow, mean: 6)


def group_ends(d_sae: int, fractions: tuple[float, ...]) -> list[int]:
    """Matryoshka: the end (exclusive) of each nested group of latents, cumulative fractions of d_sae rounded."""
    ends = [round(d_sae * c) for c in itertools.accumulate(fractions)]
    return ends[:-1] + [d_sae]


def prefix_reconstructions(sae: SAE, latents: Latents) -> Tensor:
    """[G, B, D]: for each g, the reconstruction from groups 1..g plus b_dec (Matryoshka paper, §3)."""
    ends = group_ends(sae.cfg.d_sae, sae.cfg.group_fractions)
    partial_GBD = torch.stack([latents.decode(sae.W_dec, lo, hi) for lo, hi in zip([0, *ends[:-1]], ends)])
    return partial_GBD.cumsum(0) + sae.b_dec


def _matryoshka_reconstruction(sae: SAE, latents: Latents, xn_BD: Tensor) -> tuple[Tensor, Tensor]:
    """The full reconstruction, and the mean over the G prefixes of their MSEs (= the mean over G·B·D elements):
    every prefix of groups must reconstruct x on its own, so early latents learn general features (Bussmann et
    al. 2025). Their reference also averages in a b_dec-only term, as if a group of 0 latents came first; the
    paper's loss does not, nor does ours (tests/test_golden_matryoshka.py)."""
    prefix_GBD = prefix_reconstructions(sae, latents)
    return prefix_GBD[-1], (prefix_GBD - xn_BD).pow(2).mean()


def _check_groups(cfg: SAEConfig) -> None:
    fractions = cfg.group_fractions
    shown = ",".join(f"{v:g}" for v in fractions)
    if not fractions or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise bad("group_fractions", shown, "must be positive fractions of the dictionary that sum to 1, e.g. "
                  "1/16,1/16,1/8,1/4,1/2")
    ends = group_ends(cfg.d_sae, fractions)
    if min(b - a for a, b in zip([0, *ends[:-1]], ends)) < 1:
        raise bad("group_fractions", shown, f"leaves a group of the {cfg.d_sae}-latent dictionary empty (group ends "
                  f"{ends}); use a larger dictionary or fewer, larger groups")


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Arch:
    """One architecture. Only `activation` and `saelens` are required."""

    activation: Callable[..., Tensor]
    """(sae, pre_BF) -> acts_BF, the training activation (and the one eval uses with batch_mode=True)."""
    saelens: str
    """The SAELens 6.x architecture it is exported as: standard, topk or jumprelu."""
    sweeps: tuple[Sweep, ...] = ()
    """The sweepable settings it uses (sae_config.SWEEPS): a run trains one of it per value of each, and names it
    by them. A setting it does not list does not multiply it."""
    batch_level: bool = False
    """Selection depends on the whole batch: inference uses a threshold estimated in training instead."""
    per_latent_threshold: bool = False
    """(batch-level only) one estimated threshold per latent instead of one global θ."""
    reconstruction: Callable[..., tuple[Tensor, Tensor]] = plain_reconstruction
    """(sae, latents, xn_BD) -> (x̂_n_BD, reconstruction loss), on either training path (latents: sparse.Latents)."""
    penalty: Callable[..., Tensor] | None = None
    """(sae, pre, acts, cols, n_rows) -> scalar sparsity penalty added to the loss, on either path (see _l1_penalty)."""
    aux_weights: Callable[..., Tensor] | None = None
    """sae -> [F] weights of the latents that reconstruct the residual in the auxiliary loss (AuxK: the dead
    ones; aux_zipf: dead and under-used): aux_coeff · aux_reconstruction_loss is added to the loss."""
    select: Callable[..., Tensor] | None = None
    """(sae, pre_BF) -> sorted flat indices (row·F + col) of the kept entries: enables the sparse training
    path (sparse.py); after ReLU it must keep exactly what `activation` keeps."""
    active: Callable[..., Tensor] | None = None
    """(not batch-level) (sae, pre_BF) -> [B, F] bool, every entry with a value or a gradient: the sparse path
    for activations that keep as many entries as the batch has, taken in a step only when they are few enough
    to pay (sparse.sparse_pays), else the dense one. `activation` also takes (sae, pre_1N, cols_N)."""
    select_global: Callable[..., Tensor] | None = None
    """(batch-level) (sae, pre_BF, n_global) -> `select` over a data-parallel run's global batch (data_parallel.py)."""
    extra_params: Callable[..., dict[str, Tensor]] | None = None
    """cfg -> {name: initial tensor}: extra parameters the SAE registers."""
    threshold: Callable[..., Tensor] | None = None
    """(not batch-level) sae -> learned inference threshold [F], exported to SAELens jumprelu."""
    check: Callable[..., None] | None = None
    """cfg -> None, raising ConfigError for settings this architecture cannot use."""

    def __post_init__(self):
        assert not (self.active and (self.select or self.batch_level)), "an `active` mask is the whole selection"
        assert (self.select_global is not None) == self.batch_level, "batch-level selections need a global one"
        assert (self.aux_weights is not None) == (AUX_K in self.sweeps) == (AUX_COEFF in self.sweeps), \
            "an auxiliary loss uses aux_k and aux_coeff: list AUX_K and AUX_COEFF in sweeps exactly when it has one"

    @property
    def uses_k(self) -> bool:
        """Whether cfg.k means something (and must satisfy 1 <= k < d_sae)."""
        return K in self.sweeps


def _topk_select(sae: SAE, acts_BF: Tensor) -> Tensor:
    return topk_flat(acts_BF, sae.cfg.k)


def _batchtopk_select(sae: SAE, acts_BF: Tensor) -> Tensor:
    return batch_topk_flat(acts_BF, sae.cfg.k * acts_BF.shape[0])


def _feature_choice_select(sae: SAE, acts_BF: Tensor) -> Tensor:
    return mask_flat(feature_choice_mask(acts_BF, sae.cfg.k * acts_BF.shape[0]))


def _batchtopk_select_global(sae: SAE, acts_BF: Tensor, n_global: int) -> Tensor:
    return batch_topk_flat_global(acts_BF, sae.cfg.k * n_global)


def _feature_choice_select_global(sae: SAE, acts_BF: Tensor, n_global: int) -> Tensor:
    return feature_choice_flat_global(acts_BF, sae.cfg.k * n_global)


# the BatchTopK selection (one process, and over all ranks' rows) and θ
_BATCHTOPK = dict(batch_level=True, select=_batchtopk_select, select_global=_batchtopk_select_global)
_AUXK = (K, AUX_K, AUX_COEFF)
_ZIPF = (*_AUXK, ZIPF_UNDERUSE_SCALE)
ARCHS: dict[str, Arch] = {
    "relu": Arch(_relu, "standard", sweeps=(L1,), penalty=_l1_penalty, active=_relu_active),
    "topk": Arch(_topk, "topk", sweeps=_AUXK, aux_weights=_dead_weights, select=_topk_select),
    "batchtopk": Arch(_batchtopk, "jumprelu", sweeps=_AUXK, aux_weights=_dead_weights, **_BATCHTOPK),
    "jumprelu": Arch(_jumprelu, "jumprelu", sweeps=(L0, BANDWIDTH, JUMPRELU_INIT_THRESHOLD), penalty=_l0_penalty,
                     extra_params=_jumprelu_params, threshold=_jumprelu_threshold, active=_jumprelu_active),
    "feature_choice": Arch(_feature_choice, "jumprelu", sweeps=_ZIPF, batch_level=True, per_latent_threshold=True,
                           aux_weights=_zipf_weights, select=_feature_choice_select,
                           select_global=_feature_choice_select_global),
    # the BatchTopK allocation (top k*B of the token x latent matrix) with aux_zipf_loss
    "mutual_choice": Arch(_batchtopk, "jumprelu", sweeps=_ZIPF, aux_weights=_zipf_weights, **_BATCHTOPK),
    # Bussmann et al. 2025: BatchTopK over the whole dictionary, every prefix of nested groups reconstructs x.
    # Inference θ as batchtopk: the BatchTopK paper's window mean (their Matryoshka reference uses an EMA).
    "matryoshka_batchtopk": Arch(_batchtopk, "jumprelu", sweeps=(*_AUXK, GROUP_FRACTIONS), aux_weights=_dead_weights,
                                 reconstruction=_matryoshka_reconstruction, check=_check_groups, **_BATCHTOPK),
}
