"""A naive re-implementation of ONE step of the BatchTopK paper's reference SAEs, and a seeded generator of
new inputs for it: more golden steps than the six shipped files (tests/data/golden/).

Written from tests/data/golden/README.md alone: nothing here imports our library. `reference_step` returns
the same keys the files hold, with the reference's own conventions (AuxK residual not detached, no b_enc in
TopK/BatchTopK, JumpReLU threshold gradient without the chain-rule factor, L0 on post-threshold values).
tests/test_golden_reference.py proves it reproduces every shipped file; test_golden.py then runs our SAE
against its steps on new seeds through the same checks as the files.
"""

from __future__ import annotations

import math

import torch

U32 = 2.0 ** -24  # unit roundoff of float32
ARCH_OF = {"batchtopk": "batchtopk", "batchtopk_unitnorm": "batchtopk", "topk": "topk",
           "topk_unitnorm": "topk", "relu_l1": "relu", "jumprelu": "jumprelu"}
# (B, d, F, k) of the generated steps, by seed: other shapes than the files' (128, 48, 384, 8)
SHAPES = {1: (64, 32, 192, 6), 2: (96, 40, 256, 8), 3: (128, 48, 384, 8)}
SEEDS = tuple(SHAPES)


def _rect(u):
    return ((u > -0.5) & (u < 0.5)).float()


class _RefJumpReLU(torch.autograd.Function):
    """The reference's JumpReLU: its threshold gradient is −(θ/ε)K, returned as the log-threshold gradient."""

    @staticmethod
    def forward(ctx, pre, log_threshold, bw):
        theta = log_threshold.exp()
        ctx.save_for_backward(pre, theta)
        ctx.bw = bw
        return pre * (pre > theta).float()

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        return (pre > theta).float() * g, (-(theta / ctx.bw) * _rect((pre - theta) / ctx.bw) * g).sum(0), None


class _RefStep(torch.autograd.Function):
    """The reference's Heaviside step: no input gradient, −(1/ε)K as the log-threshold gradient."""

    @staticmethod
    def forward(ctx, pre, log_threshold, bw):
        theta = log_threshold.exp()
        ctx.save_for_backward(pre, theta)
        ctx.bw = bw
        return (pre > theta).float()

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        return torch.zeros_like(pre), (-(1.0 / ctx.bw) * _rect((pre - theta) / ctx.bw) * g).sum(0), None


def _keep_topk(acts, k, batch):
    if batch:
        vals, idx = acts.flatten().topk(k * acts.shape[0])
        return torch.zeros_like(acts).flatten().scatter(0, idx, vals).view_as(acts)
    vals, idx = acts.topk(k, dim=-1)
    return torch.zeros_like(acts).scatter(-1, idx, vals)


def reference_forward(t: dict, meta: dict, arch: str, p: dict | None = None) -> dict:
    """The reference's forward pass and losses (README), on parameters p (default: the tensors of t)."""
    p = p if p is not None else t
    x = t["x"]
    mu, sd = x.new_zeros(()), x.new_ones(())
    xn = x
    if meta["input_unit_norm"]:
        mu = x.mean(-1, keepdim=True)
        sd = (x - mu).std(-1, keepdim=True)
        xn = (x - mu) / (sd + 1e-5)
    out = {"xn": xn}
    counter = t["num_batches_not_active_before"].clone()
    if arch == "jumprelu":
        pre = torch.relu(xn @ p["W_enc"] + p["b_enc"])
        acts = _RefJumpReLU.apply(pre, p["log_threshold"], meta["bandwidth"])
        l0 = _RefStep.apply(acts, p["log_threshold"], meta["bandwidth"]).sum(-1).mean()
        out.update(pre=pre, l1_loss=meta["l1_coeff"] * l0, l1_norm=l0)  # the reference logs L0 as l1_norm
    else:
        pre = (xn - p["b_dec"]) @ p["W_enc"] + (p["b_enc"] if arch == "relu" else 0)
        acts = torch.relu(pre)
        if arch != "relu":
            acts = _keep_topk(acts, meta["k"], batch=arch == "batchtopk")
        l1_norm = acts.abs().sum(-1).mean()
        out.update(pre=pre, l1_loss=meta["l1_coeff"] * l1_norm, l1_norm=l1_norm)
        fired = acts.sum(0) > 0
        counter = torch.where(fired, 0.0, counter + 1)
    x_hat = acts @ p["W_dec"] + p["b_dec"]
    l2 = (x_hat - xn).pow(2).mean()
    aux = x.new_zeros(())
    dead = counter >= meta["n_batches_to_dead"]
    if arch in ("topk", "batchtopk") and dead.any():
        acts_dead = torch.relu(pre[:, dead])
        e_hat = _keep_topk(acts_dead, min(meta["top_k_aux"], int(dead.sum())), batch=False) @ p["W_dec"][dead]
        aux = meta["aux_penalty"] * (e_hat - (xn - x_hat)).pow(2).mean()
    out.update(feature_acts=acts, x_hat=x_hat, sae_out=x_hat * sd + mu, l2_loss=l2, aux_loss=aux,
               l0_norm=(acts > 0).float().sum(-1).mean(), loss=l2 + out["l1_loss"] + aux,
               num_batches_not_active_after=counter)
    return out


