"""Resuming a fine-tune: which checkpoint (if any) this run continues from.

    signature = run_signature(ctx, plan, inputs, kind)     # what the checkpoints belong to
    resume = checkpoint_to_resume(ctx, signature)          # the last complete checkpoint of the same setup, or None

A run resumes from the newest complete checkpoint (common.training.checkpoints) only when the training setup
is unchanged: settings, inputs (extract's and pretrained's fingerprints), the plan values that change what a
checkpoint means, and the loop that wrote it (the fast loop's and the Trainer's checkpoints never resume each
other). Otherwise the old checkpoints are removed and training starts over (logged). On S3 the newest
complete remote checkpoint (its completion marker uploaded, its files verified once downloaded) is brought into
the local staging folder first.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from common.core.settings import fingerprint_fields
from common.core.stage import StageContext
from common.core.store import atomic_write_bytes
from common.training import checkpoints as ckpts
from common.training.checkpoints import Kind
from common.training.planner import Plan

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
SIGNATURE = "run_signature.json"  # in checkpoints/: the training setup the checkpoints belong to
# Plan values that change what a checkpoint means: resuming under different ones would mix two runs.
RESUME_KEYS = ("mode", "lora", "per_device_batch", "grad_accum", "world_size", "lr", "scheduler", "max_steps",
               "warmup_steps", "epochs", "weight_decay", "precision", "eval_holdout")


def run_signature(ctx: StageContext, the_plan: Plan, inputs: dict[str, Any], kind: Kind) -> dict[str, Any]:
    """What the checkpoints belong to, the checkpoint kind (loop) included."""
    values = the_plan.values
    return {
        "settings": fingerprint_fields(ctx.settings),
        "inputs": inputs,
        "plan": {k: values.get(k) for k in RESUME_KEYS},
        "fast_path": kind == "fast",
    }


def restore_from_store(ctx: StageContext, kind: Kind) -> None:
    """S3: bring the newest complete remote checkpoint (and the signature) into the local staging folder."""
    if ctx.store.local_path(ctx.key()) is not None:
        return  # local store: ctx.out IS the stage folder
    prefix = ctx.key(CHECKPOINTS)
    files: dict[str, set[str]] = {}
    for key in ctx.store.list(prefix):
        head, _, rest = key[len(prefix) + 1:].partition("/")
        if ckpts.is_step_folder(head):
            files.setdefault(head, set()).add(rest)
    complete = sorted((c for c, names in files.items() if ckpts.is_complete(names, kind)), key=ckpts.checkpoint_step)
    if not complete:
        return
    if ctx.store.exists(f"{prefix}/{SIGNATURE}"):
        ctx.store.get_file(f"{prefix}/{SIGNATURE}", ctx.out / CHECKPOINTS / SIGNATURE)
    for name in reversed(complete):  # the newest that verifies once downloaded
        local = ctx.out / CHECKPOINTS / name
        if local.is_dir() and ckpts.verify(local, kind) is None:
            return
        shutil.rmtree(local, ignore_errors=True)
        log.info("downloading %s from %s to resume", name, ctx.store.uri_for(prefix))
        ctx.store.get_dir(f"{prefix}/{name}", local)
        problem = ckpts.verify(local, kind)
        if problem is None:
            return
        log.warning("skipping checkpoint %s in %s: %s; trying the one before it", name, ctx.store.uri_for(prefix),
                    problem)
        shutil.rmtree(local, ignore_errors=True)


def checkpoint_to_resume(ctx: StageContext, signature: dict[str, Any]) -> Path | None:
    """The checkpoint to resume from, or None (fresh start; stale checkpoints of another setup removed).
    The checkpoint kind (fast loop or Trainer) follows ``signature["fast_path"]``."""
    kind: Kind = "fast" if signature.get("fast_path") else "trainer"
    restore_from_store(ctx, kind)
    folder = ctx.out / CHECKPOINTS
    sig_path = folder / SIGNATURE
    last = ckpts.last_complete(folder, kind)
    if last is not None:
        old = json.loads(sig_path.read_text()) if sig_path.is_file() else None
        if old == signature:
            state = json.loads((last / "trainer_state.json").read_text())
            log.info("resuming from %s (global step %s of %s)", last, state.get("global_step"), state.get("max_steps"))
            return last
        log.warning("checkpoints in %s belong to a different training setup (settings, inputs or plan changed): "
                    "starting over", folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    atomic_write_bytes(sig_path, json.dumps(signature, indent=1, sort_keys=True, ensure_ascii=False).encode())
    return None
