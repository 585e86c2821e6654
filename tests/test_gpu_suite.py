"""bench/gpu_suite.py: `--smoke` runs every figure at tiny shapes on the CPU (so the GPU suite never rots), each line
JSON with the keys its figure needs; on a GPU the same at tiny shapes on CUDA, with the peak looked up."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).resolve().parents[1] / "bench" / "gpu_suite.py"
KEYS = {
    "device": {"device", "name", "peak_bf16_tflops", "smoke"},
    "harvest": {"model", "layer", "block_params", "tokens", "harvest_tokens_per_s", "forward_only_tokens_per_s",
                "mfu_harvest", "mfu_forward_only"},
    "encoder_gemm": {"d", "F", "B", "tokens_per_s", "tflops"},
    "train_step": {"arch", "d", "F", "k", "B", "tokens_per_s", "encoder_gemm_tokens_per_s",
                   "fraction_of_encoder_gemm_bound", "sae_lens_tokens_per_s", "ratio_vs_sae_lens"},
    "loader": {"stored_dtype", "tokens_per_s", "stored_gb_per_s", "bf16_gb_per_s"},
    "sweep": {"saes", "tokens", "wall_s", "tokens_per_s", "sae_tokens_per_s"},
    "sae_lens": {"measured", "why"},
    "scaling": {"gpus", "command"},
}


def run_suite(*args: str) -> list[dict]:
    done = subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]  # every line of stdout is one JSON object


def check_lines(rows: list[dict], device: str) -> None:
    from sae_cache.sae_common.architectures import ARCHS

    assert [r["bench"] for r in rows] == (["device", "harvest", "encoder_gemm"] + ["train_step"] * len(ARCHS)
                                          + ["loader", "loader", "sweep", "sae_lens", "scaling"])
    for r in rows:
        assert KEYS[r["bench"]] <= r.keys(), (r["bench"], KEYS[r["bench"]] - r.keys())
    by = {r["bench"]: r for r in rows}
    assert by["device"]["device"] == device and by["device"]["smoke"] is True
    assert [r["arch"] for r in rows if r["bench"] == "train_step"] == list(ARCHS)
    assert [r["stored_dtype"] for r in rows if r["bench"] == "loader"] == ["bfloat16", "int8"]
    assert by["harvest"]["tokens"] == 2048 and by["harvest"]["block_params"] > 0
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r] + [by["harvest"]["harvest_tokens_per_s"]]
    assert all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in rates)
    assert by["sweep"]["saes"] == 4 and by["sweep"]["sae_tokens_per_s"] >= by["sweep"]["tokens_per_s"]


def test_smoke_runs_every_figure_on_the_cpu():
    rows = run_suite("--smoke")
    check_lines(rows, "cpu")
    by = {r["bench"]: r for r in rows}
    assert by["device"]["peak_bf16_tflops"] is None and by["harvest"]["mfu_harvest"] is None  # no peak for a CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_smoke_on_cuda_runs_the_cuda_paths():
    rows = run_suite("--smoke", "--device", "cuda")
    check_lines(rows, "cuda")
    by = {r["bench"]: r for r in rows}
    if by["device"]["peak_bf16_tflops"] is not None:  # a GPU in the table: utilisation is a fraction
        assert 0 < by["harvest"]["mfu_forward_only"] < 1
    assert all(r["dtype"] == "bfloat16" for r in rows if r["bench"] == "train_step")