def reference_step(t: dict, meta: dict, arch: str) -> dict:
    """Forward, backward, decoder projection and Adam: everything a golden file holds, under its keys."""
    names = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["log_threshold"] if arch == "jumprelu" else [])
    p = {n: torch.nn.Parameter(t[n].clone()) for n in names}
    fwd = reference_forward(t, meta, arch, p)
    fwd["loss"].backward()
    res = {k: fwd[k].detach() for k in ("feature_acts", "sae_out", "num_batches_not_active_after")}
    res.update({f"scalar_{k}": fwd[k].item() for k in ("loss", "l2_loss", "l1_loss", "l0_norm", "l1_norm",
                                                        "aux_loss")})
    for n in names:
        if p[n].grad is not None:
            res["grad_W_dec_raw" if n == "W_dec" else f"grad_{n}"] = p[n].grad.clone()
    with torch.no_grad():
        unit = p["W_dec"] / p["W_dec"].norm(dim=-1, keepdim=True)
        p["W_dec"].grad -= (p["W_dec"].grad * unit).sum(-1, keepdim=True) * unit
        p["W_dec"].copy_(unit)
    res["grad_W_dec_projected"] = p["W_dec"].grad.clone()
    adam = meta["adam"]
    torch.optim.Adam(p.values(), lr=adam["lr"], betas=tuple(adam["betas"]), eps=adam["eps"]).step()
    for n in names:
        if p[n].grad is not None:  # the reference's TopK b_enc gets no gradient and no step
            res[f"{n}_after_step"] = p[n].detach().clone()
    return res


# ---------------------------------------------------------------- new steps: seeded inputs, like the files'

def generate_case(case: str, seed: int) -> tuple[dict, dict]:
    """Inputs drawn as the files' (x ~ 0.3 + 2·N(0,1), kaiming-uniform W_enc, W_dec its unit-row transpose,
    b_dec ~ 0.1·N(0,1), a quarter of the latents dead), a few latents steered to gradients near Adam's eps,
    every selection decided by more than float noise (`decision_margins`); then the reference's step."""
    arch = ARCH_OF[case]
    B, d, F, k = SHAPES[seed]
    meta = {"case": case, "B": B, "d": d, "F": F, "k": k if arch in ("topk", "batchtopk") else 0,
            "input_unit_norm": case.endswith("unitnorm"), "l1_coeff": {"relu": 0.01, "jumprelu": 0.002}.get(arch, 0.0),
            "top_k_aux": 16, "aux_penalty": 1 / 32, "n_batches_to_dead": 5, "bandwidth": 0.001,
            "adam": {"lr": 3e-4, "betas": [0.9, 0.99], "eps": 1e-8}}
    for attempt in range(100):  # redraw (deterministically) until no decision is within float noise
        gen = torch.Generator().manual_seed(1000 * seed + attempt)
        t = _draw(arch, B, d, F, gen)
        if (steered := _steer_near_eps(t, meta, arch)) and min(decision_margins(t, meta, arch).values()) > 1:
            meta["near_eps_latents"] = steered
            t.update(reference_step(t, meta, arch))
            meta.update({key: t.pop(key) for key in list(t) if key.startswith("scalar_")})  # as the files
            return t, meta
    raise AssertionError(f"no draw of {case} seed {seed} is free of near-ties")


