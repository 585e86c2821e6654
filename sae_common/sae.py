"""The SAE module shared by training and evaluation: `SAEConfig` (what defines an SAE) and `SAE` (its
parameters, input normalisation, encode/decode/loss, decoder constraint and training bookkeeping).

The per-architecture pieces are entries of architectures.ARCHS; this file holds what they share.
Shapes: B tokens, D d_in, F latents (d_sae).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sae_cache.sae_common import data_parallel as dp
from sae_cache.sae_common import distributed as D
from sae_cache.sae_common.architectures import ARCHS, Arch, aux_keep, aux_reconstruction_loss, plain_reconstruction
from sae_cache.sae_common.errors import ConfigError
from sae_cache.sae_common.sae_config import SAEConfig  # noqa: F401  (re-exported: the SAE's config)
from sae_cache.sae_common.sparse import (Latents, Selection, densify, gather_columns, gather_pre, mask_flat,
                                         sparse_decode, SPARSE_MAX_DENSITY, sparse_pays)


@dataclass
class SAEOutput:
    """What forward returns. Losses are scalars computed in the normalised input space."""

    x_hat: Tensor  # [B, D] reconstruction in raw (input) space
    acts: Tensor | None  # [B, F] sparse latent activations (None on the sparse training path)
    loss: Tensor  # recon + penalty + aux: what the optimiser minimises
    recon: Tensor  # the reconstruction loss: mse, or for matryoshka the mean of its prefixes' MSEs
    mse: Tensor  # of the full reconstruction, mean over all B*D elements (the reference's convention; detached)
    penalty: Tensor  # sparsity penalty (relu: L1, jumprelu: L0), else 0
    aux: Tensor  # auxiliary loss (AuxK, aux_zipf), else 0
    l0: Tensor  # mean active latents per token (detached)


def standardize(x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per token (x − μ)/(σ + 1e-5), σ unbiased (the BatchTopK reference and SAELens's layer_norm)."""
    mu_B1 = x_BD.mean(-1, keepdim=True)
    sd_B1 = (x_BD - mu_B1).std(-1, keepdim=True)
    return (x_BD - mu_B1) / (sd_B1 + 1e-5), mu_B1, sd_B1


