"""A sweep: the SAEs one training run trains together, from the list fields of a TrainConfig.

Each architecture varies only over the hyper-parameters its registry entry sweeps (`Arch.sweeps`: k for the
k-architectures, the L1 coefficient for relu, the L0 coefficient for jumprelu), so `--arch relu,topk --k 16,32`
is 1 + 2 SAEs, not 4. Run names are `<arch>-<tag of each swept value>-<d_sae>[-lr<lr>]`. Every other TrainConfig
field that is also an SAEConfig field (input_norm, dead_tokens, group_fractions, ...) is passed to every SAE.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

from sae_cache.sae_common.architectures import ARCHS
from sae_cache.sae_common.config import TrainConfig
from sae_cache.sae_common.errors import ConfigError
from sae_cache.sae_common.sae import SAEConfig


@dataclass(frozen=True)
class SweepEntry:
    name: str  # directory name of this SAE in the run
    sae: SAEConfig
    lr: float


def _fmt(x: float) -> str:
    return f"{x:g}"


def shared_settings(cfg: TrainConfig) -> dict:
    """The TrainConfig fields that every SAE of the run gets as they are: those named as SAEConfig fields."""
    sae_fields = {f.name for f in fields(SAEConfig)}
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
        grids = [[(s.field, value, f"{s.tag}{_fmt(value)}") for value in getattr(cfg, s.values)]
                 for s in ARCHS[arch].sweeps]
        for variant in itertools.product(*grids):
            swept = {name: value for name, value, _ in variant}
            if ARCHS[arch].uses_k and swept["k"] >= d_sae:
                raise ConfigError(f"--k {swept['k']}: must be smaller than the dictionary size {d_sae}")
            name = "-".join([arch, *(tag for _, _, tag in variant), str(d_sae)])
            name += f"-lr{_fmt(lr)}" if len(cfg.lrs) > 1 else ""
            sae = SAEConfig(d_in=d_in, d_sae=d_sae, arch=arch, **shared, **swept)
            entries.append(SweepEntry(name, sae, lr))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"the sweep repeats an SAE: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    return entries
