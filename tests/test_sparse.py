"""The sparse training path (sae_common/sparse.py) equals the dense reference path, value for value."""

from __future__ import annotations

import pytest
import torch

from sae_cache.sae_common.architectures import ARCHS
from sae_cache.sae_common.sae import SAE, SAEConfig
from sae_cache.sae_common.sparse import (SPARSE_MAX_DENSITY, Selection, batch_topk_flat, densify, gather_columns,
                                         gather_pre, gathered_dot, nonzero_flat, sample_stride, sampled_dot,
                                         sparse_decode, sparse_pays, topk_flat, transpose)

SPARSE_ARCHS = [name for name, arch in ARCHS.items() if arch.select is not None]
ACTIVE_ARCHS = [name for name, arch in ARCHS.items() if arch.active is not None]
B, D, F, K = 64, 16, 96, 4


def test_batch_topk_flat_with_ties_at_the_boundary_keeps_exactly_n_keep():
    """40 entries tied at the n_keep-th largest value: the candidates at or above it are more than n_keep, and the
    selection falls back to a top-k among them."""
    n_keep = 512 * 4
    acts = torch.randn(512, 2048, generator=torch.Generator().manual_seed(10))
    order = acts.flatten().argsort(descending=True)
    acts.view(-1)[order[n_keep - 20:n_keep + 20]] = acts.flatten()[order[n_keep - 1]].item()
    fast = batch_topk_flat(acts, n_keep)
    assert len(fast) == n_keep and bool((fast[1:] > fast[:-1]).all())
    want = acts.flatten().topk(n_keep).values.sort().values
    assert torch.equal(acts.flatten()[fast].sort().values, want)


def test_every_topk_family_architecture_has_the_sparse_path():
    assert set(SPARSE_ARCHS) == {"topk", "batchtopk", "feature_choice", "mutual_choice",
                                 "matryoshka_batchtopk"}
    assert set(ACTIVE_ARCHS) == {"relu", "jumprelu"}  # and the others, when sparse enough


@pytest.mark.parametrize("shape,n_keep", [((4096, 3000), 4096 * 8), ((64, 96), 256), ((7, 5), 30), ((512, 2048), 512)])
def test_batch_topk_flat_equals_the_naive_full_topk(shape, n_keep):
    acts = torch.randn(shape, generator=torch.Generator().manual_seed(0)).relu()  # half zeros, like relu(pre)
    naive = acts.flatten().topk(n_keep).indices.sort().values
    fast = batch_topk_flat(acts, n_keep)
    # n_keep distinct sorted indices holding the same values as the naive top-k. Not the same indices: 12M
    # float32 normals hold exact ties (some seeds put one at the boundary), and zeros fill in when fewer
    # than n_keep are positive; which of equal values is kept is arbitrary and changes nothing downstream.
    assert len(fast) == n_keep and bool((fast[1:] > fast[:-1]).all())
    assert torch.equal(acts.flatten()[fast].sort().values, acts.flatten()[naive].sort().values)
    boundary = acts.flatten().topk(n_keep + 1).values[-2:]
    if boundary[0] > boundary[1]:
        assert torch.equal(fast, naive)  # without ties at the boundary, the very same entries


def test_batch_topk_flat_at_a_small_k_over_f_finds_enough_candidates_without_falling_back(monkeypatch):
    """k=2 of 65536 latents: the threshold's sample grows with F/k, so the candidates above it are enough (a fixed
    2^18 samples left ~12 above the threshold, and the count fell short, into the full top-k, ~1 run in 8)."""
    real_topk = torch.Tensor.topk

    def topk_only_over_candidates(t, k, *args, **kwargs):
        assert t.numel() < 10 * k, f"a top-k over {t.numel()} entries: the selection fell back to the full top-k"
        return real_topk(t, k, *args, **kwargs)

    for seed in range(8):
        acts = torch.randn(256, 65536, generator=torch.Generator().manual_seed(seed))
        want = acts.flatten().topk(512).indices.sort().values
        monkeypatch.setattr(torch.Tensor, "topk", topk_only_over_candidates)
        fast = batch_topk_flat(acts, 512)
        monkeypatch.setattr(torch.Tensor, "topk", real_topk)
        assert torch.equal(fast, want)


