"""Damage is always detected, named and refused (exit 1, no traceback), and a cache written by another tool that
follows the documented format works: `sae train`, `sae eval`, `sae cache verify/info`, through the CLI.

Damage: a flipped byte in an activation shard (with and without chunk CRC32Cs), a deleted shard, a truncated
shard, a corrupt zarr.json. Each test damages a copy of a pristine cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from zarr.codecs import Crc32cCodec

from sae_cache.sae_common import cache_format, cache_writer
from sae_cache.sae_common.cache_format import CacheError, open_cache, shard_file
from sae_cache.sae_common.cache_writer import CacheWriter
from sae_cache.sae_common.cli import main
from tests.cache_utils import write_cache
from tests.test_harvest import harvest_args

HOOK = "blocks.0.hook_resid_post"
N, D = 2048, 16  # 4 shards of 512 rows, one chunk each; training reads shards 0-2, the held-out tail is shard 3


def cli(*args: object):
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, [str(a) for a in args])


def refused(result, *named: str) -> str:
    """The command exited 1 with a one-line `Error:` naming each of `named`, and no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, result.output
    for text in named:
        assert text in error[0], (text, error[0])
    return error[0]


def train(cache: Path, out: Path):
    return cli("train", "--cache", cache, "--out", out, "--batch-size", 256, "--expansion", 2, "--arch", "topk",
               "--k", 4, "--device", "cpu", "--log-every", 2)


def flip_byte(file: Path, at: int | None = None) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x01  # one bit, in a chunk's compressed bytes
    file.write_bytes(bytes(data))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def damaged_copy(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / pristine.name))


def acts_shard(cache: Path, index: int, hook: str = HOOK) -> Path:
    c = open_cache(cache)
    return shard_file(cache, c.acts(hook), index)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(0)) @ torch.randn(D, D) + 1.0
    return write_cache(tmp_path_factory.mktemp("pristine") / "c.zarr", x, context_size=16, rows_per_shard=512)


@pytest.fixture(scope="module")
def pristine_without_crc(tmp_path_factory) -> Path:
    """A cache as the writer made it before chunks carried a CRC32C: only the shards' SHA-256s."""
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1))

    def without_crc(compression: str, dtype: str) -> list:
        return [c for c in cache_format.compressors(compression, dtype) if not isinstance(c, Crc32cCodec)]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache_writer, "compressors", without_crc)
        path = write_cache(tmp_path_factory.mktemp("old") / "c.zarr", x, context_size=16, rows_per_shard=512)
    assert not open_cache(path).chunk_crc and open_cache(path).shard_checksums
    return path


# ---------------------------------------------------------------- the cache as written

