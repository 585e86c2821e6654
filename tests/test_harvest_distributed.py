"""`sae harvest` under torchrun (2 CPU processes, gloo) writes the cache one process writes, byte for byte.

The built-in tiny model on the built-in text: 416 tokens in shards of 64 rows are 7 shards, the last one short
(32 rows), so the last round has one shard for two ranks. The cache records no timings and no world size, so
every file (the metadata included) must be equal; only the writer's lock file, which holds a pid, differs.
"""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

import pytest

from sae_cache.harvest.shards import KILL_HOOK
from sae_cache.harvest.text import Position, TokenizeSplit, open_documents, pack_contexts
from sae_cache.sae_common.cache_format import open_cache, verify
from sae_cache.sae_common.cache_writer import LOCK_FILE
from sae_cache.sae_common.model import ASSETS
from tests.dist_utils import single, torchrun

TOKENS = 416  # 6 shards of 64 rows and a short one of 32


def harvest_args(out: Path, dataset: str | Path = "stdlib-sample", tokens: int = TOKENS) -> list:
    return ["harvest", "--model", "tiny-stdlib-gpt2", "--layer", 1, "--dataset", dataset, "--tokens", tokens,
            "--context-size", 32, "--rows-per-shard", 64, "--batch-size", 2, "--device", "cpu", "--out", out]


def cache_files(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != LOCK_FILE}


def assert_same_cache(path: Path, reference: Path) -> None:
    assert open_cache(path).meta == open_cache(reference).meta  # first, for a readable difference
    files, expected = cache_files(path), cache_files(reference)
    assert sorted(files) == sorted(expected)
    assert [name for name in files if files[name] != expected[name]] == []
    assert verify(open_cache(path)) == []


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "c.zarr"
    done = single(harvest_args(out))
    assert done.returncode == 0, done.stderr
    assert open_cache(out).meta["complete"] and len(open_cache(out).meta["shards"]) == 7
    return out


def test_two_ranks_write_the_cache_one_process_writes(one_process, tmp_path):
    out = tmp_path / "c.zarr"
    done = torchrun(harvest_args(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(out)]  # rank 0 alone prints the path
    assert "on 2 ranks" in done.stderr and "done: 416 tokens" in done.stderr
    assert_same_cache(out, one_process)


def test_a_rank_killed_mid_harvest_resumes_on_two_ranks_to_the_same_cache(one_process, tmp_path):
    out = tmp_path / "c.zarr"
    # rank 1 kills itself (-9) right after writing its second shard (shard 3), before reporting it
    killed = torchrun(harvest_args(out), env={KILL_HOOK: "1:2"})
    assert killed.returncode != 0
    assert "Signals.SIGKILL" in killed.stderr or "exitcode  : -9" in killed.stderr, killed.stderr[-3000:]
    kept = open_cache(out)
    assert 0 < kept.n_tokens < TOKENS and not kept.meta["complete"]
    assert len(kept.meta["shards"]) <= 3  # shard 3 was never reported, so nothing from it on is recorded
    assert (out / "tokens" / "c" / "3").is_file()  # its file is on disk, unrecorded: the rerun rewrites it
    resumed = torchrun(harvest_args(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at {kept.n_tokens:,}" in resumed.stderr
    assert_same_cache(out, one_process)


def test_a_dataset_that_runs_out_mid_round_ends_the_same_on_two_ranks(tmp_path):
    # 5 paragraphs of the built-in text hold 9 contexts: 4 shards and half of the fifth, which is the first shard
    # of the third round, so rank 1 has nothing to do in that round
    paragraphs = (ASSETS / "stdlib-sample.txt").read_text().split("\n\n")
    text = tmp_path / "short.txt"
    text.write_text("\n\n".join(paragraphs[:5]) + "\n")
    runs = {"one": single(harvest_args(tmp_path / "one.zarr", text, tokens=4096)),
            "two": torchrun(harvest_args(tmp_path / "two.zarr", text, tokens=4096))}
    for name, done in runs.items():
        assert done.returncode == 1, (name, done.stderr[-3000:])
        assert "ran out after" in done.stderr
    one = open_cache(tmp_path / "one.zarr")
    assert one.meta["exhausted"] and one.n_tokens == 9 * 32, json.dumps(one.meta)[:500]
    assert_same_cache(tmp_path / "two.zarr", tmp_path / "one.zarr")


def split_contexts(tokenizer, n_ranks: int, start: Position, max_tokens: int) -> list[list]:
    """pack_contexts on `n_ranks` threads that tokenize the built-in text between them (gathering as ranks do)."""
    slots, meet = [None] * n_ranks, threading.Barrier(n_ranks, timeout=60)  # a missed gather fails, not hangs

    def gather(rank: int, obj):
        slots[rank] = obj
        meet.wait()
        got = list(slots)
        meet.wait()
        return got

    out: list[list] = [[] for _ in range(n_ranks)]

    def rank(r: int) -> None:
        split = TokenizeSplit(r, n_ranks, lambda obj: gather(r, obj), max_tokens)
        docs = open_documents("stdlib-sample", "train", "text")
        out[r] = list(pack_contexts(docs, tokenizer, 32, True, start, split=split))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(n_ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and not meet.broken
    return out


@pytest.mark.parametrize("n_ranks", [2, 3])
def test_ranks_that_tokenize_between_them_pack_the_same_contexts(n_ranks):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-stdlib-gpt2")
    start = Position(doc=5, offset=7)  # a resumed harvest: mid-document
    n_ctx = 300  # about 140 documents: several rounds of 64-document groups, the last one partial
    whole = list(itertools.islice(pack_contexts(open_documents("stdlib-sample", "train", "text"), tokenizer, 32,
                                                True, start), n_ctx))
    got = split_contexts(tokenizer, n_ranks, start, max_tokens=n_ctx * 31)
    assert all(g == got[0] for g in got)  # every rank packs the same stream and stops after the same round
    assert len(got[0]) >= n_ctx and got[0][:n_ctx] == whole
