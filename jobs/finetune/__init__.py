"""The finetune stage: extract's records + the pretrained Whisper → plan.json, checkpoints, final/.

    inputs = finetune_inputs(settings, store)   # fingerprints of the extract and pretrained stages
    summary = finetune(ctx)                     # plan → (resume) train → final model

Order of work (each step logged):

1. Load the pretrained model (``<run>/pretrained/model/``) and tokenize the transcripts with the Chinese
   prompt ``<|startoftranscript|><|zh|><|transcribe|><|notimestamps|>`` (the same prompt ``final/``'s
   generation config forces when decoding).
2. Plan (``common.training.planner``): device, precision, world size, mode, batch, accumulation, epochs, lr, warmup,
   save_steps (never above the total steps), evaluation hold-out (none on small data), memory setup. Every
   decision can be forced with a setting; ``plan.json`` is written and logged BEFORE training starts, with
   this stage's own decisions (frozen encoder layers, encoder cache, fast path, processes) in its ``finetune``
   section. World size > 1: this process decides the resume once, then starts one worker process per rank
   (``common.training.launch``: torch.distributed elastic as ``torchrun --standalone``, nccl on CUDA, gloo on CPU) that
   runs steps 1 and 3-5 with this plan (``finetune_worker``); rank 0 alone writes plan.json, checkpoints,
   trainer_state.json and final/, and this process writes the manifest. A failed rank fails the stage with
   that rank's error and traceback.
3. Inputs per clip: log-mel from extract's cache or from the audio; when the bottom of the encoder is frozen
   and epochs reuse it, its output is computed once per clip and kept in RAM (``--encoder-cache``).
4. Train with the fast loop (``common.training.fast_train``: one CUDA GPU, bf16, full / freeze-encoder; bf16 weights
   with fp32 masters, fused AdamW, compiled layers; ``--fast-path off`` turns it off) or else the Hugging Face
   Trainer (tqdm progress, TensorBoard logs in ``tensorboard/``), checkpointing
   into ``checkpoints/checkpoint-N/`` (uploaded right after each save on S3). A re-run after an interruption
   resumes from the last complete checkpoint when the training setup is unchanged (else starts over, logged);
   the setup includes which loop trains, so the two checkpoint kinds never mix.
5. ``final/``: a plain Whisper folder (LoRA merged; optionally interpolated with the pretrained weights by
   ``--merge-alpha``), with tokenizer, feature extractor and a zh/transcribe generation config;
   ``trainer_state.json`` (loss history) beside it. After a DeepSpeed run (ZeRO-3 partitions the weights across
   ranks; under bf16 the module holds only 16-bit copies) the weights are the fp32 master weights of the last
   ZeRO checkpoint, read on the CPU by rank 0 into a fresh copy of the pretrained model.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import os
import random
import shutil
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from common.core.records import read_jsonl
from common.core.settings import StageSettings, fingerprint_fields
from common.core.stage import StageContext, StageFailed, upstream_fingerprint
from common.core.store import Store, atomic_write_bytes

log = logging.getLogger(__name__)

STAGE = "finetune"
CHECKPOINTS = "checkpoints"
SIGNATURE = "run_signature.json"  # in checkpoints/: the training setup the checkpoints belong to
TENSORBOARD = "tensorboard"
FINAL = "final"
# Plan values that change what a checkpoint means: resuming under different ones would mix two runs.
RESUME_KEYS = ("mode", "lora", "per_device_batch", "grad_accum", "world_size", "lr", "scheduler", "max_steps",
               "warmup_steps", "epochs", "weight_decay", "precision", "eval_holdout")


class FinetuneSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_FINETUNE_")

    mode: Literal["auto", "full", "freeze-encoder", "lora"] = Field(
        "auto", description="what trains: auto (planner: full if it fits, else LoRA), full, freeze-encoder, lora",
        examples=["lora", "full"],
    )
    epochs: float | None = Field(None, gt=0, description="epochs [default: planner, by data size]", examples=[3])
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; replaces epochs when set", examples=[200])
    lr: float | None = Field(None, gt=0, description="peak learning rate [default: planner, by mode and size]",
                             examples=[1e-3, 1e-5])
    batch: int | None = Field(None, ge=1, description="per-device batch [default: planner, largest that fits]",
                              examples=[8])
    grad_accum: int | None = Field(None, ge=1, description="gradient accumulation steps [default: planner]",
                                   examples=[2])
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="warm-up fraction of the steps",
                                       examples=[0.1])
    scheduler: str | None = Field(None, description="LR schedule [default: cosine]", examples=["cosine", "linear"])
    weight_decay: float | None = Field(None, ge=0, description="AdamW weight decay [default: 0.01]")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 mixed precision (fp32 master weights) on GPUs that have it, fp32 on CPU",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to train", examples=["cpu"])
    fast_path: Literal["auto", "off"] = Field(
        "auto", description="auto: on one CUDA GPU in bf16 with mode full / freeze-encoder, train with the fast loop "
        "(bf16 weights + fp32 master weights, fused AdamW, compiled layers) instead of the Hugging Face Trainer; "
        "off: always the Trainer", examples=["auto", "off"],
    )
    num_workers: int | None = Field(None, ge=0, description="DataLoader worker processes [default: planner]")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch [default: the CPUs available]")
    seed: int = Field(0, description="seed for weights of new layers, data order and dropout", examples=[0])
    save_steps: int | None = Field(None, ge=1, description="checkpoint every N steps (capped at the total)")
    save_total_limit: int | None = Field(None, ge=1, description="checkpoints kept [default: planner]")
    lora_r: int = Field(16, ge=1, description="LoRA rank", examples=[16, 32])
    lora_alpha: int | None = Field(None, ge=1, description="LoRA alpha [default: 2 x r]")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    lora_targets: list[str] | None = Field(
        None, description="linear layers that get LoRA [default: q_proj k_proj v_proj out_proj fc1 fc2]",
        examples=[["q_proj", "v_proj"]],
    )
    lora_parts: list[Literal["encoder", "decoder"]] | None = Field(
        None, description="where LoRA goes [default: encoder and decoder]", examples=[["decoder"]],
    )
    frozen_encoder_layers: int = Field(
        0, ge=0, description="bottom encoder layers (+ conv front-end) kept frozen; their output is computed "
        "once per clip, so epochs run only the layers above (faster on CPU)", examples=[0, 3],
    )
    context_seconds: float = Field(
        30.0, ge=1, le=30, description="train on the first N seconds of Whisper's 30-s window (never shorter than "
        "the longest clip + 1 s); < 30 makes each step several times cheaper; decoding always uses 30 s",
        examples=[30, 8],
    )
    pack_clips: int = Field(
        1, ge=1, le=16, description="join up to N clips (regrouped every epoch, 0.3 s of silence between, "
        "transcripts joined) into one 30-s window: N x fewer encoder passes for short clips", examples=[1, 4],
    )
    pack_gap_seconds: float = Field(0.3, ge=0, le=2, description="silence between packed clips, seconds")
    encoder_cache: Literal["auto", "memory", "never"] = Field(
        "auto", description="keep the frozen encoder bottom's output per clip in RAM: auto = when epochs reuse it "
        "and it fits half the free RAM",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the token cross-entropy")
    merge_alpha: float = Field(
        1.0, ge=0, le=1, description="final = pretrained + alpha x (fine-tuned - pretrained) (WiSE-FT; 1 = as "
        "trained; lower keeps more of the pretrained model's general skill)", examples=[1.0, 0.8],
    )
    merge_alpha_encoder: float | None = Field(
        None, ge=0, le=1, description="merge factor of the encoder's weights [default: merge_alpha]; the encoder "
        "holds the acoustic skill", examples=[0.7],
    )
    merge_alpha_decoder: float | None = Field(
        None, ge=0, le=1, description="merge factor of the decoder's weights [default: merge_alpha]; the decoder "
        "holds the language model (lower: less drift toward the training sentences)", examples=[0.5],
    )
    eval_holdout: int | None = Field(None, ge=0, description="training clips held out for eval loss [default: "
                                     "planner: 5 % when that is >= 16 clips, else none]")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="force any planner decision by name (JSON), e.g. "
        '{"world_size": 1, "strategy": "zero2"}', examples=['{"save_steps": 10}'],
    )

    @field_validator("overrides", mode="before")
    @classmethod
    def _json_overrides(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"overrides must be a JSON object like '{{\"save_steps\": 10}}' ({e.msg})") from None
        return value

    @model_validator(mode="after")
    def _check(self) -> FinetuneSettings:
        from common.training.planner import DECISIONS

        unknown = sorted(set(self.overrides) - set(DECISIONS))
        if unknown:
            raise ValueError(f"overrides {unknown} are not planner decisions; choose from {list(DECISIONS)}")
        if self.pack_clips > 1 and self.context_seconds < 30:
            raise ValueError("--pack-clips > 1 trains on full 30-s windows; leave --context-seconds at 30")
        if self.mode == "freeze-encoder" and self.frozen_encoder_layers:
            raise ValueError("--frozen-encoder-layers has no meaning with --mode freeze-encoder (the whole encoder "
                             "is frozen); drop one of them")
        return self


def finetune_inputs(settings: FinetuneSettings, store: Store) -> dict[str, Any]:
    return {stage: upstream_fingerprint(store, settings.run_id, stage) for stage in ("extract", "pretrained")}


# --- planning -------------------------------------------------------------------------------------------


def planner_overrides(s: FinetuneSettings) -> dict[str, Any]:
    """Settings that force a planner decision (besides the requests plan() takes as arguments)."""
    forced = dict(s.overrides)
    if s.max_steps is not None:
        forced.setdefault("max_steps", s.max_steps)
    if s.num_workers is not None:
        forced.setdefault("dataloader_num_workers", s.num_workers)
    if s.eval_holdout is not None:
        forced.setdefault("eval_holdout", s.eval_holdout)
    if s.lora_parts is not None:
        forced.setdefault("lora", {"parts": list(s.lora_parts)})
    # Weights are loaded in fp32 (master weights; LoRA merges into exact fp32 base weights for final/).
    forced.setdefault("load_dtype", "float32")
    forced.setdefault("frozen_dtype", "float32")
    return forced


def make_plan(s: FinetuneSettings, config: Any, n_train: int, longest_labels: int, encoder_frames: int):
    from common.training.memory import profile_from_hf_config
    from common.training.planner import PlanError, detect_resources, plan

    try:
        resources = detect_resources(gpus=0) if s.device == "cpu" else detect_resources()
        overrides = planner_overrides(s)
        if s.device == "cuda":
            if resources.gpus == 0:
                raise StageFailed("--device cuda but no CUDA GPU is visible; use --device auto or cpu", exit_code=2)
            overrides.setdefault("device", "cuda")
        profile = profile_from_hf_config(config, decoder_seq_len=longest_labels).with_seq_lens(encoder=encoder_frames)
        # the planner's LoRA estimate knows linears by name: "encoder_attn.q_proj" counts as "q_proj" there
        targets = sorted({t.split(".")[-1] for t in s.lora_targets}) if s.lora_targets else None
        return plan(
            profile, n_train=n_train, mode=s.mode, per_device_batch=s.batch, grad_accum=s.grad_accum,
            epochs=s.epochs, lr=s.lr, warmup_ratio=s.warmup_ratio, scheduler=s.scheduler,
            weight_decay=s.weight_decay, precision=s.precision, save_steps=s.save_steps,
            save_total_limit=s.save_total_limit, lora_r=s.lora_r, lora_alpha=s.lora_alpha,
            lora_targets=targets, resources=resources, overrides=overrides,
        )
    except PlanError as e:
        raise StageFailed(f"cannot plan the training: {e}", exit_code=2) from None


def write_plan(path: Path, the_plan: Any, extra: dict[str, Any]) -> None:
    data = json.loads(the_plan.to_json())
    data["finetune"] = extra
    atomic_write_bytes(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())
    lines = [f"  {k} = {v!r}" for k, v in extra.items() if k != "reasons"]
    lines += [f"  {k}: {v}" for k, v in extra.get("reasons", {}).items()]
    log.info("%s\nfinetune stage decisions 阶段决策:\n%s\nplan written to %s", the_plan.summary(), "\n".join(lines), path)


# --- resume ---------------------------------------------------------------------------------------------


def run_signature(ctx: StageContext, the_plan: Any, inputs: dict[str, Any], fast_path: bool = False) -> dict[str, Any]:
    """What the checkpoints belong to; ``fast_path`` too: the fast loop's checkpoints (fp32 model + optimizer.pt)
    and the Trainer's (trainable.safetensors + its own optimizer files) never resume each other."""
    values = the_plan.values
    return {
        "settings": fingerprint_fields(ctx.settings),
        "inputs": inputs,
        "plan": {k: values.get(k) for k in RESUME_KEYS},
        "fast_path": fast_path,
    }


