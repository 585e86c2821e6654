"""Harvest throughput: tokens/s, MB/s written and the compression ratio, against the bare forward pass and
against SAELens's activation cache runner.

Prints one JSON line per measurement. The baseline, measured in the same run on the same contexts, is the
model's forward pass alone (same layers, same batches, nothing stored), so `overhead` = harvest time / forward
time says what packing, conversion, compression and writing cost on top of the model.

Then (unless --no-sae-lens) SAELens's `CacheActivationsRunner` caches the same hook of the same model over the
very contexts our cache holds (its token ids, handed over as a pre-tokenized `tokens` dataset), in a separate
virtualenv so SAELens never enters the project's (built on first use: our torch version, then sae-lens). Its
model is a transformer-lens HookedTransformer made from the same checkpoint (config and weights converted by
transformer-lens, no weight processing: what its `from_pretrained_no_processing` does for a hub model), checked
against ours on the first contexts. One `harvest_vs_sae_lens` line per SAELens storage dtype: its default
(float32) and its smallest (float16; Arrow has no bfloat16), each with tokens/s and bytes on disk per token,
ours / theirs.

What each timer includes, the model being loaded beforehand on both sides:
  ours    `harvest()`: opening and reading the text, tokenizing and packing it into contexts, the forward
          passes, conversion to the stored dtype, compression, writing the Zarr shards and metadata.
  SAELens `CacheActivationsRunner.run()` (runner already constructed): reading the pre-tokenized contexts (no
          tokenizing: that is ours alone), the forward passes, conversion to its dtype, building and saving the
          Arrow shards, consolidating them into one dataset directory. Shuffling is off (ours does not shuffle;
          SAELens's would only add a row-order index). Its batch size in prompts is ours, or the largest divisor
          of the number of contexts not below half of ours (else ours, on the contexts that fill whole batches):
          its runner writes only whole batches. An untimed one-batch run of its runner comes first, so its
          one-off setup costs are not counted (ours are).
Bytes on disk are every file each one wrote, over the tokens it stored; both store the token ids too.

    .venv/bin/python bench/harvest_bench.py                       # built-in tiny model, CPU
    .venv/bin/python bench/harvest_bench.py --venv /tmp/slvenv    # an existing SAELens virtualenv
    .venv/bin/python bench/harvest_bench.py --model gemma-2-2b-random --layer 12 --tokens 2M --device cuda
      (a random-init model of gemma-2-2b's shape: the same compute as the real one, no download)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae_cache.harvest.run import harvest
from sae_cache.harvest.text import open_documents, pack_contexts
from sae_cache.sae_common.allocator import retain_freed_memory
from sae_cache.sae_common.cache_format import Cache, open_cache, row_bytes
from sae_cache.sae_common.config import HarvestConfig, hook_names, parse_count
from sae_cache.sae_common.model import ASSETS, LoadedModel, load_model, resolve_device, resolve_model_dtype, run_hooks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from saelens_env import DEFAULT_VENV, saelens_python  # noqa: E402

SAMPLE = ASSETS / "stdlib-sample.txt"
SAELENS_DTYPES = ("float32", "float16")  # its default, and its smallest (its Arrow storage has no bfloat16)
N_CHECK = 4  # contexts on which the two models' activations are compared

# Runs inside the SAELens virtualenv: times its model's forward pass alone over the given contexts, then caches
# them with CacheActivationsRunner once per dtype; prints one JSON object on its last line.
SAELENS_CACHE = r"""
import json, shutil, sys, time
from pathlib import Path
import numpy as np, torch
from datasets import Dataset, load_from_disk
from transformer_lens import HookedTransformer, loading_from_pretrained as loading
from transformers import AutoModelForCausalLM, AutoTokenizer
import sae_lens.cache_activations_runner as car
from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig
a = json.loads(sys.argv[1])
work, hook, ctx, batch = Path(a["work"]), a["hook"], a["context_size"], a["batch_size"]
dtype = getattr(torch, a["model_dtype"])
source = Path(a["model"])
if not source.is_dir():  # a hub name: what its runner would load (needs network)
    model = HookedTransformer.from_pretrained_no_processing(a["model"], device=a["device"], dtype=dtype)
