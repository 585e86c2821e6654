"""Shared fixtures: tiny random-init checkpoints (GPT-2, Gemma-2, Llama) with a locally trained BPE tokenizer,
saved as local Hugging Face directories, and a small local text corpus. Nothing is downloaded."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly big boxes of "
         "sparse features in residual streams and every layer writes its own small update").split()


def make_corpus(path: Path, n_docs: int = 300, seed: int = 0) -> Path:
    """Paragraphs of random words (one document each, separated by blank lines)."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 80))) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def make_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


def make_checkpoint(directory: Path, arch: str, n_layers: int = 3, d_model: int = 32) -> Path:
    from transformers import (GPT2Config, GPT2LMHeadModel, Gemma2Config, Gemma2ForCausalLM, LlamaConfig,
                              LlamaForCausalLM)

    tokenizer = make_tokenizer(directory)
    vocab, special = len(tokenizer), {"bos_token_id": 0, "eos_token_id": 0}
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=128, n_embd=d_model, n_layer=n_layers,
                                           n_head=4, **special))
    elif arch == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
                                               num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=8, max_position_embeddings=128, pad_token_id=0, **special))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
                                             num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128, pad_token_id=0, **special))
    else:
        raise ValueError(arch)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: make_checkpoint(root / arch, arch) for arch in ("gpt2", "gemma2", "llama")}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("text") / "corpus.txt")
