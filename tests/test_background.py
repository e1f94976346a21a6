"""aniportrait.utils.background: the producer thread hands over every item in order, its errors, and stops when
the consumer stops."""

import threading
import time

import pytest

from aniportrait.utils.background import in_background


def counted(total: int, produced: list[int]):
    """0 .. total-1, each appended to ``produced`` as it is made."""
    for number in range(total):
        produced.append(number)
        yield number


def test_items_arrive_in_order_and_the_producer_runs_ahead():
    produced = []
    consumed = []
    for item in in_background(counted(50, produced), max_items=8):
        if not consumed:
            time.sleep(0.2)  # the producer fills the queue meanwhile
            assert 8 <= len(produced) <= 10  # bounded: the queue, one item in hand and the one taken
        consumed.append(item)
    assert consumed == list(range(50))


def test_an_error_of_the_producer_is_raised_in_the_consumer_after_its_items():
    def items():
        yield 1
        yield 2
        raise RuntimeError("decoder failed")

    consumed = []
    with pytest.raises(RuntimeError, match="decoder failed"):
        for item in in_background(items(), max_items=1):
            consumed.append(item)
    assert consumed == [1, 2]


def test_a_consumer_that_stops_stops_the_producer():
    produced = []
    for item in in_background(counted(10_000, produced), max_items=4):
        if item == 3:
            break
    count = len(produced)
    time.sleep(0.1)
    assert len(produced) == count < 20  # the producer has stopped, not run on
    with pytest.raises(ValueError, match="max_items=0"):
        next(in_background(iter([1]), max_items=0))


def producer_thread():
    yield threading.get_ident()


def test_the_worker_is_kept_for_the_next_call_and_ends_with_its_consumer():
    """Per-thread library state (cuDNN's autotuned plans) lasts from one video to the next: the same consumer thread
    gets the same producer thread; another consumer thread gets its own, which ends when that consumer ends; a nested
    call of the same name does not wait on itself."""
    import gc

    first, second = (list(in_background(producer_thread()))[0] for _ in range(2))
    assert first == second != threading.get_ident()
    assert [thread.daemon for thread in threading.enumerate() if thread.ident == first] == [True]  # exit never waits
    nested = [list(in_background(producer_thread()))[0] for _ in in_background(iter([1, 2]))]
    assert len(nested) == 2 and first not in nested  # a thread of its own while the kept one is busy

    seen = []
    consumer = threading.Thread(target=lambda: seen.extend(in_background(producer_thread(), name="other")))
    consumer.start()
    consumer.join()
    assert seen and seen[0] != first
    gc.collect()
    deadline = time.monotonic() + 5
    while any(thread.ident == seen[0] for thread in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(thread.ident == seen[0] for thread in threading.enumerate())  # ended with its consumer


def test_a_finished_producer_is_not_kept_by_its_worker():
    """The kept worker drops the finished job: whatever the producer held (a chunk's tensors) is freed after the
    call, not at the next video."""
    import gc
    import weakref

    class Payload:
        pass

    held = []

    def items():  # a producer stopped mid-way keeps its locals until it is collected
        payload = Payload()
        held.append(weakref.ref(payload))
        yield from range(100)

    for item in in_background(items(), max_items=2):
        if item == 1:
            break
    gc.collect()
    assert held and held[0]() is None