def test_new_caches_carry_a_crc32c_that_plain_zarr_checks(pristine, tmp_path):
    cache = open_cache(pristine)
    assert cache.chunk_crc and cache.shard_checksums
    meta = json.loads((pristine / "acts" / HOOK / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in inner] == ["bytes", "blosc", "crc32c"]  # the CRC is the last bytes-to-bytes codec
    assert cache.meta["format_version"] == 1
    copy = damaged_copy(pristine, tmp_path)
    flip_byte(acts_shard(copy, 1))
    plain = zarr.open_array(copy / "acts" / HOOK, mode="r")
    np.testing.assert_array_equal(plain[:512], zarr.open_array(pristine / "acts" / HOOK, mode="r")[:512])
    with pytest.raises(ValueError, match="checksum"):
        plain[512:1024]


# ---------------------------------------------------------------- train, verify and info refuse damage by name

def test_train_refuses_a_flipped_bit(pristine, tmp_path):
    copy = damaged_copy(pristine, tmp_path)
    shard = acts_shard(copy, 1)
    flip_byte(shard)
    error = refused(train(copy, tmp_path / "run"), str(shard), "CRC32C", f"sae cache verify {copy}")
    assert "shard 1" in error


def test_train_refuses_a_flipped_bit_in_a_cache_without_chunk_crcs(pristine_without_crc, tmp_path):
    copy = damaged_copy(pristine_without_crc, tmp_path)
    shard = acts_shard(copy, 2)
    flip_byte(shard)
    error = refused(train(copy, tmp_path / "run"), str(shard), "SHA-256", f"sae cache verify {copy}")
    assert "shard 2" in error


def test_an_intact_cache_without_chunk_crcs_trains(pristine_without_crc, tmp_path):
    result = train(pristine_without_crc, tmp_path / "run")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_train_and_verify_refuse_a_deleted_or_truncated_shard(pristine, tmp_path, damage):
    copy = damaged_copy(pristine, tmp_path)
    shard = acts_shard(copy, 1)
    shard.unlink() if damage == "delete" else truncate(shard)
    refused(train(copy, tmp_path / "run"), str(shard), "shard 1", f"sae cache verify {copy}")
    result = cli("cache", "verify", copy)
    refused(result, str(copy), "failed verification")
    reason = "is missing" if damage == "delete" else "does not match its checksum"
    assert f"BAD: shard 1 of acts/{HOOK} {reason} ({shard})" in result.output


@pytest.mark.parametrize("which", ["group", "array"])
def test_a_corrupt_zarr_json_is_named_by_every_command(pristine, tmp_path, which):
    copy = damaged_copy(pristine, tmp_path)
    file = copy / "zarr.json" if which == "group" else copy / "tokens" / "zarr.json"
    file.write_text(file.read_text()[:40])  # cut off mid-object, as a full disk would leave it
    for result in (train(copy, tmp_path / "run"), cli("cache", "info", copy), cli("cache", "verify", copy)):
        refused(result, f"{file} is damaged", "JSONDecodeError")


# ---------------------------------------------------------------- a cache written by another tool

def write_foreign(path: Path, acts_ND: np.ndarray, tokens_N: np.ndarray, attrs: dict, rows_per_chunk: int) -> Path:
    """The README's documented format with plain zarr: the arrays and the documented attributes, no bookkeeping
    (no layout, shards, complete, target_tokens, compression, identity), unsharded zarr defaults (no CRC32C)."""
    group = zarr.create_group(path, attributes={"sae_cache": attrs})
    group.create_array(f"acts/{attrs['hooks'][0]}", data=acts_ND, chunks=(rows_per_chunk, acts_ND.shape[1]))
    group.create_array("tokens", data=tokens_N, chunks=(rows_per_chunk,))
    return path


def foreign_attrs(model: str, hook: str, d: int, n: int, ctx: int, prepend_bos: bool) -> dict:
    return {"format_version": 1, "model": model, "hooks": [hook], "d_model": d, "context_size": ctx,
            "prepend_bos": prepend_bos, "dtype": "float32", "n_tokens": n}


@pytest.fixture
def foreign(pristine, tmp_path) -> Path:
    ours = zarr.open_group(pristine, mode="r")
    return write_foreign(tmp_path / "foreign.zarr", ours[f"acts/{HOOK}"][:], ours["tokens"][:],
                         foreign_attrs("synthetic", HOOK, D, N, 16, False), rows_per_chunk=512)


def test_a_foreign_cache_trains_and_is_described(foreign, tmp_path):
    result = train(foreign, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "no checksums" in result.output  # it says damage could not be detected
    info = cli("cache", "info", foreign)
    assert info.exit_code == 0, info.output
    assert "2,048 of 2,048 (no completion record)" in info.output and "4 of up to 512 rows" in info.output
    ok = cli("cache", "verify", foreign)
    assert ok.exit_code == 0 and "every shard present and readable" in ok.output, ok.output


def test_a_foreign_cache_is_read_as_ours(foreign, pristine, tmp_path):
    """Same rows, chunking and seed: the foreign cache (unsharded, read through zarr) trains the SAE ours trains."""
    for cache, out in ((foreign, tmp_path / "a"), (pristine, tmp_path / "b")):
        assert cli("train", "--cache", cache, "--out", out, "--batch-size", 256, "--expansion", 2, "--arch", "topk",
                   "--k", 4, "--device", "cpu", "--tokens", 1024).exit_code == 0
    from safetensors.torch import load_file

    a, b = (load_file(next(out.glob("*/sae_weights.safetensors"))) for out in (tmp_path / "a", tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_foreign_cache_missing_a_documented_key_is_named(foreign, tmp_path):
    meta = json.loads((foreign / "zarr.json").read_text())
    del meta["attributes"]["sae_cache"]["d_model"]
    (foreign / "zarr.json").write_text(json.dumps(meta))
    for result in (train(foreign, tmp_path / "run"), cli("cache", "info", foreign), cli("cache", "verify", foreign)):
        refused(result, str(foreign / "zarr.json"), "'d_model'")


def test_a_foreign_cache_missing_a_chunk_is_refused(foreign, tmp_path):
    (foreign / "tokens" / "c" / "3").unlink()
    refused(cli("cache", "verify", foreign), str(foreign))
    refused(train(foreign, tmp_path / "run"), "shard 3 of tokens is missing", str(foreign / "tokens" / "c" / "3"))


def test_harvest_does_not_resume_into_a_foreign_cache(foreign):
    with pytest.raises(CacheError, match=r"written by another tool \(no 'identity' record"):
        CacheWriter.open(foreign, {}, identity={"synthetic": True})
