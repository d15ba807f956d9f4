"""Memory model for fine-tuning: bytes on each GPU and in host RAM for a training setup.

A setup is a model profile (parameter groups + the shapes activations depend on), a training mode
(full / freeze-encoder / LoRA), a precision, a distribution strategy (plain single-GPU/DDP, DeepSpeed
ZeRO-2, ZeRO-3, optimizer offload, optimizer + parameter offload), gradient checkpointing, world size
and micro-batch. `estimate()` turns it into bytes, term by term, so `plan.json` can say where the
memory goes.

Model states follow the same bookkeeping as DeepSpeed's own estimators
(`estimate_zero2_model_states_mem_needs` in deepspeed/runtime/zero/stage_1_and_2.py and
`estimate_zero3_model_states_mem_needs` in stage3.py), derived here per tensor so that frozen
parameters, LoRA and plain PyTorch training are covered too; tests/unit/test_memory.py checks the
two agree within 10%. Bytes per *trainable* parameter under bf16/fp16 mixed precision with fp32
master weights and AdamW:

    tensor                      plain autocast   ZeRO-2 (/N = per rank)   ZeRO-3
    working weights (16-bit)    -                2 (replicated)           2/N
    fp32 weights / master       4                4/N                      4/N
    16-bit gradients            -                2/N                      (buckets only)
    fp32 gradients              4                4/N                      4/N
    AdamW moments (2 x fp32)    8                8/N                      8/N
    autocast 16-bit copies      2                -                        -
                                = 18             = 2 + 18/N               = 18/N (+ 4 x largest layer)

Optimizer offload moves master weights, fp32 gradients and moments (16 bytes) to host RAM;
parameter offload moves the 16-bit weights (2 bytes) there too: 16 resp. 18 bytes per parameter of
pinned host memory, times DeepSpeed's buffer factor 1.5 -> ~24 resp. ~27 bytes per parameter
(a 10 B model needs ~235 resp. ~265 GB of host RAM).

Activations are estimated per transformer layer from the shapes (see `activation_bytes`).
All sizes are bytes; GB in reports means 10**9 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

GB = 10**9
GiB = 2**30

Mode = Literal["full", "freeze-encoder", "lora"]
Part = Literal["encoder", "decoder"]
Precision = Literal["bf16", "fp16", "fp32"]
StrategyName = Literal["plain", "zero2", "zero2-offload-opt", "zero3", "zero3-offload-opt", "zero3-offload-all"]

# --- bytes per element -------------------------------------------------------------------------
FP32 = 4
HALF = 2  # bf16 / fp16
ADAM_MOMENTS = 2 * FP32  # exp_avg + exp_avg_sq  # 8
OFFLOADED_OPTIMIZER_BYTES = FP32 + FP32 + ADAM_MOMENTS  # fp32 master + fp32 grads + moments  # 16

# DeepSpeed's `additional_buffer_factor`: host allocations (pinned buffers, rounding, fragmentation)
# need ~1.5x the raw tensor bytes.
HOST_BUFFER_FACTOR = 1.5
# ZeRO-3 keeps the largest layer gathered: its 16-bit weights and 16-bit gradients, counted by
# DeepSpeed as 4 bytes per parameter of that layer.
ZERO3_WORKING_BYTES_PER_LARGEST_LAYER_PARAM = 2 * HALF  # 4

# --- fixed overheads (not model states) ---------------------------------------------------------
CUDA_CONTEXT_BYTES = 1 * GB  # CUDA context + cuBLAS/cuDNN workspaces, seen as ~0.6-1 GB on H100
NCCL_BUFFER_BYTES = GB // 2  # NCCL communicator buffers when world size > 1
HOST_PROCESS_BYTES = 3 * GB  # RSS of one python+torch+transformers(+CUDA runtime) training process
HOST_WORKER_BYTES = GB // 2  # one DataLoader worker process (mostly copy-on-write shared)

# --- DeepSpeed knobs the planner writes into its config (elements, not bytes) -------------------
ZERO3_MAX_LIVE_PARAMETERS = 10**9  # DeepSpeed's default stage3_max_live_parameters
ZERO_OVERLAP_BUFFER_FACTOR = 4.5  # DeepSpeed docs: overlap_comm uses 4.5x the bucket sizes

# --- activations (bytes per element saved for backward, bf16 autocast, SDPA attention) ----------
NORM_SAVED = FP32  # LayerNorm/RMSNorm run in fp32 under autocast and keep their fp32 input
MATMUL_INPUT = HALF  # every matmul keeps its 16-bit input for the weight gradient
RESIDUAL = FP32  # residual stream between layers (fp32 under autocast): checkpointed layer inputs
# cross-entropy over the vocabulary: 16-bit logits + fp32 log-softmax kept for backward + fp32 grad
LOGIT_BYTES = HALF + FP32 + FP32  # 10
# Measured on H100 (torch 2.11, transformers 5.17, SDPA; tests/gpu/test_memory_calibration.py): each
# attention block keeps ~4 more 16-bit tensors of tokens x hidden than the q/k/v/output above (the
# kernel's own q/k/v layout and its output besides the out-projection's contiguous copy).
SDPA_EXTRA = 4 * HALF  # 8


class LinearGroup(BaseModel):
    """`count` linear modules called `name` (as peft's target_modules matches them) in one part."""

    model_config = ConfigDict(frozen=True)
    name: str
    part: Part
    in_features: int
    out_features: int
    count: int


class Stack(BaseModel):
    """A stack of identical transformer layers and the shapes activation memory depends on."""

    model_config = ConfigDict(frozen=True)
    part: Part
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    gated_mlp: bool  # SwiGLU (gate, up, down) instead of fc1 -> GELU -> fc2
    seq_len: int  # tokens/frames per sample through this stack
    cross_seq_len: int = 0  # encoder frames each layer cross-attends to (Whisper decoder); 0 = none


class ModelProfile(BaseModel):
    """Parameter groups and shapes of a model, enough to estimate training memory.

    The groups are disjoint: total = encoder + decoder + embeddings + head + adaptor + inert.
    `decoder` is the decoder or LLM transformer (layers, norms, learned positions);
    `embeddings` the input token embeddings; `head` an untied output head (0 when tied).
    `fixed_params` counts parameters the model itself never trains (Whisper's sinusoidal
    encoder positions), included in `encoder`.
    `inert_params` counts parameters that are held in memory but neither trained nor computed in any
    mode (an output branch the task never runs, e.g. Kimi-Audio's audio-output branch under ASR): they
    weigh as frozen weights, and have no gradients, no optimizer state and no activations (no stack).
    """

    model_config = ConfigDict(frozen=True)
    name: str
    family: str
    encoder_params: int
    decoder_params: int
    embedding_params: int
    head_params: int
    adaptor_params: int = 0
    fixed_params: int = 0
    inert_params: int = 0
    largest_layer_params: int  # biggest single weight tensor (ZeRO-3 gathers it whole)
    vocab_size: int
    hidden_size: int  # of the decoder/LLM: DeepSpeed bucket sizes derive from it
    stacks: tuple[Stack, ...]
    linears: tuple[LinearGroup, ...]
    frontend_activation_bytes: int = 0  # per sample: conv front end / adaptor, when the encoder trains
    input_bytes_per_sample: int = 0  # one collated sample as the DataLoader ships it (for /dev/shm)
    default_lora_targets: tuple[str, ...]
    default_lora_parts: tuple[Part, ...] = ("encoder", "decoder")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_params(self) -> int:
        return (
            self.encoder_params
            + self.decoder_params
            + self.embedding_params
            + self.head_params
            + self.adaptor_params
            + self.inert_params
        )

    def lora_params(self, r: int, targets: Sequence[str], parts: Sequence[str] | None = None) -> int:
        """Trainable LoRA parameters: r x (in + out) for every targeted linear (lora_A + lora_B)."""
        parts = tuple(parts) if parts is not None else self.default_lora_parts
        known = {g.name for g in self.linears}
        unknown = sorted(set(targets) - known)
        if unknown:
            raise ValueError(
                f"LoRA targets {unknown} are not linear layers of {self.name}; "
                f"choose from {sorted(known)}"
            )
        return sum(
            r * (g.in_features + g.out_features) * g.count
            for g in self.linears
            if g.name in targets and g.part in parts
        )

    def trainable_params(self, mode: Mode, lora: LoraSpec | None = None) -> int:
        if mode == "full":
            return self.total_params - self.fixed_params - self.inert_params
        if mode == "freeze-encoder":
            return self.total_params - self.encoder_params - self.inert_params
        if lora is None:
            raise ValueError("mode 'lora' needs a LoraSpec (r, targets)")
        return self.lora_params(lora.r, lora.targets, lora.parts)

    def encoder_trains(self, mode: Mode, lora: LoraSpec | None = None) -> bool:
        """Whether gradients flow into the encoder (then its activations must be kept)."""
        if mode == "full":
            return True
        if mode == "freeze-encoder":
            return False
        parts = lora.parts if lora is not None and lora.parts is not None else self.default_lora_parts
        return "encoder" in parts

    def with_seq_lens(self, *, encoder: int | None = None, decoder: int | None = None) -> ModelProfile:
        """The same model with other sequence lengths (e.g. the longest label in the data set)."""
        stacks = []
        for s in self.stacks:
            update: dict[str, int] = {}
            if s.part == "encoder" and encoder is not None:
                update["seq_len"] = encoder
            if s.part == "decoder" and decoder is not None:
                update["seq_len"] = decoder
            if s.part == "decoder" and s.cross_seq_len and encoder is not None:
                update["cross_seq_len"] = encoder
            stacks.append(s.model_copy(update=update))
        return self.model_copy(update={"stacks": tuple(stacks)})


class LoraSpec(BaseModel):
    model_config = ConfigDict(frozen=True)
    r: int = 16
    alpha: int = 32
    targets: tuple[str, ...]
    parts: tuple[Part, ...] | None = None  # None: the profile's default_lora_parts


# --- activations -----------------------------------------------------------------------------------


def _layer_activation_bytes(s: Stack) -> int:
    """Bytes one layer keeps for backward, per sample (bf16 autocast, SDPA/flash attention: no
    s x s score matrix is stored). K/V are counted at full head count because Hugging Face models
    may repeat grouped K/V heads before SDPA."""
    tokens, h, f = s.seq_len, s.hidden, s.ffn
    # norm input, q/k/v projection input, q, k, v (kept by SDPA), out-projection input, SDPA's extra
    attention = tokens * h * (NORM_SAVED + MATMUL_INPUT + 3 * HALF + MATMUL_INPUT + SDPA_EXTRA)
    cross = 0
    if s.cross_seq_len:
        # norm input, q input, q, out-projection input, SDPA's extra; per encoder frame: k/v input copy, k, v
        cross = tokens * h * (NORM_SAVED + MATMUL_INPUT + HALF + MATMUL_INPUT + SDPA_EXTRA)
        cross += s.cross_seq_len * h * (MATMUL_INPUT + 2 * HALF)
    # norm input, first matmul input; then per ffn unit: fc1 out + GELU out, or gate, up, act, product
    mlp = tokens * h * (NORM_SAVED + MATMUL_INPUT) + tokens * f * (4 if s.gated_mlp else 2) * HALF
    return attention + cross + mlp


def activation_bytes(
    profile: ModelProfile,
    micro_batch: int,
    *,
    mode: Mode,
    gradient_checkpointing: bool,
    lora: LoraSpec | None = None,
) -> int:
    """Peak activation memory of one device for one micro-batch.

    Without checkpointing every layer of every stack that gradients flow through keeps its
    activations, plus one more layer's worth as backward workspace. With checkpointing each layer
    keeps only its fp32 input; the peak is then at the end of the forward (the one-layer recompute
    in backward happens while the kept inputs are being freed), so no workspace is added.
    A frozen encoder keeps only its output. The loss keeps `LOGIT_BYTES` per logit.
    """
    encoder_trains = profile.encoder_trains(mode, lora)
    per_sample = 0
    largest_layer = 0
    for s in profile.stacks:
        boundary = s.seq_len * s.hidden * RESIDUAL  # stack output (and input) in fp32
        if s.part == "encoder" and not encoder_trains:
            per_sample += boundary
            continue
        layer = _layer_activation_bytes(s)
        largest_layer = max(largest_layer, layer)
        kept = s.layers * (s.seq_len * s.hidden * RESIDUAL if gradient_checkpointing else layer)
        per_sample += kept + boundary
    if encoder_trains:
        per_sample += profile.frontend_activation_bytes
    decoder_tokens = max(s.seq_len for s in profile.stacks if s.part == "decoder")
    per_sample += decoder_tokens * profile.vocab_size * LOGIT_BYTES
    workspace = 0 if gradient_checkpointing else largest_layer
    return micro_batch * (per_sample + workspace)


# --- model states --------------------------------------------------------------------------------


class Strategy(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: StrategyName
    zero_stage: Literal[0, 2, 3]
    offload_optimizer: bool = False
    offload_param: bool = False

    @property
    def uses_deepspeed(self) -> bool:
        return self.zero_stage > 0


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(name="plain", zero_stage=0),
        Strategy(name="zero2", zero_stage=2),
        Strategy(name="zero2-offload-opt", zero_stage=2, offload_optimizer=True),
        Strategy(name="zero3", zero_stage=3),
        Strategy(name="zero3-offload-opt", zero_stage=3, offload_optimizer=True),
        Strategy(name="zero3-offload-all", zero_stage=3, offload_optimizer=True, offload_param=True),
    )
}


