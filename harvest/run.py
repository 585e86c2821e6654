"""`sae harvest`: run the model once over the text and write its activations, shard by shard, to a cache.

Each shard is gathered in memory (batches never straddle a shard, so a resumed run computes exactly the
batches an uninterrupted one would), then written by a background thread while the model computes the next
(harvest/shards.py). Under torchrun every rank computes its own shards and rank 0 alone holds the cache's
lock and records them.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console

from sae_cache.harvest.shards import HarvestError, write_shards
from sae_cache.harvest.text import open_documents, separator_id
from sae_cache.sae_common.cache_format import DEFAULT_ROOT, EXPECTED_RATIO, layout_for, open_cache, row_bytes
from sae_cache.sae_common.cache_writer import CacheWriter, refuse_foreign
from sae_cache.sae_common.checks import check_output_dir
from sae_cache.sae_common.config import HarvestConfig, hook_names
from sae_cache.sae_common.console import make_console
from sae_cache.sae_common.distributed import barrier, broadcast_object, rank_device, world
from sae_cache.sae_common.errors import UserError
from sae_cache.sae_common.holdout import SPREAD
from sae_cache.sae_common.model import (LoadedModel, ModelError, load_model, resolve_device, resolve_model_dtype,
                                       resolve_source)

__all__ = ["HarvestError", "harvest"]

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
        "holdout": SPREAD,  # train and eval hold out contexts spread over the cache (sae_common/holdout.py)
    }


def harvest(cfg: HarvestConfig, out: Path | None = None, *, overwrite: bool = False,
            console: Console | None = None, loaded: LoadedModel | None = None) -> Path:
    """Run the harvest (or resume it) and return the cache path. `loaded`: a model already loaded the way
    `load_model` does for these hooks (benchmarks reuse one)."""
    console = console or make_console()
    hooks = hook_names(cfg.layers, cfg.hook)  # the config has checked every value on its own already
    n_target = (cfg.tokens // cfg.context_size) * cfg.context_size
    out = Path(out) if out is not None else default_out(cfg, hooks)
    device = rank_device(resolve_device(cfg.device))  # under torchrun each rank uses the GPU of its local rank
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
    barrier()  # every rank has read the directory as it was before rank 0 opens (and may clear) it
    writer = _open_on_rank_0(out, meta, cfg, overwrite)
    meta = broadcast_object(writer.meta if writer is not None else None)
    with writer or nullcontext():
        if meta["complete"]:
            console.print(f"[green]{out} is already complete[/] ({meta['n_tokens']:,} tokens); nothing to do")
            return out
        needed = estimate_bytes(n_target - meta["n_tokens"], meta["d_model"], len(hooks), cfg.dtype, cfg.compression)
        console.print(f"harvesting {n_target:,} tokens of {', '.join(hooks)} from {cfg.model} into {out}"
                      + (f" (resuming at {meta['n_tokens']:,})" if meta["n_tokens"] else "")
                      + (f" on {world().size} ranks" if world().active else "")
                      + f"; estimated size still to write {needed / 1e6:,.1f} MB")
        check_disk(out, needed)
        if writer is not None:
            writer.prepare()  # the arrays exist, and no file of an unrecorded shard is left, before any rank writes
        barrier()
        write_shards(cfg, loaded, hooks, docs, out, writer, meta, n_target, console)
    return out


def _open_on_rank_0(out: Path, meta: dict[str, Any], cfg: HarvestConfig, overwrite: bool) -> CacheWriter | None:
    """Rank 0 alone opens the cache (its lock, a resume's checks); a refusal stops every rank with its message."""
    writer, refusal = None, None
    if world().is_main:
        try:
            writer = CacheWriter.open(out, meta, identity=cfg.identity(), overwrite=overwrite)
        except UserError as e:
            refusal = e
    reason = broadcast_object(str(refusal) if refusal is not None else None)
    if refusal is not None:
        raise refusal
    if reason is not None:
        raise HarvestError(f"rank 0 could not open the cache: {reason}")
    return writer
