"""Run a producer (an iterator) on a thread of its own, so that its consumer works at the same time.

Stage B's frames come from the GPU (sampling, VAE decoding) and go to the CPU (H.264 and AAC encoding); one thread
doing both leaves each idle while the other works. :func:`in_background` moves the producer to a worker thread
with a bounded queue between them: the items and their order are the same, memory is bounded by ``max_items``, an
exception in the producer is raised in the consumer, and a consumer that stops early stops the producer.

The worker thread is kept for the consumer thread's next call: per-thread state of the libraries the producer
uses survives from one video to the next. cuDNN's autotuned convolution plans (``cudnn.benchmark``) are such
state; with a new thread per video, each video's first chunk autotuned every convolution again (about 3 s of an
H200 stream's 5.5 s first-frame latency). The worker, a daemon thread, ends with its consumer thread.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
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

    thread, kept = _worker(name)
    worker = thread.submit(produce)
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
            thread.close()


class _WorkerThread:
    """A daemon thread running one job at a time (so a stuck producer never holds up the interpreter's exit); it ends
    when this object is closed or collected."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=_serve, args=(self._jobs,), name=name, daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, self._jobs.put, None)  # collected: the thread's loop ends
        _alive.add(self)

    def submit(self, job: Callable[[], None]) -> Future:
        future: Future = Future()
        self._jobs.put((job, future))
        return future

    def close(self, timeout: float | None = None) -> None:
        self._finalizer()
        if timeout is not None:
            self._thread.join(timeout)


_alive: weakref.WeakSet[_WorkerThread] = weakref.WeakSet()


@atexit.register
def _close_workers() -> None:
    """End the idle workers before the interpreter finalizes (a thread that ran torch code and is still alive then
    aborts the process); a busy one gets a few seconds, then is left to die as a daemon."""
    for worker in list(_alive):
        worker.close(timeout=5.0)


def _serve(jobs: queue.SimpleQueue) -> None:
    while (item := jobs.get()) is not None:
        job, future = item
        try:
            future.set_result(job())
        except BaseException as error:  # noqa: BLE001  (produce() catches its own; this is a last resort)
            future.set_exception(error)
        del item, job, future  # the finished producer (its frames, its tensors) is not kept until the next job


_workers = threading.local()  # per consumer thread: its producers' workers (dropped with the thread, which ends them)


def _worker(name: str) -> tuple[_WorkerThread, bool]:
    """The calling thread's kept worker for ``name`` (True), or a new one for this call while that one is busy."""
    if not hasattr(_workers, "threads"):
        _workers.threads, _workers.busy = {}, set()
    if name in _workers.busy:  # in_background inside an in_background of the same name: never wait on oneself
        return _WorkerThread(name), False
    if name not in _workers.threads:
        _workers.threads[name] = _WorkerThread(name)
    _workers.busy.add(name)
    return _workers.threads[name], True
