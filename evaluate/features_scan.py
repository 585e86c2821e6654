"""The one streaming pass of `sae features` over held-out cache rows: per latent of every SAE, running statistics
(density, mean and max activation, an activation histogram) and a running top-N of context rows ranked by
their highest activation, with the activations and token ids of a window of tokens around it.

Memory is bounded whatever the number of tokens: per SAE, F × N × W window activations and tokens, F × H
histogram counts, and one batch's [B, T, F] activations; never a tokens × latents matrix.
Positions outside `keep_T` (BOS, as eval leaves it out) have their activation set to 0, so they count nowhere.

Shapes: B contexts in a batch, T context size, F latents, N contexts kept per latent, W window tokens, H bins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from sae_cache.sae_common.cache_format import Cache
from sae_cache.sae_common.sae import SAE

WINDOW_BEFORE, WINDOW_AFTER = 10, 5  # tokens shown around a context's highest activation
WINDOW = WINDOW_BEFORE + 1 + WINDOW_AFTER
HIST_BINS = 32  # a power of two, so that merging bins when the range doubles keeps every edge exact


def add_to_histogram(hist_FH: Tensor, range_F: Tensor, f_E: Tensor, value_E: Tensor, max_F: Tensor) -> None:
    """Count active entries (latent f_E, value_E > 0) into H equal bins over [0, range_F), both updated in place.

    range_F is the smallest power of two above every value seen (`max_F`, the running maximum including these
    values). When it grows by 2^d, each new bin is the sum of 2^d old ones: their edges nest exactly, so the
    counts always equal a histogram of all values seen over the current range (0 while a latent never fired).
    """
    H = hist_FH.shape[1]
    new_range_F = torch.where(max_F > 0, torch.ldexp(torch.ones_like(max_F), torch.frexp(max_F).exponent), 0.0)
    growth_F = torch.where(range_F > 0, torch.log2(new_range_F / range_F.clamp(min=1e-30)).round(), 0).long()
    for d in growth_F.unique().tolist():
        if d > 0:
            grown = growth_F == d
            factor = min(2**d, H)
            merged_GH = hist_FH[grown].reshape(-1, H // factor, factor).sum(-1)
            hist_FH[grown] = torch.cat([merged_GH, merged_GH.new_zeros(len(merged_GH), H - H // factor)], 1)
    # v / 2^e · H is exact (division by powers of two), so the bin is the same in any order of batches
    bins_E = (value_E / new_range_F[f_E] * H).long().clamp_(max=H - 1)
    hist_FH.view(-1).index_add_(0, f_E * H + bins_E, torch.ones_like(bins_E))
    range_F.copy_(new_range_F)


class LatentScan:
    """What one SAE accumulates over the scanned rows. Each batch is reduced to its E active entries first (E is
    about L0 per token): every statistic and each context's maximum are O(E) scatters, not passes over B·T·F."""

    def __init__(self, d_sae: int, top: int, device: str | torch.device = "cpu"):
        F, N = d_sae, top
        self.n_tokens = 0  # kept positions scanned
        self.value_FN = torch.zeros(F, N, device=device)  # a context's highest activation, best first; 0 = empty
        self.row_FN = torch.full((F, N), -1, dtype=torch.long, device=device)  # its cache row
        self.window_acts_FNW = torch.full((F, N, WINDOW), torch.nan, device=device)  # NaN: outside the context
        self.window_tokens_FNW = torch.full((F, N, WINDOW), -1, dtype=torch.int32, device=device)
        self.sum_F = torch.zeros(F, dtype=torch.float64, device=device)
        self.max_F = torch.zeros(F, device=device)
        self.hist_FH = torch.zeros(F, HIST_BINS, dtype=torch.long, device=device)
        self.hist_range_F = torch.zeros(F, device=device)

    @property
    def fired_F(self) -> Tensor:
        """Tokens each latent was active on: every active entry is counted in exactly one bin."""
        return self.hist_FH.sum(1)

    @torch.no_grad()
    def add(self, acts_BTF: Tensor, tokens_BT: Tensor, first_row: int, keep_T: Tensor) -> None:
        """A batch of whole contexts starting at cache row `first_row`. Takes `acts_BTF` over (zeroes BOS in it)."""
        B, T, F = acts_BTF.shape
        for t in (~keep_T).nonzero().flatten().tolist():  # a mask assignment would rewrite the whole tensor
            acts_BTF[:, t] = 0
        self.n_tokens += B * int(keep_T.sum())
        b_E, t_E, f_E = acts_BTF.nonzero(as_tuple=True)  # activations are never negative
        value_E = acts_BTF[b_E, t_E, f_E]
        self.sum_F.index_add_(0, f_E, value_E.double())
        self.max_F.scatter_reduce_(0, f_E, value_E, "amax")
        add_to_histogram(self.hist_FH, self.hist_range_F, f_E, value_E, self.max_F)
        # each context's maximum per latent, at its first position (the brute-force rule: argmax's first)
        context_latent_E = b_E * F + f_E
        value_BF = value_E.new_zeros(B * F).scatter_reduce_(0, context_latent_E, value_E, "amax")
        at_max_E = value_E == value_BF[context_latent_E]
        pos_BF = t_E.new_full((B * F,), T).scatter_reduce_(0, context_latent_E[at_max_E], t_E[at_max_E], "amin")
        self._merge_top(value_BF.view(B, F), pos_BF.view(B, F), acts_BTF, tokens_BT, first_row)

    def _merge_top(self, value_BF: Tensor, pos_BF: Tensor, acts_BTF: Tensor, tokens_BT: Tensor,
                   first_row: int) -> None:
        """Merge the batch's contexts into each latent's top N, ordered by activation, then by row: a stable sort
        of [kept (already in that order), batch (in row order)] keeps the earlier row first among equal values."""
        B, T, F = acts_BTF.shape
        N = self.value_FN.shape[1]
        # only latents where some context beats the N-th kept value change (a tie keeps the earlier row): after
        # the first batches, few of them, so the F × N × W window work shrinks to G × N × W
        changed_G = (value_BF.amax(0) > self.value_FN[:, -1]).nonzero().squeeze(1)
        if len(changed_G) == 0:
            return
        value_GB, pos_GB = value_BF.T[changed_G], pos_BF.T[changed_G]
        row_GB = first_row + torch.arange(B, device=acts_BTF.device) * T + pos_GB
        all_value = torch.cat([self.value_FN[changed_G], value_GB], 1)
        order_GN = all_value.sort(dim=1, descending=True, stable=True).indices[:, :N]
        # kept slots move to their new place; slots won by the batch (M of them) get their window from it
        kept_GNW = order_GN.clamp(max=N - 1)[..., None].expand(-1, -1, WINDOW)
        acts_GNW = self.window_acts_FNW[changed_G].gather(1, kept_GNW)
        tokens_GNW = self.window_tokens_FNW[changed_G].gather(1, kept_GNW)
        g_M, n_M = (order_GN >= N).nonzero(as_tuple=True)
        b_M = order_GN[g_M, n_M] - N
        t_MW = pos_GB[g_M, b_M][:, None] + torch.arange(-WINDOW_BEFORE, WINDOW_AFTER + 1, device=acts_BTF.device)
        outside_MW = (t_MW < 0) | (t_MW >= T)
        t_MW = t_MW.clamp(0, T - 1)
        acts_GNW[g_M, n_M] = acts_BTF[b_M[:, None], t_MW, changed_G[g_M, None]].masked_fill(outside_MW, torch.nan)
        tokens_GNW[g_M, n_M] = tokens_BT[b_M[:, None], t_MW].to(torch.int32).masked_fill(outside_MW, -1)
        self.window_acts_FNW[changed_G] = acts_GNW
        self.window_tokens_FNW[changed_G] = tokens_GNW
        self.row_FN[changed_G] = torch.cat([self.row_FN[changed_G], row_GB], 1).gather(1, order_GN)
        self.value_FN[changed_G] = all_value.gather(1, order_GN)


