"""Training checkpoints: every SAE's weights, buffers and Adam state, plus where the data stream is.

No pickle: tensors go to safetensors, everything else to JSON. A checkpoint is `<sae>/checkpoint-<batch>.safetensors`
for every SAE, then `state.json` naming that batch with the SHA-256 of each file, written atomically last; older
checkpoint files are removed only after it. A crash or a full disk at any point leaves the previous complete
checkpoint as the one `state.json` names. Resuming verifies every file against its checksum first, so a damaged
checkpoint (a flipped bit, a truncated file) is refused instead of trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save as serialize

from sae_cache.sae_common.cache_format import file_sha256
from sae_cache.sae_common.distributed import all_gather_object, broadcast_object, world
from sae_cache.sae_common.errors import UserError
from sae_cache.sae_common.files import write_atomic

STATE = "state.json"
HISTORY = "history.jsonl"  # one JSON record per log step in each SAE's directory (train/trainer.py)
STATE_FORMAT = 2  # 2: state.json records the SHA-256 of every checkpoint file


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from: damaged, truncated or missing."""


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2).encode())


def checkpoint_file(run_dir: Path, name: str, batches_done: int) -> Path:
    return run_dir / name / f"checkpoint-{batches_done}.safetensors"


def _flatten(sae: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {f"sae.{k}": v.detach().contiguous() for k, v in sae.state_dict().items()}
    opt_state = opt.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"opt.{index}.{key}"] = value.detach().contiguous() if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": opt_state["param_groups"]}


def save_checkpoint(run_dir: Path, members: list[Any], batches_done: int, extra: dict[str, Any],
                    names: list[str] | None = None) -> None:
    """Write every member's state at `batches_done`, then point state.json at it, then drop older files.

    If a write fails (a full disk), the files of this checkpoint are removed again, so they take no space,
    and the previous checkpoint stays the one state.json names, whole. Under torchrun (sweep-parallel) each
    rank writes its own members' files; rank 0 writes state.json, naming all `names` with every rank's
    checksums, only once every rank said its files are on disk; each rank drops its older files only once
    rank 0 said state.json names this batch. Every rank takes part in both collectives, failed or not.
    """
    written: list[Path] = []
    try:
        merged = _write_members(run_dir, members, batches_done, written)
        names = names or [m.name for m in members]
        _commit_state(run_dir, {**extra, "format": STATE_FORMAT, "batches_done": batches_done, "saes": names,
                                "sha256": {name: merged[name] for name in names}})  # as one process orders them
    except BaseException:
        if _named_batch(run_dir) != batches_done:
            for file in written:
                file.unlink(missing_ok=True)
        raise
    for m in members:
        for old in (run_dir / m.name).glob("checkpoint-*.safetensors"):
            if old.name != f"checkpoint-{batches_done}.safetensors":
                old.unlink()


def _write_members(run_dir: Path, members: list[Any], batches_done: int, written: list[Path]) -> dict[str, str]:
    """This rank's checkpoint files; every rank's SHA-256s, once every rank wrote its own."""
    sha256: dict[str, str] | None = {}
    failure: BaseException | None = None
    try:
        for m in members:
            tensors, meta = _flatten(m.sae, m.opt)
            file = checkpoint_file(run_dir, m.name, batches_done)
            written.append(file)
            sha256[m.name] = write_atomic(file, serialize(tensors, metadata={"optimizer": json.dumps(meta),
                                                                              "batches_done": str(batches_done)}))
    except Exception as e:  # the others still take part in the gather, then learn that this rank failed
        failure, sha256 = e, None
    reports = all_gather_object(sha256)
    if failure is not None:
        raise failure
    lost = [r for r, part in enumerate(reports) if part is None]
    if lost:
        raise CheckpointError(f"rank(s) {lost} could not write their checkpoint files (their own messages say why); "
                              "the last complete checkpoint is kept")
    return {name: digest for part in reports for name, digest in part.items()}


def _commit_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Rank 0 writes state.json; every rank learns whether it did."""
    failure: BaseException | None = None
    if world().is_main:
        try:
            write_json_atomic(run_dir / STATE, state)
        except Exception as e:
            failure = e
    ok = broadcast_object(failure is None)
    if failure is not None:
        raise failure
    if not ok:
        raise CheckpointError(f"rank 0 could not write {run_dir / STATE} (its own message says why); the last "
                              "complete checkpoint is kept")


def _named_batch(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / STATE).read_text())["batches_done"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _refuse(run_dir: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{problem}, so the run in {run_dir} cannot resume. Delete {run_dir} to train again from "
                           "the start, or pass --out to train into another directory")


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """state.json of `run_dir` (None when it has none), checked to be whole and of this format."""
    path = run_dir / STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_bytes())
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        raise _refuse(run_dir, f"{path} is damaged or truncated (not valid JSON)") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format", "none") if isinstance(state, dict) else "none"
        raise _refuse(run_dir, f"{path} has checkpoint format {found!r}, not {STATE_FORMAT} (checkpoints with "
                               "checksums)")
    kinds = {"identity": dict, "batches_done": int, "saes": list, "sha256": dict}
    wrong = [key for key, kind in kinds.items() if not isinstance(state.get(key), kind)]
    if wrong:
        raise _refuse(run_dir, f"{path} is damaged: {', '.join(wrong)} missing or malformed")
    return state


def verify_checkpoint(run_dir: Path, names: list[str], state: dict[str, Any]) -> None:
    """Every named SAE's checkpoint file exists and has the SHA-256 state.json recorded when it was written."""
    for name in names:
        file = checkpoint_file(run_dir, name, state["batches_done"])
        if not file.is_file():
            raise _refuse(run_dir, f"the checkpoint {file} is missing ({run_dir / STATE} names it)")
        if file_sha256(file) != state["sha256"].get(name):
            raise _refuse(run_dir, f"the checkpoint {file} is damaged: its SHA-256 differs from the one "
                                   f"{run_dir / STATE} recorded when it was written")


def load_checkpoint(run_dir: Path, members: list[Any], state: dict[str, Any]) -> None:
    """Restore every member in place from the checkpoint `state` names, once every file is verified."""
    verify_checkpoint(run_dir, [m.name for m in members], state)
    for m in members:
        file = checkpoint_file(run_dir, m.name, state["batches_done"])
        try:
            tensors = load_file(str(file))
            with safe_open(str(file), "pt") as f:
                meta = json.loads(f.metadata()["optimizer"])
        except (SafetensorError, KeyError, ValueError) as e:  # checksum right, content not ours
            raise _refuse(run_dir, f"the checkpoint {file} cannot be read ({e})") from None
        m.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, index, name = key.split(".", 2)
                opt_state.setdefault(int(index), {})[name] = value
        m.opt.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})


def trim_histories(run_dir: Path, names: list[str], tokens: int) -> None:
    """Drop every history record past `tokens` (the resumed checkpoint's): what a run logged after its last
    checkpoint is logged again when the resumed run redoes those batches. A torn last line goes too."""
    for name in names:
        file = run_dir / name / HISTORY
        if not file.is_file():
            continue
        lines = file.read_text(errors="replace").splitlines()
        keep = [line for line in lines if (t := _record_tokens(line)) is not None and t <= tokens]
        if len(keep) < len(lines):
            write_atomic(file, "".join(line + "\n" for line in keep).encode())


def _record_tokens(line: str) -> int | None:
    try:
        return int(json.loads(line)["tokens"])
    except (ValueError, KeyError, TypeError):
        return None
