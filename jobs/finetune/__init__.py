"""The finetune stage: extract's records + the pretrained model → plan.json, checkpoints, final/.

    inputs = finetune_inputs(settings, store)   # fingerprints of the extract and pretrained stages
    summary = finetune(ctx)                     # plan → train (here, or one worker per rank) → final model

Reads top to bottom (each step logged):

1. Plan (jobs/finetune/plan.py → common.training.planner) from the model's config.json, extract's
   data_facts.json and this machine: device, precision, world size, mode, batch, accumulation, epochs, lr,
   warmup, save_steps (never above the total steps), evaluation hold-out (none on small data), memory setup.
   No weights are loaded to plan. Every decision can be forced with a setting; plan.json is written and logged
   before any weight is loaded.
2. Train: world size 1 trains in this process; larger world sizes start one worker process per rank
   (``common.training.launch``: torch.distributed elastic as ``torchrun --standalone``, nccl on CUDA, gloo on
   CPU) after deciding the resume once. Each rank (``train_rank``) builds the model family's examples,
   trainee and datasets (common/families/), decides the loop (jobs/finetune/loops.py: the fast loop or the
   Hugging Face Trainer), resumes from the last complete checkpoint of the same setup (jobs/finetune/resume.py)
   and trains. The stage's own decisions (training window, feature source, encoder cache, loop, processes)
   join the planner's in plan.json's decision log.
3. final/ (rank 0): the family's model folder (whisper: LoRA merged, per-part WiSE-FT) from the trained module,
   or after a DeepSpeed run from the fp32 master weights of the last ZeRO checkpoint; with a guard set, the
   candidate the forgetting guard chooses (jobs/finetune/guard.py: scored on the guard set and on training
   clips held aside before training, never on the test set; guard.json); ``trainer_state.json``
   (loss history) beside it. This process writes the manifest; a failed rank fails the stage with that rank's
   error and traceback.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from common.core.records import read_jsonl
from common.core.settings import StageSettings
from common.core.stage import StageContext, StageFailed, upstream_fingerprint
from common.core.store import Store, atomic_write_bytes
from common.families import Candidate, ModelFamily, family_of_pretrained
from common.training.planner import Plan
from jobs.evaluate import SetSpec

log = logging.getLogger(__name__)

STAGE = "finetune"
FINAL = "final"


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "swanlab": "swanlab"}
ADAPTER = "adapter"  # LoRA runs: the trained adapter in PEFT's format, next to final/
class GuardSpec(SetSpec):
    """The guard set: any test set (evaluate's forms), named "guard" unless named."""

    name: str = Field("guard", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="set name in reports")


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
        None, description="linear layers that get LoRA [default: the family's — whisper: q_proj k_proj v_proj out_proj fc1 "
        "fc2; kimi-audio: the LLM layers' q/k/v/o/gate/up/down_proj]",
        examples=[["q_proj", "v_proj"]],
    )
    lora_parts: list[Literal["encoder", "decoder"]] | None = Field(
        None, description="whisper: where LoRA goes [default: encoder and decoder]", examples=[["decoder"]],
    )
    lora_encoder_layers: int | None = Field(
        None, ge=1, description="whisper: LoRA only in the encoder's lowest N layers [default: all of them]; the "
        "layers above keep the pretrained weights", examples=[3],
    )
    frozen_encoder_layers: int = Field(
        0, ge=0, description="whisper: bottom encoder layers (+ conv front-end) kept frozen; their output is computed "
        "once per clip, so epochs run only the layers above (faster on CPU)", examples=[0, 3],
    )
    context_seconds: float = Field(
        30.0, ge=1, le=30, description="whisper: train on the first N seconds of Whisper's 30-s window (never shorter than "
        "the longest clip + 1 s); < 30 makes each step several times cheaper; decoding always uses 30 s",
        examples=[30, 8],
    )
    pack_clips: int = Field(
        1, ge=1, le=16, description="whisper: join up to N clips (regrouped every epoch, 0.3 s of silence between, "
        "transcripts joined) into one 30-s window: N x fewer encoder passes for short clips", examples=[1, 4],
    )
    pack_gap_seconds: float = Field(0.3, ge=0, le=2, description="silence between packed clips, seconds")
    encoder_cache: Literal["auto", "memory", "never"] = Field(
        "auto", description="whisper: keep the frozen encoder bottom's output per clip in RAM: auto = when epochs reuse it "
        "and it fits half the free RAM",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the token cross-entropy")
    merge_alpha: float = Field(
        1.0, ge=0, le=1, description="final = pretrained + alpha x (fine-tuned - pretrained) (WiSE-FT; 1 = as "
        "trained; lower keeps more of the pretrained model's general skill)", examples=[1.0, 0.8],
    )
    merge_alpha_encoder: float | None = Field(
        None, ge=0, le=1, description="whisper: merge factor of the encoder's weights [default: merge_alpha]; the encoder "
        "holds the acoustic skill", examples=[0.7],
    )
    merge_alpha_decoder: float | None = Field(
        None, ge=0, le=1, description="whisper: merge factor of the decoder's weights [default: merge_alpha]; the decoder "
        "holds the language model (lower: less drift toward the training sentences)", examples=[0.5],
    )
    guard: GuardSpec | None = Field(
        None, description="general-domain speech the model must not get worse on (the forgetting guard): after "
        "training, the family's candidates (whisper: WiSE-FT merges) are scored on it and on clips of the training "
        "data held aside (choice_holdout), and final/ is the best on the domain whose guard CER is within "
        "guard_tolerance of the pretrained model's (YAML: {name, csv + audio_dir | dir, optional, include_ids}; "
        "flags: --guard-dir FOLDER, or --guard-csv FILE --guard-audio-dir DIR)",
        examples=["general=dir:data/general-zh", "general=data/general.csv,data/general_audio"],
    )
    guard_tolerance: float = Field(
        1.0, ge=0, le=100, description="CER points the chosen model may lose on the guard set: a candidate passes "
        "when the upper end of the 95 % paired-bootstrap interval of its guard CER minus the pretrained "
        "model's is at most this", examples=[1.0, 0.5],
    )
    guard_fallback: Literal["closest", "pretrained"] = Field(
        "closest", description="when no candidate meets the tolerance: closest = keep the candidate with the "
        "least evidence of forgetting (and say so), pretrained = keep the pretrained weights",
    )
    choice_holdout: int | None = Field(
        None, ge=0, description="training clips held aside (never trained on) to score the candidates on your "
        "domain [default with a guard set: 10 % of the clips, 8..40; none under 40 clips or without a guard]",
        examples=[30],
    )
    merge_candidates: list[str] | None = Field(
        None, description="whisper: the WiSE-FT merges the guard scores, as ENCODER/DECODER shares of the "
        "training's change kept [default: by what trained; see README]", examples=[["1/1", "1/0.5", "0.8/0.5"]],
    )
    eval_holdout: int | None = Field(None, ge=0, description="training clips held out for eval loss [default: "
                                     "planner: 5 % when that is >= 16 clips, else none]")
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "swanlab", "none"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="where training curves (loss, eval loss, learning rate) go, through transformers' "
                    "integrations: tensorboard (in finetune/tensorboard/), mlflow, wandb, swanlab, or none; each "
                    "but tensorboard needs its package and its own settings (e.g. MLFLOW_TRACKING_URI, "
                    "WANDB_PROJECT) and trains with the Trainer (the fast path writes TensorBoard only)",
        examples=["tensorboard", "mlflow"],
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="force any planner decision by name (JSON), e.g. "
        '{"world_size": 1, "strategy": "zero2"}', examples=['{"save_steps": 10}'],
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # "mlflow", "tensorboard,mlflow" or a JSON list
            value = json.loads(value) if value.strip().startswith("[") else [v.strip() for v in value.split(",")]
        return value

    @field_validator("guard", mode="before")
    @classmethod
    def _guard_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return SetSpec.parse(value) if value.strip() else None
        return value

    @field_validator("merge_candidates", mode="before")
    @classmethod
    def _candidate_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if value is not None:  # "1/1 0.8/0.5" or "1/1,0.8/0.5" in one flag, or a list
            value = [v for item in value for v in str(item).replace(",", " ").split()]
        for v in value or []:
            enc, sep, dec = str(v).partition("/")
            try:
                ok = bool(sep) and 0 <= float(enc) <= 1 and 0 <= float(dec) <= 1
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"merge candidate {v!r}: expected ENCODER/DECODER shares between 0 and 1, e.g. 0.8/0.5")
        return value

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
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError(f"report_to {self.report_to}: 'none' cannot be combined with a tracker")
        missing = [t for t in self.report_to if t != "none" and importlib.util.find_spec(TRACKER_PACKAGES[t]) is None]
        if missing:
            raise ValueError(f"report_to {missing}: not installed here; pip install "
                             f"{' '.join(TRACKER_PACKAGES[t] for t in missing)}, or drop it from report_to")
        if self.mode == "freeze-encoder" and self.frozen_encoder_layers:
            raise ValueError("--frozen-encoder-layers has no meaning with --mode freeze-encoder (the whole encoder "
                             "is frozen); drop one of them")
        return self


