"""Stopping on SIGTERM / SIGINT (a preempted pod, Ctrl-C) without leaving anything half-published.

    with stop_signals():              # run_stage: a signal raises Preempted where the stage is
        ...
        with deferred():              # a training loop: a signal only sets a flag ...
            for step in ...:
                ...
                if requested():       # ... checked at the end of each step: save a checkpoint, then
                    raise_preempted() # stop (exit 143 for SIGTERM, 130 for SIGINT)

Outside ``deferred`` a signal raises ``Preempted`` at once: atomic writes (common.core.files) remove their temp
files on the way out and the manifest is never written, so a stopped stage has published nothing half-done.
Inside it the loop decides when to stop; a second signal stops at once.

Preempted derives from BaseException (like KeyboardInterrupt) so no ``except Exception`` swallows it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + the signal's number, as a shell reports it


class Preempted(BaseException):
    """The stage was asked to stop (SIGTERM or SIGINT); ``exit_code`` is 143 or 130."""

    def __init__(self, signum: int, message: str = ""):
        self.signum = signum
        self.exit_code = EXIT_CODES.get(signum, 128 + signum)
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")


_state = {"requested": None, "deferred": 0}


def requested() -> int | None:
    """The signal received (SIGTERM / SIGINT), or None."""
    return _state["requested"]


def raise_preempted(message: str = "") -> None:
    signum = _state["requested"]
    if signum is not None:
        raise Preempted(signum, message)


def _handler(signum, _frame) -> None:
    first = _state["requested"] is None
    _state["requested"] = signum
    name = signal.Signals(signum).name
    if _state["deferred"] and first:
        log.warning("received %s: finishing the current step, then saving a checkpoint and stopping "
                    "(send it again to stop at once)", name)
        return
    raise Preempted(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM / SIGINT raise Preempted (or, inside ``deferred``, set the flag) while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _handler) for s in SIGNALS}
    _state["requested"] = None
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside the block a (first) signal only sets ``requested()``; the caller stops at a safe point."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1
