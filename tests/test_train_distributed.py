"""`sae train` under torchrun, sweep-parallel (2 CPU ranks, gloo): every SAE ends bit-equal to a one-process run
of the same sweep, an uneven split (3 SAEs on 2 ranks) finishes, a rank killed mid-train stops the other within
60 s with a clear message, Ctrl-C reaching one rank checkpoints every rank at the same batch, and a run stopped
under 2 ranks resumes under 1 (per-SAE checkpoint files: any world size can resume a sweep).

Equality is exact (torch.equal): each rank runs the same float operations on the same batches as the one process,
with the same thread count (OMP_NUM_THREADS=1 on both sides), so nothing can round differently.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_cache.sae_common.cache_format import file_sha256
from sae_cache.sae_common.distributed import World
from sae_cache.train.run import build_members, parallel_mode
from sae_cache.train.sweep import expand
from sae_cache.sae_common.config import TrainConfig
from tests.cache_utils import write_cache
from tests.dist_utils import single, torchrun

SWEEP4 = ("--arch", "topk,batchtopk", "--k", "4,8")  # 4 SAEs: ranks 0 and 1 train two each
SWEEP3 = ("--arch", "topk,batchtopk,jumprelu", "--k", 4)  # 3 SAEs: rank 0 trains two, rank 1 one
# 24 batches of 128 tokens, a checkpoint every 8 batches, a log record every 4
FLAGS = ("--batch-size", 128, "--expansion", 4, "--log-every", 4, "--checkpoint-every", 1024, "--tokens", 3072)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    x_ND = torch.randn(4096, 16) @ torch.randn(16, 16) + 1.0
    return write_cache(tmp_path_factory.mktemp("cache") / "c.zarr", x_ND, context_size=16, rows_per_shard=1024)


def args(cache: Path, run: Path, sweep: tuple) -> list:
    return ["train", "--cache", cache, "--out", run, *sweep, *FLAGS]


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory) -> Path:
    """The 4-SAE sweep in one plain process: what every 2-rank run must end equal to."""
    run = tmp_path_factory.mktemp("one") / "run"
    done = single(args(cache, run, SWEEP4))
    assert done.returncode == 0, done.stderr
    return run


def assert_same_run(run: Path, want: Path, interrupted_at: int | None = None) -> None:
    """Every SAE's final checkpoint (weights, Adam state, θ window, dead-latent counters, input scale), exported
    weights and history equal the reference's bit for bit; state.json names them all, with their checksums."""
    names = json.loads((want / "run.json").read_text())["saes"]
    assert json.loads((run / "run.json").read_text())["saes"] == names
    assert json.loads((run / "run.json").read_text())["complete"] is True
    state, ref_state = (json.loads((r / "state.json").read_text()) for r in (run, want))
    # the checksums differ: safetensors writes its metadata in a per-process hash order; each matches its file
    assert {**state, "sha256": None} == {**ref_state, "sha256": None} and list(state["sha256"]) == names
    assert all(file_sha256(run / name / "checkpoint-24.safetensors") == state["sha256"][name] for name in names)
    for name in names:
        for file in ("checkpoint-24.safetensors", "sae_native.safetensors"):
            got, ref = load_file(run / name / file), load_file(want / name / file)
            assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), (name, file)
        assert history(run / name, interrupted_at) == history(want / name, interrupted_at)
    buffers = set().union(*(load_file(run / name / "checkpoint-24.safetensors").keys() for name in names))
    assert {"sae.tokens_since_fired", "sae.theta_window", "sae.input_scale"} <= buffers  # compared above