def test_topk_flat_equals_per_row_topk():
    acts = torch.randn(33, 50, generator=torch.Generator().manual_seed(1))
    sel = Selection(topk_flat(acts, 5), acts.shape)
    rows, cols = sel.rows, sel.cols
    expected = torch.zeros_like(acts, dtype=torch.bool).scatter(1, acts.topk(5, dim=1).indices, True)
    assert torch.equal(densify(rows, cols, torch.ones(len(rows)), acts.shape).bool(), expected)


@pytest.mark.parametrize("arch", SPARSE_ARCHS)
def test_selection_is_what_the_dense_activation_keeps(arch):
    sae = SAE(SAEConfig(d_in=D, d_sae=F, arch=arch, k=K))
    pre = torch.randn(B, F, generator=torch.Generator().manual_seed(2))
    dense = sae.arch.activation(sae, pre)
    sel = Selection(sae.arch.select(sae, pre), (B, F))
    assert torch.equal(densify(sel.rows, sel.cols, pre[sel.rows, sel.cols].relu(), (B, F)), dense)


def _dense_loss(x, W_enc, b_enc, b_dec, W_dec, target, keep, absolute=False):
    """The dense path's loss; absolute=True runs the same products on |inputs| with every sign made to add
    (ReLU replaced by its mask `keep`), which gives, entry for entry, Σ|terms| of every sum in it."""
    if absolute:  # differentiate wrt the absolute values themselves (leaves), not through abs()
        return ((((x.abs() + b_dec) @ W_enc + b_enc) * keep) @ W_dec + target.abs()).pow(2).sum()
    return (((((x - b_dec) @ W_enc + b_enc).relu() * keep) @ W_dec) - target).pow(2).sum()


def test_sparse_kernels_have_the_dense_gradients():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, D, generator=g)
    W_enc, b_enc, b_dec = (torch.randn(*s, generator=g, requires_grad=True) for s in ((D, F), (F,), (D,)))
    W_dec = torch.randn(F, D, generator=g, requires_grad=True)
    with torch.no_grad():
        pre = (x - b_dec) @ W_enc + b_enc
    sel = Selection(batch_topk_flat(pre.relu(), B * K), (B, F))
    rows, cols = sel.rows, sel.cols
    target = torch.randn(B, D, generator=g)
    sparse_out = sparse_decode(gather_pre(pre, x, W_enc, b_enc, b_dec, sel).relu(), W_dec, sel)
    (sparse_out - target).pow(2).sum().backward()
    sparse_grads = [p.grad.clone() for p in (W_enc, b_enc, b_dec, W_dec)]
    params = (W_enc, b_enc, b_dec, W_dec)
    mask = densify(rows, cols, torch.ones(len(rows)), (B, F)).bool()
    dense_grads = torch.autograd.grad(_dense_loss(x, W_enc, b_enc, b_dec, W_dec, target, mask), params)
    # Both paths are chains of products with inner lengths D, F, D and B: each result is within
    # γ_n·(the same chain on absolute values) of the exact one, n = 2D + F + B (Higham, §3.5), and two such
    # results within twice that. A fixed atol is not: these gradients reach ~1e2 and cancel to ~1e-2.
    keep = (mask & (pre > 0)).float()
    abs_params = [p.detach().abs().requires_grad_() for p in params]
    abs_grads = torch.autograd.grad(_dense_loss(x, *abs_params, target, keep, absolute=True), abs_params)
    n = 2 * D + F + B
    gamma = n * 2.0 ** -24 / (1 - n * 2.0 ** -24)
    Wa_enc, ba_enc, ba_dec, Wa_dec = (p.detach().abs() for p in params)
    dense_out = (pre.relu() * mask) @ W_dec.detach()
    out_scale = (((x.abs() + ba_dec) @ Wa_enc + ba_enc) * keep) @ Wa_dec
    assert ((sparse_out.detach() - dense_out).abs() <= 2 * gamma * out_scale).all()
    for name, got, want, scale in zip(("W_enc", "b_enc", "b_dec", "W_dec"), sparse_grads, dense_grads, abs_grads):
        assert ((got - want).abs() <= 2 * gamma * scale).all(), name
        # not vacuous: the bound is far below the gradients themselves
        assert (2 * gamma * scale).max() < 1e-2 * want.abs().max(), name


