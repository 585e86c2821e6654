"""`sae train`: the sweep, one pass for many SAEs, checkpoints and resumption, exports, and its errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sae_cache.sae_common.cli import main
from sae_cache.sae_common.config import TrainConfig
from sae_cache.sae_common.errors import ConfigError
from sae_cache.sae_common.sae_io import load_sae
from tests.cache_utils import write_cache
from sae_cache.train.sweep import expand

D = 16


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    x = torch.randn(8192, D) @ torch.randn(D, D) + 3.0  # correlated, off-centre, like real activations
    return write_cache(tmp_path_factory.mktemp("cache") / "c.zarr", x, context_size=16, rows_per_shard=1024)


def train_cli(cache: Path, out: Path, *extra: object) -> object:
    args = ["train", "--cache", cache, "--out", out, "--batch-size", 256, "--expansion", 4, "--log-every", 4, *extra]
    return CliRunner().invoke(main, [str(a) for a in args])


def test_sweep_varies_each_architecture_only_over_what_it_uses():
    cfg = TrainConfig(archs=("relu", "topk", "jumprelu"), ks=(4, 8), l1_coeffs=(0.1, 0.2), expansions=(2, 4))
    names = [e.name for e in expand(cfg, 16)]
    assert names == ["relu-l1_0.1-32", "relu-l1_0.2-32", "relu-l1_0.1-64", "relu-l1_0.2-64", "topk-k4-32", "topk-k8-32",
                     "topk-k4-64", "topk-k8-64", "jumprelu-l0_0.002-32", "jumprelu-l0_0.002-64"]
    with pytest.raises(ConfigError, match="--k 64: must be smaller than the dictionary size 32"):
        expand(TrainConfig(ks=(64,), dict_sizes=(32,)), 16)
    with pytest.raises(ConfigError, match="unknown architecture 'topq'"):
        expand(TrainConfig(archs=("topq",)), 16)


def test_one_pass_trains_every_sae_and_exports_them(cache, tmp_path):
    result = train_cli(cache, tmp_path / "run", "--arch", "topk,batchtopk", "--arch", "relu", "--k", "4,8")
    assert result.exit_code == 0, result.output
    assert f"\ndone: 5 SAE(s) in {tmp_path / 'run'}" in result.output  # on a line of its own after the table
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["complete"] and run["saes"] == ["topk-k4-64", "topk-k8-64", "batchtopk-k4-64", "batchtopk-k8-64",
                                               "relu-l1_0.01-64"]
    n_batches = run["holdout_start"] // 256
    for name in run["saes"]:
        sae = load_sae(tmp_path / "run" / name)
        history = [json.loads(line) for line in (tmp_path / "run" / name / "history.jsonl").read_text().splitlines()]
        assert history[-1]["tokens"] == n_batches * 256  # default: one pass over the training rows
        assert history[-1]["fvu"] < history[0]["fvu"]  # it learned
        assert int(sae.n_batches) == n_batches  # every SAE saw every batch, once
        record = json.loads((tmp_path / "run" / name / "sae_record.json").read_text())
        assert record["extra"]["cache"] == str(cache) and record["hook_name"] == "blocks.0.hook_resid_post"
        assert record["extra"]["train_config"]["archs"] == ["topk", "batchtopk", "relu"]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return {name: load_sae(run / name).W_dec.detach().clone()
            for name in json.loads((run / "run.json").read_text())["saes"]}


def test_resume_equals_an_uninterrupted_run(cache, tmp_path):
    flags = ("--arch", "batchtopk,jumprelu", "--k", 4, "--checkpoint-every", 1024)
    assert train_cli(cache, tmp_path / "whole", *flags, "--tokens", 7680).exit_code == 0
    # The first run stops after 12 of 30 batches; the second resumes it (tokens may change on resume).
    assert train_cli(cache, tmp_path / "parts", *flags, "--tokens", 3072).exit_code == 0
    resumed = train_cli(cache, tmp_path / "parts", *flags, "--tokens", 7680)
    assert resumed.exit_code == 0 and "resuming" in resumed.output and "batch 12" in resumed.output
    whole, parts = _final_weights(tmp_path / "whole"), _final_weights(tmp_path / "parts")
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_the_rerun_resumes(cache, tmp_path):
    args = ["train", "--cache", cache, "--out", tmp_path / "run", "--batch-size", 64, "--expansion", 4,
            "--arch", "topk", "--k", 4, "--tokens", 400_000, "--checkpoint-every", 10**9]
    proc = subprocess.Popen([sys.executable, "-m", "sae_cache.sae_common.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    history = tmp_path / "run" / "topk-k4-64" / "history.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (history.exists() and history.stat().st_size > 0):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130, output  # so `sae train && sae eval` stops here
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert 0 < state["batches_done"] < 400_000 // 64
    assert (f"sae train interrupted at batch {state['batches_done']:,} of 6,250: checkpoint saved in "
            f"{tmp_path / 'run'}; run the same command again to resume") in " ".join(output.split())
    assert "Traceback" not in output
    assert json.loads(history.read_text().splitlines()[-1])["tokens"] == state["batches_done"] * 64
    resumed = CliRunner().invoke(main, [str(a) for a in args[:-2] + ["--tokens", state["batches_done"] * 64 + 640]])
    assert resumed.exit_code == 0 and f"resuming {tmp_path / 'run'} at batch {state['batches_done']:,}" in resumed.output


def test_the_cache_is_recorded_absolute_and_files_are_written_with_the_umask_mode(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(cache.parent)
    old = os.umask(0o027)
    try:
        result = train_cli(Path(cache.name), tmp_path / "run", "--arch", "topk", "--k", 4, "--tokens", 1024)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["cache"] == str(cache)  # eval finds it from any directory
    assert json.loads((run / "topk-k4-64" / "sae_record.json").read_text())["extra"]["cache"] == str(cache)
    modes = {str(p.relative_to(run)): oct(p.stat().st_mode & 0o777) for p in run.rglob("*") if p.is_file()}
    assert {"topk-k4-64/sae_weights.safetensors", "topk-k4-64/sae_native.safetensors", "topk-k4-64/checkpoint-4."
            "safetensors", "state.json", "run.json"} <= set(modes)
    assert set(modes.values()) == {"0o640"}, modes  # 0666 less the umask, as any file: none 0600


def test_resuming_with_a_changed_config_names_the_fields(cache, tmp_path):
    assert train_cli(cache, tmp_path / "run", "--arch", "topk", "--k", 4, "--tokens", 1024).exit_code == 0
    result = train_cli(cache, tmp_path / "run", "--arch", "topk", "--k", 8, "--lr", "1e-3")
    assert result.exit_code == 1
    assert "different config" in result.output and "ks: run has [4], now [8]" in result.output and "lrs" in result.output


def test_errors_name_the_value_and_what_is_valid(cache, tmp_path):
    out = train_cli(cache, tmp_path / "r", "--arch", "topk", "--k", 100).output
    assert "--k 100: must be smaller than the dictionary size 64" in out
    out = train_cli(cache, tmp_path / "r", "--hook", "blocks.9.hook_resid_post").output
    assert "has no hook 'blocks.9.hook_resid_post'; it has: blocks.0.hook_resid_post" in out
    out = train_cli(cache, tmp_path / "r", "--arch", "topq").output
    assert "unknown architecture 'topq'" in out and "batchtopk" in out


def test_incomplete_cache_is_refused_with_what_verify_says(tmp_path):
    from sae_cache.sae_common.cache_format import layout_for
    from sae_cache.sae_common.cache_writer import CacheWriter

    meta = {"model": "m", "hooks": ["h.0"], "d_model": 4, "context_size": 4, "prepend_bos": False, "dtype": "float32",
            "compression": "zstd", "layout": layout_for(4, "float32", 4, 16), "target_tokens": 64, "dataset": {}}
    with CacheWriter.open(tmp_path / "c.zarr", meta, identity={}) as writer:
        writer.finish()  # an empty cache, as harvests made before they removed theirs
    out = train_cli(tmp_path / "c.zarr", tmp_path / "r").output
    assert "is empty (0 tokens)" in out
    cache = write_cache(tmp_path / "d.zarr", torch.randn(256, 4), context_size=16, rows_per_shard=64)
    (cache / "acts" / "blocks.0.hook_resid_post" / "c" / "2" / "0").unlink()
    out = train_cli(cache, tmp_path / "r").output
    assert "is damaged: shard 2 of acts/blocks.0.hook_resid_post is missing" in out and "sae cache verify" in out


def test_nan_in_a_batch_stops_naming_the_rows_and_keeps_the_checkpoint(tmp_path):
    x = torch.randn(4096, D)
    x[1000] = float("nan")
    cache = write_cache(tmp_path / "nan.zarr", x, context_size=16, rows_per_shard=512)
    result = train_cli(cache, tmp_path / "run", "--arch", "topk", "--k", 4, "--checkpoint-every", 256)
    assert result.exit_code == 1
    assert "NaN/inf in 1 row(s): cache rows [1000]" in result.output and "last good checkpoint" in result.output
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    sae_state = (tmp_path / "run" / "topk-k4-64" / f"checkpoint-{state['batches_done']}.safetensors")
    assert sae_state.exists()
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(sae_state)).values() if t.is_floating_point())


def test_bfloat16_autocast_trains_like_float32(cache, tmp_path):
    for dtype in ("float32", "bfloat16"):
        result = train_cli(cache, tmp_path / dtype, "--arch", "batchtopk", "--k", 4, "--dtype", dtype, "--device", "cpu")
        assert result.exit_code == 0
        assert ("bf16 matmuls ran 230x slower" in " ".join(result.output.split())) == (dtype == "bfloat16")
    final = {d: json.loads((tmp_path / d / "batchtopk-k4-64" / "history.jsonl").read_text().splitlines()[-1])
             for d in ("float32", "bfloat16")}
    sae = load_sae(tmp_path / "bfloat16" / "batchtopk-k4-64")
    assert sae.W_dec.dtype == torch.float32  # master weights stay float32
    assert abs(final["bfloat16"]["fvu"] - final["float32"]["fvu"]) < 0.1 * final["float32"]["fvu"], final
