"""The sparse training path of the TopK family: only the encoder forward is dense.

A TopK-family step keeps n = k·B entries of the [B, F] pre-activation matrix. The dense path then multiplies
[B, F] matrices that are almost all zeros three more times (decoder forward, decoder and encoder weight
gradients): about 10·B·d·F FLOPs a step. Here the kept entries are a list of (row, col) pairs, sorted
row-major, and everything after the encoder GEMM costs O(n·d):

    vals_N  = gather_pre(pre_BF, x_BD, W_enc, b_enc, b_dec, rows, cols)   # grads: W_enc, b_enc, b_dec
    x̂_BD    = sparse_decode(vals_N, W_dec, rows, cols, B)                  # grads: vals, W_dec

Both are autograd Functions built on CSR matrix products (torch.sparse.mm, torch.sparse.sampled_addmm),
tested equal to the dense path in tests/test_sparse.py.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

# CSR products are stable in every torch this project supports; the "beta" notice is noise in a training log.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def csr(rows_N: Tensor, cols_N: Tensor, vals_N: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR matrix from entries sorted by row (then column), without duplicates."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows_N.device)
    crow[1:] = torch.bincount(rows_N, minlength=shape[0]).cumsum(0)
    return torch.sparse_csr_tensor(crow, cols_N, vals_N, shape, check_invariants=False)


def transposed_csr(rows_N: Tensor, cols_N: Tensor, vals_N: Tensor, shape: tuple[int, int]) -> Tensor:
    """The CSR matrix of the transpose ([F, B] from [B, F] entries)."""
    order = torch.argsort(cols_N * shape[0] + rows_N)
    return csr(cols_N[order], rows_N[order], vals_N[order], (shape[1], shape[0]))


def split_flat(flat_N: Tensor, F: int) -> tuple[Tensor, Tensor]:
    """Sorted flat indices row*F + col -> (rows, cols)."""
    return torch.div(flat_N, F, rounding_mode="floor"), flat_N % F


class _GatherPre(torch.autograd.Function):
    """vals_n = pre[rows_n, cols_n] where pre = (x − b_dec) W_enc + b_enc, with the gradient of that formula.

    pre_BF is computed outside (densely, without a graph); only the n kept entries get a gradient:
    dW_enc = (x − b_dec)ᵀ S, db_enc = Σ_b S, db_dec = −W_enc (Σ_b S)ᵀ, with S the sparse [B, F] gradient.
    The kept values come out in the weights' dtype: under bf16 autocast only the dense GEMM runs in bf16,
    the O(k·B·d) sparse products run in float32.
    """

    @staticmethod
    def forward(ctx, pre_BF, x_in_BD, W_enc, b_enc, b_dec, rows_N, cols_N):
        ctx.save_for_backward(x_in_BD, W_enc, b_dec, rows_N, cols_N)
        return pre_BF[rows_N, cols_N].to(W_enc.dtype)

    @staticmethod
    def backward(ctx, g_N):
        x_in_BD, W_enc, b_dec, rows_N, cols_N = ctx.saved_tensors
        B, F = x_in_BD.shape[0], W_enc.shape[1]
        g_b_enc_F = torch.zeros(F, dtype=g_N.dtype, device=g_N.device).index_add_(0, cols_N, g_N)
        g_W_enc = g_b_dec = None
        if ctx.needs_input_grad[2]:
            x_c_BD = (x_in_BD - b_dec if b_dec is not None else x_in_BD).to(g_N.dtype)
            g_W_enc = torch.sparse.mm(transposed_csr(rows_N, cols_N, g_N, (B, F)), x_c_BD).T
        if b_dec is not None and ctx.needs_input_grad[4]:
            g_b_dec = -(W_enc @ g_b_enc_F)
        return None, None, g_W_enc, g_b_enc_F, g_b_dec, None, None


class _SparseDecode(torch.autograd.Function):
    """x̂_BD = S W_dec with S the sparse [B, F] matrix of (rows, cols, vals) (no b_dec).

    d vals_n = (g W_decᵀ)[rows_n, cols_n] (sampled_addmm: only the kept entries); d W_dec = Sᵀ g.
    """

    @staticmethod
    def forward(ctx, vals_N, W_dec, rows_N, cols_N, B):
        S = csr(rows_N, cols_N, vals_N, (B, W_dec.shape[0]))
        ctx.save_for_backward(vals_N, W_dec, rows_N, cols_N)
        ctx.B = B
        return torch.sparse.mm(S, W_dec)

    @staticmethod
    def backward(ctx, g_BD):
        vals_N, W_dec, rows_N, cols_N = ctx.saved_tensors
        B, F = ctx.B, W_dec.shape[0]
        g_vals = g_W_dec = None
        g_BD = g_BD.contiguous()
        if ctx.needs_input_grad[0]:
            pattern = csr(rows_N, cols_N, torch.ones_like(vals_N), (B, F))
            g_vals = torch.sparse.sampled_addmm(pattern, g_BD, W_dec.T, beta=0.0).values()
        if ctx.needs_input_grad[1]:
            g_W_dec = torch.sparse.mm(transposed_csr(rows_N, cols_N, vals_N, (B, F)), g_BD)
        return g_vals, g_W_dec, None, None, None


def gather_pre(pre_BF: Tensor, x_in_BD: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None,
               rows_N: Tensor, cols_N: Tensor) -> Tensor:
    """The kept pre-activations with their encoder gradient (b_dec=None: b_dec not subtracted)."""
    return _GatherPre.apply(pre_BF, x_in_BD, W_enc, b_enc, b_dec, rows_N, cols_N)


def sparse_decode(vals_N: Tensor, W_dec: Tensor, rows_N: Tensor, cols_N: Tensor, B: int) -> Tensor:
    with torch.autocast(W_dec.device.type, enabled=False):  # sparse products in the weights' dtype (float32)
        return _SparseDecode.apply(vals_N, W_dec, rows_N, cols_N, B)


def densify(rows_N: Tensor, cols_N: Tensor, vals_N: Tensor, shape: tuple[int, int]) -> Tensor:
    out = torch.zeros(shape, dtype=vals_N.dtype, device=vals_N.device)
    out[rows_N, cols_N] = vals_N
    return out


# ---------------------------------------------------------------- selections as sorted flat indices

def topk_flat(acts_BF: Tensor, k: int) -> Tensor:
    """Flat indices of each row's k largest entries (TopK), sorted."""
    idx_BK = acts_BF.topk(k, dim=-1, sorted=False).indices
    rows = torch.arange(acts_BF.shape[0], device=acts_BF.device)[:, None] * acts_BF.shape[1]
    return (rows + idx_BK).flatten().sort().values


