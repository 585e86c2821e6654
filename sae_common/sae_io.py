"""Saving and loading SAEs: a directory that SAELens 6.x loads with `SAE.load_from_disk`, plus our own
record and native weights so that `load_sae` restores our SAE exactly. Safetensors and JSON only, no pickle.

    <directory>/cfg.json                  SAELens v6 config (architecture, d_in, d_sae, ..., metadata)
    <directory>/sae_weights.safetensors   SAELens parameter names, input normalisation folded in
    <directory>/sae_record.json           our full SAEConfig, model/hook names and the caller's extra record
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
from safetensors.torch import load_file, save_file

from sae_cache.sae_common.cache_format import DEFAULT_ROOT
from sae_cache.sae_common.errors import UserError
from sae_cache.sae_common.sae import SAE, SAEConfig

SAELENS_FORMAT_VERSION = "6.52.0"
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
RECORD_FILE, NATIVE_FILE = "sae_record.json", "sae_native.safetensors"
RECORD_VERSION = 1
# A training run directory holds run.json (cache, hook, model, holdout_start, the names of its SAEs) and
# one saved SAE directory per name (train/run.py writes it; eval reads it).
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
    # serialise first, so a non-JSON-able extra_record fails before anything is written
    record_text = json.dumps(record, indent=2)
    cfg_text = json.dumps(saelens_cfg(sae, model_name=model_name, hook_name=hook_name,
                                      extra_record=extra_record), indent=2)
    save_file(saelens_weights(sae), directory / WEIGHTS_FILE)
    native = {name: t.detach().cpu().contiguous().clone() for name, t in sae.state_dict().items()}
    save_file(native, directory / NATIVE_FILE)
    (directory / CFG_FILE).write_text(cfg_text)
    (directory / RECORD_FILE).write_text(record_text)
    return directory


def load_sae(directory: str | Path) -> SAE:
    """Rebuild the SAE that save_sae wrote, exactly (parameters and all buffers), on CPU in eval mode."""
    directory = Path(directory)
    missing = [name for name in (RECORD_FILE, NATIVE_FILE) if not (directory / name).is_file()]
    if missing:
        raise UserError(f"{directory} is not an SAE saved by this project: {', '.join(missing)} missing")
    record = load_record(directory)
    if record.get("record_version") != RECORD_VERSION:
        raise UserError(f"{directory / RECORD_FILE} has record_version {record.get('record_version')!r}; "
                        f"this code reads version {RECORD_VERSION}")
    sae = SAE(SAEConfig(**record["config"]))
    sae.load_state_dict(load_file(directory / NATIVE_FILE))
    return sae.eval()


def load_record(directory: str | Path) -> dict:
    """The sae_record.json of a saved SAE: config, model_name, hook_name and the extra record."""
    path = Path(directory) / RECORD_FILE
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is damaged (not JSON: {e}); save the SAE again, or train it again") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} is damaged (not a JSON object); save the SAE again, or train it again")
    return record


def find_runs(root: str | Path = DEFAULT_ROOT) -> list[Path]:
    """Training run directories under `root`/runs (each with a run.json), newest first."""
    runs = [p.parent for p in (Path(root) / "runs").glob(f"*/{RUN_FILE}")]
    return sorted(runs, key=lambda p: (p / RUN_FILE).stat().st_mtime, reverse=True)
