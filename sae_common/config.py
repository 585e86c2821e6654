"""Configuration dataclasses: the one place where defaults live. The CLI options read their defaults here."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from sae_common.errors import ConfigError

HOOK_KINDS = {
    "resid_post": "blocks.{layer}.hook_resid_post",
    "resid_pre": "blocks.{layer}.hook_resid_pre",  # what the BatchTopK paper used
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "attn_out": "blocks.{layer}.hook_attn_out",
}

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}


def parse_count(text: str | int) -> int:
    """'10M' -> 10_000_000, '1B' -> 1_000_000_000, '2.5k' -> 2500, '4096' -> 4096."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", str(text).replace("_", ""))
    if not m:
        raise ConfigError(f"{text!r} is not a count; use a number with an optional K, M or B suffix (e.g. 10M, 1B)")
    value = float(m.group(1)) * _SUFFIXES[m.group(2).upper()]
    if value != int(value) or value <= 0:
        raise ConfigError(f"{text!r} must be a positive whole number of tokens")
    return int(value)


def hook_names(layers: tuple[int, ...], hook: str) -> list[str]:
    """--layer/--hook -> transformer-lens hook names. A full hook name in --hook is used as it is."""
    if hook in HOOK_KINDS:
        if not layers:
            raise ConfigError(f"--hook {hook} needs at least one --layer")
        return [HOOK_KINDS[hook].format(layer=layer) for layer in layers]
    if "." in hook:
        return [hook]
    raise ConfigError(f"unknown hook {hook!r}; use one of {', '.join(HOOK_KINDS)} or a full transformer-lens hook "
                     "name such as blocks.12.hook_resid_post")


@dataclass(frozen=True)
class HarvestConfig:
    """Everything that decides what a harvest writes. Recorded in full in the cache's attributes."""

    model: str = "gemma-2-2b"
    """transformer-lens model name (hub, needs network) or a local Hugging Face checkpoint directory."""
    layers: tuple[int, ...] = (12,)
    """Layers to harvest; all hooks come from one forward pass."""
    hook: str = "resid_post"
    """resid_post, resid_pre, resid_mid, mlp_out, attn_out, or a full transformer-lens hook name."""
    dataset: str = "monology/pile-uncopyrighted"
    """Hub dataset id (streamed) or local files: .txt/.jsonl/.json/.parquet, a folder or a glob."""
    split: str = "train"
    text_column: str = "text"
    tokens: int = 10_000_000
    """Tokens to harvest (rounded down to whole contexts)."""
    context_size: int = 128
    """Tokens per context, BOS included (the BatchTopK paper used 128)."""
    prepend_bos: bool = True
    """Start every context with the tokenizer's BOS token (documents are packed, separated by EOS)."""
    shuffle_buffer: int = 0
    """Documents shuffled in a streaming buffer of this size (0: dataset order). Seeded by --seed."""
    seed: int = 0
    dtype: str = "bfloat16"
    """Stored dtype: bfloat16, float16 or float32."""
    model_dtype: str = "auto"
    """Dtype the model runs in: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16."""
    compression: str = "zstd"
    """zstd (Blosc zstd level 1, byte shuffle), lz4, or none."""
    rows_per_shard: int | None = None
    """Rows per shard (a multiple of context_size); default: shards of about 256 MB."""
    batch_size: int = 32
    """Contexts per forward pass. May change on resume (changes only float rounding)."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N. May change on resume."""

    # Fields that may differ when resuming: they change how fast, not what is written (up to float rounding).
    EXECUTION_FIELDS = ("batch_size", "device")

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in self.EXECUTION_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


def field_doc(cls: type, name: str) -> str:
    """The docstring under a dataclass field (for --help), read from the source once."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                return " ".join(nxt.value.value.split())
    return ""


def default(cls: type, name: str) -> Any:
    return next(f.default for f in fields(cls) if f.name == name)

