"""Every option of every command, given bad values: a non-zero exit, one line naming the option, no traceback,
and nothing created (each check comes before any work: model loading, cache scans, directories).

The output rule. Exit 1: a value the config refuses, or that the model's config, the cache or the disk refuses;
the whole output is the one line `Error: ...`. Exit 2: a value click cannot parse (not a number, not one of a
choice, a value given to a flag); click may print its `Usage:` and `Try ...` lines before its one `Error: ...`
line, and nothing else. The error line names the option; where the message comes from the look at the model,
dataset or cache, it names the value the user gave instead (the row's `names`).
"""

from __future__ import annotations

import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from sae_cache.sae_common.cli import main
from sae_cache.sae_common.config import EvalConfig, HarvestConfig, TrainConfig
from sae_cache.sae_common.errors import ConfigError
from sae_cache.sae_common.sae import SAE, SAEConfig
from sae_cache.sae_common.sae_io import save_sae
from tests.cache_utils import write_cache

HOOK = "blocks.0.hook_resid_post"


@dataclass(frozen=True)
class Bad:
    command: str  # as typed after `sae`
    option: str  # as typed; an argument by its metavar
    args: tuple[str, ...]  # appended to the command's valid base arguments; {placeholders} are workspace paths
    expect: str  # part of the error line
    code: int = 1
    names: str | None = None  # what the line names instead of the option (a message about the value itself)


