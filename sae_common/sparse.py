"""The sparse training path of the TopK family: only the encoder forward is dense.

A TopK-family step keeps n = k·B entries of the [B, F] pre-activation matrix. The dense path then multiplies
[B, F] matrices that are almost all zeros three more times (decoder forward, decoder and encoder weight
gradients): about 10·B·d·F FLOPs a step. Here the kept entries are a list of (row, col) pairs, sorted
row-major, and everything after the encoder GEMM costs O(n·d):

    sel     = Selection(flat_indices_N, (B, F))
    vals_N  = gather_pre(pre_BF, x_BD, W_enc, b_enc, b_dec, sel)   # grads: W_enc, b_enc, b_dec
    x̂_BD    = sparse_decode(vals_N, W_dec, sel)                     # grads: vals, W_dec

Their forwards and weight gradients are bags of rows (torch's embedding_bag: a sparse-times-dense product in one
pass over the kept entries), the kept values' gradient a sampled dense product (torch.sparse.sampled_addmm);
all tested equal to the dense path in tests/test_sparse.py.

Where a BatchTopK step's time goes beside the encoder GEMM (bench/train_bench.py, 2-core CPU, float32), and
what each change here bought: the selection (one pass over B·F to find the candidates above a sampled
threshold, nonzero_flat reading 8 flags at a time), the sparse products, the encoder gradient's transpose
(blocked), the decoder constraint (blocked, in place; sae.py) and fused Adam. The README's "Where a training
step's time goes" has the figures (bench/step_profile.py).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor


class Selection:
    """The kept entries of a [B, F] matrix, sorted row-major, with the index arrays built from them once per
    step: row offsets (decoder forward and its gradients) and the column-major order (encoder gradient)."""

    def __init__(self, flat_N: Tensor, shape: tuple[int, int]):
        B, F = shape
        self.shape = shape
        self.flat = flat_N
        self.rows = torch.div(flat_N, F, rounding_mode="floor")
        self.cols = flat_N % F
        self.offsets = _offsets(self.rows, B)
        self._t: tuple[Tensor, Tensor, Tensor] | None = None

    def subset(self, keep_N: Tensor) -> "Selection":
        """The kept entries where keep_N is True (still sorted row-major)."""
        return Selection(self.flat[keep_N], self.shape)

    def by_column(self) -> tuple[Tensor, Tensor, Tensor]:
        """(order, rows in column-major order, column offsets): the transpose, computed once."""
        if self._t is None:
            # rows ascend within each column already: a stable sort by column (1.6x faster than sorting col·B + row)
            order = torch.argsort(self.cols, stable=True)
            cols = self.cols.index_select(0, order)
            self._t = (order, self.rows.index_select(0, order), _offsets(cols, self.shape[1]))
        return self._t


def _offsets(sorted_ids_N: Tensor, n_bags: int) -> Tensor:
    """Start of each bag (row) in a sorted index list: embedding_bag's `offsets`, CSR's crow without its end."""
    counts = torch.bincount(sorted_ids_N, minlength=n_bags)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])


def bag_sum(table_RD: Tensor, ids_N: Tensor, offsets: Tensor, weights_N: Tensor) -> Tensor:
    """out[j] = Σ_{n in bag j} weights_n · table[ids_n]: a sparse [bags, R] matrix times a dense [R, D] one.
    embedding_bag does it in one pass over the kept entries, with its own sparse backward (and measured
    ~3x faster than a CSR torch.sparse.mm forward on CPU at the paper's shapes)."""
    return torch.nn.functional.embedding_bag(ids_N, table_RD, offsets, mode="sum", per_sample_weights=weights_N)


def _encoder_input(x_in_BD: Tensor, b_dec: Tensor | None) -> Tensor:
    """x − b_dec, what the encoder multiplies (x itself when b_dec is not subtracted): the encoder gradients'
    left factor."""
    return x_in_BD - b_dec if b_dec is not None else x_in_BD


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
        return pre_BF.view(-1).index_select(0, sel.flat).to(W_enc.dtype)

    @staticmethod
    def backward(ctx, g_N):
        x_in_BD, W_enc, b_dec = ctx.saved_tensors
        sel = ctx.sel
        g_b_enc_F = torch.zeros(sel.shape[1], dtype=g_N.dtype, device=g_N.device).index_add_(0, sel.cols, g_N)
        g_W_enc = g_b_dec = None
        if ctx.needs_input_grad[2]:
            x_c_BD = _encoder_input(x_in_BD, b_dec).to(g_N.dtype)
            order, rows_by_col, col_offsets = sel.by_column()
            g_FD = bag_sum(x_c_BD, rows_by_col, col_offsets, g_N.index_select(0, order))
            g_W_enc = transpose(g_FD)  # [F, D] -> [D, F]
        if b_dec is not None and ctx.needs_input_grad[4]:
            g_b_dec = -(W_enc @ g_b_enc_F)
        return None, None, g_W_enc, g_b_enc_F, g_b_dec, None


class _GatherColumns(torch.autograd.Function):
    """pre[:, cand_C] where pre = (x − b_dec) W_enc + b_enc, from the columns of pre_BF the step already has (no
    graph), with the gradient of that formula: dW_enc[:, cand] = (x − b_dec)ᵀ G, db_enc[cand] = Σ_b G,
    db_dec = −W_enc[:, cand] Σ_b G.
    The auxiliary loss's candidate columns on the sparse path: recomputing them as (x − b_dec) W_enc[:, cand] +
    b_enc[cand] costs a [B, d] x [d, C] GEMM forward and another backward (through x − b_dec) that this avoids."""

    @staticmethod
    def forward(ctx, pre_BC, x_in_BD, W_enc, b_enc, b_dec, cand_C):
        ctx.save_for_backward(x_in_BD, W_enc, b_dec, cand_C)
        return pre_BC.to(W_enc.dtype)

    @staticmethod
    def backward(ctx, g_BC):
        x_in_BD, W_enc, b_dec, cand_C = ctx.saved_tensors
        g_C = g_BC.sum(0)
        g_b_enc = g_C.new_zeros(W_enc.shape[1]).index_copy_(0, cand_C, g_C)
        g_W_enc = g_b_dec = None
        if ctx.needs_input_grad[2]:
            x_c_BD = _encoder_input(x_in_BD, b_dec).to(g_BC.dtype)
            g_W_enc = torch.zeros_like(W_enc).index_copy_(1, cand_C, x_c_BD.T @ g_BC)
        if b_dec is not None and ctx.needs_input_grad[4]:
            g_b_dec = -(W_enc.index_select(1, cand_C) @ g_C)
        return None, None, g_W_enc, g_b_enc, g_b_dec, None


def gather_columns(pre_BC: Tensor, x_in_BD: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None,
                   cand_C: Tensor) -> Tensor:
    """The pre-activations pre_BC = pre_BF[:, cand_C] of the latents cand_C (sorted, distinct), already taken
    without a graph, given their encoder gradient (b_dec=None: b_dec not subtracted)."""
    return _GatherColumns.apply(pre_BC, x_in_BD, W_enc, b_enc, b_dec, cand_C)


def transpose(a_FD: Tensor, block: int = 256) -> Tensor:
    """a.T made contiguous, a block of rows at a time: each block's transpose stays in cache, measured 2x
    faster than one copy of the whole (~28 against ~55 ms at gemma-2-2b's [16384, 2304] on a 2-core CPU).
    Parameters keep their contiguous layout: fused Adam copies any other to contiguous and back, ~10x slower."""
    out = a_FD.new_empty(a_FD.shape[::-1])
    for lo in range(0, a_FD.shape[0], block):
        out[:, lo:lo + block].copy_(a_FD[lo:lo + block].T)
    return out


def gather_pre(pre_BF: Tensor, x_in_BD: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None,
               sel: Selection) -> Tensor:
    """The kept pre-activations with their encoder gradient (b_dec=None: b_dec not subtracted)."""
    return _GatherPre.apply(pre_BF, x_in_BD, W_enc, b_enc, b_dec, sel)


class _SparseDecode(torch.autograd.Function):
    """x̂_BD = S W_dec with S the sparse [B, F] matrix of the kept values vals_N, and its gradient:
    dvals_n = g[rows_n] · W_dec[cols_n] (a sampled dense product, SDDMM) and dW_dec = Sᵀ g (a bag of g's rows
    per latent, in the column order the encoder gradient uses too). embedding_bag's own backward gives the
    same; these are measured ~1.5-2x faster on CPU (bench/train_bench.py), and W_dec's gradient comes out
    in W_dec's layout."""

    @staticmethod
    def forward(ctx, vals_N, W_dec, sel):
        ctx.save_for_backward(vals_N, W_dec)
        ctx.sel = sel
        return bag_sum(W_dec, sel.cols, sel.offsets, vals_N)

    @staticmethod
    def backward(ctx, g_BD):
        vals_N, W_dec = ctx.saved_tensors
        sel = ctx.sel
        g_vals = g_W_dec = None
        if ctx.needs_input_grad[0]:
            g_vals = sampled_dot(g_BD, W_dec, sel)
        if ctx.needs_input_grad[1]:
            order, rows_by_col, col_offsets = sel.by_column()
            g_W_dec = bag_sum(g_BD.contiguous(), rows_by_col, col_offsets, vals_N.index_select(0, order))
        return g_vals, g_W_dec, None


def sampled_dot(a_BD: Tensor, b_FD: Tensor, sel: Selection) -> Tensor:
    """[n]: a[rows_n] · b[cols_n], the entries of a bᵀ at the selection only (torch.sparse.sampled_addmm: one
    pass over the kept entries, no [B, F] product). It runs on the transposed pattern, a latent at a time, so that
    each row of b is read once and the rows of a (the smaller matrix) are the ones gathered: measured 1.7x faster
    than row by row at the GPT-2 shape (11 against 20 ms, 2-core CPU; the same dot products)."""
    order, rows_by_col, col_offsets = sel.by_column()
    B, F = sel.shape
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        crow = torch.cat([col_offsets, col_offsets.new_full((1,), len(order))])
        pattern = torch.sparse_csr_tensor(crow, rows_by_col, a_BD.new_zeros(len(order)), (F, B),
                                          check_invariants=False)
        try:
            by_col = torch.sparse.sampled_addmm(pattern, b_FD, a_BD.T, beta=0.0).values()
        except (RuntimeError, NotImplementedError):  # a device or dtype without it (only the CPU is tested here)
            return gathered_dot(a_BD, b_FD, sel)
    return by_col.new_empty(len(order)).index_copy_(0, order, by_col)


def gathered_dot(a_BD: Tensor, b_FD: Tensor, sel: Selection, chunk: int = 1 << 16) -> Tensor:
    """sampled_dot by gathering the rows, `chunk` entries at a time (2·chunk·D floats of scratch)."""
    out = a_BD.new_empty(len(sel.cols))
    for lo in range(0, len(out), chunk):
        out[lo:lo + chunk] = torch.linalg.vecdot(a_BD[sel.rows[lo:lo + chunk]], b_FD[sel.cols[lo:lo + chunk]])
    return out


def sparse_decode(vals_N: Tensor, W_dec: Tensor, sel: Selection) -> Tensor:
    """x̂_BD = S W_dec (no b_dec), S the sparse [B, F] matrix of the kept values; gradients to vals and W_dec
    only at the kept entries and their rows (_SparseDecode)."""
    with torch.autocast(W_dec.device.type, enabled=False):  # sparse products in the weights' dtype (float32)
        return _SparseDecode.apply(vals_N.to(W_dec.dtype), W_dec, sel)


# The sparse path of an activation that keeps whatever is active (relu, jumprelu) pays below this fraction of
# active entries. Cost model: after the encoder GEMM the dense step runs 4 more [B, F] x [F, D] products,
# 8·B·F·d FLOPs at GEMM speed; the sparse one the selection (one pass over B·F, nonzero, a column sort) and
# 4 bags of n rows of d, 8·n·d FLOPs at gather speed, ~an order of magnitude slower per FLOP: they cross near
# n/(B·F) ~ 0.1. Measured (bench/train_bench.py --archs relu --batch 1024 --density X, 2-core CPU, busy):
# sparse/dense 1.5x at 0.01, 1.4x at 0.03, 1.2x at 0.05 and 0.07, 0.95x at 0.1; 0.05 leaves a margin.
SPARSE_MAX_DENSITY = 0.05


def sparse_pays(n_active: int, n_entries: int, max_density: float = SPARSE_MAX_DENSITY) -> bool:
    """Whether a step with n_active of n_entries (= B·F) active entries should take the sparse path."""
    return n_active <= max_density * n_entries


class Latents:
    """A batch's latents as the loss sees them, on either path: dense [B, F] (`acts_BF`), or the kept values
    of a Selection (`vals_N`, `sel`, and their pre-activations `pre_N` for penalties). Reconstruction losses
    call `decode`, so they are written once for both."""

    def __init__(self, acts_BF: Tensor | None = None, vals_N: Tensor | None = None, sel: Selection | None = None,
                 pre_N: Tensor | None = None):
        assert (acts_BF is None) != (sel is None) and (vals_N is None) == (sel is None), "dense or sparse, not both"
        self.acts_BF, self.vals_N, self.sel, self.pre_N = acts_BF, vals_N, sel, pre_N

    def decode(self, W_dec_FD: Tensor, lo: int = 0, hi: int | None = None) -> Tensor:
        """[B, D]: Σ_f f_bf · W_dec,f over the latents lo <= f < hi (all by default), without b_dec."""
        if self.acts_BF is not None:
            return self.acts_BF[:, lo:hi] @ W_dec_FD[lo:hi]
        if lo == 0 and (hi is None or hi >= self.sel.shape[1]):
            return sparse_decode(self.vals_N, W_dec_FD, self.sel)
        keep_N = (self.sel.cols >= lo) & (self.sel.cols < (self.sel.shape[1] if hi is None else hi))
        return sparse_decode(self.vals_N[keep_N], W_dec_FD, self.sel.subset(keep_N))

    def l0(self) -> Tensor:
        """Mean active latents per token (detached)."""
        if self.acts_BF is not None:
            return (self.acts_BF.detach() > 0).sum(-1).float().mean()
        return (self.vals_N.detach() > 0).sum().float() / self.sel.shape[0]


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


def sample_stride(n: int, row_length: int, size: int = 1 << 18) -> int:
    """A stride giving ~`size` samples of n flat entries, prime to the row length so that the sample visits
    every column (latent): 50M entries of 12288 latents at stride 192 would see only 64 of them."""
    stride = max(1, n // size)
    while math.gcd(stride, row_length) != 1:
        stride += 1
    return stride


# The BatchTopK threshold's sample: its m-th largest value has ~1.5·n_keep entries above it, and the count's
# relative spread is ~1/sqrt(m). m = 500: 4.5%, so too few candidates (the slow fall back) is a >7σ event.
SAMPLE_RANK = 500


def threshold_sample_size(n: int, n_keep: int) -> int:
    """How many of n entries to sample for the threshold of n_keep: enough for rank SAMPLE_RANK above it (at
    least 2^14; 131K of 50M at the GPT-2 shape; a fixed 2^18 was 2x more there and too few at small k/F)."""
    return min(n, max(1 << 14, math.ceil(SAMPLE_RANK * n / (1.5 * max(n_keep, 1)))))


def batch_topk_flat(acts_BF: Tensor, n_keep: int) -> Tensor:
    """Flat indices of the n_keep largest entries of the whole matrix (BatchTopK), sorted.

    A full top-k over B·F entries is slow (it sorts its output), so a strided sample first estimates a value
    that ~1.5·n_keep entries exceed; the exact top-k then runs over those candidates only. If the
    estimate leaves fewer than n_keep candidates, it falls back to the full top-k. The kept set is the same
    as `acts_BF.flatten().topk(n_keep)` (up to ties at the boundary, measure zero for continuous values).
    """
    flat = acts_BF.flatten()
    n = flat.numel()
    sample = flat[::sample_stride(n, acts_BF.shape[-1], threshold_sample_size(n, n_keep))]
    if n_keep * 8 < n and sample.numel() > 1000:
        # about 1.5 times the entries needed lie above the sample's m-th largest value (m ~ SAMPLE_RANK; too
        # few candidates falls back). kthvalue: a selection, not a sort; torch.quantile sorts and costs more than
        # the whole selection it is meant to speed up.
        m = max(1, int(1.5 * n_keep / n * sample.numel()))
        threshold = sample.kthvalue(sample.numel() - m).values
        candidates = nonzero_flat(flat > threshold)
        if candidates.numel() >= n_keep:
            # the n_keep-th largest candidate value, and the candidates at or above it: still sorted, no top-k and
            # sort of the kept indices (unless a tie there keeps more than n_keep)
            values = flat.index_select(0, candidates)
            kept = candidates[values >= values.kthvalue(values.numel() - n_keep + 1).values]
            if kept.numel() == n_keep:
                return kept
            return candidates[values.topk(n_keep, sorted=False).indices].sort().values
    return flat.topk(n_keep, sorted=False).indices.sort().values


def nonzero_flat(mask_N: Tensor) -> Tensor:
    """mask_N.nonzero() of a 1-d bool mask, for a sparse one: 8 flags at a time, read as one int64 word, then
    the flags of the words that hold any (a bool nonzero does one flag per step: ~1.5x slower at 1% set)."""
    if mask_N.numel() % 8 or mask_N.storage_offset() % 8 or not mask_N.is_contiguous():
        return mask_N.nonzero().squeeze(1)
    words_W = mask_N.view(torch.int64)
    set_W = words_W.nonzero().squeeze(1)
    word, flag = words_W.index_select(0, set_W).view(torch.uint8).view(-1, 8).nonzero(as_tuple=True)
    return set_W[word] * 8 + flag


def mask_flat(mask_BF: Tensor) -> Tensor:
    return nonzero_flat(mask_BF.flatten())
