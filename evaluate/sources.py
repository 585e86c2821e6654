"""What `sae eval` reads, and every check on it: the SAEs (directories, run directories, or by default the
newest run), the cache they were trained on with its held-out rows (never training rows), and the model that
made the cache, loaded the way harvest loaded it but with all its layers (CE needs the logits).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from sae_cache.sae_common.cache_format import TOKENS, Cache, check_rows, damaged, hook_arrays, open_cache
from sae_cache.sae_common.config import EvalConfig
from sae_cache.sae_common.errors import UserError
from sae_cache.sae_common.holdout import heldout_mask, row_ranges
from sae_cache.sae_common.model import LoadedModel, count_layers, load_model, resolve_model_dtype, resolve_source, run_hooks
from sae_cache.sae_common.sae import SAE
from sae_cache.sae_common.sae_io import NATIVE_FILE, RECORD_FILE, RUN_FILE, find_runs, load_record, load_sae

MEAN_READ_ROWS = 1 << 16  # rows per read when averaging the held-out activations (bounded memory)


class EvalError(UserError):
    """SAEs, a cache or a model that cannot be evaluated together; the message says what would work."""


@dataclass
class Target:
    """One SAE to evaluate, with its record (sae_record.json)."""

    name: str
    path: Path
    sae: SAE
    hook: str
    record: dict


# ---------------------------------------------------------------- the SAEs

def find_sae_dirs(paths: tuple[str, ...], root: Path, console: Console) -> list[Path]:
    """SAE directories: those given, every SAE of each run directory given, or the newest run's."""
    if not paths:
        runs = find_runs(root)
        if not runs:
            raise EvalError(f"no training run under {root}/runs; run `sae train` first, or name SAE directories")
        console.print(f"using the newest run under {root}/runs: {runs[0]}")
        paths = (str(runs[0]),)
    dirs = []
    for path in map(Path, paths):
        dirs += run_sae_dirs(path) if (path / RUN_FILE).is_file() else [path]
    return dirs


def run_sae_dirs(run: Path) -> list[Path]:
    try:
        info = json.loads((run / RUN_FILE).read_bytes())
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        raise EvalError(f"{run / RUN_FILE} is damaged or truncated (not valid JSON); name the run's SAE directories "
                        "instead, or rerun its `sae train` command") from None
    if not isinstance(info, dict) or not isinstance(info.get("saes"), list):
        raise EvalError(f"{run / RUN_FILE} is damaged: it lists no SAEs; name the run's SAE directories instead")
    if not info.get("complete"):
        raise EvalError(f"the training run {run} is not complete, so its SAEs are not saved yet; rerun its "
                        "`sae train` command to finish it")
    return [run / name for name in info["saes"]]


def load_targets(dirs: list[Path]) -> list[Target]:
    targets = []
    for d in dirs:
        if not d.is_dir():
            raise EvalError(f"{d} does not exist; give SAE directories (with {RECORD_FILE} and {NATIVE_FILE}) "
                            f"or training run directories (with {RUN_FILE})")
        missing = [name for name in (RECORD_FILE, NATIVE_FILE) if not (d / name).is_file()]
        if missing:
            raise EvalError(f"{d} is not an SAE directory: {' and '.join(missing)} missing (`sae train` writes "
                            f"{RECORD_FILE} and {NATIVE_FILE} for each SAE; a run directory has {RUN_FILE})")
        record = load_record(d)
        targets.append(Target(d.name, d, load_sae(d), record["hook_name"], record))
    if len({t.name for t in targets}) < len(targets):  # same names from different runs: say which run
        for t in targets:
            t.name = f"{t.path.parent.name}/{t.name}"
    return targets


def output_dir(targets: list[Target], out: str | None) -> Path:
    """--out, else the directory the SAEs share (their run directory when they come from one run)."""
    if out is not None:
        return Path(out)
    return Path(os.path.commonpath([t.path.resolve().parent for t in targets]))


# ---------------------------------------------------------------- the cache and its held-out rows

def open_target_cache(targets: list[Target], override: str | None) -> Cache:
    if override is None:
        named = {t.path: t.record.get("extra", {}).get("cache") for t in targets}
        unknown = [str(p) for p, c in named.items() if c is None]
        if unknown:
            raise EvalError(f"{unknown[0]} does not record the cache it was trained on; pass --cache")
        if len(set(named.values())) > 1:
            raise EvalError("the SAEs were trained on different caches (" + "; ".join(
                f"{p.name}: {c}" for p, c in named.items()) + "); evaluate one cache's SAEs at a time")
        override = next(iter(named.values()))
    return open_cache(override)


