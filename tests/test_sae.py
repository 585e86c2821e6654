"""The SAE module and its architectures: a contract every ARCHS entry meets, then each architecture's
defining property, the shared machinery (decoder constraint, bookkeeping, θ window, normalisation) and
the errors a user can cause. Tiny shapes, fixed seeds, CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sae_cache.sae_common.architectures import (ARCHS, aux_reconstruction_loss, batch_topk, feature_choice,
                                                plain_reconstruction)
from sae_cache.sae_common.jumprelu_ste import rectangle
from sae_cache.sae_common.errors import ConfigError
from sae_cache.sae_common.sae import SAE, SAEConfig

D, F, B, K = 16, 64, 32, 4


def make_sae(arch: str, seed: int = 0, **overrides) -> SAE:
    """An SAE on the dense reference path (its `acts` are what these tests inspect; test_sparse.py checks the
    sparse training path against it)."""
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(**{"d_in": D, "d_sae": F, "arch": arch, "k": K, "stats_window": 8, **overrides}))
    sae.sparse_training = False
    return sae


def batch(seed: int, n: int = B) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, D, generator=g) + 1  # off-centre and not unit scale, like a residual stream


def trained(arch: str, n_batches: int = 4, **overrides) -> SAE:
    """An SAE that has seen a few training batches (so batch-level archs have an inference threshold)."""
    sae = make_sae(arch, **overrides)
    if sae.cfg.input_norm == "scalar":
        sae.set_input_scale(batch(100, 256))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for i in range(n_batches):
        sae(batch(1000 + i)).loss.backward()
        sae.constrain_decoder()
        opt.step()
        opt.zero_grad()
    return sae


# ---------------------------------------------------------------- the contract, for every architecture

@pytest.mark.parametrize("arch", ARCHS)
def test_contract(arch):
    sae = make_sae(arch)
    sae.set_input_scale(batch(100, 256))
    x = batch(0)
    out = sae(x)
    assert out.acts.shape == (B, F) and out.x_hat.shape == (B, D)
    assert (out.acts >= 0).all() and out.l0 > 0
    torch.testing.assert_close(out.loss, out.recon + out.penalty + out.aux)
    if sae.arch.reconstruction is plain_reconstruction:  # the reconstruction loss is the MSE of x̂
        torch.testing.assert_close(out.recon, out.mse)
    out.loss.backward()
    for name in ("W_enc", "W_dec", "b_dec"):
        grad = getattr(sae, name).grad
        assert grad is not None and grad.isfinite().all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_is_per_token(arch):
    """In eval mode a token's latents do not depend on the batch: alone, in its batch, or in another."""
    sae = trained(arch).eval()
    x = batch(0)
    acts_BF = sae.encode(x)
    assert (acts_BF > 0).any()
    for i in (0, 7, B - 1):
        alone = sae.encode(x[i:i + 1])[0]
        elsewhere = sae.encode(torch.cat([batch(5, 9), x[i:i + 1]]))[-1]
        for other in (alone, elsewhere):
            assert torch.equal(other > 0, acts_BF[i] > 0)
            torch.testing.assert_close(other, acts_BF[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_init(arch):
    sae = make_sae(arch)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F))
    # W_dec is the transpose of W_enc with unit-norm rows (BatchTopK reference)
    torch.testing.assert_close(sae.W_dec, sae.W_enc.T / sae.W_enc.T.norm(dim=1, keepdim=True))
    assert not sae.b_enc.any() and not sae.b_dec.any()


# ---------------------------------------------------------------- each architecture's defining property

def test_batchtopk_keeps_k_times_batch_entries():
    sae = make_sae("batchtopk")
    acts_BF = sae(batch(0)).acts
    assert (acts_BF > 0).sum() == K * B
    assert len(set((acts_BF > 0).sum(1).tolist())) > 1  # varies per token, unlike TopK
    # eval can force the batch selection
    assert (sae.eval().encode(batch(0), batch_mode=True) > 0).sum() == K * B


def test_topk_keeps_k_per_token():
    acts_BF = make_sae("topk")(batch(0)).acts
    assert ((acts_BF > 0).sum(1) == K).all()


