"""The multi-SAE training loop: each batch is read once and fed to every SAE of the sweep.

Per batch and SAE, the step is the BatchTopK reference's: forward and loss, backward, remove the decoder
gradient's component parallel to each (unit-norm) row and renormalise, Adam step. Metrics are accumulated as
tensors and read (one device sync) only every `log_every` batches.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from rich.console import Console
from rich.live import Live
from rich.table import Table

from sae_cache.sae_common.data_parallel import all_reduce_grads, global_metrics
from sae_cache.sae_common.distributed import all_gather_object, any_rank, world
from sae_cache.sae_common.errors import UserError
from sae_cache.sae_common.sae import SAE
from sae_cache.train.checkpoint import HISTORY

METRICS = ("loss", "mse", "fvu", "l0", "aux")


class TrainingError(UserError):
    """Training stopped on bad data, a diverged SAE or a full disk; the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C, handled: the checkpoint is saved; the message says so and how to resume (`sae` exits 130)."""


@dataclass
class Member:
    """One SAE of the sweep with its optimiser and running metrics."""

    name: str
    sae: SAE
    opt: torch.optim.Optimizer
    autocast: torch.dtype | None = None  # bfloat16: matmuls in bf16 under autocast, parameters stay float32
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    n: int = 0
    last: dict[str, float] = field(default_factory=dict)

    def step(self, x_BD: torch.Tensor, spread: torch.Tensor | None = None) -> None:
        """One training step on x_BD. spread: Σ (x − x̄)² of this batch, the FVU's denominator, when the caller has it
        (the training loop computes it once per batch for every SAE of the sweep)."""
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(x_BD.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            out = self.sae(x_BD)
        out.loss.float().backward()
        if self.sae.data_parallel:  # x_BD is this rank's slice of the global batch (sae_common/data_parallel.py)
            all_reduce_grads(self.sae.parameters())
        self.sae.constrain_decoder()
        self.opt.step()
        if self.sae.data_parallel:
            metrics = global_metrics(out.loss, out.mse, out.l0, out.aux, out.x_hat, x_BD)
        else:
            with torch.no_grad():  # fraction of variance unexplained of this batch, in raw space
                fvu = torch.dist(out.x_hat, x_BD).pow(2) / (batch_spread(x_BD) if spread is None else spread)
            metrics = {"loss": out.loss, "mse": out.mse, "fvu": fvu, "l0": out.l0, "aux": out.aux}
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach().float()
        self.n += 1

    def flush(self, tokens: int) -> dict[str, Any]:
        """Average the metrics since the last flush into a history record."""
        record = {"tokens": tokens, **{k: v.item() / self.n for k, v in self.sums.items()},
                  "dead": int(self.sae.dead_mask().sum())}
        self.sums, self.n, self.last = {}, 0, record
        return record


def batch_spread(x_BD: torch.Tensor) -> torch.Tensor:
    """Σ (x − x̄)² over the batch, x̄ its mean token: the total variance that the FVU divides by."""
    return (x_BD - x_BD.mean(0)).pow(2).sum()


def nonfinite_rows(x_BD: torch.Tensor) -> list[int] | None:
    bad = ~torch.isfinite(x_BD).all(-1)
    return bad.nonzero().flatten().tolist() if bool(bad.any()) else None


class StopFlag:
    """Ctrl-C sets a flag that the loop checks between batches, so every SAE stops at the same batch.

    escalate: a second Ctrl-C stops at once. Not under torchrun: there every worker gets Ctrl-C twice, from the
    terminal and forwarded by torchrun's agent, which itself kills workers that outlast its shutdown timeout.
    """

    def __init__(self, escalate: bool = True) -> None:
        self.set, self.escalate = False, escalate

    def __enter__(self) -> "StopFlag":
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.set and self.escalate:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._old)


def train_loop(members: list[Member], batches: Iterable[torch.Tensor], *, start_batch: int, n_batches: int,
               batch_size: int, log_every: int, checkpoint_every_batches: int, run_dir: Path,
               save: Callable[[int], None], source_rows: Callable[[int, list[int]], list[int]],
               console: Console, names: list[str] | None = None, write_history: bool = True,
               on_record: Callable[[str, dict], None] | None = None) -> int:
    """Train until `n_batches`; returns the number of batches done (checkpointed). On Ctrl-C it checkpoints
    the batches done and raises TrainingInterrupted.

    Under torchrun `members` are this rank's SAEs (sweep-parallel: its share; data-parallel: every SAE, on its
    slice of each batch) and `names` the whole sweep's: the ranks agree after each batch whether to stop (Ctrl-C
    reached any of them; one CPU all_reduce, bench/scaling_bench.py measures it), and at log points gather the
    metrics, so rank 0's table shows every SAE and a diverged SAE stops every rank at the same batch. In one
    process these are free. write_history=False: metrics are kept, not written (a data-parallel rank other than
    0). `on_record(name, record)`: called with each history record this rank writes (wandb logging).
    """
    histories = {m.name: open(run_dir / m.name / HISTORY, "a") for m in members} if write_history else {}
    done, t0, done0, stopping = start_batch, time.perf_counter(), start_batch, False
    latest: dict[str, dict[str, Any]] = {name: {} for name in names or [m.name for m in members]}
    try:
        with StopFlag(escalate=not world().active) as stop, Live(_table(latest, done, n_batches, batch_size, 0.0),
                                                                 console=console, refresh_per_second=2,
                                                                 transient=False) as live:
            for x_BD in batches:
                if (bad := nonfinite_rows(x_BD)) is not None:
                    raise TrainingError(f"batch {done} holds NaN/inf in {len(bad)} row(s): cache rows "
                                        f"{source_rows(done, bad)[:10]}; training stopped, the last good checkpoint "
                                        "is kept")
                spread = batch_spread(x_BD)  # once for the sweep
                for m in members:
                    m.step(x_BD, spread)
                done += 1
                at_end, stopping = done == n_batches, any_rank(stop.set)
                if done % log_every == 0 or at_end or stopping:
                    latest.update(_record(members, histories, done * batch_size, on_record))
                    rate = (done - done0) * batch_size / (time.perf_counter() - t0)
                    live.update(_table(latest, done, n_batches, batch_size, rate))
                if done % checkpoint_every_batches == 0 or at_end or stopping:
                    save(done)
                if stopping:
                    break
    finally:
        for f in histories.values():
            f.close()
        if not console.is_terminal:
            console.line()  # rich leaves a log's last table line unterminated; the next message would join it
    if stopping and done < n_batches:
        raise TrainingInterrupted(f"sae train interrupted at batch {done:,} of {n_batches:,}: checkpoint saved in "
                                  f"{run_dir}; run the same command again to resume")
    return done


def _record(members: list[Member], histories: dict, tokens: int,
            on_record: Callable[[str, dict], None] | None = None) -> dict[str, dict[str, Any]]:
    """Log this rank's SAEs; returns every rank's records (all_gather), each checked on every rank."""
    own = {m.name: m.flush(tokens) for m in members if m.n}
    records = {name: record for part in all_gather_object(own) for name, record in part.items()}
    for name, record in records.items():
        if not all(map(_finite, record.values())):
            raise TrainingError(f"SAE {name} diverged (non-finite loss at {tokens:,} tokens: {record}); training "
                                "stopped, the last good checkpoint is kept. Try a lower --lr.")
    for name, record in own.items():
        if name in histories:
            histories[name].write(json.dumps(record) + "\n")
            histories[name].flush()
            if on_record is not None:
                on_record(name, record)
    return records


def _finite(v: Any) -> bool:
    return not isinstance(v, float) or v == v and abs(v) != float("inf")


def _table(latest: dict[str, dict[str, Any]], done: int, n_batches: int, batch_size: int, rate: float) -> Table:
    eta = (n_batches - done) * batch_size / rate if rate else float("nan")
    table = Table(title=f"batch {done:,}/{n_batches:,} · {done * batch_size:,} tokens · {rate:,.0f} tok/s"
                        + (f" · ETA {eta:,.0f}s" if rate else ""), title_justify="left")
    for col in ("SAE", "tokens", "loss", "MSE", "FVU", "L0", "dead", "tok/s", "ETA"):
        table.add_column(col, justify="left" if col == "SAE" else "right", no_wrap=True)
    for name, r in latest.items():
        table.add_row(name, f"{r.get('tokens', 0):,}", *(f"{r[k]:.4g}" if k in r else "-" for k in
                      ("loss", "mse", "fvu", "l0")), str(r.get("dead", "-")), f"{rate:,.0f}",
                      f"{eta:,.0f}s" if rate else "-")
    return table