@dataclass
class ScanTarget:
    """One SAE to scan, and what it accumulates."""

    sae: SAE
    hook: str
    scan: LatentScan


def scan_rows(cache: Cache, targets: list[ScanTarget], ranges: list[tuple[int, int]], batch_contexts: int,
              keep_T: Tensor, device: str, advance: Callable[[int], None] = lambda n: None) -> None:
    """Stream the rows of `ranges` (whole contexts) once: each batch's tokens and each hook's activations are read
    once and encoded by every SAE that reads the hook (batch-level SAEs with their inference threshold, as eval)."""
    T = cache.meta["context_size"]
    hooks = list(dict.fromkeys(t.hook for t in targets))
    keep_T = keep_T.to(device)
    with torch.inference_mode():
        for start, stop in ranges:
            for r0 in range(start, stop, batch_contexts * T):
                r1 = min(r0 + batch_contexts * T, stop)
                tokens_BT = torch.from_numpy(cache.read_tokens(r0, r1).astype(np.int64)).reshape(-1, T).to(device)
                for hook in hooks:
                    x_ND = cache.read_rows(hook, r0, r1).to(device).float()
                    for t in (t for t in targets if t.hook == hook):
                        acts_BTF = t.sae.encode(x_ND, batch_mode=False).reshape(len(tokens_BT), T, -1)
                        t.scan.add(acts_BTF, tokens_BT, r0, keep_T)
                advance(r1 - r0)
