"""The two training loops of the finetune stage, and where final/'s weights come from.

    fast, why = fast_path_decision(settings.fast_path, plan, trainee, built)
    trained = (train_with_fast_path if fast else train_with_trainer)(ctx, trainee, plan, built, resume)
    source, why = final_weights_source(plan, fast)     # the trained module, or the last ZeRO checkpoint

- The fast loop (common.training.fast_train): one CUDA GPU, plain strategy, bf16, full / freeze-encoder; bf16
  weights with fp32 masters, fused AdamW, compiled layers.
- The Hugging Face Trainer: everything else (CPU, LoRA, DDP between launched workers, DeepSpeed ZeRO-2/3 with
  offload), tqdm progress, TensorBoard logs in ``tensorboard/``.

Both take the plan's typed schedule, checkpoint into ``checkpoints/checkpoint-N/`` (uploaded right after each
save on S3) and return ``{"global_step", "train_loss", "losses"}``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.core import preempt
from common.core.faults import fault_point
from common.core.stage import StageContext, StageFailed
from common.core.store import atomic_write_bytes
from common.families import Built, ModelFamily
from common.training import checkpoints as ckpts
from common.training.planner import Plan
from jobs.finetune.resume import CHECKPOINTS

log = logging.getLogger(__name__)

TENSORBOARD = "tensorboard"


def regroup_each_epoch(dataset):
    """Trainer callback: a new grouping of clips into packed windows at the start of every epoch."""
    from transformers import TrainerCallback

    class _Regroup(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            dataset.set_epoch(int(state.epoch or 0))

    return _Regroup()


def stop_when_asked():
    """Trainer callback: after a SIGTERM / SIGINT, end training at the end of the current step with a checkpoint."""
    from transformers import TrainerCallback

    class _Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            fault_point("train.step_end")  # where the tests preempt training (ASRFT_FAULT=train.step_end:term:N)
            if preempt.requested() is not None:
                control.should_save = True
                control.should_training_stop = True
            return control

    return _Stop()


def finished_at_checkpoint(trainer: Any, resume: Path, load_weights: bool) -> Any:
    """Resuming from the checkpoint of the last step (killed after it, before the stage finished): nothing is
    left to train. (The Trainer, asked to resume there, would train one step past the end when the run is
    shorter than an epoch.) The trainer takes the checkpoint's weights and state, plus the end-of-training
    entry the Trainer logs."""
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    from common.training.trainer import load_trainable

    state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
    if load_weights:  # (DeepSpeed: final/ is read from the checkpoint itself)
        load_trainable(trainer.model, resume)
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    train_loss = sum(losses) / len(losses) if losses else None
    state.log_history.append({"train_runtime": 0.0, "train_samples_per_second": 0.0, "train_steps_per_second": 0.0,
                              "total_flos": state.total_flos, "train_loss": train_loss, "epoch": state.epoch,
                              "step": state.global_step})
    trainer.state = state
    log.info("%s is the checkpoint of the last step (%d): training was complete, nothing to resume", resume,
             state.global_step)
    return TrainOutput(state.global_step, train_loss, {})


def stopped_by_signal(ctx: StageContext, global_step: int) -> None:
    """After a loop returned: if a signal stopped it, log the checkpoint it saved and stop the stage (exit 143/130)."""
    if preempt.requested() is None:
        return
    saved = ctx.out / CHECKPOINTS / f"{ckpts.PREFIX}{global_step}"
    log.warning("stopped at step %d; checkpoint saved: %s (a re-run resumes from it)", global_step, saved)
    preempt.raise_preempted(f"stopped by a signal at step {global_step}, checkpoint {saved.name} saved")


def fast_path_decision(fast_path: str, the_plan: Plan, trainee: Any, built: Built) -> tuple[bool, str]:
    """(train with common.training.fast_train, why): its own conditions (one CUDA GPU, plain strategy, bf16, full or
    freeze-encoder), the setting (not switched off) and the datasets' (e.g. no packed windows)."""
    if fast_path == "off":
        return False, "fast_path=off: the Hugging Face Trainer"
    from common.training.fast_train import fast_path_applies

    ok, why = fast_path_applies(the_plan.schedule, trainee)
    if not ok:
        return False, f"{why}: the Hugging Face Trainer"
    if built.fast_path_blocker:
        return False, f"{built.fast_path_blocker}: the Trainer"
    return True, why


