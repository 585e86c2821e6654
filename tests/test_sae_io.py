"""Saving and loading SAEs: our round trip is exact, and the SAELens files, read by an independent few-line
re-implementation of SAELens 6.x's forward, reproduce our SAE in raw activation space."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sae_cache.sae_common.architectures import ARCHS
from sae_cache.sae_common.errors import UserError
from sae_cache.sae_common.sae import SAE, SAEConfig
from sae_cache.sae_common.sae_io import load_record, load_sae, save_sae

D, F, B, K = 16, 64, 32, 4
SAELENS_ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                "feature_choice": "jumprelu", "mutual_choice": "jumprelu", "matryoshka_batchtopk": "jumprelu"}
V6_KEYS = {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
           "reshape_activations", "metadata"}


def batch(seed: int, n: int = B) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 5 * torch.randn(n, D, generator=g) + 2


def trained_sae(arch: str, input_norm: str = "scalar", **overrides) -> SAE:
    """A few training steps, then random non-zero biases so that every weight matters in the export."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=D, d_sae=F, arch=arch, k=K, stats_window=4, input_norm=input_norm, **overrides))
    if input_norm == "scalar":
        sae.set_input_scale(batch(100, 256))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for i in range(6):  # more batches than the θ window holds
        sae(batch(1000 + i)).loss.backward()
        sae.constrain_decoder()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        sae.b_enc.add_(0.1 * torch.randn(F))
        sae.b_dec.add_(0.3 * torch.randn(D))
    return sae.eval()


def saelens_forward(directory, x_BD: torch.Tensor) -> torch.Tensor:
    """SAELens 6.x SAE.forward for standard / topk / jumprelu, written from its source (sae.py
    process_sae_in, *_sae.py encode/decode, layer_norm normalisation), reading only the exported files."""
    cfg = json.loads((directory / "cfg.json").read_text())
    w = load_file(directory / "sae_weights.safetensors")
    x = x_BD
    if cfg["normalize_activations"] == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
    else:
        assert cfg["normalize_activations"] == "none"
    hidden_pre = (x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "standard":
        acts = torch.relu(hidden_pre)
    elif cfg["architecture"] == "topk":
        vals, idx = hidden_pre.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(hidden_pre).scatter(-1, idx, vals.relu())
    else:
        acts = torch.relu(hidden_pre) * (hidden_pre > w["threshold"])
    out = acts @ w["W_dec"] + w["b_dec"]
    if cfg["normalize_activations"] == "layer_norm":
        out = out * std + mu
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_exact(arch, tmp_path):
    sae = trained_sae(arch)
    extra = {"tokens_trained": 6 * B, "history": [{"step": 1, "loss": 0.5}], "cache": "cache/x.zarr"}
    save_sae(sae, tmp_path, model_name="tiny-gpt2", hook_name="blocks.1.hook_resid_post", extra_record=extra)
    loaded = load_sae(tmp_path)
    assert loaded.cfg == sae.cfg and not loaded.training
    state, loaded_state = sae.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name in state:
        assert torch.equal(state[name], loaded_state[name]), name
    x = batch(0)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    record = load_record(tmp_path)
    assert record["extra"] == extra and record["model_name"] == "tiny-gpt2"


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_files(arch, tmp_path):
    sae = trained_sae(arch)
    save_sae(sae, tmp_path, model_name="tiny-gpt2", hook_name="blocks.1.hook_resid_post",
             extra_record={"context_size": 128, "prepend_bos": True, "lr": 3e-4})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cfg.json", "sae_native.safetensors", "sae_record.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert V6_KEYS <= cfg.keys()
    assert cfg["architecture"] == SAELENS_ARCH[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (D, F, "float32", "cpu")
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    meta = cfg["metadata"]
    # SAELens treats a config without metadata.sae_lens_version >= 6.0.0 as the pre-6 layout
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6
    assert (meta["model_name"], meta["hook_name"]) == ("tiny-gpt2", "blocks.1.hook_resid_post")
    assert (meta["context_size"], meta["prepend_bos"]) == (128, True) and "lr" not in meta
    if arch == "topk":
        assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
    weights = load_file(tmp_path / "sae_weights.safetensors")
    shapes = {"W_enc": (D, F), "b_enc": (F,), "W_dec": (F, D), "b_dec": (D,)}
    if cfg["architecture"] == "jumprelu":
        shapes["threshold"] = (F,)
    assert {name: tuple(t.shape) for name, t in weights.items()} == shapes  # SAELens loads strictly
    assert all(t.dtype == torch.float32 for t in weights.values())


@pytest.mark.parametrize("arch, input_norm", [(arch, "scalar") for arch in ARCHS] + [
    ("batchtopk", "standardize"), ("topk", "standardize"), ("relu", "none"), ("feature_choice", "none")])
def test_saelens_forward_reproduces_ours_in_raw_space(arch, input_norm, tmp_path):
    sae = trained_sae(arch, input_norm)
    if input_norm == "scalar":
        assert abs(sae.input_scale.item() - 1) > 0.5  # the fold is exercised
    save_sae(sae, tmp_path, model_name="m", hook_name="h", extra_record={})
    x = batch(0)
    ours = sae(x).x_hat
    assert (sae.encode(x) > 0).any()
    torch.testing.assert_close(saelens_forward(tmp_path, x), ours, atol=1e-4, rtol=1e-5)


def test_jumprelu_exports_its_learned_threshold(tmp_path):
    sae = trained_sae("jumprelu", apply_b_dec_to_input=False)
    save_sae(sae, tmp_path, model_name="m", hook_name="h", extra_record={})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["apply_b_dec_to_input"] is False
    torch.testing.assert_close(load_file(tmp_path / "sae_weights.safetensors")["threshold"],
                               sae.log_threshold.exp().detach())
    torch.testing.assert_close(saelens_forward(tmp_path, batch(0)), sae(batch(0)).x_hat, atol=1e-4, rtol=1e-5)


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="sae_record.json, sae_native.safetensors missing"):
        load_sae(tmp_path)
    sae = trained_sae("topk")
    with pytest.raises(TypeError):  # not JSON-able: nothing is written
        save_sae(sae, tmp_path / "bad", model_name="m", hook_name="h", extra_record={"x": torch.ones(1)})
    assert not any((tmp_path / "bad").iterdir())


def _flip_byte(file) -> None:
    data = bytearray(file.read_bytes())
    data[-7] ^= 0x40  # in the tensor data: the file still parses, one weight differs
    file.write_bytes(bytes(data))


def _truncate(file) -> None:
    file.write_bytes(file.read_bytes()[:100])


@pytest.mark.parametrize("name", ["sae_native.safetensors", "sae_weights.safetensors"])
@pytest.mark.parametrize("damage", [_flip_byte, _truncate])
def test_a_damaged_weight_file_is_refused_naming_it(tmp_path, name, damage):
    save_sae(trained_sae("topk"), tmp_path, model_name="m", hook_name="h", extra_record={})
    damage(tmp_path / name)
    with pytest.raises(UserError, match=f"{tmp_path / name} is damaged: its SHA-256 differs from the one "
                                        "sae_record.json recorded"):
        load_sae(tmp_path)


def test_a_truncated_record_is_refused_naming_it(tmp_path):
    save_sae(trained_sae("topk"), tmp_path, model_name="m", hook_name="h", extra_record={})
    record = tmp_path / "sae_record.json"
    record.write_text(record.read_text()[:-40])
    with pytest.raises(UserError, match=f"{record} is damaged or truncated"):
        load_sae(tmp_path)
