"""`sae eval`: splice every SAE into the model on the cache's held-out tokens (or --dataset's text) and measure
what DESIGN.md ("Metrics") lists; write eval.json per SAE, eval_summary.json and plots for the run, and print a
table.

Per batch of contexts the model runs once clean (all layers), twice per hook for the zero and mean
ablations, and once per SAE; the ablated and spliced passes resume at the hook's block from the clean
residual, so they run only the blocks from there to the logits (evaluate/splice.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor

from sae_cache.evaluate.fresh_text import dataset_tokens, model_activation_mean, open_text
from sae_cache.evaluate.metrics import ActivationStats, Mean, SAEStats, kl_per_token, log_probs, next_token_ce, sae_metrics
from sae_cache.evaluate.plots import save_plots
from sae_cache.evaluate.report import print_table, sae_report, write_reports
from sae_cache.evaluate.sources import (Target, activation_mean, check_fit, check_heldout, find_sae_dirs,
                                        heldout_rows, heldout_tokens, keep_positions, load_eval_model, load_targets,
                                        open_target_cache, output_dir)
from sae_cache.evaluate.splice import clean_pass, reconstruct, spliced_logits, with_replaced
from sae_cache.sae_common import distributed
from sae_cache.sae_common.cache_format import DEFAULT_ROOT, Cache
from sae_cache.sae_common.checks import check_output_dir
from sae_cache.sae_common.config import EvalConfig
from sae_cache.sae_common.console import make_console
from sae_cache.sae_common.model import LoadedModel, hook_layer, resolve_device, resolve_source
from sae_cache.sae_common.wandb_log import import_wandb, log_eval


@dataclass
class HookGroup:
    """The SAEs that read one hook, and what they share: the activation statistics and the ablations."""

    hook: str
    mean_D: Tensor  # the held-out mean activation, spliced in by mean ablation
    members: list[tuple[Target, SAEStats]]
    acts: ActivationStats
    ce_zero: Mean = field(default_factory=Mean)
    ce_mean: Mean = field(default_factory=Mean)


def evaluate(cfg: EvalConfig, console: Console | None = None, root: Path = DEFAULT_ROOT) -> list[dict]:
    """Evaluate the SAEs `cfg` names; returns one report (the content of its eval.json) per SAE."""
    console = console or make_console()
    # the config checked each value; what needs the machine or files is here (under torchrun: this rank's GPU)
    device = distributed.rank_device(resolve_device(cfg.device))
    if cfg.wandb is not None:
        import_wandb()  # its absence is named before any work
    if cfg.model is not None:
        resolve_source(cfg.model)  # a model that is not there is refused before the SAEs and the cache are read
    targets = load_targets(find_sae_dirs(cfg.saes, root, console))
    out = output_dir(targets, cfg.out)
    check_output_dir(out)  # before the work, not after it
    cache = open_target_cache(targets, cfg.cache)
    hooks = sorted({t.hook for t in targets})
    keep_T = keep_positions(cache, cfg.include_bos)
    loaded, tokens_NT, rows, dataset = read_text(cfg, cache, targets, hooks, device, console)
    text = (f"tokens of {cfg.dataset} (split {cfg.split}, column {cfg.text_column})" if dataset
            else f"held-out tokens ({len(rows)} row range(s) of {cache.path})")
    check_fit(loaded, targets, tokens_NT[:1].to(device))
    mine = rank_share(targets, distributed.world())
    my_hooks = sorted({t.hook for t in mine})
    means = ({} if not my_hooks else model_activation_mean(loaded, tokens_NT, my_hooks, keep_T, cfg.batch_size)
             if dataset else {h: activation_mean(cache, h, rows, keep_T) for h in my_hooks})
    groups = build_groups(mine, means, device, loaded.bridge.cfg.dtype)
    console.print(f"evaluating {len(targets)} SAE(s) on {len(tokens_NT) * keep_T.sum().item():,} {text} spliced "
                  f"into {loaded.source}")
    if distributed.world().active:  # rank 0 speaks; it has the largest share
        console.print(f"split over {distributed.world().size} ranks: at most {len(mine)} SAE(s) each")
    ce_clean = Mean()
    with _progress(console) as progress, torch.inference_mode():
        task = progress.add_task("eval", total=tokens_NT.numel())
        for tokens_BT in tokens_NT.split(cfg.batch_size) if groups else ():  # a rank without SAEs runs nothing
            evaluate_batch(loaded.bridge, tokens_BT.to(device), keep_T.to(device), groups, ce_clean, cfg.batch_mode)
            progress.advance(task, tokens_BT.numel())
    reports = [sae_report(t, sae_metrics(stats, g.acts, ce_clean, g.ce_zero, g.ce_mean), cfg=cfg, cache=cache,
                          rows=rows, dataset=dataset, model=loaded.source)
               for g in groups for t, stats in g.members]
    reports = [r for share in distributed.all_gather_object(reports) for r in share]  # every rank joins, idle too
    if distributed.world().is_main:  # rank 0 alone writes; the gathered order is one process's order
        write_outputs(reports, cfg, out, console)
    return reports


def write_outputs(reports: list[dict], cfg: EvalConfig, out: Path, console: Console) -> None:
    plots = save_plots(reports, out / "plots")
    summary = write_reports(reports, out, plots=[str(p) for p in plots.values()], beside_saes=cfg.out is None)
    print_table(reports, console)
    if cfg.wandb is not None:
        log_eval(cfg.wandb, out, json.loads(summary.read_text()), [str(p) for p in plots.values()])
    where = "each SAE directory" if cfg.out is None else f"{out}/<SAE>/"
    console.print(f"[green]done[/]: eval.json in {where}, {summary} and {len(plots)} plot(s) in {out / 'plots'}")


def read_text(cfg: EvalConfig, cache: Cache, targets: list[Target], hooks: list[str], device: str,
              console: Console) -> tuple[LoadedModel, Tensor, list[tuple[int, int]] | None, dict | None]:
    """The model, and the [contexts, T] tokens to evaluate on: the cache's held-out rows (returned as row ranges),
    or --dataset's text (returned as its record, rows None). Everything is checked before the model loads."""
    if cfg.dataset is None:
        rows = heldout_rows(cache, targets, cfg.tokens)
        check_heldout(cache, set(hooks), rows)
        return load_eval_model(cache, cfg, device), heldout_tokens(cache, rows), rows, None
    # --tokens' default: as many as the SAEs hold out (asked only when needed)
    default_tokens = cfg.tokens or sum(b - a for a, b in heldout_rows(cache, targets, None))
    docs = open_text(cfg)
    loaded = load_eval_model(cache, cfg, device)
    tokens_NT = dataset_tokens(cache, cfg, docs, loaded.tokenizer, default_tokens, console)
    return loaded, tokens_NT, None, {"source": cfg.dataset, "split": cfg.split, "text_column": cfg.text_column}


