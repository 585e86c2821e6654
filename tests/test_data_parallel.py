"""Data-parallel training of one SAE (sae_common/data_parallel.py): 2 ranks under torchrun (gloo, CPU) equal one
process on the same global batches; the exact global top-n and its tie rule, in one process.

Tolerance, from the maths. The ranks compute the same terms as one process, summed in another order (each rank
its rows, then the all-reduce adds the partial sums): a float32 sum of n terms is off by at most n·u·Σ|terms|
(u = 2^-24): with B = 47 rows each gradient entry is within δ·G, δ = 1e-4 and G the parameter's typical |g|
(its entries' median). Adam's step lr·m̂/(√v̂ + eps) is invariant to the gradient's scale, so where that error
is relatively small (|g| ≫ δ·G) the step moves by at most about lr·δ: T·lr·δ after T steps, plus the float32
rounding of the weights themselves (rtol 1e-5, ~100 ulp). An entry whose gradient fell to |g| ≲ δ·G in some step
(cancellation) has an unbounded relative error there and its step may differ by up to lr (the developers'
guide's Adam note): those few get T·lr. Selections, counters and densities are exact: a pre-activation would
have to lie within ~1e-7 of the top-n threshold to flip, while neighbours there are ~1e-3 apart.
"""

from __future__ import annotations

import json

import torch

from sae_cache.sae_common.data_parallel import keep_top
from sae_cache.sae_common.sparse import batch_topk_flat
from tests.dist_utils import torchrun
from tests.dp_probe import CASES, STEPS

LR, DELTA = 1e-3, 1e-4


def _kept_over_two_ranks(global_R: torch.Tensor, n: int) -> torch.Tensor:
    """keep_top as two ranks run it: rank 0 holds entries 0..19, rank 1 the rest; each offers its n largest."""
    parts = [global_R[:20, None], global_R[20:, None]]
    cands_NM1 = torch.stack([torch.cat([p.topk(min(n, len(p)), dim=0).values,
                                        p.new_full((n - min(n, len(p)), 1), -torch.inf)]) for p in parts])
    return torch.cat([keep_top(p, cands_NM1, torch.tensor([n]), rank).squeeze(1) for rank, p in enumerate(parts)])


def test_keep_top_over_simulated_ranks_is_the_global_top_n_with_ties_by_global_position() -> None:
    global_R = torch.randn(40, generator=torch.Generator().manual_seed(0))
    global_R[[3, 17, 25, 38]] = 0.5  # four tied entries, two on each rank
    n = int((global_R > 0.5).sum()) + 2  # two of the tied entries fit
    kept = _kept_over_two_ranks(global_R, n)
    expect = global_R > 0.5
    expect[[3, 17]] = True  # the two tied entries with the lowest global positions
    assert int(kept.sum()) == n and torch.equal(kept, expect)
    global_R[[3, 17, 25, 38]] = torch.tensor([0.51, 0.52, 0.53, 0.54])  # without ties: torch.topk's set
    for n in (5, 25):  # 25: more than one rank holds, so a rank offers all its entries
        kept = _kept_over_two_ranks(global_R, n)
        assert set(kept.nonzero().flatten().tolist()) == set(global_R.topk(n).indices.tolist())


def test_in_one_process_the_global_selections_are_the_plain_ones() -> None:
    from sae_cache.sae_common.architectures import feature_choice_mask
    from sae_cache.sae_common.data_parallel import batch_topk_flat_global, feature_choice_flat_global
    from sae_cache.sae_common.sparse import mask_flat

    pre_BF = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    assert torch.equal(batch_topk_flat_global(pre_BF, 100), batch_topk_flat(pre_BF, 100))
    for n_keep in (96, 100):  # 96 = 2 per latent; 100 leaves 4 latents a third token
        assert torch.equal(feature_choice_flat_global(pre_BF, n_keep), mask_flat(feature_choice_mask(pre_BF, n_keep)))


def _close(got: torch.Tensor, want: torch.Tensor, min_grad: torch.Tensor | None, name: str) -> int:
    """Assert the bound of the module docstring; returns how many entries got the |g| ≲ δ·G allowance."""
    if not want.is_floating_point():
        assert torch.equal(got, want), name
        return 0
    assert torch.equal(got.isnan(), want.isnan()), name  # θ's window holds NaN where a latent kept nothing
    got, want = got.nan_to_num(), want.nan_to_num()
    bound = STEPS * LR * DELTA + 1e-5 * want.abs()
    noisy = torch.zeros_like(want, dtype=torch.bool)
    if min_grad is not None and min_grad.isfinite().any():  # inf: never a non-zero gradient (exactly 0 in both)
        noisy = min_grad <= DELTA * min_grad[min_grad.isfinite()].median()
        bound = torch.where(noisy, torch.full_like(bound, STEPS * LR), bound)
    over = (got - want).abs() > bound
    assert not over.any(), f"{name}: max diff {(got - want).abs().max():.3g}, {int(over.sum())} over the bound"
    return int(noisy.sum())


