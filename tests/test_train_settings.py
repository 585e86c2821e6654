"""Every SAE setting is a `sae train` flag with one default (SAEConfig's), and adding settings keeps old runs
resumable: the same run directory for the same command, and a stored identity without them still matches."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from sae_cache.sae_common.checks import flag
from sae_cache.sae_common.cli import main
from sae_cache.sae_common.architectures import ARCHS
from sae_cache.sae_common.config import LATER_SAE_FIELDS, SAE_FIELDS_FROM_SWEEP, TrainConfig
from sae_cache.sae_common.errors import UserError
from sae_cache.sae_common.sae_config import SWEEPS, SAEConfig
from sae_cache.train import run as train_run
from sae_cache.train.sweep import expand
from tests.cache_utils import write_cache

SETTINGS = [f for f in fields(SAEConfig) if f.name not in SAE_FIELDS_FROM_SWEEP]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    x = torch.randn(4096, 16) @ torch.randn(16, 16) + 3.0
    return write_cache(tmp_path_factory.mktemp("cache") / "c.zarr", x, context_size=16, rows_per_shard=1024)


def train_cli(cache: Path, out: Path, *extra: object) -> object:
    args = ["train", "--cache", cache, "--out", out, "--batch-size", 256, "--dict-size", 32, "--k", 4,
            "--tokens", 1024, "--log-every", 2, "--device", "cpu", *extra]
    return CliRunner().invoke(main, [str(a) for a in args])


def shown_default(name: str, value: object) -> str:
    """How click shows SAEConfig's default of `name`: a flag pair by the side that is on; None as (fitted)."""
    if isinstance(value, bool):
        return flag(name)[2:] if value else "no-" + flag(name)[2:]
    if value is None:
        return "(fitted)"
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def help_entries() -> dict[str, list[str]]:
    """`sae train --help`, per flag: the text of each entry that starts with it, whitespace removed."""
    text = CliRunner().invoke(main, ["train", "--help"]).output
    # an option's entry starts on a line indented by two spaces with its flag; its help runs to the next entry
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"^  (--[a-z0-9-]+)", text, re.M)]
    entries = {}
    for (start, spelled), (end, _) in zip(starts, starts[1:] + [(len(text), "")]):
        entries.setdefault(spelled, []).append(re.sub(r"\s+", "", text[start:end]))  # wrapping may split words
    return entries


def test_help_lists_every_sae_setting_once_with_its_default():
    entries = help_entries()
    assert len(SETTINGS) >= 11  # aux_k ... apply_b_dec_to_input: the enumeration is not empty by accident
    for f in SETTINGS:
        assert len(entries.get(flag(f.name), [])) == 1, f"{flag(f.name)} is listed {entries.get(flag(f.name))}"
        assert f"[default:{shown_default(f.name, f.default)}]".replace(" ", "") in entries[flag(f.name)][0], f.name


def test_train_config_takes_every_sae_default_from_sae_config():
    train_fields = {f.name: f.default for f in fields(TrainConfig)}
    for f in SETTINGS:
        assert f.name in train_fields and train_fields[f.name] == f.default, f.name


def test_flags_reach_the_saved_sae_config(cache, tmp_path):
    result = train_cli(cache, tmp_path / "run", "--arch", "jumprelu,topk", "--bandwidth", "0.02",
                       "--jumprelu-init-threshold", "0.3", "--aux-k", "8", "--no-apply-b-dec-to-input",
                       "--stats-window", "7", "--aux-normalised", "--zipf-exponent", "1.5")
    assert result.exit_code == 0, result.output
    for name in ("jumprelu-l0_0.002-32", "topk-k4-32"):
        config = json.loads((tmp_path / "run" / name / "sae_record.json").read_text())["config"]
        assert (config["bandwidth"], config["jumprelu_init_threshold"], config["aux_k"], config["stats_window"],
                config["apply_b_dec_to_input"], config["aux_normalised"], config["zipf_exponent"]) \
            == (0.02, 0.3, 8, 7, False, True, 1.5), name
    defaults = train_cli(cache, tmp_path / "plain", "--arch", "topk")  # and without the flags, SAEConfig's defaults
    assert defaults.exit_code == 0, defaults.output
    config = json.loads((tmp_path / "plain" / "topk-k4-32" / "sae_record.json").read_text())["config"]
    assert {f.name: config[f.name] for f in SETTINGS if f.name != "group_fractions"} \
        == {f.name: f.default for f in SETTINGS if f.name != "group_fractions"}