def _steps(arch: str, sparse: bool, input_norm: str, aux_k: int = 8, n_steps: int = 6) -> SAE:
    torch.manual_seed(0)
    # dead_tokens small: latents die within the run, so the auxiliary loss is exercised on both paths. One
    # batch, not two: with 2·B some seeds leave only 13 dead latents, too few for aux_k=1's sparse branch
    # (16·aux_k); with B, 20 seeds gave 25 to 32 for topk and batchtopk.
    sae = SAE(SAEConfig(d_in=D, d_sae=F, arch=arch, k=K, input_norm=input_norm, dead_tokens=B, aux_k=aux_k))
    sae.sparse_training = sparse
    g = torch.Generator().manual_seed(4)
    mix = torch.randn(D, D, generator=g)
    data = [torch.randn(B, D, generator=g) @ mix + 2 for _ in range(n_steps)]
    if input_norm == "scalar":
        sae.set_input_scale(data[0])
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.9, 0.99))
    sae.train()
    for x in data:
        opt.zero_grad()
        out = sae(x)
        out.loss.backward()
        sae.constrain_decoder()
        opt.step()
    sae.last_out = out
    return sae


@pytest.mark.parametrize("input_norm,aux_k", [("scalar", 8), ("standardize", 8), ("scalar", 1)])
@pytest.mark.parametrize("arch", SPARSE_ARCHS)
def test_training_steps_on_both_paths_give_the_same_sae(arch, input_norm, aux_k, monkeypatch):
    """aux_k=8: each token keeps 8 of its ~25-32 candidates, too many for the sparse path's auxiliary loss,
    which runs dense on the candidates' columns; aux_k=1: one each (under 5% of them), and it runs sparse too."""
    import sae_cache.sae_common.sae as sae_module

    dense_aux_calls = []
    gather = sae_module.gather_columns
    monkeypatch.setattr(sae_module, "gather_columns", lambda *a: dense_aux_calls.append(1) or gather(*a))
    dense = _steps(arch, False, input_norm, aux_k)
    assert not dense_aux_calls  # the dense path has its columns already
    sparse = _steps(arch, True, input_norm, aux_k)
    assert sparse.last_out.acts is None and dense.last_out.acts is not None  # the paths really differ
    n_candidates = int((sparse.arch.aux_weights(sparse) > 0).sum())
    assert aux_k / n_candidates > SPARSE_MAX_DENSITY if aux_k == 8 else 1 / n_candidates <= SPARSE_MAX_DENSITY
    assert bool(dense_aux_calls) == (aux_k == 8), n_candidates  # each branch of the sparse path's aux is covered
    assert dense.last_out.aux.item() > 0  # the auxiliary loss (dead or, for aux_zipf, under-used latents) took part
    for name in ("loss", "mse", "aux", "l0"):
        torch.testing.assert_close(getattr(sparse.last_out, name), getattr(dense.last_out, name), atol=1e-5, rtol=1e-4)
    for (name, a), (_, b) in zip(sparse.state_dict().items(), dense.state_dict().items()):
        if a.is_floating_point():
            # NaN is a value here: theta_window holds NaN for a latent that kept nothing in a batch (with
            # some seeds one does, on both paths alike)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, equal_nan=True, msg=name)
        else:
            assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", SPARSE_ARCHS)