else:  # a local checkpoint, as from_pretrained_no_processing makes one from the hub; in a view of it whose
    # GPT-2 config keeps the legacy n_ctx that transformer-lens reads (the hub's gpt2 configs have it)
    model_dir = work / "hooked-model"
    model_dir.mkdir()
    for f in source.iterdir():
        if f.name != "config.json": (model_dir / f.name).symlink_to(f.resolve())
    config = json.loads((source / "config.json").read_text())
    if config.get("model_type") == "gpt2": config.setdefault("n_ctx", config["n_positions"])
    (model_dir / "config.json").write_text(json.dumps(config))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    cfg = loading.get_pretrained_model_config(str(model_dir), device=a["device"], dtype=dtype)
    model = HookedTransformer(cfg, AutoTokenizer.from_pretrained(model_dir), move_to_device=False)
    model.load_and_process_state_dict(loading.get_pretrained_state_dict(str(model_dir), cfg, hf, dtype=dtype),
                                      fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    model.move_model_modules_to_device()
model.eval()
d_model = model.cfg.d_model
car.load_model = lambda **kwargs: model  # the runner has no model override; it loads by name through this
tokens = np.load(work / "tokens.npy")
Dataset.from_dict({"tokens": tokens}).save_to_disk(str(work / "tokens-ds"))
sync = torch.cuda.synchronize if a["device"].startswith("cuda") else (lambda: None)
def forward(contexts):  # what its ActivationsStore.get_activations runs
    with torch.no_grad():
        return model.run_with_cache(torch.tensor(contexts, device=a["device"]), names_filter=[hook],
                                    stop_at_layer=int(hook.split(".")[1]) + 1, prepend_bos=False)[1][hook]
np.save(work / "sae_lens_check.npy", forward(tokens[:a["n_check"]]).float().cpu().numpy())
forward(tokens[:batch])  # warm-up
sync()
t0 = time.perf_counter()
for i in range(0, len(tokens), batch): forward(tokens[i:i + batch])
sync()
result = {"forward_tokens_per_s": tokens.size / (time.perf_counter() - t0), "runs": []}
def runner(store, contexts, out):
    bytes_per_token = d_model * torch.finfo(getattr(torch, store)).bits // 8
    n_batches = contexts // batch  # buffers: whole batches each, at most 2 GB each (its default size)
    n_buffers = next(k for k in range(1, n_batches + 1)
                     if n_batches % k == 0 and n_batches // k * batch * ctx * bytes_per_token <= 2e9)
    return CacheActivationsRunner(CacheActivationsRunnerConfig(
        dataset_path=str(work / "tokens-ds"), model_name=a["model"], model_batch_size=batch, hook_name=hook,
        d_in=d_model, training_tokens=contexts * ctx, context_size=ctx, new_cached_activations_path=str(out),
        shuffle=False, dtype=store, device=a["device"],
        buffer_size_gb=(n_batches // n_buffers * batch * ctx * bytes_per_token + 0.5) / 1e9),
        override_dataset=load_from_disk(str(work / "tokens-ds")))
runner("float32", batch, work / "sae-lens-warm-up").run()  # untimed: its first run pays one-off setup costs
shutil.rmtree(work / "sae-lens-warm-up")
for store in a["dtypes"]:
    out = work / f"sae-lens-{store}"
    run = runner(store, len(tokens), out)
    sync()
    t0 = time.perf_counter()
    ds = run.run()
    seconds = time.perf_counter() - t0
    first = ds.with_format("numpy")[:a["n_check"]]
    np.save(work / f"sae_lens_stored_{store}.npy", first[hook].astype(np.float32))
    result["runs"].append({"dtype": store, "tokens": len(ds) * ctx, "seconds": seconds, "columns": ds.column_names,
                           "disk_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
                           "token_ids_match": bool((first["token_ids"] == tokens[:a["n_check"]]).all())})
    del ds, run
print(json.dumps(result))
"""


def gemma_2_2b_random(directory: Path, n_layers: int) -> Path:
    """gemma-2-2b's shape with random weights and the built-in tokenizer's vocab (only the layers needed)."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-stdlib-gpt2")
    config = Gemma2Config(vocab_size=len(tok), hidden_size=2304, intermediate_size=9216, num_hidden_layers=n_layers,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=256, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    Gemma2ForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def forward_only(cfg: HarvestConfig, loaded: LoadedModel) -> float:
    """Tokens/s of the bare forward pass over the same contexts, batches and layers as the harvest."""
    hooks = hook_names(cfg.layers, cfg.hook)
    docs = open_documents(cfg.dataset, cfg.split, cfg.text_column)
    packed = pack_contexts(docs, loaded.tokenizer, cfg.context_size, cfg.prepend_bos)
    contexts = [ids for (ids, _), _ in zip(packed, range(cfg.tokens // cfg.context_size))]
    device = str(loaded.bridge.cfg.device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    run_hooks(loaded, torch.tensor(contexts[:cfg.batch_size], device=device), hooks)  # warm-up
    sync()
    t0 = time.perf_counter()
    for i in range(0, len(contexts), cfg.batch_size):
        run_hooks(loaded, torch.tensor(contexts[i:i + cfg.batch_size], device=device), hooks)
    sync()
    return len(contexts) * cfg.context_size / (time.perf_counter() - t0)


def saelens_cache(python: Path, work: Path, source: str, hook: str, tokens_NT: np.ndarray, batch_size: int,
                  device: str, model_dtype: str) -> dict | None:
    """SAELens's CacheActivationsRunner over exactly these contexts, once per dtype in SAELENS_DTYPES."""
    np.save(work / "tokens.npy", tokens_NT)
    spec = {"work": str(work), "model": source, "hook": hook, "context_size": tokens_NT.shape[1],
            "batch_size": batch_size, "device": device, "model_dtype": model_dtype, "dtypes": SAELENS_DTYPES,
            "n_check": N_CHECK}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([str(python), "-c", SAELENS_CACHE, json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if done.returncode:
        print(f"skipping SAELens: its run failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def saelens_batch_size(n_contexts: int, batch_size: int) -> int:
    """Ours, or the largest divisor of n_contexts not below half of ours (its runner writes whole batches only)."""
    return next((b for b in range(batch_size, batch_size // 2 - 1, -1) if n_contexts % b == 0), batch_size)


def compare_saelens(venv: Path, work: Path, cfg: HarvestConfig, loaded: LoadedModel, cache: Cache,
                    ours_tok_s: float, ours_forward_tok_s: float, ours_bytes_per_token: float) -> None:
    """One `harvest_vs_sae_lens` line per SAELens dtype, on the contexts our cache holds."""
    python = saelens_python(venv)
    if python is None:
        return
    hook = hook_names(cfg.layers, cfg.hook)[0]
    tokens_NT = np.asarray(cache.tokens()[:], dtype=np.int64).reshape(-1, cfg.context_size)
    batch = saelens_batch_size(len(tokens_NT), cfg.batch_size)
    tokens_NT = tokens_NT[:len(tokens_NT) // batch * batch]
    theirs = saelens_cache(python, work, loaded.source, hook, tokens_NT, batch, cfg.device, loaded.dtype)
    if theirs is None:
        return
    # the two models on the first contexts, in the model dtype: the same function, or the comparison is void
    ours_check = run_hooks(loaded, torch.tensor(tokens_NT[:N_CHECK], device=cfg.device), [hook])[hook].float().cpu()
    their_check = torch.from_numpy(np.load(work / "sae_lens_check.npy"))
    scale = ours_check.abs().max().item()
    stored = cache.read_rows(hook, 0, N_CHECK * cfg.context_size).float().reshape(ours_check.shape)
    for row in theirs["runs"]:
        their_stored = torch.from_numpy(np.load(work / f"sae_lens_stored_{row['dtype']}.npy"))
        tok_s, bytes_per_token = row["tokens"] / row["seconds"], row["disk_bytes"] / row["tokens"]
        print(json.dumps({"bench": "harvest_vs_sae_lens", "tokens": row["tokens"], "ours_tokens": cache.n_tokens,
                          "ours_tokens_per_s": round(ours_tok_s), "sae_lens_tokens_per_s": round(tok_s),
                          "tokens_per_s_ratio": round(ours_tok_s / tok_s, 3),
                          "ours_bytes_per_token": round(ours_bytes_per_token, 1),
                          "sae_lens_bytes_per_token": round(bytes_per_token, 1),
                          "bytes_ratio": round(ours_bytes_per_token / bytes_per_token, 3),
                          "ours_dtype": cfg.dtype, "sae_lens_dtype": row["dtype"], "sae_lens_batch_size": batch,
                          "ours_forward_only_tokens_per_s": round(ours_forward_tok_s),
                          "sae_lens_forward_only_tokens_per_s": round(theirs["forward_tokens_per_s"]),
                          "sae_lens_stores": row["columns"], "sae_lens_wall_s": round(row["seconds"], 2),
                          "model_max_abs_diff": float(f"{(ours_check - their_check).abs().max().item():.3g}"),
                          "stored_max_abs_diff": float(f"{(stored - their_stored).abs().max().item():.3g}"),
                          "activation_max_abs": round(scale, 3), "same_token_ids": row["token_ids_match"]}),
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-stdlib-gpt2")
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--tokens", default="200K")
    ap.add_argument("--dataset", default=str(SAMPLE))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sae-lens", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure SAELens's CacheActivationsRunner on the same contexts")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                    help="SAELens's virtualenv (built there if missing)")
    args = ap.parse_args()
    retain_freed_memory()  # as `sae` does when it starts
    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="harvest-bench-"))
    try:
        model = args.model
        if model == "gemma-2-2b-random":
            model = str(gemma_2_2b_random(work / "model", args.layer + 1))
        cfg = HarvestConfig(model=model, layers=(args.layer,), dataset=args.dataset, tokens=parse_count(args.tokens),
                            dtype=args.dtype, batch_size=args.batch_size, device=device)
        loaded = load_model(cfg.model, hook_names(cfg.layers, cfg.hook), device=device,
                            dtype=resolve_model_dtype(cfg.model_dtype, device))
        baseline = forward_only(cfg, loaded)
        t0 = time.perf_counter()
        out = harvest(cfg, work / "cache.zarr", loaded=loaded)
        seconds = time.perf_counter() - t0
        cache = open_cache(out)
        disk = cache.disk_bytes()
        raw = cache.n_tokens * (row_bytes(cache.d_model, args.dtype) + 4)  # activations + int32 token ids
        tok_s = cache.n_tokens / seconds
        print(json.dumps({"bench": "harvest", "model": args.model, "device": device, "d_model": cache.d_model,
                          "layer": args.layer, "tokens": cache.n_tokens, "dtype": args.dtype,
                          "harvest_tokens_per_s": round(tok_s), "forward_only_tokens_per_s": round(baseline),
                          "overhead_vs_forward": round(baseline / tok_s, 3),
                          "mb_written_per_s": round(disk / seconds / 1e6, 2),
                          "bytes_on_disk_per_token": round(disk / cache.n_tokens, 1),
                          "compression_ratio": round(raw / disk, 3), "wall_s": round(seconds, 2)}), flush=True)
        if args.sae_lens:
            compare_saelens(args.venv, work, cfg, loaded, cache, tok_s, baseline, disk / cache.n_tokens)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
