"""Run a producer (an iterator) on a thread of its own, so that its consumer works at the same time.

Stage B's frames come from the GPU (sampling, VAE decoding) and go to the CPU (H.264 and AAC encoding); one thread
doing both leaves each idle while the other works. :func:`in_background` moves the producer to a worker thread
with a bounded queue between them: the items and their order are the same, memory is bounded by ``max_items``, an
exception in the producer is raised in the consumer, and a consumer that stops early stops the producer.

The worker thread is kept for the consumer thread's next call: per-thread state of the libraries the producer
uses survives from one video to the next. cuDNN's autotuned convolution plans (``cudnn.benchmark``) are such
state; with a new thread per video, each video's first chunk autotuned every convolution again (about 3 s of an
H200 stream's 5.5 s first-frame latency). The worker ends with its consumer thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["in_background"]

T = TypeVar("T")
_DONE = object()


def in_background(items: Iterable[T], max_items: int = 64, name: str = "producer") -> Iterator[T]:
    """The items of ``items``, produced on a worker thread at most ``max_items`` ahead of the consumer (the calling
    thread's worker for ``name``, kept for its next call; a nested call of the same name gets a thread of its own)."""
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

    executor, kept = _worker(name)
    worker = executor.submit(produce)
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
        worker.result()  # produce() hands its errors to the queue; this waits for it to return
        if kept:
            _workers.busy.discard(name)
        else:
            executor.shutdown()


_workers = threading.local()  # per consumer thread: its producers' workers (dropped with the thread, which ends them)


def _worker(name: str) -> tuple[ThreadPoolExecutor, bool]:
    """The calling thread's kept worker for ``name`` (True), or a new one for this call while that one is busy."""
    if not hasattr(_workers, "executors"):
        _workers.executors, _workers.busy = {}, set()
    if name in _workers.busy:  # in_background inside an in_background of the same name: never wait on oneself
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name), False
    if name not in _workers.executors:
        _workers.executors[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    _workers.busy.add(name)
    return _workers.executors[name], True
