"""Harvest throughput: tokens/s, MB/s written and the compression ratio, against the bare forward pass.

Prints one JSON line per measurement. The baseline, measured in the same run on the same contexts, is the
model's forward pass alone (same layers, same batches, nothing stored), so `overhead` = harvest time / forward
time says what packing, conversion, compression and writing cost on top of the model.

    .venv/bin/python bench/harvest_bench.py                       # built-in tiny model, CPU
    .venv/bin/python bench/harvest_bench.py --model gemma-2-2b-random --layer 12 --tokens 2M --device cuda
      (a random-init model of gemma-2-2b's shape: the same compute as the real one, no download)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from harvest.run import harvest
from harvest.text import open_documents, pack_contexts
from sae_common.cache_format import itemsize, open_cache
from sae_common.config import HarvestConfig, hook_names, parse_count
from sae_common.model import ASSETS, LoadedModel, load_model, resolve_device, resolve_model_dtype, run_hooks

SAMPLE = ASSETS / "stdlib-sample.txt"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-stdlib-gpt2")
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--tokens", default="200K")
    ap.add_argument("--dataset", default=str(SAMPLE))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
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
        raw = cache.n_tokens * (cache.d_model * itemsize(args.dtype) + 4)  # activations + int32 token ids
        tok_s = cache.n_tokens / seconds
        print(json.dumps({"bench": "harvest", "model": args.model, "device": device, "d_model": cache.d_model,
                          "layer": args.layer, "tokens": cache.n_tokens, "dtype": args.dtype,
                          "harvest_tokens_per_s": round(tok_s), "forward_only_tokens_per_s": round(baseline),
                          "overhead_vs_forward": round(baseline / tok_s, 3),
                          "mb_written_per_s": round(disk / seconds / 1e6, 2),
                          "bytes_on_disk_per_token": round(disk / cache.n_tokens, 1),
                          "compression_ratio": round(raw / disk, 3), "wall_s": round(seconds, 2)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