def batch_topk_flat(acts_BF: Tensor, n_keep: int) -> Tensor:
    """Flat indices of the n_keep largest entries of the whole matrix (BatchTopK), sorted.

    A full top-k over B·F entries is slow (it sorts its output), so a strided sample first estimates a value
    that at most ~2·n_keep entries exceed; the exact top-k then runs over those candidates only. If the
    estimate leaves fewer than n_keep candidates, it falls back to the full top-k. The kept set is the same
    as `acts_BF.flatten().topk(n_keep)` (up to ties at the boundary, measure zero for continuous values).
    """
    flat = acts_BF.flatten()
    n = flat.numel()
    stride = max(1, n // (1 << 18))
    sample = flat[::stride]
    if n_keep * 8 < n and sample.numel() > 1000:
        q = 1.0 - 2.0 * n_keep / n  # about twice the entries needed lie above this quantile
        threshold = sample.float().quantile(q).to(flat.dtype)
        candidates = (flat > threshold).nonzero().squeeze(1)
        if candidates.numel() >= n_keep:
            return candidates[flat[candidates].topk(n_keep, sorted=False).indices].sort().values
    return flat.topk(n_keep, sorted=False).indices.sort().values


def mask_flat(mask_BF: Tensor) -> Tensor:
    return mask_BF.flatten().nonzero().squeeze(1)