def model_states_bytes(
    total_params: int,
    trainable_params: int,
    *,
    strategy: Strategy,
    world_size: int = 1,
    gpus_per_node: int | None = None,
    precision: Precision = "bf16",
    frozen_bytes: int = HALF,
    largest_layer_params: int = 0,
    load_bytes: int = FP32,
    zero_init: bool = True,
) -> tuple[dict[str, int], dict[str, int]]:
    """Model-state bytes (weights, gradients, optimizer) per GPU and per node of host RAM.

    Returns (gpu_terms, host_terms); the host terms already include HOST_BUFFER_FACTOR.
    `frozen_bytes`: bytes per frozen parameter in plain training (bf16 2, fp32 4).
    `load_bytes`: bytes per parameter of the checkpoint as each rank loads it into host RAM
    (ZeRO-3 with `zero_init` builds the model partitioned, so only one layer is materialised).
    """
    n = world_size
    ranks = gpus_per_node if gpus_per_node is not None else world_size
    t, p = trainable_params, total_params
    frozen = p - t
    mixed = precision != "fp32"
    low = HALF if mixed else FP32  # working weight / gradient width
    master = FP32 if mixed else 0  # fp32 master copy exists only next to 16-bit weights
    gpu: dict[str, int] = {}
    host_states = 0
    if strategy.zero_stage == 0:
        # torch autocast: weights stay fp32 (they are the master), 16-bit copies made per forward
        gpu["weights"] = t * FP32 + frozen * frozen_bytes
        gpu["gradients"] = t * FP32
        gpu["optimizer"] = t * ADAM_MOMENTS
        if mixed:
            gpu["autocast_copies"] = t * HALF
        if n > 1:
            gpu["ddp_buckets"] = t * FP32  # DDP's flat gradient buckets (gradient_as_bucket_view=False)
        load = ranks * p * load_bytes
    elif strategy.zero_stage == 2:
        gpu["weights"] = p * low
        if strategy.offload_optimizer:
            host_states = t * OFFLOADED_OPTIMIZER_BYTES
        else:
            gpu["gradients"] = t * (low + (FP32 if mixed else 0)) // n
            gpu["optimizer"] = t * (master + ADAM_MOMENTS) // n
        load = ranks * p * load_bytes
    else:
        gpu["working_layer"] = largest_layer_params * ZERO3_WORKING_BYTES_PER_LARGEST_LAYER_PARAM
        if strategy.offload_param:
            host_states += p * low
        else:
            gpu["weights"] = p * low // n
        if strategy.offload_optimizer:
            host_states += t * OFFLOADED_OPTIMIZER_BYTES
        else:
            gpu["gradients"] = t * FP32 // n
            gpu["optimizer"] = t * (master + ADAM_MOMENTS) // n
        load = ranks * (largest_layer_params if zero_init else p) * FP32
    host = {"model_states": int(max(load, host_states) * HOST_BUFFER_FACTOR)}
    return gpu, host


