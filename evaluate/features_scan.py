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


def add_to_histogram(hist_FH: Tensor, range_F: Tensor, acts_NF: Tensor, max_F: Tensor) -> None:
    """Count the non-zero activations into H equal bins over [0, range_F), updating both in place.

    range_F is the smallest power of two above every value seen (`max_F`, the running maximum including this
    batch). When it grows by 2^d, each new bin is the sum of 2^d old ones: their edges nest exactly, so the
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
    n_idx, f_idx = acts_NF.nonzero(as_tuple=True)
    # v / 2^e · H is exact (division by powers of two), so the bin is the same in any order of batches
    bins = (acts_NF[n_idx, f_idx] / new_range_F[f_idx] * H).long().clamp_(max=H - 1)
    hist_FH.view(-1).index_add_(0, f_idx * H + bins, torch.ones_like(bins))
    range_F.copy_(new_range_F)


class LatentScan:
    """What one SAE accumulates over the scanned rows."""

    def __init__(self, d_sae: int, top: int, device: str | torch.device = "cpu"):
        F, N = d_sae, top
        self.n_tokens = 0  # kept positions scanned
        self.value_FN = torch.zeros(F, N, device=device)  # a context's highest activation, best first; 0 = empty
        self.row_FN = torch.full((F, N), -1, dtype=torch.long, device=device)  # its cache row
        self.window_acts_FNW = torch.full((F, N, WINDOW), torch.nan, device=device)  # NaN: outside the context
        self.window_tokens_FNW = torch.full((F, N, WINDOW), -1, dtype=torch.int32, device=device)
        self.fired_F = torch.zeros(F, dtype=torch.long, device=device)
        self.sum_F = torch.zeros(F, dtype=torch.float64, device=device)
        self.max_F = torch.zeros(F, device=device)
        self.hist_FH = torch.zeros(F, HIST_BINS, dtype=torch.long, device=device)
        self.hist_range_F = torch.zeros(F, device=device)

    @torch.no_grad()
    def add(self, acts_BTF: Tensor, tokens_BT: Tensor, first_row: int, keep_T: Tensor) -> None:
        """A batch of whole contexts starting at cache row `first_row`. Takes `acts_BTF` over (zeroes BOS in it)."""
        B, T, F = acts_BTF.shape
        acts_BTF[:, ~keep_T] = 0
        self.n_tokens += B * int(keep_T.sum())
        acts_NF = acts_BTF.view(B * T, F)
        self.fired_F += (acts_NF > 0).sum(0)
        self.sum_F += acts_NF.sum(0, dtype=torch.float64)
        self.max_F = torch.maximum(self.max_F, acts_NF.amax(0))
        add_to_histogram(self.hist_FH, self.hist_range_F, acts_NF, self.max_F)
        self._merge_top(acts_BTF, tokens_BT, first_row)

    def _merge_top(self, acts_BTF: Tensor, tokens_BT: Tensor, first_row: int) -> None:
        """Merge the batch's contexts into each latent's top N, ordered by activation, then by row: a stable sort
        of [kept (already in that order), batch (in row order)] keeps the earlier row first among equal values."""
        B, T, F = acts_BTF.shape
        N = self.value_FN.shape[1]
        value_BF, pos_BF = acts_BTF.max(dim=1)  # torch returns the first position of a row's maximum
        value_FB, pos_FB = value_BF.T, pos_BF.T
        contexts_B = torch.arange(B, device=acts_BTF.device)
        row_FB = first_row + contexts_B * T + pos_FB
        all_value = torch.cat([self.value_FN, value_FB], 1)
        order_FN = all_value.sort(dim=1, descending=True, stable=True).indices[:, :N]
        from_batch_FN = order_FN >= N
        b_FN = (order_FN - N).clamp(min=0)  # the batch context of slots that come from the batch
        # windows of the batch's winners only: F × N × W gathers, whatever the batch size
        offsets_W = torch.arange(-WINDOW_BEFORE, WINDOW_AFTER + 1, device=acts_BTF.device)
        t_FNW = pos_FB.gather(1, b_FN)[..., None] + offsets_W
        inside_FNW = (t_FNW >= 0) & (t_FNW < T)
        t_FNW = t_FNW.clamp(0, T - 1)
        b_FNW = b_FN[..., None].expand_as(t_FNW)
        f_FNW = torch.arange(F, device=acts_BTF.device)[:, None, None].expand_as(t_FNW)
        new_acts_FNW = acts_BTF[b_FNW, t_FNW, f_FNW].masked_fill(~inside_FNW, torch.nan)
        new_tokens_FNW = tokens_BT[b_FNW, t_FNW].to(torch.int32).masked_fill(~inside_FNW, -1)
        kept_FNW = order_FN.clamp(max=N - 1)[..., None].expand(-1, -1, WINDOW)
        use_new_FNW = from_batch_FN[..., None]
        self.window_acts_FNW = torch.where(use_new_FNW, new_acts_FNW, self.window_acts_FNW.gather(1, kept_FNW))
        self.window_tokens_FNW = torch.where(use_new_FNW, new_tokens_FNW, self.window_tokens_FNW.gather(1, kept_FNW))
        self.row_FN = torch.cat([self.row_FN, row_FB], 1).gather(1, order_FN)
        self.value_FN = all_value.gather(1, order_FN)


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
