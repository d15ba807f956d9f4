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

import json
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.core.registry import stage
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
    for result in results:
        step = result.step
        env = local_env(common, pipeline, step)
        cmd = [sys.executable, "-m", stage(step).module]
        if settings.dry_run:
            shown = {k: v for k, v in sorted(env.items()) if k.startswith("ASRFT_") and "SECRET" not in k and "KEY" not in k}
            print(f"# {step}\n" + " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in shown.items())
                  + f" asr-ft {step}\n")
            continue
        print(f"\n━━ {step} ━━", file=sys.stderr, flush=True)
        before = _manifest_finished(settings, step, pipeline)
        t0 = time.perf_counter()
        code, tail = _run_streaming(cmd, env)
        result.seconds = time.perf_counter() - t0
        if code != 0:
            result.status, result.note, result.code = "failed", f"(exit {code})", code
            print(f"\n✗ {step} failed (exit {code}). Its last output lines:\n" + "─" * 60 + f"\n{tail.rstrip()}\n"
                  + "─" * 60, file=sys.stderr)
            break
        after = _manifest_finished(settings, step, pipeline)
        result.status = "skipped" if (before is not None and before == after) else "done"
        result.note = _note(settings, step)
    return results


def exit_code(results: list[StepResult]) -> int:
    """The run's exit code: the first failed step's, else EXIT_OK."""
    failed = [r for r in results if r.status == "failed"]
    return failed[0].code if failed else EXIT_OK


def print_summary(results: list[StepResult], settings: Any) -> None:
    icon = {"done": "✓", "skipped": "↷", "failed": "✗", "not run": "·"}
    rows = [f"{icon[r.status]} {r.step:<11} {r.status:<8} {r.seconds:7.1f}s  {r.note}" for r in results]
    total = sum(r.seconds for r in results)
    out = ["", f"Run '{settings.run_id}' in {settings.artifacts} · 运行汇总", *rows, f"  {'total':<20} {total:7.1f}s"]
    metrics = _metrics_table(settings) if results and results[-1].step == "evaluate" and results[-1].status != "failed" else ""
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


def _run_streaming(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run a step, passing its output through live (progress bars included) and keeping the tail."""
    tail: deque[bytes] = deque()
    size = 0
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail.append(chunk)
            size += len(chunk)
            while size - len(tail[0]) > TAIL_BYTES:
                size -= len(tail.popleft())
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    text = b"".join(tail).decode("utf-8", "replace").replace("\r", "\n")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return code, "\n".join(lines[-25:])


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
