"""The checks every config field goes through, with one message format: the flag, the value, what is wrong
and what would be valid (`--batch-size 0: must be a positive integer`). The config dataclasses call them in
`__post_init__`, so the CLI and the Python API refuse the same values, before any work."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from sae_cache.sae_common.errors import ConfigError

STORED_DTYPES = ("bfloat16", "float16", "float32", "int8")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPRESSIONS = ("zstd", "lz4", "none")
INPUT_NORMS = ("none", "standardize", "scalar")
TRAIN_DTYPES = ("float32", "bfloat16")
PARALLEL_MODES = ("auto", "sweep", "data")  # sae train under torchrun
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
MAX_SEED = 2**32 - 1  # every generator the seed reaches (numpy's, torch's, datasets' shuffle) takes it
# Fields whose flag is not --<field name with dashes> (the list fields have singular, repeatable flags).
FLAGS = {"layers": "--layer", "archs": "--arch", "ks": "--k", "dict_sizes": "--dict-size", "expansions": "--expansion",
         "l1_coeffs": "--l1-coeff", "l0_coeffs": "--l0-coeff", "lrs": "--lr", "saes": "SAE_DIR"}


def flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def bad(name: str, value: Any, problem: str) -> ConfigError:
    if isinstance(value, float):
        shown = f"{value:g}"  # as typed: 0.001, not 0.0010000000000000002
    else:
        shown = repr(value) if isinstance(value, str) and (not value.strip() or " " in value) else str(value)
    return ConfigError(f"{flag(name)} {shown}: {problem}")


def check_int(name: str, value: Any, low: int = 1, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer of at least {low}")
        raise bad(name, value, f"must be {what}" + (f" no larger than {high}" if high is not None else ""))


def check_float(name: str, value: Any, low: float, *, above: bool = False, high: float = math.inf) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if above else value >= low) and value <= high)
    if not ok:
        span = {(True, False): f"above {low:g}", (False, False): f"of at least {low:g}",
                (True, True): f"above {low:g} and at most {high:g}", (False, True): f"from {low:g} to {high:g}"}
        raise bad(name, value, f"must be a number {span[above, high < math.inf]}")


def check_choice(name: str, value: Any, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ConfigError(f"{flag(name)}: unknown {what} {value!r}; use one of {', '.join(choices)}")


def check_text(name: str, value: Any, optional: bool = False) -> None:
    if not (value is None and optional) and (not isinstance(value, str) or not value.strip()):
        raise bad(name, value, "must be a non-empty string")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise bad(name, value, "must be true or false")


def check_device(name: str, value: Any) -> None:
    if not isinstance(value, str) or not DEVICE.fullmatch(value):
        raise bad(name, value, "use auto, cpu, cuda or cuda:N")


def check_list(cfg: Any, name: str, check_one: Callable[[str, Any], None], required: bool = True) -> tuple:
    """A list field: stored as a tuple (lists from Python callers too), each value checked, none repeated
    (a repeat would train or harvest the same thing twice)."""
    values = getattr(cfg, name)
    if isinstance(values, (str, bytes)) or not isinstance(values, (tuple, list)):
        raise bad(name, values, "must be a list of values")
    values = tuple(values)
    object.__setattr__(cfg, name, values)  # frozen dataclass: __post_init__ is the one place that may set it
    if required and not values:
        raise ConfigError(f"{flag(name)}: give at least one value")
    for value in values:
        check_one(name, value)
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise bad(name, repeated[0], "given twice")
    return values


def check_output_dir(path: str | Path, name: str = "out") -> None:
    """A directory a command will create or write into: not a file, and its nearest existing ancestor a
    writable directory. Checked before any work, so nothing is computed only to fail at the end."""
    path = Path(path)
    existing = next(p for p in [path, *path.parents] if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise bad(name, path, f"{existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise bad(name, path, f"{existing} is not writable; choose another {flag(name)}")


WANDB_FORBIDDEN = '/\\#?%:'  # characters wandb refuses in a project name (it also caps the length at 128)


def check_wandb_project(value: Any) -> None:
    check_text("wandb", value, optional=True)
    if value is not None and (len(value) > 128 or any(c in WANDB_FORBIDDEN for c in value)):
        raise bad("wandb", value, f"a wandb project name has at most 128 characters and none of {WANDB_FORBIDDEN}")
