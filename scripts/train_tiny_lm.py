"""Train the project's own tiny language model on the Python standard library's docstrings, offline.

Nothing here is downloaded: the corpus is every module/class/function docstring of the stdlib installed with
the running interpreter (`sysconfig.get_paths()["stdlib"]`, without test/tests/idlelib/site-packages folders),
extracted with `ast`, cleaned with `inspect.cleandoc`, deduplicated. A hash of each document's text puts ~5% of
them in a validation split. On the training split it trains a byte-level BPE tokenizer (vocab 4096,
`<|endoftext|>` as BOS/EOS/UNK) and a 4-layer GPT-2 (d_model 128, ~1.3M parameters, ~5 MB in float32), on
contexts packed exactly as the harvester packs them (`harvest.text.pack_contexts`: BOS + 127 tokens).

It writes a Hugging Face checkpoint (config.json, model.safetensors, tokenizer files) plus `training.json`
(config, seed, losses, Python version, wall time) to the output folder, and `stdlib-sample.txt`: text the
model never trained on, one document per paragraph, for the quickstart and the tests (see `write_sample`).

Takes about 15 minutes on one CPU thread (torch.set_num_threads(1)). Run from the repository root:
    .venv/bin/python scripts/train_tiny_lm.py
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core for the tokenizer trainer too

import ast
import dataclasses
import hashlib
import inspect
import json
import math
import random
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from sae_cache.harvest.text import pack_contexts

EOT = "<|endoftext|>"
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages"}
REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "sae_common" / "assets"


@dataclass(frozen=True)
class TrainConfig:
    out: str = str(ASSETS / "tiny-stdlib-gpt2")
    """Folder for the checkpoint, tokenizer and training.json."""
    sample: str = str(ASSETS / "stdlib-sample.txt")
    """Where the held-out text sample goes."""
    seed: int = 0
    """Seeds python `random` and torch (init, dropout, batch order)."""
    val_fraction: float = 0.05
    """Share of documents (chosen by a hash of their text) held out for validation."""
    vocab_size: int = 4096
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    context_size: int = 128
    """Tokens per context, BOS included; also the model's n_positions."""
    dropout: float = 0.1
    """GPT-2's default; the run makes ~5-6 passes over a small corpus."""
    batch_size: int = 16
    """Contexts per step (16 x 128 = 2048 tokens); on one thread 16 ran faster per token than 32."""
    steps: int = 1200
    """Optimiser steps; measured at ~0.6 s each on one CPU thread, so the whole run takes ~15 minutes."""
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    weight_decay: float = 0.1
    """Applied to weight matrices only (not biases, LayerNorms)."""
    log_every: int = 50
    sample_bytes: int = 1_500_000
    """Target size of the sample file; it stops at the first document past this size."""


# ------------------------------------------------------------------------------------------------------------
# Corpus: stdlib docstrings, split by hash

def one_paragraph(text: str) -> str:
    """Drop blank lines so that a blank line ("\\n\\n") only ever separates documents, as in the sample file."""
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip())


def stdlib_files(root: Path, *, skipped: bool = False) -> list[Path]:
    """Sorted .py files under root: outside the SKIP_DIRS folders, or (skipped=True) only inside them."""
    files = [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.relative_to(root).parts]
    return [p for p in files if bool(SKIP_DIRS & set(p.relative_to(root).parts[:-1])) == skipped]


def docstrings(files: list[Path]) -> list[str]:
    """Every module/class/function docstring in `files`, cleaned, in file order, first occurrence kept."""
    docs: dict[str, None] = {}  # an ordered set
    for path in files:
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # lib2to3 test data and the like
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node, clean=False)
                if text and (doc := one_paragraph(inspect.cleandoc(text))):
                    docs.setdefault(doc)
    return list(docs)


def is_validation(doc: str, fraction: float) -> bool:
    # A hash of the text, not the position: the split survives reordering and new files.
    return int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "big") < fraction * 2**64


# ------------------------------------------------------------------------------------------------------------
# Tokenizer and model

def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes: no UNK
    bpe.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOT, eos_token=EOT, unk_token=EOT)


def make_model(cfg: TrainConfig, eot_id: int) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_size, n_embd=cfg.d_model,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=eot_id, eos_token_id=eot_id,
                        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                        tie_word_embeddings=True)
    return GPT2LMHeadModel(config)


def pack(docs: list[str], tokenizer, context_size: int) -> torch.Tensor:
    """[N, context_size] token ids, the harvester's packing; the last partial context is dropped."""
    return torch.tensor([ids for ids, _ in pack_contexts(docs, tokenizer, context_size, prepend_bos=True)])


# ------------------------------------------------------------------------------------------------------------
# Training