@pytest.mark.parametrize("k", [1, 3, 2])  # kB < F, kB mod F != 0, kB == F
def test_feature_choice_capacities(k):
    torch.manual_seed(0)
    acts_BF = torch.rand(B, F) + 0.1
    kept_BF = feature_choice(acts_BF, k * B) > 0
    per_latent = kept_BF.sum(0)
    assert kept_BF.sum() == k * B
    assert per_latent.max() <= math.ceil(k * B / F) and per_latent.min() >= k * B // F
    # each latent keeps ITS best tokens
    worst_kept = acts_BF.where(kept_BF, math.inf).amin(0)
    best_dropped = acts_BF.where(~kept_BF, -math.inf).amax(0)
    assert (worst_kept[per_latent > 0] >= best_dropped[per_latent > 0]).all()
    # through the SAE, with a real batch
    sae = make_sae("feature_choice", k=k)
    kept_BF = sae(batch(0)).acts > 0
    assert kept_BF.sum() == k * B and kept_BF.sum(0).max() <= math.ceil(k * B / F)


def test_mutual_choice_keeps_the_top_k_times_batch_entries():
    sae = make_sae("mutual_choice")
    x = batch(0)
    acts_BF = sae(x).acts
    dense_BF = torch.relu(sae.pre_activations(x * sae.input_scale)).detach()
    kept_BF = acts_BF > 0
    assert kept_BF.sum() == K * B
    assert dense_BF[kept_BF].min() >= dense_BF[~kept_BF].max()
    torch.testing.assert_close(acts_BF, batch_topk(dense_BF, K * B))


def test_jumprelu_log_threshold_gradient_matches_explicit_formula():
    """dL/dlogθ_f = θ_f·[Σ_b g_bf·(−θ_f/ε)K((z_bf−θ_f)/ε) + λ/B·Σ_b (−1/ε)K((z_bf−θ_f)/ε)], g = dL/df
    (JumpReLU paper, eqs. 11-12, and the chain rule through θ = exp(logθ))."""
    sae = make_sae("jumprelu", bandwidth=0.5, l0_coeff=0.1, input_norm="none")
    with torch.no_grad():
        sae.log_threshold.copy_(torch.linspace(-2, 0.5, F))
    x = batch(0)
    out = sae(x)
    out.acts.retain_grad()
    out.loss.backward()
    z_BF = sae.pre_activations(x).detach()
    theta_F, eps, lam = sae.log_threshold.exp().detach(), 0.5, 0.1
    kernel_BF = rectangle((z_BF - theta_F) / eps)
    assert kernel_BF.sum() > 10  # many pre-activations inside the kernel: the formula is exercised
    dtheta_F = (out.acts.grad * -(theta_F / eps) * kernel_BF).sum(0) + lam / B * (-(1 / eps) * kernel_BF).sum(0)
    torch.testing.assert_close(sae.log_threshold.grad, theta_F * dtheta_F)


def test_jumprelu_l0_gradient_is_derivative_of_rectangle_smoothed_l0():
    """The step's STE is the exact derivative of H convolved with the rectangle kernel,
    H_ε(u) = clamp(u/ε + 1/2, 0, 1): compare with a finite difference in logθ (float64)."""
    sae = make_sae("jumprelu", bandwidth=0.5, l0_coeff=0.1, input_norm="none").double()
    with torch.no_grad():
        sae.log_threshold.copy_(torch.linspace(-2, 0.5, F, dtype=torch.float64))
    x = batch(0).double()
    sae(x).penalty.backward()
    z_BF = sae.pre_activations(x).detach()

    def smoothed_l0(log_theta_F):
        return 0.1 * ((z_BF - log_theta_F.exp()) / 0.5 + 0.5).clamp(0, 1).sum(-1).mean()

    h, log_theta_F = 1e-6, sae.log_threshold.detach()
    fd_F = torch.stack([(smoothed_l0(log_theta_F + h * e) - smoothed_l0(log_theta_F - h * e)) / (2 * h)
                        for e in torch.eye(F, dtype=torch.float64)])
    assert fd_F.abs().sum() > 0
    torch.testing.assert_close(sae.log_threshold.grad, fd_F, atol=1e-6, rtol=1e-5)


