"""`SAEConfig`, what defines an SAE: the one place where every SAE setting has its default and its meaning,
and `SWEEPS`, the settings one training run may sweep (each architecture's registry entry says which it uses).

Kept free of torch so that the CLI (whose `sae train` flags take their defaults and help from these fields)
and TrainConfig can read it at import time; sae.py builds the SAE from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sae_cache.sae_common.checks import INPUT_NORMS
from sae_cache.sae_common.errors import ConfigError

# matryoshka_batchtopk's nested groups, as fractions of the dictionary (Matryoshka paper's main runs)
MATRYOSHKA_GROUP_FRACTIONS = (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


@dataclass(frozen=True)
class Sweep:
    """An SAE setting a training run may sweep: `sae train` takes several values for it, TrainConfig's field
    `values` lists them, and the sweep trains one SAE per value for each architecture whose entry (Arch.sweeps)
    uses it, tagging its run name `{tag}{value:g}` (e.g. k32, auxk256). An architecture that does not use it
    is trained once, and gets the first value, which it ignores."""

    field: str
    """The SAEConfig field."""
    tag: str
    values: str = ""
    """TrainConfig's field holding the values; default `field` itself (one value is then stored as it is, as
    before the setting was sweepable, so the run's identity hash is unchanged)."""
    always_named: bool = False
    """Tag every SAE that uses it (k, l1, l0: the run names these always had); otherwise only while the run
    sweeps more than one value, so a run that gives one value keeps its names."""

    def __post_init__(self):
        object.__setattr__(self, "values", self.values or self.field)


K = Sweep("k", "k", "ks", always_named=True)
L1 = Sweep("l1_coeff", "l1_", "l1_coeffs", always_named=True)
L0 = Sweep("l0_coeff", "l0_", "l0_coeffs", always_named=True)
AUX_K, AUX_COEFF = Sweep("aux_k", "auxk"), Sweep("aux_coeff", "auxc")
BANDWIDTH, JUMPRELU_INIT_THRESHOLD = Sweep("bandwidth", "bw"), Sweep("jumprelu_init_threshold", "theta")
ZIPF_UNDERUSE_SCALE = Sweep("zipf_underuse_scale", "zipfs")
GROUP_FRACTIONS = Sweep("group_fractions", "g")  # a value is one tuple of fractions, tagged g0.0625_0.0625_...
SWEEPS = (K, L1, L0, AUX_K, AUX_COEFF, BANDWIDTH, JUMPRELU_INIT_THRESHOLD, ZIPF_UNDERUSE_SCALE, GROUP_FRACTIONS)
"""Every sweepable setting. The others take one value per run (README, `sae train`, says why for each)."""