def save_peft_adapter(trainee: Any, out: Path) -> str | None:
    """A LoRA trainee's adapter in PEFT's own format (adapter_config.json + adapter_model.safetensors, loadable
    with ``PeftModel.from_pretrained(base, out)``); None when the trainee has no PEFT adapter."""
    from peft import PeftModel

    from common.core.files import atomic_dir

    owner = getattr(trainee, "owner", trainee)
    if not isinstance(owner, PeftModel):
        return None
    with atomic_dir(out) as tmp:
        owner.save_pretrained(str(tmp), safe_serialization=True)
    log.info("LoRA adapter (PEFT format) → %s", out)
    return out.name


def finetune_inputs(settings: FinetuneSettings, store: Store) -> dict[str, Any]:
    return {stage: upstream_fingerprint(store, settings.run_id, stage) for stage in ("extract", "pretrained")}


# --- the stage ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankJob:
    """What every rank trains: the plan, the stage's inputs, and (for launched workers) the resume decision,
    made once by the parent before the workers start, so they never race on the checkpoints folder."""

    plan: Plan
    inputs: dict[str, Any]
    launched: bool = False
    resume: Path | None = None


def finetune(ctx: StageContext) -> dict[str, Any]:
    """The stage body: plan, train (here, in one worker per rank, or as rank 0 of an outside launcher's world),
    summary for the manifest."""
    from common.training.launch import is_worker, launcher_topology, needs_launch
    from common.training.planner import detect_resources
    from jobs.finetune.plan import DATA_FACTS, make_plan, read_json

    s: FinetuneSettings = ctx.settings  # type: ignore[assignment]
    t_start = time.perf_counter()
    model_dir, family = pretrained_model(ctx)
    inputs = finetune_inputs(s, ctx.store)

    # 1. plan: config.json + extract's data facts + this machine; written before any weight is loaded
    config = read_json(model_dir / "config.json", "the pretrained model's config")
    facts = read_json(ctx.input_dir("extract") / DATA_FACTS, "extract's data facts")
    for r in facts.get("rejected", []):
        log.warning("not training on %s: %s", r["id"], r["reason"])
    resources = detect_resources(gpus=0) if s.device == "cpu" else detect_resources()
    outside = is_worker()  # one rank of a world torchrun (e.g. a TrainJob's nodes) started
    the_plan, _ = make_plan(s, family, config, facts, resources, launcher=launcher_topology() if outside else None)
    launched = needs_launch(the_plan.world_size)
    record_processes(the_plan, launched)
    if note := world_size_note(the_plan):
        log.warning("%s", note)
    write_plan(ctx, the_plan)

    # 2. train: in this process, one worker process per rank, or as rank 0 of the launcher's world
    if launched:
        summary = launch(ctx, the_plan, inputs)
    elif outside:
        summary = lead_the_world(ctx, the_plan, inputs)
    else:
        summary = train_rank(ctx, RankJob(the_plan, inputs))["summary"]
    return {**summary, "total_seconds": round(time.perf_counter() - t_start, 1)}


