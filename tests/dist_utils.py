"""Running commands under torchrun in tests: 2 processes on the CPU with gloo, as CI's 2-core machine allows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SAE = [sys.executable, "-m", "sae_cache.sae_common.cli"]


def torchrun(args: list, *, nproc: int = 2, timeout: float = 300, env: dict | None = None,
             cwd: Path | None = None, module: str = "sae_cache.sae_common.cli") -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m <module> args...`, output captured. --standalone picks a free
    port, so tests never collide; one thread per rank, so two ranks fit two cores."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--monitor-interval=0.5", "-m", module, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)


def single(args: list, *, timeout: float = 300, env: dict | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The same command in one plain process (the reference a torchrun run must equal)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([*SAE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd)
