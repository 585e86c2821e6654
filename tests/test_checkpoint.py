"""Checkpoints a resume can trust: damage is refused naming the file, a full disk keeps the last good checkpoint,
history is never duplicated, and one `sae train` at a time writes a run directory."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load, load_file

import sae_cache.train.checkpoint as checkpoint
from sae_cache.sae_common.cli import main
from sae_cache.sae_common.sae_io import load_sae
from sae_cache.train.checkpoint import trim_histories
from tests.cache_utils import write_cache

D = 16
SAES = ["topk-k4-64", "batchtopk-k4-64"]
FLAGS = ("--batch-size", 256, "--expansion", 4, "--log-every", 4, "--arch", "topk,batchtopk", "--k", 4,
         "--checkpoint-every", 2048)  # 8 batches of 256 tokens


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    x = torch.randn(8192, D) @ torch.randn(D, D) + 3.0
    return write_cache(tmp_path_factory.mktemp("cache") / "c.zarr", x, context_size=16, rows_per_shard=1024)


def train(cache: Path, run: Path, tokens: int) -> object:
    return CliRunner().invoke(main, [str(a) for a in ("train", "--cache", cache, "--out", run, *FLAGS,
                                                      "--tokens", tokens)])


def refused(result) -> str:
    """A one-line refusal: exit 1, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    return " ".join(result.output.split())  # rich and click may wrap long lines


def history_tokens(run: Path, name: str) -> list[int]:
    return [json.loads(line)["tokens"] for line in (run / name / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def whole(cache, tmp_path_factory) -> Path:
    """An uninterrupted run of 30 batches: what every resumed run must equal."""
    run = tmp_path_factory.mktemp("whole") / "run"
    assert train(cache, run, 7680).exit_code == 0
    return run


# ---------------------------------------------------------------- damage is refused, naming the file

def flip_two_bytes(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-50] ^= 0x7F  # in the last tensor's data, past the header: the file still parses
    data[-49] ^= 0x40
    file.write_bytes(bytes(data))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


DAMAGE = {  # what is damaged -> (which file, how, what the message says of it)
    "flipped checkpoint": ("topk-k4-64/checkpoint-8.safetensors", flip_two_bytes, "is damaged: its SHA-256 differs"),
    "truncated checkpoint": ("batchtopk-k4-64/checkpoint-8.safetensors", truncate, "is damaged: its SHA-256 differs"),
    "missing checkpoint": ("topk-k4-64/checkpoint-8.safetensors", Path.unlink, "is missing"),
    "truncated state.json": ("state.json", truncate, "is damaged or truncated (not valid JSON)"),
    "emptied state.json": ("state.json", lambda f: f.write_text("{}"), "has checkpoint format 'none', not 2"),
    "state.json without checksums": ("state.json", lambda f: f.write_text(json.dumps(
        {**json.loads(f.read_text()), "sha256": None})), "is damaged: sha256 missing or malformed"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_refused_naming_the_file(cache, tmp_path, damage):
    run = tmp_path / "run"
    assert train(cache, run, 2048).exit_code == 0  # stops at batch 8: checkpoint-8 and state.json
    relative, how, says = DAMAGE[damage]
    file = run / relative
    original = file.read_bytes()
    how(file)
    if damage == "flipped checkpoint":  # safetensors alone loads it, with different numbers: only the checksum tells
        damaged, clean = load_file(file), load(original)
        assert damaged.keys() == clean.keys() and any(not torch.equal(damaged[k], clean[k]) for k in clean)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    out = refused(train(cache, run, 4096))
    assert f"{file} {says}" in out, out
    assert f"so the run in {run} cannot resume. Delete {run} to train again from the start, or pass --out" in out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing touched


# ---------------------------------------------------------------- a full disk, and history on resume

@pytest.mark.parametrize("failing", ["second SAE's checkpoint", "state.json"])
def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_the_resume_repeats_no_history(
        cache, whole, tmp_path, monkeypatch, failing):
    run = tmp_path / "run"
    real = checkpoint.write_atomic
    target = run / SAES[1] / "checkpoint-16.safetensors" if failing != "state.json" else run / "state.json"
    reached = []

    def full_at_batch_16(path: Path, data: bytes) -> str:
        if path == target and (failing != "state.json" or b'"batches_done": 16' in data):
            reached.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data)

    monkeypatch.setattr(checkpoint, "write_atomic", full_at_batch_16)
    out = refused(train(cache, run, 7680))
    assert reached and f"the disk holding {run} is full: training stopped; its last checkpoint (batch 8 of 30) is " \
                       "kept. Free some space and run the same command again to resume" in out
    assert json.loads((run / "state.json").read_text())["batches_done"] == 8
    for name in SAES:  # the previous checkpoint whole; the failed one's files removed again
        assert sorted(p.name for p in (run / name).iterdir()) == ["checkpoint-8.safetensors", "history.jsonl"]
        assert history_tokens(run, name)[-1] == 16 * 256  # logged past the checkpoint before the save failed
    monkeypatch.setattr(checkpoint, "write_atomic", real)
    resumed = train(cache, run, 7680)
    assert resumed.exit_code == 0 and f"resuming {run} at batch 8" in resumed.output
    for name in SAES:
        assert history_tokens(run, name) == history_tokens(whole, name) == [*range(1024, 7680, 1024), 7680]
        torch.testing.assert_close(load_sae(run / name).W_dec, load_sae(whole / name).W_dec, rtol=1e-5, atol=1e-6)


def test_trim_histories_drops_records_past_the_checkpoint_and_a_torn_line(tmp_path):
    (tmp_path / "s").mkdir()
    lines = [json.dumps({"tokens": t, "loss": 1.0}) for t in (100, 200, 300)] + ['{"tokens": 40']
    (tmp_path / "s" / "history.jsonl").write_text("\n".join(lines))
    trim_histories(tmp_path, ["s"], 200)
    assert (tmp_path / "s" / "history.jsonl").read_text() == "\n".join(lines[:2]) + "\n"
    trim_histories(tmp_path, ["s", "absent"], 0)  # a fresh start over leftovers of a run that saved nothing
    assert (tmp_path / "s" / "history.jsonl").read_text() == ""


# ---------------------------------------------------------------- one `sae train` per run directory

def test_a_second_train_on_a_locked_run_directory_names_the_holder_and_kill_9_frees_it(cache, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # another process holding the run, as a `sae train` does
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; from sae_cache.sae_common."
                               "files import acquire_lock; acquire_lock(Path(sys.argv[1])); print('locked', flush=True);"
                               " sys.stdin.read()", str(run / ".train.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        out = refused(train(cache, run, 2048))
        assert f"another `sae train` (pid {holder.pid}) is training in {run}; wait for it to finish or stop it" in out
        assert sorted(p.name for p in run.iterdir()) == [".train.lock"]  # it wrote nothing
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder; the kernel releases its flock
        holder.wait()
    assert train(cache, run, 2048).exit_code == 0