def _checkpoint_kind(fast_path: bool):
    """(last complete checkpoint under a folder, is a set of file names a complete checkpoint) for one kind."""
    if fast_path:
        from common.training.fast_train import FAST_CHECKPOINT_FILES, last_checkpoint

        def complete(names: set[str]) -> bool:
            weights = "model.safetensors" in names or "model.safetensors.index.json" in names
            return weights and all(f in names for f in FAST_CHECKPOINT_FILES)
    else:
        from common.training.train import CHECKPOINT_FILES, last_checkpoint

        def complete(names: set[str]) -> bool:
            return all(f in names for f in CHECKPOINT_FILES)

    return last_checkpoint, complete


def restore_from_store(ctx: StageContext, fast_path: bool = False) -> None:
    """S3: bring the newest complete remote checkpoint (and the signature) into the local staging folder."""
    from common.training.train import CHECKPOINT_PREFIX

    _, is_complete = _checkpoint_kind(fast_path)
    if ctx.store.local_path(ctx.key()) is not None:
        return  # local store: ctx.out IS the stage folder
    prefix = ctx.key(CHECKPOINTS)
    keys = ctx.store.list(prefix)
    files: dict[str, set[str]] = {}
    for key in keys:
        rel = key[len(prefix) + 1:]
        head, _, rest = rel.partition("/")
        if head.startswith(CHECKPOINT_PREFIX) and head[len(CHECKPOINT_PREFIX):].isdigit():
            files.setdefault(head, set()).add(rest)
    complete = [c for c, names in files.items() if is_complete(names)]
    if not complete:
        return
    newest = max(complete, key=lambda c: int(c[len(CHECKPOINT_PREFIX):]))
    if ctx.store.exists(f"{prefix}/{SIGNATURE}"):
        ctx.store.get_file(f"{prefix}/{SIGNATURE}", ctx.out / CHECKPOINTS / SIGNATURE)
    log.info("downloading %s from %s to resume", newest, ctx.store.uri_for(prefix))
    ctx.store.get_dir(f"{prefix}/{newest}", ctx.out / CHECKPOINTS / newest)


