"""The `sae` command: one click group; each command imports its stage only when it runs (`sae --help` is instant).

Options take their defaults and help from the config dataclasses, and `Config(**options)` is the bridge.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import click

from sae_cache.sae_common.allocator import retain_freed_memory
from sae_cache.sae_common.checks import (COMPRESSIONS, INPUT_NORMS, MODEL_DTYPES, PARALLEL_MODES, STORED_DTYPES,
                                         TRAIN_DTYPES)
from sae_cache.sae_common.config import EvalConfig, HarvestConfig, TrainConfig, default, field_doc, parse_count
from sae_cache.sae_common.errors import UserError
from sae_cache.sae_common.sae_config import SAEConfig


def doc(cls: type, name: str) -> str:
    """A field's help. TrainConfig's SAE settings are documented once, on SAEConfig's fields."""
    if cls is TrainConfig and name in {f.name for f in fields(SAEConfig)}:
        return field_doc(SAEConfig, name)
    return field_doc(cls, name)


def option(cls: type, name: str, *decls: str, **kwargs: Any) -> Callable:
    """A click option whose default and help come from the dataclass field `name` of `cls`."""
    kwargs.setdefault("default", default(cls, name))
    kwargs.setdefault("help", doc(cls, name))
    kwargs.setdefault("show_default", True)
    return click.option(*(decls or (f"--{name.replace('_', '-')}",)), name, **kwargs)


