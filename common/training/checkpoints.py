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

A checkpoint is written into a temporary folder and renamed into place, so an interrupted save leaves an
incomplete folder at worst; such folders are skipped (and logged), never resumed from.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

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
    """Whether a checkpoint folder holding the files ``names`` is a whole checkpoint of ``kind``."""
    names = set(names)
    weights = kind != "fast" or any(w in names for w in FAST_WEIGHTS)
    return weights and all(f in names for f in REQUIRED[kind])


def last_complete(folder: Path, kind: Kind) -> Path | None:
    """The complete checkpoint of ``kind`` with the highest step under ``folder`` (incomplete ones logged)."""
    for path in reversed(checkpoints(folder)):
        if is_complete((p.name for p in path.iterdir()), kind):
            return path
        log.warning("ignoring incomplete checkpoint %s (interrupted while saving)", path)
    return None
