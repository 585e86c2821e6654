"""Running the model shard by shard and recording each shard once every rank's files are on disk.

The shard is the unit of work: shard s holds contexts [s·C, (s+1)·C) of the one deterministic context stream
(C = rows_per_shard / context_size), and batches never straddle a shard, so a shard's bytes do not depend on
which process computes it or when. Under torchrun rank r computes the shards s with s % N == r: every rank
reads the whole text, the ranks tokenize it between them (text.py TokenizeSplit: each group of documents by one
rank, the token ids all-gathered), every rank packs the whole stream and passes over the contexts of other
ranks' shards without running the model.
Work goes in rounds of N consecutive shards; each rank writes its shard's files whole (in a background thread,
while it computes the next round), the ranks gather what they wrote once per round (every rank, with or without
a shard in it: no rank ever waits alone), and rank 0 records the round's shards in order. So the cache records
only a prefix of shards whose files are on disk, and one process is simply a world of one.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from sae_cache.harvest.text import Position, TokenizeSplit, pack_contexts
from sae_cache.sae_common.background import background
from sae_cache.sae_common.cache_format import empty_rows, row_bytes, to_storage
from sae_cache.sae_common.cache_writer import CacheWriter, write_shard_files
from sae_cache.sae_common.config import HarvestConfig
from sae_cache.sae_common.distributed import all_gather_object, barrier, side_group, world
from sae_cache.sae_common.errors import UserError
from sae_cache.sae_common.model import LoadedModel, run_hooks

SKIPS_LISTED = 100  # skipped documents listed in the cache's metadata (all are counted)
SKIPS_SHOWN = 10  # skipped documents named on the console per run
KILL_HOOK = "SAE_TEST_HARVEST_KILL"  # tests only: "RANK:K" makes rank RANK kill -9 itself after writing K shards


class HarvestError(UserError):
    """A harvest that cannot start or could not finish; the message says what was kept."""


def write_shards(cfg: HarvestConfig, loaded: LoadedModel, hooks: list[str], docs: Iterator, out: Path,
                 writer: CacheWriter | None, meta: dict[str, Any], n_target: int, console: Console) -> None:
    """Harvest into the cache at `out` from its recorded end to `n_target` tokens. `meta`: its attributes;
    `writer`: rank 0's, which records the shards (None on the other ranks)."""
    w = world()
    position = Position(**meta["dataset"]["position"])
    skipped: list[dict] = []  # documents that could not be read, appended in order by the tokenizing thread
    # Tokenizing runs a few batches ahead in its own thread (the tokenizer releases the GIL while it encodes).
    split = None
    if w.active:  # the ranks tokenize the stream between them (on their own group: it runs in the thread below)
        group, body = side_group(), cfg.context_size - int(cfg.prepend_bos)
        split = TokenizeSplit(w.rank, w.size, lambda obj: all_gather_object(obj, group),
                              max_tokens=(n_target - int(meta["n_tokens"])) // cfg.context_size * body)
    contexts = background(pack_contexts(docs, loaded.tokenizer, cfg.context_size, cfg.prepend_bos, position, skipped,
                                        split), depth=4 * cfg.batch_size, name="harvest-tokenize")
    rows_s = meta["layout"]["rows_per_shard"]
    state = {"bytes": 0, "raw": 0, "recorded": int(meta["n_tokens"]), "shown": 0, "written_here": 0,
             "raw_row_bytes": len(hooks) * row_bytes(meta["d_model"], cfg.dtype) + 4}
    index, done, n_skips = len(meta["shards"]), int(meta["n_tokens"]), 0
    in_flight: tuple[list[dict], Future | None] | None = None  # the last round: its shards, this rank's write
    with _progress(console) as progress, ThreadPoolExecutor(max_workers=1) as pool:
        task = progress.add_task("harvest", total=n_target, completed=done, written="0.0 MB", ratio="-")
        ended = False
        while not ended:
            plan: list[dict] = []
            computed = None  # this rank's shard of the round, written once the last round is recorded
            for _ in range(w.size):  # one round: the next N shards, shard s computed by rank s % N
                rows = min(rows_s, n_target - done)
                if rows <= 0:
                    ended = True
                    break
                if index % w.size == w.rank:
                    acts, tokens, position = _gather_shard(cfg, loaded, hooks, contexts, rows, position,
                                                           lambda n: progress.advance(task, n))
                    got = len(tokens)
                    if got:
                        computed = (index, acts, tokens, position)
                else:
                    got, position = _skip_shard(contexts, rows // cfg.context_size, position, cfg.context_size)
                if got:
                    skips = _skips_before(skipped, n_skips, position)
                    n_skips += len(skips)
                    plan.append({"index": index, "rows": got, "position": position, "skips": skips,
                                 "owner": index % w.size})
                    index, done = index + 1, done + got
                if got < rows:
                    ended = True  # the dataset ran out
                    break
            if in_flight is not None:  # at most one round in flight: overlap without unbounded memory
                _record_round(writer, *in_flight, state, console, progress, task)
            job = pool.submit(_write, out, meta, *computed, state) if computed is not None else None
            in_flight = (plan, job)
        _record_round(writer, *in_flight, state, console, progress, task)
    _finish(cfg, writer, n_target, state, console)


def _record_round(writer: CacheWriter | None, plan: list[dict], job: Future | None, state: dict, console: Console,
                  progress: Progress, task) -> None:
    """Wait for this rank's write, gather every rank's, and (rank 0) record the round's shards in order."""
    mine = job.result() if job is not None else {}
    reports: dict[int, dict] = {}
    for report in all_gather_object(mine):  # every rank, every round, even with nothing written
        reports.update(report)
    for shard in plan:
        got = reports.get(shard["index"])
        if got is None or (got["rows"], got["position"]) != (shard["rows"], shard["position"]):
            raise HarvestError(f"rank {shard['owner']} read a different text stream than this rank at shard "
                               f"{shard['index']} (the dataset changed while the ranks read it?); the cache keeps "
                               f"its {state['recorded']:,} recorded tokens")
        if writer is not None:
            _show_skips(console, shard["skips"], state["shown"])
            _record(writer, shard, got["sha"])
            if shard["owner"] != world().rank:
                progress.advance(task, shard["rows"])
        state["shown"] += len(shard["skips"])
        state["recorded"] += shard["rows"]
        state["bytes"] += got["bytes"]
        state["raw"] += shard["rows"] * state["raw_row_bytes"]
    if plan:
        progress.update(task, written=f"{state['bytes'] / 1e6:,.1f} MB",
                        ratio=f"{state['raw'] / max(state['bytes'], 1):.2f}x")


def _record(writer: CacheWriter, shard: dict, sha: dict[str, str]) -> None:
    dataset = {**writer.meta["dataset"], "position": {"doc": shard["position"].doc,
                                                      "offset": shard["position"].offset}}
    skips = shard["skips"]
    if skips or "skipped" in dataset:  # recorded with the shard, so a resumed run continues the same record
        before = dataset.get("skipped", {"count": 0, "documents": []})
        dataset["skipped"] = {"count": before["count"] + len(skips),
                              "documents": (before["documents"] + skips)[:SKIPS_LISTED]}
    with _disk_full_is_clear(f"recording shard {shard['index']}", writer.path, writer.n_tokens):
        writer.record_shard(shard["rows"], sha, {"dataset": dataset})


def _write(out: Path, meta: dict, index: int, acts: dict[str, np.ndarray], tokens: np.ndarray, position: Position,
           state: dict) -> dict[int, dict]:
    with _disk_full_is_clear(f"writing shard {index}", out, state["recorded"]):
        sha, written = write_shard_files(out, meta, index, acts, tokens)
    state["written_here"] += 1
    _test_kill_hook(state["written_here"])
    return {index: {"rows": len(tokens), "position": position, "sha": sha, "bytes": written}}


@contextmanager
def _disk_full_is_clear(doing: str, path: Path, recorded: int) -> Iterator[None]:
    """A full disk as one line saying what the cache keeps (other OSErrors pass through)."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise HarvestError(f"the disk is full while {doing} of {path}; the cache keeps its {recorded:,} complete "
                               "tokens and resumes when you rerun the same command with space free") from e
        raise


def _test_kill_hook(written: int) -> None:
    """Tests of a rank killed mid-harvest: the shard's files are on disk, not yet recorded."""
    spec = os.environ.get(KILL_HOOK)
    if spec and spec == f"{world().rank}:{written}":
        os.kill(os.getpid(), signal.SIGKILL)


def _finish(cfg: HarvestConfig, writer: CacheWriter | None, n_target: int, state: dict, console: Console) -> None:
    n_tokens = state["recorded"]
    if n_tokens == 0:
        raise HarvestError(f"the dataset {cfg.dataset!r} holds less than one context ({cfg.context_size} tokens) of "
                           "readable text; nothing was written")
    if writer is not None:
        writer.finish(**({"complete": True} if n_tokens == n_target else {"complete": False, "exhausted": True}))
    barrier()  # every rank returns once the cache says how it ended
    skip_note = _skip_summary(writer.meta["dataset"]) if writer is not None else ""
    if n_tokens < n_target:
        raise HarvestError(f"the dataset {cfg.dataset!r} ran out after {n_tokens:,} tokens ({n_target:,} asked "
                           f"for); the cache keeps those {n_tokens:,} tokens{skip_note}")
    console.print(f"[green]done[/]: {n_tokens:,} tokens, {state['bytes'] / 1e6:,.1f} MB on disk "
                  f"(compression {state['raw'] / max(state['bytes'], 1):.2f}x){escape(skip_note)}")


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


def _skip_shard(contexts: Iterator, n_ctx: int, position: Position, context_size: int) -> tuple[int, Position]:
    """Pass over another rank's shard: its contexts are read (to know where the next shard starts), not run."""
    n = 0
    for _, position in itertools.islice(contexts, n_ctx):
        n += 1
    return n * context_size, position


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


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:,.0f} tok/s", style="cyan")


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens"), _TokensPerSecond(),
                    TimeRemainingColumn(), TextColumn("{task.fields[written]} written, ratio {task.fields[ratio]}"),
                    console=console)
