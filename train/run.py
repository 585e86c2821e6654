"""`sae train`: open a cache, build the sweep, resume or start, train every SAE in one pass, export them."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console

from sae_cache.sae_common.cache_format import DEFAULT_ROOT, Cache, CacheError, damaged, find_caches, open_cache, verify
from sae_cache.sae_common.checks import check_output_dir
from sae_cache.sae_common.config import TrainConfig
from sae_cache.sae_common.console import make_console
from sae_cache.sae_common.distributed import (World, all_gather_object, barrier, broadcast_object, rank_device, shard,
                                              world)
from sae_cache.sae_common.errors import UserError
from sae_cache.sae_common.files import Locked, acquire_lock
from sae_cache.sae_common.holdout import holdout_record, training_ranges
from sae_cache.sae_common.wandb_log import import_wandb, train_runs
from sae_cache.sae_common.model import resolve_device
from sae_cache.sae_common.sae import SAE
from sae_cache.sae_common.sae_io import RUN_FILE, save_sae
from sae_cache.train.checkpoint import load_checkpoint, read_state, save_checkpoint, trim_histories, write_json_atomic
from sae_cache.train.loader import ActivationLoader
from sae_cache.train.sweep import SweepEntry, expand
from sae_cache.train.trainer import Member, TrainingError, train_loop

LOCK_FILE = ".train.lock"  # in the run directory: held by the `sae train` writing it


def pick_cache(cfg: TrainConfig, console: Console, root: Path = DEFAULT_ROOT) -> Cache:
    if cfg.cache is None:
        found = broadcast_object(find_caches(root))  # under torchrun, rank 0's choice: a harvest may finish meanwhile
        if not found:
            raise UserError(f"no activation cache under {root}/; run `sae harvest` first or pass --cache")
        console.print(f"using the newest cache under {root}/: {found[0]}")
    cache = open_cache(cfg.cache or found[0])
    if cache.n_tokens == 0:
        raise CacheError(f"the cache {cache.path} is empty (0 tokens); finish its harvest first")
    if not cache.complete:
        target = cache.meta.get("target_tokens")
        raise CacheError(f"the cache {cache.path} is incomplete: {cache.n_tokens:,} of "
                         f"{f'{target:,}' if isinstance(target, int) else 'the'} tokens asked for were harvested. Rerun "
                         f"its `sae harvest` command to finish it (`sae cache verify {cache.path}` checks what it holds)")
    problems = verify(cache, checksums=False)  # every shard present; their bytes are checked as the loader reads them
    if problems:
        raise damaged(cache.path, problems)
    if not (cache.chunk_crc or cache.shard_checksums):
        console.print(f"[yellow]the cache {cache.path} has {cache.checks}: training cannot tell damaged data from "
                      "good[/]")
    return cache


def pick_hook(cfg: TrainConfig, cache: Cache) -> str:
    if cfg.hook is None:
        if len(cache.hooks) > 1:
            raise UserError(f"the cache has several hooks; choose one with --hook: {', '.join(cache.hooks)}")
        return cache.hooks[0]
    if cfg.hook not in cache.hooks:
        raise UserError(f"--hook: the cache {cache.path} has no hook {cfg.hook!r}; it has: {', '.join(cache.hooks)}")
    return cfg.hook


def default_run_dir(cfg: TrainConfig, cache: Cache, hook: str, root: Path = DEFAULT_ROOT) -> Path:
    """Deterministic per (cache, hook, sweep identity), so rerunning the same command resumes the same run."""
    key = json.dumps({"cache": str(cache.path.resolve()), "hook": hook, **cfg.identity()}, sort_keys=True)
    return root / "runs" / f"{cache.path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def check_resume(run_dir: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    state = read_state(run_dir)
    if state is None:
        return None
    # A key one side lacks is a setting at its default: one that is not in the identity while default
    # (TrainConfig.LATER_SAE_FIELDS), or that was not a setting when the run started.
    defaults = TrainConfig().to_dict()
    old = {**defaults, **state["identity"]}
    new = {**defaults, **identity}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        lines = "; ".join(f"{k}: run has {old.get(k)!r}, now {new.get(k)!r}" for k in diff)
        raise UserError(f"{run_dir} holds a run with a different config ({lines}). Use the same flags to resume, or "
                        "--out to start a new run")
    return state


def build_members(entries: list[SweepEntry], device: str, seed: int, dtype: str = "float32",
                  keep: range | None = None) -> list[Member]:
    """The SAEs of `keep` (indices of `entries`; default all). The others are initialised too, in order, and
    dropped, so each SAE starts from the weights a one-process run of the whole sweep gives it."""
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype {dtype!r} is not supported for training; use float32 or bfloat16")
    torch.manual_seed(seed)
    members = []
    for i, e in enumerate(entries):
        sae = SAE(e.sae)  # on the CPU, from the one seeded generator, whatever the device
        if keep is not None and i not in keep:
            continue
        sae = sae.to(device)
        # fused: one kernel per step for all parameters (measured 11x faster than the default on CPU)
        opt = torch.optim.Adam(sae.parameters(), lr=e.lr, betas=(0.9, 0.99), fused=True)
        members.append(Member(e.name, sae, opt, autocast=torch.bfloat16 if dtype == "bfloat16" else None))
    return members


def parallel_mode(choice: str, n_saes: int, w: World) -> str:
    """How the ranks share the work: "sweep" (each rank trains its share of the SAEs on every batch) or "data"
    (each rank a slice of every batch). auto: sweep while every rank gets an SAE, as it needs no
    communication per step; data for fewer SAEs than ranks. One process is a sweep of one rank."""
    if not w.active:
        return "sweep"
    if choice == "auto":
        return "sweep" if n_saes >= w.size else "data"
    return choice


def train(cfg: TrainConfig, out: Path | None = None, console: Console | None = None) -> Path:
    """Train (or resume) the sweep; returns the run directory. Under torchrun, sweep-parallel: this rank trains
    its round-robin share of the SAEs (distributed.shard) on every batch, writing only their files."""
    console = console or make_console()
    # the config checked each value; what needs the machine or the cache is here (under torchrun: this rank's GPU)
    device = rank_device(resolve_device(cfg.device))
    if cfg.wandb is not None:
        import_wandb()  # its absence is named before any work
    cache = pick_cache(cfg, console)
    hook = pick_hook(cfg, cache)
    entries = expand(cfg, cache.d_model)
    w = world()
    data_parallel = parallel_mode(cfg.parallel, len(entries), w) == "data"
    # sweep-parallel: each rank trains and writes its round-robin share; data-parallel: every rank trains every
    # SAE on its slice of each batch, and rank 0 alone writes
    mine = range(len(entries)) if data_parallel else shard(len(entries))
    writer = w.is_main or not data_parallel
    if data_parallel and cfg.batch_size < w.size:
        raise UserError(f"--batch-size {cfg.batch_size} cannot be split across {w.size} ranks (--parallel data "
                        f"gives each rank batch-size/{w.size} rows); use a batch of at least {w.size}")
    if not data_parallel and len(entries) < w.size:
        console.print(f"[yellow]--parallel sweep: {len(entries)} SAE(s) for {w.size} ranks; ranks "
                      f"{len(entries)}..{w.size - 1} read the batches but train nothing[/]")
    names = [e.name for e in entries]
    run_dir = Path(out) if out is not None else default_run_dir(cfg, cache, hook)
    check_output_dir(run_dir)
    rows = training_ranges(cache, cfg.holdout_fraction)
    n_train = sum(stop - start for start, stop in rows)
    n_batches = (cfg.tokens or n_train) // cfg.batch_size
    if n_batches == 0:
        raise UserError(f"{cfg.tokens or n_train:,} training tokens make no batch of {cfg.batch_size:,}; "
                        "ask for more --tokens or a smaller --batch-size")
    if cfg.dtype == "bfloat16" and device == "cpu":
        console.print("[yellow]--dtype bfloat16 on the CPU: bf16 matmuls ran 230x slower than float32 on a CPU "
                      "without bf16 units (bench/train_bench.py); float32 is the CPU's fast path[/]")
    with run_lock(run_dir):
        state = check_resume(run_dir, cfg.identity())
        members = build_members(entries, device, cfg.seed, cfg.dtype, keep=mine)
        if data_parallel:
            same_checkpoint(state, run_dir, w)
            for m in members:
                m.sae.data_parallel = True
        saved = [state["batches_done"] if state else None]  # the checkpoint a failure leaves

        def save(done: int) -> None:
            save_checkpoint(run_dir, members if writer else [], done, {"identity": cfg.identity()}, names=names)
            saved[0] = done

        try:
            start = resume(run_dir, members, state, cfg.batch_size, n_batches, console, writer)
            # absolute, so that eval finds the cache from any directory
            run_info = {"config": cfg.to_dict(), "cache": os.path.abspath(cache.path), "hook": hook,
                        "model": cache.meta["model"], **holdout_record(cache, cfg.holdout_fraction),
                        "n_batches": n_batches, "saes": names}
            if w.is_main:
                write_json_atomic(run_dir / RUN_FILE, {**run_info, "complete": False})
            part = (w.rank, w.size) if data_parallel else (0, 1)
            loader, batches = open_stream(cache, hook, cfg, rows, n_batches, start, device, members, console, part)
            how = " (data-parallel)" if data_parallel else " (sweep-parallel)"
            shared = f" shared by {w.size} ranks{how}" if w.active else ""
            console.print(f"training {len(names)} SAE(s){shared} on {hook} of {cache.path} for {n_batches:,} batches "
                          f"of {cfg.batch_size:,} tokens into {run_dir}")
            configs = {entries[i].name: {"train": cfg.to_dict(), "sae": asdict(entries[i].sae), "lr": entries[i].lr}
                       for i in mine}
            with train_runs(cfg.wandb if writer else None, run_dir, configs) as on_record:
                done = train_loop(members, batches, start_batch=start, n_batches=n_batches, batch_size=cfg.batch_size,
                                  log_every=cfg.log_every, run_dir=run_dir, save=save, source_rows=loader.source_rows,
                                  checkpoint_every_batches=max(1, cfg.checkpoint_every // cfg.batch_size),
                                  console=console, names=names, write_history=writer, on_record=on_record)
            export(members if writer else [], [entries[i] for i in mine] if writer else [], run_dir, cache, hook, cfg,
                   run_info, done)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            kept = (f"its last checkpoint (batch {saved[0]:,} of {n_batches:,}) is kept" if saved[0] is not None
                    else "no checkpoint was written yet")
            raise TrainingError(f"the disk holding {run_dir} is full: training stopped; {kept}. Free some space and "
                                "run the same command again to resume") from None
    console.print(f"[green]done[/]: {len(names)} SAE(s) in {run_dir}")
    return run_dir



def same_checkpoint(state: dict[str, Any] | None, run_dir: Path, w: World) -> None:
    """Data-parallel ranks each load the checkpoint rank 0 wrote: refuse to start if they see different ones."""
    seen = all_gather_object(state["batches_done"] if state else None)
    if len(set(seen)) > 1:
        raise UserError(f"the ranks see different checkpoints in {run_dir} (batches done per rank: {seen}); the run "
                        "directory must be one shared by every rank (a shared filesystem)")


def open_stream(cache: Cache, hook: str, cfg: TrainConfig, rows: list[tuple[int, int]], n_batches: int, start: int,
                device: str, members: list[Member], console: Console,
                part: tuple[int, int] = (0, 1)) -> tuple[ActivationLoader, Iterator[torch.Tensor]]:
    """The training batches from batch `start` on (a data-parallel rank's `part` of each); a fresh run first sets
    the SAEs' input scale from batch 0 (data-parallel: from the whole global batch 0)."""
    loader = ActivationLoader(cache, hook, batch_size=cfg.batch_size, n_batches=n_batches, rows=rows, seed=cfg.seed,
                              device=device, shuffle_tokens=cfg.shuffle_tokens, start_batch=start, part=part)
    if loader.epochs > 1:
        console.print(f"[yellow]{n_batches * cfg.batch_size:,} tokens exceed the cache's {loader.n_rows:,} training "
                      f"tokens: training takes {loader.epochs} epochs[/]")
    batches = iter(loader)
    if start == 0 and cfg.input_norm == "scalar":
        first = next(batches)  # the scale comes from the first training batch; checkpoints keep it
        for m in members:
            m.sae.set_input_scale(first)
        batches = itertools.chain([first], batches)
    return loader, batches


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One `sae train` per run directory: two would interleave checkpoints and history (an flock, released by
    the kernel when the holder dies, kill -9 included). Under torchrun rank 0 holds it for the job (ranks on
    one node would lock each other out), and every rank learns whether it got it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd, holder = None, None
    if world().is_main:
        try:
            fd = acquire_lock(run_dir / LOCK_FILE)
        except Locked as e:
            holder = e.holder
    holder = broadcast_object(holder)
    if holder is not None:
        raise UserError(f"another `sae train` (pid {holder}) is training in {run_dir}; wait for it to finish or "
                        "stop it, then run again")
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def resume(run_dir: Path, members: list[Member], state: dict[str, Any] | None, batch_size: int, n_batches: int,
           console: Console, writer: bool = True) -> int:
    """Restore the checkpoint `state` names (verified first) and (writer) drop the history logged past it;
    returns the batch to start from."""
    done = state["batches_done"] if state is not None else 0
    if state is not None:
        load_checkpoint(run_dir, members, state)
    if writer:
        for m in members:
            (run_dir / m.name).mkdir(exist_ok=True)
        trim_histories(run_dir, [m.name for m in members], done * batch_size)
    start = min(done, n_batches)
    if state is not None:
        console.print(f"resuming {run_dir} at batch {start:,} ({start * batch_size:,} tokens)")
    return start


def export(members: list[Member], entries: list[SweepEntry], run_dir: Path, cache: Cache, hook: str,
           cfg: TrainConfig, run_info: dict[str, Any], done: int) -> None:
    """Save every trained SAE of this rank (SAELens files and our record), then, once every rank saved its
    own, rank 0 marks the run complete."""
    for m, e in zip(members, entries):
        save_sae(m.sae, run_dir / m.name, model_name=cache.meta["model"], hook_name=hook,
                 extra_record={"train_config": cfg.to_dict(), "lr": e.lr, "cache": run_info["cache"],
                               **holdout_record(cache, cfg.holdout_fraction),
                               "tokens_trained": done * cfg.batch_size,
                               "final_metrics": m.last, "context_size": cache.meta["context_size"],
                               "prepend_bos": cache.meta["prepend_bos"],
                               "dataset_path": (cache.meta.get("dataset") or {}).get("source")})
    barrier()
    if world().is_main:
        write_json_atomic(run_dir / RUN_FILE, {**run_info, "complete": True, "tokens_trained": done * cfg.batch_size})