@dataclass(frozen=True)
class SAEConfig:
    """Everything that defines an SAE. Saved beside it (sae_record.json); enough to rebuild it."""

    d_in: int
    """Width of the activations the SAE reads (d_model at the hook)."""
    d_sae: int
    """Number of latents F (dictionary size)."""
    arch: str = "batchtopk"
    """Architecture, a key of architectures.ARCHS: relu, topk, batchtopk, jumprelu, feature_choice, mutual_choice,
    matryoshka_batchtopk."""
    k: int = 32
    """Active latents per token: exactly k (topk), k on average over the batch (batchtopk, feature_choice,
    mutual_choice, matryoshka_batchtopk). Unused by relu and jumprelu. BatchTopK paper: k in {16, 32, 64}."""
    l1_coeff: float = 0.01
    """relu: weight of the L1 penalty sum_f f_i·‖W_dec,i‖ (the reference's relu test case uses 0.01; sweep it)."""
    l0_coeff: float = 0.002
    """jumprelu: weight λ of the L0 penalty (the reference's jumprelu test case uses 0.002; sweep it)."""
    aux_k: int = 512
    """Latents per token in the auxiliary reconstruction (AuxK, aux_zipf): Gao et al. 2024 / BatchTopK paper."""
    aux_coeff: float = 1 / 32
    """Weight of the auxiliary loss (Gao et al. 2024 / BatchTopK paper: 1/32). Its scale: the auxiliary loss is
    the plain mean of (ê − e)² over the B·D elements, as in the BatchTopK reference; Gao et al. divide it (and
    the main MSE) by the variance of its target, which makes 1/32 weigh it more when residuals are small
    (aux_normalised)."""
    aux_normalised: bool = False
    """Gao et al.'s form of the auxiliary loss: divided by the variance of the residual it reconstructs,
    mean((ê − e)²) / mean((e − mean_b e)²). (The main MSE is left as it is.)"""
    dead_tokens: int = 5 * 4096
    """A latent is dead once it has not fired for this many training tokens (reference: 5 batches of 4096)."""
    bandwidth: float = 0.05
    """jumprelu: width ε of the rectangle kernel of the straight-through estimators. The JumpReLU paper uses
    0.001 over ~1e5+ steps at lr 7e-5; with inputs scaled to E‖x‖ = sqrt(d_in) (pre-activations of order 1) a
    window that narrow lets the log-threshold move only ~lr per step, so short runs never sparsify: 0.05 (as
    SAELens) lets thresholds reach their scale in hundreds of steps. The golden tests pass the reference's 0.001."""
    jumprelu_init_threshold: float = 0.1
    """jumprelu: initial threshold θ, on the scale of the normalised pre-activations (JumpReLU paper: 0.001)."""
    stats_window: int = 100
    """Training batches averaged for the batch-level inference threshold θ (a ring buffer of the last N
    batches' smallest kept activation) and, as an EMA with that time constant, for each latent's density.
    Recent batches only: θ drifts as the SAE trains, and an average reaching back into early training sets
    it too high (inference L0 then falls short of k). 100 batches are 400k tokens at the paper's batch size."""
    zipf_exponent: float | None = None
    """feature_choice, mutual_choice: exponent α of the Zipf law r^(−α) fitted to the latent densities in
    aux_zipf_loss; None fits it too (least squares in log-log), a number fixes it and fits only the scale."""
    zipf_underuse_scale: float = 0.25
    """feature_choice, mutual_choice: aux_zipf_loss weighs an under-used latent s·(1 − d/fit), a dead one 1.
    Chosen by measuring, not derived (README, aux_zipf_loss): 1 left far more latents dead."""
    group_fractions: tuple[float, ...] = MATRYOSHKA_GROUP_FRACTIONS
    """matryoshka_batchtopk: the nested groups of latents, as fractions of d_sae that sum to 1 (Matryoshka
    paper's main runs: 1/16, 1/16, 1/8, 1/4, 1/2)."""
    input_norm: str = "scalar"
    """none; standardize (per token (x-mean)/(std+1e-5), the BatchTopK reference's input_unit_norm); or
    scalar (one factor s with E‖s·x‖ = sqrt(d_in), set by set_input_scale; folded into the weights on export)."""
    apply_b_dec_to_input: bool = True
    """Encode x − b_dec rather than x (SAELens's name). The JumpReLU reference encodes x: False there."""

    def __post_init__(self):
        from sae_cache.sae_common.architectures import ARCHS  # here, not at import: it loads torch

        if self.arch not in ARCHS:
            raise ConfigError(f"unknown SAE architecture {self.arch!r}; valid ones: {', '.join(ARCHS)}")
        if self.input_norm not in INPUT_NORMS:
            raise ConfigError(f"input_norm {self.input_norm!r} is not valid; use one of {', '.join(INPUT_NORMS)}")
        for name in ("d_in", "d_sae", "aux_k", "dead_tokens", "stats_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if ARCHS[self.arch].uses_k and not 1 <= self.k < self.d_sae:
            raise ConfigError(f"k={self.k} is not valid for {self.arch} with d_sae={self.d_sae}: "
                              f"need 1 <= k < d_sae")
        if not 0 <= self.zipf_underuse_scale <= 1:
            raise ConfigError(f"zipf_underuse_scale must be between 0 and 1, got {self.zipf_underuse_scale!r}")
        for name in ("bandwidth", "jumprelu_init_threshold"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.zipf_exponent is not None and not self.zipf_exponent > 0:
            raise ConfigError(f"zipf_exponent must be > 0 (or None: fitted), got {self.zipf_exponent!r}")
        object.__setattr__(self, "group_fractions", tuple(self.group_fractions))  # a JSON record gives a list
        if ARCHS[self.arch].check:
            ARCHS[self.arch].check(self)
