"""The Hugging Face Trainer loop's glue: what a checkpoint holds, resuming into it, trained weights back in.

    trainer = make_trainer(trainee, args, dataset, collator, on_save=ctx.sync)
    trainer.train(resume_from_checkpoint=last_complete(ckpt_dir, "trainer"))
    load_trained_weights(fresh_trainee, zero_fp32_weights(checkpoint))   # final/ of a DeepSpeed run

``trainee`` is any module a model family builds: ``forward(**batch)`` returns ``{"loss": …}``; its trainable
parameters are what trains (every weight for full fine-tuning, LoRA adapters, an unfrozen part). Checkpoints
hold only those tensors (``trainable.safetensors``, see common.training.checkpoints) plus the Trainer's
optimizer, scheduler, RNG and ``trainer_state.json``: enough to resume, a few MB for LoRA. Each checkpoint is
written into a hidden staging folder and published whole (common.training.checkpoints.publish).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.training import checkpoints as ckpts
from common.training.checkpoints import PREFIX, TRAINABLE_WEIGHTS

log = logging.getLogger(__name__)

TRAINEE_META = "trainee.json"  # the ModeSpec and tensor names a checkpoint was written with


class TrainError(ValueError):
    """Training cannot be set up as asked; the message says why and which setting to change."""


def count_params(module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def trainable_state(trainee) -> dict[str, Any]:
    return {n: p.detach().contiguous().cpu() for n, p in trainee.named_parameters() if p.requires_grad}


def save_trainable(trainee, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = trainable_state(trainee)
    tmp = folder / f".{TRAINABLE_WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / TRAINABLE_WEIGHTS)
    meta = {**getattr(trainee, "checkpoint_meta", {}), "tensors": sorted(state)}
    (folder / TRAINEE_META).write_text(json.dumps(meta, indent=1))


def load_trainable(trainee, folder: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(folder / TRAINABLE_WEIGHTS))
    own = dict(trainee.named_parameters())
    missing = sorted(n for n, p in own.items() if p.requires_grad and n not in state)
    unknown = sorted(n for n in state if n not in own)
    if missing or unknown:
        raise TrainError(
            f"checkpoint {folder} does not fit this model/mode (missing {missing[:3]}…, unknown {unknown[:3]}…); "
            "remove the checkpoints folder or run with --force to start over"
        )
    import torch

    with torch.no_grad():
        for n, t in state.items():
            own[n].copy_(t)


def make_trainer(trainee, args, train_dataset, collator, on_save: Callable[[], None] | None = None,
                 eval_dataset=None, callbacks: Sequence = ()):
    """A Trainer that checkpoints only trainable tensors and calls ``on_save`` (e.g. ctx.sync) after each save."""
    from transformers import Trainer, TrainerCallback

    class _SyncAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if on_save is not None:
                on_save()

    class _Trainer(Trainer):
        def _save_checkpoint(self, model, trial) -> None:
            # The Trainer writes checkpoint-N/ file by file; make it complete-or-absent: write into a hidden
            # staging folder, then seal (fsync + completion marker) and rename it into place on the saving rank.
            real = Path(self._get_output_dir(trial=trial))
            name = f"{PREFIX}{self.state.global_step}"
            staging = real / f".{name}.staging"
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            _barrier()
            self._get_output_dir = lambda trial=None: str(staging)  # where super() writes checkpoint-N/
            try:
                super()._save_checkpoint(model, trial)
            finally:
                del self._get_output_dir
            _barrier()  # every rank's shards (DeepSpeed) are written
            if self.args.should_save:
                ckpts.publish(staging / name, real / name)
                shutil.rmtree(staging, ignore_errors=True)
                ckpts.rotate(real, self.args.save_total_limit)
                log.info("saved checkpoint %s", real / name)
            _barrier()

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            if self.args.should_save:
                save_trainable(self.model, Path(output_dir or self.args.output_dir))

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            load_trainable(model or self.model, Path(resume_from_checkpoint))
            log.info("resumed weights from %s", resume_from_checkpoint)

    return _Trainer(
        model=trainee, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, data_collator=collator,
        callbacks=[_SyncAfterSave(), *callbacks],
    )


def _barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    return max(1, math.ceil(math.ceil(n_examples / (batch_size * world_size)) / grad_accum))


def load_trained_weights(trainee, weights: Mapping[str, Any]) -> list[str]:
    """Copy the trainable parameters' values from ``weights`` (name → tensor, or a lazy tensor whose
    ``.contiguous()`` gives one, as DeepSpeed's zero_to_fp32 returns) into ``trainee``, cast to each
    parameter's dtype; frozen parameters and buffers keep their values. Returns the names copied.
    Raises TrainError when the names or shapes do not match this trainee (another model or mode)."""
    import torch

    params = dict(trainee.named_parameters())  # a tied weight appears once, under its first name
    wanted = [n for n, p in params.items() if p.requires_grad]
    missing = [n for n in wanted if n not in weights]
    unknown = sorted(set(weights) - set(trainee.state_dict()))  # the state dict also names tied aliases, buffers
    if missing or unknown:
        raise TrainError(
            f"the trained weights do not fit this model/mode: {len(missing)} trainable parameters missing "
            f"{missing[:3]}, {len(unknown)} unknown names {unknown[:3]}; they must come from a run of the same "
            "pretrained model, mode and LoRA settings"
        )
    with torch.no_grad():
        for name in wanted:
            value = weights[name].contiguous()
            if tuple(value.shape) != tuple(params[name].shape):
                raise TrainError(f"trained weight {name} has shape {tuple(value.shape)}, this model's "
                                 f"{tuple(params[name].shape)}: not a run of the same model")
            params[name].copy_(value)
            del value
    return wanted


def _allocator_env() -> tuple[bool, str] | None:
    """(expandable, why) when PYTORCH_CUDA_ALLOC_CONF decides the allocator's segments, else None."""
    import os

    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments" not in conf:
        return None
    return "expandable_segments:true" in conf.replace(" ", "").lower(), f"PYTORCH_CUDA_ALLOC_CONF={conf}"


