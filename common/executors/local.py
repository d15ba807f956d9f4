"""The local executor: each pipeline step as a subprocess of this machine, one after another.

    asr-ft run --config pipeline.yaml                 # executor local is the default
    asr-ft run --config pipeline.yaml --dry-run       # print each step's environment and command

Reads the pipeline and the run settings (``asr-ft run``'s RunSettings: artifacts, run_id, s3, dry_run). Each
step runs ``python -m <module>`` (the module the stage registry names: ``asr-ft <step>``) with exactly the
environment a container gets (ASRFT_* variables; ``local_env`` in common/executors/pipeline.py), its output
passed through live (progress bars included).

Decides each step's status: ``done``, or ``skipped`` when the step's manifest (demo-data: its data folder's
summary file) was not rewritten, i.e. the step found its outputs up to date; ``failed`` stops the run, and
the steps after it are ``not run``.

Writes nothing itself: the steps write ``<artifacts>/<run-id>/<step>/``. ``print_summary`` prints the table
of steps and, after ``evaluate``, the CER of every model on every test set; a failed step's last output lines
are shown again right after it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.core import preempt
from common.core.registry import stage
from common.core.runlock import TOKEN_ENV, run_lock
from common.core.settings import redact_env
from common.core.stage import EXIT_OK, MANIFEST
from common.core.store import open_store
from common.executors.pipeline import local_env

TAIL_BYTES = 6000  # how much of a failed step's output to show again


@dataclass
class StepResult:
    """One step of a run as every executor reports it."""

    step: str
    status: str  # done | skipped | failed | not run
    seconds: float = 0.0
    note: str = ""
    code: int = 0
    job: str = ""  # the Kubernetes Job that ran it


def run_local(steps: list[str], pipeline: dict, common: dict, settings: Any) -> list[StepResult]:
    """Run the steps in order (or print them with ``settings.dry_run``); one result per step."""
    results = [StepResult(s, "not run") for s in steps]
    if settings.dry_run:
        _run_steps(results, pipeline, common, settings, {})
        return results
    # one run per run-id: the run holds the lock for all its steps, which work under it (their token matches)
    with run_lock(open_store(settings.artifacts, settings.s3), settings.run_id, "run",
                  ttl=settings.s3.lease_seconds) as token:
        _run_steps(results, pipeline, common, settings, {TOKEN_ENV: token})
    return results


def _run_steps(results: list[StepResult], pipeline: dict, common: dict, settings: Any, extra_env: dict) -> None:
    for result in results:
        step = result.step
        env = {**local_env(common, pipeline, step), **extra_env}
        cmd = [sys.executable, "-m", stage(step).module]
        if settings.dry_run:
            shown = redact_env({k: v for k, v in sorted(env.items()) if k.startswith("ASRFT_")})
            print(f"# {step}\n" + " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in shown.items())
                  + f" asr-ft {step}\n")
            continue
        print(f"\n━━ {step} ━━", file=sys.stderr, flush=True)
        before = _manifest_finished(settings, step, pipeline)
        t0 = time.perf_counter()
        code, tail, stopped = _run_streaming(cmd, env, step)
        result.seconds = time.perf_counter() - t0
        if stopped and code == 0:  # asked to stop, and the step finished anyway: stop before the next one
            code = preempt.EXIT_CODES.get(stopped, 128 + stopped)
        if code != 0:
            result.status, result.note, result.code = "failed", f"(exit {code})", code
            print(f"\n✗ {step} failed (exit {code}). Its last output lines:\n" + "─" * 60 + f"\n{tail.rstrip()}\n"
                  + "─" * 60, file=sys.stderr)
            break
        after = _manifest_finished(settings, step, pipeline)
        result.status = "skipped" if (before is not None and before == after) else "done"
        result.note = _note(settings, step)


def exit_code(results: list[StepResult]) -> int:
    """The run's exit code: the first failed step's, else EXIT_OK."""
    failed = [r for r in results if r.status == "failed"]
    return failed[0].code if failed else EXIT_OK


def print_summary(results: list[StepResult], settings: Any) -> None:
    icon = {"done": "✓", "skipped": "↷", "failed": "✗", "not run": "·"}
    rows = [f"{icon[r.status]} {r.step:<11} {r.status:<8} {r.seconds:7.1f}s  {r.note}" for r in results]
    total = sum(r.seconds for r in results)
    out = ["", f"Run '{settings.run_id}' in {settings.artifacts} · 运行汇总", *rows, f"  {'total':<20} {total:7.1f}s"]
    # the CER table only when this run's evaluate finished (or found its results current): never an older run's
    metrics = _metrics_table(settings) if results and results[-1].step == "evaluate" and \
        results[-1].status in ("done", "skipped") else ""
    print("\n".join(out) + ("\n\n" + metrics if metrics else ""), file=sys.stderr)


# ------------------------------------------------------------------------------------------------ helpers


def _manifest_finished(settings: Any, step: str, pipeline: dict) -> str | None:
    """A stamp that changes when the step really ran (its manifest's finish time)."""
    if step == "demo-data":  # no manifest: the data folder's summary file is rewritten when it is regenerated
        section = pipeline.get("demo-data") or pipeline.get("demo_data") or {}
        summary = Path(section.get("out", "demo_data")) / "demo_data.json"
        return str(summary.stat().st_mtime_ns) if summary.exists() else None
    store = open_store(settings.artifacts, settings.s3)
    key = store.join(settings.run_id, step, MANIFEST)
    return store.read_json(key).get("finished") if store.exists(key) else None


def _run_streaming(cmd: list[str], env: dict[str, str], step: str = "") -> tuple[int, str, int | None]:
    """Run a step, passing its output through live (progress bars included) and keeping the tail. A SIGTERM /
    SIGINT to this process is passed on to the step (in its own session, so a terminal's Ctrl-C reaches it
    once, through here), which saves its work and stops; this waits for it. Returns (exit code, output tail,
    the signal passed on or None)."""
    tail: deque[bytes] = deque()
    size = 0
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    stopped: list[int] = []

    def forward(signum, _frame):
        stopped.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)
        print(f"\n{signal.Signals(signum).name} received: passed on to {step or 'the step'}; waiting for it to save "
              "its work and stop", file=sys.stderr, flush=True)

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, forward) for s in preempt.SIGNALS} if main else {}
    try:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail.append(chunk)
            size += len(chunk)
            while size - len(tail[0]) > TAIL_BYTES:
                size -= len(tail.popleft())
        code = proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    text = b"".join(tail).decode("utf-8", "replace").replace("\r", "\n")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return code, "\n".join(lines[-25:]), (stopped[0] if stopped else None)


def _note(settings: Any, step: str) -> str:
    if step == "demo-data":
        return ""
    store = open_store(settings.artifacts, settings.s3)
    summary = store.read_json(store.join(settings.run_id, step, MANIFEST)).get("summary") or {}
    keys = [k for k, v in summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)][:4]
    return ", ".join(f"{k}={_fmt(summary[k])}" for k in keys)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)[:40]


def _metrics_table(settings: Any) -> str:
    store = open_store(settings.artifacts, settings.s3)
    key = store.join(settings.run_id, "evaluate", "metrics.json")
    if not store.exists(key):
        return ""
    metrics = store.read_json(key)
    sets = sorted({s for per_set in metrics.values() for s in per_set})
    head = f"{'CER 字错率':<14}" + "".join(f"{s:>14}" for s in sets)
    lines = [head]
    for model, per_set in metrics.items():
        cells = "".join(
            f"{per_set[s]['cer'] * 100:13.1f}%" if s in per_set and per_set[s].get("cer") is not None else f"{'—':>14}"
            for s in sets
        )
        lines.append(f"{model:<14}{cells}")
    report = store.uri_for(store.join(settings.run_id, "evaluate", "report.html"))
    return "\n".join(lines) + f"\nreport: {report}"
