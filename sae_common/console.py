"""The one terminal every command reports to: stderr (stdout carries only the result path), and wide enough
for the tables when output goes to a log or a pipe, where rich would otherwise assume 80 columns."""

from __future__ import annotations

import os
import sys

from rich.console import Console

LOG_WIDTH = 160


def make_console() -> Console:
    """Under torchrun only rank 0 reports progress; the other ranks' consoles are quiet (their errors still reach
    stderr through click, prefixed with the rank)."""
    if os.environ.get("RANK", "0") != "0":
        return Console(stderr=True, quiet=True)
    width = None if sys.stderr.isatty() or "COLUMNS" in os.environ else LOG_WIDTH
    return Console(stderr=True, soft_wrap=True, width=width)
