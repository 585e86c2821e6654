"""`sae eval --dataset`: text beyond the harvest (local files or a hub dataset, as `sae harvest` takes them),
packed exactly as the cache's harvest packed its text (harvest/text.py: the cache's context size and BOS
setting, documents separated by EOS, in dataset order), and the mean activation mean ablation splices in,
taken from the model's own activations on that text (the cache's rows are not this text)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from rich.console import Console

from sae_cache.evaluate.sources import EvalError
from sae_cache.harvest.local_files import Skipped
from sae_cache.harvest.text import open_documents, pack_contexts
from sae_cache.sae_common.cache_format import Cache
from sae_cache.sae_common.config import EvalConfig
from sae_cache.sae_common.model import LoadedModel, run_hooks


def open_text(cfg: EvalConfig) -> Iterator[str | Skipped]:
    """--dataset's documents; one that is missing or lacks the text column is refused here, before the model loads."""
    return open_documents(cfg.dataset, cfg.split, cfg.text_column)


def dataset_tokens(cache: Cache, cfg: EvalConfig, docs: Iterator[str | Skipped], tokenizer, default_tokens: int,
                   console: Console) -> torch.Tensor:
    """[contexts, context_size] token ids of --dataset: --tokens of them (default `default_tokens`, the size of
    the held-out set, or all the dataset holds when that is less)."""
    ctx, prepend_bos = cache.meta["context_size"], cache.meta["prepend_bos"]
    wanted = cfg.tokens if cfg.tokens is not None else default_tokens
    if wanted < ctx:
        raise EvalError(f"--tokens {wanted:,} is less than one context of {ctx} tokens (the cache's context size)")
    skipped: list[dict] = []
    contexts = [ids for ids, _ in itertools.islice(pack_contexts(docs, tokenizer, ctx, prepend_bos, skipped=skipped),
                                                   wanted // ctx)]
    if skipped:
        console.print(f"[yellow]skipped {len(skipped):,} unreadable document(s) of {cfg.dataset}[/] (first: "
                      f"{skipped[0]['file']}: {skipped[0]['reason']})")
    if not contexts:
        raise EvalError(f"--dataset {cfg.dataset!r} holds less than one context ({ctx} tokens) of readable text")
    if cfg.tokens is not None and len(contexts) * ctx < wanted // ctx * ctx:
        raise EvalError(f"--tokens {cfg.tokens:,}: --dataset {cfg.dataset!r} holds only {len(contexts) * ctx:,} tokens "
                        f"in whole contexts of {ctx}; ask for at most that many")
    return torch.tensor(contexts, dtype=torch.long)


def model_activation_mean(loaded: LoadedModel, tokens_NT: torch.Tensor, hooks: list[str], keep_T: torch.Tensor,
                          batch_size: int) -> dict[str, torch.Tensor]:
    """Per hook, the [D] float64 mean of the model's activations over the kept positions of `tokens_NT`."""
    device = loaded.bridge.cfg.device
    totals: dict[str, torch.Tensor] = {}
    count = 0
    for tokens_BT in tokens_NT.split(batch_size):
        acts = run_hooks(loaded, tokens_BT.to(device), hooks)
        for hook, x_BTD in acts.items():
            sum_D = x_BTD[:, keep_T.to(x_BTD.device)].double().sum((0, 1)).cpu()
            totals[hook] = totals[hook] + sum_D if hook in totals else sum_D
        count += len(tokens_BT) * int(keep_T.sum())
    return {hook: total_D / count for hook, total_D in totals.items()}
