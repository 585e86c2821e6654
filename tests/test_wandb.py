"""`--wandb PROJECT` under WANDB_MODE=offline: `sae train` writes one wandb run per SAE (the sweep as their
group) holding exactly the records of its history.jsonl, `sae eval` one run with its table and plots; without
wandb installed, --wandb is refused in one line before any work. The runs are read back from wandb's offline
.wandb files: a LevelDB-style log of protobuf records (wandb.proto.wandb_internal_pb2.Record)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sae_cache.sae_common.cli import main
from tests.cache_utils import write_cache
from tests.test_harvest import harvest_args

wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install 'sae-cache[wandb]')")
from wandb.proto import wandb_internal_pb2  # noqa: E402 - only with wandb

BLOCK = 32768  # the .wandb log's block size; each record piece has a 7-byte header (CRC, length, type)
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_DIR", raising=False)


def records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B"  # 7-byte file header: ident, magic, version
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE/LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def read_runs(root: Path) -> dict[str, dict]:
    """{run name: {"group", "project", "config", "history": [logged dicts]}} of every offline run under root."""
    runs = {}
    for file in root.rglob("*.wandb"):
        run = {"history": [], "dir": file.parent}
        for r in records(file):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.update(name=r.run.display_name, group=r.run.run_group, project=r.run.project,
                           config={c.key: json.loads(c.value_json) for c in r.run.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                run["history"].append({k: v for k, v in items.items() if not k.startswith("_")})
        assert run["name"] not in runs
        runs[run["name"]] = run
    return runs


def test_train_logs_one_run_per_sae_with_its_history(tmp_path):
    torch.manual_seed(0)
    cache = write_cache(tmp_path / "c.zarr", torch.randn(4096, 16), context_size=16, rows_per_shard=1024, hook=HOOK)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--cache", cache, "--out", run_dir, "--batch-size", 128, "--dict-size",
                                       32, "--arch", "topk,relu", "--k", 4, "--log-every", 5, "--device", "cpu",
                                       "--wandb", "sae-test"])
    assert result.exit_code == 0, result.output
    names = json.loads((run_dir / "run.json").read_text())["saes"]
    runs = read_runs(run_dir / "wandb")
    assert sorted(runs) == sorted(names) == ["relu-l1_0.01-32", "topk-k4-32"]
    for name, run in runs.items():
        history = [json.loads(line) for line in (run_dir / name / "history.jsonl").read_text().splitlines()]
        assert len(history) >= 2 and run["history"] == history
        assert run["group"] == "run" and run["project"] == "sae-test"
        assert run["config"]["sae"]["arch"] == name.split("-")[0] and run["config"]["train"]["wandb"] == "sae-test"


def test_eval_logs_its_table_and_plots(checkpoints, corpus, tmp_path):
    cache, run_dir = tmp_path / "g.zarr", tmp_path / "run"
    for args in (harvest_args(checkpoints["gemma2"], corpus, cache, "--layer", 1, "--dtype", "float32"),
                 ["train", "--cache", cache, "--out", run_dir, "--batch-size", 256, "--expansion", 2, "--arch",
                  "topk,batchtopk", "--k", 4, "--device", "cpu"],
                 ["eval", run_dir, "--device", "cpu", "--wandb", "sae-eval"]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "eval_summary.json").read_text())
    (run,) = read_runs(run_dir / "wandb").values()
    assert run["name"] == "eval-run" and run["project"] == "sae-eval" and run["config"]["cache"] == str(cache)
    (logged,) = run["history"]  # nested keys come back joined by "/"
    table = json.loads((run["dir"] / "files" / logged["eval/path"]).read_text())
    assert [dict(zip(table["columns"], row)) for row in table["data"]] == summary["saes"]
    plots = sorted({k.split("/")[1] for k in logged if k.startswith("plots/")})
    assert plots == sorted(Path(p).stem for p in summary["plots"]) and len(plots) == 4
    for plot in plots:
        logged_png = (run["dir"] / "files" / logged[f"plots/{plot}/path"]).read_bytes()
        assert logged_png == (run_dir / "plots" / f"{plot}.png").read_bytes()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_without_wandb_installed_the_flag_is_refused_before_any_work(tmp_path, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    args = (["train", "--cache", tmp_path / "nope.zarr", "--out", tmp_path / "run"] if command == "train"
            else ["eval", tmp_path / "nope"])
    result = CliRunner().invoke(main, [str(a) for a in [*args, "--wandb", "p"]])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == ("Error: --wandb needs the wandb package, which is not installed: pip install "
                                     "'sae-cache[wandb]' (or leave out --wandb)")
    assert list(tmp_path.iterdir()) == []
