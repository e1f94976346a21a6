"""SIGINT and SIGTERM in every command: temporary files are removed, then one line and a non-zero status.

Python turns SIGINT into ``KeyboardInterrupt``, but SIGTERM (what schedulers, ``timeout`` and ``kill`` send) ends
the process at once, skipping every ``finally``: temporary files stay and the exit status says nothing useful.
:func:`signals_raise` makes both raise :class:`Interrupted`, so the atomic writers clean up as for any
error, and :func:`exit_status` / :func:`message` give the entry points the status (128 + signal) and the line
``interrupted by SIGTERM: kept ...; to resume: ...``.

Training cannot stop in the middle of an optimizer step and still keep a usable checkpoint, so during a fit
:func:`deferred_signals` hands the first signal to Lightning's own SIGTERM handling (it stops after the current
step); a second signal stops at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

__all__ = ["Interrupted", "StopRequest", "signals_raise", "deferred_signals", "received", "exit_status", "message",
           "report"]

_received: list[str] = []  # names of the signals this process got, first first


class Interrupted(BaseException):
    """A command stopped by a signal. ``kept``: what survives (finished outputs, checkpoints); ``resume``: how to
    continue (a command line). Lower layers raise it with those filled in; the entry point prints them.
    Like KeyboardInterrupt it is no ``Exception``, so ``except Exception`` (a batch job's) never swallows it; it is
    no KeyboardInterrupt either, which Lightning would turn into ``sys.exit(1)``."""

    def __init__(self, signal_name: str | None = None, kept: str | None = None, resume: str | None = None):
        self.signal_name = signal_name or (_received[0] if _received else "SIGINT")
        self.kept, self.resume = kept, resume
        super().__init__(self.signal_name)


def received() -> str | None:
    """The first signal this process got (None: none)."""
    return _received[0] if _received else None


def _record(signum: int) -> str:
    name = signal.Signals(signum).name
    _received.append(name)
    return name


def _raise(signum: int, frame) -> None:
    raise Interrupted(_record(signum))


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread while the block runs."""
    if not _main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class StopRequest:
    """What :func:`deferred_signals` yields: ``signal`` is the name of the first signal received in the block."""

    signal: str | None = None


@contextlib.contextmanager
def deferred_signals() -> Iterator[StopRequest]:
    """For Lightning fits inside the block: the first SIGINT or SIGTERM asks Lightning to stop after the current
    step (it raises ``SIGTERMException`` there; a SIGINT is passed on as a SIGTERM to this process) and is noted in
    the yielded :class:`StopRequest` (a fit that ends on that very step returns normally: check it afterwards); a
    second signal, or one that arrives while no trainer is listening, raises :class:`Interrupted` at once."""
    request = StopRequest()
    if not _main_thread():
        yield request
        return
    relayed = {"pending": False}

    def lightning_listens() -> bool:  # during fits Lightning puts its own handler in place, which then calls ours
        return signal.getsignal(signal.SIGTERM) is not on_sigterm

    def first_or_raise(signum: int) -> None:
        name = _record(signum)
        if request.signal is not None or not lightning_listens():
            raise Interrupted(request.signal or name)
        request.signal = name

    def on_sigint(signum: int, frame) -> None:
        first_or_raise(signum)
        relayed["pending"] = True
        os.kill(os.getpid(), signal.SIGTERM)

    def on_sigterm(signum: int, frame) -> None:
        if relayed["pending"]:  # our own relay of a SIGINT: Lightning has set its flag
            relayed["pending"] = False
            return
        first_or_raise(signum)

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, on_sigint),
                signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm)}
    try:
        yield request
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def exit_status(error: BaseException) -> int:
    """128 + the signal number, as shells report a process ended by that signal (130 SIGINT, 143 SIGTERM)."""
    name = getattr(error, "signal_name", None) or received() or "SIGINT"
    try:
        return 128 + int(signal.Signals[name])
    except KeyError:
        return 130


def message(error: BaseException, kept: str, resume: str) -> str:
    """``interrupted by SIGTERM: kept ...; to resume: ...`` (the error's own kept/resume win over the defaults)."""
    name = getattr(error, "signal_name", None) or received() or "SIGINT"
    return (f"interrupted by {name}: kept {getattr(error, 'kept', None) or kept}; "
            f"to resume: {getattr(error, 'resume', None) or resume}")


def report(error: BaseException, kept: str, resume: str) -> int:
    """Print :func:`message` on stderr; returns :func:`exit_status` (for the argparse commands' ``main``)."""
    import sys

    print(message(error, kept, resume), file=sys.stderr, flush=True)
    return exit_status(error)