class SAE(nn.Module):
    """Sparse autoencoder x̂ = dec(σ(enc(x))) with community parameter names and shapes.

    Buffers: input_scale (the scalar normaliser s), tokens_since_fired [F], density [F] (running fraction
    of tokens each latent fires on), n_batches (training batches seen), and for batch-level architectures
    theta_window [N, 1 or F] (smallest kept activation of each of the last N training batches).
    """

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        # The TopK family trains on the sparse path (sparse.py), relu and jumprelu when sparse enough; False
        # forces the dense reference path.
        self.sparse_training = True
        # relu and jumprelu go sparse in a step when at most this fraction of entries is active (1.0: always)
        self.sparse_max_density = SPARSE_MAX_DENSITY
        # In training, x holds this rank's rows of a global batch split over the ranks: batch-level quantities
        # are computed over the global batch and losses are this rank's share of it (data_parallel.py).
        self.data_parallel = False
        D, F = cfg.d_in, cfg.d_sae
        # BatchTopK reference: kaiming-uniform W_enc, W_dec its transpose with unit-norm rows, zero biases
        W_enc = nn.init.kaiming_uniform_(torch.empty(D, F))
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.W_dec = nn.Parameter((W_enc.T / W_enc.T.norm(dim=1, keepdim=True)).contiguous())
        self.b_dec = nn.Parameter(torch.zeros(D))
        for name, init in (self.arch.extra_params(cfg) if self.arch.extra_params else {}).items():
            self.register_parameter(name, nn.Parameter(init))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("tokens_since_fired", torch.zeros(F, dtype=torch.long))
        self.register_buffer("density", torch.zeros(F))
        self.register_buffer("n_batches", torch.tensor(0, dtype=torch.long))
        if self.arch.batch_level:
            width = F if self.arch.per_latent_threshold else 1
            self.register_buffer("theta_window", torch.zeros(cfg.stats_window, width))

    @property
    def arch(self) -> Arch:
        return ARCHS[self.cfg.arch]

    # ------------------------------------------------------------ input normalisation

    def normalize(self, x_BD: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x -> (x_n, (shift, scale)) with x̂ = x̂_n · scale + shift bringing outputs back to raw space."""
        if self.cfg.input_norm == "standardize":
            xn_BD, mu_B1, sd_B1 = standardize(x_BD)
            return xn_BD, (mu_B1, sd_B1)
        return x_BD * self.input_scale, self._global_denorm()

    def _global_denorm(self) -> tuple[Tensor, Tensor]:
        return self.input_scale.new_zeros(()), 1 / self.input_scale  # scale is 1 for input_norm "none"

    @torch.no_grad()
    def set_input_scale(self, sample_BD: Tensor) -> float:
        """input_norm "scalar": s = sqrt(d_in) / E‖x‖ over a sample, so normalised inputs have E‖s·x‖ = sqrt(d_in)
        and hyper-parameters transfer across layers and models. Returns s."""
        if self.cfg.input_norm != "scalar":
            raise ConfigError(f"set_input_scale needs input_norm='scalar', this SAE has {self.cfg.input_norm!r}")
        mean_norm = (dp.global_mean_norm(sample_BD) if self.data_parallel
                     else sample_BD.float().norm(dim=-1).mean().item())
        if not mean_norm > 0:
            raise ConfigError(f"cannot set the input scale from a sample whose mean norm is {mean_norm}")
        self.input_scale.fill_(math.sqrt(self.cfg.d_in) / mean_norm)
        return self.input_scale.item()

    # ------------------------------------------------------------ encode / decode / loss

    def pre_activations(self, xn_BD: Tensor) -> Tensor:
        """z = (x_n − b_dec) W_enc + b_enc (b_dec subtracted only if cfg.apply_b_dec_to_input)."""
        if self.cfg.apply_b_dec_to_input:
            xn_BD = xn_BD - self.b_dec
        return torch.addmm(self.b_enc, xn_BD, self.W_enc)  # the bias added in the GEMM, not in a pass over [B, F]

    def activate(self, pre_BF: Tensor, batch_mode: bool | None = None) -> Tensor:
        """Batch-level selection when training (or batch_mode=True); otherwise batch-level architectures use
        the threshold estimated in training per token: a JumpReLU, so a token's latents do not depend on
        the rest of the batch (BatchTopK paper, §3)."""
        batch_mode = self.training if batch_mode is None else batch_mode
        if self.arch.batch_level and not batch_mode:
            return torch.where(pre_BF > self.inference_threshold(), pre_BF, 0.0)
        return self.arch.activation(self, pre_BF)

    def encode(self, x_BD: Tensor, batch_mode: bool | None = None) -> Tensor:
        """Raw activations [B, D] -> latents [B, F] (non-negative)."""
        xn_BD, _ = self.normalize(x_BD)
        return self.activate(self.pre_activations(xn_BD), batch_mode)

    def decode(self, acts_BF: Tensor, denorm: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Latents -> reconstruction in raw space. input_norm "standardize" needs the per-token (shift, scale)
        that normalize returned for these tokens; the other modes use the SAE's own."""
        if denorm is None:
            if self.cfg.input_norm == "standardize":
                raise ConfigError("decode of a standardize SAE needs the per-token (shift, scale) from "
                                  "normalize(x); or call forward(x)")
            denorm = self._global_denorm()
        shift, scale = denorm
        return (acts_BF @ self.W_dec + self.b_dec) * scale + shift

    def forward(self, x_BD: Tensor, batch_mode: bool | None = None) -> SAEOutput:
        """Encode, decode and the loss terms. In training mode also records the batch (update_stats) first,
        so the dead-latent mask of this batch's auxiliary loss includes it (as the reference does).
        Training the TopK family takes the sparse path (same values, O(k·B·d) after the encoder GEMM): the
        encoder GEMM runs without a graph, and only the k·B kept entries carry gradients (sparse.py). ReLU and
        JumpReLU take it in the steps where few enough of their entries are active (_sparse_entries)."""
        xn_BD, (shift, scale) = self.normalize(x_BD)
        batch_wide = self.arch.batch_level and batch_mode is not False
        n_global = dp.global_rows(x_BD.shape[0], x_BD.device) if self.training and self.data_parallel else None
        pre_BF = flat_N = None
        if self.training and self.sparse_training and batch_mode is not False and \
                (self.arch.select is not None or self.arch.active is not None):
            flat_N, pre_BF = self._sparse_entries(xn_BD, n_global)
        if flat_N is not None:
            b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
            sel = Selection(flat_N, pre_BF.shape)
            pre_N = gather_pre(pre_BF.detach(), xn_BD, self.W_enc, self.b_enc, b_dec, sel)
            vals_N = self.arch.activation(self, pre_N[None], sel.cols)[0] if self.arch.active else pre_N.relu()
            latents = Latents(vals_N=vals_N, sel=sel, pre_N=pre_N)
            self.record_batch(n_global or x_BD.shape[0], sel.rows, sel.cols, vals_N.detach())
        else:
            pre_BF = self.pre_activations(xn_BD) if pre_BF is None else pre_BF
            if n_global is not None and batch_wide:  # the dense path keeps what the global selection keeps
                with torch.no_grad():
                    sel = Selection(self._select(pre_BF, n_global), pre_BF.shape)
                    keep_BF = densify(sel.rows, sel.cols, torch.ones_like(sel.rows, dtype=torch.bool), pre_BF.shape)
                latents = Latents(acts_BF=pre_BF.relu() * keep_BF)
            else:
                latents = Latents(acts_BF=self.activate(pre_BF, batch_mode))
            if self.training:
                self.update_stats(latents.acts_BF.detach(), n_global)
        return self._losses(xn_BD, pre_BF, latents, shift, scale, n_global)

    def _sparse_entries(self, xn_BD: Tensor, n_global: int | None) -> tuple[Tensor | None, Tensor]:
        """(sorted flat indices of the entries the sparse path keeps, or None to take the dense one; pre_BF).
        The TopK family always keeps k·B and goes sparse, its encoder GEMM without a graph; an `active`
        architecture (relu, jumprelu) keeps what is active, measured here, and goes sparse only when that pays:
        its pre_BF keeps its graph, for the dense path to use if it does not."""
        if self.arch.active is None:
            with torch.no_grad():
                pre_BF = self.pre_activations(xn_BD)
                # selecting on pre rather than relu(pre) keeps the same positives (the rest are zeroed below)
                return self._select(pre_BF, n_global), pre_BF
        pre_BF = self.pre_activations(xn_BD)
        with torch.no_grad():
            flat_N = mask_flat(self.arch.active(self, pre_BF))  # their number decides; no separate count pass
            return (flat_N if sparse_pays(len(flat_N), pre_BF.numel(), self.sparse_max_density) else None), pre_BF

    def _select(self, pre_BF: Tensor, n_global: int | None) -> Tensor:
        """The architecture's selection: over this rank's rows, or for batch-level ones in a data-parallel step
        over the global batch of n_global rows."""
        if n_global is not None and self.arch.batch_level:
            return self.arch.select_global(self, pre_BF, n_global)
        return self.arch.select(self, pre_BF)

    def _losses(self, xn_BD: Tensor, pre_BF: Tensor, latents: Latents, shift: Tensor, scale: Tensor,
                n_global: int | None = None) -> SAEOutput:
        """The loss, assembled once for both paths: the architecture's reconstruction loss, its penalty, and the
        auxiliary loss on the residual of the full reconstruction. In a data-parallel step
        (n_global set) every term is this rank's share of the global batch's mean (its rows' sum over n_global
        rows), so summing over the ranks gives the global value, and the gradients sum to the global gradient."""
        xhat_n_BD, recon = self.arch.reconstruction(self, latents, xn_BD)
        zero = xn_BD.new_zeros(())
        penalty = zero
        if self.arch.penalty and latents.sel is None:
            penalty = self.arch.penalty(self, pre_BF, latents.acts_BF, slice(None), xn_BD.shape[0])
        elif self.arch.penalty:
            penalty = self.arch.penalty(self, latents.pre_N[None], latents.vals_N[None], latents.sel.cols,
                                        xn_BD.shape[0])
        aux = zero
        if self.arch.aux_weights is not None:
            aux = self._aux(pre_BF, xn_BD, xhat_n_BD, dense=latents.acts_BF is not None, n_global=n_global)
        with torch.no_grad():  # the plain reconstruction loss is this MSE already
            plain = self.arch.reconstruction is plain_reconstruction
            mse = recon.detach() if plain else nn.functional.mse_loss(xhat_n_BD, xn_BD)
        l0 = latents.l0()
        if n_global is not None:
            share = xn_BD.shape[0] / n_global
            recon, penalty, aux, mse, l0 = (t * share for t in (recon, penalty, aux, mse, l0))
        x_hat_BD = torch.addcmul(shift, xhat_n_BD, scale)  # x̂_n · scale + shift in one pass
        return SAEOutput(x_hat=x_hat_BD, acts=latents.acts_BF, loss=recon + penalty + aux,
                         recon=recon, mse=mse, penalty=penalty, aux=aux, l0=l0)

    def _aux(self, pre_BF: Tensor, xn_BD: Tensor, xhat_n_BD: Tensor, dense: bool,
             n_global: int | None = None) -> Tensor:
        """aux_coeff · the auxiliary loss (AuxK or aux_zipf), fitting the residual x_n − x̂_n. On the dense path
        pre_BF carries the graph. On the sparse one it has none; of the C candidate latents (dead or under-used) only
        the entries each token keeps (its aux_k best) with a positive value carry anything, and like relu's
        activations they decide the path: the sparse one while at most sparse_max_density of the [B, C] entries
        (~4·n·d at gather speed), else the candidates' columns densely (~4·B·C·d at GEMM speed, an order of
        magnitude faster per FLOP)."""
        weight_F = self.arch.aux_weights(self)
        cand_C = (weight_F > 0).nonzero().squeeze(1)
        if len(cand_C) == 0 or self.cfg.aux_coeff == 0:  # aux_coeff 0: no loss, no gradient, nothing to compute
            return xn_BD.new_zeros(())
        residual_BD = (xn_BD - xhat_n_BD).detach()
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        weight_C, W_dec_CD = weight_F[cand_C], self.W_dec[cand_C]
        if dense:
            aux = aux_reconstruction_loss(pre_BF[:, cand_C], weight_C, W_dec_CD, residual_BD, self.cfg.aux_k)
        else:
            with torch.no_grad():  # the candidates' columns, taken once for the choice of path and the dense one
                pre_BC = pre_BF.index_select(1, cand_C)
                keep_BC = aux_keep(pre_BC, weight_C, self.cfg.aux_k)
                rows_N, c_N = keep_BC.nonzero(as_tuple=True)  # row-major, and cand_C ascending: sorted flat indices
            if sparse_pays(len(rows_N), keep_BC.numel(), self.sparse_max_density):
                sel = Selection(rows_N * pre_BF.shape[1] + cand_C[c_N], pre_BF.shape)
                v_N = gather_pre(pre_BF, xn_BD, self.W_enc, self.b_enc, b_dec, sel).relu() * weight_F[sel.cols]
                aux = torch.nn.functional.mse_loss(sparse_decode(v_N, self.W_dec, sel), residual_BD)
            else:  # the columns of the pre_BF this step has, with their encoder gradient (no GEMM to redo them)
                pre_BC = gather_columns(pre_BC, xn_BD, self.W_enc, self.b_enc, b_dec, cand_C)
                aux = aux_reconstruction_loss(pre_BC, weight_C, W_dec_CD, residual_BD, self.cfg.aux_k, keep_BC)
        if self.cfg.aux_normalised:  # Gao et al. 2024: relative to the variance of the residual (of the global batch)
            var = (residual_BD - residual_BD.mean(0)).pow(2).mean() if n_global is None else \
                dp.global_centred_sq(residual_BD, n_global) / (n_global * residual_BD.shape[1])
            aux = aux / var.clamp_min(1e-12)
        return self.cfg.aux_coeff * aux

    # ------------------------------------------------------------ decoder constraint

    @torch.no_grad()
    def constrain_decoder(self) -> None:
        """Call after backward, before the optimiser step (the BatchTopK reference's order): normalise each
        decoder row, remove from its gradient the component along the normalised row, write the unit rows.
        The optimiser then moves the rows slightly off unit norm; the next call brings them back."""
        # in place, a block of rows at a time so that each block's passes hit the cache (measured 2.5x faster
        # than whole-matrix passes at gemma-2-2b's [16384, 2304]; same values)
        for lo in range(0, self.cfg.d_sae, 1024):
            W_FD = self.W_dec[lo:lo + 1024]
            W_FD.div_(torch.linalg.vector_norm(W_FD, dim=1, keepdim=True))
            if self.W_dec.grad is not None:
                g_FD = self.W_dec.grad[lo:lo + 1024]
                g_FD.addcmul_(W_FD, torch.linalg.vecdot(g_FD, W_FD)[:, None], value=-1)

    # ------------------------------------------------------------ training bookkeeping

    @torch.no_grad()
    def update_stats(self, acts_BF: Tensor, n_global: int | None = None) -> None:
        """Record one training batch from its dense latents (see record_batch)."""
        rows_N, cols_N = acts_BF.nonzero(as_tuple=True)
        self.record_batch(n_global or acts_BF.shape[0], rows_N, cols_N, acts_BF[rows_N, cols_N])

    @torch.no_grad()
    def record_batch(self, n_tokens: int, rows_N: Tensor, cols_N: Tensor, vals_N: Tensor) -> None:
        """Record one training batch given its kept entries: dead-latent counters (in tokens), densities,
        and for batch-level architectures the smallest activation kept (the θ window). In a data-parallel
        step the entries are this rank's, n_tokens the global batch's, and counts and minima are global."""
        F = self.cfg.d_sae
        global_ = self.training and self.data_parallel
        fired = vals_N > 0
        cols_N, vals_N = cols_N[fired], vals_N[fired]
        counts_F = torch.bincount(cols_N, minlength=F)
        if global_:
            D.all_reduce_(counts_F)
        self.tokens_since_fired.add_(n_tokens).masked_fill_(counts_F > 0, 0)
        n_seen = int(self.n_batches)
        # running mean over the first N batches, then an EMA with time constant N
        self.density.lerp_(counts_F.to(self.density.dtype) / n_tokens, 1 / min(n_seen + 1, self.cfg.stats_window))
        if self.arch.batch_level:
            if self.arch.per_latent_threshold:
                smallest_T = torch.full((F,), math.inf, dtype=vals_N.dtype, device=vals_N.device)
                smallest_T.scatter_reduce_(0, cols_N, vals_N, reduce="amin")
            else:
                smallest_T = vals_N.min().reshape(1) if len(vals_N) else vals_N.new_full((1,), math.inf)
            if global_:
                D.all_reduce_(smallest_T, "min")
            # a latent that kept nothing this batch says nothing about its threshold: NaN, skipped in the mean
            self.theta_window[n_seen % self.cfg.stats_window] = smallest_T.float().nan_to_num(posinf=math.nan)
        self.n_batches += 1

    def dead_mask(self) -> Tensor:
        """[F] bool: latents that have not fired for cfg.dead_tokens training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def inference_threshold(self) -> Tensor | None:
        """[F] threshold θ of eval-mode encoding (and of the SAELens jumprelu export); None if the
        architecture has none. Batch-level: the BatchTopK paper's estimate, the mean over the last
        cfg.stats_window training batches of the smallest activation the selection kept (per latent for
        feature_choice; +inf for a latent that kept nothing in the window; 0 before any training batch)."""
        F = self.cfg.d_sae
        if not self.arch.batch_level:
            return self.arch.threshold(self) if self.arch.threshold else None
        n_filled = min(int(self.n_batches), self.cfg.stats_window)
        if n_filled == 0:
            return self.theta_window.new_zeros(F)
        theta_T = self.theta_window[:n_filled].nanmean(0).nan_to_num(nan=math.inf)
        return theta_T.expand(F)
