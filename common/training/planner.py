"""Fine-tune planner: every automatic decision of the finetune stage, with its reason.

`plan()` takes a model profile (common/training/memory.py), the data set sizes, what the user asked for and
the machine (`detect_resources()`), and returns a `Plan`: a list of decisions
`{name, value, reason, overridden}`, the table of memory candidates it weighed, the DeepSpeed config
(generated from the plan, never a static file), the training pod's resources and the estimates
with their margins. `Plan.to_json()` is the content of plan.json. `training_arguments_kwargs()`
turns a plan into `Seq2SeqTrainingArguments` keywords the installed transformers accepts.

Each decision prevents a failure that a small fine-tune run by hand meets; a Kimi-Audio-7B fine-tune on
9 Chinese clips met all of them:
- world size never exceeds what the data can feed (9 samples on 8 GPUs hung in NCCL -> 1 GPU);
- `save_steps` never exceeds the total steps (a 9-clip fine-tune with save_steps=1000 ran 45 steps and never
  saved a checkpoint), and the final model is always saved;
- no evaluation split that would be empty or tiny;
- the memory setup is checked against GPU memory AND host RAM (ZeRO-3 OOMed on one 95 GB GPU;
  CPU offload of a 10 B model needs ~250-280 GB of host RAM), falling back to LoRA;
- the DeepSpeed config has no "scheduler" section, so the requested LR schedule is the one that
  runs (upstream's WarmupLR silently replaced cosine);
- TrainingArguments names follow the installed transformers (`eval_strategy` vs
  `evaluation_strategy`).

Every decision can be overridden (`overrides={name: value}`); the override is recorded with the
value it replaced. `DECISIONS` lists the names.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

from common.training.memory import (
    FP32,
    GB,
    HALF,
    STRATEGIES,
    ZERO3_MAX_LIVE_PARAMETERS,
    Estimate,
    GiB,
    LoraSpec,
    Mode,
    ModelProfile,
    Precision,
    Setup,
    Strategy,
    ceil_gib,
    checkpoint_bytes,
    estimate,
    gb,
)

log = logging.getLogger(__name__)

ModeRequest = Literal["auto", "full", "freeze-encoder", "lora"]
PrecisionRequest = Literal["auto", "bf16", "fp16", "fp32"]

# Decision names in the order they are taken; every one can be overridden.
DECISIONS = (
    "device",
    "precision",
    "tf32",
    "eval_holdout",
    "eval_strategy",
    "data_regime",
    "dataloader_num_workers",
    "world_size",
    "nodes",
    "procs_per_node",
    "mode",
    "lora",
    "strategy",
    "gradient_checkpointing",
    "per_device_batch",
    "load_dtype",
    "frozen_dtype",
    "grad_accum",
    "epochs",
    "lr",
    "weight_decay",
    "scheduler",
    "warmup_ratio",
    "max_steps",
    "warmup_steps",
    "save_steps",
    "save_total_limit",
    "save_final",
    "logging_steps",
    "eval_steps",
    "optim",
    "deepspeed",
    "pod_resources",
)

# --- constants, with where they come from -----------------------------------------------------------

DEFAULT_SAFETY_MARGIN = 0.10  # keep 10% of GPU memory and host RAM free: allocator fragmentation, spikes
MIN_SAMPLES_PER_RANK = 32  # below this a GPU spends more on NCCL start-up and sync than it computes
EVAL_HOLDOUT_RATIO = 0.05  # upstream Kimi-Audio recipe's eval_ratio
MIN_EVAL_SAMPLES = 16  # fewer eval utterances give a loss/CER too noisy to act on
TINY_DATA_MAX = 100  # "tens of samples", e.g. a first fine-tune on 9 clips
SMALL_DATA_MAX = 1000
# per regime: epochs, warmup ratio, target effective batch, largest automatic per-device batch
REGIMES = {
    "tiny": {"epochs": 10, "warmup_ratio": 0.1, "target_batch": 4, "max_auto_batch": 4},  # a 9-clip run's values
    "small": {"epochs": 5, "warmup_ratio": 0.05, "target_batch": 16, "max_auto_batch": 16},
    "large": {"epochs": 3, "warmup_ratio": 0.05, "target_batch": 32, "max_auto_batch": 64},
}
AUTO_BATCHES_GPU = (64, 32, 16, 8, 4, 2, 1)
AUTO_BATCHES_CPU = (8, 4, 2, 1)
MIN_EFFICIENT_GPU_BATCH = 8  # prefer a setup that runs >= 8 samples per step over one that runs fewer
DEFAULT_WEIGHT_DECAY = 0.01  # upstream Kimi-Audio's 0.1, lowered for small data
DEFAULT_SCHEDULER = "cosine"
TARGET_CHECKPOINTS = 5  # save about five times per run ...
MAX_SAVE_STEPS = 500  # ... but at least every 500 steps, so an interruption loses little
BIG_CHECKPOINT_BYTES = 50 * GB  # keep 2 instead of 3 checkpoints above this size
DEFAULT_LORA_R = 16
DEFAULT_LORA_ALPHA = 32  # 2 x r
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay",
)
SHM_BASE_BYTES = 1 * GiB
SHM_NCCL_BYTES_PER_RANK = GiB // 2  # NCCL's shared-memory transport between ranks of one node
DATALOADER_PREFETCH = 2  # torch DataLoader prefetch_factor default

LADDER_GPU = ("plain", "zero2", "zero3", "zero3-offload-opt", "zero3-offload-all")
STRATEGY_LABELS = {
    "plain": "plain (single GPU / DDP)",
    "zero2": "ZeRO-2",
    "zero2-offload-opt": "ZeRO-2 + optimizer offload",
    "zero3": "ZeRO-3",
    "zero3-offload-opt": "ZeRO-3 + optimizer offload",
    "zero3-offload-all": "ZeRO-3 + optimizer + parameter offload",
}


class PlanError(ValueError):
    """The request cannot be planned; the message says what to change."""


# --- resources ------------------------------------------------------------------------------------


class Resources(BaseModel):
    """What one node offers the training job, and how many such nodes it may use (``nodes``)."""

    model_config = ConfigDict(frozen=True)
    gpus: int = 0  # per node
    gpu_mem_bytes: int = 0  # per GPU (the smallest when they differ)
    host_ram_bytes: int
    cpu_count: int = 1
    gpu_name: str | None = None
    bf16_supported: bool = False
    nodes: int = Field(1, ge=1)  # identical nodes the training may span (multi-node: a Kubeflow TrainJob)
    source: dict[str, str] = Field(default_factory=dict)  # where each number came from


UNLIMITED = 2**60  # cgroup v1 reports "no limit" as a number near 2**63


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value < UNLIMITED else None


def _cgroup_paths(proc_self_cgroup: Path) -> dict[str, str]:
    """controller ('' for the v2 unified hierarchy, 'memory'/'cpu' for v1) -> cgroup path."""
    paths: dict[str, str] = {}
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(","):
            paths[controller] = parts[2]
    return paths


def _candidate_dirs(root: Path, rel: str | None) -> list[Path]:
    """`root` and, when known, the process's own cgroup and its ancestors below `root`."""
    dirs = [root]
    if rel and rel != "/":
        path = root / rel.lstrip("/")
        while path != root and root in path.parents:
            dirs.append(path)
            path = path.parent
    return dirs


