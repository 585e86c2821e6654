"""`FeaturesConfig`, the settings of `sae features` (the feature browser): defaults and checks in one place, as
for the other commands (sae_common/config.py). Kept free of torch so the CLI can read it at import time."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sae_cache.sae_common.checks import check_device, check_int, check_list, check_text

MAX_TOP = 1000  # contexts per latent: each one is ~16 tokens of every latent in the page


@dataclass(frozen=True)
class FeaturesConfig:
    """A feature browser: per latent of each SAE, its statistics and top-activating held-out contexts, as one
    self-contained HTML page per SAE (DESIGN.md, "Looking at latents")."""

    saes: tuple[str, ...] = ()
    """SAE directories, or training run directories (all their SAEs); default: every SAE of the newest run
    under ./cache/runs."""
    cache: str | None = None
    """The cache the SAEs were trained on, if it moved (default: the one their records name)."""
    model: str | None = None
    """Model whose tokenizer decodes the contexts and whose unembedding gives the logit lens (default: the one
    the cache was harvested with)."""
    top: int = 20
    """Top-activating contexts kept per latent (one per context row: the row's highest activation)."""
    tokens: int | None = None
    """Held-out tokens to scan, BOS included, rounded down to whole contexts (default: all of them)."""
    batch_size: int = 32
    """Contexts per step of the scan. Memory per step: tokens × latents × 4 bytes for the largest SAE."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N."""
    out: str | None = None
    """Directory for the pages, <out>/<SAE name>.html (default: features.html in each SAE's directory)."""

    def __post_init__(self) -> None:
        check_list(self, "saes", check_text, required=False)
        check_text("cache", self.cache, optional=True)
        check_text("model", self.model, optional=True)
        check_int("top", self.top, high=MAX_TOP)
        if self.tokens is not None:
            check_int("tokens", self.tokens)
        check_int("batch_size", self.batch_size)
        check_device("device", self.device)
        check_text("out", self.out, optional=True)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
