"""Configuration dataclasses: the one place where defaults live and where every value is checked.

The CLI options read their defaults here, and `Config(**options)` checks each field in `__post_init__` before a
command does any work, so the Python API refuses exactly what the command line refuses. Every message starts
with the flag and the value (`--batch-size 0: must be a positive integer`). Checks that need the model, the
cache or the file system run at the start of each command, on the cheapest look at them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Callable

from sae_cache.sae_common.checks import (COMPRESSIONS, INPUT_NORMS, MAX_SEED, MODEL_DTYPES, PARALLEL_MODES,
                                         STORED_DTYPES, TRAIN_DTYPES, bad, check_bool, check_choice, check_device,
                                         check_float, check_int, check_list, check_text, check_wandb_project)
from sae_cache.sae_common.errors import ConfigError
from sae_cache.sae_common.field_docs import default
from sae_cache.sae_common.sae_config import SWEEPS, SAEConfig

DEFAULT_LAYER = 12  # with a hook kind and no --layer
DEFAULT_EXPANSION = 8  # without --dict-size

HOOK_KINDS = {
    "resid_post": "blocks.{layer}.hook_resid_post",
    "resid_pre": "blocks.{layer}.hook_resid_pre",  # what the BatchTopK paper used
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "attn_out": "blocks.{layer}.hook_attn_out",
}

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}


def parse_count(text: str | int) -> int:
    """'10M' -> 10_000_000, '1B' -> 1_000_000_000, '2.5k' -> 2500, '4096' -> 4096. Only the syntax: whether a
    count may be 0 is the config's to say, with the flag's name."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", str(text).replace("_", ""))
    if not m:
        raise ConfigError(f"{text!r} is not a count; use a number with an optional K, M or B suffix (e.g. 10M, 1B)")
    value = float(m.group(1)) * _SUFFIXES[m.group(2).upper()]
    if value != int(value):
        raise ConfigError(f"{text!r} is not a whole number")
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


def _own_layer(hook: str) -> tuple[int, ...]:
    """The block of a full hook name, as model.hook_layer says (that module loads torch; this one must not)."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    return (int(m.group(1)),) if m else ()


@dataclass(frozen=True)
class HarvestConfig:
    """Everything that decides what a harvest writes. Recorded in full in the cache's attributes."""

    model: str = "gemma-2-2b"
    """transformer-lens model name (hub, needs network) or a local Hugging Face checkpoint directory."""
    layers: tuple[int, ...] = ()
    """Layers to harvest; all hooks come from one forward pass. Default: 12 with a hook kind; a full hook name
    brings its own layer (and another --layer beside it is refused rather than ignored)."""
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
    """Seed of the --shuffle-buffer document shuffle."""
    dtype: str = "bfloat16"
    """Stored dtype: bfloat16, float16, float32, or int8 (codes and a float32 scale per token, read back as float32
    by train and eval; README.md, "The 8-bit cache")."""
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

    def __post_init__(self) -> None:
        check_text("model", self.model)
        if not isinstance(self.hook, str) or (self.hook not in HOOK_KINDS and "." not in self.hook):
            raise ConfigError(f"--hook: unknown hook {self.hook!r}; use one of {', '.join(HOOK_KINDS)} or a full "
                              "transformer-lens hook name such as blocks.12.hook_resid_post")
        layers = check_list(self, "layers", lambda n, v: check_int(n, v, 0), required=False)
        if self.hook in HOOK_KINDS:
            object.__setattr__(self, "layers", layers or (DEFAULT_LAYER,))
        else:
            own = _own_layer(self.hook)
            if layers and layers != own:
                raise bad("layers", ",".join(map(str, layers)), f"--hook {self.hook} is a full hook name and names "
                          f"its own layer; leave out --layer, or give a hook kind (e.g. --hook resid_post --layer N)")
            object.__setattr__(self, "layers", own)
        for name in ("dataset", "split", "text_column"):
            check_text(name, getattr(self, name))
        check_int("context_size", self.context_size, 2)  # BOS and at least one token of text
        check_int("tokens", self.tokens)
        if self.tokens < self.context_size:
            raise bad("tokens", self.tokens, f"less than one context of {self.context_size} tokens (--context-size)")
        check_bool("prepend_bos", self.prepend_bos)
        check_int("shuffle_buffer", self.shuffle_buffer, 0)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_choice("dtype", self.dtype, STORED_DTYPES, "dtype")
        check_choice("model_dtype", self.model_dtype, MODEL_DTYPES, "model dtype")
        check_choice("compression", self.compression, COMPRESSIONS, "compression")
        if self.rows_per_shard is not None:
            check_int("rows_per_shard", self.rows_per_shard)
            if self.rows_per_shard % self.context_size:
                raise bad("rows_per_shard", self.rows_per_shard, f"must be a multiple of --context-size "
                          f"{self.context_size} (shards hold whole contexts)")
        check_int("batch_size", self.batch_size)
        check_device("device", self.device)

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in self.EXECUTION_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


