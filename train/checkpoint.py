"""Training checkpoints: every SAE's weights, buffers and Adam state, plus where the data stream is.

No pickle: tensors go to safetensors, everything else to JSON. A checkpoint is `<sae>/checkpoint-<batch>.safetensors`
for every SAE, then `state.json` naming that batch, written atomically last; older checkpoint files are removed
only after it. A crash at any point leaves the previous complete checkpoint as the one `state.json` names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE = "state.json"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _flatten(sae: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {f"sae.{k}": v.detach().contiguous() for k, v in sae.state_dict().items()}
    opt_state = opt.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"opt.{index}.{key}"] = value.detach().contiguous() if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": opt_state["param_groups"]}


def save_checkpoint(run_dir: Path, members: list[Any], batches_done: int, extra: dict[str, Any]) -> None:
    """Write every member's state at `batches_done`, then point state.json at it, then drop older files."""
    for m in members:
        tensors, meta = _flatten(m.sae, m.opt)
        file = run_dir / m.name / f"checkpoint-{batches_done}.safetensors"
        tmp = file.with_name(file.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"optimizer": json.dumps(meta), "batches_done": str(batches_done)})
        os.replace(tmp, file)
    write_json_atomic(run_dir / STATE, {**extra, "batches_done": batches_done, "saes": [m.name for m in members]})
    for m in members:
        for old in (run_dir / m.name).glob("checkpoint-*.safetensors"):
            if old.name != f"checkpoint-{batches_done}.safetensors":
                old.unlink()


def read_state(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / STATE
    return json.loads(path.read_text()) if path.is_file() else None


def load_checkpoint(run_dir: Path, members: list[Any], batches_done: int) -> None:
    """Restore every member in place from the checkpoint at `batches_done`."""
    from safetensors import safe_open

    for m in members:
        file = run_dir / m.name / f"checkpoint-{batches_done}.safetensors"
        tensors = load_file(str(file))
        with safe_open(str(file), "pt") as f:
            meta = json.loads(f.metadata()["optimizer"])
        m.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        m.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