def pretrained_model(ctx: StageContext) -> tuple[Path, ModelFamily]:
    from common.families import FamilyError

    pretrained = ctx.input_dir("pretrained")
    try:
        return pretrained / "model", family_of_pretrained(pretrained)
    except FamilyError as e:
        raise StageFailed(str(e), exit_code=2) from None


def train_rank(ctx: StageContext, job: RankJob) -> dict[str, Any]:
    """One rank's training (the only rank, or a launched worker): examples → trainee → datasets → loop →
    (rank 0) final/. Returns this rank's steps and loss; rank 0 adds the stage summary."""
    from transformers import set_seed

    from common.training.launch import is_rank_zero, worker_rank
    from jobs.finetune.guard import held_aside
    from jobs.finetune.loops import (
        FINAL_FROM_ZERO,
        fast_path_decision,
        final_trainee_from_zero,
        final_weights_source,
        train_with_fast_path,
        train_with_trainer,
    )
    from jobs.finetune.resume import checkpoint_to_resume, run_signature

    s: FinetuneSettings = ctx.settings  # type: ignore[assignment]
    the_plan = job.plan
    values = s.model_dump()
    threads = _threads(s)
    set_seed(s.seed)
    model_dir, family = pretrained_model(ctx)
    records = read_jsonl(ctx.input_dir("extract") / "train.jsonl")
    by_id = {r["id"]: r for r in records}

    examples, _ = family.training_data(model_dir, records)
    aside = held_aside([e.id for e in examples], int(the_plan.value("choice_holdout")))
    choice_ex = [e for e in examples if e.id in aside]  # the domain slice of the guard's choice: never trained on
    examples = [e for e in examples if e.id not in aside]
    train_ex, eval_ex = _holdout(examples, the_plan.eval_holdout, s.seed)
    allocator = None
    if str(the_plan.device).startswith("cuda"):
        from common.training.trainer import allocator_decision

        allocator = allocator_decision()
    trainee = family.trainee(model_dir, the_plan, values)
    trainable = sum(p.numel() for p in trainee.parameters() if p.requires_grad)
    trainee.to(the_plan.device)
    t0 = time.perf_counter()
    built = family.datasets(model_dir, trainee, (train_ex, eval_ex), by_id,
                            {"extract": ctx.input_dir("extract"), "run": ctx.input_dir("prepare").parent},
                            the_plan, values)
    dataset_seconds = time.perf_counter() - t0
    from common.training.trainer import freeze_gc

    freeze_gc()  # the examples and the model live until the end
    fast, fast_reason = fast_path_decision(s.fast_path, the_plan, trainee, built)
    trackers = sorted(set(s.report_to) - {"tensorboard", "none"})
    if fast and trackers:
        fast, fast_reason = False, f"report_to {trackers} goes through transformers' integrations: the Trainer"
    log.info("fast path 快速训练: %s (%s)", "on" if fast else "off", fast_reason)
    for name, value, reason in [
        *built.decisions,
        ("fast_path", fast, fast_reason),
        ("train_clips", len(train_ex), f"{len(examples) + len(choice_ex)} usable clips, {len(choice_ex)} held aside "
                                       f"for the guard's choice, {len(eval_ex)} held out for the eval loss"),
        ("trainable_params", trainable, f"mode {the_plan.mode}"),
        ("threads", threads, "--threads" if s.threads else "the CPUs this process may use, shared by the ranks"),
        *([("cuda_expandable_segments", *allocator)] if allocator else []),
    ]:
        the_plan.record(name, value, reason)
    if is_rank_zero():
        write_plan(ctx, the_plan)

    resume = job.resume if job.launched else checkpoint_to_resume(
        ctx, run_signature(ctx, the_plan, job.inputs, "fast" if fast else "trainer"))
    t0 = time.perf_counter()
    trained = (train_with_fast_path if fast else train_with_trainer)(ctx, trainee, the_plan, built, resume)
    train_seconds = time.perf_counter() - t0
    result = {"rank": worker_rank(), "global_step": trained["global_step"], "train_loss": trained["train_loss"]}
    if not is_rank_zero():
        return result

    # 3. final model: from the trained module, or (DeepSpeed) from the fp32 master weights of the last checkpoint
    source, source_reason = final_weights_source(the_plan, fast)
    log.info("final/ weights 最终权重: %s (%s)", source, source_reason)
    if source == FINAL_FROM_ZERO:
        del trainee  # the partitioned / 16-bit training copies (and any cached features)
        gc.collect()
        trainee = final_trainee_from_zero(ctx, family, model_dir, the_plan, trained["global_step"])
    adapter = save_peft_adapter(trainee, ctx.out / ADAPTER)  # the trained adapter, before any merge
    del built  # the training datasets (and any cached features): the guard decodes next
    gc.collect()
    final = guarded_final(ctx, family, trainee, model_dir, choice_ex, by_id, the_plan)
    if final is None:
        final = family.save_final(trainee, ctx.out / FINAL, model_dir, values)
    if adapter:
        final["adapter"] = adapter
    final["weights_from"] = source
    losses = trained["losses"]
    summary = {
        "mode": the_plan.mode,
        "device": the_plan.device,
        "world_size": the_plan.world_size,
        "fast_path": fast,
        "global_step": trained["global_step"],
        "resumed_from": resume.name if resume else None,
        "train_loss": trained["train_loss"],
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "eval_losses": trained.get("eval_losses") or [],  # [step, loss on the held-out clips]
        "report_to": list(s.report_to),
        **trained.get("speed", {}),
        "train_seconds": round(train_seconds, 1),
        "dataset_seconds": round(dataset_seconds, 1),
        "train_clips": len(train_ex),
        "trainable_params": trainable,
        "final": final,
    }
    log.info("finetune summary: %s", json.dumps(summary, ensure_ascii=False))
    return {**result, "summary": summary}


