"""Checkpoints of both training loops: one naming, one notion of "complete", one "last complete".

    ckpt = last_complete(out / "checkpoints", kind)        # newest complete checkpoint-<step>/, or None
    step = checkpoint_step(ckpt)                           # 40 for checkpoint-40
    ok = is_complete(names, kind)                          # a listing (e.g. of S3 keys) holds a whole checkpoint

Both loops write ``checkpoints/checkpoint-<global step>/`` (the Hugging Face Trainer's naming); what a complete
one holds differs, and the kind is part of the run's resume signature so the two never resume each other:

    trainer   trainable.safetensors (the trainable tensors only: a few MB for LoRA) + trainer_state.json,
              beside the Trainer's optimizer / scheduler / RNG files
    fast      the fp32 model (model.safetensors, or its index for sharded weights) + config.json +
              trainer_state.json + optimizer.pt (common.training.fast_train)

Complete or absent: a checkpoint is written into a temporary folder, its files are fsynced, a completion
marker (``checkpoint_complete.json``: every file's size and sha256) is written last, then the folder is renamed
into place (``publish``); on S3 the folder is uploaded first and the marker last. On resume (``last_complete``)
a checkpoint that does not verify (no marker, a file missing or of another size or checksum, an unreadable
``trainer_state.json``) is skipped with a warning and the one before it is used.

    publish(tmp, out / "checkpoints" / "checkpoint-40")   # seal (fsync + marker) + rename into place
    problem = verify(path, kind)                          # None, or why the checkpoint cannot be used
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from common.core.faults import fault_point
from common.core.files import atomic_write_bytes, fsync_dir, fsync_file, publish_dir
from common.core.stage import CHECKPOINT_MARKER

log = logging.getLogger(__name__)

Kind = Literal["trainer", "fast"]

PREFIX = "checkpoint-"  # checkpoint-<global step>
TRAINABLE_WEIGHTS = "trainable.safetensors"  # what a Trainer-loop checkpoint holds of the model
FAST_STATE_FILE = "trainer_state.json"  # step, loss history, the fast loop's own counters
FAST_OPTIMIZER_FILE = "optimizer.pt"  # optimizer + scheduler + RNG states
REQUIRED: dict[str, tuple[str, ...]] = {
    "trainer": (TRAINABLE_WEIGHTS, "trainer_state.json"),
    "fast": ("config.json", FAST_STATE_FILE, FAST_OPTIMIZER_FILE),  # + the weights, below
}
FAST_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # one of them
MARKER = CHECKPOINT_MARKER  # written (and uploaded) last: {"files": {relative path: {"size", "sha256"}}}
STATE = "trainer_state.json"  # both kinds hold one (the step it was saved at)


def is_step_folder(name: str) -> bool:
    return name.startswith(PREFIX) and name[len(PREFIX):].isdigit()


def checkpoint_step(path: Path | str) -> int:
    return int(Path(path).name[len(PREFIX):])


def checkpoints(folder: Path) -> list[Path]:
    """Every checkpoint-<step>/ under ``folder``, oldest first (complete or not)."""
    if not Path(folder).is_dir():
        return []
    return sorted((p for p in Path(folder).iterdir() if p.is_dir() and is_step_folder(p.name)), key=checkpoint_step)


def is_complete(names: Iterable[str], kind: Kind) -> bool:
    """Whether a checkpoint folder holding the files ``names`` (its completion marker included) is a whole
    checkpoint of ``kind`` by its listing (``verify`` also checks the files' sizes and checksums)."""
    names = set(names)
    weights = kind != "fast" or any(w in names for w in FAST_WEIGHTS)
    return MARKER in names and weights and all(f in names for f in REQUIRED[kind])


def last_complete(folder: Path, kind: Kind) -> Path | None:
    """The newest checkpoint of ``kind`` under ``folder`` that verifies; the ones skipped are logged with why."""
    for path in reversed(checkpoints(folder)):
        problem = verify(path, kind)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s; using the one before it", path, problem)
    return None


def _sha256(path: Path) -> str:
    from common.core.store import sha256_file

    return sha256_file(path)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def seal(folder: Path) -> dict:
    """Make a written checkpoint folder durable and complete: fsync its files, then write the completion marker
    (each file's size and sha256) last. Returns the marker."""
    files = {}
    for p in _files(folder):
        fsync_file(p)
        files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    for d in {p.parent for p in _files(folder)} | {folder}:
        fsync_dir(d)
    marker = {"files": files}
    fault_point("checkpoint.before_marker")
    atomic_write_bytes(folder / MARKER, json.dumps(marker, indent=1, sort_keys=True).encode())
    return marker


def publish(tmp: Path, folder: Path) -> Path:
    """Seal the checkpoint written into ``tmp`` and rename it to ``folder`` (checkpoint-<step>) in one step."""
    seal(tmp)
    fault_point("checkpoint.before_rename")
    publish_dir(tmp, folder)
    return folder


def staging_folder(folder: Path) -> Path:
    """The temporary folder a checkpoint is written into before ``publish`` (hidden: never listed, never
    uploaded); an old one (a crash while saving) is removed."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def verify(path: Path, kind: Kind) -> str | None:
    """None when the checkpoint at ``path`` is whole (marker, every file of its size and checksum, a readable
    trainer state), else what is wrong with it."""
    try:
        marker = json.loads((path / MARKER).read_text())
        files = marker["files"]
    except FileNotFoundError:
        return f"no completion marker ({MARKER}): interrupted while saving"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable completion marker {MARKER} ({e})"
    if not is_complete([*files, MARKER], kind):
        return f"the marker lists no whole {kind} checkpoint"
    for rel, want in sorted(files.items()):
        p = path / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != want.get("size"):
            return f"{rel} has {p.stat().st_size} bytes, the marker says {want.get('size')} (torn or changed)"
        if _sha256(p) != want.get("sha256"):
            return f"{rel} does not match its checksum (corrupted or changed)"
    try:
        state = json.loads((path / STATE).read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        return f"unreadable {STATE} ({e})"
    return None


def rotate(folder: Path, keep: int | None) -> list[Path]:
    """Remove all but the ``keep`` newest complete checkpoints (by step) and any incomplete one older than the
    newest complete one; returns what was removed. The marker goes first, so a half-removed checkpoint is
    never taken for a whole one."""
    if not keep or keep <= 0:
        return []
    all_ = checkpoints(folder)
    complete = [p for p in all_ if (p / MARKER).is_file()]
    kept = set(complete[-keep:])
    newest = checkpoint_step(complete[-1]) if complete else -1
    removed = []
    for p in all_:
        if p in kept or checkpoint_step(p) > newest:
            continue
        (p / MARKER).unlink(missing_ok=True)
        shutil.rmtree(p, ignore_errors=True)
        log.info("removed old checkpoint %s (keeping %d)", p.name, keep)
        removed.append(p)
    return removed