def next_token_loss(model: GPT2LMHeadModel, tokens_BT: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting tokens 1..T-1 (every position after the BOS) from their prefixes."""
    logits_BTV = model(tokens_BT).logits
    return F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1), tokens_BT[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, tokens_NT: torch.Tensor, batch_size: int = 64) -> float:
    model.eval()
    total = sum(next_token_loss(model, batch).item() * len(batch) for batch in tokens_NT.split(batch_size))
    model.train()
    return total / len(tokens_NT)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from lr to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batches(tokens_NT: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless batches: a fresh seeded permutation of the contexts each epoch."""
    while True:
        order = torch.randperm(len(tokens_NT), generator=generator)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield tokens_NT[order[i:i + batch_size]]


def train(model: GPT2LMHeadModel, train_NT: torch.Tensor, cfg: TrainConfig) -> list[dict]:
    decay = [p for p in model.parameters() if p.dim() >= 2]  # the tied embedding is counted once
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    data = batches(train_NT, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    curve, window, t0 = [], [], time.time()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = next_token_loss(model, next(data))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            curve.append({"step": step + 1, "train_loss": round(sum(window) / len(window), 4),
                          "lr": round(lr_at(step, cfg), 6), "seconds": round(time.time() - t0, 1)})
            print(f"step {step + 1:5d}  loss {curve[-1]['train_loss']:.4f}  lr {curve[-1]['lr']:.2e}  "
                  f"{curve[-1]['seconds']:.0f}s", flush=True)
            window = []
    return curve


# ------------------------------------------------------------------------------------------------------------
# Sample text and the record

def write_sample(path: Path, val_docs: list[str], other_docs: list[str], size: int) -> int:
    """Validation docs first, then other never-trained docs, one per paragraph, until `size` bytes.

    The 5% validation split holds only ~80 kB of text, far below the ~1.5 MB the quickstart needs, so the sample
    continues with text the training split cannot contain: docstrings of the skipped test/idlelib folders
    (minus any that also occur in the corpus) and the reference-manual topics in pydoc_data/topics.py.
    """
    chosen, n_bytes = [], 0
    for doc in val_docs + other_docs:
        if n_bytes >= size:
            break
        chosen.append(doc)
        n_bytes += len(doc.encode()) + 2
    assert all("\n\n" not in doc and doc == doc.strip() for doc in chosen)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(chosen) + "\n", encoding="utf-8")
    return len(chosen)


def pydoc_topics(root: Path) -> list[str]:
    """The Python reference manual sections bundled for `help()`: a dict literal of strings, sorted by key."""
    tree = ast.parse((root / "pydoc_data" / "topics.py").read_bytes())
    topics = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign))
    return [one_paragraph(topics[k]) for k in sorted(topics)]


@click.command(context_settings={"show_default": True})
@click.option("--out", default=TrainConfig.out, help="Folder for the checkpoint, tokenizer and training.json.")
@click.option("--sample", default=TrainConfig.sample, help="Path of the held-out text sample.")
@click.option("--steps", default=TrainConfig.steps, type=click.IntRange(1), help="Optimiser steps.")
@click.option("--seed", default=TrainConfig.seed, help="Seed for python random and torch.")
def main(**options) -> None:
    cfg = TrainConfig(**options)
    t_start = time.time()
    torch.set_num_threads(1)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = docstrings(stdlib_files(root))
    val_docs = [d for d in docs if is_validation(d, cfg.val_fraction)]
    train_docs = [d for d in docs if not is_validation(d, cfg.val_fraction)]
    print(f"{len(docs)} docstrings from {root}: {len(train_docs)} train, {len(val_docs)} validation", flush=True)

    tokenizer = train_tokenizer(train_docs, cfg.vocab_size)
    train_NT = pack(train_docs, tokenizer, cfg.context_size)
    val_NT = pack(val_docs, tokenizer, cfg.context_size)
    print(f"{len(train_NT)} train contexts, {len(val_NT)} validation contexts of {cfg.context_size}", flush=True)

    model = make_model(cfg, tokenizer.eos_token_id)
    val_before = evaluate(model, val_NT)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; validation loss {val_before:.4f}")
    t_train = time.time()
    curve = train(model, train_NT, cfg)
    train_seconds = time.time() - t_train
    val_after = evaluate(model, val_NT)
    print(f"validation loss {val_before:.4f} -> {val_after:.4f}", flush=True)

    corpus = set(docs)
    other_docs = [d for d in docstrings(stdlib_files(root, skipped=True)) + pydoc_topics(root) if d not in corpus]
    sample = Path(cfg.sample)
    n_sample_docs = write_sample(sample, val_docs, other_docs, cfg.sample_bytes)
    sample_text = sample.read_text(encoding="utf-8").split("\n\n")
    sample_loss = evaluate(model, pack(sample_text, tokenizer, cfg.context_size))

    out = Path(cfg.out)
    model.save_pretrained(out)  # safetensors, float32
    tokenizer.save_pretrained(out)
    record = {
        "config": {**dataclasses.asdict(cfg), "out": os.path.relpath(out, REPO),
                   "sample": os.path.relpath(sample, REPO)},
        "model_config": model.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()), "seed": cfg.seed, "steps": cfg.steps,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.context_size,
        "corpus": {"stdlib": str(root), "python": sys.version.split()[0], "documents": len(docs),
                   "train_documents": len(train_docs), "validation_documents": len(val_docs),
                   "train_tokens": train_NT.numel(), "validation_tokens": val_NT.numel()},
        "train_loss_curve": curve, "validation_loss_before": round(val_before, 4),
        "validation_loss_after": round(val_after, 4),
        "sample": {"path": sample.name, "documents": n_sample_docs, "bytes": sample.stat().st_size,
                   "validation_documents": min(n_sample_docs, len(val_docs)), "loss_after": round(sample_loss, 4)},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - t_start, 1),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} and {sample} ({n_sample_docs} documents) in {record['wall_seconds']:.0f}s; "
          f"sample loss {sample_loss:.4f}")


if __name__ == "__main__":
    main()
