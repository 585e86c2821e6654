"""Every user error of `sae harvest` through the CLI: a clear message, exit code 1, no traceback, no data lost."""

from __future__ import annotations

import errno
import json
import os

import pytest
from click.testing import CliRunner

from sae_cache.harvest import shards
from sae_cache.sae_common.cache_format import open_cache, verify
from sae_cache.sae_common.cache_format import layout_for
from sae_cache.sae_common.cache_writer import CacheWriter
from sae_cache.sae_common.cli import main
from tests.test_harvest import harvest_args


def fails(*args: object) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    return result.output


def test_unknown_model_name_says_so_with_close_matches(corpus, tmp_path):
    out = fails("harvest", "--model", "gemma-2-2bb", "--dataset", corpus, "--out", tmp_path / "c.zarr")
    assert "'gemma-2-2bb' is neither a local checkpoint directory nor a model name" in out
    assert "gemma-2-2b" in out.split("Close matches:")[1]


def test_directory_that_is_not_a_checkpoint(corpus, tmp_path):
    (tmp_path / "empty").mkdir()
    out = fails("harvest", "--model", tmp_path / "empty", "--dataset", corpus, "--out", tmp_path / "c.zarr")
    assert "not a Hugging Face checkpoint: it has no config.json" in out


def test_layer_out_of_range_names_the_number_of_layers(checkpoints, corpus, tmp_path):
    out = fails(*harvest_args(checkpoints["gpt2"], corpus, tmp_path / "c.zarr", "--layer", 7))
    assert "layer 7" in out and "has 3 layers (0 to 2)" in out


def test_unknown_hook_lists_close_matches(checkpoints, corpus, tmp_path):
    out = fails(*harvest_args(checkpoints["gpt2"], corpus, tmp_path / "c.zarr", "--hook", "blocks.1.hook_resid_pots"))
    assert "does not exist" in out and "blocks.1.hook_resid_post" in out
    out = fails(*harvest_args(checkpoints["gpt2"], corpus, tmp_path / "c.zarr", "--hook", "resid"))
    assert "unknown hook 'resid'" in out and "resid_post" in out


def test_dataset_without_the_text_column_lists_its_columns(checkpoints, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"content": f"doc {i}", "id": i}) for i in range(5)))
    out = fails(*harvest_args(checkpoints["gpt2"], data, tmp_path / "c.zarr", "--layer", 1))
    assert "no column 'text'" in out and "content, id" in out


def test_jsonl_dataset_with_text_column_option_works(checkpoints, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"content": "the quick brown fox " * 20}) for _ in range(40)))
    result = CliRunner().invoke(main, [str(a) for a in harvest_args(checkpoints["gpt2"], data, tmp_path / "c.zarr",
                                                                     "--layer", 1, "--text-column", "content")])
    assert result.exit_code == 0, result.output
    assert open_cache(tmp_path / "c.zarr").n_tokens == 2048


def test_too_few_tokens_says_how_many_and_keeps_them(checkpoints, corpus, tmp_path):
    out_dir = tmp_path / "c.zarr"
    out = fails(*harvest_args(checkpoints["gpt2"], corpus, out_dir, "--layer", 1, tokens=10**6))
    assert "ran out after" in out and "1,000,000 asked for" in out
    cache = open_cache(out_dir)
    assert 0 < cache.n_tokens < 10**6 and cache.n_tokens % 32 == 0 and cache.meta["exhausted"]
    assert verify(cache) == [] and f"{cache.n_tokens:,}" in out


def test_missing_dataset_file(checkpoints, tmp_path):
    out = fails(*harvest_args(checkpoints["gpt2"], tmp_path / "nope.txt", tmp_path / "c.zarr", "--layer", 1))
    assert "nope.txt does not exist" in out


def test_refuses_when_the_disk_cannot_hold_the_cache(checkpoints, corpus, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = fails(*harvest_args(checkpoints["gpt2"], corpus, tmp_path / "c.zarr", "--layer", 1))
    assert "the cache needs about" in out and "has only 0.00 GB free" in out


def test_full_disk_mid_run_keeps_the_cache_resumable(checkpoints, corpus, tmp_path, monkeypatch):
    out_dir = tmp_path / "c.zarr"
    real = shards.write_shard_files  # what every rank calls to write its shard's files

    def full_after_two(path, meta, index, *args):
        if index == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, meta, index, *args)

    monkeypatch.setattr(shards, "write_shard_files", full_after_two)
    out = fails(*harvest_args(checkpoints["gpt2"], corpus, out_dir, "--layer", 1))
    assert "disk is full while writing shard 2" in out and "1,024 complete tokens" in out
    monkeypatch.setattr(shards, "write_shard_files", real)
    assert CliRunner().invoke(main, [str(a) for a in harvest_args(checkpoints["gpt2"], corpus, out_dir,
                                                                  "--layer", 1)]).exit_code == 0
    assert open_cache(out_dir).meta["complete"] and verify(open_cache(out_dir)) == []


def test_different_config_is_refused_naming_the_fields_and_overwrite_replaces(checkpoints, corpus, tmp_path):
    out_dir = tmp_path / "c.zarr"
    assert CliRunner().invoke(main, [str(a) for a in harvest_args(checkpoints["gpt2"], corpus, out_dir,
                                                                  "--layer", 1)]).exit_code == 0
    out = fails(*harvest_args(checkpoints["gpt2"], corpus, out_dir, "--layer", 1, "--dtype", "float16", "--seed", 3))
    assert "different config" in out and "dtype: cache has 'bfloat16', now 'float16'" in out and "seed" in out
    # Execution-only fields may change on resume.
    ok = CliRunner().invoke(main, [str(a) for a in harvest_args(checkpoints["gpt2"], corpus, out_dir, "--layer", 1,
                                                                "--batch-size", 2)])
    assert ok.exit_code == 0 and "already complete" in ok.output
    ok = CliRunner().invoke(main, [str(a) for a in harvest_args(checkpoints["gpt2"], corpus, out_dir, "--layer", 1,
                                                                "--dtype", "float16", "--overwrite")])
    assert ok.exit_code == 0, ok.output
    assert open_cache(out_dir).dtype == "float16"


def test_two_harvests_cannot_write_one_cache(checkpoints, corpus, tmp_path):
    out_dir = tmp_path / "c.zarr"
    meta = {"model": "m", "hooks": ["blocks.1.hook_resid_post"], "d_model": 32, "context_size": 32,
            "prepend_bos": True, "dtype": "bfloat16", "compression": "zstd",
            "layout": layout_for(32, "bfloat16", 32, 512), "dataset": {}}
    with CacheWriter.open(out_dir, meta, identity={}):  # as another harvest holding the cache would
        out = fails(*harvest_args(checkpoints["gpt2"], corpus, out_dir, "--layer", 1))
        assert f"another process (pid {os.getpid()}) is writing the cache" in out
        assert (out_dir / ".writer.lock").exists()  # creating the cache kept the lock file


def test_bad_token_count():
    out = CliRunner().invoke(main, ["harvest", "--tokens", "10X"]).output
    assert "'10X' is not a count" in out


@pytest.mark.parametrize("command", ["info", "verify"])
def test_cache_commands_on_a_path_that_is_not_a_cache(tmp_path, command):
    out = fails("cache", command, tmp_path)
    assert "is not an activation cache" in out