def test_two_rank_data_parallel_training_equals_one_process(tmp_path) -> None:
    done = torchrun([tmp_path], module="tests.dp_probe", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert sorted(ranks[0]["ref"]) == sorted(name for name, *_ in CASES)
    for name in ranks[0]["ref"]:
        ref, dp0, dp1 = ranks[0]["ref"][name], ranks[0]["dp"][name], ranks[1]["dp"][name]
        for key, want in ref["state"].items():  # every rank holds the same SAE, bit for bit
            assert torch.equal(dp0["state"][key].nan_to_num(), dp1["state"][key].nan_to_num()), (name, key)
        loose = sum(_close(dp0["state"][key], want, ref["min_grad"].get(key), f"{name}.{key}")
                    for key, want in ref["state"].items())
        n_params = sum(g.numel() for g in ref["min_grad"].values())
        assert loose < 0.01 * n_params, (name, loose)  # the tight bound is what is checked almost everywhere
        assert ref["state"]["n_batches"] == STEPS
        for metric, want in ref["record"].items():  # the history record: global metrics, summed over ranks
            assert abs(dp0["record"][metric] - want) <= 1e-5 * abs(want) + 1e-7, (name, metric)
    # not vacuous: latents died, so AuxK / aux_zipf took part, and θ was recorded
    assert ranks[0]["ref"]["batchtopk_sparse"]["record"]["dead"] > 0
    assert ranks[0]["ref"]["mutual_choice"]["record"]["aux"] > 0
    assert ranks[0]["ref"]["feature_choice_sparse"]["state"]["theta_window"].isfinite().any()


def test_sae_train_parallel_data_equals_one_process_and_resumes_under_another_world_size(tmp_path) -> None:
    """The real command: 2 ranks train 5 batches, one process resumes to 10; equal to one process throughout.
    The result does not depend on the world size (the global batch is the same), so a data-parallel checkpoint
    resumes under any number of ranks."""
    from sae_cache.sae_common.sae_io import load_sae
    from tests.cache_utils import write_cache
    from tests.dist_utils import single

    torch.manual_seed(0)
    cache = write_cache(tmp_path / "c.zarr", torch.randn(1024, 16) @ torch.randn(16, 16) + 3.0, rows_per_shard=256)
    args = ["train", "--cache", cache, "--batch-size", 64, "--expansion", 4, "--arch", "batchtopk,feature_choice",
            "--k", 4, "--lr", LR, "--dead-tokens", 64, "--log-every", 5, "--checkpoint-every", 320]
    one = single([*args, "--tokens", 640, "--out", tmp_path / "one"], timeout=120)
    assert one.returncode == 0, one.stderr
    two = torchrun([*args, "--tokens", 320, "--out", tmp_path / "two", "--parallel", "data"], timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (two.stdout + two.stderr).count("training 2 SAE(s)") == 1  # rank 0 alone reports
    resumed = single([*args, "--tokens", 640, "--out", tmp_path / "two"], timeout=120)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout + resumed.stderr, resumed.stderr
    for name in ("batchtopk-k4-64", "feature_choice-k4-64"):
        want, got = load_sae(tmp_path / "one" / name).state_dict(), load_sae(tmp_path / "two" / name).state_dict()
        for key in ("tokens_since_fired", "n_batches", "density"):
            assert torch.equal(got[key], want[key]), (name, key)
        for key in ("theta_window", "input_scale"):  # the scale: a float64 sum of norms vs a float32 mean
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=0, equal_nan=True)
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            # the module docstring's bound over T = 10 steps, without the run's gradients at hand to single out
            # the entries whose gradient cancelled: those (here none, at most a few) may differ by up to T·lr
            diff, bound = (got[key] - want[key]).abs(), 10 * LR * DELTA + 1e-5 * want[key].abs()
            assert (diff <= 10 * LR).all() and (diff > bound).float().mean() < 0.005, (name, key, diff.max())
        history = [(tmp_path / run / name / "history.jsonl").read_text().splitlines() for run in ("one", "two")]
        assert len(history[0]) == len(history[1]) == 2  # rank 1 wrote no lines of its own
        for a, b in zip(*history):
            for metric, value in json.loads(a).items():
                assert abs(json.loads(b)[metric] - value) <= 1e-5 * abs(value) + 1e-7, (name, metric)