def deepspeed_buffer_bytes(profile: ModelProfile, strategy: Strategy) -> int:
    """GPU bytes of DeepSpeed's communication buckets / live-parameter cache for the planner's config."""
    h2 = profile.hidden_size**2  # reduce_bucket_size the planner writes (Hugging Face's "auto")
    if strategy.zero_stage == 2:
        return int(ZERO_OVERLAP_BUFFER_FACTOR * h2 * HALF)
    if strategy.zero_stage == 3:
        live = min(ZERO3_MAX_LIVE_PARAMETERS, profile.total_params)
        prefetch = int(0.9 * h2)
        return (live + prefetch) * HALF + 2 * h2 * HALF
    return 0


# --- whole setups ----------------------------------------------------------------------------------


class Setup(BaseModel):
    """One training configuration to estimate."""

    model_config = ConfigDict(frozen=True)
    mode: Mode
    strategy: StrategyName
    gradient_checkpointing: bool
    micro_batch: int
    world_size: int = 1  # ranks in all (ZeRO partitions over them)
    gpus_per_node: int | None = None  # ranks on one node (host RAM is per node); None: all on one node
    precision: Precision = "bf16"
    device: Literal["cuda", "cpu"] = "cuda"
    lora: LoraSpec | None = None
    frozen_bytes: int | None = None  # bytes per frozen parameter; None: 16-bit, or 4 under fp32
    load_bytes: int = FP32
    dataloader_workers: int = 0