def test_the_default_run_directory_is_the_one_it_was_before_the_new_flags():
    # The names below are what default_run_dir gave at e2f4b14, before the SAE settings of LATER_SAE_FIELDS
    # were TrainConfig fields: a command rerun after the upgrade resumes its run instead of starting afresh.
    cache = SimpleNamespace(path=Path("/elsewhere/c.zarr"))
    hook, root = "blocks.0.hook_resid_post", Path("r")
    same = TrainConfig(archs=("topk", "jumprelu"), ks=(4, 8), dead_tokens=1024)
    assert train_run.default_run_dir(TrainConfig(), cache, hook, root).name == "c-de7fe736"
    assert train_run.default_run_dir(same, cache, hook, root).name == "c-c699100f"
    explicit = TrainConfig(**{name: getattr(TrainConfig(), name) for name in LATER_SAE_FIELDS})  # defaults, given
    assert train_run.default_run_dir(explicit, cache, hook, root).name == "c-de7fe736"
    for changed in (dict(aux_k=64), dict(bandwidth=0.02), dict(apply_b_dec_to_input=False), dict(zipf_exponent=1.0)):
        assert train_run.default_run_dir(TrainConfig(**changed), cache, hook, root).name != "c-de7fe736", changed


def test_a_stored_identity_without_a_setting_matches_its_default(monkeypatch, tmp_path):
    old = {k: v for k, v in TrainConfig().identity().items() if k != "group_fractions"}  # a run older than the key
    monkeypatch.setattr(train_run, "read_state", lambda run_dir: {"identity": old, "batches_done": 3})
    assert train_run.check_resume(tmp_path, TrainConfig().identity())["batches_done"] == 3
    with pytest.raises(UserError, match=r"group_fractions: run has \[0\.0625, 0\.0625, 0\.125, 0\.25, 0\.5\], "
                                        r"now \[0\.5, 0\.5\]"):
        train_run.check_resume(tmp_path, TrainConfig(group_fractions=(0.5, 0.5)).identity())
    with pytest.raises(UserError, match="aux_k: run has 512, now 64"):
        train_run.check_resume(tmp_path, TrainConfig(aux_k=64).identity())


def test_a_run_resumes_with_the_defaults_given_and_refuses_another_value(cache, tmp_path):
    assert train_cli(cache, tmp_path / "run", "--arch", "topk").exit_code == 0
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert not set(LATER_SAE_FIELDS) & set(state["identity"])  # stored as a run before the flags stored it
    again = train_cli(cache, tmp_path / "run", "--arch", "topk", "--aux-k", 512, "--bandwidth", 0.05)
    assert again.exit_code == 0 and "resuming" in again.output, again.output
    changed = train_cli(cache, tmp_path / "run", "--arch", "topk", "--stats-window", 7)
    assert changed.exit_code == 1 and "stats_window: run has 100, now 7" in changed.output, changed.output


# Which sweepable settings each architecture uses, written out from what each loss reads (not read from ARCHS):
# the aux settings where there is an auxiliary loss, the JumpReLU ones for jumprelu, Zipf for aux_zipf, groups
# for Matryoshka.
AUX = {"k", "aux_k", "aux_coeff"}
USES = {"relu": {"l1_coeff"}, "topk": AUX, "batchtopk": AUX,
        "jumprelu": {"l0_coeff", "bandwidth", "jumprelu_init_threshold"},
        "feature_choice": AUX | {"zipf_underuse_scale"}, "mutual_choice": AUX | {"zipf_underuse_scale"},
        "matryoshka_batchtopk": AUX | {"group_fractions"}}
