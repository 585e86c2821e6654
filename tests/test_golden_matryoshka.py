"""matryoshka_batchtopk against one training step of the Matryoshka paper's reference code (Bussmann, Nabeshima,
Karvonen, Nanda 2025; tests/data/golden/README.md, section "Matryoshka BatchTopK").

Forward values are compared directly (1e-5). Gradients and the Adam step are compared with a few-line
re-implementation of the reference's loss, which first reproduces the file's gradients with the reference's
conventions and then gives the gradients of ours, which differ on purpose:
  - the reference averages a b_dec-only reconstruction into its mean of prefix MSEs (n_groups + 1 terms);
    ours is the mean over the n_groups prefixes, as in the paper's loss;
  - AuxK: we detach the residual target (Gao et al. 2024); the reference does not;
  - b_enc: the reference has none (zero, no gradient); ours is a trained parameter;
  - inference threshold: ours is the BatchTopK paper's mean over the last batches of the smallest kept
    activation; the reference keeps an EMA (rate 0.01, from 0). After one batch, ours = the reference's / 0.01.
Every check runs on the dense path and on the sparse training path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sae_cache.sae_common.architectures import group_ends, prefix_reconstructions
from sae_cache.sae_common.sae import SAE, SAEConfig, standardize
from sae_cache.sae_common.sparse import Latents
from tests.test_golden import EPS, LR, run_step, with_reference_state

GOLDEN = Path(__file__).parent / "data" / "golden"
CASES = ["matryoshka", "matryoshka_unitnorm"]
FWD = dict(atol=1e-5, rtol=1e-5)
GRAD = dict(atol=1e-6, rtol=1e-4)


def load_case(case: str) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(GOLDEN / f"{case}.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, {k: json.loads(v) for k, v in f.metadata().items()}


@pytest.fixture(params=[False, True], ids=["dense", "sparse"])
def sparse(request) -> bool:
    return request.param


def build_sae(t: dict, meta: dict, sparse: bool) -> SAE:
    B, F = meta["B"], meta["F"]
    cfg = SAEConfig(d_in=meta["d"], d_sae=F, arch="matryoshka_batchtopk", k=meta["k"], aux_k=meta["top_k_aux"],
                    aux_coeff=meta["aux_penalty"], dead_tokens=meta["n_batches_to_dead"] * B,
                    input_norm="standardize" if meta["input_unit_norm"] else "none",
                    group_fractions=tuple(size / F for size in meta["group_sizes"]))
    return with_reference_state(SAE(cfg), t, B, sparse)


def reference_grads(t: dict, meta: dict, *, ours: bool) -> dict[str, torch.Tensor]:
    """The reference's loss in a few lines (golden README), with a zero b_enc leaf; ours=True switches to our
    conventions: no b_dec-only term in the mean, AuxK residual detached."""
    p = {n: t[n].clone().requires_grad_() for n in ("W_enc", "W_dec", "b_dec", "b_enc")}
    x, B, k = t["x"], meta["B"], meta["k"]
    xn = standardize(x)[0] if meta["input_unit_norm"] else x
    acts = torch.relu((xn - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
    vals, idx = acts.flatten().topk(k * B)
    kept = torch.zeros_like(acts).flatten().scatter(0, idx, vals).view_as(acts)
    reconstructions, start = [p["b_dec"].expand_as(xn)], 0
    for size in meta["group_sizes"]:
        reconstructions.append(reconstructions[-1] + kept[:, start:start + size] @ p["W_dec"][start:start + size])
        start += size
    if ours:
        reconstructions = reconstructions[1:]
    l2 = torch.stack([(r - xn).pow(2).mean() for r in reconstructions]).mean()
    dead = t["num_batches_not_active_after"] >= meta["n_batches_to_dead"]
    vals, idx = acts[:, dead].topk(min(meta["top_k_aux"], int(dead.sum())), dim=-1)
    e_hat = torch.zeros_like(acts[:, dead]).scatter(-1, idx, vals) @ p["W_dec"][dead]
    residual = xn - reconstructions[-1]
    residual = residual.detach() if ours else residual
    (l2 + meta["aux_penalty"] * (e_hat - residual).pow(2).mean()).backward()
    return {n: v.grad for n, v in p.items()}


def adam_first_step(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Adam's first update: m̂ = g, v̂ = g², so p − lr·g/(|g| + eps)."""
    return p - LR * g / (g.abs() + EPS)


