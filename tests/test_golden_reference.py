"""The test side of the golden steps: tests/golden_reference.py reproduces every shipped file (so the steps it
computes for other seeds are the reference's), its generated steps reach the fragile regime (gradients near
Adam's eps) with every discrete decision clear of float noise, and `assert_adam_step` lets legitimate float
noise through while still catching a wrong step."""

from __future__ import annotations

import pytest
import torch

from tests.golden_reference import ARCH_OF, decision_margins, reference_step
from tests.test_golden import (EPS, FWD, GENERATED, GRAD, LR, SHIPPED, adam_first_step, assert_adam_step,
                               build_sae, load_case, project, run_step, sparse)  # noqa: F401  (sparse: a fixture)


@pytest.mark.parametrize("case", SHIPPED)
def test_reimplementation_reproduces_shipped_file(case):
    t, meta = load_case(case)
    ours = reference_step(t, meta, ARCH_OF[case])
    for key in ("feature_acts", "sae_out"):
        torch.testing.assert_close(ours[key], t[key], **FWD, msg=key)
    torch.testing.assert_close(ours["num_batches_not_active_after"], t["num_batches_not_active_after"])
    for key, value in meta.items():
        if key.startswith("scalar_"):
            torch.testing.assert_close(torch.tensor(ours[key]), torch.tensor(value), **FWD, msg=key)
    grads = [key for key in t if key.startswith("grad_")]
    assert len(grads) >= 4
    for key in grads:
        torch.testing.assert_close(ours[key], t[key], **GRAD, msg=key)
    unit_FD, _ = project(t["W_dec"], t["grad_W_dec_raw"])
    for key in (key for key in t if key.endswith("_after_step")):
        name = key.removesuffix("_after_step")
        g = "grad_W_dec_projected" if name == "W_dec" else f"grad_{name}"
        assert_adam_step(t[key], unit_FD if name == "W_dec" else t[name], t[g], ours[g], msg=key)
        assert_adam_step(ours[key], unit_FD if name == "W_dec" else t[name], ours[g], t[g], msg=key)


@pytest.mark.parametrize("case", GENERATED)
def test_generated_steps_reach_gradients_near_eps_and_are_free_of_ties(case, sparse):
    t, meta = load_case(case)
    arch = ARCH_OF[case.split("@")[0]]
    # every selection (ReLU sign, top-k, AuxK, JumpReLU edges) is decided by more than its float noise...
    assert min(decision_margins(t, meta, arch).values()) > 1
    # ...and the steered latents give OUR gradients (what our Adam step uses) within a decade of eps
    sae = build_sae(t, meta, arch, sparse)
    _, grads = run_step(sae, t["x"])
    g_W_enc = grads["W_enc"][:, meta["near_eps_latents"]].abs()
    assert ((g_W_enc > EPS / 10) & (g_W_enc < 10 * EPS)).sum() >= 10, g_W_enc


def _relu_step(case: str = "relu_l1@seed1", sparse: bool = False):
    t, meta = load_case(case)
    sae = build_sae(t, meta, "relu", sparse)
    _, grads = run_step(sae, t["x"])
    return t, sae.W_enc.detach().clone(), grads["W_enc"]


def test_adam_step_check_lets_float_noise_near_eps_through():
    """A gradient perturbation well inside GRAD's tolerance moves the steps of near-eps elements by far more
    than a fixed atol: exactly what failed on another machine. The derived bound accepts it."""
    t, after, g = _relu_step()
    noise = 1e-8 * torch.sign(g)  # 1% of GRAD's atol
    noisy_after = adam_first_step(t["W_enc"], g + noise)
    assert (noisy_after - after).abs().max() > 1e-6  # the old fixed STEP atol
    assert_adam_step(noisy_after, t["W_enc"], g + noise, g)


def test_adam_step_check_catches_a_wrong_step():
    t, after, g = _relu_step()
    p = t["W_enc"]
    assert_adam_step(after, p, g, g)  # the unperturbed step passes
    big, small = int(g.abs().argmax()), int((g.abs() + (g == 0) * 1e30).argmin())
    assert g.flatten()[big].abs() > 1e-3 and g.flatten()[small].abs() < 1e-7
    # 1% of lr off on the element with the largest gradient...
    wrong = after.clone()
    wrong.view(-1)[big] += 0.01 * LR
    with pytest.raises(AssertionError, match="not Adam's step"):
        assert_adam_step(wrong, p, g, g)
    # ...even when it IS Adam's step of the gradient it came from, that gradient is not the expected one
    # (u = 0.99 needs g ≈ 100·eps, not ~1e-3): the interval check catches it on its own
    u_wrong = (g / (g.abs() + EPS)).flatten()[big] - 0.01 * torch.sign(g.flatten()[big])
    g_wrong = g.clone()
    g_wrong.view(-1)[big] = u_wrong * EPS / (1 - u_wrong.abs())
    with pytest.raises(AssertionError, match="outside what the gradient tolerance allows"):
        assert_adam_step(adam_first_step(p, g_wrong), p, g_wrong, g)
    # a reversed step on the element nearest eps, where the interval is wide: not Adam's step of our gradient
    wrong = after.clone()
    wrong.view(-1)[small] = 2 * p.flatten()[small] - after.flatten()[small]
    with pytest.raises(AssertionError, match="not Adam's step"):
        assert_adam_step(wrong, p, g, g)
