"""A sweep: the SAEs one training run trains together, from the list fields of a TrainConfig.

Each architecture varies only over the hyper-parameters it uses (k for the k-architectures, the L1
coefficient for relu, the L0 coefficient for jumprelu), so `--arch relu,topk --k 16,32` is 1 + 2 SAEs, not 4.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

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


def expand(cfg: TrainConfig, d_in: int) -> list[SweepEntry]:
    """Every SAE of the run, in a fixed order (the order of the flags)."""
    for arch in cfg.archs:
        if arch not in ARCHS:
            raise ConfigError(f"unknown architecture {arch!r}; valid ones: {', '.join(ARCHS)}")
    sizes = list(cfg.dict_sizes) or [d_in * e for e in cfg.expansions]
    entries = []
    for arch, d_sae, lr in itertools.product(cfg.archs, sizes, cfg.lrs):
        if arch == "relu":
            variants = [({"l1_coeff": c}, f"l1_{_fmt(c)}") for c in cfg.l1_coeffs]
        elif arch == "jumprelu":
            variants = [({"l0_coeff": c}, f"l0_{_fmt(c)}") for c in cfg.l0_coeffs]
        else:
            variants = [({"k": k}, f"k{k}") for k in cfg.ks]
        for extra, tag in variants:
            if "k" in extra and extra["k"] >= d_sae:
                raise ConfigError(f"k={extra['k']} must be smaller than the dictionary size {d_sae}")
            name = f"{arch}-{tag}-{d_sae}" + (f"-lr{_fmt(lr)}" if len(cfg.lrs) > 1 else "")
            sae = SAEConfig(d_in=d_in, d_sae=d_sae, arch=arch, input_norm=cfg.input_norm,
                            dead_tokens=cfg.dead_tokens, **extra)
            entries.append(SweepEntry(name, sae, lr))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"the sweep repeats an SAE: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    return entries