def _count(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is None or isinstance(value, int):
        return value
    try:
        return parse_count(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


# What a Ctrl-C leaves, per command. A KeyboardInterrupt with a message says it more exactly (sae train's loop
# raises one naming the batch it checkpointed); these cover a Ctrl-C anywhere else.
INTERRUPTED = {
    "harvest": "sae harvest interrupted: every complete shard is kept; run the same command again to resume",
    "train": "sae train interrupted: its last checkpoint is kept; run the same command again to resume",
    "eval_command": "sae eval interrupted: it writes its results only when it finishes; run it again",
    "info": "sae cache info interrupted",
    "verify": "sae cache verify interrupted: nothing was verified; run it again",
}


def rank_prefix() -> str:
    """Under torchrun, which rank speaks: `rank 1 of 2: ...` (torchrun's own summary names the failed rank too)."""
    size = os.environ.get("WORLD_SIZE", "1")
    return f"rank {os.environ.get('RANK', '0')} of {size}: " if size not in ("", "1") else ""


def user_errors(fn: Callable) -> Callable:
    """Errors a user can cause become a one-line message and exit code 1, never a traceback; Ctrl-C says what
    it left and exits 130 (128 + SIGINT, so `sae train && sae eval` stops there)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise click.ClickException(rank_prefix() + str(e)) from None
        except KeyboardInterrupt as e:
            click.echo(rank_prefix() + (str(e) or INTERRUPTED.get(fn.__name__, "interrupted")), err=True)
            sys.exit(130)
        finally:
            if "torch.distributed" in sys.modules:  # only a command that ran under torchrun joined a group
                from sae_cache.sae_common.distributed import shutdown

                shutdown()

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="sae-cache", prog_name="sae")
def main() -> None:
    """Harvest language-model activations once; train and evaluate many sparse autoencoders from them."""
    retain_freed_memory()  # every step reuses its large buffers' pages instead of faulting in fresh ones


@main.command()
@option(HarvestConfig, "model")
@option(HarvestConfig, "layers", "--layer", "-l", type=int, multiple=True, show_default=False,
        help=field_doc(HarvestConfig, "layers") + " Repeatable.")
@option(HarvestConfig, "hook")
@option(HarvestConfig, "dataset")
@option(HarvestConfig, "split")
@option(HarvestConfig, "text_column")
@option(HarvestConfig, "tokens", type=str, callback=_count)
@option(HarvestConfig, "context_size", type=int)
@option(HarvestConfig, "prepend_bos", "--prepend-bos/--no-prepend-bos")
@option(HarvestConfig, "shuffle_buffer", type=int)
@option(HarvestConfig, "seed", type=int)
@option(HarvestConfig, "dtype", type=click.Choice(STORED_DTYPES))
@option(HarvestConfig, "model_dtype", type=click.Choice(MODEL_DTYPES))
@option(HarvestConfig, "compression", type=click.Choice(COMPRESSIONS))
@option(HarvestConfig, "rows_per_shard", type=int)
@option(HarvestConfig, "batch_size", type=int)
@option(HarvestConfig, "device")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Cache directory (default: cache/<model>/<hooks>.zarr).")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache made with a different config.")
@user_errors
def harvest(out: Path | None, overwrite: bool, **options: Any) -> None:
    """Run the model once over a dataset and write its activations to a compressed, sharded Zarr cache.

    Rerunning the same command resumes an interrupted harvest from its last complete shard.
    """
    options["layers"] = tuple(options["layers"])  # empty: the config's default for the hook
    cfg = HarvestConfig(**options)  # checks every value before the heavy imports
    from sae_cache.harvest.run import harvest as run_harvest

    path = run_harvest(cfg, out, overwrite=overwrite)
    click.echo(str(path))


def _list_of(kind: type) -> Callable:
    """A callback for repeatable options that also take comma lists: --k 16 --k 32 or --k 16,32."""

    def parse(ctx: click.Context, param: click.Parameter, values: tuple) -> tuple:
        out = []
        for value in values:
            if not str(value).replace(",", "").strip():
                raise click.BadParameter(f"{value!r} holds no value")
            for part in str(value).split(","):
                if part.strip():
                    try:
                        out.append(parse_count(part) if kind is int else kind(part.strip()))
                    except ValueError:  # the range (e.g. positive) is the config's to check, with the flag's name
                        what = "a whole number" if kind is int else "a number"
                        raise click.BadParameter(f"{part!r} is not {what}") from None
        return tuple(out)

    return parse


def many(name: str, flag: str, kind: type) -> Callable:
    shown = ",".join(map(str, default(TrainConfig, name)))
    shown = f" [default: {shown}]" if shown else ""  # none: the field's help says what the default is
    return option(TrainConfig, name, flag, multiple=True, callback=_list_of(kind), default=(), show_default=False,
                  help=f"{doc(TrainConfig, name)} Repeat or comma-separate.{shown}")


@main.command()
@option(TrainConfig, "cache", type=str)
@option(TrainConfig, "hook", type=str)
@many("archs", "--arch", str)
@many("ks", "--k", int)
@many("dict_sizes", "--dict-size", int)
@many("expansions", "--expansion", int)
@many("l1_coeffs", "--l1-coeff", float)
@many("l0_coeffs", "--l0-coeff", float)
@many("lrs", "--lr", float)
@many("group_fractions", "--group-fractions", float)
@option(TrainConfig, "batch_size", type=int)
@option(TrainConfig, "tokens", type=str, callback=_count)
@option(TrainConfig, "seed", type=int)
@option(TrainConfig, "input_norm", type=click.Choice(INPUT_NORMS))
@option(TrainConfig, "dead_tokens", type=str, callback=_count)
@option(TrainConfig, "aux_k", type=int)
@option(TrainConfig, "aux_coeff", type=float)
@option(TrainConfig, "aux_normalised", "--aux-normalised/--no-aux-normalised")
@option(TrainConfig, "bandwidth", type=float)
@option(TrainConfig, "jumprelu_init_threshold", type=float)
@option(TrainConfig, "stats_window", type=int)
@option(TrainConfig, "zipf_exponent", type=float, show_default="fitted")
@option(TrainConfig, "zipf_underuse_scale", type=float)
@option(TrainConfig, "apply_b_dec_to_input", "--apply-b-dec-to-input/--no-apply-b-dec-to-input")
@option(TrainConfig, "holdout_fraction", type=float)
@option(TrainConfig, "checkpoint_every", type=str, callback=_count)
@option(TrainConfig, "log_every", type=int)
@option(TrainConfig, "device")
@option(TrainConfig, "dtype", type=click.Choice(TRAIN_DTYPES))
@option(TrainConfig, "shuffle_tokens", type=str, callback=_count)
@option(TrainConfig, "parallel", type=click.Choice(PARALLEL_MODES))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run directory (default: cache/runs/<cache>-<hash of the sweep>, so a rerun resumes).")
@user_errors
def train(out: Path | None, **options: Any) -> None:
    """Train a sweep of SAEs on a cache in ONE pass: each batch is read once and fed to every SAE.

    Rerunning the same command resumes every SAE from its last checkpoint.
    """
    from sae_cache.train.run import train as run_train

    for key in ("archs", "ks", "dict_sizes", "expansions", "l1_coeffs", "l0_coeffs", "lrs", "group_fractions"):
        if not options[key]:
            options[key] = default(TrainConfig, key)
    run_dir = run_train(TrainConfig(**options), out)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        click.echo(str(run_dir))



@main.command("eval")
@click.argument("saes", nargs=-1, metavar="[SAE_DIR]...")
@option(EvalConfig, "cache", type=str)
@option(EvalConfig, "model", type=str)
@option(EvalConfig, "model_dtype", type=click.Choice(MODEL_DTYPES))
@option(EvalConfig, "dataset", type=str)
@option(EvalConfig, "tokens", type=str, callback=_count)
@option(EvalConfig, "batch_size", type=int)
@option(EvalConfig, "device")
@option(EvalConfig, "include_bos", "--include-bos", is_flag=True)
@option(EvalConfig, "batch_mode", "--batch-mode", is_flag=True)
@option(EvalConfig, "out", type=str)
@user_errors
def eval_command(**options: Any) -> None:
    """Splice SAEs into the model on held-out tokens: NMSE, L0, dead latents, CE degradation and more.

    SAE_DIR: SAE directories or training run directories (default: every SAE of the newest run under
    ./cache/runs). Writes eval.json beside each SAE, eval_summary.json and plots/ in the run directory; with
    --out, all of them under that directory instead (eval.json in <out>/<SAE name>/).
    """
    cfg = EvalConfig(**options)  # checks every value before the heavy imports
    from sae_cache.evaluate.run import evaluate

    evaluate(cfg)

@main.group()
def cache() -> None:
    """Inspect and verify activation caches."""


@cache.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the cache's metadata as JSON.")
@user_errors
def info(path: Path, as_json: bool) -> None:
    """What is in a cache: model, hooks, tokens, size on disk and compression ratio."""
    from sae_cache.sae_common.cache_format import itemsize, open_cache

    c = open_cache(path)
    if as_json:
        click.echo(json.dumps(c.meta, indent=2))
        return
    disk = c.disk_bytes()
    raw = c.n_tokens * (len(c.hooks) * c.d_model * itemsize(c.dtype) + 4)
    state = "complete" if c.meta.get("complete") else ("dataset ran out" if c.meta.get("exhausted") else "incomplete")
    if "complete" not in c.meta:  # a cache written by another tool: its n_tokens rows are complete by definition
        state = "no completion record"
    n_shards = len(c.meta["shards"]) if c.shard_checksums else -(-c.n_tokens // c.layout["rows_per_shard"])
    rows = [("path", str(c.path)), ("model", c.meta["model"]), ("hooks", ", ".join(c.hooks)),
            ("d_model", c.d_model), ("tokens", f"{c.n_tokens:,} of {c.meta.get('target_tokens', c.n_tokens):,} ({state})"),
            ("context size", c.meta["context_size"]), ("dtype", f"{c.dtype}, {c.compression}"),
            ("shards", f"{n_shards} of up to {c.layout['rows_per_shard']:,} rows"), ("checks", c.checks),
            ("dataset", (c.meta.get("dataset") or {}).get("source", "not recorded")),
            ("size on disk", f"{disk / 1e6:,.1f} MB (raw {raw / 1e6:,.1f} MB, ratio {raw / max(disk, 1):.2f}x)")]
    for key, value in rows:
        click.echo(f"{key:>13}: {value}")


@cache.command()
@click.argument("path", type=click.Path(path_type=Path))
@user_errors
def verify(path: Path) -> None:
    """Check every shard is present and matches its checksum; exit 1 naming each bad shard."""
    from sae_cache.sae_common.cache_format import open_cache, verified_summary, verify as verify_cache

    c = open_cache(path)
    problems = verify_cache(c)
    if problems:
        for p in problems:
            click.echo(f"BAD: {p}", err=True)
        raise click.ClickException(f"{path} failed verification ({len(problems)} problem(s))")
    click.echo(f"OK: {verified_summary(c)}")


if __name__ == "__main__":
    main()
