"""How far `sae harvest` scales on torchrun before tokenizing becomes its bottleneck.

Every rank reads and tokenizes the whole context stream (harvest/shards.py) and runs the model on 1/N of it,
so a rank keeps up while  tokenizer tokens/s >= N x model tokens/s,  i.e. up to N = tokenizer / model ranks
(with the tokenizer's threads on a node shared by that node's ranks). This prints, as JSON lines, measured in the
same run on the same text:
  tokenize  the harvest's own reading, tokenizing and packing (`open_documents` + `pack_contexts`), run over the
            text exactly as a rank that skips every shard would (no model);
  model     the bare forward pass over those contexts (the layers a harvest builds), batch after batch;
  read, pack  what every rank still does for the whole stream, the tokenizing being split between the
            ranks: reading the documents, and packing already-tokenized documents into contexts;
  ratio     tokenize / model: the number of ranks at which tokenizing would take as long as the model (by CPU
            time on the CPU, where both are CPU work and a busy machine distorts the wall clock; by the wall
            clock on a GPU).
The tokenizer's own thread pool follows TOKENIZERS_PARALLELISM / RAYON_NUM_THREADS; run it with
RAYON_NUM_THREADS=1 for one core's worth (several ranks on one node share its cores).

    .venv/bin/python bench/tokenize_bench.py                                   # built-in model, CPU
    RAYON_NUM_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python bench/tokenize_bench.py
    .venv/bin/python bench/tokenize_bench.py --model gemma-2-2b-random --layer 12 --device cuda --tokens 2M
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from sae_cache.harvest.text import open_documents, pack_contexts
from sae_cache.sae_common.config import hook_names, parse_count
from sae_cache.sae_common.model import ASSETS, load_model, resolve_device, resolve_model_dtype, run_hooks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harvest_bench import gemma_2_2b_random  # noqa: E402


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def rates(n_tokens: int, start: tuple[float, float], end: tuple[float, float] | None = None) -> dict[str, int]:
    """Tokens/s by the wall clock, and per CPU-second of this process (all its threads): on a busy machine the
    second is the one to trust for CPU work; on a GPU only the first means anything."""
    wall, cpu = (now - then for now, then in zip(end or clocks(), start))
    return {"tokens_per_s": round(n_tokens / wall), "tokens_per_cpu_s": round(n_tokens / cpu)}


def tokenize_rate(dataset: str, tokenizer, context_size: int, n_ctx: int) -> tuple[dict, list[list[int]]]:
    """Rates of reading + tokenizing + packing `n_ctx` contexts (what a rank does for shards it skips)."""
    start = clocks()
    docs = open_documents(dataset, "train", "text")
    contexts = [ids for ids, _ in itertools.islice(pack_contexts(docs, tokenizer, context_size, True), n_ctx)]
    return rates(len(contexts) * context_size, start), contexts


class _Looked:
    """A tokenizer that looks every document's ids up: packing with no tokenizing in it."""

    def __init__(self, tokenizer, docs: list):
        self.bos_token_id, self.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.ids = {d: tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs if isinstance(d, str)}

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [self.ids[t] for t in texts]}


def read_and_pack_rates(dataset: str, tokenizer, context_size: int, n_ctx: int) -> tuple[dict, dict]:
    """What every rank still does for the whole stream when the ranks split the tokenizing: reading the
    documents, and packing token ids into contexts."""
    start = clocks()
    docs = list(itertools.islice(open_documents(dataset, "train", "text"), 100_000))
    end = clocks()
    looked = _Looked(tokenizer, docs)
    read = rates(sum(len(ids) + 1 for ids in looked.ids.values()), start, end)
    start = clocks()
    n = sum(1 for _ in itertools.islice(pack_contexts(iter(docs), looked, context_size, True), n_ctx))
    return read, rates(n * context_size, start)


def model_rate(loaded, hooks: list[str], contexts: list[list[int]], batch_size: int) -> dict:
    device = str(loaded.bridge.cfg.device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    run_hooks(loaded, torch.tensor(contexts[:batch_size], device=device), hooks)  # warm-up
    sync()
    start = clocks()
    for i in range(0, len(contexts) - batch_size + 1, batch_size):
        run_hooks(loaded, torch.tensor(contexts[i:i + batch_size], device=device), hooks)
    sync()
    return rates((len(contexts) // batch_size) * batch_size * len(contexts[0]), start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-stdlib-gpt2")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--dataset", default=str(ASSETS / "stdlib-sample.txt"))
    ap.add_argument("--tokens", default="200K")
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="tokenize-bench-") as work:
        model = args.model
        if model == "gemma-2-2b-random":
            model = str(gemma_2_2b_random(Path(work) / "model", args.layer + 1))
        hooks = hook_names((args.layer,), "resid_post")
        loaded = load_model(model, hooks, device=device, dtype=resolve_model_dtype("auto", device))
        n_ctx = parse_count(args.tokens) // args.context_size
        tokenize_rate(args.dataset, loaded.tokenizer, args.context_size, min(n_ctx, 64))  # warm-up (imports, caches)
        tok, contexts = tokenize_rate(args.dataset, loaded.tokenizer, args.context_size, n_ctx)
        fwd = model_rate(loaded, hooks, contexts, args.batch_size)
        read, pack = read_and_pack_rates(args.dataset, loaded.tokenizer, args.context_size, n_ctx)
    key = "tokens_per_s" if device.startswith("cuda") else "tokens_per_cpu_s"
    threads = {k: os.environ.get(k) for k in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")}
    for line in ({"measure": "tokenize", **tok, "tokens": len(contexts) * args.context_size},
                 {"measure": "read", **read, "note": "reading the documents, counted in their tokens"},
                 {"measure": "pack", **pack},
                 {"measure": "model", **fwd, "model": args.model, "layer": args.layer, "device": device,
                  "batch_size": args.batch_size, "torch_threads": torch.get_num_threads()},
                 {"measure": "ratio", "tokenize_over_model": round(tok[key] / fwd[key], 2), "by": key, "env": threads}):
        print(json.dumps(line))


if __name__ == "__main__":
    main()
