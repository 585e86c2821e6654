"""`sae eval`: its CEs against direct Hugging Face computations, a perfect SAE, splicing that runs only the blocks
it must, many SAEs in one pass = one at a time, the plots' data, and every user error through the CLI.

One workspace per module, laid out like a user's: cache/g.zarr harvested (float32) from the tiny Gemma-2 of
conftest, and cache/runs/r1, three SAEs trained on it by `sae train --holdout-fraction 0.25`. Its held-out rows
are the last 4 contexts of each of its 4 chunks of 16 (sae_common/holdout.py): 16 contexts of 32 tokens, 496 of
them not BOS.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from sae_cache.evaluate.metrics import ActivationStats, kl_per_token, log_probs, next_token_ce
from sae_cache.evaluate.plots import plot_figures
from sae_cache.evaluate.splice import clean_pass, spliced_logits
from sae_cache.sae_common.cache_format import open_cache
from sae_cache.sae_common.cli import main
from sae_cache.sae_common.model import load_model
from sae_cache.sae_common.sae import SAE, SAEConfig
from sae_cache.sae_common.sae_io import save_sae
from tests.conftest import WORDS
from tests.test_harvest import CTX, harvest_args, hf_hidden_states

HOOK = "blocks.1.hook_resid_post"
HOLDOUT = [(384, 512), (896, 1024), (1408, 1536), (1920, 2048)]
HOLDOUT_RECORD = {"rule": "spread", "fraction": 0.25, "block_contexts": 16}
D = 32  # d_model of conftest's checkpoints


def cli(*args: object) -> object:
    # wide enough that rich's table does not truncate the SAE names
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, [str(a) for a in args])


def eval_cli(*args: object) -> object:
    return cli("eval", "--device", "cpu", "--batch-size", 8, *args)


def fails(*args: object) -> str:
    result = eval_cli(*args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    return result.output


def read_eval(sae_dir: Path) -> dict:
    return json.loads((sae_dir / "eval.json").read_text())


@pytest.fixture(scope="module")
def workspace(checkpoints, corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workspace")
    cache = root / "cache" / "g.zarr"
    result = cli(*harvest_args(checkpoints["gemma2"], corpus, cache, "--layer", 1, "--dtype", "float32"))
    assert result.exit_code == 0, result.output
    result = cli("train", "--cache", cache, "--out", root / "cache" / "runs" / "r1", "--batch-size", 256,
                 "--expansion", 2, "--arch", "topk,batchtopk,relu", "--k", 4, "--device", "cpu",
                 "--holdout-fraction", 0.25)
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def evaluated_run(workspace) -> tuple[Path, str, dict[str, dict]]:
    """`sae eval` with no argument, from the workspace: (run dir, output, {SAE name: its eval.json then})."""
    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        result = eval_cli()
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    run = workspace / "cache" / "runs" / "r1"
    return run, result.output, {d.name: read_eval(d) for d in run.iterdir() if (d / "eval.json").is_file()}


def save_test_sae(sae: SAE, directory: Path, workspace: Path, hook: str = HOOK) -> Path:
    return save_sae(sae, directory, model_name="gemma2", hook_name=hook,
                    extra_record={"cache": str(workspace / "cache" / "g.zarr"), "holdout": HOLDOUT_RECORD})


def perfect_sae() -> SAE:
    """relu(x) − relu(−x) = x: d_sae = 2·d_in, W_enc = [I, −I], W_dec = [I; −I], zero biases, no normalisation."""
    sae = SAE(SAEConfig(d_in=D, d_sae=2 * D, arch="relu", input_norm="none"))
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


# ---------------------------------------------------------------- numbers against naive references

def hf_ce(model_dir: Path, tokens_NT: torch.Tensor, include_bos: bool, block_output=None) -> float:
    """CE of Hugging Face's own model (eager attention, as the bridge runs it) with labels = next tokens,
    optionally with block 1's output (= blocks.1.hook_resid_post) replaced at non-BOS positions."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    first = 0 if include_bos else 1

    def replace(module, inputs, out):
        assert isinstance(out, torch.Tensor)
        out = out.clone()
        out[:, first:] = block_output
        return out

    handle = model.model.layers[1].register_forward_hook(replace) if block_output is not None else None
    with torch.inference_mode():
        if include_bos:
            loss = model(tokens_NT, labels=tokens_NT).loss.item()  # HF shifts the labels itself
        else:
            logits = model(tokens_NT).logits
            loss = F.cross_entropy(logits[:, 1:-1].flatten(0, 1), tokens_NT[:, 2:].flatten()).item()
    if handle:
        handle.remove()
    return loss