def _draw(arch: str, B: int, d: int, F: int, gen: torch.Generator) -> dict:
    x = 0.3 + 2 * torch.randn(B, d, generator=gen)
    W_enc = (2 * torch.rand(d, F, generator=gen) - 1) * math.sqrt(6 / F)
    t = {"x": x, "W_enc": W_enc, "W_dec": W_enc.T / W_enc.T.norm(dim=1, keepdim=True),
         "b_dec": 0.1 * torch.randn(d, generator=gen), "b_enc": torch.zeros(F)}
    counter = torch.zeros(F)
    counter[torch.randperm(F, generator=gen)[: F // 4]] = 10
    t["num_batches_not_active_before"] = counter
    if arch == "jumprelu":
        t["b_enc"] = 0.05 * torch.randn(F, generator=gen)
        t["log_threshold"] = (0.05 + 0.3 * torch.rand(F, generator=gen)).log()
    return t


def _steer_near_eps(t: dict, meta: dict, arch: str, n: int = 2, target: float = 5e-9) -> list[int]:
    """Make n live latents fire on a single token b and turn their decoder rows until ∂L/∂z_bf ≈ target:
    their W_enc column (= (x_b − b_dec)·∂L/∂z_bf) and b_enc then carry gradients of order Adam's eps,
    where float noise could flip a step (the loss here is ours: AuxK residual detached, L1 on ‖W_dec‖=1)."""
    B, d = meta["B"], meta["d"]
    if arch in ("relu", "jumprelu"):  # raise the threshold / lower b_enc until only the strongest token fires
        pre = reference_forward(t, meta, arch)["pre"].detach()
        for f in range(n):
            top2 = pre[:, f].topk(2).values
            if arch == "relu":
                t["b_enc"][f] -= (top2[0] + top2[1]) / 2
            else:
                t["log_threshold"][f] = ((top2[0] + top2[1]) / 2).log()
    acts = reference_forward(t, meta, arch)["feature_acts"].detach()
    live = t["num_batches_not_active_before"] < meta["n_batches_to_dead"]
    single = ((acts > 0).sum(0) == 1) & live
    latents = single.nonzero().flatten()[:n].tolist()
    if len(latents) < n:
        return []
    l1_term = meta["l1_coeff"] / B if arch == "relu" else 0.0  # ∂(l1·mean_b Σ_f f_bf)/∂z_bf
    for _ in range(3):  # the residual moves a little with the row: iterate to the fixed point
        fwd = reference_forward(t, meta, arch)
        for f in latents:
            b = int(fwd["feature_acts"][:, f].argmax())
            r = (fwd["xn"][b] - fwd["x_hat"][b]).detach().double()
            # ∂L/∂z_bf = 2/(B·d)·(x̂_b − x_b)·W_dec,f + l1_term = −2/(B·d)·c·|r| + l1_term
            c = (l1_term - target) * B * d / (2 * r.norm())
            r_hat = r / r.norm()
            w = t["W_dec"][f].double()
            w_perp = w - (w @ r_hat) * r_hat
            t["W_dec"][f] = (w_perp / w_perp.norm() * math.sqrt(1 - c**2) + c * r_hat).float()
    return latents


def decision_margins(t: dict, meta: dict, arch: str) -> dict[str, float]:
    """Every discrete decision of the step (ReLU sign, top-k boundaries, AuxK top-k, JumpReLU threshold and
    kernel edges), as its distance over the float32 noise it may carry: > 1 means two correct float32
    implementations (other BLAS, thread count or summation order) make the same decision.

    Noise of a length-n dot product with Σ|a_i·b_i| = S: |err| ≤ n·u·S in the worst case, and ≲ λ·√n·u·S
    with overwhelming probability for λ ≈ 10 (Higham & Mary 2019, probabilistic rounding error analysis); we
    take 16·√n·u·S. For a gap between two values the noises add."""
    fwd = reference_forward(t, meta, arch)
    xn, d = fwd["xn"].double(), meta["d"]
    x_in = xn if arch == "jumprelu" else xn - t["b_dec"].double()
    noise = 16 * math.sqrt(d + 1) * U32 * (x_in.abs() @ t["W_enc"].double().abs() + t["b_enc"].double().abs())
    pre = x_in @ t["W_enc"].double() + t["b_enc"].double() * (arch in ("relu", "jumprelu"))
    out = {}
    if arch == "relu":
        out["relu"] = (pre.abs() / noise).min().item()
    elif arch == "jumprelu":
        theta, bw = t["log_threshold"].double().exp(), meta["bandwidth"]
        out["threshold"] = ((pre - theta).abs() / noise).min().item()
        out["kernel_edges"] = (((pre - theta).abs() - bw / 2).abs() / noise).min().item()
    else:
        if arch == "batchtopk":
            out["topk"] = _gap(pre.flatten(), noise.flatten(), meta["k"] * meta["B"])
        else:
            out["topk"] = _gap(pre, noise, meta["k"])
        dead = fwd["num_batches_not_active_after"] >= meta["n_batches_to_dead"]
        out["auxk"] = _gap(pre[:, dead], noise[:, dead], min(meta["top_k_aux"], int(dead.sum())))
    return out


def _gap(pre, noise, k: int) -> float:
    """Distance between the k-th and (k+1)-th largest values of each row (and of the k-th from 0 when
    ReLU decides it), over their summed noise."""
    if k >= pre.shape[-1]:  # everything is kept: only the signs decide
        return (pre.abs() / noise).min().item()
    vals, idx = pre.topk(k + 1, dim=-1)
    nz = noise.gather(-1, idx)
    gap = (vals[..., k - 1] - vals[..., k]) / (nz[..., k - 1] + nz[..., k])
    gap = torch.where(vals[..., k - 1] > 0, gap, math.inf)  # below 0 both are ReLU'd to 0: no decision
    zero = (vals.abs() / nz).min(-1).values  # kept or first-dropped value against ReLU's 0
    return min(gap.min().item(), zero.min().item())
