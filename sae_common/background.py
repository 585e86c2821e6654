"""Running an iterator ahead of its consumer in a background thread."""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_END = object()


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def put_unless_stopped(ready: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Queue `item` unless `stop` is set while waiting for room (the consumer has gone); whether it was queued."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def background(items: Iterable[T], depth: int, name: str = "background") -> Iterator[T]:
    """Yield `items` in order, produced by a daemon thread that stays up to `depth` items ahead.

    An error raised while producing is raised here, after the items produced before it. Closing or dropping
    the returned generator stops the thread (after the item it is producing).
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if not put_unless_stopped(ready, item, stop):
                    return
            put_unless_stopped(ready, _END, stop)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put_unless_stopped(ready, _Raised(e), stop)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