TWO = {"k": (4, 8), "l1_coeff": (0.1, 0.2), "l0_coeff": (0.01, 0.02), "aux_k": (8, 16), "aux_coeff": (0.1, 0.2),
       "bandwidth": (0.02, 0.05), "jumprelu_init_threshold": (0.1, 0.3), "zipf_underuse_scale": (0.25, 0.5),
       "group_fractions": ((0.5, 0.5), (0.25, 0.75))}
LISTS = {"k": "ks", "l1_coeff": "l1_coeffs", "l0_coeff": "l0_coeffs"}  # TrainConfig's name, where it differs


def test_the_sweepable_settings_are_the_declared_ones():
    assert {s.field for s in SWEEPS} == set(TWO) == set().union(*USES.values())
    assert set(USES) == set(ARCHS)


def test_a_sweep_is_the_product_of_the_settings_each_architecture_uses_and_no_others():
    entries = expand(TrainConfig(archs=tuple(USES), dict_sizes=(32,), **{LISTS.get(k, k): v for k, v in TWO.items()}),
                     16)
    assert len(entries) == 2 + 8 + 8 + 8 + 16 + 16 + 16  # relu: 2 L1 values; topk: 2 k x 2 aux_k x 2 aux_coeff; ...
    for arch, used in USES.items():
        configs = [e.sae for e in entries if e.sae.arch == arch]
        combos = {tuple(getattr(c, name) for name in sorted(used)) for c in configs}
        assert len(configs) == len(combos) == 2 ** len(used), arch  # each combination of its values once
        for name in set(TWO) - used:  # a setting it ignores: its first value, and no extra SAE
            assert {getattr(c, name) for c in configs} == {TWO[name][0]}, (arch, name)


def test_only_settings_that_vary_tag_the_run_names():
    one = expand(TrainConfig(archs=("relu", "topk", "jumprelu", "matryoshka_batchtopk"), dict_sizes=(32,), ks=(4,),
                             aux_k=64, bandwidth=(0.02,), group_fractions=(0.5, 0.5)), 16)
    # the names these settings gave at 1192a6c, when each took one value
    assert [e.name for e in one] == ["relu-l1_0.01-32", "topk-k4-32", "jumprelu-l0_0.002-32",
                                     "matryoshka_batchtopk-k4-32"]
    several = expand(TrainConfig(archs=("relu", "topk", "jumprelu", "matryoshka_batchtopk"), dict_sizes=(32,), ks=(4,),
                                 aux_k=(64, 128), bandwidth=0.02, group_fractions=((0.5, 0.5), (1 / 16, 15 / 16))), 16)
    assert [e.name for e in several] == [
        "relu-l1_0.01-32", "topk-k4-auxk64-32", "topk-k4-auxk128-32", "jumprelu-l0_0.002-32",
        "matryoshka_batchtopk-k4-auxk64-g0.5_0.5-32", "matryoshka_batchtopk-k4-auxk64-g0.0625_0.9375-32",
        "matryoshka_batchtopk-k4-auxk128-g0.5_0.5-32", "matryoshka_batchtopk-k4-auxk128-g0.0625_0.9375-32"]


