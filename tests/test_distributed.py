"""sae_common.distributed under torchrun (2 CPU processes, gloo) and in one process."""

from __future__ import annotations

import json
import time

from sae_cache.sae_common import distributed as D
from tests.dist_utils import torchrun


def test_one_process_is_a_world_of_one_and_collectives_are_identities() -> None:
    import torch

    w = D.world()
    assert (w.rank, w.size, w.is_main, w.active) == (0, 1, True, False)
    assert D.all_gather_object("x") == ["x"] and D.broadcast_object(7) == 7
    t = torch.tensor([2.0])
    assert D.all_reduce_(t, "max") is t and t.item() == 2.0
    assert D.any_rank(True) and not D.any_rank(False)
    assert list(D.shard(5)) == [0, 1, 2, 3, 4]
    assert D.all_gather(torch.tensor([1.0, 2.0])).tolist() == [[1.0, 2.0]]


def test_shard_splits_round_robin_and_covers_everything_once() -> None:
    parts = [list(D.shard(7, D.World(r, 3))) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(parts, [])) == list(range(7))


def test_two_ranks_see_each_other() -> None:
    done = torchrun(["collectives"], module="tests.dist_probe", timeout=120)
    assert done.returncode == 0, done.stderr
    seen = sorted((json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")),
                  key=lambda s: s["rank"])
    assert [s["rank"] for s in seen] == [0, 1] and all(s["size"] == 2 for s in seen)
    for s in seen:
        assert s["gathered"] == ["r0", "r1"] and s["broadcast"] == {"from": 0}
        assert (s["sum"], s["max"], s["min"]) == (3.0, 2.0, 1.0)
        assert s["all_gather"] == [[0, 10], [1, 11]]
        assert s["side"] == ["s0", "s1"] and s["main_beside"] == ["m0", "m1"]  # side_group beside the main one
        assert s["any"] == [True, False]  # rank 1's flag reaches rank 0; no flag anywhere stays false
    assert seen[0]["shard"] == [0, 2, 4] and seen[1]["shard"] == [1, 3]


def test_a_rank_that_raises_stops_the_job_with_its_rank_and_message() -> None:
    t0 = time.monotonic()
    done = torchrun(["raise"], module="tests.dist_probe", timeout=120)
    assert done.returncode != 0
    assert "rank 1 of 2: rank one refuses" in done.stderr
    # the survivor, blocked in a collective, either says why it stops or was stopped by torchrun first
    assert "rank 0 of 2: all_gather_object failed: another rank stopped" in done.stderr or "SIGTERM" in done.stderr
    assert "]: Traceback" not in done.stderr  # no rank printed a traceback (torchrun's own summary is its own)
    assert time.monotonic() - t0 < 60  # the survivor, waiting in a barrier, was stopped by torchrun


def test_a_rank_that_dies_stops_the_job_and_torchrun_names_it() -> None:
    done = torchrun(["die"], module="tests.dist_probe", timeout=120)
    assert done.returncode != 0
    assert "exitcode  : 3" in done.stderr and "rank      : 1" in done.stderr, done.stderr[-3000:]
