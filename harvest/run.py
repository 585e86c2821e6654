"""`sae harvest`: run the model once over the text and write its activations, shard by shard, to a cache.

Each shard is gathered in memory (batches never straddle a shard, so a resumed run computes exactly the
batches an uninterrupted one would), then written by a background thread while the model computes the next.
"""

from __future__ import annotations

import errno
import itertools
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from sae_cache.harvest.text import Position, open_documents, pack_contexts, separator_id
from sae_cache.sae_common.background import background
from sae_cache.sae_common.cache_format import (DEFAULT_ROOT, EXPECTED_RATIO, empty_rows, layout_for, open_cache,
                                              row_bytes, to_storage)
from sae_cache.sae_common.cache_writer import CacheWriter, refuse_foreign
from sae_cache.sae_common.checks import check_output_dir
from sae_cache.sae_common.config import HarvestConfig, hook_names
from sae_cache.sae_common.console import make_console
from sae_cache.sae_common.errors import UserError
from sae_cache.sae_common.model import (LoadedModel, ModelError, load_model, resolve_device, resolve_model_dtype,
                                       resolve_source, run_hooks)


class HarvestError(UserError):
    """A harvest that cannot start or could not finish; the message says what was kept."""


SKIPS_LISTED = 100  # skipped documents listed in the cache's metadata (all are counted)
SKIPS_SHOWN = 10  # skipped documents named on the console per run


def default_out(cfg: HarvestConfig, hooks: list[str], root: Path = DEFAULT_ROOT) -> Path:
    model = Path(cfg.model).name if Path(cfg.model).expanduser().is_dir() else cfg.model.replace("/", "__")
    return root / model / ("+".join(hooks) + ".zarr")


def versions() -> dict[str, str]:
    names = ["torch", "transformer-lens", "transformers", "zarr", "numcodecs", "datasets", "sae-cache"]
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def estimate_bytes(n_tokens: int, d_model: int, n_hooks: int, dtype: str, compression: str) -> int:
    ratio = EXPECTED_RATIO.get((compression, dtype), 1.0)
    return int(n_tokens * (n_hooks * row_bytes(d_model, dtype) / ratio + 4))


