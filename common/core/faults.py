"""Fault injection at named code points: how the tests prove every publish point survives a crash.

    fault_point("checkpoint.before_marker")     # a no-op unless ASRFT_FAULT names this point

Every place that makes an artifact visible (an atomic file rename, a folder swap, an upload, a manifest, a
checkpoint's completion marker) calls ``fault_point`` with its name just before it does so. Normally that is
one dictionary look-up. With the environment variable set, the named point misbehaves:

    ASRFT_FAULT=POINT:ACTION[:NTH][,POINT:ACTION[:NTH]...]

    POINT   a point name or a shell pattern (``files.*``, ``*``), optionally after the stage running it
            (``finetune/checkpoint.before_marker``, ``prepare/*``)
    ACTION  kill    SIGKILL this process (a crash: nothing runs after it)
            term    SIGTERM this process (a preemption: handlers run)
            stop    SIGSTOP this process (frozen right there until SIGCONT: a test acts meanwhile)
            enospc  raise OSError(ENOSPC) (a full disk)
            eio     raise OSError(EIO) (a failing disk or network file system)
    NTH     act at the NTH time the point is reached (default 1)

``ASRFT_FAULT_TRACE=FILE`` appends the name of every point reached (``stage/point``, one per line) to FILE:
the tests run a pipeline once with it to learn every stage's publish points, then kill each stage at each of
them.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal

ENV = "ASRFT_FAULT"
TRACE_ENV = "ASRFT_FAULT_TRACE"
ACTIONS = ("kill", "term", "stop", "enospc", "eio")

_hits: dict[str, int] = {}
_scope = ""  # the stage this process runs (set_scope), prefixed to point names


def set_scope(stage: str) -> None:
    global _scope
    _scope = stage


class FaultSpecError(ValueError):
    """ASRFT_FAULT is malformed."""


def parse(spec: str) -> list[tuple[str, str, int]]:
    """``"a:kill,b.*:enospc:2"`` → [("a", "kill", 1), ("b.*", "enospc", 2)]."""
    rules = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[1] not in ACTIONS or (len(parts) == 3 and not parts[2].isdigit()):
            raise FaultSpecError(f"{ENV}={spec!r}: expected POINT:ACTION[:NTH] with ACTION one of {ACTIONS}")
        rules.append((parts[0], parts[1], int(parts[2]) if len(parts) == 3 else 1))
    return rules


def fault_point(name: str) -> None:
    """Reached a named point: record it (ASRFT_FAULT_TRACE) and misbehave if ASRFT_FAULT says so."""
    trace = os.environ.get(TRACE_ENV)
    spec = os.environ.get(ENV)
    if not trace and not spec:
        return
    full = f"{_scope}/{name}" if _scope else name
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(full + "\n")
    if not spec:
        return
    count = _hits[full] = _hits.get(full, 0) + 1
    for pattern, action, nth in parse(spec):
        if (fnmatch.fnmatchcase(full, pattern) or fnmatch.fnmatchcase(name, pattern)) and count == nth:
            _act(full, action)


def _act(name: str, action: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")
    elif action == "eio":
        raise OSError(errno.EIO, f"Input/output error (injected at {name})")