def build_groups(targets: list[Target], means: dict[str, Tensor], device: str,
                 model_dtype: torch.dtype) -> list[HookGroup]:
    """One group per hook; `means`: each hook's [D] float64 mean activation over the evaluated tokens."""
    groups: dict[str, HookGroup] = {}
    for t in targets:
        if t.hook not in groups:
            mean_D = means[t.hook]
            groups[t.hook] = HookGroup(t.hook, mean_D.to(device, model_dtype), [], ActivationStats(mean_D))
        t.sae.to(device)
        groups[t.hook].members.append((t, SAEStats(t.sae.cfg.d_sae)))
    return list(groups.values())


def rank_share(targets: list[Target], w: distributed.World) -> list[Target]:
    """This rank's SAEs under torchrun (all of them in one process). The SAEs are split, not the tokens: each SAE
    then sees every held-out token in the same batches on one rank, so its numbers are a single process's exactly
    (BatchTopK's --batch-mode selects over the batch) and nothing needs merging. The ranks take contiguous runs of
    the hook-grouped order that build_groups uses (rank 0 the first and any one extra, so it always has work to
    show progress on): a rank runs the ablations only of the hooks it has SAEs of, and the shares gathered in rank
    order are one process's reports in one process's order."""
    hooks = list(dict.fromkeys(t.hook for t in targets))
    ordered = sorted(targets, key=lambda t: hooks.index(t.hook))  # stable: within a hook, the order given
    base, extra = divmod(len(ordered), w.size)
    start = w.rank * base + min(w.rank, extra)
    return ordered[start:start + base + (w.rank < extra)]


def evaluate_batch(bridge, tokens_BT: Tensor, keep_T: Tensor, groups: list[HookGroup], ce_clean: Mean,
                   batch_mode: bool) -> None:
    """One batch of contexts: the clean pass, then per hook the two ablations and one pass per SAE."""
    clean = clean_pass(bridge, tokens_BT, [g.hook for g in groups])
    keep_BT = keep_T.expand_as(tokens_BT)
    keep_ce_BT = keep_BT[:, :-1]  # predictions made at kept positions (the last has no next token)
    logp_clean_BTV = log_probs(clean.logits_BTV)
    clean.logits_BTV = None  # only the log-probs are needed from here (B x T x V floats each)
    ce_clean.add(next_token_ce(logp_clean_BTV, tokens_BT)[keep_ce_BT])

    def ce_with(g: HookGroup, new_ND: Tensor) -> tuple[Tensor, Tensor]:
        replacement_BTD = with_replaced(clean.acts[g.hook], keep_BT, new_ND)
        logp_BTV = log_probs(spliced_logits(bridge, clean.resid[hook_layer(g.hook)], g.hook, replacement_BTD))
        return next_token_ce(logp_BTV, tokens_BT)[keep_ce_BT], logp_BTV

    for g in groups:
        x_ND = clean.acts[g.hook][keep_BT]
        g.acts.add(x_ND)
        g.ce_zero.add(ce_with(g, x_ND.new_zeros(()))[0])
        g.ce_mean.add(ce_with(g, g.mean_D)[0])
        for target, stats in g.members:
            x_hat_ND, acts_NF = reconstruct(target.sae, x_ND, batch_mode)
            stats.add_reconstruction(x_ND, x_hat_ND, acts_NF)
            ce_N, logp_BTV = ce_with(g, x_hat_ND)
            stats.ce_spliced.add(ce_N)
            stats.kl.add(kl_per_token(logp_clean_BTV, logp_BTV)[keep_BT])


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens"), TimeRemainingColumn(),
                    console=console)