def test_one_value_keeps_the_identity_it_had_and_several_are_a_new_one(tmp_path, monkeypatch):
    cache = SimpleNamespace(path=Path("/elsewhere/c.zarr"))
    hook, root = "blocks.0.hook_resid_post", Path("r")
    one = dict(aux_k=64, aux_coeff=0.25, bandwidth=0.02, jumprelu_init_threshold=0.3, zipf_underuse_scale=0.5,
               group_fractions=(0.5, 0.5))
    # default_run_dir at 1192a6c, when each took one value: as a scalar, or a list of one as the CLI passes it
    assert train_run.default_run_dir(TrainConfig(**one), cache, hook, root).name == "c-36eb9bce"
    listed = {k: ((v,) if k == "group_fractions" else [v]) for k, v in one.items()}
    assert train_run.default_run_dir(TrainConfig(**listed), cache, hook, root).name == "c-36eb9bce"
    assert train_run.default_run_dir(TrainConfig(archs=("topk", "matryoshka_batchtopk"), ks=(4, 8),
                                                 group_fractions=(0.25, 0.75)), cache, hook, root).name == "c-4dd2d7fe"
    swept = TrainConfig(aux_k=(64, 128), group_fractions=((0.5, 0.5), (0.25, 0.75)))
    assert (swept.identity()["aux_k"], swept.identity()["group_fractions"]) == ([64, 128], [[0.5, 0.5], [0.25, 0.75]])
    monkeypatch.setattr(train_run, "read_state", lambda run_dir: {"identity": swept.identity(), "batches_done": 3})
    assert train_run.check_resume(tmp_path, swept.identity())["batches_done"] == 3
    with pytest.raises(UserError, match=r"aux_k: run has \[64, 128\], now 64"):
        train_run.check_resume(tmp_path, TrainConfig(aux_k=64, group_fractions=swept.group_fractions).identity())


def test_swept_values_reach_each_saes_record(cache, tmp_path):
    result = train_cli(cache, tmp_path / "run", "--arch", "topk,relu,jumprelu,matryoshka_batchtopk",
                       "--aux-k", "8,16", "--bandwidth", "0.02", "--bandwidth", "0.05", "--aux-coeff", "1/16",
                       "--group-fractions", "1/4,3/4;1/2,1/2")
    assert result.exit_code == 0, result.output
    expected = {"topk-k4-auxk8-32": (8, 0.05, (0.25, 0.75)), "topk-k4-auxk16-32": (16, 0.05, (0.25, 0.75)),
                "relu-l1_0.01-32": (8, 0.02, (0.25, 0.75)),
                "jumprelu-l0_0.002-bw0.02-32": (8, 0.02, (0.25, 0.75)),
                "jumprelu-l0_0.002-bw0.05-32": (8, 0.05, (0.25, 0.75))}
    for aux_k in (8, 16):
        for groups in ((0.25, 0.75), (0.5, 0.5)):
            expected[f"matryoshka_batchtopk-k4-auxk{aux_k}-g{groups[0]:g}_{groups[1]:g}-32"] = (aux_k, 0.02, groups)
    assert sorted(json.loads((tmp_path / "run" / "run.json").read_text())["saes"]) == sorted(expected)
    for name, (aux_k, bandwidth, groups) in expected.items():
        config = json.loads((tmp_path / "run" / name / "sae_record.json").read_text())["config"]
        assert (config["aux_k"], config["aux_coeff"], config["group_fractions"]) == (aux_k, 1 / 16, list(groups)), name
        if name.startswith("jumprelu"):
            assert config["bandwidth"] == bandwidth, name


@pytest.mark.parametrize("setting", [f for f in SETTINGS if f.type != "bool"], ids=lambda f: f.name)
def test_a_setting_takes_several_values_exactly_when_it_is_sweepable(setting):
    """A sweepable setting's --help says it sweeps and its flag takes a list; any other refuses a list."""
    sweepable = setting.name in TWO
    assert ("tosweepit" in help_entries()[flag(setting.name)][0]) == sweepable
    if setting.name == "group_fractions":
        several = ";".join(",".join(map(str, groups)) for groups in TWO["group_fractions"])
    else:
        several = ",".join(map(str, TWO.get(setting.name, (1, 2))))
    result = CliRunner().invoke(main, ["train", flag(setting.name), several, "--cache", "/nonexistent/c.zarr"])
    if sweepable:  # the values pass; the first thing refused is the cache
        assert result.exit_code == 1 and "/nonexistent/c.zarr is not an activation cache" in result.output, \
            result.output
    else:
        assert result.exit_code == 2 and f"'{several}': takes one value for the whole run" in result.output, \
            result.output