def cgroup_memory_limit(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_self_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    """The tightest cgroup memory limit (v2 `memory.max`, v1 `memory.limit_in_bytes`); None if none."""
    paths = _cgroup_paths(proc_self_cgroup)
    limits = [
        _read_limit(d / "memory.max") for d in _candidate_dirs(cgroup_root, paths.get(""))
    ] + [
        _read_limit(d / "memory.limit_in_bytes")
        for d in _candidate_dirs(cgroup_root / "memory", paths.get("memory"))
    ]
    found = [x for x in limits if x is not None]
    return min(found) if found else None


def cgroup_cpu_limit(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_self_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    """CPUs allowed by a CFS quota (v2 `cpu.max` "quota period", v1 cfs_quota_us/cfs_period_us)."""
    paths = _cgroup_paths(proc_self_cgroup)
    quotas: list[float] = []
    for d in _candidate_dirs(cgroup_root, paths.get("")):
        try:
            quota, period = (d / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max":
            quotas.append(int(quota) / int(period))
    for d in _candidate_dirs(cgroup_root / "cpu", paths.get("cpu")):
        quota_v1 = _read_limit(d / "cpu.cfs_quota_us")
        period_v1 = _read_limit(d / "cpu.cfs_period_us")
        if quota_v1 and period_v1 and quota_v1 > 0:
            quotas.append(quota_v1 / period_v1)
    return max(1, math.ceil(min(quotas))) if quotas else None


def physical_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _detect_gpus() -> tuple[int, int, str | None, bool]:
    try:
        import torch
    except ImportError:
        return 0, 0, None, False
    if not torch.cuda.is_available():
        return 0, 0, None, False
    count = torch.cuda.device_count()
    props = [torch.cuda.get_device_properties(i) for i in range(count)]
    return count, min(p.total_memory for p in props), props[0].name, bool(torch.cuda.is_bf16_supported())


def detect_resources(
    *,
    gpus: int | None = None,
    gpu_mem_bytes: int | None = None,
    host_ram_bytes: int | None = None,
    cpu_count: int | None = None,
    gpu_name: str | None = None,
    bf16_supported: bool | None = None,
    nodes: int = 1,
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    proc_self_cgroup: Path = Path("/proc/self/cgroup"),
) -> Resources:
    """GPUs (torch.cuda), host RAM = min(physical RAM, cgroup limit), usable CPUs.

    Any argument given replaces the detected value (e.g. planning a Kubernetes pod from outside it); ``nodes``:
    how many such nodes the training may span (the Kubernetes executor's setting; a stage detects one).
    """
    source: dict[str, str] = {}
    if gpus is None or gpu_mem_bytes is None or gpu_name is None or bf16_supported is None:
        found = _detect_gpus() if gpus != 0 else (0, 0, None, False)
        source["gpus"] = "torch.cuda" if gpus is None else "given"
    else:
        found = (gpus, gpu_mem_bytes, gpu_name, bf16_supported)
        source["gpus"] = "given"
    gpus = found[0] if gpus is None else gpus
    gpu_mem_bytes = found[1] if gpu_mem_bytes is None else gpu_mem_bytes
    gpu_name = found[2] if gpu_name is None else gpu_name
    if bf16_supported is None:
        bf16_supported = found[3] if found[0] else gpus > 0  # given GPUs: assume Ampere or newer
    if gpus and not gpu_mem_bytes:
        raise PlanError(f"{gpus} GPU(s) given without their memory: pass gpu_mem_bytes (bytes per GPU)")

    if host_ram_bytes is None:
        physical = physical_ram_bytes()
        limit = cgroup_memory_limit(cgroup_root, proc_self_cgroup)
        host_ram_bytes = min(physical, limit) if limit else physical
        source["host_ram"] = (
            f"cgroup limit {gb(limit)} GB < physical {gb(physical)} GB"
            if limit and limit < physical
            else f"physical RAM {gb(physical)} GB (no tighter cgroup limit)"
        )
    else:
        source["host_ram"] = "given"
    if cpu_count is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        quota = cgroup_cpu_limit(cgroup_root, proc_self_cgroup)
        cpu_count = min(affinity, quota) if quota else affinity
        source["cpu_count"] = f"affinity {affinity}" + (f", cgroup quota {quota}" if quota else "")
    else:
        source["cpu_count"] = "given"
    return Resources(
        gpus=gpus,
        gpu_mem_bytes=gpu_mem_bytes if gpus else 0,
        host_ram_bytes=host_ram_bytes,
        cpu_count=cpu_count,
        gpu_name=gpu_name if gpus else None,
        bf16_supported=bool(bf16_supported) if gpus else False,
        nodes=nodes,
        source=source,
    )


# --- plan records ---------------------------------------------------------------------------------


class Override(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    from_: Any = Field(alias="from")
    to: Any


class Decision(BaseModel):
    name: str
    value: Any
    reason: str
    overridden: Override | None = None


class Candidate(BaseModel):
    """One memory setup the planner weighed."""

    id: str
    label: str
    mode: Mode
    strategy: str
    gradient_checkpointing: bool
    per_device_batch: int
    trainable_params: int
    gpu_bytes: int
    host_bytes: int
    gpu_breakdown: dict[str, int]
    host_breakdown: dict[str, int]
    fits_gpu: bool
    fits_host: bool
    max_fitting_batch: int | None  # largest batch tried that fits, None if none does
    chosen: bool = False
    note: str = ""  # why it was rejected, or why it was chosen

    @computed_field  # type: ignore[prop-decorator]
    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    @computed_field  # type: ignore[prop-decorator]
    @property
    def gpu_gb(self) -> float:
        return gb(self.gpu_bytes)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def host_gb(self) -> float:
        return gb(self.host_bytes)


class PodResources(BaseModel):
    """What the training pod asks Kubernetes for (the k8s executor reads this)."""

    gpus: int
    cpu: int
    memory_request: str
    memory_limit: str
    memory_request_bytes: int
    memory_limit_bytes: int
    shm_size: str
    shm_size_bytes: int
    node_selector: dict[str, str]
    tolerations: list[dict[str, str]]
    storage_hint: str  # disk for checkpoints + final model
    notes: list[str] = Field(default_factory=list)


class Schedule(BaseModel):
    """What a training loop takes from a plan, typed (both loops: the Trainer's and the fast one)."""

    model_config = {"frozen": True}

    device: str
    precision: str
    world_size: int
    strategy: str
    mode: str
    per_device_batch: int
    grad_accum: int
    epochs: float
    max_steps: int
    max_steps_forced: bool  # the user asked for a number of steps (else the Trainer counts epochs)
    lr: float
    scheduler: str
    warmup_steps: int
    weight_decay: float
    optim: str
    save_steps: int
    save_total_limit: int
    logging_steps: int
    eval_strategy: str
    eval_steps: int | None
    dataloader_num_workers: int
    tf32: bool
    gradient_checkpointing: bool
    deepspeed: dict[str, Any] | None


class Plan(BaseModel):
    inputs: dict[str, Any]
    profile: ModelProfile
    resources: Resources
    decisions: list[Decision]
    candidates: list[Candidate]
    chosen: Candidate
    deepspeed: dict[str, Any] | None
    pod: PodResources
    estimates: dict[str, Any]

    def decision(self, name: str) -> Decision:
        for d in self.decisions:
            if d.name == name:
                return d
        raise KeyError(f"no decision {name!r}; decisions are {[d.name for d in self.decisions]}")

    def value(self, name: str) -> Any:
        return self.decision(name).value

    @property
    def values(self) -> dict[str, Any]:
        return {d.name: d.value for d in self.decisions}

    @property
    def schedule(self) -> Schedule:
        v = self.values
        return Schedule(**{k: v[k] for k in Schedule.model_fields if k in v},
                        max_steps_forced=self.decision("max_steps").overridden is not None)

    def record(self, name: str, value: Any, reason: str) -> None:
        """Add a decision taken after planning (by the stage or the model family) to the same log."""
        self.decisions = [d for d in self.decisions if d.name != name] + [Decision(name=name, value=value,
                                                                                    reason=reason)]

    # the values the finetune stage uses most, typed
    @property
    def device(self) -> str:
        return self.value("device")

    @property
    def precision(self) -> Precision:
        return self.value("precision")

    @property
    def world_size(self) -> int:
        return self.value("world_size")

    @property
    def nodes(self) -> int:
        return self.value("nodes")

    @property
    def procs_per_node(self) -> int:
        return self.value("procs_per_node")

    @property
    def mode(self) -> Mode:
        return self.value("mode")

    @property
    def lora(self) -> LoraSpec | None:
        v = self.value("lora")
        return LoraSpec(**v) if v else None

    @property
    def strategy(self) -> str:
        return self.value("strategy")

    @property
    def gradient_checkpointing(self) -> bool:
        return self.value("gradient_checkpointing")

    @property
    def per_device_batch(self) -> int:
        return self.value("per_device_batch")

    @property
    def grad_accum(self) -> int:
        return self.value("grad_accum")

    @property
    def max_steps(self) -> int:
        return self.value("max_steps")

    @property
    def save_steps(self) -> int:
        return self.value("save_steps")

    @property
    def eval_holdout(self) -> int:
        return self.value("eval_holdout")

    @property
    def deepspeed_config(self) -> dict[str, Any] | None:
        return self.value("deepspeed")

    @property
    def load_dtype(self) -> str:
        return self.value("load_dtype")

    @property
    def frozen_dtype(self) -> str:
        return self.value("frozen_dtype")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2, ensure_ascii=False) + "\n"

    def write(self, path: str | Path) -> None:
        """Write plan.json atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    def summary(self) -> str:
        """Human-readable lines for the log: decisions, then the candidate table."""
        lines = ["Fine-tune plan 训练计划:"]
        for d in self.decisions:
            value = "<config>" if d.name in ("deepspeed", "pod_resources") and d.value else d.value
            mark = f"  [override: was {d.overridden.from_!r}]" if d.overridden else ""
            lines.append(f"  {d.name} = {value!r}{mark}: {d.reason}")
        lines.append("Memory candidates 显存/内存候选 (GB per GPU, GB host):")
        for c in self.candidates:
            state = "CHOSEN" if c.chosen else ("fits" if c.fits else "no")
            lines.append(
                f"  {state:6} {c.id:34} batch {c.per_device_batch:3}  gpu {c.gpu_gb:7.1f}  "
                f"host {c.host_gb:7.1f}  {c.note}"
            )
        return "\n".join(lines)


# --- the decision log -----------------------------------------------------------------------------


_UNSET: Any = object()


class _Decisions:
    """Records decisions in order and applies overrides."""

    def __init__(self, overrides: Mapping[str, Any]):
        unknown = sorted(set(overrides) - set(DECISIONS))
        if unknown:
            raise PlanError(f"unknown override(s) {unknown}; decisions that can be overridden: {list(DECISIONS)}")
        self.overrides = dict(overrides)
        self.items: list[Decision] = []

    def decide(self, name: str, value: Any, reason: str, *, natural: Any = _UNSET) -> Any:
        """Record `value` for `name`, or the override for it.

        `natural`: when the caller already applied the override while computing `value` (the memory
        search, LoRA settings), the value it would have had without it.
        """
        assert name in DECISIONS, name
        overridden = None
        if natural is not _UNSET:
            if name in self.overrides and natural != value:
                overridden = Override(from_=natural, to=value)
                reason = f"overridden by setting (planner would have chosen {natural!r}); {reason}"
        elif name in self.overrides and self.overrides[name] != value:
            forced = self.overrides[name]
            overridden = Override(from_=value, to=forced)
            reason = f"overridden by setting (planner chose {value!r}: {reason})"
            value = forced
        elif name in self.overrides:
            reason += " (same as the override)"
        if overridden is not None:
            log.info("plan: %s overridden: %r -> %r", name, overridden.from_, overridden.to)
        self.items.append(Decision(name=name, value=value, reason=reason, overridden=overridden))
        return value

    def value(self, name: str) -> Any:
        return next(d.value for d in self.items if d.name == name)

    def forced(self, name: str) -> Any:
        return self.overrides.get(name)


# --- the memory search ----------------------------------------------------------------------------


class _Ctx(BaseModel):
    """Everything the memory search needs, fixed before it runs."""

    profile: ModelProfile
    resources: Resources
    device: Literal["cuda", "cpu"]
    precision: Precision
    world_size: int
    procs_per_node: int  # ranks on one node (= world_size on one node)
    workers: int
    margin: float
    lora: LoraSpec
    frozen_bytes: int | None = None  # forced by a frozen_dtype override
    load_bytes: int | None = None  # forced by a load_dtype override

    @property
    def gpu_budget(self) -> float:
        return self.resources.gpu_mem_bytes * (1 - self.margin)

    @property
    def host_budget(self) -> float:
        return self.resources.host_ram_bytes * (1 - self.margin)


def _candidate_id(mode: str, strategy: str, ckpt: bool, lora: LoraSpec | None) -> str:
    prefix = f"lora-r{lora.r}" if mode == "lora" and lora else mode
    return f"{prefix}/{strategy}" + ("+ckpt" if ckpt else "")


def _label(mode: str, strategy: str, ckpt: bool, lora: LoraSpec | None) -> str:
    what = {"full": "full fine-tune", "freeze-encoder": "frozen-encoder fine-tune"}.get(
        mode, f"LoRA r={lora.r if lora else DEFAULT_LORA_R}"
    )
    return f"{what}, {STRATEGY_LABELS[strategy]}" + (", gradient checkpointing" if ckpt else "")


DTYPE_BYTES = {"float32": FP32, "bfloat16": HALF, "float16": HALF}


def _dtypes(ctx: _Ctx, mode: Mode, strategy: Strategy) -> tuple[int, int]:
    """(bytes per frozen parameter, bytes per parameter as loaded), overrides included."""
    if ctx.precision == "fp32":
        frozen, load = FP32, FP32
    else:
        frozen, load = HALF, HALF if (mode == "lora" or strategy.uses_deepspeed) else FP32
    return ctx.frozen_bytes or frozen, ctx.load_bytes or load


def _evaluate(ctx: _Ctx, mode: Mode, strategy_name: str, ckpt: bool, batch: int) -> tuple[Estimate, bool, bool]:
    strategy = STRATEGIES[strategy_name]
    frozen_bytes, load_bytes = _dtypes(ctx, mode, strategy)
    setup = Setup(
        mode=mode,
        strategy=strategy_name,  # type: ignore[arg-type]
        gradient_checkpointing=ckpt,
        micro_batch=batch,
        world_size=ctx.world_size,
        gpus_per_node=ctx.procs_per_node,
        precision=ctx.precision,
        device=ctx.device,
        lora=ctx.lora if mode == "lora" else None,
        frozen_bytes=frozen_bytes,
        load_bytes=load_bytes,
        dataloader_workers=ctx.workers,
    )
    est = estimate(ctx.profile, setup)
    fits_gpu = ctx.device == "cpu" or est.gpu_bytes <= ctx.gpu_budget
    fits_host = est.host_bytes <= ctx.host_budget
    return est, fits_gpu, fits_host


def _ladder(ctx: _Ctx) -> list[tuple[str, bool]]:
    strategies = ("plain",) if ctx.device == "cpu" else LADDER_GPU
    return [(s, ckpt) for s in strategies for ckpt in (False, True)]


def _shortfall(ctx: _Ctx, est: Estimate, fits_gpu: bool, fits_host: bool) -> str:
    m = f"{ctx.margin:.0%}"
    parts = []
    if not fits_gpu:
        parts.append(
            f"needs {gb(est.gpu_bytes)} GB per GPU; {gb(ctx.resources.gpu_mem_bytes)} GB available "
            f"({gb(ctx.gpu_budget)} GB after the {m} margin)"
        )
    if not fits_host:
        parts.append(
            f"needs {gb(est.host_bytes)} GB host RAM; {gb(ctx.resources.host_ram_bytes)} GB available "
            f"({gb(ctx.host_budget)} GB after the {m} margin)"
        )
    return " and ".join(parts)


def _row(ctx: _Ctx, mode: Mode, strategy: str, ckpt: bool, batch: int, max_fit: int | None) -> Candidate:
    est, fits_gpu, fits_host = _evaluate(ctx, mode, strategy, ckpt, batch)
    lora = ctx.lora if mode == "lora" else None
    note = ""
    if not (fits_gpu and fits_host):
        note = _shortfall(ctx, est, fits_gpu, fits_host)
        if max_fit:
            note += f"; fits at batch {max_fit}"
    return Candidate(
        id=_candidate_id(mode, strategy, ckpt, lora),
        label=_label(mode, strategy, ckpt, lora),
        mode=mode,
        strategy=strategy,
        gradient_checkpointing=ckpt,
        per_device_batch=batch,
        trainable_params=est.trainable_params,
        gpu_bytes=est.gpu_bytes,
        host_bytes=est.host_bytes,
        gpu_breakdown=est.gpu,
        host_breakdown=est.host,
        fits_gpu=fits_gpu,
        fits_host=fits_host,
        max_fitting_batch=max_fit,
        note=note,
    )


class _SearchResult(BaseModel):
    rows: list[Candidate]
    chosen: Candidate | None
    abandoned: dict[str, Candidate] = Field(default_factory=dict)  # mode -> its most frugal row


def _search(
    ctx: _Ctx,
    modes: Sequence[Mode],
    batches: Sequence[int],
    floors: Sequence[int],
    only: Mapping[str, Any],
) -> _SearchResult:
    """Fastest (mode, strategy, checkpointing, batch) that fits. Modes in order; within a mode,
    candidates in order of speed; first pass wants batch >= floors[0], the next >= floors[1]...
    `only` restricts strategy / gradient_checkpointing / per_device_batch (overrides)."""
    rows: list[Candidate] = []
    abandoned: dict[str, Candidate] = {}
    for mode in modes:
        ladder = [
            (s, c)
            for s, c in _ladder(ctx)
            if only.get("strategy") in (None, s) and only.get("gradient_checkpointing") in (None, c)
        ]
        if "strategy" in only and only["strategy"] not in [s for s, _ in _ladder(ctx)]:
            ladder = [(only["strategy"], c) for c in (False, True) if only.get("gradient_checkpointing") in (None, c)]
        max_fit: dict[tuple[str, bool], int | None] = {}
        for s, c in ladder:
            max_fit[(s, c)] = next((b for b in batches if all(_evaluate(ctx, mode, s, c, b)[1:])), None)
        for floor in floors:
            for s, c in ladder:
                fit = max_fit[(s, c)]
                if fit is not None and fit >= floor:
                    return _finish(ctx, rows, mode, ladder, max_fit, (s, c), fit, abandoned)
        display = min(batches)
        mode_rows = [_row(ctx, mode, s, c, display, max_fit[(s, c)]) for s, c in ladder]
        rows += mode_rows
        if mode_rows:
            abandoned[mode] = min(mode_rows, key=lambda r: (not r.fits_gpu, r.host_bytes))
    return _SearchResult(rows=rows, chosen=None, abandoned=abandoned)


def _finish(
    ctx: _Ctx,
    rows: list[Candidate],
    mode: Mode,
    ladder: list[tuple[str, bool]],
    max_fit: Mapping[tuple[str, bool], int | None],
    pick: tuple[str, bool],
    batch: int,
    abandoned: dict[str, Candidate],
) -> _SearchResult:
    chosen: Candidate | None = None
    for s, c in ladder:
        row = _row(ctx, mode, s, c, batch, max_fit[(s, c)])
        if (s, c) == pick:
            row.chosen = True
            row.note = "chosen: the fastest setup that fits"
            chosen = row
        elif chosen is not None and row.fits:
            row.note = f"fits, but slower than {pick[0]}" + ("+ckpt" if pick[1] else "")
        rows.append(row)
    assert chosen is not None
    return _SearchResult(rows=rows, chosen=chosen, abandoned=abandoned)


# --- the plan ------------------------------------------------------------------------------------


def _precision(d: _Decisions, request: PrecisionRequest, device: str, resources: Resources) -> Precision:
    if device == "cpu":
        if request in ("bf16", "fp16"):
            raise PlanError(f"precision {request!r} needs a CUDA GPU and none was found; use 'auto' or 'fp32'")
        return d.decide("precision", "fp32", "CPU training runs in fp32")
    if request == "fp32":
        return d.decide("precision", "fp32", "fp32 requested")
    if request == "bf16" and not resources.bf16_supported:
        raise PlanError(
            f"bf16 requested but {resources.gpu_name or 'this GPU'} has no bf16 (needs Ampere or newer); "
            "use precision 'fp16' or 'auto'"
        )
    if request == "fp16" or not resources.bf16_supported:
        return d.decide(
            "precision", "fp16",
            "fp16 mixed precision with fp32 master weights and dynamic loss scaling"
            + (" (requested)" if request == "fp16" else f" ({resources.gpu_name or 'GPU'} has no bf16)"),
        )
    return d.decide(
        "precision", "bf16",
        "bf16 mixed precision with fp32 master weights (GPU supports bf16"
        + (", requested)" if request == "bf16" else ")"),
    )


def _eval_split(d: _Decisions, n_train: int, n_eval: int | None) -> tuple[int, int]:
    """(training samples after any hold-out, evaluation samples)."""
    if n_eval is None:
        holdout = math.floor(n_train * EVAL_HOLDOUT_RATIO)
        if holdout < MIN_EVAL_SAMPLES:
            reason = (
                f"no evaluation set given; {EVAL_HOLDOUT_RATIO:.0%} of {n_train} samples is {holdout} "
                f"(< {MIN_EVAL_SAMPLES}): all samples train"
            )
            holdout = 0
        else:
            reason = f"no evaluation set given: hold out {EVAL_HOLDOUT_RATIO:.0%} of {n_train} training samples"
        holdout = d.decide("eval_holdout", holdout, reason)
        if not 0 <= holdout < n_train:
            raise PlanError(f"eval_holdout must be between 0 and {n_train - 1}, got {holdout}")
        n_eval, n_train = holdout, n_train - holdout
    else:
        d.decide("eval_holdout", 0, f"an evaluation set of {n_eval} samples was given")
    if n_eval >= MIN_EVAL_SAMPLES:
        strategy = d.decide("eval_strategy", "steps", f"{n_eval} evaluation samples: evaluate at every save")
    else:
        strategy = d.decide(
            "eval_strategy", "no",
            f"{n_eval} evaluation samples (< {MIN_EVAL_SAMPLES}) would be empty or too noisy: no evaluation "
            "during training (the evaluate stage scores the model afterwards)",
        )
    return n_train, (n_eval if strategy != "no" else 0)


def _regime(d: _Decisions, n_train: int) -> str:
    if n_train < TINY_DATA_MAX:
        return d.decide("data_regime", "tiny", f"{n_train} training samples (< {TINY_DATA_MAX}): tens of samples")
    if n_train < SMALL_DATA_MAX:
        return d.decide("data_regime", "small", f"{n_train} training samples (< {SMALL_DATA_MAX})")
    return d.decide("data_regime", "large", f"{n_train} training samples")


def _workers(d: _Decisions, device: str, resources: Resources) -> int:
    if device == "cpu":
        return d.decide(
            "dataloader_num_workers", 0,
            "CPU training uses every core for compute; cached features load fast in the main process",
        )
    per_gpu = max(1, resources.cpu_count // max(1, resources.gpus))
    workers = min(4, max(0, per_gpu - 1))
    return d.decide(
        "dataloader_num_workers", workers,
        f"{resources.cpu_count} CPUs for {resources.gpus} GPU(s): one per rank for the trainer, up to 4 loaders",
    )


def _world_size(
    d: _Decisions, device: str, resources: Resources, n_train: int, batch: int | None, accum: int | None,
    launcher: tuple[int, int] | None = None,
) -> int:
    """Ranks in all: never more than the data can feed (the small-data rule, across nodes too); more than one
    node only in whole nodes. ``launcher``: (nodes, processes per node) an outside launcher already started."""
    b = batch or 1
    batches = math.ceil(n_train / b)
    if launcher is not None:
        world = launcher[0] * launcher[1]
        if world > batches:
            raise PlanError(
                f"{world} processes were started ({launcher[0]} node(s) x {launcher[1]}) but {n_train} training "
                f"samples at batch {b} make only {batches} batch(es) per epoch: a rank without a batch hangs the "
                "others. Start fewer nodes/processes (asr-ft plans that by itself: leave the node count to it)"
            )
        return d.decide("world_size", world, f"{launcher[0]} node(s) x {launcher[1]} process(es) started by the "
                        f"launcher (torchrun / a TrainJob); {n_train} samples give each rank at least one batch")
    if device == "cpu":
        return d.decide("world_size", 1, "CPU training runs in one process")
    per_step = b * (accum or 1)
    total_gpus = resources.gpus * resources.nodes
    where = f"{resources.nodes} nodes x {resources.gpus} GPUs" if resources.nodes > 1 else f"{resources.gpus} GPUs"
    limits = {
        "GPUs": total_gpus,
        f"ceil({n_train} samples / batch {b}) batches per epoch": batches,
        f"{n_train} samples // {per_step} samples per rank per optimizer step": max(1, n_train // per_step),
        f"{n_train} samples // {MIN_SAMPLES_PER_RANK} samples per GPU": max(1, n_train // MIN_SAMPLES_PER_RANK),
    }
    world = min(limits.values())
    if world == total_gpus:
        reason = f"all {world} GPU(s) ({where}): {n_train} samples give every rank at least {MIN_SAMPLES_PER_RANK}"
        if world == 1:
            reason = "one GPU available"
    else:
        binding = min(limits, key=limits.__getitem__)
        reason = (
            f"{n_train} training samples on {where} would leave each rank "
            f"{n_train / total_gpus:.1f} samples per epoch; a rank needs at least one full batch and "
            f"{MIN_SAMPLES_PER_RANK} samples to pay for NCCL start-up and per-step sync (9 samples on 8 GPUs "
            f"hang in NCCL); limit: {binding} -> {world} GPU(s)"
        )
    if world > resources.gpus > 0 and world % resources.gpus:
        whole = world // resources.gpus * resources.gpus
        reason += (f"; more than one node is used in whole nodes (every node runs the same number of processes): "
                   f"{world} -> {whole}")
        world = whole
    world = d.decide("world_size", world, reason)
    if device == "cuda" and not 1 <= world <= max(1, total_gpus):
        raise PlanError(f"world_size must be between 1 and {total_gpus} (GPUs available), got {world}")
    return world


def _topology(d: _Decisions, device: str, resources: Resources, world: int,
              launcher: tuple[int, int] | None) -> tuple[int, int]:
    """(nodes, processes per node) for ``world`` ranks: one node while the ranks fit on it, else whole nodes."""
    if launcher is not None:
        nodes, procs = launcher
        why = "started by the launcher"
    elif device == "cpu" or world <= max(1, resources.gpus):
        nodes, procs = 1, world
        why = (f"{world} rank(s) fit on one node" + (f": the other {resources.nodes - 1} node(s) are not used"
                                                     if resources.nodes > 1 else ""))
    else:
        nodes, procs = world // resources.gpus, resources.gpus
        why = (f"{world} ranks do not fit on one node of {resources.gpus} GPUs: {nodes} nodes x {procs} "
               "processes, one per GPU (a Kubeflow Trainer TrainJob runs them)")
    nodes = d.decide("nodes", nodes, why)
    procs = d.decide("procs_per_node", procs, f"{procs} process(es) per node x {nodes} node(s) = {world} ranks")
    if nodes * procs != world:
        raise PlanError(f"nodes {nodes} x procs_per_node {procs} must equal world_size {world}; override them "
                        "together")
    if nodes > resources.nodes and launcher is None:
        raise PlanError(f"{nodes} nodes planned but only {resources.nodes} available; set the node count")
    return nodes, procs


def _default_lr(mode: Mode, params: int) -> tuple[float, str]:
    if mode == "lora":
        if params < 10**9:
            return 1e-3, "LoRA on a < 1 B model: 1e-3 (Whisper LoRA recipes; the demo's LoRA probe)"
        return 2e-4, "LoRA on a >= 1 B model: 2e-4 (common LLM LoRA setting)"
    if params < 10**9:
        return 1e-5, "full/decoder fine-tune of a < 1 B model: 1e-5 (Hugging Face Whisper recipe)"
    if params < 5 * 10**9:
        return 5e-6, "full/decoder fine-tune of a 1-5 B model: 5e-6"
    return 3e-6, ("full/decoder fine-tune of a >= 5 B model: 3e-6 (what a 9-clip Kimi-Audio-7B fine-tune "
                  "trained with; 1e-5 risks overfitting)")


def _batches(requested: int | None, device: str, regime: str, n_train: int, world: int) -> tuple[list[int], list[int]]:
    """(batches to try, descending; floors for the search passes)."""
    if requested:
        options = sorted({max(1, requested >> i) for i in range(requested.bit_length())}, reverse=True)
        return options, [requested, 1]
    cap = min(max(1, n_train // world), REGIMES[regime]["max_auto_batch"])
    if device == "cpu":
        options = [b for b in AUTO_BATCHES_CPU if b <= cap] or [1]
        return options, [1]
    options = [b for b in AUTO_BATCHES_GPU if b <= cap] or [1]
    return options, [min(MIN_EFFICIENT_GPU_BATCH, options[0]), 1]


def _memory(
    d: _Decisions,
    ctx: _Ctx,
    mode_request: ModeRequest,
    batch_request: int | None,
    regime: str,
    n_train: int,
) -> tuple[_SearchResult, Candidate]:
    """Decide mode, lora, strategy, gradient checkpointing and per-device batch together."""
    modes: list[Mode] = ["full", "lora"] if mode_request == "auto" else [mode_request]
    batches, floors = _batches(batch_request, ctx.device, regime, n_train, ctx.world_size)
    natural = _search(ctx, modes, batches, floors, {})
    forced = {k: d.forced(k) for k in ("mode", "strategy", "gradient_checkpointing", "per_device_batch")}
    forced = {k: v for k, v in forced.items() if v is not None}
    if forced.get("strategy") is not None and forced["strategy"] not in STRATEGIES:
        raise PlanError(f"strategy override {forced['strategy']!r} unknown; choose from {list(STRATEGIES)}")
    if forced.get("strategy", "plain") != "plain" and ctx.device == "cpu":
        raise PlanError("DeepSpeed strategies need CUDA GPUs; on CPU the strategy is 'plain'")

    if not forced and natural.chosen is None:
        raise PlanError(_nothing_fits(ctx, mode_request, natural))
    final = natural
    if forced:
        f_modes = [forced["mode"]] if "mode" in forced else modes
        f_batches = [forced["per_device_batch"]] if "per_device_batch" in forced else batches
        final = _search(ctx, f_modes, f_batches, [1] if "per_device_batch" in forced else floors, forced)
        if final.chosen is None:  # forced setup does not fit: honour it, say so
            mode = f_modes[0]
            s = forced.get("strategy", "plain")
            c = forced.get("gradient_checkpointing", False)
            row = _row(ctx, mode, s, c, f_batches[-1], None)
            row.chosen = True
            row.note = "forced by overrides although it does not fit: " + row.note
            log.warning("plan: %s", row.note)
            final = _SearchResult(rows=final.rows + [row], chosen=row, abandoned=final.abandoned)
    chosen = final.chosen
    assert chosen is not None
    n = natural.chosen or chosen
    rows = final.rows
    if forced:  # show the planner's own table, with the forced setup in it
        rows = list(natural.rows)
        for r in rows:
            if r.chosen:
                r.chosen, r.note = False, "the planner's choice without overrides"
        if chosen.fits:
            chosen.note = "chosen: the fastest setup that fits the overrides"
        same = [i for i, r in enumerate(rows) if r.id == chosen.id and r.per_device_batch == chosen.per_device_batch]
        if same:
            rows[same[0]] = chosen
        else:
            rows.append(chosen)

    d.decide("mode", chosen.mode, _mode_reason(ctx, mode_request, chosen, final), natural=n.mode)
    lora_value = ctx.lora.model_dump(mode="json") if chosen.mode == "lora" else None
    if lora_value and lora_value["parts"] is None:
        lora_value["parts"] = list(ctx.profile.default_lora_parts)
    natural_lora = lora_value
    if lora_value and d.forced("lora"):
        default = LoraSpec(r=DEFAULT_LORA_R, alpha=DEFAULT_LORA_ALPHA, targets=ctx.profile.default_lora_targets,
                           parts=ctx.profile.default_lora_parts)
        natural_lora = default.model_dump(mode="json")
    d.decide(
        "lora", lora_value,
        f"r={ctx.lora.r}, alpha={ctx.lora.alpha} on {list(ctx.lora.targets)}: "
        f"{chosen.trainable_params:,} trainable parameters" if lora_value else "not training LoRA adapters",
        natural=natural_lora,
    )
    d.decide("strategy", chosen.strategy, _strategy_reason(ctx, chosen), natural=n.strategy)
    d.decide(
        "gradient_checkpointing", chosen.gradient_checkpointing,
        "activations do not fit without it" if chosen.gradient_checkpointing
        else "activations fit: no recomputation (faster)",
        natural=n.gradient_checkpointing,
    )
    batch_reason = (
        f"requested {batch_request}" if batch_request == chosen.per_device_batch
        else f"requested {batch_request} does not fit; the largest that does" if batch_request
        else f"largest of {batches} that fits the chosen setup ('{regime}' data)"
    )
    d.decide("per_device_batch", chosen.per_device_batch, batch_reason, natural=n.per_device_batch)
    return final.model_copy(update={"rows": rows}), chosen


def _mode_reason(ctx: _Ctx, request: ModeRequest, chosen: Candidate, result: _SearchResult) -> str:
    if request != "auto":
        return f"{request} requested"
    if chosen.mode == "full":
        return "auto: full fine-tune fits"
    full = result.abandoned.get("full")
    if full is None:
        return f"auto: {chosen.mode}"
    return (
        f"auto: full fine-tune does not fit even as {STRATEGY_LABELS[full.strategy]}"
        + (" with gradient checkpointing" if full.gradient_checkpointing else "")
        + f" at batch {full.per_device_batch}: {full.note} -> LoRA r={ctx.lora.r}"
    )


def _strategy_reason(ctx: _Ctx, chosen: Candidate) -> str:
    gpu_part = (
        f"{chosen.gpu_gb} GB per GPU of {gb(ctx.gpu_budget)} GB budget "
        f"({gb(ctx.resources.gpu_mem_bytes)} GB - {ctx.margin:.0%} margin, headroom "
        f"{gb(ctx.gpu_budget - chosen.gpu_bytes)} GB); "
        if ctx.device == "cuda" else ""
    )
    where = ""
    if ctx.device == "cuda":
        nodes = ctx.world_size // max(1, ctx.procs_per_node)
        offload = ("no offload" if chosen.strategy in ("plain", "zero2", "zero3") else
                   "offload to host RAM")
        where = (f"{chosen.label.split(',')[0]} of {ctx.profile.total_params / 1e9:.1f} B parameters on "
                 f"{nodes} x {ctx.procs_per_node} x {gb(ctx.resources.gpu_mem_bytes):g} GB: "
                 f"{STRATEGY_LABELS[chosen.strategy]}, {offload}; ")
    return (
        f"{where}fastest setup that fits: {chosen.label}, batch {chosen.per_device_batch}: {gpu_part}"
        f"host {chosen.host_gb} GB of {gb(ctx.host_budget)} GB budget "
        f"({gb(ctx.resources.host_ram_bytes)} GB - {ctx.margin:.0%} margin)"
    )


def _nothing_fits(ctx: _Ctx, request: ModeRequest, result: _SearchResult) -> str:
    lines = [f"no training setup for {ctx.profile.name} fits this machine (mode {request!r}):"]
    for r in result.rows:
        lines.append(f"  {r.id} batch {r.per_device_batch}: {r.note}")
    hint = "use mode 'auto' or 'lora' (LoRA needs far less memory)" if request != "lora" else (
        "use a smaller LoRA rank or fewer targets, a machine with more GPU memory/host RAM, "
        "or a shorter max sequence length"
    )
    lines.append(f"fix: {hint}, or force a setup with overrides={{'strategy': ...}}")
    return "\n".join(lines)


def _grad_accum(
    d: _Decisions, requested: int | None, batch_requested: int | None, batch: int, world: int,
    regime: str, n_train: int,
) -> int:
    if requested:
        if batch_requested and batch < batch_requested:
            accum = requested * math.ceil(batch_requested / batch)
            return d.decide(
                "grad_accum", accum,
                f"requested {requested} x {batch_requested} samples per rank; batch lowered to {batch} to fit, "
                f"so accumulate {accum} to keep the effective batch",
            )
        return d.decide("grad_accum", requested, "requested")
    target = REGIMES[regime]["target_batch"]
    accum = max(1, round(target / (batch * world)))
    most = max(1, n_train // (batch * world))  # at least one full optimizer step per epoch
    accum = min(accum, most)
    return d.decide(
        "grad_accum", accum,
        f"effective batch {batch} x {world} GPU(s) x {accum} = {batch * world * accum} "
        f"(target {target} for '{regime}' data, at most one step's worth of the {n_train} samples)",
    )


def _schedule(
    d: _Decisions, regime: str, mode: Mode, profile: ModelProfile,
    epochs: float | None, lr: float | None, warmup_ratio: float | None, scheduler: str | None,
    weight_decay: float | None,
) -> tuple[float, float, float, str]:
    r = REGIMES[regime]
    epochs = d.decide(
        "epochs", epochs if epochs is not None else r["epochs"],
        "requested" if epochs is not None else f"'{regime}' data: {r['epochs']} epochs"
        + (" (epochs 5 -> 10 suits tens of samples)" if regime == "tiny" else ""),
    )
    default_lr, lr_reason = _default_lr(mode, profile.total_params)
    lr = d.decide("lr", lr if lr is not None else default_lr, "requested" if lr is not None else lr_reason)
    d.decide(
        "weight_decay", weight_decay if weight_decay is not None else DEFAULT_WEIGHT_DECAY,
        "requested" if weight_decay is not None else "0.01 (upstream Kimi-Audio's 0.1, lowered for small data)",
    )
    scheduler = d.decide(
        "scheduler", scheduler or DEFAULT_SCHEDULER,
        "requested" if scheduler else "cosine decay after warmup (upstream Kimi-Audio recipe's choice)",
    )
    if scheduler not in SCHEDULERS:
        raise PlanError(f"scheduler {scheduler!r} unknown; choose from {list(SCHEDULERS)}")
    warmup_ratio = d.decide(
        "warmup_ratio", warmup_ratio if warmup_ratio is not None else r["warmup_ratio"],
        "requested" if warmup_ratio is not None else f"'{regime}' data: warm up over {r['warmup_ratio']:.0%} of steps",
    )
    return epochs, lr, warmup_ratio, scheduler


def _steps(
    d: _Decisions, n_train: int, batch: int, world: int, accum: int, epochs: float, warmup_ratio: float,
    save_steps: int | None, save_total_limit: int | None, ckpt_bytes: int, eval_strategy: str,
) -> int:
    # Hugging Face Trainer + accelerate: batches are dealt round-robin to ranks (even_batches pads),
    # and a partial accumulation at the end of an epoch still makes an optimizer step.
    batches_per_rank = math.ceil(math.ceil(n_train / batch) / world)
    steps_per_epoch = math.ceil(batches_per_rank / accum)
    total = d.decide(
        "max_steps", math.ceil(steps_per_epoch * epochs),
        f"ceil(ceil({n_train} / batch {batch}) / {world} GPU(s)) = {batches_per_rank} batches per rank per epoch; "
        f"/ accumulation {accum} -> {steps_per_epoch} steps x {epochs} epochs",
    )
    d.decide(
        "warmup_steps", math.ceil(warmup_ratio * total),
        f"ceil({warmup_ratio} x {total} steps) (passed as steps: warmup_ratio is deprecated in transformers 5)",
    )
    if save_steps:
        value = min(save_steps, total)
        reason = (
            f"requested {save_steps} > {total} total steps would never save a checkpoint (save_steps=1000 on a "
            f"45-step run saves none): save every {value}" if save_steps > total else "requested"
        )
    else:
        value = min(max(1, math.ceil(total / TARGET_CHECKPOINTS)), MAX_SAVE_STEPS)
        reason = f"about {TARGET_CHECKPOINTS} checkpoints over {total} steps, at least every {MAX_SAVE_STEPS}"
    saves = d.decide("save_steps", value, reason)
    keep = save_total_limit or (2 if ckpt_bytes > BIG_CHECKPOINT_BYTES else 3)
    d.decide(
        "save_total_limit", keep,
        "requested" if save_total_limit else f"one checkpoint is ~{gb(ckpt_bytes)} GB (weights + optimizer state)",
    )
    d.decide("save_final", True, "the final model is always written to final/, whatever save_steps says")
    d.decide("logging_steps", max(1, min(50, total // 20)), f"about 20 log lines over {total} steps")
    d.decide(
        "eval_steps", saves if eval_strategy == "steps" else None,
        "evaluate whenever a checkpoint is saved" if eval_strategy == "steps" else "no evaluation during training",
    )
    return total


def deepspeed_config(
    strategy: Strategy, precision: Precision, profile: ModelProfile
) -> dict[str, Any] | None:
    """DeepSpeed config for `strategy`, with batch fields "auto" (filled from TrainingArguments).

    No "scheduler" section: Hugging Face's Trainer then builds the scheduler named by
    `lr_scheduler_type` around DeepSpeed's optimizer. An "optimizer" section makes DeepSpeed build
    the optimizer: DeepSpeedCPUAdam when it is offloaded (torch's AdamW on CPU would crawl), torch's
    AdamW on the GPU partitions otherwise (no JIT-compiled op needed).
    """
    if not strategy.uses_deepspeed:
        return None
    h = profile.hidden_size
    zero: dict[str, Any] = {
        "stage": strategy.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": h * h,  # what Hugging Face's "auto" would write, without needing the config
    }
    if strategy.zero_stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=h * h, reduce_scatter=True)
    else:
        zero.update(
            stage3_prefetch_bucket_size=int(0.9 * h * h),
            stage3_param_persistence_threshold=10 * h,
            stage3_max_live_parameters=ZERO3_MAX_LIVE_PARAMETERS,
            stage3_max_reuse_distance=ZERO3_MAX_LIVE_PARAMETERS,
            stage3_gather_16bit_weights_on_model_save=True,  # save_model writes a normal model
        )
    if strategy.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if strategy.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    optimizer_params: dict[str, Any] = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
    if not strategy.offload_optimizer:
        optimizer_params["torch_adam"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "wall_clock_breakdown": False,
    }
    assert "scheduler" not in config
    return config


def _pod(
    d: _Decisions, ctx: _Ctx, chosen: Candidate, batch: int, ckpt_bytes: int, keep: int,
) -> PodResources:
    strategy = STRATEGIES[chosen.strategy]
    world = ctx.procs_per_node if ctx.device == "cuda" else 0  # one pod per node: its own ranks
    loader = ctx.workers * DATALOADER_PREFETCH * batch * ctx.profile.input_bytes_per_sample * max(1, world)
    shm = SHM_BASE_BYTES + loader + (world * SHM_NCCL_BYTES_PER_RANK if world > 1 else 0)
    shm_gib = ceil_gib(shm)
    host = chosen.host_bytes
    request_gib = ceil_gib(host + shm_gib * GiB)
    limit_gib = ceil_gib(host / (1 - ctx.margin) + shm_gib * GiB)
    node_gib = ctx.resources.host_ram_bytes // GiB
    limit_gib = max(request_gib, min(limit_gib, node_gib)) if node_gib >= request_gib else limit_gib
    if ctx.device == "cuda":
        cpu = ctx.resources.cpu_count if strategy.offload_optimizer else min(
            ctx.resources.cpu_count, max(2, world * (1 + ctx.workers))
        )
        selector = {"nvidia.com/gpu.present": "true"}
        if ctx.resources.gpu_name:
            selector["nvidia.com/gpu.product"] = ctx.resources.gpu_name.replace(" ", "-")
        tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    else:
        cpu, selector, tolerations = ctx.resources.cpu_count, {}, []
    if chosen.mode == "lora":
        final_bytes = chosen.trainable_params * FP32  # final/ holds the adapters
    else:
        final_bytes = ctx.profile.total_params * (FP32 if ctx.precision == "fp32" or not strategy.uses_deepspeed else HALF)
    storage = max(1, ceil_gib(keep * ckpt_bytes + final_bytes))
    notes = [
        f"memory request = host estimate {gb(host)} GB + /dev/shm {shm_gib} GiB "
        "(a memory-backed emptyDir counts against the pod's memory limit)",
        f"memory limit = estimate / (1 - {ctx.margin:.0%} margin) + /dev/shm, so the plan re-made inside the "
        "pod (cgroup limit) picks the same setup",
        f"/dev/shm = 1 GiB + DataLoader prefetch ({ctx.workers} workers x {DATALOADER_PREFETCH} x batch {batch})"
        + (f" + NCCL {world} ranks x 0.5 GiB" if world > 1 else ""),
    ]
    if strategy.uses_deepspeed and strategy.offload_optimizer:
        notes.append("optimizer offload runs DeepSpeedCPUAdam on every CPU the pod gets")
    if ctx.resources.gpu_name:
        notes.append(f"node selector pins {ctx.resources.gpu_name}: the memory plan was made for its "
                     f"{gb(ctx.resources.gpu_mem_bytes)} GB")
    pod = PodResources(
        gpus=world,
        cpu=cpu,
        memory_request=f"{request_gib}Gi",
        memory_limit=f"{limit_gib}Gi",
        memory_request_bytes=request_gib * GiB,
        memory_limit_bytes=limit_gib * GiB,
        shm_size=f"{shm_gib}Gi",
        shm_size_bytes=shm_gib * GiB,
        node_selector=selector,
        tolerations=tolerations,
        storage_hint=f"{storage}Gi",
        notes=notes,
    )
    natural = pod.model_dump()
    value = {**natural, **(d.forced("pod_resources") or {})}
    d.decide("pod_resources", value, "; ".join(notes), natural=natural)
    return PodResources(**value)


def _optimizer(d: _Decisions, strategy: Strategy, device: str) -> None:
    if strategy.uses_deepspeed:
        optim = "deepspeed: " + ("DeepSpeedCPUAdam (offloaded)" if strategy.offload_optimizer else "torch AdamW")
        reason = "DeepSpeed builds the optimizer from its config; Hugging Face builds the LR scheduler"
    elif device == "cuda":
        optim, reason = "adamw_torch_fused", "fused AdamW: one kernel per step, no foreach temporaries"
    else:
        optim, reason = "adamw_torch", "CPU AdamW"
    d.decide("optim", optim, reason)


def _estimates(ctx: _Ctx, chosen: Candidate, ckpt_bytes: int) -> dict[str, Any]:
    """The chosen setup's estimates in GB (10**9 bytes), with the budgets the margin leaves."""
    cuda = ctx.device == "cuda"
    return {
        "safety_margin": ctx.margin,
        "gpu_gb": chosen.gpu_gb if cuda else 0.0,
        "gpu_total_gb": gb(ctx.resources.gpu_mem_bytes),
        "gpu_budget_gb": gb(ctx.gpu_budget),
        "gpu_headroom_gb": gb(ctx.gpu_budget - chosen.gpu_bytes) if cuda else None,
        "host_gb": chosen.host_gb,
        "host_total_gb": gb(ctx.resources.host_ram_bytes),
        "host_budget_gb": gb(ctx.host_budget),
        "host_headroom_gb": gb(ctx.host_budget - chosen.host_bytes),
        "checkpoint_gb": gb(ckpt_bytes),
        "trainable_params": chosen.trainable_params,
        "total_params": ctx.profile.total_params,
    }


def plan(
    profile: ModelProfile,
    *,
    n_train: int,
    n_eval: int | None = None,
    mode: ModeRequest = "auto",
    per_device_batch: int | None = None,
    grad_accum: int | None = None,
    epochs: float | None = None,
    lr: float | None = None,
    warmup_ratio: float | None = None,
    scheduler: str | None = None,
    weight_decay: float | None = None,
    precision: PrecisionRequest = "auto",
    save_steps: int | None = None,
    save_total_limit: int | None = None,
    lora_r: int = DEFAULT_LORA_R,
    lora_alpha: int | None = None,
    lora_targets: Sequence[str] | None = None,
    resources: Resources | None = None,
    safety_margin: float = DEFAULT_SAFETY_MARGIN,
    overrides: Mapping[str, Any] | None = None,
    launcher: tuple[int, int] | None = None,
) -> Plan:
    """Plan a fine-tuning run. None means "decide for me"; `overrides` force any decision by name.

    n_train: training samples; n_eval: evaluation samples (None: the planner may hold out part of
    n_train; 0: none). The explicit arguments are requests the planner may adapt (e.g. save_steps
    is capped at the total steps, a batch that does not fit is lowered); overrides are final.
    ``resources.nodes``: identical nodes the run may span; ``launcher``: (nodes, processes per node) when an
    outside launcher (torchrun, a TrainJob) already started the ranks: the plan takes that world as given.
    """
    if n_train < 1:
        raise PlanError(f"n_train must be >= 1 (training samples), got {n_train}; check the prepare stage output")
    if not 0 <= safety_margin < 1:
        raise PlanError(f"safety_margin is a fraction in [0, 1), got {safety_margin}")
    for name, value in (("per_device_batch", per_device_batch), ("grad_accum", grad_accum)):
        if value is not None and value < 1:
            raise PlanError(f"{name} must be >= 1 or None (automatic), got {value}")
    resources = resources or detect_resources()
    d = _Decisions(overrides or {})
    inputs = {
        "model": profile.name, "n_train": n_train, "n_eval": n_eval, "mode": mode,
        "per_device_batch": per_device_batch, "grad_accum": grad_accum, "epochs": epochs, "lr": lr,
        "warmup_ratio": warmup_ratio, "scheduler": scheduler, "weight_decay": weight_decay,
        "precision": precision, "save_steps": save_steps, "save_total_limit": save_total_limit,
        "lora_r": lora_r, "lora_alpha": lora_alpha, "lora_targets": list(lora_targets) if lora_targets else None,
        "safety_margin": safety_margin, "overrides": dict(overrides or {}),
    }

    device = d.decide(
        "device", "cuda" if resources.gpus > 0 else "cpu",
        f"{resources.gpus} x {resources.gpu_name or 'GPU'}" if resources.gpus else "no CUDA GPU found",
    )
    if device == "cuda" and resources.gpus < 1:
        raise PlanError("device 'cuda' forced but no GPU is available; detect_resources() found none")
    prec = _precision(d, precision, device, resources)
    if device == "cpu" and prec != "fp32":
        raise PlanError(f"precision {prec!r} needs a CUDA GPU; on CPU training runs in fp32")
    d.decide("tf32", device == "cuda" and resources.bf16_supported,
             "TF32 matmuls for the fp32 parts on Ampere or newer" if device == "cuda" else "CPU: not applicable")
    n_train, _ = _eval_split(d, n_train, n_eval)
    eval_strategy = d.value("eval_strategy")
    regime = _regime(d, n_train)
    workers = _workers(d, device, resources)
    world = _world_size(d, device, resources, n_train, per_device_batch, grad_accum, launcher)
    _nodes, procs_per_node = _topology(d, device, resources, world, launcher)

    lora_forced = d.forced("lora") or {}
    lora = LoraSpec(
        r=lora_forced.get("r", lora_r),
        alpha=lora_forced.get("alpha", lora_alpha or 2 * lora_forced.get("r", lora_r)),
        targets=tuple(lora_forced.get("targets", lora_targets or profile.default_lora_targets)),
        parts=lora_forced.get("parts"),
    )
    profile.lora_params(lora.r, lora.targets, lora.parts)  # raises on unknown targets
    forced_bytes = {}
    for name in ("load_dtype", "frozen_dtype"):
        forced = d.forced(name)
        if forced is not None and forced not in DTYPE_BYTES:
            raise PlanError(f"{name} override {forced!r} unknown; choose from {list(DTYPE_BYTES)}")
        forced_bytes[name] = DTYPE_BYTES.get(forced)
    ctx = _Ctx(profile=profile, resources=resources, device=device, precision=prec, world_size=world,
               procs_per_node=procs_per_node, workers=workers, margin=safety_margin, lora=lora, frozen_bytes=forced_bytes["frozen_dtype"],
               load_bytes=forced_bytes["load_dtype"])
    result, chosen = _memory(d, ctx, mode, per_device_batch, regime, n_train)
    strategy = STRATEGIES[chosen.strategy]
    frozen_bytes, load_bytes = _dtypes(ctx.model_copy(update={"frozen_bytes": None, "load_bytes": None}),
                                       chosen.mode, strategy)
    dtype = {HALF: "bfloat16" if prec == "bf16" else "float16", FP32: "float32"}
    d.decide(
        "load_dtype", dtype[load_bytes],
        "fp32: the loaded weights are the fp32 master weights" if load_bytes == FP32 else
        "16-bit: frozen base weights (LoRA) / DeepSpeed casts to 16-bit and keeps its own fp32 master copy",
    )
    d.decide(
        "frozen_dtype", dtype[frozen_bytes],
        "frozen weights need no fp32 master copy" if frozen_bytes == HALF else "fp32 training",
    )
    batch = chosen.per_device_batch
    accum = _grad_accum(d, grad_accum, per_device_batch, batch, world, regime, n_train)
    n_epochs, _, ratio, _ = _schedule(d, regime, chosen.mode, profile, epochs, lr, warmup_ratio, scheduler,
                                      weight_decay)
    # plain training keeps (and saves) the fp32 master weights; DeepSpeed saves 16-bit weights
    weight_bytes = FP32 if prec == "fp32" or not strategy.uses_deepspeed else HALF
    ckpt_bytes = checkpoint_bytes(profile, chosen.trainable_params, mode=chosen.mode, weight_bytes=weight_bytes)
    _steps(d, n_train, batch, world, accum, n_epochs, ratio, save_steps, save_total_limit, ckpt_bytes,
           eval_strategy)
    _optimizer(d, strategy, device)
    ds = d.decide(
        "deepspeed", deepspeed_config(strategy, prec, profile),
        f"generated for {STRATEGY_LABELS[strategy.name]}; no 'scheduler' section so lr_scheduler_type runs; "
        "create TrainingArguments before from_pretrained so ZeRO-3 builds the model partitioned (zero.Init)"
        if strategy.uses_deepspeed else "plain PyTorch training: no DeepSpeed",
    )
    if ds and "scheduler" in ds:
        log.warning("plan: the DeepSpeed config has a 'scheduler' section: it replaces lr_scheduler_type")
    keep = d.value("save_total_limit")
    pod = _pod(d, ctx, chosen, batch, ckpt_bytes, keep)

    result_plan = Plan(
        inputs=inputs, profile=profile, resources=resources, decisions=d.items, candidates=result.rows,
        chosen=chosen, deepspeed=ds, pod=pod, estimates=_estimates(ctx, chosen, ckpt_bytes),
    )
    log.info("%s", result_plan.summary())
    return result_plan


# --- TrainingArguments ----------------------------------------------------------------------------

# names that moved between transformers versions (either direction)
RENAMED_ARGUMENTS = {
    "eval_strategy": "evaluation_strategy",  # renamed in transformers 4.41
    "evaluation_strategy": "eval_strategy",
    "use_cpu": "no_cuda",  # renamed in 4.34
    "no_cuda": "use_cpu",
    "gradient_checkpointing": "activation_checkpointing",  # renamed in 5.x, old name deprecated
    "activation_checkpointing": "gradient_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}
# where both names are accepted, the newer one avoids a deprecation warning
PREFERRED_ARGUMENTS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def adapt_kwargs(wanted: Mapping[str, Any], accepted: Collection[str]) -> dict[str, Any]:
    """Keep the keywords `accepted` knows, rename moved ones, drop the rest; log every change."""
    out: dict[str, Any] = {}
    for key, value in wanted.items():
        if PREFERRED_ARGUMENTS.get(key) in accepted:
            out[PREFERRED_ARGUMENTS[key]] = value
        elif key in accepted:
            out[key] = value
        elif RENAMED_ARGUMENTS.get(key) in accepted:
            new = RENAMED_ARGUMENTS[key]
            log.info("TrainingArguments: %s is called %s in the installed transformers", key, new)
            out[new] = value
        else:
            log.warning("TrainingArguments: the installed transformers has no %r; dropped (value %r)", key, value)
    return out


def _wanted_arguments(s: Schedule, output_dir: str | Path) -> dict[str, Any]:
    wanted: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": s.per_device_batch,
        "per_device_eval_batch_size": s.per_device_batch,
        "gradient_accumulation_steps": s.grad_accum,
        "learning_rate": s.lr,
        "weight_decay": s.weight_decay,
        "lr_scheduler_type": s.scheduler,
        "warmup_steps": s.warmup_steps,
        "bf16": s.precision == "bf16",
        "fp16": s.precision == "fp16",
        "gradient_checkpointing": s.gradient_checkpointing,
        "eval_strategy": s.eval_strategy,
        "save_strategy": "steps",
        "save_steps": s.save_steps,
        "save_total_limit": s.save_total_limit,
        "logging_steps": s.logging_steps,
        "dataloader_num_workers": s.dataloader_num_workers,
        "optim": s.optim if not s.deepspeed else "adamw_torch",
    }
    if s.max_steps_forced:
        wanted["max_steps"] = s.max_steps
    else:
        wanted["num_train_epochs"] = s.epochs
    if s.gradient_checkpointing:
        wanted["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if s.eval_strategy != "no":
        wanted["eval_steps"] = s.eval_steps
    if s.device == "cuda":
        if s.tf32:
            wanted["tf32"] = True
        if s.world_size > 1:
            wanted["ddp_find_unused_parameters"] = False
    else:
        wanted["use_cpu"] = True
    if s.deepspeed:
        wanted["deepspeed"] = json.loads(json.dumps(s.deepspeed))  # a copy: HF fills "auto" in place
    return wanted


def training_arguments_kwargs(plan: Plan | Schedule, output_dir: str | Path, **extra: Any) -> dict[str, Any]:
    """Keywords for `transformers.Seq2SeqTrainingArguments` from a plan's schedule, plus `extra` (which win),
    using only names the installed transformers accepts."""
    from transformers import Seq2SeqTrainingArguments

    schedule = plan.schedule if isinstance(plan, Plan) else plan
    accepted = inspect.signature(Seq2SeqTrainingArguments).parameters
    return adapt_kwargs({**_wanted_arguments(schedule, output_dir), **extra}, accepted)


def training_arguments(plan: Plan, output_dir: str | Path, **extra: Any) -> Any:
    """`Seq2SeqTrainingArguments` built from `plan` (see training_arguments_kwargs)."""
    from transformers import Seq2SeqTrainingArguments

    return Seq2SeqTrainingArguments(**training_arguments_kwargs(plan, output_dir, **extra))
