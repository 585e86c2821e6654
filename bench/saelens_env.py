"""SAELens's own virtualenv for the side-by-side benchmarks: built once, never touching the project's."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

DEFAULT_VENV = Path(tempfile.gettempdir()) / "sae-lens-venv"


def saelens_python(venv: Path) -> Path | None:
    """The SAELens virtualenv's python, building the virtualenv first if missing; None (and why) if it can't."""
    python = venv / "bin" / "python"
    if python.exists():
        return python
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"  # never an unpinned torch: it pulls GBs of CUDA
    fresh = not venv.exists()
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", torch_pin], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "sae-lens", torch_pin], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"skipping SAELens: cannot build its virtualenv at {venv}: {e}", file=sys.stderr)
        if fresh:  # a half-built one would pass for built next time
            shutil.rmtree(venv, ignore_errors=True)
        return None
    return python
