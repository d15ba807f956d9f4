"""asr-ft status: the runs in an artifacts location and the state of each of their stages.

    rows = run_states(store)                 # every run: {run, stage: state}
    states = stage_states(store, "demo")     # one run: [StageState(stage, state, detail, finished)]

States: ``done`` (its manifest is there and every upstream stage it was made from is unchanged), ``stale``
(done, but an upstream stage has been redone since — or is gone — so the next `asr-ft run` redoes it),
``failed`` (its last attempt ended with an error, or was killed: the process recorded as running it is gone),
``running`` (an attempt is under way), ``—`` (never run). It reads the stage folders' ``_manifest.json`` and
the ``<run>/.state/<stage>.running.json`` / ``.failed.json`` markers the stage runner writes; it changes
nothing.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from pydantic_settings import SettingsConfigDict

from common.core.registry import STAGES
from common.core.settings import StageSettings
from common.core.stage import FAILED, MANIFEST, RUNNING, state_key
from common.core.store import Store, StoreError

STAGE = "status"
STEPS = tuple(s.name for s in STAGES if s.pipeline or s.name == "score")  # stages with a folder in a run
NOT_RUN = "—"


class StatusSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_STATUS_")


@dataclass
class StageState:
    stage: str
    state: str  # done | stale | failed | running | —
    detail: str = ""
    finished: str = ""


def _read(store: Store, key: str) -> dict[str, Any] | None:
    try:
        return store.read_json(key) if store.exists(key) else None
    except (StoreError, ValueError, OSError):
        return None


def _upstreams(inputs: Any) -> list[tuple[str, str]]:
    """(stage, fingerprint) pairs a manifest's inputs record: ``{"prepare": "<sha>"}`` or nested
    ``{"stage": "prepare", "fingerprint": "<sha>"}``."""
    found: list[tuple[str, str]] = []
    names = {s.name for s in STAGES}
    if isinstance(inputs, dict):
        if isinstance(inputs.get("stage"), str) and isinstance(inputs.get("fingerprint"), str):
            found.append((inputs["stage"], inputs["fingerprint"]))
        for key, value in inputs.items():
            if key in names and isinstance(value, str) and len(value) == 64:
                found.append((key, value))
            elif isinstance(value, dict | list):
                found += _upstreams(value)
    elif isinstance(inputs, list):
        for value in inputs:
            found += _upstreams(value)
    return found


def _alive(marker: dict[str, Any]) -> bool:
    """Whether the process a RUNNING marker names still runs (unknowable on another host: assumed so)."""
    if marker.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(marker.get("pid", -1)), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def stage_states(store: Store, run_id: str) -> list[StageState]:
    manifests = {s: _read(store, store.join(run_id, s, MANIFEST)) for s in STEPS}
    out = []
    for stage in STEPS:
        manifest = manifests[stage]
        running = _read(store, state_key(store, run_id, stage, RUNNING))
        if running is not None:
            if _alive(running):
                out.append(StageState(stage, "running", f"since {running.get('started', '?')} on "
                                                         f"{running.get('host', '?')} (pid {running.get('pid')})"))
            else:
                out.append(StageState(stage, "failed", f"killed: process {running.get('pid')} on "
                                                        f"{running.get('host')} is gone (started "
                                                        f"{running.get('started', '?')})"))
            continue
        if manifest is None:
            failed = _read(store, state_key(store, run_id, stage, FAILED))
            if failed is not None:
                out.append(StageState(stage, "failed", str(failed.get("message", ""))[:200],
                                      failed.get("finished", "")))
            else:
                out.append(StageState(stage, NOT_RUN))
            continue
        changed = []
        for up, fingerprint in _upstreams(manifest.get("inputs")):
            current = manifests.get(up) if up in manifests else _read(store, store.join(run_id, up, MANIFEST))
            if current is None or current.get("fingerprint") != fingerprint:
                changed.append(up)
        if changed:
            out.append(StageState(stage, "stale", f"{', '.join(sorted(set(changed)))} changed since",
                                  manifest.get("finished", "")))
        else:
            out.append(StageState(stage, "done", f"{manifest.get('seconds', 0):.0f} s", manifest.get("finished", "")))
    return out


def list_runs(store: Store) -> list[str]:
    """Run ids: folders of the artifacts location holding at least one stage folder."""
    local = getattr(store, "root", None)  # a LocalStore: its folder
    if local is not None:
        if not local.is_dir():
            return []
        return sorted(p.name for p in local.iterdir()
                      if p.is_dir() and any((p / s).is_dir() for s in STEPS))
    runs = set()
    for key in store.list():
        parts = key.split("/")
        if len(parts) >= 3 and parts[1] in STEPS:
            runs.add(parts[0])
    return sorted(runs)


def format_run(run_id: str, states: list[StageState]) -> str:
    width = max(len(s.stage) for s in states)
    lines = [f"run {run_id}"]
    for s in states:
        tail = "  ".join(x for x in (s.finished, s.detail) if x)
        lines.append(f"  {s.stage:<{width}}  {s.state:<8}  {tail}".rstrip())
    return "\n".join(lines)


def format_runs(store: Store, runs: list[str]) -> str:
    if not runs:
        return f"no runs in {store.uri}"
    lines = [f"runs in {store.uri}:"]
    for run_id in runs:
        states = stage_states(store, run_id)
        summary = " ".join(f"{s.stage}:{s.state}" for s in states if s.state != NOT_RUN)
        lines.append(f"  {run_id:<20} {summary or 'nothing run'}")
    lines.append("`asr-ft status RUN` shows one run's stages.")
    return "\n".join(lines)