def check_disk(out: Path, needed: int) -> None:
    existing = next(p for p in [out, *out.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise HarvestError(f"the cache needs about {needed / 1e9:.2f} GB but {existing} has only {free / 1e9:.2f} GB "
                           "free; free some space, ask for fewer --tokens, or write elsewhere with --out")


def complete_tokens(out: Path, cfg: HarvestConfig) -> int | None:
    """The tokens of a complete cache at `out` made with this config, else None (the writer decides the rest)."""
    if not (out / "zarr.json").is_file():
        return None
    meta = open_cache(out).meta
    return meta["n_tokens"] if meta.get("complete") and meta.get("identity") == cfg.identity() else None


def check_context_fits(cfg: HarvestConfig) -> None:
    """The cheapest look at the model (its config.json, no weights): every context fits its positions."""
    from transformers import AutoConfig

    source = resolve_source(cfg.model)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - no network, gated model, broken config: all are the user's to fix
        raise ModelError(f"--model {cfg.model}: cannot read its config: {e}") from e
    n_positions = getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)
    if n_positions is not None and cfg.context_size > n_positions:
        raise HarvestError(f"--context-size {cfg.context_size}: {cfg.model} handles at most {n_positions} positions; "
                           f"use --context-size {n_positions} or less")


def cache_meta(cfg: HarvestConfig, loaded: LoadedModel, hooks: list[str], n_target: int) -> dict[str, Any]:
    tok = loaded.tokenizer
    d_model = int(loaded.bridge.cfg.d_model)
    return {
        "model": cfg.model, "model_load": loaded.record(), "hooks": hooks, "d_model": d_model,
        "context_size": cfg.context_size, "prepend_bos": cfg.prepend_bos, "dtype": cfg.dtype,
        "compression": cfg.compression, "target_tokens": n_target,
        "layout": layout_for(d_model, cfg.dtype, cfg.context_size, cfg.rows_per_shard),
        "dataset": {"source": cfg.dataset, "split": cfg.split, "text_column": cfg.text_column,
                    "shuffle_buffer": cfg.shuffle_buffer, "seed": cfg.seed, "packing": "eos-separated",
                    "position": {"doc": 0, "offset": 0}},
        "tokenizer": {"name_or_path": loaded.source, "class": type(tok).__name__, "vocab_size": len(tok),
                      "bos_token_id": tok.bos_token_id, "separator_token_id": separator_id(tok)},
        "versions": versions(), "config": cfg.to_dict(),
    }


def harvest(cfg: HarvestConfig, out: Path | None = None, *, overwrite: bool = False,
            console: Console | None = None, loaded: LoadedModel | None = None) -> Path:
    """Run the harvest (or resume it) and return the cache path. `loaded`: a model already loaded the way
    `load_model` does for these hooks (benchmarks reuse one)."""
    console = console or make_console()
    hooks = hook_names(cfg.layers, cfg.hook)  # the config has checked every value on its own already
    n_target = (cfg.tokens // cfg.context_size) * cfg.context_size
    out = Path(out) if out is not None else default_out(cfg, hooks)
    device = resolve_device(cfg.device)
    done = None if overwrite else complete_tokens(out, cfg)
    if done is not None:  # before the lock: a finished cache may be read-only
        console.print(f"[green]{out} is already complete[/] ({done:,} tokens); nothing to do")
        return out
    check_output_dir(out)
    if out.is_dir() and not (out / "zarr.json").exists():
        refuse_foreign(out)  # a folder of the user's files, refused before the model loads (--overwrite too)
    # A dataset that is missing or lacks the text column is refused before the model loads and the cache exists.
    docs = open_documents(cfg.dataset, cfg.split, cfg.text_column, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed)
    if loaded is None:
        check_context_fits(cfg)
        loaded = load_model(cfg.model, hooks, device=device, dtype=resolve_model_dtype(cfg.model_dtype, device))
    meta = cache_meta(cfg, loaded, hooks, n_target)
    with CacheWriter.open(out, meta, identity=cfg.identity(), overwrite=overwrite) as writer:
        if writer.meta["complete"]:
            console.print(f"[green]{out} is already complete[/] ({writer.n_tokens:,} tokens); nothing to do")
            return out
        needed = estimate_bytes(n_target - writer.n_tokens, meta["d_model"], len(hooks), cfg.dtype, cfg.compression)
        console.print(f"harvesting {n_target:,} tokens of {', '.join(hooks)} from {cfg.model} into {out}"
                      + (f" (resuming at {writer.n_tokens:,})" if writer.n_tokens else "")
                      + f"; estimated size still to write {needed / 1e6:,.1f} MB")
        check_disk(out, needed)
        _write_shards(cfg, loaded, hooks, docs, writer, n_target, console)
    return out


def _write_shards(cfg: HarvestConfig, loaded: LoadedModel, hooks: list[str], docs: Iterator[str], writer: CacheWriter,
                  n_target: int, console: Console) -> None:
    position = Position(**writer.meta["dataset"]["position"])
    skipped: list[dict] = []  # documents that could not be read, appended in order by the tokenizing thread
    # Tokenizing runs a few batches ahead in its own thread (the tokenizer releases the GIL while it encodes).
    contexts = background(pack_contexts(docs, loaded.tokenizer, cfg.context_size, cfg.prepend_bos, position, skipped),
                          depth=4 * cfg.batch_size, name="harvest-tokenize")
    rows_s = writer.meta["layout"]["rows_per_shard"]
    raw_row_bytes = len(hooks) * row_bytes(writer.meta["d_model"], cfg.dtype) + 4
    pending: Future | None = None
    stats = {"bytes": 0, "raw": 0}
    n_skips = 0  # of `skipped`, how many the shards so far reach past
    done = writer.n_tokens
    with _progress(console) as progress, ThreadPoolExecutor(max_workers=1) as pool:
        task = progress.add_task("harvest", total=n_target, completed=done, written="0.0 MB", ratio="-")
        while done < n_target:
            rows = min(rows_s, n_target - done)
            acts, tokens, position = _gather_shard(cfg, loaded, hooks, contexts, rows, position,
                                                   lambda n: progress.advance(task, n))
            if pending is not None:  # at most one shard in flight: overlap without unbounded memory
                _account(pending, stats, progress, task)
                pending = None
            if len(tokens):
                skips = _skips_before(skipped, n_skips, position)
                _show_skips(console, skips, n_skips)
                n_skips += len(skips)
                pending = pool.submit(_write, writer, acts, tokens, position, skips, raw_row_bytes)
                done += len(tokens)
            if len(tokens) < rows:
                break  # the dataset ran out
        if pending is not None:
            _account(pending, stats, progress, task)
    if writer.n_tokens == 0:
        raise HarvestError(f"the dataset {cfg.dataset!r} holds less than one context ({cfg.context_size} tokens) of "
                           "readable text; nothing was written")
    skip_note = _skip_summary(writer.meta["dataset"])
    if writer.n_tokens < n_target:
        writer.finish(complete=False, exhausted=True)
        raise HarvestError(f"the dataset {cfg.dataset!r} ran out after {writer.n_tokens:,} tokens "
                           f"({n_target:,} asked for); the cache keeps those {writer.n_tokens:,} tokens{skip_note}")
    writer.finish(complete=True)
    console.print(f"[green]done[/]: {writer.n_tokens:,} tokens, {stats['bytes'] / 1e6:,.1f} MB on disk "
                  f"(compression {stats['raw'] / max(stats['bytes'], 1):.2f}x){escape(skip_note)}")


def _skips_before(skipped: list[dict], taken: int, position: Position) -> list[dict]:
    """The skipped documents after the first `taken` that a shard ending at `position` reaches past: those
    before position.doc (a skipped document has no tokens, so no context ends in it). This depends only on the
    position, never on how far ahead the tokenizing thread is, so every run records the same."""
    end = taken
    while end < len(skipped) and skipped[end]["doc"] < position.doc:
        end += 1
    return skipped[taken:end]


def _show_skips(console: Console, skips: list[dict], shown_before: int) -> None:
    for i, skip in enumerate(skips, start=shown_before):
        if i < SKIPS_SHOWN:
            where = ", ".join(f"{k} {v}" for k, v in skip.items() if k not in ("doc", "file", "reason"))
            console.print(f"[yellow]skipped[/] document {skip['doc']:,} ({escape(skip['file'])}, {where}): "
                          f"{escape(skip['reason'])}")
        elif i == SKIPS_SHOWN:
            console.print("[yellow]skipping more unreadable documents[/]; the cache's metadata counts them all")


def _skip_summary(dataset_meta: dict) -> str:
    count = dataset_meta.get("skipped", {}).get("count", 0)
    return (f"; {count:,} unreadable document(s) were skipped (listed under dataset.skipped in "
            "`sae cache info --json`)") if count else ""


def _gather_shard(cfg: HarvestConfig, loaded: LoadedModel, hooks: list[str], contexts: Iterator, rows: int,
                  position: Position, advance) -> tuple[dict[str, np.ndarray], np.ndarray, Position]:
    """Run the model over the next `rows` tokens (whole contexts), batch by batch, into host arrays."""
    n_ctx = rows // cfg.context_size
    device = loaded.bridge.cfg.device
    acts = {h: empty_rows(rows, loaded.bridge.cfg.d_model, cfg.dtype) for h in hooks}
    tokens = np.empty(rows, dtype=np.int32)
    filled = 0
    while filled < n_ctx:
        want = min(cfg.batch_size, n_ctx - filled)
        batch = list(itertools.islice(contexts, want))
        if not batch:
            break
        position = batch[-1][1]
        tokens_BT = torch.tensor([ids for ids, _ in batch], dtype=torch.long, device=device)
        out = run_hooks(loaded, tokens_BT, hooks)
        r0, r1 = filled * cfg.context_size, (filled + len(batch)) * cfg.context_size
        for h in hooks:
            acts[h][r0:r1] = to_storage(out[h].reshape(-1, out[h].shape[-1]), cfg.dtype)
        tokens[r0:r1] = tokens_BT.reshape(-1).cpu().numpy()
        filled += len(batch)
        advance(r1 - r0)
        if len(batch) < want:
            break  # the dataset ran out mid-batch
    end = filled * cfg.context_size
    return {h: a[:end] for h, a in acts.items()}, tokens[:end], position


def _write(writer: CacheWriter, acts, tokens, position: Position, skips: list[dict],
           raw_row_bytes: int) -> tuple[int, int]:
    dataset = {**writer.meta["dataset"], "position": {"doc": position.doc, "offset": position.offset}}
    if skips or "skipped" in dataset:  # recorded with the shard, so a resumed run continues the same record
        before = dataset.get("skipped", {"count": 0, "documents": []})
        dataset["skipped"] = {"count": before["count"] + len(skips),
                              "documents": (before["documents"] + skips)[:SKIPS_LISTED]}
    progress = {"dataset": dataset}
    try:
        written = writer.write_shard(acts, tokens, progress)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise HarvestError(f"the disk is full while writing shard {writer.n_shards} of {writer.path}; the cache "
                               f"keeps its {writer.n_tokens:,} complete tokens and resumes when you rerun the same "
                               "command with space free") from e
        raise
    return written, len(tokens) * raw_row_bytes


def _account(pending: Future, stats: dict, progress: Progress, task) -> None:
    written, raw = pending.result()
    stats["bytes"] += written
    stats["raw"] += raw
    progress.update(task, written=f"{stats['bytes'] / 1e6:,.1f} MB", ratio=f"{stats['raw'] / stats['bytes']:.2f}x")


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:,.0f} tok/s", style="cyan")


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens"), _TokensPerSecond(),
                    TimeRemainingColumn(), TextColumn("{task.fields[written]} written, ratio {task.fields[ratio]}"),
                    console=console)
