"""Loading a language model through transformer-lens's TransformerBridge, building only the layers needed.

A model is an official transformer-lens name (resolved to its hub id; needs network) or a local Hugging Face
checkpoint directory (config.json, weights and tokenizer files). The same function serves harvest and eval,
and `load_record` says how a model was loaded so that a cache can record it and eval can repeat it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_cache.sae_common.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ASSETS = Path(__file__).parent / "assets"
# Models shipped with the project (trained by scripts/train_tiny_lm.py), usable by name with no network.
BUILTIN_MODELS = {"tiny-stdlib-gpt2": ASSETS / "tiny-stdlib-gpt2"}


class ModelError(UserError):
    """A model that cannot be found or loaded, or a layer or hook it does not have."""


@dataclass
class LoadedModel:
    bridge: Any  # transformer_lens TransformerBridge
    tokenizer: Any
    source: str  # hub id or absolute checkpoint directory
    n_layers_total: int
    n_layers_built: int
    dtype: str

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "n_layers_total": self.n_layers_total,
                "n_layers_built": self.n_layers_built, "dtype": self.dtype, "loader": "TransformerBridge"}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device} asked for CUDA, but torch sees no CUDA device; use --device cpu")
    return device


def resolve_model_dtype(model_dtype: str, device: str) -> str:
    if model_dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    if model_dtype not in DTYPES:
        raise ModelError(f"unknown model dtype {model_dtype!r}; use auto or one of {', '.join(DTYPES)}")
    return model_dtype


def resolve_source(model: str) -> str:
    """A local checkpoint directory (made absolute), a built-in model, or the hub id of an official name."""
    if model in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[model].resolve())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{model} is a directory but not a Hugging Face checkpoint: it has no config.json")
        return str(path.resolve())
    if path.exists() or model.startswith((".", "/", "~")):
        raise ModelError(f"{model} is not a checkpoint directory")
    try:
        from transformer_lens.supported_models import get_official_model_name
    except ImportError:  # transformer-lens 3.x
        from transformer_lens.loading_from_pretrained import get_official_model_name
    try:
        return get_official_model_name(model)
    except ValueError:
        close = _official_close_matches(model)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ModelError(f"{model!r} is neither a local checkpoint directory nor a model name transformer-lens "
                         f"knows.{hint}") from None


def _official_close_matches(model: str) -> list[str]:
    try:
        from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES
    except ImportError:
        return []
    return difflib.get_close_matches(model, OFFICIAL_MODEL_NAMES, n=5, cutoff=0.5)


def count_layers(source: str) -> int:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - no network, gated model, broken config: all are the user's to fix
        raise ModelError(f"cannot read the config of {source!r}: {e}") from e
    config = getattr(config, "text_config", None) or config
    return int(config.num_hidden_layers)


def hook_layer(hook: str) -> int | None:
    """The block a hook belongs to; None for hooks outside the blocks (embeddings, final norm)."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    return int(m.group(1)) if m else None


def after_blocks(hooks: list[str]) -> bool:
    """Whether a hook lies past every block (e.g. ln_final.hook_normalized): the whole model must run."""
    return any(hook_layer(h) is None and not h.startswith("hook_") for h in hooks)


def layers_needed(hooks: list[str], total: int) -> int:
    """Blocks to build and run for `hooks`: up to the deepest one (all of them for a hook past the blocks)."""
    if after_blocks(hooks):
        return total
    return max([hook_layer(h) for h in hooks if hook_layer(h) is not None], default=0) + 1


def load_model(model: str, hooks: list[str], *, device: str = "cpu", dtype: str = "float32",
               n_layers: int | None = None) -> LoadedModel:
    """Load `model` with only the layers up to the deepest of `hooks` (or `n_layers` layers when given)."""
    source = resolve_source(model)
    total = count_layers(source)
    for hook in hooks:
        if (hook_layer(hook) or 0) >= total:
            raise ModelError(f"layer {hook_layer(hook)} (hook {hook}) is out of range: {model} has {total} layers "
                             f"(0 to {total - 1})")
    built = n_layers if n_layers is not None else layers_needed(hooks, total)
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display is the one that matters

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        bridge = TransformerBridge.boot_transformers(
            source, tokenizer=tokenizer, device=device, dtype=DTYPES[dtype],
            hf_config_overrides={"num_hidden_layers": built} if built < total else None)
    except Exception as e:  # noqa: BLE001 - surface the loader's reason, without a traceback
        raise ModelError(f"cannot load {model!r} ({source}): {type(e).__name__}: {e}") from e
    bridge.eval()
    missing = [h for h in hooks if h not in bridge.hook_dict]
    if missing:
        names = list(bridge.hook_dict)
        close = difflib.get_close_matches(missing[0], names, n=5, cutoff=0.6)
        raise ModelError(f"hook {missing[0]!r} does not exist in {model}."
                         + (f" Close matches: {', '.join(close)}." if close else ""))
    return LoadedModel(bridge, tokenizer, source, total, built, dtype)


def run_hooks(loaded: LoadedModel, tokens_BT: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """One forward pass, stopped after the deepest hook; returns each hook's activations [B, T, D]."""
    # stopping after the deepest hook's block skips the final norm and the unembedding
    stop = None if after_blocks(hooks) else layers_needed(hooks, loaded.n_layers_built)
    with torch.inference_mode():
        _, cache = loaded.bridge.run_with_cache(tokens_BT, names_filter=list(hooks), stop_at_layer=stop,
                                                return_cache_object=False)
    return {h: cache[h] for h in hooks}