def sae_default(name: str) -> Any:
    """SAEConfig's default for `name`: TrainConfig's SAE settings take it rather than restating it."""
    return default(SAEConfig, name)


# SAEConfig fields that are not `sae train` flags: the shape comes from the cache and --dict-size/--expansion,
# the architecture and its swept values from the sweep's list flags (--arch, --k, --l1-coeff, --l0-coeff).
SAE_FIELDS_FROM_SWEEP = ("d_in", "d_sae", "arch", "k", "l1_coeff", "l0_coeff")
# SAE settings that became flags after runs had been trained: a run directory's stored identity may lack them,
# and a run that leaves them at their defaults keeps the identity (and default run directory) it had before.
LATER_SAE_FIELDS = ("aux_k", "aux_coeff", "aux_normalised", "bandwidth", "jumprelu_init_threshold", "stats_window",
                    "zipf_exponent", "zipf_underuse_scale", "apply_b_dec_to_input")



@dataclass(frozen=True)
class TrainConfig:
    """A training run: a sweep (the cartesian product of the list fields an architecture uses), trained in
    ONE pass over the cache. Defaults follow the BatchTopK paper. Recorded in full beside every SAE."""

    cache: str | None = None
    """Activation cache to read (default: the newest under ./cache)."""
    hook: str | None = None
    """Hook to train on, when the cache has several."""
    archs: tuple[str, ...] = ("batchtopk",)
    """Architectures: relu, topk, batchtopk, jumprelu, feature_choice, mutual_choice, matryoshka_batchtopk."""
    ks: tuple[int, ...] = (sae_default("k"),)
    """Active latents per token (k-architectures; BatchTopK paper: 16, 32, 64)."""
    dict_sizes: tuple[int, ...] = ()
    """Dictionary sizes (latents); default: d_model x --expansion."""
    expansions: tuple[int, ...] = ()
    """Dictionary size as a multiple of d_model; default 8 when --dict-size is not given (beside --dict-size it
    is refused rather than ignored)."""
    l1_coeffs: tuple[float, ...] = (sae_default("l1_coeff"),)
    """relu: L1 coefficients."""
    l0_coeffs: tuple[float, ...] = (sae_default("l0_coeff"),)
    """jumprelu: L0 coefficients."""
    lrs: tuple[float, ...] = (3e-4,)
    """Adam learning rates (BatchTopK paper: 3e-4, betas (0.9, 0.99))."""
    batch_size: int = 4096
    """Tokens per training batch (BatchTopK paper: 4096)."""
    tokens: int | None = None
    """Training tokens (default: one pass over the cache's training rows); more than the cache takes epochs."""
    seed: int = 0
    """Seed of the SAEs' initialisation and of the loader's shuffle."""
    # The other SAE settings (train/sweep.py passes them on by name): their defaults and help are SAEConfig's,
    # so each has one default, stated there. Those of sae_config.SWEEPS take one value or a list of them
    # (stored as a tuple; group_fractions: one tuple of fractions or a list of such tuples).
    input_norm: str = sae_default("input_norm")
    dead_tokens: int = sae_default("dead_tokens")
    group_fractions: tuple[float, ...] | tuple[tuple[float, ...], ...] = sae_default("group_fractions")
    aux_k: int | tuple[int, ...] = sae_default("aux_k")
    aux_coeff: float | tuple[float, ...] = sae_default("aux_coeff")
    aux_normalised: bool = sae_default("aux_normalised")
    bandwidth: float | tuple[float, ...] = sae_default("bandwidth")
    jumprelu_init_threshold: float | tuple[float, ...] = sae_default("jumprelu_init_threshold")
    stats_window: int = sae_default("stats_window")
    zipf_exponent: float | None = sae_default("zipf_exponent")
    zipf_underuse_scale: float | tuple[float, ...] = sae_default("zipf_underuse_scale")
    apply_b_dec_to_input: bool = sae_default("apply_b_dec_to_input")
    holdout_fraction: float = 0.02
    """Fraction of the cache never trained on; evaluation reads it. Contexts spread over the whole cache (a tail of
    whole chunks in caches harvested before the spread rule; see the README's cache format)."""
    checkpoint_every: int = 10_000_000
    """Tokens between checkpoints (also written at the end and on Ctrl-C)."""
    log_every: int = 10
    """Batches between metric records (history.jsonl) and table refreshes."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N."""
    dtype: str = "float32"
    """Compute dtype: float32, or bfloat16 (autocast matmuls; float32 master weights, Adam state and losses). bfloat16
    is for GPUs: on a CPU without bf16 matmul units it ran 230x slower (bench/train_bench.py --dtype bfloat16)."""
    shuffle_tokens: int = 131072
    """Rows in the loader's shuffle window."""
    parallel: str = "auto"
    """Under torchrun: sweep (the sweep's SAEs divided among the ranks, each rank reading every batch; no
    communication per step), data (each batch split across the ranks; gradients, selections, thresholds and
    dead-latent counters over the global batch; for SAEs too wide for one GPU), or auto: sweep when the sweep has
    at least as many SAEs as ranks, else data. One process ignores it."""

    wandb: str | None = None
    """Weights & Biases project: log each SAE's metrics as a run of its own, the sweep as their group (needs the
    wandb extra: pip install 'sae-cache[wandb]')."""

    # May change when resuming: they change how the run is executed or reported, not what it computes.
    EXECUTION_FIELDS = ("tokens", "checkpoint_every", "log_every", "device", "cache", "parallel", "wandb")

    def __post_init__(self) -> None:
        from sae_cache.sae_common.architectures import ARCHS  # here, not at import: it loads torch

        check_text("cache", self.cache, optional=True)
        check_text("hook", self.hook, optional=True)
        check_list(self, "archs", lambda n, v: check_choice(n, v, tuple(ARCHS), "architecture"))
        check_list(self, "ks", check_int)
        sizes = check_list(self, "dict_sizes", check_int, required=False)
        expansions = check_list(self, "expansions", check_int, required=False)
        if sizes and expansions:
            raise bad("expansions", ",".join(map(str, expansions)), "--dict-size already sets the dictionary size; "
                      "give one of --dict-size and --expansion")
        object.__setattr__(self, "expansions", () if sizes else expansions or (DEFAULT_EXPANSION,))
        check_list(self, "l1_coeffs", lambda n, v: check_float(n, v, 0))
        check_list(self, "l0_coeffs", lambda n, v: check_float(n, v, 0))
        check_list(self, "lrs", lambda n, v: check_float(n, v, 0, above=True))
        check_int("batch_size", self.batch_size)
        if self.tokens is not None:
            check_int("tokens", self.tokens)
            if self.tokens < self.batch_size:
                raise bad("tokens", self.tokens, f"fewer than one batch of {self.batch_size} tokens (--batch-size)")
        check_int("seed", self.seed, 0, MAX_SEED)
        check_choice("input_norm", self.input_norm, INPUT_NORMS, "input norm")
        check_int("dead_tokens", self.dead_tokens)
        self._check_group_fractions()
        _check_sweep(self, "aux_k", check_int)
        _check_sweep(self, "aux_coeff", lambda n, v: check_float(n, v, 0))
        check_bool("aux_normalised", self.aux_normalised)
        _check_sweep(self, "bandwidth", lambda n, v: check_float(n, v, 0, above=True))
        _check_sweep(self, "jumprelu_init_threshold", lambda n, v: check_float(n, v, 0, above=True))
        check_int("stats_window", self.stats_window)
        if self.zipf_exponent is not None:  # None: aux_zipf_loss fits the exponent
            check_float("zipf_exponent", self.zipf_exponent, 0, above=True)
        _check_sweep(self, "zipf_underuse_scale", lambda n, v: check_float(n, v, 0, high=1))
        check_bool("apply_b_dec_to_input", self.apply_b_dec_to_input)
        check_float("holdout_fraction", self.holdout_fraction, 0, high=0.5)  # holdout_start never holds out more
        check_int("checkpoint_every", self.checkpoint_every)
        check_int("log_every", self.log_every)
        check_device("device", self.device)
        check_choice("dtype", self.dtype, TRAIN_DTYPES, "training dtype")
        check_int("shuffle_tokens", self.shuffle_tokens)
        check_choice("parallel", self.parallel, PARALLEL_MODES, "parallel mode")
        check_wandb_project(self.wandb)

    def _check_group_fractions(self) -> None:
        sets = self.group_fractions
        if isinstance(sets, (tuple, list)) and all(isinstance(v, (int, float)) for v in sets):
            sets = (sets,)  # one set of fractions, as before they were sweepable
        if not isinstance(sets, (tuple, list)) or not all(isinstance(v, (tuple, list)) for v in sets):
            raise bad("group_fractions", sets, "must be a list of fractions, or a list of such lists to sweep")
        object.__setattr__(self, "group_fractions", tuple(tuple(v) for v in sets))
        for i, fractions in enumerate(self.group_fractions):
            for value in fractions:  # not check_list: equal groups repeat a fraction on purpose (1/16, 1/16, ...)
                check_float("group_fractions", value, 0, above=True, high=1)
            shown = ",".join(f"{v:g}" for v in fractions)
            if not fractions or abs(sum(fractions) - 1) > 1e-6:
                raise bad("group_fractions", shown, f"must sum to 1 (they sum to {sum(fractions):g}), e.g. "
                          "1/16,1/16,1/8,1/4,1/2")
            if fractions in self.group_fractions[:i]:
                raise bad("group_fractions", shown, "given twice")

    def identity(self) -> dict[str, Any]:
        """What a resume must match. The later SAE settings are in it only when not at their default, so a run
        that leaves them alone hashes to the run directory it had before they were flags."""
        return {k: v for k, v in self.to_dict().items() if k not in self.EXECUTION_FIELDS
                and not (k in LATER_SAE_FIELDS and v == sae_default(k))}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready. A sweepable SAE setting given one value is stored as that value (not a list of one), as
        before it was sweepable: the identity, and so the default run directory, stay what they were."""
        d = asdict(self)
        for s in SWEEPS:
            if s.values == s.field and len(d[s.field]) == 1:
                d[s.field] = d[s.field][0]
        return {k: _listed(v) for k, v in d.items()}


def _listed(value: Any) -> Any:
    return [_listed(v) for v in value] if isinstance(value, tuple) else value


def _check_sweep(cfg: TrainConfig, name: str, check_one: Callable[[str, Any], None]) -> None:
    """A sweepable setting: one value, or a list of them to sweep; stored as a tuple either way."""
    if not isinstance(getattr(cfg, name), (tuple, list)):
        object.__setattr__(cfg, name, (getattr(cfg, name),))
    check_list(cfg, name, check_one)


@dataclass(frozen=True)
class EvalConfig:
    """An evaluation: SAEs spliced back into the model on held-out tokens (DESIGN.md, "Metrics").
    Recorded in full in every eval.json and eval_summary.json."""

    saes: tuple[str, ...] = ()
    """SAE directories, or training run directories (all their SAEs); default: every SAE of the newest run
    under ./cache/runs."""
    cache: str | None = None
    """The cache the SAEs were trained on, if it moved (default: the one their records name)."""
    model: str | None = None
    """Model to splice into (default: the one the cache was harvested with, loaded the same way)."""
    model_dtype: str = "auto"
    """Dtype the model runs in: auto (the dtype the cache was harvested with), float32, bfloat16, float16."""
    dataset: str | None = None
    """Evaluate on text beyond the harvest instead of the held-out rows: a hub dataset id or local files, as `sae
    harvest --dataset` takes them, packed as the cache's harvest packed its text."""
    split: str | None = None
    """--dataset's split (default: train)."""
    text_column: str | None = None
    """--dataset's text column (default: text)."""
    tokens: int | None = None
    """Tokens to evaluate on, BOS included, rounded down to whole contexts (default: every held-out token; with
    --dataset, as many as are held out, or all the dataset holds if less). Held-out ones are picked evenly."""
    batch_size: int = 16
    """Contexts per forward pass. In --batch-mode it is also the batch a BatchTopK selection sees."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N."""
    include_bos: bool = False
    """Also splice at BOS positions and count them in every average (default: BOS keeps its activation and
    is left out, as the BOS activation is an outlier that SAEs are not meant to reconstruct)."""
    batch_mode: bool = False
    """Encode batchtopk, feature_choice and mutual_choice SAEs with their batch-level training selection
    instead of their inference threshold (BatchTopK paper, §3)."""
    out: str | None = None
    """Where every output goes: eval_summary.json, plots/ and <SAE name>/eval.json (default: the SAEs' run
    directory, with eval.json beside each SAE)."""
    wandb: str | None = None
    """Weights & Biases project: log the table and the plots as a run (needs the wandb extra: pip install
    'sae-cache[wandb]')."""

    def __post_init__(self) -> None:
        check_list(self, "saes", check_text, required=False)
        check_text("cache", self.cache, optional=True)
        check_text("model", self.model, optional=True)
        check_choice("model_dtype", self.model_dtype, MODEL_DTYPES, "model dtype")
        check_text("dataset", self.dataset, optional=True)
        for name, value in (("split", "train"), ("text_column", "text")):
            check_text(name, getattr(self, name), optional=True)
            if self.dataset is None and getattr(self, name) is not None:
                raise bad(name, getattr(self, name), "applies to the text of --dataset, and no --dataset is given")
            if self.dataset is not None and getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.tokens is not None:
            check_int("tokens", self.tokens)
        check_int("batch_size", self.batch_size)
        check_device("device", self.device)
        check_bool("include_bos", self.include_bos)
        check_bool("batch_mode", self.batch_mode)
        check_text("out", self.out, optional=True)
        check_wandb_project(self.wandb)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