def guarded_final(ctx: StageContext, family: ModelFamily, trainee: Any, model_dir: Path, choice_ex: list,
                  records: dict[str, dict], the_plan: Plan) -> dict[str, Any] | None:
    """final/ chosen by the forgetting guard (jobs/finetune/guard.py), or None when there is no guard (or its
    optional set is missing): then final/ follows the merge_alpha settings."""
    import tempfile

    from jobs.finetune.guard import domain_utterances, load_guard_set, run_guard, write_guard

    s: FinetuneSettings = ctx.settings  # type: ignore[assignment]
    if s.guard is None:
        return None
    offer = getattr(family, "candidates", None)
    with tempfile.TemporaryDirectory(prefix="asrft-guard-set-") as work:
        guard = load_guard_set(s.guard, ctx.store, s.run_id, Path(work), s.s3)
        if guard is None:
            the_plan.record("guard", None, f"guard set {s.guard.name!r} not found (optional): no choice; final/ "
                            "follows merge_alpha")
            write_plan(ctx, the_plan)
            return None
        if offer is not None:
            candidates = offer(trainee, model_dir, s.model_dump())
        else:
            candidates = [Candidate("final", "the trained model (the family offers no other candidate)",
                                    lambda dest: family.save_final(trainee, dest, model_dir, s.model_dump()))]
        domain = domain_utterances(choice_ex, records, ctx.input_dir("prepare").parent)
        choice, report = run_guard(family, candidates, model_dir, domain, guard, s, the_plan.device, ctx.out / FINAL)
    write_guard(ctx.out, report)
    the_plan.record("guard", {"chosen": choice.chosen, "met_tolerance": choice.met_tolerance,
                              "tolerance_points": choice.tolerance_points, "guard_set": s.guard.name,
                              "guard_utterances": len(guard), "domain_utterances": len(domain),
                              "seconds": report["seconds"],
                              "candidates": [{"name": v.name, "domain_cer": v.domain_cer, "guard_cer": v.guard_cer,
                                              "guard_delta": v.guard_delta.as_dict() if v.guard_delta else None,
                                              "passes": v.passes, "reason": v.reason} for v in choice.candidates],
                              "pretrained": choice.pretrained}, choice.reason)
    write_plan(ctx, the_plan)
    if not choice.met_tolerance:
        log.warning("forgetting guard 遗忘防护: %s", choice.reason)
    return {**report["final"], "guard": {"chosen": choice.chosen, "met_tolerance": choice.met_tolerance}}