def heldout_rows(cache: Cache, targets: list[Target], tokens: int | None) -> list[tuple[int, int]]:
    """Row ranges to evaluate: contexts every SAE held out (so no SAE sees its training rows; the rule each
    recorded, sae_common/holdout.py), `tokens` of them when given, picked evenly across the held-out ones."""
    mask = np.logical_and.reduce([heldout_mask(cache, t.record.get("extra", {})) for t in targets])
    ctx = cache.meta["context_size"]
    held = np.flatnonzero(mask)
    if not len(held):
        raise EvalError(f"the SAEs hold out different rows of the cache {cache.path} and no row is held out by all of "
                        "them (they were trained with different --holdout-fraction); evaluate them one run at a time")
    if tokens is not None:
        available = len(held) * ctx
        if tokens > available:
            raise EvalError(f"--tokens {tokens:,} is more than the {available:,} held-out tokens of {cache.path}; "
                            f"ask for at most {available:,}")
        if tokens < ctx:
            raise EvalError(f"--tokens {tokens:,} is less than one context of {ctx} tokens")
        n = tokens // ctx
        mask = np.zeros_like(mask)
        mask[held[np.arange(n) * len(held) // n]] = True  # spread like the held-out set itself
    return row_ranges(mask, ctx)


def check_heldout(cache: Cache, hooks: set[str], rows: list[tuple[int, int]]) -> None:
    """Every shard eval reads (the hooks' rows and the tokens) present and intact, before anything is computed: zarr
    reads a missing shard as zeros, which gave plausible wrong numbers. With recorded checksums this hashes the
    shards that hold held-out rows (each once); without, it reads them back through zarr."""
    per = cache.layout["rows_per_shard"]
    shards = sorted({i for start, stop in rows for i in range(start // per, -(-stop // per))})
    names = [name for h in sorted(hooks) if h in cache.hooks for name in hook_arrays(cache.meta, h)] + [TOKENS]
    # A hook the cache lacks is named later, by the model's check or by `Cache.acts`.
    problems = [p for i in shards for p in check_rows(cache, names, (i * per, min((i + 1) * per, cache.n_tokens)))]
    if problems:
        raise damaged(cache.path, problems)


def heldout_tokens(cache: Cache, rows: list[tuple[int, int]]) -> torch.Tensor:
    """[contexts, context_size] token ids of the row ranges, in order."""
    tokens = np.concatenate([cache.read_tokens(start, stop) for start, stop in rows])
    return torch.from_numpy(tokens.astype("int64")).reshape(-1, cache.meta["context_size"])


def keep_positions(cache: Cache, include_bos: bool) -> torch.Tensor:
    """[T] bool: positions that are spliced and averaged; BOS (position 0 of each context) is not, by default."""
    keep_T = torch.ones(cache.meta["context_size"], dtype=torch.bool)
    if cache.meta["prepend_bos"] and not include_bos:
        keep_T[0] = False
    return keep_T


def activation_mean(cache: Cache, hook: str, rows: list[tuple[int, int]], keep_T: torch.Tensor) -> torch.Tensor:
    """[D] float64 mean of the hook's cached activations over the kept positions of the row ranges: the
    value mean ablation splices in."""
    total_D, count = torch.zeros(cache.d_model, dtype=torch.float64), 0
    step = MEAN_READ_ROWS // len(keep_T) * len(keep_T)
    for start, stop in rows:
        for r0 in range(start, stop, step):
            x_ND = cache.read_rows(hook, r0, min(r0 + step, stop)).double()
            x_ND = x_ND.reshape(-1, len(keep_T), cache.d_model)[:, keep_T].reshape(-1, cache.d_model)
            total_D += x_ND.sum(0)
            count += len(x_ND)
    return total_D / count


# ---------------------------------------------------------------- the model

def load_eval_model(cache: Cache, cfg: EvalConfig, device: str) -> LoadedModel:
    """The cache's model as harvest loaded it (its record: source and dtype), with every layer."""
    record = cache.meta.get("model_load") or {}
    model = cfg.model or harvested_model(cache)
    dtype = record.get("dtype") if cfg.model_dtype == "auto" else None
    dtype = dtype or resolve_model_dtype(cfg.model_dtype, device)
    return load_model(model, [], device=device, dtype=dtype, n_layers=count_layers(resolve_source(model)))


def harvested_model(cache: Cache) -> str:
    """The model the cache was harvested with: harvest records the absolute checkpoint directory; a hub name
    stays a name."""
    source = (cache.meta.get("model_load") or {}).get("source")
    return source if source and Path(source).is_dir() else cache.meta["model"]


def check_fit(loaded: LoadedModel, targets: list[Target], probe_BT: torch.Tensor) -> None:
    """Each SAE's hook exists in the model, at a block, and is as wide as the SAE's d_in."""
    names = list(loaded.bridge.hook_dict)
    for t in targets:
        if t.hook not in names or not re.match(r"blocks\.\d+\.", t.hook):
            close = difflib.get_close_matches(t.hook, [n for n in names if n.startswith("blocks.")], n=3, cutoff=0.6)
            raise EvalError(f"the SAE {t.path} reads the hook {t.hook!r}, which {loaded.source} does not have at any "
                            f"of its blocks (blocks.0 to blocks.{loaded.n_layers_total - 1})"
                            + (f". Close matches: {', '.join(close)}" if close else ""))
    widths = {h: x.shape[-1] for h, x in run_hooks(loaded, probe_BT, sorted({t.hook for t in targets})).items()}
    for t in targets:
        if t.sae.cfg.d_in != widths[t.hook]:
            raise EvalError(f"the SAE {t.path} has d_in={t.sae.cfg.d_in}, but {t.hook} of {loaded.source} has width "
                            f"{widths[t.hook]}: it was not trained on this model")
