"""`sae eval` under torchrun (2 CPU processes, gloo): the SAEs are split across ranks and the results are a single
process's, exactly; an idle rank (1 SAE, 2 ranks) still joins the gather, so nothing hangs.

Exact equality is the right check here, not a tolerance: every SAE is evaluated whole on one rank, on the same
held-out batches, by the same operations as in one process (same model, one thread), and no number
is reduced across ranks. Workspace: a float32 cache of conftest's tiny Gemma-2 with two hooks, run r0 (topk and
batchtopk on layer 0) and run r1 (relu on layer 1), so the 2-rank split has SAEs of two hooks, given interleaved.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from sae_cache.evaluate.run import rank_share
from sae_cache.sae_common.cli import main
from sae_cache.sae_common.distributed import World
from tests.dist_utils import torchrun
from tests.test_harvest import harvest_args

TABLE_TITLE = "sae eval (held-out tokens"


def cli(*args: object) -> None:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def runs(checkpoints, corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_dist")
    cache = root / "g.zarr"
    cli(*harvest_args(checkpoints["gemma2"], corpus, cache, "--layer", 0, "--layer", 1, "--dtype", "float32"))
    for run, hook, archs in (("r0", 0, "topk,batchtopk"), ("r1", 1, "relu")):
        cli("train", "--cache", cache, "--hook", f"blocks.{hook}.hook_resid_post", "--out", root / run,
            "--batch-size", 256, "--expansion", 2, "--arch", archs, "--k", 4, "--device", "cpu", "--tokens", 1024)
    return root


def eval_args(*saes: Path, out: Path) -> list:
    return ["eval", *saes, "--device", "cpu", "--batch-size", 4, "--batch-mode", "--out", out]


def outputs(out: Path) -> dict[str, dict]:
    """Every JSON file under `out` by relative path, with `out` itself written as OUT (it differs by design)."""
    return {str(p.relative_to(out)): json.loads(p.read_text().replace(str(out), "OUT")) for p in out.rglob("*.json")}


def test_two_ranks_equal_one_process_and_an_idle_rank_joins(runs, tmp_path):
    saes = [runs / "r0" / "topk-k4-64", runs / "r1" / "relu-l1_0.01-64", runs / "r0" / "batchtopk-k4-64"]
    one, two, lone = tmp_path / "one", tmp_path / "two", tmp_path / "lone"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank runs (OMP_NUM_THREADS=1): the same operations, in-process
    try:
        cli(*eval_args(*saes, out=one))
    finally:
        torch.set_num_threads(threads)
    done = torchrun(eval_args(*saes, out=two), timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(TABLE_TITLE) == 1  # rank 0 alone printed the table
    assert "split over 2 ranks: at most 2 SAE(s) each" in done.stderr

    expected, got = outputs(one), outputs(two)
    assert sorted(expected) == ["batchtopk-k4-64/eval.json", "eval_summary.json", "relu-l1_0.01-64/eval.json",
                                "topk-k4-64/eval.json"]
    assert got == expected  # every number, histogram and latent frequency, and the summary's order
    assert sorted(p.name for p in (two / "plots").iterdir()) == sorted(p.name for p in (one / "plots").iterdir())
    assert len(list((two / "plots").glob("*.png"))) == 4

    # 1 SAE on 2 ranks: rank 1 has nothing to evaluate and must still join the gather, or rank 0 would wait
    done = torchrun(eval_args(saes[1], out=lone), timeout=300)
    assert done.returncode == 0, done.stderr
    alone, together = outputs(lone)["relu-l1_0.01-64/eval.json"], expected["relu-l1_0.01-64/eval.json"]
    for key in ("metrics", "l0_histogram", "latent_frequency", "rows", "hook"):
        assert alone[key] == together[key], key
    assert sorted(outputs(lone)) == ["eval_summary.json", "relu-l1_0.01-64/eval.json"]


def fake(name: str, hook: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, hook=hook)


@pytest.mark.parametrize("n_saes,size", [(3, 2), (1, 2), (5, 3), (2, 4), (8, 8)])
def test_every_sae_goes_to_one_rank_and_the_shares_in_rank_order_are_one_process_order(n_saes, size):
    targets = [fake(f"s{i}", f"h{i % 2}") for i in range(n_saes)]  # two hooks, interleaved
    one_process = [t.name for t in rank_share(targets, World())]
    assert one_process == [t.name for t in targets if t.hook == "h0"] + [t.name for t in targets if t.hook == "h1"]
    shares = [[t.name for t in rank_share(targets, World(r, size))] for r in range(size)]
    assert sum(shares, []) == one_process  # each exactly once, and gathered in rank order = one process's order
    assert max(map(len, shares)) - min(map(len, shares)) <= 1 and len(shares[0]) == max(map(len, shares))