def write_plan(ctx: StageContext, the_plan: Plan) -> None:
    path = ctx.out / "plan.json"
    atomic_write_bytes(path, the_plan.to_json().encode())
    log.info("%s\nplan written to %s", the_plan.summary(), path)
    ctx.sync()


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


# --- several processes: the stage launches its own workers ------------------------------------------------


def world_size_note(the_plan: Plan) -> str | None:
    """A log line when the plan trains on fewer GPUs than the machine has (e.g. too little data), else None."""
    gpus = the_plan.resources.gpus
    if the_plan.device != "cuda" or the_plan.world_size >= gpus:
        return None
    return f"training on {the_plan.world_size} of {gpus} GPUs: {the_plan.decision('world_size').reason}"


def record_processes(the_plan: Plan, launched: bool) -> None:
    """The 'processes' decision: how many training processes, who starts them, which backend."""
    from common.training.launch import backend_for, is_worker

    n = the_plan.world_size
    backend = backend_for(the_plan.device) if n > 1 else None
    if n == 1 and not is_worker():
        reason = "world_size 1: training in the stage's own process"
    elif launched:
        reason = (f"world_size {n}: {n} worker processes started by this stage (torch.distributed elastic, as "
                  f"torchrun --standalone), backend {backend}; rank 0 writes plan.json, checkpoints and final/")
    else:
        reason = (f"world_size {n}: {the_plan.nodes} node(s) x {the_plan.procs_per_node} process(es) started by an "
                  f"outside launcher (torchrun, e.g. a Kubeflow Trainer TrainJob), backend {backend}; global rank 0 "
                  "writes plan.json, checkpoints, final/ and the manifest; every rank reads the same inputs")
    the_plan.record("processes", {"processes": n, "nodes": the_plan.nodes, "backend": backend,
                                  "launched_by_stage": launched}, reason)


