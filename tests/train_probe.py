"""`sae` with one fault injected into one rank, run under torchrun by tests/test_train_distributed.py.

PROBE_FAULT=kill|interrupt sends rank PROBE_RANK (default 1) SIGKILL (kill -9) or SIGINT (Ctrl-C reaching that
rank alone) once it has trained PROBE_AFTER batches in this launch, right before the ranks agree whether to stop;
PROBE_MARK names a file that gets the time of the fault, so the test can bound how long the others took to stop.
"""

from __future__ import annotations

import os
import signal
import time

from sae_cache.sae_common.cli import main
from sae_cache.train import trainer


def inject() -> None:
    fault = os.environ.get("PROBE_FAULT")
    if not fault or os.environ.get("RANK") != os.environ.get("PROBE_RANK", "1"):
        return
    after, real, calls = int(os.environ["PROBE_AFTER"]), trainer.any_rank, [0]

    def any_rank(flag: bool) -> bool:  # the trainer calls it once per batch
        calls[0] += 1
        if calls[0] == after:
            if "PROBE_MARK" in os.environ:
                with open(os.environ["PROBE_MARK"], "w") as f:
                    f.write(str(time.time()))
            os.kill(os.getpid(), {"kill": signal.SIGKILL, "interrupt": signal.SIGINT}[fault])
        return real(flag)

    trainer.any_rank = any_rank


if __name__ == "__main__":
    inject()
    main()
