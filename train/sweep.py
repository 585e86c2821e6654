"""A sweep: the SAEs one training run trains together, from the list fields of a TrainConfig.

Each architecture varies only over the sweepable settings its registry entry uses (`Arch.sweeps`, from
sae_config.SWEEPS: k for the k-architectures, the L1 coefficient for relu, aux_k for those with an auxiliary
loss, ...), so `--arch relu,topk --k 16,32` is 1 + 2 SAEs, not 4, and `--aux-k 256,512` doubles topk but not
relu. Run names are `<arch>-<tag of each named value>-<d_sae>[-lr<lr>]`: k, l1 and l0 always, any other
setting only when the run sweeps several values of it. Every other TrainConfig field that is also an SAEConfig
field (input_norm, dead_tokens, ...) is passed to every SAE.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

from sae_cache.sae_common.architectures import ARCHS
from sae_cache.sae_common.config import TrainConfig
from sae_cache.sae_common.errors import ConfigError
from sae_cache.sae_common.sae import SAEConfig
from sae_cache.sae_common.sae_config import SWEEPS


@dataclass(frozen=True)
class SweepEntry:
    name: str  # directory name of this SAE in the run
    sae: SAEConfig
    lr: float


def _fmt(value: float | tuple[float, ...]) -> str:
    return "_".join(map(_fmt, value)) if isinstance(value, tuple) else f"{value:g}"


def shared_settings(cfg: TrainConfig) -> dict:
    """The TrainConfig fields that every SAE of the run gets as they are: the SAEConfig fields not swept."""
    sae_fields = {f.name for f in fields(SAEConfig)} - {s.values for s in SWEEPS}
    return {f.name: getattr(cfg, f.name) for f in fields(TrainConfig) if f.name in sae_fields}


def expand(cfg: TrainConfig, d_in: int) -> list[SweepEntry]:
    """Every SAE of the run, in a fixed order (the order of the flags)."""
    for arch in cfg.archs:
        if arch not in ARCHS:
            raise ConfigError(f"unknown architecture {arch!r}; valid ones: {', '.join(ARCHS)}")
    sizes = list(cfg.dict_sizes) or [d_in * e for e in cfg.expansions]
    shared = shared_settings(cfg)
    entries = []
    for arch, d_sae, lr in itertools.product(cfg.archs, sizes, cfg.lrs):
        uses = ARCHS[arch].sweeps
        unused = {s.field: getattr(cfg, s.values)[0] for s in SWEEPS if s not in uses}  # ignored: one SAE, not one each
        grids = [[(s, value) for value in getattr(cfg, s.values)] for s in uses]
        for variant in itertools.product(*grids):
            swept = {s.field: value for s, value in variant}
            if ARCHS[arch].uses_k and swept["k"] >= d_sae:
                raise ConfigError(f"--k {swept['k']}: must be smaller than the dictionary size {d_sae}")
            tags = [f"{s.tag}{_fmt(value)}" for s, value in variant
                    if s.always_named or len(getattr(cfg, s.values)) > 1]
            name = "-".join([arch, *tags, str(d_sae)])
            name += f"-lr{_fmt(lr)}" if len(cfg.lrs) > 1 else ""
            sae = SAEConfig(d_in=d_in, d_sae=d_sae, arch=arch, **shared, **unused, **swept)
            entries.append(SweepEntry(name, sae, lr))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"the sweep repeats an SAE: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    return entries
