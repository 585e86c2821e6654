"""The registry and the auxiliary-loss weights of sae_common/architectures.py: that a new architecture is one
ARCHS entry, and aux_zipf_loss's under-use weights against independent computations."""

from __future__ import annotations

import math

import numpy as np
import torch

from sae_cache.sae_common.architectures import ARCHS, K, L1, Arch, topk_per_token, zipf_underuse_weights
from sae_cache.sae_common.config import TrainConfig
from sae_cache.sae_common.sae import SAE
from sae_cache.sae_common.sae_io import load_sae, save_sae
from sae_cache.sae_common.sparse import topk_flat
from sae_cache.train.sweep import expand
from sae_cache.train.trainer import Member
from tests.test_sae import D, F, batch


def _shuffled(density_R: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Densities given in rank order, put in a random latent order; returns (density_F, rank_F)."""
    perm_F = torch.randperm(len(density_R), generator=torch.Generator().manual_seed(seed))
    return density_R[perm_F], perm_F + 1


def test_zipf_weights_are_zero_when_densities_follow_any_zipf_law():
    """Nothing is under-used when the densities ARE a Zipf law, whatever its scale and exponent. (The old
    target k·r^(−1)/H_F weighed the head here: its t_1 = 4.3 at F = 1024, k = 32 exceeds any density.)"""
    n_live = 1000
    for C, alpha in [(0.3, 0.8), (0.05, 1.0), (0.9, 1.7)]:
        rank_R = torch.arange(1, n_live + 1, dtype=torch.float64)
        density_F, _ = _shuffled(torch.cat([C * rank_R ** -alpha, torch.zeros(24, dtype=torch.float64)]))
        dead_F = density_F == 0
        weight_F = zipf_underuse_weights(density_F, dead_F)
        assert torch.equal(weight_F[dead_F], torch.ones(24, dtype=torch.float64))
        assert weight_F[~dead_F].abs().max() < 1e-9, (C, alpha)


def test_zipf_weights_weigh_the_low_end_below_the_fit_and_never_the_head():
    """A flat head (the ten densest equal) and a tail that drops below the law (the last 100 at a quarter of
    it): only the tail is weighted, by its deficit below the least-squares fit of log d on log r, which
    numpy.polyfit computes here independently."""
    rank_R = np.arange(1, 1001, dtype=np.float64)
    law_R = 0.2 * rank_R ** -0.9
    density_R = law_R.copy()
    density_R[:10] = law_R[9]  # flat head: below any power law fitted through the bulk
    density_R[900:] *= 0.25  # the dying tail
    density_F, rank_F = _shuffled(torch.from_numpy(density_R))
    weight_F = zipf_underuse_weights(density_F, torch.zeros(1000, dtype=torch.bool))
    slope, intercept = np.polyfit(np.log(rank_R), np.log(density_R), 1)
    fit_R = np.exp(intercept + slope * np.log(rank_R))
    expected_R = np.where(density_R < np.median(density_R), np.clip(1 - density_R / fit_R, 0, 1), 0.0)
    weight_R = weight_F[rank_F.argsort()].numpy()  # back to rank order
    np.testing.assert_allclose(weight_R, expected_R, atol=1e-9)
    assert (weight_R[:500] == 0).all()  # the head and the upper half: never under-used
    assert (weight_R[900:] > 0.5).all() and (weight_R[:900] < 0.2).all()  # the tail stands out


def test_zipf_weights_with_a_fixed_exponent_fit_only_the_scale():
    rank_R = torch.arange(1, 201, dtype=torch.float64)
    density_F = 0.4 * rank_R ** -1.0
    density_F[150:] *= 0.5
    weight_F = zipf_underuse_weights(density_F, torch.zeros(200, dtype=torch.bool), exponent=1.0)
    # with α fixed, log C is the mean of log d + log r, in closed form here: log 0.4 + (50/200)·log 0.5
    fit_F = torch.exp(math.log(0.4) + 0.25 * math.log(0.5) - rank_R.log())
    expected_F = torch.where(density_F < density_F.quantile(0.5), (1 - density_F / fit_F).clamp(0, 1), 0.0)
    torch.testing.assert_close(weight_F, expected_F)
    assert (weight_F[150:] > 0).all()


def test_an_sae_weighs_its_under_used_latents_by_its_scale_and_its_dead_ones_by_one():
    """mutual_choice's aux weights read from the SAE's own state: dead latents (not fired for dead_tokens)
    weigh 1 and stay out of the fit; live latents of the low end weigh zipf_underuse_scale times their deficit
    below the least-squares fit of the live densities, computed here independently with numpy.polyfit."""
    from sae_cache.sae_common.sae_config import SAEConfig
    n_dead, n_live = 8, F - 8
    rank_R = np.arange(1, n_live + 1, dtype=np.float64)
    density_R = 0.3 * rank_R ** -0.8
    density_R[n_live - 12:] *= 0.2  # a dying tail
    for scale in (0.25, 1.0):
        sae = SAE(SAEConfig(d_in=D, d_sae=F, arch="mutual_choice", k=4, zipf_underuse_scale=scale))
        density_F, rank_F = _shuffled(torch.from_numpy(np.concatenate([density_R, np.zeros(n_dead)])), seed=1)
        dead_F = rank_F > n_live
        sae.density.copy_(density_F.float().masked_fill(dead_F, 0.7))  # a stale EMA: dead latents read as 0
        sae.tokens_since_fired.copy_(torch.where(dead_F, sae.cfg.dead_tokens, 0))
        weight_F = sae.arch.aux_weights(sae).double()
        slope, intercept = np.polyfit(np.log(rank_R), np.log(density_R), 1)
        deficit_R = np.clip(1 - density_R / np.exp(intercept + slope * np.log(rank_R)), 0, 1)
        expected_R = np.where(density_R < np.median(density_R), scale * deficit_R, 0.0)
        live_order = rank_F[~dead_F].argsort()
        np.testing.assert_allclose(weight_F[~dead_F][live_order].numpy(), expected_R, atol=1e-6)
        assert (weight_F[dead_F] == 1).all() and weight_F[~dead_F].max() <= scale
        assert (weight_F[~dead_F][live_order][n_live - 12:] > 0.5 * scale).all()  # the tail is what is weighted


# ---------------------------------------------------------------- an architecture is one registry entry

def test_a_new_architecture_needs_only_its_registry_entry(monkeypatch, tmp_path):
    """A toy architecture registered in ARCHS, and nowhere else, is swept and named over the hyper-parameters
    its entry declares, trains on the dense and the sparse path with its own reconstruction loss, and exports
    and reloads."""
    def first_half_too(sae, latents, xn_BD):  # MSE, plus l1_coeff times the MSE of the first half's reconstruction
        half_BD = latents.decode(sae.W_dec, 0, sae.cfg.d_sae // 2) + sae.b_dec
        xhat_BD = half_BD + latents.decode(sae.W_dec, sae.cfg.d_sae // 2)
        return xhat_BD, (xhat_BD - xn_BD).pow(2).mean() + sae.cfg.l1_coeff * (half_BD - xn_BD).pow(2).mean()

    toy = Arch(lambda sae, pre_BF: topk_per_token(torch.relu(pre_BF), sae.cfg.k), "topk", sweeps=(K, L1),
               reconstruction=first_half_too, select=lambda sae, pre_BF: topk_flat(pre_BF, sae.cfg.k))
    monkeypatch.setitem(ARCHS, "toy", toy)
    entries = expand(TrainConfig(archs=("toy",), ks=(2, 4), l1_coeffs=(0.5,), dict_sizes=(F,)), D)
    assert [e.name for e in entries] == ["toy-k2-l1_0.5-64", "toy-k4-l1_0.5-64"]
    assert [(e.sae.arch, e.sae.k, e.sae.l1_coeff) for e in entries] == [("toy", 2, 0.5), ("toy", 4, 0.5)]
    saes = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        sae = SAE(entries[1].sae)
        sae.sparse_training = sparse
        sae.set_input_scale(batch(100, 256))
        member = Member("toy", sae, torch.optim.Adam(sae.parameters(), lr=1e-2))
        for i in range(3):
            member.step(batch(1000 + i))
        saes[sparse] = sae
    for (name, a), (_, b) in zip(saes[True].state_dict().items(), saes[False].state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    sae = saes[True].train()
    x = batch(7)
    out = sae(x)
    acts_BF = sae.activate(sae.pre_activations(x * sae.input_scale), batch_mode=True)
    half_BD = acts_BF[:, :F // 2] @ sae.W_dec[:F // 2] + sae.b_dec
    expected = out.mse + 0.5 * (half_BD - x * sae.input_scale).pow(2).mean()
    torch.testing.assert_close(out.recon, expected)
    torch.testing.assert_close(out.loss, out.recon)  # no penalty, no auxiliary loss in its entry
    save_sae(sae, tmp_path, model_name="m", hook_name="h", extra_record={})
    loaded = load_sae(tmp_path)
    assert loaded.cfg == sae.cfg
    torch.testing.assert_close(loaded.encode(x), sae.eval().encode(x))
    assert '"architecture": "topk"' in (tmp_path / "cfg.json").read_text()


def test_arch_help_names_every_registered_architecture():
    from sae_cache.sae_common.config import TrainConfig
    from sae_cache.sae_common.field_docs import field_doc

    assert all(name in field_doc(TrainConfig, "archs") for name in ARCHS)


def test_topk_down_columns_in_blocks_equals_one_topk():
    from sae_cache.sae_common.architectures import topk_down_columns

    acts = torch.randn(300, 1000, generator=torch.Generator().manual_seed(9))  # 1000: not a multiple of the block
    vals, idx = topk_down_columns(acts, 7, block=128)
    want_vals, want_idx = acts.topk(7, dim=0)
    assert torch.equal(vals, want_vals) and torch.equal(idx, want_idx)
