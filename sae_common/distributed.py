"""Running under torchrun: which rank this process is, its device, and the few collectives the commands use.

`torchrun --nproc-per-node N ... sae <command>` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in
every worker; `world()` reads them and joins the process group once (NCCL where the ranks have GPUs, gloo
otherwise). Without torchrun it is a world of one and every collective here is the identity, so the commands
call them unconditionally and a single process pays nothing.

Failure: when a worker dies or exits non-zero, torchrun's agent stops the others and prints which rank failed
and why. A collective that waits on a rank that hangs (or on a node that vanished) gives up after
SAE_DIST_TIMEOUT seconds (default 600), so no rank waits forever.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, TypeVar

import torch
import torch.distributed as dist

from sae_cache.sae_common.errors import UserError

T = TypeVar("T")
TIMEOUT_ENV = "SAE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600


class DistributedError(UserError):
    """The distributed environment is unusable (bad variables, a device per rank missing)."""


class PeerLost(UserError):
    """A collective failed: another rank stopped (its own message says why) or timed out."""


@contextmanager
def _guard(what: str) -> Iterator[None]:
    """A collective's failure as one clear line instead of gloo's or NCCL's traceback."""
    try:
        yield
    except RuntimeError as e:  # DistBackendError is one; gloo raises plain RuntimeErrors for a reset peer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerLost(f"{what} failed: another rank stopped or stalled (its own message says why; a stall gives "
                       f"up after {TIMEOUT_ENV}={timeout_s()} s), so this rank stops too. Finished work is kept; "
                       f"rerun the same command to resume. ({first[:200]})") from None


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size}"


_WORLD: World | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"the environment variable {name}={value!r} is not an integer; torchrun sets it, "
                               "so launch with torchrun or unset it") from None


def timeout_s() -> int:
    value = _env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    if value <= 0:
        raise DistributedError(f"{TIMEOUT_ENV}={value}: must be a positive number of seconds")
    return value


def world() -> World:
    """This process's place in the job, joining the process group on the first call under torchrun."""
    global _WORLD
    if _WORLD is None:
        size = _env_int("WORLD_SIZE", 1)
        rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        if size < 1 or not 0 <= rank < size:
            raise DistributedError(f"RANK={rank}, WORLD_SIZE={size}: need 0 <= RANK < WORLD_SIZE")
        if size > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local % torch.cuda.device_count())
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
        _WORLD = World(rank, size, local)
    return _WORLD


def rank_device(device: str) -> str:
    """A resolved device for this rank: under torchrun each rank takes the GPU of its local rank."""
    w = world()
    if w.active and device == "cuda":
        return f"cuda:{w.local_rank % torch.cuda.device_count()}"
    return device


def barrier() -> None:
    if world().active:
        with _guard("a barrier"):
            dist.barrier()


def all_gather_object(obj: T, group: Any = None) -> list[T]:
    """Every rank's `obj`, in rank order (picklable objects; for small things such as names and checksums).
    `group`: one from `side_group()`, for a background thread (default: the main group)."""
    if not world().active:
        return [obj]
    out: list[Any] = [None] * world().size
    with _guard("all_gather_object"):
        dist.all_gather_object(out, obj, group=group)
    return out


def side_group() -> Any:
    """A second gloo group of all ranks (None in one process). Collectives on one group must come in the same
    order on every rank, which two threads cannot promise; a background thread uses its own group. Every rank
    must call this, in the same order with the other collectives."""
    if not world().active:
        return None
    with _guard("new_group"):
        return dist.new_group(backend="gloo")


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank."""
    if not world().active:
        return obj
    box = [obj]
    with _guard("broadcast_object"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """[size, *tensor.shape]: every rank's tensor, in rank order (same shape and dtype on every rank)."""
    if not world().active:
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(world().size)]
    with _guard("all_gather"):
        dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over all ranks: op is sum, max or min. The tensor must be on this rank's device."""
    if world().active:
        with _guard(f"all_reduce ({op})"):
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                        "min": dist.ReduceOp.MIN}[op])
    return tensor


_CPU_GROUP: Any = None  # a gloo group beside an NCCL one, for flags the host must read without a GPU sync


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any: ranks agree on a stop (Ctrl-C reached one of them) at the
    same step. The flag travels on the CPU (gloo; a side group under NCCL), so reading it never waits for
    the GPU's queued work; bench/scaling_bench.py measures its cost per call."""
    global _CPU_GROUP
    if not world().active:
        return flag
    with _guard("all_reduce (stop flag)"):
        if _CPU_GROUP is None:
            _CPU_GROUP = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CPU_GROUP)
    return bool(t.item())


def shard(n: int, w: World | None = None) -> range:
    """This rank's items of 0..n-1, round-robin (rank r takes r, r+size, ...), so ranks differ by at most one."""
    w = w or world()
    return range(w.rank, n, w.size)


def shutdown() -> None:
    """Leave the process group (at the end of a command; torchrun's workers then exit cleanly)."""
    global _WORLD, _CPU_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = _CPU_GROUP = None