def test_sparse_path_on_cuda_equals_dense(arch):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=64, d_sae=512, arch=arch, k=8, input_norm="none")).cuda().train()
    x = torch.randn(256, 64, device="cuda")
    outs = {}
    for sparse in (False, True):
        sae.sparse_training = sparse
        sae.zero_grad()
        out = sae(x)
        out.loss.backward()
        outs[sparse] = (out.loss.detach(), sae.W_enc.grad.clone(), sae.W_dec.grad.clone())
    for a, b in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------- relu and jumprelu: sparse when sparse enough

def _active_sae(arch: str, dtype=torch.float32) -> SAE:
    torch.manual_seed(0)
    # θ = 0.5 and ε = 0.4: many pre-activations fall within ε/2 below θ, where only the θ gradient (of the
    # activation and of the L0 step) reaches them; input_norm none keeps b_dec in the encoder's gradient
    sae = SAE(SAEConfig(d_in=D, d_sae=F, arch=arch, input_norm="none", l1_coeff=0.3, l0_coeff=0.3,
                        jumprelu_init_threshold=0.5, bandwidth=0.4)).to(dtype)
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(5))
    return sae.train()


def _one_step(arch: str, sparse: bool, x: torch.Tensor):
    sae = _active_sae(arch, x.dtype)
    sae.sparse_training, sae.sparse_max_density = sparse, 1.0  # sparse=True: whatever the density
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    out = sae(x)
    assert (out.acts is None) == sparse  # the path asked for is the path taken
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.constrain_decoder()
    opt.step()
    return out, grads, sae


@pytest.mark.parametrize("arch", ACTIVE_ARCHS)
def test_relu_and_jumprelu_sparse_step_equals_dense(arch):
    """Loss terms (the penalty included), every parameter's gradient and the Adam step, sparse vs dense. In
    float64, where both paths' sums (orders differ, lengths <= B·F) round at n·2^-53 of the sums of absolute
    terms: 1e-9 of the largest entry leaves room for cancellation ~1e4 deep, far beyond what these sums have,
    yet any wrong or missing term (a gradient ~1e-2 or more) fails it."""
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2
    (dense, g_dense, sae_dense), (sparse, g_sparse, sae_sparse) = (_one_step(arch, s, x) for s in (False, True))
    pre = _active_sae(arch, x.dtype).pre_activations(x).detach()  # the weights both steps started from
    if arch == "jumprelu":  # the θ gradient from entries within ε/2 below θ = 0.5 is exercised
        assert ((pre < 0.5) & (pre > 0.5 - 0.2)).sum() > 10
    assert 0.2 < (pre > 0).double().mean() < 0.8  # not trivially sparse: the sparse path keeps many entries
    assert dense.penalty.item() > 0.01 * dense.loss.item()
    for name in ("loss", "recon", "mse", "penalty", "l0"):
        torch.testing.assert_close(getattr(sparse, name), getattr(dense, name), rtol=1e-9, atol=0, msg=name)
    assert set(g_sparse) == set(g_dense) and len(g_dense) == (5 if arch == "jumprelu" else 4)
    for name, g in g_dense.items():
        assert g.abs().max() > 1e-3, name  # every parameter gets a real gradient
        torch.testing.assert_close(g_sparse[name], g, rtol=0, atol=1e-9 * g.abs().max().item(), msg=name)
    for (name, a), (_, b) in zip(sae_sparse.state_dict().items(), sae_dense.state_dict().items()):
        # Adam divides by sqrt(v) + eps: a gradient difference δ moves the first step by at most lr·δ/eps
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * 1e-9 * 1e8, msg=name)