def launch(ctx: StageContext, the_plan: Plan, inputs: dict[str, Any]) -> dict[str, Any]:
    """The parent of a multi-process run: decide the resume once, start one worker per rank, wait; returns
    rank 0's summary (with every rank's step count) for the manifest run_stage writes."""
    from common.training.launch import WorkerFailed, launch_workers
    from jobs.finetune.resume import checkpoint_to_resume, run_signature

    resume = checkpoint_to_resume(ctx, run_signature(ctx, the_plan, inputs, "trainer"))
    job = RankJob(plan=the_plan, inputs=inputs, launched=True, resume=resume)
    try:
        results = launch_workers(finetune_worker, (ctx.settings, str(ctx.out), job), the_plan.world_size,
                                 device=the_plan.device)
    except WorkerFailed as e:
        raise StageFailed(f"finetune worker rank {e.rank} of {the_plan.world_size} failed: {e.message}") from None
    # rank 0 uploaded while it trained; tell this process's context what is already in the store (no re-upload)
    ctx.adopt_upload_record(results[0]["uploads"])
    summary = results[0]["summary"]
    summary["ranks"] = [{"rank": r, "global_step": results[r]["global_step"], "train_loss": results[r]["train_loss"]}
                        for r in sorted(results)]
    return summary


def finetune_worker(settings: FinetuneSettings, out: str, job: RankJob) -> dict[str, Any]:
    """One launched rank (runs in its own process): ``train_rank`` in ``out`` with the parent's plan. No skip
    check, no manifest: the parent's run_stage does those once."""
    from common.core.settings import secret_values
    from common.core.stage import register_secrets
    from common.core.store import open_store
    from common.training.launch import is_rank_zero, local_rank, setup_worker_logging

    setup_worker_logging(settings.log_level)
    register_secrets(secret_values(settings))
    if job.plan.device == "cuda":
        import torch

        torch.cuda.set_device(local_rank())  # "cuda" in the body now means this rank's GPU
    ctx = StageContext(STAGE, settings, open_store(settings.artifacts, settings.s3), settings.run_id, Path(out))
    result = train_rank(ctx, job)
    return {**result, "uploads": ctx.upload_record()} if is_rank_zero() else result


# --- several nodes: an outside launcher (torchrun on every node, e.g. a TrainJob) started the ranks ----------

_shared = {"done": False}  # rank 0 told the other ranks what to do (set by lead_the_world / run_as_rank)


