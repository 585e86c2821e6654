"""Optional logging to Weights & Biases: `sae train --wandb PROJECT` (one wandb run per SAE, the sweep as the
runs' group, each history.jsonl record logged as it is written) and `sae eval --wandb PROJECT` (one run with the
table of every SAE's scalars and the plots).

wandb is an optional extra (`pip install 'sae-cache[wandb]'`): it is imported only when --wandb is given, and
its absence then stops the command before any work with a one-line message. Runs are written under the
training run's directory (`<run>/wandb/`) unless WANDB_DIR says elsewhere; WANDB_MODE=offline keeps them
local (`wandb sync` uploads them later).
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from sae_cache.sae_common.errors import UserError

INSTALL = "pip install 'sae-cache[wandb]'"


def import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise UserError(f"--wandb needs the wandb package, which is not installed: {INSTALL} (or leave out "
                        "--wandb)") from None
    return wandb


def _init(wandb: Any, project: str, where: Path, **kwargs: Any) -> Any:
    where.mkdir(parents=True, exist_ok=True)
    # create_new: several runs live at once in this process (one per SAE)
    return wandb.init(project=project, dir=os.environ.get("WANDB_DIR") or str(where), reinit="create_new", **kwargs)


def run_id(*parts: str) -> str:
    """A stable wandb run id (wandb allows letters, digits, - and _)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


class TrainLogger:
    """One wandb run per SAE of a training run; `log` is the trainer's on_record callback."""

    def __init__(self, project: str, run_dir: Path, configs: dict[str, dict[str, Any]]) -> None:
        wandb = import_wandb()
        group = run_dir.resolve().name
        # resume="allow" with ids from the run directory and the SAE's name: a resumed `sae train` continues its runs
        self.runs = {name: _init(wandb, project, run_dir, id=run_id(str(run_dir.resolve()), name), resume="allow",
                                 name=name, group=group, job_type="train", config=config)
                     for name, config in configs.items()}
        for run in self.runs.values():
            run.define_metric("*", step_metric="tokens")  # plotted against tokens, as history.jsonl records them

    def log(self, name: str, record: dict[str, Any]) -> None:
        self.runs[name].log(record)

    def finish(self, failed: bool = False) -> None:
        for run in self.runs.values():
            run.finish(exit_code=1 if failed else 0)


@contextmanager
def train_runs(project: str | None, run_dir: Path, configs: dict[str, dict[str, Any]]
               ) -> Iterator[Callable[[str, dict], None] | None]:
    """The trainer's on_record callback for the SAEs named in `configs` (None without --wandb); the runs are
    finished on the way out, marked failed if training raised."""
    if project is None:
        yield None
        return
    logger = TrainLogger(project, run_dir, configs)
    try:
        yield logger.log
    except BaseException:
        logger.finish(failed=True)
        raise
    logger.finish()


def log_eval(project: str, out: Path, summary: dict[str, Any], plots: list[str]) -> None:
    """One wandb run for an evaluation: its table (one row per SAE, the scalars of eval_summary.json) and plots."""
    wandb = import_wandb()
    rows = summary["saes"]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    run = _init(wandb, project, out, name=f"eval-{out.resolve().name}", group=out.resolve().name, job_type="eval",
                config={k: v for k, v in summary.items() if k not in ("saes", "plots")})
    try:
        run.log({"eval": wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows]),
                 **{f"plots/{Path(p).stem}": wandb.Image(p) for p in plots}})
    finally:
        run.finish()
