"""Run a producer (an iterator) on a thread of its own, so that its consumer works at the same time.

Stage B's frames come from the GPU (sampling, VAE decoding) and go to the CPU (H.264 and AAC encoding); one thread
doing both leaves each idle while the other works. :func:`in_background` moves the producer to a worker thread
with a bounded queue between them: the items and their order are the same, memory is bounded by ``max_items``, an
exception in the producer is raised in the consumer, and a consumer that stops early stops the producer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["in_background"]

T = TypeVar("T")
_DONE = object()


def in_background(items: Iterable[T], max_items: int = 64, name: str = "producer") -> Iterator[T]:
    """The items of ``items``, produced on a daemon thread at most ``max_items`` ahead of the consumer."""
    if max_items < 1:
        raise ValueError(f"max_items={max_items}: need at least 1")
    buffer: queue.Queue = queue.Queue(maxsize=max_items)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as error:  # handed to the consumer, raised there
            put(error)

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
