"""The `sae` command: one click group; each command imports its stage only when it runs (`sae --help` is instant).

Options take their defaults and help from the config dataclasses, and `Config(**options)` is the bridge.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import click

from sae_cache.sae_common.allocator import retain_freed_memory
from sae_cache.sae_common.checks import (COMPRESSIONS, INPUT_NORMS, MODEL_DTYPES, PARALLEL_MODES, STORED_DTYPES,
                                         TRAIN_DTYPES, flag)
from sae_cache.sae_common.config import EvalConfig, HarvestConfig, TrainConfig, parse_count
from sae_cache.sae_common.field_docs import default, field_doc
from sae_cache.sae_common.errors import UserError
from sae_cache.sae_common.features_config import FeaturesConfig
from sae_cache.sae_common.sae_config import SWEEPS, SAEConfig


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
    "features": "sae features interrupted: it writes its pages only when its scan finishes; run it again",
    "info": "sae cache info interrupted",
    "verify": "sae cache verify interrupted: nothing was verified; run it again",
}


def rank_prefix() -> str:
    """Under torchrun, which rank speaks: `rank 1 of 2: ...` (torchrun's own summary names the failed rank too)."""
    size = os.environ.get("WORLD_SIZE", "1")
    return f"rank {os.environ.get('RANK', '0')} of {size}: " if size not in ("", "1") else ""


def echo_result(path: Path) -> None:
    """stdout carries a command's result path once: under torchrun from rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        click.echo(str(path))


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

    echo_result(run_harvest(cfg, out, overwrite=overwrite))


def _number(text: str, kind: type) -> int | float:
    """One value of a list flag: a count for ints (16, 4K), a number or a ratio for floats (0.0625, 1/16)."""
    if kind is int:
        return parse_count(text)
    try:
        return float(text)
    except ValueError:
        if "/" not in text:
            raise
        return float(Fraction(text))  # 1/16 reads better than 0.0625 (and 1/32 for the AuxK coefficient)


def _parts(value: str, sep: str) -> list[str]:
    if not value.replace(sep, "").strip():
        raise click.BadParameter(f"{value!r} holds no value")
    return [part.strip() for part in value.split(sep) if part.strip()]


def _list_of(kind: type) -> Callable:
    """A callback for repeatable options that also take comma lists: --k 16 --k 32 or --k 16,32."""

    def one(part: str) -> Any:
        try:
            return _number(part, kind) if kind in (int, float) else kind(part)
        except (ValueError, ZeroDivisionError):  # the range (e.g. positive) is the config's to check, with the flag
            raise click.BadParameter(f"{part!r} is not {'a whole number' if kind is int else 'a number'}") from None

    def parse(ctx: click.Context, param: click.Parameter, values: tuple) -> tuple:
        return tuple(one(part) for value in values for part in _parts(str(value), ","))

    return parse


def _sets_of_fractions(ctx: click.Context, param: click.Parameter, values: tuple) -> tuple:
    """--group-fractions 1/16,1/16,1/8,1/4,1/2: one set; several by repeating the flag or separating with ';'."""
    numbers = _list_of(float)
    return tuple(numbers(ctx, param, (one,)) for value in values for one in _parts(str(value), ";"))


class _One(click.ParamType):
    """A setting that takes one value for the whole run: a comma list (the sweep syntax) is refused, naming the
    settings a run can sweep."""

    def __init__(self, base: click.ParamType):
        self.base, self.name = base, base.name

    def get_metavar(self, *args: Any, **kwargs: Any) -> str | None:
        return self.base.get_metavar(*args, **kwargs)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and "," in value:
            sweepable = ", ".join(flag(s.values) for s in SWEEPS)
            self.fail(f"{value!r}: takes one value for the whole run (the README's `sae train` section says why); "
                      f"a run can sweep {sweepable}", param, ctx)
        return self.base.convert(value, param, ctx)


def many(name: str, kind: type) -> Callable:
    """A TrainConfig list field: a repeatable flag taking comma lists (group_fractions: sets of fractions)."""
    shown = default(TrainConfig, name)
    shown = ",".join(map(str, shown)) if isinstance(shown, tuple) else str(shown)
    shown = f" [default: {shown}]" if shown else ""  # none: the field's help says what the default is
    groups = name == "group_fractions"
    how = "Several sets: repeat the flag or separate them with ';'" if groups else "Repeat or comma-separate"
    if name in {s.values for s in SWEEPS}:
        how += " to sweep it (over the architectures that use it)"
    return option(TrainConfig, name, flag(name), multiple=True, default=(), show_default=False,
                  callback=_sets_of_fractions if groups else _list_of(kind),
                  metavar="F,F,...[;...]" if groups else {int: "N,...", float: "X,..."}.get(kind, "NAME,..."),
                  help=f"{doc(TrainConfig, name)} {how}.{shown}")


def setting(name: str, kind: click.ParamType, **kwargs: Any) -> Callable:
    """An SAE setting of `sae train`: several values if sae_config.SWEEPS declares it sweepable, else one."""
    if name in {s.values for s in SWEEPS}:
        return many(name, {click.INT: int, click.FLOAT: float}[kind])
    return option(TrainConfig, name, type=_One(kind), **kwargs)


@main.command()
@option(TrainConfig, "cache", type=str)
@option(TrainConfig, "hook", type=str)
@many("archs", str)
@setting("ks", click.INT)
@many("dict_sizes", int)
@many("expansions", int)
@setting("l1_coeffs", click.FLOAT)
@setting("l0_coeffs", click.FLOAT)
@many("lrs", float)
@setting("group_fractions", click.FLOAT)
@option(TrainConfig, "batch_size", type=int)
@option(TrainConfig, "tokens", type=str, callback=_count)
@option(TrainConfig, "seed", type=int)
@setting("input_norm", click.Choice(INPUT_NORMS))
@setting("dead_tokens", click.STRING, callback=_count)
@setting("aux_k", click.INT)
@setting("aux_coeff", click.FLOAT)
@option(TrainConfig, "aux_normalised", "--aux-normalised/--no-aux-normalised")
@setting("bandwidth", click.FLOAT)
@setting("jumprelu_init_threshold", click.FLOAT)
@setting("stats_window", click.INT)
@setting("zipf_exponent", click.FLOAT, show_default="fitted")
@setting("zipf_underuse_scale", click.FLOAT)
@option(TrainConfig, "apply_b_dec_to_input", "--apply-b-dec-to-input/--no-apply-b-dec-to-input")
@option(TrainConfig, "holdout_fraction", type=float)
@option(TrainConfig, "checkpoint_every", type=str, callback=_count)
@option(TrainConfig, "log_every", type=int)
@option(TrainConfig, "device")
@option(TrainConfig, "dtype", type=click.Choice(TRAIN_DTYPES))
@option(TrainConfig, "shuffle_tokens", type=str, callback=_count)
@option(TrainConfig, "parallel", type=click.Choice(PARALLEL_MODES))
@option(TrainConfig, "wandb", type=str, metavar="PROJECT")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run directory (default: cache/runs/<cache>-<hash of the sweep>, so a rerun resumes).")
@user_errors
def train(out: Path | None, **options: Any) -> None:
    """Train a sweep of SAEs on a cache in ONE pass: each batch is read once and fed to every SAE.

    Rerunning the same command resumes every SAE from its last checkpoint.
    """
    from sae_cache.train.run import train as run_train

    for key, value in options.items():
        if value == ():  # a list flag not given: the config's default
            options[key] = default(TrainConfig, key)
    echo_result(run_train(TrainConfig(**options), out))


@main.command("eval")
@click.argument("saes", nargs=-1, metavar="[SAE_DIR]...")
@option(EvalConfig, "cache", type=str)
@option(EvalConfig, "model", type=str)
@option(EvalConfig, "model_dtype", type=click.Choice(MODEL_DTYPES))
@option(EvalConfig, "dataset", type=str)
@option(EvalConfig, "split", type=str, show_default="train")
@option(EvalConfig, "text_column", type=str, show_default="text")
@option(EvalConfig, "tokens", type=str, callback=_count)
@option(EvalConfig, "batch_size", type=int)
@option(EvalConfig, "device")
@option(EvalConfig, "include_bos", "--include-bos", is_flag=True)
@option(EvalConfig, "batch_mode", "--batch-mode", is_flag=True)
@option(EvalConfig, "out", type=str)
@option(EvalConfig, "wandb", type=str, metavar="PROJECT")
@user_errors
def eval_command(**options: Any) -> None:
    """Splice SAEs into the model on held-out tokens (or --dataset): NMSE, L0, dead latents, CE degradation and more.

    SAE_DIR: SAE directories or training run directories (default: every SAE of the newest run under
    ./cache/runs). Writes eval.json beside each SAE, eval_summary.json and plots/ in the run directory; with
    --out, all of them under that directory instead (eval.json in <out>/<SAE name>/).
    """
    cfg = EvalConfig(**options)  # checks every value before the heavy imports
    from sae_cache.evaluate.run import evaluate

    evaluate(cfg)

@main.command()
@click.argument("saes", nargs=-1, metavar="[SAE_DIR]...")
@option(FeaturesConfig, "top", type=int)
@option(FeaturesConfig, "cache", type=str)
@option(FeaturesConfig, "model", type=str)
@option(FeaturesConfig, "tokens", type=str, callback=_count)
@option(FeaturesConfig, "batch_size", type=int)
@option(FeaturesConfig, "device")
@option(FeaturesConfig, "out", type=str)
@user_errors
def features(**options: Any) -> None:
    """Write a feature browser per SAE: each latent's top held-out contexts, histogram and logit lens.

    SAE_DIR: SAE directories or training run directories (default: every SAE of the newest run under
    ./cache/runs). One self-contained HTML page per SAE (features.html in its directory, or <out>/<SAE>.html),
    from one scan of the held-out rows for all of them; prints each page's path.
    """
    cfg = FeaturesConfig(**options)  # checks every value before the heavy imports
    from sae_cache.evaluate.features import features as write_features

    for page in write_features(cfg):
        click.echo(str(page))


@main.group()
def cache() -> None:
    """Inspect and verify activation caches."""


@cache.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the cache's metadata as JSON.")
@user_errors
def info(path: Path, as_json: bool) -> None:
    """What is in a cache: model, hooks, tokens, size on disk and compression ratio."""
    from sae_cache.sae_common.cache_format import open_cache, row_bytes

    c = open_cache(path)
    if as_json:
        click.echo(json.dumps(c.meta, indent=2))
        return
    disk = c.disk_bytes()
    raw = c.n_tokens * (len(c.hooks) * row_bytes(c.d_model, c.dtype) + 4)
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
