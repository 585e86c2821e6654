"""The evaluation metrics of DESIGN.md ("Metrics"): per-token math as pure functions, float64 accumulators
filled batch by batch, and `sae_metrics`, which turns the totals into the numbers eval.json reports.

Shapes: B contexts, T positions, D d_in, F latents (d_sae), V vocabulary, N evaluated tokens (a flattened
selection of B x T). Every average is over the evaluated tokens only (BOS positions are left out unless
--include-bos); the caller selects them before calling `add`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

DENSE_FREQUENCY = 0.1  # DESIGN.md: a latent active on more than 10% of the evaluated tokens is dense


# ---------------------------------------------------------------- per-token math (pure)

def log_probs(logits_BTV: Tensor) -> Tensor:
    """Log-softmax in float32 whatever the model's dtype (bf16 logits lose the small probabilities)."""
    return logits_BTV.float().log_softmax(-1)


def next_token_ce(logp_BTV: Tensor, tokens_BT: Tensor) -> Tensor:
    """[B, T-1] cross-entropy (nats) of the prediction at position t for the token at t+1."""
    return -logp_BTV[:, :-1].gather(-1, tokens_BT[:, 1:, None]).squeeze(-1)


def kl_per_token(logp_clean_BTV: Tensor, logp_other_BTV: Tensor) -> Tensor:
    """[B, T] KL(clean ‖ other) = Σ_v p_clean (log p_clean − log p_other), in nats."""
    return (logp_clean_BTV.exp() * (logp_clean_BTV - logp_other_BTV)).sum(-1)


# ---------------------------------------------------------------- float64 accumulators

@dataclass
class Mean:
    """A running mean in float64: the sum of the values and their count."""

    total: float = 0.0
    count: int = 0

    def add(self, values: Tensor) -> None:
        self.total += values.double().sum().item()
        self.count += values.numel()

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else math.nan


@dataclass
class ActivationStats:
    """One hook's activations over the evaluated tokens, for the denominator of FVU, E‖x − E[x]‖².

    Sums are taken around a reference point c (the held-out mean read from the cache), so that
    Σ‖x − x̄‖² = Σ‖x − c‖² − ‖Σ(x − c)‖² / N does not cancel catastrophically when ‖x̄‖ is large.
    """

    center_D: Tensor  # float64
    n: int = 0
    sum_D: Tensor | None = None  # Σ (x − c), float64
    sum_sq: float = 0.0  # Σ ‖x − c‖²

    def add(self, x_ND: Tensor) -> None:
        centred_ND = x_ND.double() - self.center_D.to(x_ND.device)
        batch_sum_D = centred_ND.sum(0).cpu()
        self.sum_D = batch_sum_D if self.sum_D is None else self.sum_D + batch_sum_D
        self.sum_sq += centred_ND.pow(2).sum().item()
        self.n += x_ND.shape[0]

    def total_variance(self) -> float:
        """Σ_n ‖x_n − x̄‖² over the evaluated tokens."""
        return self.sum_sq - self.sum_D.pow(2).sum().item() / self.n


@dataclass
class SAEStats:
    """What one SAE accumulates over the evaluated tokens (all float64 or integer counts)."""

    d_sae: int
    sq_err: float = 0.0  # Σ ‖x − x̂‖²
    cosine: Mean = field(default_factory=Mean)  # cos(x, x̂) per token
    fired_F: Tensor | None = None  # [F] tokens on which each latent was active (int64)
    l0_counts: Tensor | None = None  # [F + 1] tokens with exactly l active latents (int64)
    ce_spliced: Mean = field(default_factory=Mean)
    kl: Mean = field(default_factory=Mean)

    def __post_init__(self):
        self.fired_F = torch.zeros(self.d_sae, dtype=torch.long)
        self.l0_counts = torch.zeros(self.d_sae + 1, dtype=torch.long)

    @property
    def n(self) -> int:
        return int(self.l0_counts.sum())

    def add_reconstruction(self, x_ND: Tensor, x_hat_ND: Tensor, acts_NF: Tensor) -> None:
        x_ND, x_hat_ND = x_ND.double(), x_hat_ND.double()
        self.sq_err += (x_ND - x_hat_ND).pow(2).sum().item()
        self.cosine.add(torch.nn.functional.cosine_similarity(x_ND, x_hat_ND, dim=-1))
        active_NF = acts_NF > 0
        self.fired_F += active_NF.sum(0).cpu()
        self.l0_counts += torch.bincount(active_NF.sum(-1).cpu(), minlength=self.d_sae + 1)


# ---------------------------------------------------------------- the reported numbers

def sae_metrics(stats: SAEStats, acts: ActivationStats, ce_clean: Mean, ce_zero: Mean, ce_mean: Mean) -> dict:
    """Scalars as DESIGN.md defines them, plus the per-token L0 histogram and each latent's frequency."""
    n, d_in = stats.n, acts.center_D.numel()
    assert n == acts.n, "the SAE and its hook must have seen the same tokens"
    variance = acts.total_variance()
    fvu = stats.sq_err / variance if variance > 0 else math.nan
    frequency_F = stats.fired_F.double() / n
    l0_counts = stats.l0_counts[: int(stats.l0_counts.nonzero().max()) + 1]
    clean, spliced, zero = ce_clean.value, stats.ce_spliced.value, ce_zero.value
    scalars = {
        "fvu": fvu,
        "nmse": fvu,  # the same quantity under the BatchTopK paper's name
        "explained_variance": 1 - fvu,
        "mse": stats.sq_err / (n * d_in),  # per element: E‖x − x̂‖² / d_in
        "cosine_similarity": stats.cosine.value,
        "l0": (torch.arange(len(l0_counts), dtype=torch.float64) * l0_counts).sum().item() / n,
        "dead_latents": int((stats.fired_F == 0).sum()),
        "dense_latents": int((frequency_F > DENSE_FREQUENCY).sum()),
        "ce_clean": clean,
        "ce_spliced": spliced,
        "ce_zero_ablated": zero,
        "ce_mean_ablated": ce_mean.value,
        "ce_degradation": spliced - clean,
        "ce_loss_score": (zero - spliced) / (zero - clean) if zero != clean else math.nan,
        "kl_div": stats.kl.value,
        "tokens": n,
        "ce_tokens": stats.ce_spliced.count,
    }
    return {"metrics": scalars, "l0_histogram": l0_counts.tolist(), "latent_frequency": frequency_F.tolist()}