@pytest.mark.parametrize("include_bos", [False, True])
def test_ces_equal_hugging_face_and_a_perfect_sae_changes_nothing(workspace, checkpoints, tmp_path, include_bos):
    sae_dir = save_test_sae(perfect_sae(), tmp_path / "perfect", workspace)
    result = eval_cli(sae_dir, *(["--include-bos"] if include_bos else []))
    assert result.exit_code == 0, result.output
    m = read_eval(sae_dir)["metrics"]
    cache = open_cache(workspace / "cache" / "g.zarr")
    tokens_NT = torch.from_numpy(np.concatenate([cache.tokens()[a:b] for a, b in HOLDOUT])).long().reshape(-1, CTX)
    x_NTD = torch.cat([cache.read_rows(HOOK, a, b) for a, b in HOLDOUT]).double().reshape(-1, CTX, D)
    mean_D = (x_NTD if include_bos else x_NTD[:, 1:]).mean((0, 1)).float()
    model = checkpoints["gemma2"]
    assert m["tokens"] == (512 if include_bos else 496)
    assert m["ce_clean"] == pytest.approx(hf_ce(model, tokens_NT, include_bos), rel=1e-6)
    assert m["ce_zero_ablated"] == pytest.approx(hf_ce(model, tokens_NT, include_bos, 0.0), rel=1e-6)
    assert m["ce_mean_ablated"] == pytest.approx(hf_ce(model, tokens_NT, include_bos, mean_D), rel=1e-6)
    assert m["ce_zero_ablated"] > m["ce_clean"]
    # the perfect reconstruction is exact, so the spliced pass must reproduce the clean logits bit for bit
    assert m["ce_spliced"] == m["ce_clean"] and m["ce_degradation"] == 0.0 and m["kl_div"] == 0.0
    assert m["ce_loss_score"] == 1.0
    assert m["fvu"] == 0.0 and m["mse"] == 0.0 and m["explained_variance"] == 1.0
    # (BOS is token 0, Gemma-2's padding index, whose embedding is zero, and so is the residual stream of this
    # bias-free model wherever a context has seen only token 0 (BOS, and a separator right after it): cos(0, 0)
    # counts as 0)
    zero_NT = (tokens_NT == 0).long().cumprod(1).bool()
    zero_NT = zero_NT if include_bos else zero_NT[:, 1:]
    assert zero_NT.sum() >= (16 if include_bos else 0)
    assert m["cosine_similarity"] == pytest.approx(1 - zero_NT.sum().item() / zero_NT.numel(), abs=1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "llama"])
def test_a_splice_that_puts_the_activation_back_gives_the_clean_logits_and_skips_lower_blocks(checkpoints, arch):
    loaded = load_model(str(checkpoints[arch]), [], n_layers=3)
    calls = []
    loaded.bridge.blocks[0].original_component.register_forward_pre_hook(lambda *_: calls.append(1))
    tokens_BT = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    tokens_BT[:, 0] = 0
    for hook in ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post",
                 "blocks.2.hook_mlp_out"):
        with torch.inference_mode():
            clean = clean_pass(loaded.bridge, tokens_BT, [hook])
            calls.clear()
            layer = int(hook.split(".")[1])
            logits_BTV = spliced_logits(loaded.bridge, clean.resid[layer], hook, clean.acts[hook])
            assert torch.equal(logits_BTV, clean.logits_BTV), hook
            assert len(calls) == (1 if layer == 0 else 0), hook  # blocks below the hook's did not run
            zeroed_BTV = spliced_logits(loaded.bridge, clean.resid[layer], hook, torch.zeros_like(clean.acts[hook]))
            assert not torch.allclose(zeroed_BTV, clean.logits_BTV), hook  # and the replacement does reach them
    assert "forward" not in vars(loaded.bridge.blocks[0])  # the class's forward is back after the pass