class Estimate(BaseModel):
    trainable_params: int
    gpu: dict[str, int] = Field(default_factory=dict)  # per GPU
    host: dict[str, int] = Field(default_factory=dict)  # per node

    @computed_field  # type: ignore[prop-decorator]
    @property
    def gpu_bytes(self) -> int:
        return sum(self.gpu.values())

    @computed_field  # type: ignore[prop-decorator]
    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())


def estimate(profile: ModelProfile, setup: Setup) -> Estimate:
    """GPU bytes per device and host bytes per node for `setup`, term by term."""
    strategy = STRATEGIES[setup.strategy]
    trainable = profile.trainable_params(setup.mode, setup.lora)
    on_cpu = setup.device == "cpu"
    if on_cpu and strategy.uses_deepspeed:
        raise ValueError("DeepSpeed strategies need CUDA GPUs; on CPU use strategy 'plain'")
    gpu, host = model_states_bytes(
        profile.total_params,
        trainable,
        strategy=strategy,
        world_size=setup.world_size,
        gpus_per_node=setup.gpus_per_node,
        precision=setup.precision,
        frozen_bytes=setup.frozen_bytes or (FP32 if setup.precision == "fp32" else HALF),
        largest_layer_params=profile.largest_layer_params,
        load_bytes=setup.load_bytes,
    )
    gpu["activations"] = activation_bytes(
        profile,
        setup.micro_batch,
        mode=setup.mode,
        gradient_checkpointing=setup.gradient_checkpointing,
        lora=setup.lora,
    )
    if strategy.zero_stage == 0:
        # The peak is at the end of the forward (activations + autocast's 16-bit weight copies) or
        # at the end of the backward (gradients): backward frees activations as it makes gradients,
        # and zero_grad(set_to_none=True) frees gradients before the next forward. The peak holds
        # the larger of the two, not both (measured on H100, tests/gpu/test_memory_calibration.py).
        forward = gpu["activations"] + gpu.get("autocast_copies", 0)
        gpu["gradient_activation_overlap"] = -min(forward, gpu["gradients"])
    if strategy.uses_deepspeed:
        gpu["deepspeed_buffers"] = deepspeed_buffer_bytes(profile, strategy)
    ranks = 1 if on_cpu else (setup.gpus_per_node or setup.world_size)  # processes on this node
    host["processes"] = ranks * (HOST_PROCESS_BYTES + setup.dataloader_workers * HOST_WORKER_BYTES)
    if on_cpu:
        # the "device" is the host: model states and activations live in RAM; the model is
        # loaded once and trained in place, so loading does not add to the trained weights
        host.pop("model_states")
        host.update({f"train_{k}": v for k, v in gpu.items()})
        return Estimate(trainable_params=trainable, gpu={}, host=host)
    gpu["cuda_context"] = CUDA_CONTEXT_BYTES
    if setup.world_size > 1:
        gpu["nccl"] = NCCL_BUFFER_BYTES
    return Estimate(trainable_params=trainable, gpu=gpu, host=host)


def checkpoint_bytes(profile: ModelProfile, trainable_params: int, *, mode: Mode, weight_bytes: int) -> int:
    """Disk bytes of one resumable checkpoint: the weights as trained (`weight_bytes` each; a LoRA
    checkpoint holds only the adapters, in fp32) + AdamW state (fp32 master/moments)."""
    if mode == "lora":
        return trainable_params * (FP32 + FP32 + ADAM_MOMENTS)
    return profile.total_params * weight_bytes + trainable_params * (FP32 + ADAM_MOMENTS)


def gb(n_bytes: float) -> float:
    """Bytes -> GB (10**9), rounded for reports."""
    return round(n_bytes / GB, 1)


def ceil_gib(n_bytes: float) -> int:
    return int(math.ceil(n_bytes / GiB))