def checkpoint_to_resume(ctx: StageContext, signature: dict[str, Any]) -> Path | None:
    """The checkpoint to resume from, or None (fresh start; stale checkpoints of another setup removed).
    The checkpoint kind (fast loop or Trainer) follows ``signature["fast_path"]``."""
    fast_path = bool(signature.get("fast_path"))
    last_checkpoint, _ = _checkpoint_kind(fast_path)
    restore_from_store(ctx, fast_path)
    folder = ctx.out / CHECKPOINTS
    sig_path = folder / SIGNATURE
    last = last_checkpoint(folder)
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


def regroup_each_epoch(dataset):
    """Trainer callback: a new grouping of clips into packed windows at the start of every epoch."""
    from transformers import TrainerCallback

    class _Regroup(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            dataset.set_epoch(int(state.epoch or 0))

    return _Regroup()


# --- training: the fast loop or the Trainer ---------------------------------------------------------------


def fast_path_decision(s: FinetuneSettings, the_plan: Any, trainee: Any) -> tuple[bool, str]:
    """(train with common.training.fast_train, why): its own conditions (one CUDA GPU, plain strategy, bf16, full or
    freeze-encoder) plus the stage's (not switched off, no packed windows)."""
    if s.fast_path == "off":
        return False, "fast_path=off: the Hugging Face Trainer"
    from common.training.fast_train import fast_path_applies

    ok, why = fast_path_applies(the_plan, trainee)
    if not ok:
        return False, f"{why}: the Hugging Face Trainer"
    if s.pack_clips > 1:
        return False, "pack_clips > 1: packed windows are regrouped every epoch by a Trainer callback: the Trainer"
    return True, why


def deepspeed_rendezvous(the_plan: Any, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables a stage process not started by a launcher needs to train with DeepSpeed on its one GPU (empty
    when none are needed): DeepSpeed always joins a torch.distributed group, and without RANK / WORLD_SIZE /
    MASTER_ADDR / ... it tries MPI discovery and fails (no mpi4py). A one-rank group on a free local port."""
    from common.training.launch import is_worker

    env = os.environ if env is None else env
    if not the_plan.value("deepspeed") or is_worker(env):
        return {}
    assert the_plan.world_size == 1, "world size > 1 is launched (launch_finetune) before training starts"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
            "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}


def train_with_trainer(ctx: StageContext, trainee: Any, the_plan: Any, train_ds: Any, eval_ds: Any, collator: Any,
                       resume: Path | None) -> dict[str, Any]:
    """The Hugging Face Trainer (DDP between launched workers, DeepSpeed when the plan says so)."""
    from transformers import Seq2SeqTrainingArguments

    from common.training.launch import backend_for, is_rank_zero
    from common.training.planner import training_arguments_kwargs
    from common.core.settings import environment
    from common.training.train import make_trainer

    s: FinetuneSettings = ctx.settings  # type: ignore[assignment]
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(ctx.out / TENSORBOARD)  # transformers >= 5
    extra_args: dict[str, Any] = {
        "seed": s.seed, "report_to": ["tensorboard"], "disable_tqdm": False, "remove_unused_columns": False,
        "label_names": ["labels"], "prediction_loss_only": True, "logging_first_step": True,
        "dataloader_pin_memory": the_plan.device == "cuda",
    }
    if the_plan.world_size > 1:
        extra_args["ddp_backend"] = backend_for(the_plan.device)
    if "logging_dir" in inspect.signature(Seq2SeqTrainingArguments).parameters:  # transformers < 5
        extra_args["logging_dir"] = str(ctx.out / TENSORBOARD)
    kwargs = training_arguments_kwargs(the_plan, ctx.out / CHECKPOINTS, **extra_args)
    rendezvous = deepspeed_rendezvous(the_plan)
    if rendezvous:
        log.info("DeepSpeed on one GPU: a one-process torch.distributed group on 127.0.0.1:%s",
                 rendezvous["MASTER_PORT"])
    with environment(rendezvous):
        args = Seq2SeqTrainingArguments(**kwargs)
        rank_zero = is_rank_zero()
        trainer = make_trainer(trainee, args, train_ds, collator, on_save=ctx.sync if rank_zero else None,
                               eval_dataset=eval_ds,
                               callbacks=[regroup_each_epoch(train_ds)] if s.pack_clips > 1 else [])
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if rank_zero:
        trainer.state.save_to_json(str(ctx.out / "trainer_state.json"))
    if the_plan.value("deepspeed"):
        # final/ comes from the last ZeRO checkpoint: let go of the engine, its partitions and (offloaded)
        # optimizer state first, so the fresh fp32 copy has the memory
        trainer.accelerator.free_memory()
    return {
        "global_step": trainer.state.global_step,
        "train_loss": round(result.training_loss, 4) if result.training_loss is not None else None,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }


FAST_SPEED_KEYS = ("samples_per_s", "median_step_seconds", "compiled_layers", "attention", "peak_gpu_bytes")


def train_with_fast_path(ctx: StageContext, trainee: Any, the_plan: Any, train_ds: Any, eval_ds: Any, collator: Any,
                         resume: Path | None) -> dict[str, Any]:
    """common.training.fast_train on one GPU; its checkpoints go where the Trainer's would (checkpoints/checkpoint-N)."""
    from common.training.fast_train import FastOptions, train_fast

    s: FinetuneSettings = ctx.settings  # type: ignore[assignment]
    result = train_fast(
        trainee, train_ds, collator, the_plan, ctx.out / CHECKPOINTS, on_checkpoint=lambda _path: ctx.sync(),
        resume_from=resume, eval_dataset=eval_ds,
        options=FastOptions(seed=s.seed, tensorboard_dir=str(ctx.out / TENSORBOARD)),
    )
    state = {"global_step": result["global_step"], "max_steps": result["max_steps"],
             "log_history": result["log_history"], "fast_path": True}
    atomic_write_bytes(ctx.out / "trainer_state.json", json.dumps(state, indent=1, ensure_ascii=False).encode())
    return {
        "global_step": result["global_step"],
        "train_loss": result["train_loss"],
        "losses": [h["loss"] for h in result["log_history"] if "loss" in h],
        "speed": {"fast_path_speed": {k: result.get(k) for k in FAST_SPEED_KEYS}},
    }


# --- final/: from the trained module, or from the last ZeRO checkpoint ------------------------------------

FINAL_FROM_MODULE = "trained module"
FINAL_FROM_ZERO = "zero checkpoint"


def final_weights_source(the_plan: Any, fast_path: bool) -> tuple[str, str]:
    """Where final/'s weights come from, and why: FINAL_FROM_MODULE (the module that trained holds them in fp32)
    or FINAL_FROM_ZERO (DeepSpeed: the fp32 master weights of the last ZeRO checkpoint, read on the CPU)."""
    config = the_plan.value("deepspeed")
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


def final_trainee_from_zero(ctx: StageContext, model_dir: Path, spec: Any, global_step: int) -> Any:
    """A fresh CPU trainee with the fp32 master weights of checkpoints/checkpoint-<global_step> (the Trainer saves
    one at the last step: save_strategy "steps" saves when training ends)."""
    from common.training.train import TrainError, checkpoint_step, last_checkpoint, trainee_from_zero_checkpoint
    from common.training.zero_export import ZeroCheckpointError

    last = last_checkpoint(ctx.out / CHECKPOINTS)
    if last is None or checkpoint_step(last) != global_step:
        raise StageFailed(
            f"final/ of a DeepSpeed run is built from the checkpoint of the last step, "
            f"{CHECKPOINTS}/checkpoint-{global_step}, but the newest complete one is {last}; run the stage again "
            "(it resumes) or with --force"
        )
    try:
        return trainee_from_zero_checkpoint(last, model_dir, spec)
    except (ZeroCheckpointError, TrainError) as e:
        raise StageFailed(f"cannot build final/ from {last}: {e}") from None


# --- several processes: the stage launches its own workers ------------------------------------------------


@dataclass(frozen=True)
class WorkerJob:
    """What a launched worker takes from the parent: the plan (so every rank trains the same one) and the
    resume decision (made once, before the workers start: they never race on the checkpoints folder)."""

    plan: Any
    resume: Path | None


def world_size_note(the_plan: Any) -> str | None:
    """A log line when the plan trains on fewer GPUs than the machine has (e.g. too little data), else None."""
    gpus = the_plan.resources.gpus
    if the_plan.device != "cuda" or the_plan.world_size >= gpus:
        return None
    return f"training on {the_plan.world_size} of {gpus} GPUs: {the_plan.decision('world_size').reason}"


def launcher_info(the_plan: Any, worker: WorkerJob | None) -> dict[str, Any]:
    from common.training.launch import backend_for

    n = the_plan.world_size
    return {"processes": n, "backend": backend_for(the_plan.device) if n > 1 else None,
            "launched_by_stage": worker is not None}


def launch_reason(the_plan: Any, worker: WorkerJob | None) -> str:
    from common.training.launch import backend_for

    n = the_plan.world_size
    if n == 1:
        return "world_size 1: training in the stage's own process"
    how = "started by this stage" if worker is not None else "started by an outside launcher"
    return (f"world_size {n}: {n} worker processes {how} (torch.distributed elastic, as torchrun --standalone), "
            f"backend {backend_for(the_plan.device)}; rank 0 writes plan.json, checkpoints and final/")


def launch_finetune(ctx: StageContext, the_plan: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """The parent of a multi-process run: decide the resume once, start one worker per rank, wait; returns
    rank 0's summary (with every rank's step count) for the manifest run_stage writes."""
    from common.training.launch import WorkerFailed, launch_workers

    resume = checkpoint_to_resume(ctx, run_signature(ctx, the_plan, inputs, fast_path=False))
    job = WorkerJob(plan=the_plan, resume=resume)
    try:
        results = launch_workers(finetune_worker, (ctx.settings, str(ctx.out), job), the_plan.world_size,
                                 device=the_plan.device)
    except WorkerFailed as e:
        raise StageFailed(f"finetune worker rank {e.rank} of {the_plan.world_size} failed: {e.message}") from None
    first = results[0]
    # rank 0 uploaded while it trained; tell this process's context what is already in the store (no re-upload)
    ctx.adopt_upload_record(first["uploads"])
    summary = first["summary"]
    summary["ranks"] = [{"rank": r, "global_step": results[r]["global_step"] if r else summary["global_step"],
                         "train_loss": results[r]["train_loss"] if r else summary["train_loss"]}
                        for r in sorted(results)]
    return summary


def finetune_worker(settings: FinetuneSettings, out: str, job: WorkerJob) -> dict[str, Any]:
    """One launched rank (runs in its own process): the stage body in ``out`` with the parent's plan. No skip
    check, no manifest: the parent's run_stage does those once."""
    from common.training.launch import is_rank_zero, local_rank, setup_worker_logging
    from common.core.store import open_store

    setup_worker_logging(settings.log_level)
    if job.plan.device == "cuda":
        import torch

        torch.cuda.set_device(local_rank())  # "cuda" in the body now means this rank's GPU
    ctx = StageContext(STAGE, settings, open_store(settings.artifacts, settings.s3), settings.run_id, Path(out))
    summary = finetune(ctx, worker=job)
    if not is_rank_zero():
        return summary
    return {"summary": summary, "uploads": ctx.upload_record()}


# --- the body -------------------------------------------------------------------------------------------


def _threads(s: FinetuneSettings) -> int:
    import torch

    from common.training.launch import local_world_size
    from common.training.planner import detect_resources

    n = s.threads or max(1, detect_resources(gpus=0).cpu_count // local_world_size())  # shared by the workers
    torch.set_num_threads(n)
    return n


def _holdout(examples: list, n: int, seed: int) -> tuple[list, list]:
    if n <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def finetune(ctx: StageContext, worker: WorkerJob | None = None) -> dict[str, Any]:
    """The stage body. ``worker``: set in a launched worker process (finetune_worker), which trains with the
    parent's plan and resume decision; rank 0 alone writes plan.json, trainer_state.json and final/."""
    import psutil
    from transformers import set_seed

    from common.training.launch import is_rank_zero, needs_launch, worker_rank
    from common.core.records import transcript
    from common.training.train import (
        ModeSpec,
        cache_pays,
        encode_frozen,
        frozen_bottom_cacheable,
        load_whisper,
        make_trainee,
        merge_factors,
        save_final,
    )
    from common.families.whisper.data import (
        FeatureSource,
        PackedWhisperDataset,
        WhisperCollator,
        WhisperDataset,
        cache_matches,
        clip_samples,
        context_frames,
        make_examples,
        prompt_ids,
    )

    s: FinetuneSettings = ctx.settings  # type: ignore[assignment]
    t_start = time.perf_counter()
    threads = _threads(s)
    set_seed(s.seed)
    ext = ctx.input_dir("extract")
    model_dir = ctx.input_dir("pretrained") / "model"
    inputs = finetune_inputs(s, ctx.store)

    # 1. model and targets
    model, tokenizer, fe = load_whisper(model_dir)
    prompt = prompt_ids(tokenizer)
    records = read_jsonl(ext / "train.jsonl")
    examples, rejected = make_examples(records, tokenizer, prompt)
    for r in rejected:
        log.warning("not training on %s: %s", r["id"], r["reason"])
    if not examples:
        raise StageFailed("no usable training clip (see the warnings above); check extract/train.jsonl", exit_code=2)
    by_id = {r["id"]: r for r in records}

    # 2. plan, written before training
    longest = max(float(by_id[e.id].get("duration") or 30.0) for e in examples)
    frames, context_reason = context_frames(s.context_seconds, longest)
    longest_labels = max(len(e.labels) for e in examples)
    n_samples = -(-len(examples) // s.pack_clips)  # what the Trainer iterates over: clips, or packed windows
    if s.pack_clips > 1:
        frames, context_reason = 3000, (f"full 30-s windows, each packing up to {s.pack_clips} clips "
                                        f"({n_samples} windows per epoch for {len(examples)} clips)")
        longest_labels = min(448, longest_labels * s.pack_clips)
    the_plan = worker.plan if worker else make_plan(s, model.config, n_samples, longest_labels, frames // 2)
    note = world_size_note(the_plan)
    if note and is_rank_zero():
        log.warning("%s", note)
    if worker is None and needs_launch(the_plan.world_size):
        del model, examples  # each worker loads its own copy
        return launch_finetune(ctx, the_plan, inputs)
    device = the_plan.device
    train_ex, eval_ex = _holdout(examples, the_plan.value("eval_holdout"), s.seed)
    lora = the_plan.lora
    spec = ModeSpec(
        mode=the_plan.mode, frozen_encoder_layers=s.frozen_encoder_layers,
        lora_r=lora.r if lora else s.lora_r, lora_alpha=lora.alpha if lora else s.lora_alpha,
        lora_dropout=s.lora_dropout, lora_targets=tuple(s.lora_targets or lora.targets) if lora else (),
        lora_parts=tuple(lora.parts or ("encoder", "decoder")) if lora else (), label_smoothing=s.label_smoothing,
    )
    trainee = make_trainee(model, spec)
    trainable = sum(p.numel() for p in trainee.parameters() if p.requires_grad)

    use_mel_cache, mel_reason = cache_matches(ext, fe)
    needs_audio = not use_mel_cache or any("features" not in by_id[e.id] for e in examples)
    run_dir = ctx.input_dir("prepare").parent if needs_audio else None  # records' audio_path is run-relative
    features = FeatureSource(fe, run_dir, ext if use_mel_cache else None)
    bytes_per_clip = frames // 2 * model.config.d_model * 4
    cache_on, cache_reason = cache_pays(
        s.encoder_cache, frozen_bottom_cacheable(trainee), float(the_plan.value("epochs")),
        len(examples), bytes_per_clip, psutil.virtual_memory().available,
    )
    if s.pack_clips > 1:
        cache_on, cache_reason = False, "packed windows are regrouped every epoch: nothing fixed to cache"
    fast, fast_reason = fast_path_decision(s, the_plan, trainee)
    log.info("fast path 快速训练: %s (%s)", "on" if fast else "off", fast_reason)
    extra = {
        "frozen_encoder_layers": trainee.frozen_layers,
        "encoder_cache": cache_on,
        "trainable_params": trainable,
        "threads": threads,
        "label_smoothing": s.label_smoothing,
        "merge_alpha": merge_factors(s.merge_alpha, s.merge_alpha_encoder, s.merge_alpha_decoder),
        "train_clips": len(train_ex),
        "eval_clips": len(eval_ex),
        "train_context_seconds": frames / 100,
        "pack_clips": s.pack_clips,
        "fast_path": fast,
        "world_size": the_plan.world_size,
        "launcher": launcher_info(the_plan, worker),
        "reasons": {
            "training window": context_reason,
            "log-mel source": ("extract's float16 cache: " if use_mel_cache else "computed from audio: ") + mel_reason,
            "encoder cache": cache_reason,
            "fast path": fast_reason,
            "processes": launch_reason(the_plan, worker),
        },
    }
    if is_rank_zero():
        write_plan(ctx.out / "plan.json", the_plan, extra)
        ctx.sync()

    # 3. inputs per clip (or per packed window)
    def dataset(exs: list):
        def mel_of(i: int):
            return features(by_id[exs[i].id])[:, :frames]

        if s.pack_clips > 1:
            audio = [clip_samples(by_id[e.id], ctx.input_dir("prepare").parent) for e in exs]
            return PackedWhisperDataset(exs, [transcript(by_id[e.id]) for e in exs], audio.__getitem__, fe,
                                        tokenizer, prompt, s.pack_clips, s.pack_gap_seconds, s.seed)

        if not cache_on:
            return WhisperDataset(exs, mel_of, "input_features")
        hidden = encode_frozen(trainee, mel_of, len(exs), device=device)
        return WhisperDataset(exs, lambda i: hidden[i], "encoder_hidden")

    trainee.to(device)
    t0 = time.perf_counter()
    train_ds = dataset(train_ex)
    eval_ds = dataset(eval_ex) if eval_ex else None
    cache_seconds = time.perf_counter() - t0

    # 4. train (resuming when possible): the fast loop or the Hugging Face Trainer
    resume = worker.resume if worker else checkpoint_to_resume(ctx, run_signature(ctx, the_plan, inputs, fast))
    collator = WhisperCollator(model.config.pad_token_id)
    t0 = time.perf_counter()
    train = train_with_fast_path if fast else train_with_trainer
    trained = train(ctx, trainee, the_plan, train_ds, eval_ds, collator, resume)
    train_seconds = time.perf_counter() - t0
    if not is_rank_zero():
        return {"rank": worker_rank(), "global_step": trained["global_step"], "train_loss": trained["train_loss"]}

    # 5. final model: from the trained module, or (DeepSpeed) from the fp32 master weights of the last checkpoint
    source, source_reason = final_weights_source(the_plan, fast)
    log.info("final/ weights 最终权重: %s (%s)", source, source_reason)
    if source == FINAL_FROM_ZERO:
        del trainee, model, train_ds, eval_ds  # the partitioned / 16-bit training copies (and any encoder cache)
        gc.collect()
        trainee = final_trainee_from_zero(ctx, model_dir, spec, trained["global_step"])
    final = save_final(trainee, ctx.out / FINAL, tokenizer, fe, model_dir,
                       merge_factors(s.merge_alpha, s.merge_alpha_encoder, s.merge_alpha_decoder))
    final["weights_from"] = source
    losses = trained["losses"]
    summary = {
        "mode": spec.mode,
        "device": device,
        "world_size": the_plan.world_size,
        "fast_path": fast,
        "global_step": trained["global_step"],
        "resumed_from": resume.name if resume else None,
        "train_loss": trained["train_loss"],
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        **trained.get("speed", {}),
        "train_seconds": round(train_seconds, 1),
        "encoder_cache_seconds": round(cache_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "train_clips": len(train_ex),
        "trainable_params": trainable,
        "final": final,
    }
    log.info("finetune summary: %s", json.dumps(summary, ensure_ascii=False))
    return summary
