"""Saving and loading SAEs: a directory that SAELens 6.x loads with `SAE.load_from_disk`, plus our own
record and native weights so that `load_sae` restores our SAE exactly. Safetensors and JSON only, no pickle.

    <directory>/cfg.json                  SAELens v6 config (architecture, d_in, d_sae, ..., metadata)
    <directory>/sae_weights.safetensors   SAELens parameter names, input normalisation folded in
    <directory>/sae_record.json           our full SAEConfig, model/hook names, the caller's extra record and
                                          the SHA-256 of both weight files (load_sae verifies them)
    <directory>/sae_native.safetensors    our parameters and buffers, unfolded

SAELens format followed: decoderesearch/SAELens (pyproject version 6.52.0), files sae_lens/saes/sae.py
(SAEConfig.to_dict: d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
reshape_activations, metadata, architecture; process_sae_in/decode; fold_activation_norm_scaling_factor),
standard_sae.py ("standard": ReLU), topk_sae.py ("topk": k, rescale_acts_by_decoder_norm; top-k of the
pre-activations, then ReLU), jumprelu_sae.py ("jumprelu": ReLU(z)·1[z > threshold], a per-latent
`threshold` weight), batchtopk_sae.py (BatchTopK saved as jumprelu with its threshold broadcast), and
sae_lens/loading/pretrained_sae_loaders.py (metadata.sae_lens_version >= 6.0.0 selects the v6 layout;
the weights are loaded with a strict load_state_dict, so the file holds exactly the expected names).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save as serialize

from sae_cache.sae_common.cache_format import DEFAULT_ROOT, file_sha256
from sae_cache.sae_common.errors import UserError
from sae_cache.sae_common.files import write_atomic
from sae_cache.sae_common.sae import SAE, SAEConfig

SAELENS_FORMAT_VERSION = "6.52.0"
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
RECORD_FILE, NATIVE_FILE = "sae_record.json", "sae_native.safetensors"
RECORD_VERSION = 2  # 2: with the weight files' SHA-256; version 1 (without) is still read
# A training run directory holds run.json (cache, hook, model, its held-out rule (sae_common/holdout.py), the
# names of its SAEs) and one saved SAE directory per name (train/run.py writes it; eval reads it).
RUN_FILE = "run.json"
# keys of `extra_record` that SAELens also understands as metadata (sae_lens LLM_METADATA_KEYS)
SAELENS_METADATA_KEYS = ("context_size", "prepend_bos", "dataset_path", "hook_head_index", "seqpos_slice",
                         "model_class_name", "exclude_special_tokens", "neuronpedia_id")


def saelens_weights(sae: SAE) -> dict[str, torch.Tensor]:
    """Our parameters under SAELens's names, for its forward on RAW activations.

    input_norm "scalar" is folded (SAELens's fold_activation_norm_scaling_factor): with x_n = s·x,
    (s·x − b_dec) W_enc = (x − b_dec/s)(s·W_enc) and x̂ = x̂_n / s = f (W_dec/s) + b_dec/s; pre-activations,
    and so thresholds and b_enc, are unchanged. input_norm "standardize" is not foldable (per token): it is
    exported as SAELens's normalize_activations "layer_norm", which is the same operation.
    """
    s = sae.input_scale if sae.cfg.input_norm == "scalar" else sae.input_scale.new_ones(())
    weights = {"W_enc": sae.W_enc * s, "b_enc": sae.b_enc, "W_dec": sae.W_dec / s, "b_dec": sae.b_dec / s}
    if sae.arch.saelens == "jumprelu":
        weights["threshold"] = sae.inference_threshold()
    return {name: t.detach().float().cpu().contiguous().clone() for name, t in weights.items()}


def saelens_cfg(sae: SAE, *, model_name: str, hook_name: str, extra_record: dict) -> dict:
    """cfg.json in the SAELens v6 layout (SAEConfig.to_dict of the exported architecture)."""
    metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                "model_name": model_name, "hook_name": hook_name, "hook_head_index": None}
    metadata.update({key: extra_record[key] for key in SAELENS_METADATA_KEYS if key in extra_record})
    cfg = {"architecture": sae.arch.saelens, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
           "normalize_activations": "layer_norm" if sae.cfg.input_norm == "standardize" else "none",
           "reshape_activations": "none", "metadata": metadata}
    if sae.arch.saelens == "topk":
        # our decoder rows are unit norm and the top-k is taken on plain pre-activations
        cfg.update(k=sae.cfg.k, rescale_acts_by_decoder_norm=False)
    return cfg


def save_sae(sae: SAE, directory: str | Path, *, model_name: str, hook_name: str, extra_record: dict) -> Path:
    """Write the four files above into `directory` (created if needed). `extra_record` must be JSON-able
    (training history, cache provenance...); the SAELens metadata keys among it also go to cfg.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = {"record_version": RECORD_VERSION, "config": asdict(sae.cfg), "model_name": model_name,
              "hook_name": hook_name, "extra": extra_record}
    json.dumps(record)  # serialise first, so a non-JSON-able extra_record fails before anything is written
    cfg_text = json.dumps(saelens_cfg(sae, model_name=model_name, hook_name=hook_name,
                                      extra_record=extra_record), indent=2)
    native = {name: t.detach().cpu().contiguous().clone() for name, t in sae.state_dict().items()}
    # every file atomically; the record, which holds the weights' checksums, last
    sha256 = {WEIGHTS_FILE: write_atomic(directory / WEIGHTS_FILE, serialize(saelens_weights(sae))),
              NATIVE_FILE: write_atomic(directory / NATIVE_FILE, serialize(native))}
    write_atomic(directory / CFG_FILE, cfg_text.encode())
    write_atomic(directory / RECORD_FILE, json.dumps({**record, "sha256": sha256}, indent=2).encode())
    return directory


def load_sae(directory: str | Path) -> SAE:
    """Rebuild the SAE that save_sae wrote, exactly (parameters and all buffers), on CPU in eval mode. Refuses
    a directory whose weight files are not the ones save_sae wrote (damaged, truncated, replaced)."""
    directory = Path(directory)
    missing = [name for name in (RECORD_FILE, NATIVE_FILE) if not (directory / name).is_file()]
    if missing:
        raise UserError(f"{directory} is not an SAE saved by this project: {', '.join(missing)} missing")
    record = load_record(directory)
    if record.get("record_version") not in (1, RECORD_VERSION):
        raise UserError(f"{directory / RECORD_FILE} has record_version {record.get('record_version')!r}; "
                        f"this code reads versions 1 to {RECORD_VERSION}")
    if record["record_version"] >= 2:
        verify_sae_files(directory, record)
    try:
        sae = SAE(SAEConfig(**record["config"]))
        sae.load_state_dict(load((directory / NATIVE_FILE).read_bytes()))
    except (SafetensorError, TypeError, KeyError, RuntimeError) as e:  # version 1: no checksums to catch it first
        reason = " ".join(str(e).split())[:200]
        raise UserError(f"{directory} holds an SAE that cannot be loaded ({reason}); save it again or retrain "
                        "it") from None
    return sae.eval()


def verify_sae_files(directory: Path, record: dict) -> None:
    """Each weight file the record lists exists and has the SHA-256 recorded when it was written."""
    sha256 = record.get("sha256")
    if not isinstance(sha256, dict) or set(sha256) != {WEIGHTS_FILE, NATIVE_FILE}:
        raise UserError(f"{directory / RECORD_FILE} is damaged: its sha256 entry is missing or malformed")
    for name, expected in sha256.items():
        file = directory / name
        if not file.is_file():
            raise UserError(f"{file} is missing; {directory} is not a whole saved SAE (retrain it, or restore it "
                            "from a copy)")
        if file_sha256(file) != expected:
            raise UserError(f"{file} is damaged: its SHA-256 differs from the one {RECORD_FILE} recorded when it "
                            "was written. Restore it from a copy, or retrain the SAE")


def load_record(directory: str | Path) -> dict:
    """The sae_record.json of a saved SAE: config, model_name, hook_name and the extra record."""
    path = Path(directory) / RECORD_FILE
    try:
        record = json.loads(path.read_bytes())
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        raise UserError(f"{path} is damaged or truncated (not valid JSON); restore it from a copy, or retrain "
                        "the SAE") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise UserError(f"{path} is damaged: it has no config")
    return record


def find_runs(root: str | Path = DEFAULT_ROOT) -> list[Path]:
    """Training run directories under `root`/runs (each with a run.json), newest first."""
    runs = [p.parent for p in (Path(root) / "runs").glob(f"*/{RUN_FILE}")]
    return sorted(runs, key=lambda p: (p / RUN_FILE).stat().st_mtime, reverse=True)