def test_metric_functions_equal_naive_computations():
    torch.manual_seed(0)
    logits_BTV, other_BTV = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    tokens_BT = torch.randint(0, 7, (2, 5))
    ce = next_token_ce(log_probs(logits_BTV), tokens_BT)
    expected = F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1), tokens_BT[:, 1:].flatten(), reduction="none")
    torch.testing.assert_close(ce.flatten(), expected)
    kl = kl_per_token(log_probs(logits_BTV), log_probs(other_BTV))
    expected = F.kl_div(log_probs(other_BTV), log_probs(logits_BTV), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl, expected)
    x_ND = torch.randn(300, 4) * 0.01 + 1000.0  # float32 with a large mean and a small variance
    stats = ActivationStats(center_D=x_ND[:50].double().mean(0))  # a reference point near, not at, the mean
    for chunk in x_ND.split(64):
        stats.add(chunk)
    naive = (x_ND.double() - x_ND.double().mean(0)).pow(2).sum().item()
    assert stats.total_variance() == pytest.approx(naive, rel=1e-9)


# ---------------------------------------------------------------- many SAEs, batch mode, outputs

def test_no_argument_evaluates_the_newest_run_on_held_out_rows_only(evaluated_run):
    run, output, reports = evaluated_run
    assert "using the newest run under cache/runs: cache/runs/r1" in output
    assert sorted(reports) == ["batchtopk-k4-64", "relu-l1_0.01-64", "topk-k4-64"]
    assert json.loads((run / "run.json").read_text())["holdout"] == HOLDOUT_RECORD
    for r in reports.values():
        assert r["rows"] == [list(r) for r in HOLDOUT] and r["dataset"] is None
        assert r["metrics"]["tokens"] == 496 and r["metrics"]["ce_tokens"] == 480
        assert len(r["latent_frequency"]) == r["d_sae"] == 64 and sum(r["l0_histogram"]) == 496
        assert r["batch_mode"] is False
    assert reports["topk-k4-64"]["l0_histogram"] == [0, 0, 0, 0, 496]  # top-k: exactly k latents per token
    summary = json.loads((run / "eval_summary.json").read_text())
    assert [s["sae"] for s in summary["saes"]] == sorted(reports, key=lambda n: reports[n]["metrics"]["l0"])
    rows = [line.split()[1] for line in output.splitlines() if line.startswith("│")]  # the table's body rows
    assert rows == [s["sae"] for s in summary["saes"]]  # table sorted by L0


