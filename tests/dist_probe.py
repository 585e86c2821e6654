"""Run under torchrun by tests/test_distributed.py: exercises sae_common.distributed's collectives and prints
what each rank saw as one JSON line (or fails as asked, to test how failures surface)."""

from __future__ import annotations

import json
import os
import threading

import torch

from sae_cache.sae_common import distributed as D
from sae_cache.sae_common.errors import UserError


def main(mode: str) -> None:
    w = D.world()
    if mode == "raise" and w.rank == 1:
        raise UserError("rank one refuses")
    if mode == "die" and w.rank == 1:
        os._exit(3)
    t = torch.tensor([float(w.rank + 1)])
    seen = {"rank": w.rank, "size": w.size, "gathered": D.all_gather_object(f"r{w.rank}"),
            "broadcast": D.broadcast_object({"from": w.rank}), "sum": D.all_reduce_(t.clone()).item(),
            "max": D.all_reduce_(t.clone(), "max").item(), "min": D.all_reduce_(t.clone(), "min").item(),
            "shard": list(D.shard(5)), "all_gather": D.all_gather(torch.tensor([w.rank, 10 + w.rank])).tolist(),
            "any": [D.any_rank(w.rank == 1), D.any_rank(False)]}
    if mode == "collectives":  # a background thread gathers on its own group while the main thread gathers
        side, box = D.side_group(), {}
        thread = threading.Thread(target=lambda: box.update(side=D.all_gather_object(f"s{w.rank}", side)))
        thread.start()
        seen["main_beside"] = D.all_gather_object(f"m{w.rank}")
        thread.join(60)
        seen["side"] = box.get("side")
    D.barrier()  # under "die"/"raise" the survivor waits here until torchrun stops it
    os.write(1, (json.dumps(seen) + "\n").encode())  # one write: the two ranks share the pipe
    D.shutdown()


if __name__ == "__main__":
    import click

    from sae_cache.sae_common.cli import user_errors

    click.command()(click.argument("mode", default="collectives")(user_errors(lambda mode: main(mode))))()
