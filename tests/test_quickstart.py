"""The quickstart, end to end, exactly as `make quickstart` runs it (scripts/quickstart.sh), in a fresh folder."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sae_cache.sae_common.model import BUILTIN_MODELS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("quickstart")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "quickstart.sh")], cwd=work, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work, done.stdout + done.stderr


@pytest.mark.slow
def test_files_and_plots_are_where_the_readme_says(quickstart):
    work, output = quickstart
    cache = work / "cache" / "tiny-stdlib-gpt2" / "blocks.2.hook_resid_post.zarr"
    assert (cache / "zarr.json").is_file()
    runs = list((work / "cache" / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    names = json.loads((run / "run.json").read_text())["saes"]
    assert sorted(names) == ["batchtopk-k16-1024", "batchtopk-k32-1024", "topk-k16-1024", "topk-k32-1024"]
    for name in names:
        for file in ("cfg.json", "sae_weights.safetensors", "eval.json", "history.jsonl"):
            assert (run / name / file).is_file(), (name, file)
    for plot in ("nmse_vs_l0", "ce_degradation_vs_l0", "l0_histogram", "latent_frequency"):
        assert (run / "plots" / f"{plot}.png").stat().st_size > 10_000
    assert (run / "eval_summary.json").is_file() and str(run / "plots") in output


@pytest.mark.slow
def test_the_built_in_model_is_a_real_language_model_and_the_saes_degrade_it_a_little(quickstart):
    work, _ = quickstart
    run = next((work / "cache" / "runs").iterdir())
    summary = json.loads((run / "eval_summary.json").read_text())
    vocab = json.loads((BUILTIN_MODELS["tiny-stdlib-gpt2"] / "config.json").read_text())["vocab_size"]
    for sae in summary["saes"]:
        assert sae["ce_clean"] < math.log(vocab) - 2  # far below a uniform guess (8.3 nats): it learned
        zero_degradation = sae["ce_zero_ablated"] - sae["ce_clean"]
        assert 0 < sae["ce_degradation"] < zero_degradation, sae
        assert sae["ce_loss_score"] > 0.9, sae
