"""The sparse training path of the TopK family: only the encoder forward is dense.

A TopK-family step keeps n = k·B entries of the [B, F] pre-activation matrix. The dense path then multiplies
[B, F] matrices that are almost all zeros three more times (decoder forward, decoder and encoder weight
gradients): about 10·B·d·F FLOPs a step. Here the kept entries are a list of (row, col) pairs, sorted
row-major, and everything after the encoder GEMM costs O(n·d):

    sel     = Selection(flat_indices_N, (B, F))
    vals_N  = gather_pre(pre_BF, x_BD, W_enc, b_enc, b_dec, sel)   # grads: W_enc, b_enc, b_dec
    x̂_BD    = sparse_decode(vals_N, W_dec, sel)                     # grads: vals, W_dec

Both are autograd Functions built on CSR matrix products (torch.sparse.mm, torch.sparse.sampled_addmm),
tested equal to the dense path in tests/test_sparse.py.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

# CSR products are stable in every torch this project supports; the "beta" notice is noise in a training log.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class Selection:
    """The kept entries of a [B, F] matrix, sorted row-major, and the CSR index arrays built from them once
    per step: the row-major ones (decoder forward, value gradient) and the column-major ones (both weight
    gradients), shared by every product of the step."""

    def __init__(self, flat_N: Tensor, shape: tuple[int, int]):
        B, F = shape
        self.shape = shape
        self.rows = torch.div(flat_N, F, rounding_mode="floor")
        self.cols = flat_N % F
        self.crow = _crow(self.rows, B)
        self._t: tuple[Tensor, Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def matrix(self, vals_N: Tensor) -> Tensor:
        """The [B, F] CSR matrix with these values."""
        return torch.sparse_csr_tensor(self.crow, self.cols, vals_N, self.shape, check_invariants=False)

    def transposed(self, vals_N: Tensor) -> Tensor:
        """The [F, B] CSR matrix of the transpose with these values."""
        if self._t is None:
            order = torch.argsort(self.cols * self.shape[0] + self.rows)
            self._t = (order, _crow(self.cols[order], self.shape[1]), self.rows[order])
        order, crow, col = self._t
        return torch.sparse_csr_tensor(crow, col, vals_N[order], self.shape[::-1], check_invariants=False)


def _crow(sorted_rows_N: Tensor, n_rows: int) -> Tensor:
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=sorted_rows_N.device)
    crow[1:] = torch.bincount(sorted_rows_N, minlength=n_rows).cumsum(0)
    return crow


class _GatherPre(torch.autograd.Function):
    """vals_n = pre[rows_n, cols_n] where pre = (x − b_dec) W_enc + b_enc, with the gradient of that formula.

    pre_BF is computed outside (densely, without a graph); only the n kept entries get a gradient:
    dW_enc = (x − b_dec)ᵀ S, db_enc = Σ_b S, db_dec = −W_enc (Σ_b S)ᵀ, with S the sparse [B, F] gradient.
    The kept values come out in the weights' dtype: under bf16 autocast only the dense GEMM runs in bf16,
    the O(k·B·d) sparse products run in float32.
    """

    @staticmethod
    def forward(ctx, pre_BF, x_in_BD, W_enc, b_enc, b_dec, sel):
        ctx.save_for_backward(x_in_BD, W_enc, b_dec)
        ctx.sel = sel
        return pre_BF[sel.rows, sel.cols].to(W_enc.dtype)

    @staticmethod
    def backward(ctx, g_N):
        x_in_BD, W_enc, b_dec = ctx.saved_tensors
        sel = ctx.sel
        g_b_enc_F = torch.zeros(sel.shape[1], dtype=g_N.dtype, device=g_N.device).index_add_(0, sel.cols, g_N)
        g_W_enc = g_b_dec = None
        if ctx.needs_input_grad[2]:
            x_c_BD = (x_in_BD - b_dec if b_dec is not None else x_in_BD).to(g_N.dtype)
            g_W_enc = torch.sparse.mm(sel.transposed(g_N), x_c_BD).T
        if b_dec is not None and ctx.needs_input_grad[4]:
            g_b_dec = -(W_enc @ g_b_enc_F)
        return None, None, g_W_enc, g_b_enc_F, g_b_dec, None


class _SparseDecode(torch.autograd.Function):
    """x̂_BD = S W_dec with S the sparse [B, F] matrix of the selection's values (no b_dec).

    d vals_n = (g W_decᵀ)[rows_n, cols_n] (sampled_addmm: only the kept entries); d W_dec = Sᵀ g.
    """

    @staticmethod
    def forward(ctx, vals_N, W_dec, sel):
        ctx.save_for_backward(vals_N, W_dec)
        ctx.sel = sel
        return torch.sparse.mm(sel.matrix(vals_N), W_dec)

    @staticmethod
    def backward(ctx, g_BD):
        vals_N, W_dec = ctx.saved_tensors
        sel = ctx.sel
        g_vals = g_W_dec = None
        g_BD = g_BD.contiguous()
        if ctx.needs_input_grad[0]:
            g_vals = torch.sparse.sampled_addmm(sel.matrix(torch.ones_like(vals_N)), g_BD, W_dec.T, beta=0.0).values()
        if ctx.needs_input_grad[1]:
            g_W_dec = torch.sparse.mm(sel.transposed(vals_N), g_BD)
        return g_vals, g_W_dec, None


def gather_pre(pre_BF: Tensor, x_in_BD: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None,
               sel: Selection) -> Tensor:
    """The kept pre-activations with their encoder gradient (b_dec=None: b_dec not subtracted)."""
    return _GatherPre.apply(pre_BF, x_in_BD, W_enc, b_enc, b_dec, sel)


def sparse_decode(vals_N: Tensor, W_dec: Tensor, sel: Selection) -> Tensor:
    with torch.autocast(W_dec.device.type, enabled=False):  # sparse products in the weights' dtype (float32)
        return _SparseDecode.apply(vals_N, W_dec, sel)


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
        # about twice the entries needed lie above the sample's m-th largest value (kthvalue: a selection,
        # not a sort; torch.quantile sorts and costs more than the whole selection it is meant to speed up)
        m = max(1, int(2 * n_keep / n * sample.numel()))
        threshold = sample.kthvalue(sample.numel() - m).values
        candidates = (flat > threshold).nonzero().squeeze(1)
        if candidates.numel() >= n_keep:
            return candidates[flat[candidates].topk(n_keep, sorted=False).indices].sort().values
    return flat.topk(n_keep, sorted=False).indices.sort().values


def mask_flat(mask_BF: Tensor) -> Tensor:
    return mask_BF.flatten().nonzero().squeeze(1)