def _decided(arch: str, shift: float, **kw) -> bool:
    """Whether a training step took the sparse path when b_enc is moved by `shift`."""
    sae = _active_sae(arch)
    for key, value in kw.items():
        setattr(sae, key, value)
    with torch.no_grad():
        sae.b_enc.add_(shift)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(7))
    active = sae.arch.active(sae, sae.pre_activations(x).detach())
    out = sae(x)
    assert 0 < active.sum() < active.numel()
    assert (out.acts is None) == (sae.sparse_training and
                                  sparse_pays(int(active.sum()), active.numel(), sae.sparse_max_density))
    return out.acts is None


@pytest.mark.parametrize("arch", ACTIVE_ARCHS)
def test_each_step_takes_the_path_its_density_pays_for(arch):
    assert not _decided(arch, 0.0)  # at init about half the entries are active: dense
    assert _decided(arch, -2.0)  # a few: sparse
    assert not _decided(arch, -2.0, sparse_training=False)  # the dense reference, forced
    assert _decided(arch, 0.0, sparse_max_density=1.0)  # sparse, forced


def test_sparse_pays_below_the_measured_density():
    assert sparse_pays(5, 100, 0.05) and not sparse_pays(6, 100, 0.05)
    assert 0 < SPARSE_MAX_DENSITY < 1


@pytest.mark.parametrize("n,density", [(4096 * 96, 0.01), (800, 0.5), (1000, 0.0), (1000, 1.0), (1001, 0.3)])
def test_nonzero_flat_equals_nonzero(n, density):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(5)) < density
    assert torch.equal(nonzero_flat(mask), mask.nonzero().squeeze(1))
    assert torch.equal(nonzero_flat(mask[1:]), mask[1:].nonzero().squeeze(1))  # not a multiple of 8 words


def test_blocked_transpose_equals_the_transpose():
    a = torch.randn(700, 33, generator=torch.Generator().manual_seed(6))  # 700: not a multiple of the block
    t = transpose(a, block=256)
    assert t.is_contiguous() and torch.equal(t, a.T)


def test_sampled_dot_equals_the_gathered_dot_products():
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(B, D, generator=g), torch.randn(F, D, generator=g)
    sel = Selection(batch_topk_flat(torch.randn(B, F, generator=g), B * K), (B, F))
    want = (a[sel.rows] * b[sel.cols]).sum(1)
    torch.testing.assert_close(sampled_dot(a, b, sel), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gathered_dot(a, b, sel, chunk=100), want, rtol=1e-5, atol=1e-5)  # the fallback


@pytest.mark.parametrize("n,row_length", [(4096 * 12288, 12288), (2048 * 16384, 16384), (100, 7), (10**6, 3 * 5 * 7)])
def test_the_threshold_sample_visits_every_column(n, row_length):
    stride = sample_stride(n, row_length)
    columns = torch.arange(0, n, stride) % row_length
    assert len(columns.unique()) == min(row_length, len(columns))


def test_gather_columns_has_the_recomputed_columns_gradients():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(B, D, generator=g)
    W_enc, b_enc, b_dec = (torch.randn(*s, generator=g, requires_grad=True) for s in ((D, F), (F,), (D,)))
    cand = torch.tensor([0, 5, 17, 40, 95])
    with torch.no_grad():
        pre = (x - b_dec) @ W_enc + b_enc
    weight = torch.randn(B, len(cand), generator=g)
    got = torch.autograd.grad((gather_columns(pre[:, cand], x, W_enc, b_enc, b_dec, cand) * weight).sum(),
                              (W_enc, b_enc, b_dec))
    recomputed = (x - b_dec) @ W_enc[:, cand] + b_enc[cand]
    want = torch.autograd.grad((recomputed * weight).sum(), (W_enc, b_enc, b_dec))
    for name, a, b in zip(("W_enc", "b_enc", "b_dec"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert got[0][:, 1].abs().max() == 0 and got[0][:, 5].abs().max() > 0  # only the candidates' columns
