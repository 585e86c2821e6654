"""Faults keep data and never strand work: a bad document in the middle of a dataset is skipped and recorded
(the harvest finishes, reruns are byte-identical), a harvest that fails before its first shard leaves nothing
`sae train` would pick, and a killed shard write's temporary files are removed on resume and never counted."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from sae_cache.harvest import shards
from sae_cache.sae_common.cache_format import find_caches, layout_for, open_cache, verify
from sae_cache.sae_common.cache_writer import CacheWriter
from sae_cache.sae_common.cli import main
from sae_cache.sae_common.config import TrainConfig
from sae_cache.sae_common.console import make_console
from sae_cache.train.run import pick_cache
from tests.cache_utils import write_cache
from tests.conftest import make_corpus
from tests.test_harvest import CTX, _shard_files, harvest_args


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def good_and_bad_folder(root: Path) -> tuple[Path, Path]:
    """Three text files; the middle one has a paragraph (its 4th, from line 7) with a byte that is not UTF-8."""
    root.mkdir()
    for name, seed in (("a.txt", 1), ("c.txt", 3)):
        make_corpus(root / name, n_docs=8 if name == "a.txt" else 20, seed=seed)
    good = make_corpus(root / "b.txt", n_docs=20, seed=2).read_bytes().split(b"\n\n")
    bad = root / "b.txt"
    bad.write_bytes(b"\n\n".join(good[:3] + [b"caf\xe9 au lait\nsecond line"] + good[3:]))
    return root, bad


def expected_tokens(docs: list[str], model: Path, n_ctx: int) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    stream = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    body = CTX - 1
    return np.array([[tok.bos_token_id] + stream[i * body:(i + 1) * body] for i in range(n_ctx)]).reshape(-1)


def test_a_bad_text_file_in_a_folder_is_skipped_recorded_and_reruns_are_identical(checkpoints, tmp_path):
    folder, bad = good_and_bad_folder(tmp_path / "data")
    model = checkpoints["gpt2"]
    first = invoke(*harvest_args(model, folder, tmp_path / "one.zarr", "--layer", 1, tokens=4096))
    assert first.exit_code == 0, first.output
    assert f"skipped document 11 ({bad}, line 7): invalid UTF-8 (byte 0xe9 on line 7)" in " ".join(first.output.split())
    cache = open_cache(tmp_path / "one.zarr")
    assert cache.meta["complete"] and verify(cache) == []
    assert cache.meta["dataset"]["skipped"] == {"count": 1, "documents": [
        {"doc": 11, "file": str(bad), "line": 7, "reason": "invalid UTF-8 (byte 0xe9 on line 7)"}]}
    # The contexts of the good documents alone (split as the text builder does): the bad one adds no token.
    good_docs = [p.decode() for f in ("a.txt", "b.txt", "c.txt") for p in (folder / f).read_bytes().split(b"\n\n")
                 if p and b"\xe9" not in p]
    assert np.array_equal(cache.tokens()[:], expected_tokens(good_docs, model, 4096 // CTX))
    again = invoke(*harvest_args(model, folder, tmp_path / "two.zarr", "--layer", 1, tokens=4096))
    assert again.exit_code == 0, again.output
    assert _shard_files(tmp_path / "one.zarr") == _shard_files(tmp_path / "two.zarr")
    assert open_cache(tmp_path / "two.zarr").meta["dataset"] == cache.meta["dataset"]


def test_malformed_jsonl_lines_are_skipped_and_the_harvest_finishes(checkpoints, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    row = lambda i: json.dumps({"text": "the quick brown fox jumps over a lazy dog " * 3 + str(i)})  # noqa: E731
    (data / "a.jsonl").write_text("\n".join(row(i) for i in range(20)) + "\n")
    (data / "b.jsonl").write_bytes(b"\n".join([row(20).encode(), b'{"text": "unterminated', b'{"text": "\xff\xfe"}',
                                               *(row(i).encode() for i in range(21, 40))]))
    (data / "c.jsonl").write_text("\n".join(row(i) for i in range(40, 60)))
    result = invoke(*harvest_args(checkpoints["gpt2"], data, tmp_path / "c.zarr", "--layer", 1))
    assert result.exit_code == 0, result.output
    skipped = open_cache(tmp_path / "c.zarr").meta["dataset"]["skipped"]
    assert skipped["count"] == 2
    assert [(Path(s["file"]).name, s["doc"], s["line"], s["reason"].split(" (")[0]) for s in skipped["documents"]] == [
        ("b.jsonl", 21, 2, "malformed JSON"), ("b.jsonl", 22, 3, "invalid UTF-8")]


def test_a_harvest_stopped_after_a_skip_resumes_to_the_same_cache_and_record(checkpoints, tmp_path, monkeypatch):
    folder, _ = good_and_bad_folder(tmp_path / "data")
    args = lambda out: harvest_args(checkpoints["gpt2"], folder, out, "--layer", 1, tokens=4096)  # noqa: E731
    assert invoke(*args(tmp_path / "whole.zarr")).exit_code == 0
    real = shards.write_shard_files  # what every rank calls to write its shard's files

    def full_at(shard: int):
        def write(path, meta, index, *a):
            if index == shard:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(path, meta, index, *a)
        return write

    out = tmp_path / "stopped.zarr"
    recorded = []
    for stop_at in (1, 3):  # stopped before the shard that passes the bad document (doc 11), then after it
        monkeypatch.setattr(shards, "write_shard_files", full_at(stop_at))
        assert invoke(*args(out)).exit_code == 1
        kept = open_cache(out).meta["dataset"]
        assert open_cache(out).n_tokens == 512 * stop_at
        recorded.append((kept["position"]["doc"] > 11, kept.get("skipped", {"count": 0})["count"]))
    assert recorded == [(False, 0), (True, 1)]
    monkeypatch.setattr(shards, "write_shard_files", real)
    assert invoke(*args(out)).exit_code == 0
    assert _shard_files(out) == _shard_files(tmp_path / "whole.zarr")
    assert open_cache(out).meta["dataset"] == open_cache(tmp_path / "whole.zarr").meta["dataset"]


def test_a_harvest_that_fails_before_its_first_shard_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short\n")
    out = tmp_path / "cache" / "gpt2" / "c.zarr"
    result = invoke(*harvest_args(checkpoints["gpt2"], tiny, out, "--layer", 1))
    assert result.exit_code == 1 and "less than one context (32 tokens) of readable text" in result.output
    assert not (tmp_path / "cache").exists()  # every directory the harvest made is gone
    corpus = make_corpus(tmp_path / "corpus.txt", n_docs=100)
    def disk_full(file):  # the first shard's files are written, then the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("sae_cache.sae_common.cache_writer.file_sha256", disk_full)
    result = invoke(*harvest_args(checkpoints["gpt2"], corpus, out, "--layer", 1))
    assert result.exit_code == 1 and "disk is full while writing shard 0" in result.output
    assert not (tmp_path / "cache").exists() and find_caches(tmp_path) == []


def test_train_without_a_cache_path_passes_over_empty_caches(tmp_path):
    root = tmp_path / "cache"
    good = write_cache(root / "m" / "good.zarr", torch.randn(256, 4), context_size=16, rows_per_shard=64)
    meta = {"model": "m", "hooks": ["h.0"], "d_model": 4, "context_size": 4, "prepend_bos": False, "dtype": "float32",
            "compression": "zstd", "layout": layout_for(4, "float32", 4, 16), "dataset": {}}
    with CacheWriter.open(root / "m" / "empty.zarr", meta, identity={}) as writer:
        writer.finish()  # an empty cache as harvests left before they removed theirs: newer than the good one
    assert find_caches(root) == [good]
    assert pick_cache(TrainConfig(), make_console(), root).path == good


def test_a_folder_of_other_files_is_never_cleared(checkpoints, corpus, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "download.partial").write_text("not the cache's")
    for extra in ([], ["--overwrite"]):
        result = invoke(*harvest_args(checkpoints["gpt2"], corpus, out, "--layer", 1, *extra))
        assert result.exit_code == 1
        assert "is a directory that is not an activation cache (it holds download.partial, notes.txt)" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["download.partial", "notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_killed_shard_writes_partial_files_are_removed_on_resume_and_never_counted(checkpoints, corpus, tmp_path,
                                                                                    monkeypatch):
    args = lambda out: harvest_args(checkpoints["gpt2"], corpus, out, "--layer", 1)  # noqa: E731
    assert invoke(*args(tmp_path / "whole.zarr")).exit_code == 0
    out = tmp_path / "killed.zarr"
    real = shards.write_shard_files
    monkeypatch.setattr(shards, "write_shard_files", lambda path, meta, index, *a: real(path, meta, index, *a)
                        if index < 2 else (_ for _ in ()).throw(KeyboardInterrupt()))
    assert invoke(*args(out)).exit_code == 130
    monkeypatch.setattr(shards, "write_shard_files", real)
    info_before = invoke("cache", "info", out).output
    # What zarr's LocalStore leaves when killed mid-write: <file>.<uuid hex>.partial beside the shard and zarr.json
    leftovers = [out / "acts" / "blocks.1.hook_resid_post" / "c" / "2" / "0.0123456789abcdef0123456789abcdef.partial",
                 out / "tokens" / "c" / "2.fedcba9876543210fedcba9876543210.partial",
                 out / "zarr.00112233445566778899aabbccddeeff.partial"]
    for leftover in leftovers:
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_bytes(os.urandom(3 << 20))
    assert open_cache(out).disk_bytes() == sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) - (9 << 20)
    assert invoke("cache", "info", out).output == info_before
    assert invoke(*args(out)).exit_code == 0
    assert not list(out.rglob("*.partial"))
    assert _shard_files(out) == _shard_files(tmp_path / "whole.zarr")


def test_a_creation_killed_while_writing_its_metadata_is_taken_over(tmp_path):
    out = tmp_path / "c.zarr"
    out.mkdir()
    (out / ".writer.lock").write_text("12345")  # the killed writer's lock file and zarr.json's temporary file
    (out / "zarr.00112233445566778899aabbccddeeff.partial").write_text('{"zarr_format": 3, "node_')
    write_cache(out, torch.randn(64, 4), context_size=16, rows_per_shard=32)
    assert open_cache(out).n_tokens == 64 and not list(out.rglob("*.partial"))