def expandable_segments() -> tuple[bool, str]:
    """Turn on the CUDA caching allocator's expandable segments unless PYTORCH_CUDA_ALLOC_CONF decides it;
    call before the model goes to the GPU. Near a full GPU, batches of varying length fragment fixed-size
    segments: the allocator then frees its whole cache and retries, a stall of a second or more per step.
    Returns (on, why) for the plan."""
    import torch

    decided = _allocator_env()
    if decided is not None:
        return decided
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError) as e:  # an allocator without the option: run as it is
        return False, f"this torch's CUDA allocator has no expandable segments ({e})"
    return True, ("segments grow in place, so batches of varying length do not fragment a nearly full GPU "
                  "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False keeps it off)")


def allocator_decision() -> tuple[bool, str]:
    """The CUDA caching allocator's segments as the Trainer path runs them, for the plan: PyTorch's default
    unless PYTORCH_CUDA_ALLOC_CONF says otherwise. Returns (expandable, why)."""
    return _allocator_env() or (
        False, "PyTorch's default fixed-size segments: side by side on an H100 (Kimi-Audio LoRA, batch 16), "
               "expandable segments gave the same steady-state step time and no fewer allocator retries (none "
               "either way); PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True turns them on")


def freeze_gc() -> None:
    """Move every object alive now (the data set, the model's Python objects) out of the garbage collector's
    reach: a full collection would walk them all, a pause of seconds in the middle of a step."""
    import gc

    gc.collect()
    gc.freeze()


def leave_zero3_init() -> None:
    """Models loaded from now on are plain ones: while the Trainer's DeepSpeed ZeRO-3 config is registered,
    ``from_pretrained`` builds models partitioned (deepspeed.zero.Init), which needs every rank."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config
    except ImportError:  # a transformers without the DeepSpeed integration registers nothing
        return
    if is_deepspeed_zero3_enabled():
        unset_hf_deepspeed_config()