def test_relu_l1_penalty_is_weighted_by_decoder_norm():
    sae = make_sae("relu", l1_coeff=0.05)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, F)[:, None])  # rows of different norms
    out = sae(batch(0))
    expected = 0.05 * (out.acts * sae.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(out.penalty, expected)
    assert not torch.allclose(out.penalty, 0.05 * out.acts.sum(-1).mean())


# ---------------------------------------------------------------- auxiliary losses

def test_aux_loss_detaches_the_residual():
    torch.manual_seed(0)
    pre_BF, W_dec_FD = torch.randn(B, F), torch.randn(F, D)
    residual_BD = torch.randn(B, D, requires_grad=True)
    weight_F = (torch.arange(F) < 10).float()
    aux_reconstruction_loss(pre_BF.requires_grad_(), weight_F, W_dec_FD, residual_BD, aux_k=3).backward()
    assert residual_BD.grad is None and pre_BF.grad[:, 10:].abs().sum() == 0 and pre_BF.grad.abs().sum() > 0


def test_auxk_reconstructs_the_residual_from_dead_latents():
    sae = make_sae("topk")
    x = batch(0)
    assert sae(x).aux == 0  # nothing dead yet
    silent_F = ~(sae.eval().encode(x) > 0).any(0)  # latents this batch does not select
    assert silent_F.sum() > 10
    with torch.no_grad():
        sae.tokens_since_fired[silent_F] = sae.cfg.dead_tokens
    out = sae.train()(x)
    assert torch.equal(sae.dead_mask(), silent_F)
    # fewer dead latents than aux_k: all of them reconstruct the residual (Gao et al. 2024, AuxK)
    xn_BD = x * sae.input_scale
    e_hat_BD = torch.relu(sae.pre_activations(xn_BD)[:, silent_F]) @ sae.W_dec[silent_F]
    expected = (e_hat_BD - (xn_BD - out.x_hat * sae.input_scale)).pow(2).mean() / 32
    torch.testing.assert_close(out.aux, expected)


@pytest.mark.parametrize("sparse", [False, True])
def test_normalised_auxk_is_divided_by_the_residual_variance(sparse):
    """aux_normalised (Gao et al. 2024): the same auxiliary loss divided by mean((e − mean_b e)²), e = x − x̂."""
    x = batch(0)
    outs = {}
    for normalised in (False, True):
        sae = make_sae("topk", aux_normalised=normalised, input_norm="none")
        sae.sparse_training = sparse
        with torch.no_grad():
            sae.tokens_since_fired[: F // 2] = sae.cfg.dead_tokens  # half the latents dead
        outs[normalised] = sae.train()(x)
    residual_BD = x - outs[True].x_hat
    variance = (residual_BD - residual_BD.mean(0)).pow(2).mean()
    assert outs[False].aux > 0 and abs(variance - 1) > 0.1  # the division changes the value
    torch.testing.assert_close(outs[True].aux, outs[False].aux / variance)


# ---------------------------------------------------------------- shared machinery

def test_constrain_decoder_projects_gradient_then_normalises():
    sae = make_sae("topk")
    sae(batch(0)).loss.backward()
    with torch.no_grad():
        sae.W_dec.mul_(1.7)
    sae.constrain_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F))
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(F), atol=1e-6, rtol=0)


def test_dead_latent_counter_counts_tokens():
    sae = make_sae("relu", dead_tokens=2 * B)
    acts_BF = torch.zeros(B, F)
    acts_BF[0, :10] = 1.0
    sae.update_stats(acts_BF)
    sae.update_stats(torch.zeros(B, F))
    assert (sae.tokens_since_fired[:10] == B).all() and (sae.tokens_since_fired[10:] == 2 * B).all()
    assert sae.dead_mask().tolist() == [False] * 10 + [True] * (F - 10)
    torch.testing.assert_close(sae.density[:10], torch.full((10,), 0.5 / B))