H, T, E, I, V, X = "harvest", "train", "eval", "cache info", "cache verify", "features"
TABLE = [
    Bad(H, "--model", ("--model", ""), "--model '': must be a non-empty string"),
    Bad(H, "--model", ("--model", "./nope"), "./nope is not a checkpoint directory", names="./nope"),
    Bad(H, "--model", ("--model", "{empty}"), "not a Hugging Face checkpoint: it has no config.json", names="{empty}"),
    Bad(H, "--layer", ("--layer", "-1"), "--layer -1: must be a non-negative integer"),
    Bad(H, "--layer", ("--layer", "1"), "--layer 1: given twice"),
    Bad(H, "--layer", ("--layer", "x"), "'x' is not a valid integer", code=2),
    Bad(H, "--layer", ("--layer", "7"), "is out of range: {model} has 3 layers (0 to 2)", names="layer 7"),
    Bad(H, "--hook", ("--hook", "resid"), "--hook: unknown hook 'resid'; use one of resid_post"),
    Bad(H, "--hook", ("--hook", "blocks.0.hook_resid_post"), "--layer 1: --hook blocks.0.hook_resid_post is a full "
        "hook name and names its own layer", names="--layer"),
    Bad(H, "--hook", ("--hook", "blocks.1.hook_resid_pots"), "does not exist", names="blocks.1.hook_resid_pots"),
    Bad(H, "--dataset", ("--dataset", ""), "--dataset '': must be a non-empty string"),
    Bad(H, "--dataset", ("--dataset", "{cwd}/nope.txt"), "nope.txt does not exist", names="nope.txt"),
    Bad(H, "--split", ("--split", ""), "--split '': must be a non-empty string"),
    Bad(H, "--text-column", ("--text-column", "body"), "has no column 'body'"),
    Bad(H, "--text-column", ("--text-column", " "), "--text-column ' ': must be a non-empty string"),
    Bad(H, "--tokens", ("--tokens", "0"), "--tokens 0: must be a positive integer"),
    Bad(H, "--tokens", ("--tokens", "16"), "--tokens 16: less than one context of 32 tokens"),
    Bad(H, "--tokens", ("--tokens", "10X"), "'10X' is not a count", code=2),
    Bad(H, "--context-size", ("--context-size", "0"), "--context-size 0: must be an integer of at least 2"),
    Bad(H, "--context-size", ("--context-size", "1"), "--context-size 1: must be an integer of at least 2"),
    Bad(H, "--context-size", ("--context-size", "256", "--rows-per-shard", "512"),
        "--context-size 256: {model} handles at most 128 positions"),
    Bad(H, "--prepend-bos", ("--prepend-bos=no",), "Option '--prepend-bos' does not take a value", code=2),
    Bad(H, "--shuffle-buffer", ("--shuffle-buffer", "-1"), "--shuffle-buffer -1: must be a non-negative integer"),
    Bad(H, "--seed", ("--seed", "-1"), "--seed -1: must be a non-negative integer"),
    Bad(H, "--seed", ("--seed", str(2**32)), "no larger than 4294967295"),
    Bad(H, "--dtype", ("--dtype", "float8"), "'float8' is not one of", code=2),
    Bad(H, "--model-dtype", ("--model-dtype", "int8"), "'int8' is not one of", code=2),
    Bad(H, "--compression", ("--compression", "gzip"), "'gzip' is not one of", code=2),
    Bad(H, "--rows-per-shard", ("--rows-per-shard", "100"), "--rows-per-shard 100: must be a multiple of "
        "--context-size 32"),
    Bad(H, "--rows-per-shard", ("--rows-per-shard", "0"), "--rows-per-shard 0: must be a positive integer"),
    Bad(H, "--batch-size", ("--batch-size", "0"), "--batch-size 0: must be a positive integer"),
    Bad(H, "--device", ("--device", "gpu"), "--device gpu: use auto, cpu, cuda or cuda:N"),
    Bad(H, "--out", ("--out", "{file}"), "--out {file}: {file} is a file, not a directory"),
    Bad(H, "--out", ("--out", "{file}/c.zarr"), "{file} is a file, not a directory"),
    Bad(H, "--out", ("--out", "{folder}", "--overwrite"), "{folder} is a directory that is not an activation cache (it "
        "holds notes.txt); choose another --out"),
    Bad(H, "--overwrite", ("--overwrite=yes",), "Option '--overwrite' does not take a value", code=2),

    Bad(T, "--cache", ("--cache", "{cwd}/nope.zarr"), "is not an activation cache", names="nope.zarr"),
    Bad(T, "--cache", ("--cache", ""), "--cache '': must be a non-empty string"),
    Bad(T, "--hook", ("--hook", "blocks.9.hook_resid_post"), "--hook: the cache {cache} has no hook "
        "'blocks.9.hook_resid_post'; it has: blocks.0.hook_resid_post"),
    Bad(T, "--arch", ("--arch", "topq"), "--arch: unknown architecture 'topq'; use one of"),
    Bad(T, "--arch", ("--arch", ","), "',' holds no value", code=2),
    Bad(T, "--k", ("--k", "0"), "--k 0: must be a positive integer"),
    Bad(T, "--k", ("--k", "4"), "--k 4: given twice"),
    Bad(T, "--k", ("--k", "1.5"), "'1.5' is not a whole number", code=2),
    Bad(T, "--k", ("--k", "64"), "--k 64: must be smaller than the dictionary size 32"),
    Bad(T, "--dict-size", ("--dict-size", "0"), "--dict-size 0: must be a positive integer"),
    Bad(T, "--expansion", ("--expansion", "0"), "--expansion 0: must be a positive integer"),
    Bad(T, "--expansion", ("--expansion", "2"), "--expansion 2: --dict-size already sets the dictionary size"),
    Bad(T, "--l1-coeff", ("--arch", "relu", "--l1-coeff", "-1"), "--l1-coeff -1: must be a number of at least 0"),
    Bad(T, "--l1-coeff", ("--l1-coeff", "nan"), "--l1-coeff nan: must be a number of at least 0"),
    Bad(T, "--l0-coeff", ("--l0-coeff", "-1"), "--l0-coeff -1: must be a number of at least 0"),
    Bad(T, "--group-fractions", ("--group-fractions", "0.5,0.25"), "--group-fractions 0.5,0.25: must sum to 1"),
    Bad(T, "--group-fractions", ("--group-fractions", "0,1"), "--group-fractions 0: must be a number above 0"),
    Bad(T, "--group-fractions", ("--group-fractions", "half"), "'half' is not a number", code=2),
    Bad(T, "--group-fractions", ("--group-fractions", "1/2,1/x"), "'1/x' is not a number", code=2),
    Bad(T, "--group-fractions", ("--group-fractions", "1/2,1/0"), "'1/0' is not a number", code=2),
    Bad(T, "--group-fractions", ("--group-fractions", ";"), "';' holds no value", code=2),
    Bad(T, "--group-fractions", ("--group-fractions", "1/2,1/2;1/4,1/4"), "--group-fractions 0.25,0.25: must sum to 1"),
    Bad(T, "--group-fractions", ("--group-fractions", "1/2,1/2", "--group-fractions", "0.5,0.5"),
        "--group-fractions 0.5,0.5: given twice"),
    Bad(T, "--group-fractions", ("--arch", "matryoshka_batchtopk", "--group-fractions", "1/2,1/2;1/64,63/64"),
        "--group-fractions 0.015625,0.984375: leaves a group of the 32-latent dictionary empty"),
    Bad(T, "--lr", ("--lr", "-1e-3"), "--lr -0.001: must be a number above 0"),
    Bad(T, "--lr", ("--lr", "0"), "--lr 0: must be a number above 0"),
    Bad(T, "--lr", ("--lr", "inf"), "--lr inf: must be a number above 0"),
    Bad(T, "--lr", ("--lr", "fast"), "'fast' is not a number", code=2),
    Bad(T, "--batch-size", ("--batch-size", "0"), "--batch-size 0: must be a positive integer"),
    Bad(T, "--tokens", ("--tokens", "0"), "--tokens 0: must be a positive integer"),
    Bad(T, "--tokens", ("--tokens", "100"), "--tokens 100: fewer than one batch of 256 tokens"),
    Bad(T, "--seed", ("--seed", "-1"), "--seed -1: must be a non-negative integer"),
    Bad(T, "--input-norm", ("--input-norm", "l2"), "'l2' is not one of", code=2),
    Bad(T, "--input-norm", ("--input-norm", "none,scalar"), "'none,scalar': takes one value for the whole run", code=2),
    Bad(T, "--dead-tokens", ("--dead-tokens", "0"), "--dead-tokens 0: must be a positive integer"),
    Bad(T, "--dead-tokens", ("--dead-tokens", "1K,2K"), "'1K,2K': takes one value for the whole run (the README's "
        "`sae train` section says why); a run can sweep --k, --l1-coeff, --l0-coeff, --aux-k", code=2),
    Bad(T, "--aux-k", ("--aux-k", "0"), "--aux-k 0: must be a positive integer"),
    Bad(T, "--aux-k", ("--aux-k", "64,0"), "--aux-k 0: must be a positive integer"),
    Bad(T, "--aux-k", ("--aux-k", "64,64"), "--aux-k 64: given twice"),
    Bad(T, "--aux-k", ("--aux-k", ","), "',' holds no value", code=2),
    Bad(T, "--aux-k", ("--aux-k", "many"), "'many' is not a whole number", code=2),
    Bad(T, "--aux-k", ("--aux-k", "64,1.5"), "'1.5' is not a whole number", code=2),
    Bad(T, "--aux-coeff", ("--aux-coeff", "-0.5"), "--aux-coeff -0.5: must be a number of at least 0"),
    Bad(T, "--aux-coeff", ("--aux-coeff", "1/32,nan"), "--aux-coeff nan: must be a number of at least 0"),
    Bad(T, "--aux-coeff", ("--aux-coeff", "1/32,1/x"), "'1/x' is not a number", code=2),
    Bad(T, "--aux-normalised", ("--aux-normalised=yes",), "Option '--aux-normalised' does not take a value", code=2),
    Bad(T, "--bandwidth", ("--bandwidth", "0"), "--bandwidth 0: must be a number above 0"),
    Bad(T, "--bandwidth", ("--bandwidth", "inf"), "--bandwidth inf: must be a number above 0"),
    Bad(T, "--bandwidth", ("--bandwidth", "0.02,0"), "--bandwidth 0: must be a number above 0"),
    Bad(T, "--bandwidth", ("--bandwidth", "0.02;0.05"), "'0.02;0.05' is not a number", code=2),
    Bad(T, "--jumprelu-init-threshold", ("--jumprelu-init-threshold", "-0.1"),
        "--jumprelu-init-threshold -0.1: must be a number above 0"),
    Bad(T, "--jumprelu-init-threshold", ("--jumprelu-init-threshold", "0.1,x"), "'x' is not a number", code=2),
    Bad(T, "--stats-window", ("--stats-window", "0"), "--stats-window 0: must be a positive integer"),
    Bad(T, "--stats-window", ("--stats-window", "50,100"), "'50,100': takes one value for the whole run", code=2),
    Bad(T, "--zipf-exponent", ("--zipf-exponent", "0"), "--zipf-exponent 0: must be a number above 0"),
    Bad(T, "--zipf-exponent", ("--zipf-exponent", "steep"), "'steep' is not a valid float", code=2),
    Bad(T, "--zipf-exponent", ("--zipf-exponent", "1,2"), "'1,2': takes one value for the whole run", code=2),
    Bad(T, "--zipf-underuse-scale", ("--zipf-underuse-scale", "-0.5"),
        "--zipf-underuse-scale -0.5: must be a number from 0 to 1"),
    Bad(T, "--zipf-underuse-scale", ("--zipf-underuse-scale", "0.25,2"),
        "--zipf-underuse-scale 2: must be a number from 0 to 1"),
    Bad(T, "--apply-b-dec-to-input", ("--apply-b-dec-to-input=no",),
        "Option '--apply-b-dec-to-input' does not take a value", code=2),
    Bad(T, "--holdout-fraction", ("--holdout-fraction", "1.5"), "--holdout-fraction 1.5: must be a number from 0 to "
        "0.5"),
    Bad(T, "--holdout-fraction", ("--holdout-fraction", "-0.5"), "--holdout-fraction -0.5: must be a number from 0"),
    Bad(T, "--checkpoint-every", ("--checkpoint-every", "0"), "--checkpoint-every 0: must be a positive integer"),
    Bad(T, "--log-every", ("--log-every", "0"), "--log-every 0: must be a positive integer"),
    Bad(T, "--device", ("--device", "gpu"), "--device gpu: use auto, cpu, cuda or cuda:N"),
    Bad(T, "--dtype", ("--dtype", "float16"), "'float16' is not one of", code=2),
    Bad(T, "--shuffle-tokens", ("--shuffle-tokens", "0"), "--shuffle-tokens 0: must be a positive integer"),
    Bad(T, "--parallel", ("--parallel", "model"), "'model' is not one of", code=2),
    Bad(T, "--out", ("--out", "{file}"), "--out {file}: {file} is a file, not a directory"),
    Bad(T, "--wandb", ("--wandb", "me/sweeps"), "--wandb me/sweeps: a wandb project name has at most 128 characters "
        "and none of"),
    Bad(T, "--wandb", ("--wandb", ""), "--wandb '': must be a non-empty string"),

    Bad(E, "SAE_DIR", ("{cwd}/nope",), "nope does not exist; give SAE directories", names="nope"),
    Bad(E, "SAE_DIR", ("{empty}",), "is not an SAE directory: sae_record.json and sae_native.safetensors missing",
        names="{empty}"),
    Bad(E, "SAE_DIR", ("{damaged_run}",), "run.json is damaged or truncated (not valid JSON)", names="{damaged_run}"),
    Bad(E, "SAE_DIR", ("{damaged_sae}",), "sae_record.json is damaged or truncated (not valid JSON)", names="{damaged_sae}"),
    Bad(E, "--cache", ("--cache", "{cwd}/nope.zarr"), "is not an activation cache", names="nope.zarr"),
    Bad(E, "--model", ("--model", "./nope"), "./nope is not a checkpoint directory", names="./nope"),
    Bad(E, "--model-dtype", ("--model-dtype", "int8"), "'int8' is not one of", code=2),
    Bad(E, "--dataset", ("--dataset", ""), "--dataset '': must be a non-empty string"),
    Bad(E, "--dataset", ("--dataset", "{cwd}/nope.txt"), "nope.txt does not exist", names="nope.txt"),
    Bad(E, "--split", ("--split", "test"), "--split test: applies to the text of --dataset, and no --dataset is given"),
    Bad(E, "--split", ("--dataset", "{corpus}", "--split", " "), "--split ' ': must be a non-empty string"),
    Bad(E, "--text-column", ("--dataset", "{corpus}", "--text-column", "body"), "has no column 'body'"),
    Bad(E, "--text-column", ("--text-column", "body"), "--text-column body: applies to the text of --dataset"),
    Bad(E, "--tokens", ("--tokens", "0"), "--tokens 0: must be a positive integer"),
    Bad(E, "--tokens", ("--tokens", "1M"), "--tokens 1,000,000 is more than the 1,024 held-out tokens"),
    Bad(E, "--batch-size", ("--batch-size", "0"), "--batch-size 0: must be a positive integer"),
    Bad(E, "--device", ("--device", "tpu"), "--device tpu: use auto, cpu, cuda or cuda:N"),
    Bad(E, "--include-bos", ("--include-bos=1",), "Option '--include-bos' does not take a value", code=2),
    Bad(E, "--batch-mode", ("--batch-mode=1",), "Option '--batch-mode' does not take a value", code=2),
    Bad(E, "--out", ("--out", "{file}"), "--out {file}: {file} is a file, not a directory"),
    Bad(E, "--wandb", ("--wandb", "x" * 129), "a wandb project name has at most 128 characters", names="--wandb"),

    Bad(X, "SAE_DIR", ("{cwd}/nope",), "nope does not exist; give SAE directories", names="nope"),
    Bad(X, "SAE_DIR", ("{damaged_sae}",), "sae_record.json is damaged or truncated (not valid JSON)",
        names="{damaged_sae}"),
    Bad(X, "--top", ("--top", "0"), "--top 0: must be a positive integer"),
    Bad(X, "--top", ("--top", "5000"), "--top 5000: must be a positive integer no larger than 1000"),
    Bad(X, "--top", ("--top", "many"), "'many' is not a valid integer", code=2),
    Bad(X, "--cache", ("--cache", "{cwd}/nope.zarr"), "is not an activation cache", names="nope.zarr"),
    Bad(X, "--cache", ("--cache", ""), "--cache '': must be a non-empty string"),
    Bad(X, "--model", ("--model", "./nope"), "./nope is not a checkpoint directory", names="./nope"),
    Bad(X, "--tokens", ("--tokens", "0"), "--tokens 0: must be a positive integer"),
    Bad(X, "--tokens", ("--tokens", "1M"), "--tokens 1,000,000 is more than the 1,024 held-out tokens"),
    Bad(X, "--batch-size", ("--batch-size", "0"), "--batch-size 0: must be a positive integer"),
    Bad(X, "--device", ("--device", "tpu"), "--device tpu: use auto, cpu, cuda or cuda:N"),
    Bad(X, "--out", ("--out", "{file}"), "--out {file}: {file} is a file, not a directory"),

    Bad(I, "PATH", ("{cwd}/nope.zarr",), "is not an activation cache (no zarr.json there)", names="nope.zarr"),
    Bad(I, "PATH", ("{file}",), "is not an activation cache", names="{file}"),
    Bad(I, "--json", ("--json=1", "{cache}"), "Option '--json' does not take a value", code=2),
    Bad(V, "PATH", ("{empty}",), "is not an activation cache (no zarr.json there)", names="{empty}"),
]
if not torch.cuda.is_available():
    TABLE.append(Bad(H, "--device", ("--device", "cuda"), "--device cuda asked for CUDA, but torch sees no CUDA"))
    TABLE.append(Bad(T, "--device", ("--device", "cuda:0"), "--device cuda:0 asked for CUDA"))