def history(sae_dir: Path, interrupted_at: int | None) -> list[dict]:
    """The SAE's history records; but for the log window a Ctrl-C at batch `interrupted_at` split in two (a record
    at the stop, then one averaging fewer batches), whose records an uninterrupted run cannot have."""
    records = [json.loads(line) for line in (sae_dir / "history.jsonl").read_text().splitlines()]
    if interrupted_at is None or interrupted_at % 4 == 0:
        return records
    split = range(interrupted_at // 4 * 4 * 128 + 1, (interrupted_at // 4 + 1) * 4 * 128 + 1)
    return [r for r in records if r["tokens"] not in split]


def test_auto_is_sweep_while_every_rank_gets_an_sae():
    assert parallel_mode("auto", 4, World(0, 2)) == parallel_mode("auto", 2, World(1, 2)) == "sweep"
    assert parallel_mode("auto", 1, World(0, 2)) == "data"
    assert parallel_mode("data", 4, World(0, 1)) == "sweep"  # one process: nothing to divide
    assert parallel_mode("sweep", 1, World(0, 2)) == "sweep"


def test_each_rank_builds_its_saes_with_the_one_process_init():
    entries = expand(TrainConfig(archs=["topk", "batchtopk"], ks=[4, 8], expansions=[4]), 16)
    whole = build_members(entries, "cpu", seed=3)
    for rank in range(2):
        part = build_members(entries, "cpu", seed=3, keep=range(rank, 4, 2))
        assert [m.name for m in part] == [e.name for e in entries[rank::2]]
        for m, ref in zip(part, whole[rank::2]):
            assert all(torch.equal(a, b) for a, b in zip(m.sae.state_dict().values(), ref.sae.state_dict().values()))


def test_two_ranks_train_every_sae_equal_to_one_process(cache, reference, tmp_path):
    done = torchrun(args(cache, tmp_path / "run", SWEEP4))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(tmp_path / "run", reference)
    assert done.stdout.strip() == str(tmp_path / "run")  # rank 0 alone prints the run directory
    table = done.stderr[done.stderr.rindex("batch 24/24"):]
    assert all(name in table for name in json.loads((reference / "run.json").read_text())["saes"])  # all ranks' SAEs


def test_three_saes_on_two_ranks_equal_one_process(cache, tmp_path):
    one = single(args(cache, tmp_path / "one", SWEEP3))
    assert one.returncode == 0, one.stderr
    two = torchrun(args(cache, tmp_path / "two", SWEEP3))
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_run(tmp_path / "two", tmp_path / "one")


def test_killed_rank_stops_the_other_then_resumes_under_two_and_under_one_rank(cache, reference, tmp_path):
    run, mark = tmp_path / "run", tmp_path / "fault-time"
    # rank 1 is killed (kill -9) after batch 12: the checkpoint of batch 8 is the last whole one
    killed = torchrun(args(cache, run, SWEEP4), module="tests.train_probe",
                      env={"PROBE_FAULT": "kill", "PROBE_AFTER": "12", "PROBE_MARK": str(mark)})
    stopped_after = time.time() - float(mark.read_text())
    assert killed.returncode != 0 and stopped_after < 60
    assert "exitcode  : -9" in killed.stderr and "rank      : 1" in killed.stderr  # torchrun names the dead rank
    # the survivor, waiting on the dead rank, says why it stops, or was stopped by torchrun (SIGTERM) first
    assert ("rank 0 of 2: all_reduce (stop flag) failed: another rank stopped" in " ".join(killed.stderr.split())
            or "SIGTERM" in killed.stderr), killed.stderr[-3000:]
    assert "]: Traceback" not in killed.stderr
    assert json.loads((run / "state.json").read_text())["batches_done"] == 8

    # same world size: resumes at batch 8; Ctrl-C reaching rank 1 alone, 4 batches later, stops both ranks at
    # the same batch with every SAE checkpointed there
    stopped = torchrun(args(cache, run, SWEEP4), module="tests.train_probe",
                       env={"PROBE_FAULT": "interrupt", "PROBE_AFTER": "4"})
    assert "resuming" in stopped.stderr and "at batch 8 " in stopped.stderr, stopped.stderr[-3000:]
    at = json.loads((run / "state.json").read_text())["batches_done"]
    assert stopped.returncode != 0 and 8 < at < 24
    text = " ".join(stopped.stderr.split())
    for rank in (0, 1):
        assert f"rank {rank} of 2: sae train interrupted at batch {at} of 24: checkpoint saved" in text
    for name in json.loads((run / "state.json").read_text())["saes"]:
        assert json.loads((run / name / "history.jsonl").read_text().splitlines()[-1])["tokens"] == at * 128
        assert [f.name for f in (run / name).glob("checkpoint-*")] == [f"checkpoint-{at}.safetensors"]

    # another world size: one process resumes the 2-rank checkpoint and ends equal to the uninterrupted run
    resumed = single(args(cache, run, SWEEP4))
    assert resumed.returncode == 0 and f"at batch {at} " in resumed.stderr, resumed.stderr[-3000:]
    assert_same_run(run, reference, interrupted_at=at)
