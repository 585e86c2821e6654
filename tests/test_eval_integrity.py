"""`sae eval` checks every shard it reads (the held-out activation rows and the tokens) before computing
anything, names the damage and exits 1; and it evaluates a cache written by another tool in the documented format
exactly as it evaluates ours.

One workspace per module: a float32 cache of 2048 tokens from conftest's tiny Gemma-2 (4 shards of 512 rows; the
SAE's held-out rows, spread at 2% over 64 contexts, are the last context [2016, 2048), in shard 3) and one SAE
trained on it by `sae train`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import zarr

from tests.test_harvest import harvest_args
from tests.test_integrity import acts_shard, cli, flip_byte, foreign_attrs, refused, truncate, write_foreign

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def workspace(checkpoints, corpus, tmp_path_factory) -> tuple[Path, Path]:
    """(cache, SAE directory)."""
    root = tmp_path_factory.mktemp("eval-integrity")
    cache = root / "g.zarr"
    result = cli(*harvest_args(checkpoints["gemma2"], corpus, cache, "--layer", 1, "--dtype", "float32"))
    assert result.exit_code == 0, result.output
    result = cli("train", "--cache", cache, "--out", root / "run", "--batch-size", 256, "--expansion", 2,
                 "--arch", "topk", "--k", 4, "--device", "cpu")
    assert result.exit_code == 0, result.output
    (sae,) = [d for d in (root / "run").iterdir() if (d / "sae_record.json").is_file()]
    assert json.loads((sae / "sae_record.json").read_text())["extra"]["holdout"] == {
        "rule": "spread", "fraction": 0.02, "block_contexts": 64}
    return cache, sae


def evaluate(cache: Path, sae: Path, out: Path):
    return cli("eval", "--device", "cpu", "--batch-size", 8, "--cache", cache, "--out", out, sae)


def tokens_shard(cache: Path, index: int) -> Path:
    return cache / "tokens" / "c" / str(index)


DAMAGE = {
    "flipped bit in the held-out activations": (lambda c: acts_shard(c, 3, HOOK), flip_byte,
                                                "does not match its checksum"),
    "deleted held-out activations": (lambda c: acts_shard(c, 3, HOOK), Path.unlink, "is missing"),
    "deleted tokens": (lambda c: tokens_shard(c, 3), Path.unlink, "is missing"),
    "truncated tokens": (lambda c: tokens_shard(c, 3), truncate, "does not match its checksum"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_eval_refuses_damage_before_computing_anything(workspace, tmp_path, case):
    cache, sae = workspace
    copy = Path(shutil.copytree(cache, tmp_path / "g.zarr"))
    locate, damage, what = DAMAGE[case]
    file = locate(copy)
    damage(file)
    result = evaluate(copy, sae, tmp_path / "out")
    error = refused(result, "shard 3 of", what, str(file), f"sae cache verify {copy}")
    assert "evaluating" not in result.output and not (tmp_path / "out").exists(), error  # nothing was computed


def test_eval_names_a_corrupt_zarr_json(workspace, tmp_path, checkpoints, corpus):
    cache, sae = workspace
    copy = Path(shutil.copytree(cache, tmp_path / "g.zarr"))
    (copy / "zarr.json").write_text((copy / "zarr.json").read_text()[:-30])
    refused(evaluate(copy, sae, tmp_path / "out"), f"{copy / 'zarr.json'} is damaged")
    refused(cli(*harvest_args(checkpoints["gemma2"], corpus, copy, "--layer", 1, "--dtype", "float32")),
            f"{copy / 'zarr.json'} is damaged")


def test_a_foreign_cache_evaluates_like_ours(workspace, tmp_path):
    """The same rows written by plain zarr (documented attributes only, unsharded, no checksums) give the same
    report: the tokens and the mean-ablation activations are read right, and held-out rows are the same."""
    cache, sae = workspace
    ours = zarr.open_group(cache, mode="r")
    meta = ours.attrs["sae_cache"]
    foreign = write_foreign(tmp_path / "foreign.zarr", ours[f"acts/{HOOK}"][:], ours["tokens"][:],
                            foreign_attrs(meta["model_load"]["source"], HOOK, meta["d_model"], meta["n_tokens"],
                                          meta["context_size"], meta["prepend_bos"]), rows_per_chunk=256)
    reports = []
    for c in (cache, foreign):
        result = evaluate(c, sae, tmp_path / c.stem)
        assert result.exit_code == 0, result.output
        reports.append(json.loads((tmp_path / c.stem / sae.name / "eval.json").read_text()))  # --out holds it all
    ours_report, foreign_report = reports
    assert foreign_report["cache"] == str(foreign) and ours_report["rows"] == foreign_report["rows"] == [[2016, 2048]]
    assert foreign_report["metrics"] == ours_report["metrics"]
    assert ours_report["metrics"]["ce_mean_ablated"] != ours_report["metrics"]["ce_zero_ablated"]
