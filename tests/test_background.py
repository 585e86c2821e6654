"""`background`: the same items in the same order, errors in their place, and no thread left behind."""

from __future__ import annotations

import threading
import time

import pytest

from sae_cache.sae_common.background import background


def threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "bg-test"]


def test_same_items_in_order():
    assert list(background(iter(range(1000)), depth=3, name="bg-test")) == list(range(1000))
    assert list(background([], depth=1, name="bg-test")) == []
    assert not threads()


def test_error_raised_after_the_items_before_it():
    def items():
        yield from range(5)
        raise ValueError("bad document 5")

    got = []
    with pytest.raises(ValueError, match="bad document 5"):
        for item in background(items(), depth=2, name="bg-test"):
            got.append(item)
    assert got == list(range(5)) and not threads()


def test_runs_ahead_of_the_consumer_by_depth():
    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    it = background(items(), depth=4, name="bg-test")
    assert next(it) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 6 and time.monotonic() < deadline:  # 1 consumed + 4 queued + 1 waiting to be put
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(produced) == 6
    it.close()  # stopping early stops the thread
    assert not threads() and len(produced) == 6