def test_three_saes_in_one_run_equal_three_separate_runs(evaluated_run, tmp_path):
    run, _, together = evaluated_run
    for name, report in together.items():
        result = eval_cli(run / name, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        alone = read_eval(tmp_path / name / name)
        for key in ("metrics", "l0_histogram", "latent_frequency"):
            assert alone[key] == report[key], (name, key)


def test_with_out_every_output_goes_there_and_the_sae_directories_stay_as_they_were(evaluated_run, tmp_path):
    run, _, together = evaluated_run
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = eval_cli(run, "--tokens", 256, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # eval.json, summary, plots
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.json")) == sorted(
        [*(f"{name}/eval.json" for name in together), "eval_summary.json"])
    assert all(read_eval(tmp_path / "out" / name)["metrics"]["tokens"] == 248 for name in together)  # 8 contexts
    assert len(list((tmp_path / "out" / "plots").glob("*.png"))) == 4


def test_batch_mode_encodes_with_the_batch_level_selection(evaluated_run, tmp_path):
    run, _, together = evaluated_run
    result = eval_cli(run / "batchtopk-k4-64", run / "relu-l1_0.01-64", "--batch-mode", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    batch, relu = read_eval(tmp_path / "batchtopk-k4-64"), read_eval(tmp_path / "relu-l1_0.01-64")
    assert batch["batch_mode"] is True and relu["batch_mode"] is False
    assert batch["metrics"]["l0"] == 4.0  # top k·B over each batch of B tokens: k per token on average
    assert batch["metrics"]["l0"] != together["batchtopk-k4-64"]["metrics"]["l0"]  # the threshold differs
    assert relu["metrics"] == together["relu-l1_0.01-64"]["metrics"]  # relu has no batch-level selection


def test_plots_exist_are_labelled_and_show_the_evaluated_numbers(evaluated_run):
    run, _, reports = evaluated_run
    names = ["nmse_vs_l0", "ce_degradation_vs_l0", "l0_histogram", "latent_frequency"]
    summary = json.loads((run / "eval_summary.json").read_text())
    assert summary["plots"] == [str(run / "plots" / f"{n}.png") for n in names]
    assert all((run / "plots" / f"{n}.png").stat().st_size > 1000 for n in names)
    figures = plot_figures(list(reports.values()))
    assert list(figures) == names
    for name, ax in ((n, figures[n].axes[0]) for n in names):
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), name
    for name, metric in (("nmse_vs_l0", "nmse"), ("ce_degradation_vs_l0", "ce_degradation")):
        ax = figures[name].axes[0]
        assert "L0" in ax.get_xlabel() and ax.get_xscale() == "log"  # relu's L0 is ~8x the k=4 SAEs'
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert sorted(lines) == ["batchtopk", "relu", "topk"]  # one line per architecture
        for r in reports.values():
            line = lines[r["arch"]]
            assert list(line.get_xdata()) == [r["metrics"]["l0"]] and list(line.get_ydata()) == [r["metrics"][metric]]
    steps = {p.get_label(): p for p in figures["l0_histogram"].axes[0].patches}
    for name, r in reports.items():
        values, edges = steps[name].get_data()[:2]
        counts = np.asarray(r["l0_histogram"], dtype=float)
        np.testing.assert_allclose(values, counts / counts.sum())
        np.testing.assert_allclose((edges[:-1] + edges[1:]) / 2, np.arange(len(counts)))  # bar l is at L0 = l
    frequency_ax = figures["latent_frequency"].axes[0]
    steps = {p.get_label(): p for p in frequency_ax.patches}
    for name, r in reports.items():
        dead = r["metrics"]["dead_latents"]
        values, edges = steps[f"{name} ({dead} dead)"].get_data()[:2]
        assert values.sum() == r["d_sae"] - dead  # every live latent is in one bin
        assert edges[0] == pytest.approx(np.log10(1 / 496)) and edges[-1] == 0  # log10 of a fraction of tokens


# ---------------------------------------------------------------- user errors, through the CLI

def test_a_directory_that_is_not_an_sae_says_what_is_missing(tmp_path):
    (tmp_path / "nothing").mkdir()
    out = fails(tmp_path / "nothing")
    assert "is not an SAE directory: sae_record.json and sae_native.safetensors missing" in out
    assert "does not exist" in fails(tmp_path / "absent")


def test_an_sae_that_does_not_fit_the_model_names_its_d_in_or_hook(workspace, tmp_path):
    narrow = save_test_sae(SAE(SAEConfig(d_in=16, d_sae=32, arch="relu")), tmp_path / "narrow", workspace)
    out = fails(narrow)
    assert f"the SAE {narrow} has d_in=16, but {HOOK} of" in out and "has width 32" in out
    elsewhere = save_test_sae(perfect_sae(), tmp_path / "deep", workspace, hook="blocks.7.hook_resid_post")
    out = fails(elsewhere)
    assert "reads the hook 'blocks.7.hook_resid_post', which" in out and "(blocks.0 to blocks.2)" in out


def test_a_model_that_cannot_be_loaded_and_too_many_tokens_say_what_is_valid(workspace, evaluated_run, tmp_path):
    run = evaluated_run[0]
    (tmp_path / "not-a-model").mkdir()
    out = fails(run / "topk-k4-64", "--model", tmp_path / "not-a-model")
    assert "is a directory but not a Hugging Face checkpoint: it has no config.json" in out
    out = fails(run, "--tokens", "4096")
    assert "--tokens 4,096 is more than the 512 held-out tokens of" in out and "ask for at most 512" in out
    out = fails(run, "--dataset", tmp_path / "more.txt")
    assert f"{tmp_path / 'more.txt'} does not exist" in out


def test_fresh_text_gives_the_same_metrics_and_its_ces_equal_hugging_face(evaluated_run, checkpoints, tmp_path):
    """--dataset: a local file the harvest never read, packed as harvest packs (BOS + 31 tokens, documents
    separated by EOS); its clean and mean-ablated CEs equal Hugging Face's on the same contexts."""
    from transformers import AutoTokenizer

    rng = random.Random(7)
    docs = [" ".join(rng.choice(WORDS[::-1]) for _ in range(rng.randint(5, 40))) for _ in range(60)]
    data = tmp_path / "fresh.jsonl"
    data.write_text("\n".join(json.dumps({"body": d}) for d in docs) + "\n")
    run, _, held_out = evaluated_run
    result = eval_cli(run / "topk-k4-64", "--dataset", data, "--text-column", "body", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = read_eval(tmp_path / "out" / "topk-k4-64")
    assert report["dataset"] == {"source": str(data), "split": "train", "text_column": "body"}
    assert report["rows"] is None and set(report) == set(held_out["topk-k4-64"])
    assert report["metrics"].keys() == held_out["topk-k4-64"]["metrics"].keys()  # the same metrics
    model = checkpoints["gemma2"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert len(ids) >= 16 * (CTX - 1)  # the default: as many contexts as the SAEs hold out (16)
    tokens_NT = torch.tensor([[tokenizer.bos_token_id] + ids[i * (CTX - 1):(i + 1) * (CTX - 1)] for i in range(16)])
    m = report["metrics"]
    assert m["tokens"] == 16 * (CTX - 1)
    assert m["ce_clean"] == pytest.approx(hf_ce(model, tokens_NT, False), rel=1e-6)
    mean_D = hf_hidden_states(model, tokens_NT)[2][:, 1:].double().mean((0, 1)).float()  # block 1's output
    assert m["ce_mean_ablated"] == pytest.approx(hf_ce(model, tokens_NT, False, mean_D), rel=1e-6)
    assert m["ce_clean"] != held_out["topk-k4-64"]["metrics"]["ce_clean"]  # other text, other numbers


def test_a_damaged_sae_is_refused_naming_the_file(evaluated_run, tmp_path):
    copy = tmp_path / "topk"
    shutil.copytree(evaluated_run[0] / "topk-k4-64", copy)
    native = copy / "sae_native.safetensors"
    data = bytearray(native.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    native.write_bytes(bytes(data))
    out = " ".join(fails(copy).split())
    assert f"{native} is damaged: its SHA-256 differs from the one sae_record.json recorded" in out


def test_a_run_trained_from_a_relative_cache_path_evaluates_from_any_directory(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(workspace)
    result = cli("train", "--cache", "cache/g.zarr", "--out", tmp_path / "run", "--batch-size", 256, "--expansion",
                 2, "--arch", "topk", "--k", 4, "--device", "cpu", "--tokens", 512, "--holdout-fraction", 0.25)
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)  # where cache/g.zarr does not exist
    result = eval_cli(tmp_path / "run", "--tokens", 64)
    assert result.exit_code == 0, result.output
    assert read_eval(tmp_path / "run" / "topk-k4-64")["cache"] == str(workspace / "cache" / "g.zarr")


def test_trade_off_lines_split_an_architecture_only_by_the_settings_its_saes_differ_in():
    from sae_cache.evaluate.plots import by_arch, curve_labels

    def report(name, arch, l0, nmse):
        return {"sae": name, "arch": arch, "metrics": {"l0": l0, "nmse": nmse}}

    reports = [report("batchtopk-k32-1024", "batchtopk", 32, 0.03), report("batchtopk-k16-2048", "batchtopk", 16, 0.05),
               report("batchtopk-k16-1024", "batchtopk", 16, 0.06), report("batchtopk-k32-2048", "batchtopk", 32, 0.02),
               report("topk-k16-1024", "topk", 16, 0.07), report("relu-l1_0.01-1024", "relu", 40, 0.04),
               report("elsewhere", "jumprelu", 20, 0.1)]
    assert curve_labels(reports) == ["batchtopk 1024", "batchtopk 2048", "batchtopk 1024", "batchtopk 2048", "topk",
                                     "relu", "jumprelu"]
    series = by_arch(reports, "nmse")
    assert series["batchtopk 1024"] == ([16, 32], [0.06, 0.03]) and series["batchtopk 2048"] == ([16, 32], [0.05, 0.02])
    assert series["topk"] == ([16], [0.07]) and series["jumprelu"] == ([20], [0.1])
