"""JumpReLU's straight-through estimators (Rajamanoharan et al. 2024, "Jumping Ahead", eqs. 10-12): the
activation z·H(z − θ) and the step H(z − θ), each with the rectangle-kernel pseudo-derivative wrt θ that makes
the threshold trainable. Pure autograd functions of tensors; architectures.py builds the jumprelu entry on them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rectangle(u: Tensor) -> Tensor:
    """Rectangle kernel K(u) = 1 on (-1/2, 1/2) (Rajamanoharan et al. 2024, JumpReLU paper, eq. 10)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """JumpReLU(z; θ) = z·H(z − θ). Pseudo-derivative wrt θ: −(θ/ε)·K((z−θ)/ε) (JumpReLU paper, eq. 11).

    It is the derivative wrt θ itself: when θ = exp(log_threshold), autograd multiplies by θ again on the
    way to log_threshold. (The BatchTopK reference returns this value as the log-threshold gradient, which
    drops that factor; see tests/test_golden.py.)
    """

    @staticmethod
    def forward(ctx, pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.bandwidth = bandwidth
        return torch.where(pre_BF > theta_F, pre_BF, 0.0)

    @staticmethod
    def backward(ctx, grad_BF: Tensor):
        pre_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta_F = (-(theta_F / eps) * rectangle((pre_BF - theta_F) / eps) * grad_BF).sum(0)
        return grad_BF * (pre_BF > theta_F), grad_theta_F, None


class _Step(torch.autograd.Function):
    """H(z − θ) with pseudo-derivative −(1/ε)·K((z−θ)/ε) wrt θ and none wrt z (JumpReLU paper, eq. 12)."""

    @staticmethod
    def forward(ctx, pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.bandwidth = bandwidth
        return (pre_BF > theta_F).to(pre_BF.dtype)

    @staticmethod
    def backward(ctx, grad_BF: Tensor):
        pre_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta_F = (-(1.0 / eps) * rectangle((pre_BF - theta_F) / eps) * grad_BF).sum(0)
        return None, grad_theta_F, None


def jump_relu(pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    return _JumpReLU.apply(pre_BF, theta_F, bandwidth)


def step(pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    return _Step.apply(pre_BF, theta_F, bandwidth)