def run_as_rank(settings: FinetuneSettings) -> int:
    """The stage as one rank of a world torchrun started (every node runs ``torchrun --module jobs.finetune``).
    Global rank 0 runs the stage as usual (skip check, plan, resume decision, manifest) and hands the plan and
    the resume decision to the other ranks; they train with it and write nothing of the stage's own. A rank
    that fails fails its node with its error; the others stop when their collectives lose it."""
    import torch

    from common.training.launch import join_process_group, leave_process_group, setup_worker_logging

    setup_worker_logging(settings.log_level)
    device = "cuda" if settings.device != "cpu" and torch.cuda.is_available() else "cpu"
    join_process_group(device)
    try:
        return _rank_work(settings)
    finally:
        leave_process_group()


def _rank_work(settings: FinetuneSettings) -> int:
    """run_as_rank's work once this process is in the world."""
    from common.core.stage import EXIT_FAILED, EXIT_OK, fail, run_stage
    from common.core.store import open_store
    from common.training.launch import is_rank_zero, share_from_rank_zero, worker_rank, worker_world_size

    if is_rank_zero():
        code = run_stage(STAGE, settings, lambda store: finetune_inputs(settings, store), finetune)
        if not _shared["done"]:  # skipped (already done) or failed before training: release the others
            share_from_rank_zero({"action": "skip" if code == EXIT_OK else "stop"})
        return code
    order = share_from_rank_zero(None)
    if order["action"] == "skip":
        log.info("%s: rank 0 found the stage done; nothing to train", STAGE)
        return EXIT_OK
    if order["action"] == "stop":
        return fail(STAGE, f"rank {worker_rank()}: rank 0 failed before training (its log says why)", EXIT_FAILED)
    rank = worker_rank()
    try:
        out = Path(order["out"])
        out.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(STAGE, settings, open_store(settings.artifacts, settings.s3), settings.run_id, out)
        bring_checkpoint_to_this_node(ctx, order["job"])
        result = train_rank(ctx, order["job"])
    except StageFailed as e:
        return fail(STAGE, f"rank {rank} of {worker_world_size()}: {e}", e.exit_code)
    except Exception as e:  # the rank's own error, whole, in its node's log and termination message
        log.exception("rank %d failed", rank)
        return fail(STAGE, f"rank {rank} of {worker_world_size()}: {type(e).__name__}: {e}", EXIT_FAILED)
    log.info("rank %d done: %d steps, train loss %s", rank, result["global_step"], result["train_loss"])
    return EXIT_OK


def lead_the_world(ctx: StageContext, the_plan: Plan, inputs: dict[str, Any]) -> dict[str, Any]:
    """Rank 0 of an outside launcher's world: decide the resume once, hand plan + resume to every rank, train."""
    from common.training.launch import share_from_rank_zero, worker_world_size
    from jobs.finetune.resume import checkpoint_to_resume, run_signature

    resume = checkpoint_to_resume(ctx, run_signature(ctx, the_plan, inputs, "trainer"))
    job = RankJob(plan=the_plan, inputs=inputs, launched=True, resume=resume)
    share_from_rank_zero({"action": "train", "job": job, "out": str(ctx.out)})
    _shared["done"] = True
    bring_checkpoint_to_this_node(ctx, job)
    try:
        result = train_rank(ctx, job)
    except StageFailed:
        raise
    except Exception as e:  # e.g. a collective that lost a rank: say so, the failed rank's node says why
        log.exception("rank 0 failed")
        raise StageFailed(f"rank 0 of {worker_world_size()}: {type(e).__name__}: {e} (when another rank failed "
                          "first, its node's log has the cause)") from None
    summary = result["summary"]
    summary["nodes"] = the_plan.nodes
    summary["procs_per_node"] = the_plan.procs_per_node
    return summary


def bring_checkpoint_to_this_node(ctx: StageContext, job: RankJob) -> None:
    """Every rank resumes from the same checkpoint folder path: on a shared volume it is there already; with S3
    artifacts each node's first process downloads it into the same staging path (rank 0's node has it).
    All ranks wait for that here (a barrier), so no rank reads a half-downloaded checkpoint."""
    import torch.distributed as dist

    from common.training.launch import local_rank, worker_rank
    from jobs.finetune.resume import restore_from_store

    if job.resume is not None and worker_rank() != 0 and local_rank() == 0 and not job.resume.is_dir():
        restore_from_store(ctx, "trainer")
    dist.barrier()