def deepspeed_rendezvous(the_plan: Plan, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables a stage process not started by a launcher needs to train with DeepSpeed on its one GPU (empty
    when none are needed): DeepSpeed always joins a torch.distributed group, and without RANK / WORLD_SIZE /
    MASTER_ADDR / ... it tries MPI discovery and fails (no mpi4py). A one-rank group on a free local port."""
    from common.training.launch import is_worker

    env = os.environ if env is None else env
    if not the_plan.deepspeed_config or is_worker(env):
        return {}
    assert the_plan.world_size == 1, "world size > 1 is launched (launch_workers) before training starts"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
            "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}


def train_with_trainer(ctx: StageContext, trainee: Any, the_plan: Plan, built: Built,
                       resume: Path | None) -> dict[str, Any]:
    """The Hugging Face Trainer (DDP between launched workers, DeepSpeed when the plan says so)."""
    from transformers import Seq2SeqTrainingArguments

    from common.core.settings import environment
    from common.training.launch import backend_for, is_rank_zero
    from common.training.planner import training_arguments_kwargs
    from common.training.trainer import make_trainer

    seed = ctx.settings.seed
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(ctx.out / TENSORBOARD)  # transformers >= 5
    extra_args: dict[str, Any] = {
        "seed": seed, "report_to": list(ctx.settings.report_to), "disable_tqdm": False, "remove_unused_columns": False,
        "label_names": ["labels"], "prediction_loss_only": True, "logging_first_step": True,
        "dataloader_pin_memory": the_plan.device == "cuda",
    }
    if the_plan.world_size > 1:
        extra_args["ddp_backend"] = backend_for(the_plan.device)
    if built.group_by_length:  # the name changed in transformers 5
        accepted = inspect.signature(Seq2SeqTrainingArguments).parameters
        extra_args.update({"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in accepted
                          else {"group_by_length": True})
    if "logging_dir" in inspect.signature(Seq2SeqTrainingArguments).parameters:  # transformers < 5
        extra_args["logging_dir"] = str(ctx.out / TENSORBOARD)
    kwargs = training_arguments_kwargs(the_plan.schedule, ctx.out / CHECKPOINTS, **extra_args)
    rendezvous = deepspeed_rendezvous(the_plan)
    if rendezvous:
        log.info("DeepSpeed on one GPU: a one-process torch.distributed group on 127.0.0.1:%s",
                 rendezvous["MASTER_PORT"])
    with environment(rendezvous):
        args = Seq2SeqTrainingArguments(**kwargs)
        rank_zero = is_rank_zero()
        callbacks = [stop_when_asked()] + ([regroup_each_epoch(built.train)] if built.regroup_each_epoch else [])
        trainer = make_trainer(trainee, args, built.train, built.collator, on_save=ctx.sync if rank_zero else None,
                               eval_dataset=built.eval, callbacks=callbacks)
        if resume is not None and ckpts.checkpoint_step(resume) >= args.max_steps > 0:
            result = finished_at_checkpoint(trainer, resume, load_weights=not the_plan.deepspeed_config)
        else:
            with preempt.deferred():  # SIGTERM / SIGINT: finish the step, save a checkpoint, stop (stop_when_asked)
                result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    stopped_by_signal(ctx, trainer.state.global_step)
    if rank_zero:
        trainer.state.save_to_json(str(ctx.out / "trainer_state.json"))
    if the_plan.deepspeed_config:
        # final/ comes from the last ZeRO checkpoint: let go of the engine, its partitions and (offloaded)
        # optimizer state first, so the fresh fp32 copy has the memory
        trainer.accelerator.free_memory()
    return {
        "global_step": trainer.state.global_step,
        "train_loss": round(result.training_loss, 4) if result.training_loss is not None else None,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "eval_losses": [[h["step"], round(h["eval_loss"], 5)] for h in trainer.state.log_history if "eval_loss" in h],
    }


FAST_SPEED_KEYS = ("samples_per_s", "median_step_seconds", "compiled_layers", "attention", "peak_gpu_bytes")


def train_with_fast_path(ctx: StageContext, trainee: Any, the_plan: Plan, built: Built,
                         resume: Path | None) -> dict[str, Any]:
    """common.training.fast_train on one GPU; its checkpoints go where the Trainer's would (checkpoints/checkpoint-N)."""
    from common.training.fast_train import FastOptions, train_fast

    with preempt.deferred():  # SIGTERM / SIGINT: train_fast saves a checkpoint after the current step and returns
        result = train_fast(
            trainee, built.train, built.collator, the_plan.schedule, ctx.out / CHECKPOINTS,
            on_checkpoint=lambda _path: ctx.sync(), resume_from=resume, eval_dataset=built.eval,
            options=FastOptions(seed=ctx.settings.seed, tensorboard_dir=str(ctx.out / TENSORBOARD)
                                if "tensorboard" in ctx.settings.report_to else None),
        )
    stopped_by_signal(ctx, result["global_step"])
    state = {"global_step": result["global_step"], "max_steps": result["max_steps"],
             "log_history": result["log_history"], "fast_path": True}
    atomic_write_bytes(ctx.out / "trainer_state.json", json.dumps(state, indent=1, ensure_ascii=False).encode())
    return {
        "global_step": result["global_step"],
        "train_loss": result["train_loss"],
        "losses": [h["loss"] for h in result["log_history"] if "loss" in h],
        "eval_losses": [[h["step"], h["eval_loss"]] for h in result["log_history"] if "eval_loss" in h],
        "speed": {"fast_path_speed": {k: result.get(k) for k in FAST_SPEED_KEYS}},
    }


FINAL_FROM_MODULE = "trained module"


FINAL_FROM_ZERO = "zero checkpoint"


def final_weights_source(the_plan: Plan, fast_path: bool) -> tuple[str, str]:
    """Where final/'s weights come from, and why: FINAL_FROM_MODULE (the module that trained holds them in fp32)
    or FINAL_FROM_ZERO (DeepSpeed: the fp32 master weights of the last ZeRO checkpoint, read on the CPU)."""
    config = the_plan.deepspeed_config
    if fast_path:
        return FINAL_FROM_MODULE, "the fast loop writes its fp32 master weights back into the module"
    if not config:
        return FINAL_FROM_MODULE, "trained without DeepSpeed: the module holds the fp32 weights"
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        why = ("ZeRO-3 partitions every parameter across the ranks: the module on rank 0 holds only its shard "
               "(saving it would write empty tensors)")
    else:
        dtype = "bf16" if config.get("bf16", {}).get("enabled") else "fp16" if config.get("fp16", {}).get("enabled") \
            else None
        why = (f"under DeepSpeed {dtype} the module holds 16-bit copies of the weights (frozen ones included); the "
               "fp32 masters live in the optimizer" if dtype else
               f"ZeRO-{stage} keeps the fp32 master weights in the optimizer's partitions")
    return FINAL_FROM_ZERO, (f"{why}: final/ takes the fp32 master weights from the last ZeRO checkpoint "
                             "(DeepSpeed's zero_to_fp32 on the CPU, rank 0 alone; frozen weights from the pretrained "
                             "model)")


def final_trainee_from_zero(ctx: StageContext, family: ModelFamily, model_dir: Path, the_plan: Plan,
                            global_step: int) -> Any:
    """A fresh CPU trainee (built by the family from the pretrained model, as for training) holding the fp32
    master weights of checkpoints/checkpoint-<global_step> (the Trainer saves one at the last step:
    save_strategy "steps" saves when training ends). One process, no GPU, no collective: rank 0 alone calls
    it; frozen weights stay the exact fp32 pretrained values, where ZeRO holds only a 16-bit copy."""
    from common.training.trainer import TrainError, leave_zero3_init, load_trained_weights
    from common.training.zero_export import ZeroCheckpointError, zero_fp32_weights

    last = ckpts.last_complete(ctx.out / CHECKPOINTS, "trainer")
    if last is None or ckpts.checkpoint_step(last) != global_step:
        raise StageFailed(
            f"final/ of a DeepSpeed run is built from the checkpoint of the last step, "
            f"{CHECKPOINTS}/checkpoint-{global_step}, but the newest complete one is {last}; run the stage again "
            "(it resumes) or with --force"
        )
    leave_zero3_init()
    trainee = family.trainee(model_dir, the_plan, ctx.settings.model_dump())
    t0 = time.perf_counter()
    try:
        names = set(load_trained_weights(trainee, zero_fp32_weights(last)))
    except (ZeroCheckpointError, TrainError) as e:
        raise StageFailed(f"cannot build final/ from {last}: {e}") from None
    log.info("loaded the fp32 master weights of %d trained tensors (%d values) from the ZeRO checkpoint %s "
             "in %.1f s", len(names), sum(p.numel() for n, p in trainee.named_parameters() if n in names),
             last, time.perf_counter() - t0)
    return trainee