def assert_adam_step(after: torch.Tensor, before: torch.Tensor, g: torch.Tensor, expected_g: torch.Tensor) -> None:
    """`after` is Adam's first step from `before` along our gradient g, and g agrees with expected_g to GRAD;
    so `after` lies between the steps along expected_g ± that tolerance (the step is monotone in g). Where
    |g| ≫ eps the bracket is tight; where |g| ~ eps it is as wide as the gradient tolerance allows."""
    slack = dict(atol=1e-7, rtol=1e-6)  # float32 rounding of p − lr·ĝ (|p| <~ 1, lr = 3e-4)
    torch.testing.assert_close(after, adam_first_step(before, g), **slack)
    tol = GRAD["atol"] + GRAD["rtol"] * expected_g.abs()
    low, high = adam_first_step(before, expected_g + tol), adam_first_step(before, expected_g - tol)
    margin = slack["atol"] + slack["rtol"] * before.abs()
    assert ((after >= low - margin) & (after <= high + margin)).all()


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference(case, sparse):
    t, meta = load_case(case)
    sae = build_sae(t, meta, sparse)
    assert group_ends(meta["F"], sae.cfg.group_fractions) == torch.tensor(meta["group_sizes"]).cumsum(0).tolist()
    prefix_GBD = prefix_reconstructions(sae, Latents(acts_BF=t["feature_acts"])).detach()  # before the step
    torch.testing.assert_close(prefix_GBD, t["prefix_reconstructions"], **FWD)
    out, _ = run_step(sae, t["x"])
    torch.testing.assert_close(out.acts, t["feature_acts"], **FWD)
    torch.testing.assert_close(out.x_hat, t["sae_out"], **FWD)
    xn = t["x_normalised"]
    mse_G = (t["prefix_reconstructions"] - xn).pow(2).mean((1, 2))
    torch.testing.assert_close(mse_G.min(), torch.tensor(meta["scalar_min_l2_loss"]), **FWD)
    torch.testing.assert_close(mse_G.max(), torch.tensor(meta["scalar_max_l2_loss"]), **FWD)
    # the reference's l2 averages G + 1 terms, the first the b_dec-only one; ours the G prefixes
    G, bdec_only = len(meta["group_sizes"]), (t["b_dec"] - xn).pow(2).mean()
    torch.testing.assert_close((G + 1) * torch.tensor(meta["scalar_l2_loss"]), bdec_only + mse_G.sum(), **FWD)
    torch.testing.assert_close(out.recon, mse_G.mean(), **FWD)
    assert abs(out.recon - meta["scalar_l2_loss"]) > 1e-3  # the two conventions really differ here
    torch.testing.assert_close(out.mse, mse_G[-1], **FWD)  # the full reconstruction's MSE
    torch.testing.assert_close(out.aux, torch.tensor(meta["scalar_aux_loss"]), **FWD)
    torch.testing.assert_close(out.loss, out.recon + out.aux)
    torch.testing.assert_close(out.l0, torch.tensor(meta["scalar_l0_norm"]), **FWD)
    torch.testing.assert_close(out.acts.sum(-1).mean(), torch.tensor(meta["scalar_l1_norm"]), **FWD)


@pytest.mark.parametrize("case", CASES)
def test_bookkeeping_and_threshold(case, sparse):
    t, meta = load_case(case)
    sae = build_sae(t, meta, sparse)
    run_step(sae, t["x"])
    torch.testing.assert_close(sae.tokens_since_fired, t["num_batches_not_active_after"].long() * meta["B"])
    # θ: ours is the window mean of each batch's smallest kept activation, so after one batch that value;
    # the reference's EMA from θ = 0 holds rate times it
    assert meta["threshold_before"] == 0.0
    smallest = t["feature_acts"][t["feature_acts"] > 0].min()
    torch.testing.assert_close(t["threshold_after"], meta["threshold_ema_rate"] * smallest.reshape(1), **FWD)
    torch.testing.assert_close(sae.inference_threshold(), smallest.expand(meta["F"]), **FWD)


@pytest.mark.parametrize("case", CASES)
def test_step_matches_reference_with_our_conventions(case, sparse):
    t, meta = load_case(case)
    sae = build_sae(t, meta, sparse)
    _, grads = run_step(sae, t["x"])
    theirs, expected = reference_grads(t, meta, ours=False), reference_grads(t, meta, ours=True)
    golden = {"W_enc": "grad_W_enc", "W_dec": "grad_W_dec_raw", "b_dec": "grad_b_dec"}
    for name, key in golden.items():
        torch.testing.assert_close(theirs[name], t[key], **GRAD)  # the re-implementation reproduces the file
        assert (theirs[name] - expected[name]).abs().max() > 1e-5, name  # and the conventions matter here
    for name in ("W_enc", "W_dec", "b_dec", "b_enc"):
        torch.testing.assert_close(grads[name], expected[name], **GRAD, msg=name)
    # the decoder step: unit rows, gradient without its component along each row, then Adam
    unit_FD = t["W_dec"] / t["W_dec"].norm(dim=1, keepdim=True)

    def project(g_FD):
        return g_FD - (g_FD * unit_FD).sum(1, keepdim=True) * unit_FD

    torch.testing.assert_close(project(t["grad_W_dec_raw"]), t["grad_W_dec_projected"], **GRAD)
    torch.testing.assert_close(grads["W_dec_projected"], project(expected["W_dec"]), **GRAD)
    assert_adam_step(t["W_dec_after_step"], unit_FD, t["grad_W_dec_projected"], t["grad_W_dec_projected"])
    assert_adam_step(sae.W_dec.detach(), unit_FD, grads["W_dec_projected"], project(expected["W_dec"]))
    for name in ("W_enc", "b_dec"):
        assert_adam_step(t[f"{name}_after_step"], t[name], t[golden[name]], t[golden[name]])
    for name in ("W_enc", "b_dec", "b_enc"):
        assert_adam_step(getattr(sae, name).detach(), t[name], grads[name], expected[name])