@pytest.mark.parametrize("arch", ["batchtopk", "mutual_choice", "feature_choice"])
def test_inference_threshold_is_mean_over_last_window_batches(arch):
    sae = make_sae(arch)
    N = sae.cfg.stats_window
    smallest = torch.arange(1, N + 4, dtype=torch.float)  # three more batches than the window holds
    for value in smallest:
        acts_BF = torch.zeros(B, F)
        acts_BF[0] = value + 1
        acts_BF[1, : F // 2] = value  # latents F/2.. keep only value + 1
        sae.update_stats(acts_BF)
    theta_F = sae.inference_threshold()
    if arch == "feature_choice":  # per latent
        torch.testing.assert_close(theta_F[: F // 2], smallest[-N:].mean().expand(F // 2))
        torch.testing.assert_close(theta_F[F // 2:], (smallest[-N:] + 1).mean().expand(F // 2))
    else:
        torch.testing.assert_close(theta_F, smallest[-N:].mean().expand(F))


def test_scalar_input_norm_makes_the_sae_scale_equivariant():
    x = batch(0)
    sae = make_sae("batchtopk")
    s = sae.set_input_scale(x)
    torch.testing.assert_close((x * s).norm(dim=-1).mean(), torch.tensor(math.sqrt(D)))
    x_hat = sae(x).x_hat
    assert sae.set_input_scale(10 * x) == pytest.approx(s / 10)
    torch.testing.assert_close(sae(10 * x).x_hat, 10 * x_hat, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sae.decode(sae.encode(10 * x)), 10 * x_hat, rtol=1e-5, atol=1e-4)


def test_standardize_decode_needs_token_statistics():
    sae = make_sae("topk", input_norm="standardize")
    x = batch(0)
    xn_BD, denorm = sae.normalize(x)
    torch.testing.assert_close(sae.decode(sae.encode(x), denorm), sae(x).x_hat)
    with pytest.raises(ConfigError, match="per-token"):
        sae.decode(sae.encode(x))


@pytest.mark.parametrize("overrides, message", [
    (dict(arch="gated"), "unknown SAE architecture 'gated'; valid ones: relu, topk, batchtopk"),
    (dict(arch="topk", k=F), f"k={F} is not valid for topk with d_sae={F}"),
    (dict(arch="batchtopk", k=0), "k=0 is not valid"),
    (dict(input_norm="layernorm"), "input_norm 'layernorm' is not valid; use one of none, standardize, scalar"),
    (dict(stats_window=0), "stats_window must be a positive integer"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(d_in=D, d_sae=F, **overrides)


def test_k_is_ignored_by_architectures_without_k():
    assert SAEConfig(d_in=D, d_sae=F, arch="relu", k=10 * F).k == 10 * F


def test_set_input_scale_needs_scalar_norm():
    with pytest.raises(ValueError, match="input_norm='scalar'"):
        make_sae("topk", input_norm="none").set_input_scale(batch(0))


def test_matryoshka_resumes_exactly_from_a_checkpoint(tmp_path):
    """Six steps in one go equal three, a checkpoint (weights, buffers, Adam state), a fresh SAE, three more."""
    from sae_cache.train.checkpoint import load_checkpoint, save_checkpoint
    from sae_cache.train.trainer import Member

    def member() -> Member:
        sae = make_sae("matryoshka_batchtopk", dead_tokens=2 * B, aux_k=4)
        sae.sparse_training = True
        sae.set_input_scale(batch(100, 256))
        return Member("m", sae, torch.optim.Adam(sae.parameters(), lr=1e-2, betas=(0.9, 0.99)))

    whole, first = member(), member()
    for i in range(6):
        whole.step(batch(1000 + i))
    for i in range(3):
        first.step(batch(1000 + i))
    (tmp_path / "m").mkdir()
    save_checkpoint(tmp_path, [first], 3, {})
    resumed = member()
    load_checkpoint(tmp_path, [resumed], json.loads((tmp_path / "state.json").read_text()))
    for i in range(3, 6):
        resumed.step(batch(1000 + i))
    assert whole.sae.dead_mask().any()  # the auxiliary loss took part
    for (name, a), (_, b) in zip(resumed.sae.state_dict().items(), whole.sae.state_dict().items()):
        if a.is_floating_point():  # the same operations on the same values: equal up to reduction order at most
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(a, b), name
    torch.testing.assert_close(resumed.sae.inference_threshold(), whole.sae.inference_threshold(), rtol=1e-6, atol=0)


def test_blocked_decoder_constraint_equals_the_whole_matrix_formula():
    """constrain_decoder works a block of 1024 rows at a time; 2500 latents cross two block edges."""
    sae = SAE(SAEConfig(d_in=8, d_sae=2500, arch="topk", k=4))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(2500, 1, generator=g) + 0.5)
    sae.W_dec.grad = torch.randn(2500, 8, generator=g)
    W_unit = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    grad = sae.W_dec.grad - (sae.W_dec.grad * W_unit).sum(1, keepdim=True) * W_unit
    sae.constrain_decoder()
    torch.testing.assert_close(sae.W_dec.detach(), W_unit, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sae.W_dec.grad, grad, rtol=1e-5, atol=1e-6)