# Options no value of which can be wrong, and why (none today: every flag refuses a value given to it).
NO_BAD_VALUE: dict[tuple[str, str], str] = {}


def commands() -> dict[str, click.Command]:
    return {H: main.commands["harvest"], T: main.commands["train"], E: main.commands["eval"],
            I: main.commands["cache"].commands["info"], V: main.commands["cache"].commands["verify"],
            X: main.commands["features"]}


def spelled(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        return (param.metavar or param.name.upper()).strip("[].")
    return param.opts[0]


def test_every_option_of_every_command_has_bad_values():
    options = {(name, spelled(p)) for name, cmd in commands().items() for p in cmd.params}
    covered = {(b.command, b.option) for b in TABLE}
    assert sorted(options - covered - set(NO_BAD_VALUE)) == []
    assert sorted(covered - options) == []  # a row for an option that no longer exists is a stale row


@pytest.fixture(scope="module")
def workspace(checkpoints, corpus, tmp_path_factory) -> dict[str, str]:
    """What the base arguments name: a model, a text, a cache, an SAE trained on it, and things that are not."""
    root = tmp_path_factory.mktemp("bad_input")
    torch.manual_seed(0)
    cache = write_cache(root / "c.zarr", torch.randn(8192, 16), context_size=16, rows_per_shard=1024, hook=HOOK)
    sae = save_sae(SAE(SAEConfig(d_in=16, d_sae=32, arch="topk", k=4)), root / "sae", model_name="synthetic",
                   hook_name=HOOK, extra_record={"cache": str(cache), "holdout_start": 8192 - 1024})
    damaged = root / "damaged_sae"
    damaged.mkdir()
    for f in sae.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    (damaged / "sae_record.json").write_text("{not json")
    (root / "damaged_run").mkdir()
    (root / "damaged_run" / "run.json").write_text('{"saes": ["topk-k4')  # a run.json cut short
    (root / "empty").mkdir()
    (root / "file.txt").write_text("not a directory\n")
    (root / "folder").mkdir()
    (root / "folder" / "notes.txt").write_text("a user's file that a harvest must not clear\n")
    return {"root": str(root), "model": str(checkpoints["gpt2"]), "corpus": str(corpus), "cache": str(cache),
            "sae": str(sae), "damaged_sae": str(damaged),
            "damaged_run": str(root / "damaged_run"), "empty": str(root / "empty"), "file": str(root / "file.txt"),
            "folder": str(root / "folder")}


BASE = {
    H: ("harvest", "--model", "{model}", "--dataset", "{corpus}", "--tokens", "2048", "--context-size", "32",
        "--rows-per-shard", "512", "--batch-size", "4", "--device", "cpu", "--out", "{cwd}/out.zarr", "--layer", "1"),
    T: ("train", "--cache", "{cache}", "--out", "{cwd}/run", "--batch-size", "256", "--dict-size", "32", "--k", "4",
        "--log-every", "4", "--device", "cpu"),
    E: ("eval", "{sae}", "--device", "cpu", "--batch-size", "8"),
    X: ("features", "{sae}", "--device", "cpu"),
    I: ("cache", "info"),
    V: ("cache", "verify"),
}


def snapshot(*roots: Path) -> dict[Path, tuple[int, int]]:
    """Every file and folder under `roots` with its size and modification time: a write anywhere changes it."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in [root, *root.rglob("*")]}


def error_line(output: str, code: int) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    if code == 2:  # click's usage lines may come first
        lines = [line for line in lines if not line.startswith(("Usage: ", "Try '"))]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


@pytest.mark.parametrize("bad", TABLE, ids=lambda b: f"{b.command}:{' '.join(b.args)}")
def test_bad_value_is_one_line_naming_it_and_changes_nothing(bad, workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output places (./cache/...) are inside what the snapshot watches
    paths = {**workspace, "cwd": str(tmp_path)}
    args = [a.format(**paths) for a in (*BASE[bad.command], *bad.args)]
    before = snapshot(tmp_path, Path(workspace["root"]))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == bad.code, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    line = error_line(result.output, bad.code)
    assert bad.expect.format(**paths) in line
    assert (bad.names or bad.option).format(**paths) in line
    assert snapshot(tmp_path, Path(workspace["root"])) == before  # refused before any work: nothing was written


def test_python_api_refuses_what_the_cli_refuses():
    for make, message in [(lambda: HarvestConfig(batch_size=0), "--batch-size 0: must be a positive integer"),
                          (lambda: HarvestConfig(rows_per_shard=100), "--rows-per-shard 100: must be a multiple"),
                          (lambda: HarvestConfig(hook="blocks.1.hook_resid_post", layers=(2,)), "--layer 2: --hook"),
                          (lambda: TrainConfig(lrs=(0.0,)), "--lr 0: must be a number above 0"),
                          (lambda: TrainConfig(ks=[16, 16]), "--k 16: given twice"),
                          (lambda: TrainConfig(batch_size=True), "--batch-size True: must be a positive integer"),
                          (lambda: TrainConfig(archs="relu"), "--arch relu: must be a list of values"),
                          (lambda: TrainConfig(aux_normalised="yes"), "--aux-normalised yes: must be true or false"),
                          (lambda: TrainConfig(zipf_exponent=-1.0), "--zipf-exponent -1: must be a number above 0"),
                          (lambda: TrainConfig(zipf_underuse_scale=1.5),
                           "--zipf-underuse-scale 1.5: must be a number from 0 to 1"),
                          (lambda: TrainConfig(aux_k=[64, 0]), "--aux-k 0: must be a positive integer"),
                          (lambda: TrainConfig(bandwidth=(0.1, 0.1)), "--bandwidth 0.1: given twice"),
                          (lambda: TrainConfig(group_fractions="0.5,0.5"), "--group-fractions 0.5,0.5: must be a list"),
                          (lambda: TrainConfig(group_fractions=((0.5, 0.5), 1.0)),
                           "--group-fractions ((0.5, 0.5), 1.0): must be a list of fractions, or a list of such lists"),
                          (lambda: TrainConfig(group_fractions=((0.5, 0.5), (0.5, 0.25))),
                           "--group-fractions 0.5,0.25: must sum to 1"),
                          (lambda: EvalConfig(tokens=0), "--tokens 0: must be a positive integer")]:
        with pytest.raises(ConfigError) as e:
            make()
        assert str(e.value).startswith(message)


def test_defaults_that_depend_on_another_field_are_resolved_not_ignored():
    assert HarvestConfig().layers == (12,) and HarvestConfig(layers=[3, 5]).layers == (3, 5)
    assert HarvestConfig(hook="blocks.1.hook_resid_post").layers == (1,)
    assert HarvestConfig(hook="blocks.1.hook_resid_post", layers=(1,)).layers == (1,)
    assert HarvestConfig(hook="ln_final.hook_normalized").layers == ()
    assert TrainConfig().expansions == (8,) and TrainConfig(dict_sizes=(64,)).expansions == ()
    assert TrainConfig(expansions=[2, 4]).expansions == (2, 4)


def test_a_finished_read_only_cache_is_reported_complete_without_loading_or_locking(checkpoints, corpus, tmp_path,
                                                                                    monkeypatch):
    out = tmp_path / "out.zarr"
    args = [a.format(model=checkpoints["gpt2"], corpus=corpus, cwd=tmp_path) for a in BASE[H]][1:]
    assert CliRunner().invoke(main, ["harvest", *args]).exit_code == 0
    (out / ".writer.lock").unlink()
    import sae_cache.harvest.run as harvest_run

    def no_model(*a, **k):
        raise AssertionError("a complete cache needs no model")

    monkeypatch.setattr(harvest_run, "load_model", no_model)
    files = [out, *out.rglob("*")]
    for p in files:  # read-only; as root the mode does not stop writes, so the snapshot and lock check below do
        p.chmod(stat.S_IRUSR | stat.S_IXUSR if p.is_dir() else stat.S_IRUSR)
    try:
        before = snapshot(out)
        result = CliRunner().invoke(main, ["harvest", *args, "--batch-size", "2"])  # an execution field may differ
        assert result.exit_code == 0, result.output
        assert "is already complete (2,048 tokens); nothing to do" in result.output
        assert not (out / ".writer.lock").exists() and snapshot(out) == before
    finally:
        for p in files:
            p.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("args,code,line", [
    (["harvest", "--batch-size", "0"], 1, "Error: --batch-size 0: must be a positive integer"),
    (["train", "--lr", "0"], 1, "Error: --lr 0: must be a number above 0"),
    (["train", "--k", "x"], 2, "Error: Invalid value for '--k': 'x' is not a whole number"),
])
def test_as_a_real_process(args, code, line, tmp_path):
    result = subprocess.run([sys.executable, "-m", "sae_cache.sae_common.cli", *args, "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == code and "Traceback" not in result.stderr and result.stdout == ""
    assert error_line(result.stderr, code) == line
    assert list(tmp_path.iterdir()) == []
