"""Fast single-GPU fine-tuning: bf16 working weights with fp32 master weights, fused AdamW, SDPA attention,
regional ``torch.compile``, and a DataLoader that keeps the GPU busy.

    ok, why = fast_path_applies(plan.schedule, trainee)   # one GPU, plain strategy, bf16, full / freeze-encoder
    result = train_fast(trainee, train_ds, collate_fn, plan.schedule, ckpt_dir,
                        on_checkpoint=lambda path: ctx.sync(), resume_from=last_checkpoint(ckpt_dir))
    # afterwards ``trainee`` holds the fp32 master weights again (fp32 tensors): save it as usual

``trainee`` is any module whose ``forward(**batch)`` returns the loss (``out["loss"]`` or ``out.loss``), e.g.
a model family's trainee (e.g. ``common.families.whisper.trainee.make_trainee``; loss on the label tokens only).

Precision (``FastOptions.precision``):

    master    (default) every trainable weight lives in one flat fp32 buffer per weight-decay group (the master
              copy, updated by ``torch.optim.AdamW(fused=True)``); the model computes with a bf16 copy whose
              tensors are views into one flat bf16 buffer. Autograd hands each gradient over as a fresh bf16
              tensor (``p.grad`` starts as None: no add kernel per parameter); after each micro-batch they are
              copied (first micro-batch) or added into one persistent flat fp32 gradient buffer with
              multi-tensor ops and released (accumulation in fp32); after the optimizer step the masters are
              copied back to bf16 (one kernel per group). Bytes per trainable parameter: 2 (bf16 weight)
              + 4 (fp32 grad) + 4 (master) + 8 (moments) = 18, + 2 (bf16 grads) at the end of a backward.
    autocast  fp32 weights, ``torch.autocast(bfloat16)``, fused AdamW over the fp32 weights (the Trainer's
              bf16 mode without its overheads): 18 bytes per parameter, activations partly in fp32.

Both keep fp32 master weights: the optimizer updates fp32 numbers, so updates far below bf16's resolution
(lr 1e-5 on weights of size 1: bf16 steps by 2**-8) accumulate instead of being rounded away.

Measured on one H100 80GB (``bench/h100_train_throughput.py`` → ``bench/results/h100-train-throughput.json``;
Whisper large-v3 shape, 30-s inputs, batch 16 x accumulation 2, torch 2.11, transformers 5.17):

    (two runs, 2026-11-25; the committed JSON holds the second)
    master, compiled layers, cuDNN attention   45.6 / 43.8 samples/s   67.6 GB   (the defaults)
    the same with the decoder's sync           38.2 / 37.5 samples/s             (host_positions=False)
    master, eager                              39.1 / 36.8 samples/s   67.6 GB
    Hugging Face recipe (fp16, checkpointing)  19.2 / 17.5 samples/s   28.1 GB
    attention fwd+bwd, 16 x 20 heads x 1500    cuDNN 2.0 ms, flash 3.1 ms (``attention="auto"`` times both)
    torch.compile (64 layers, regional)        24-29 s once, then 1.16-1.19x: pays after ~210 steps

What made the difference (torch.profiler, one step): transformers' decoder checked its position ids with a
data-dependent ``if`` on a GPU tensor, a sync per micro-batch after which the decoder's small kernels ran at
the host's launch rate (GPU busy 69 % of the step, 0.17 s/step idle in 20-100 µs gaps); with host-made
positions (``HostDecoderPositions``) the host stays ahead and the GPU is busy 93 %.

Checkpoints (``checkpoint-<step>/``, written to a temporary folder and renamed: a folder that exists is complete):

    config.json, generation_config.json, model.safetensors   a plain Hugging Face model, fp32 (master) weights
    optimizer.pt        AdamW moments of the masters, LR schedule, RNG states (torch.load(weights_only=True))
    trainer_state.json  global_step, max_steps, epoch, log_history (Trainer names) + the master layout
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from common.core.files import publish_dir
from common.training import checkpoints as ckpts
from common.training.planner import Schedule

log = logging.getLogger(__name__)

STATE_FILE, OPTIMIZER_FILE = ckpts.FAST_STATE_FILE, ckpts.FAST_OPTIMIZER_FILE
IGNORE_INDEX = -100  # label positions the loss skips (the collator's prompt mask)

# Every tensor starts at a multiple of 64 elements in the flat buffers: 128-byte (bf16) / 256-byte (fp32)
# aligned. cuBLAS wants 16-byte aligned operands and Inductor copies misaligned inputs on every call.
ALIGN_ELEMENTS = 64
MAX_FLAT_ELEMENTS = 2**30  # one flat buffer holds at most 1 G elements (4 GB fp32): int32 indexing stays safe
DECODER_PAD_MULTIPLE = 8  # decoder length rounded up to a multiple of 8: tensor-core friendly, few shapes to compile
# transformers.TrainingArguments defaults, so both training paths optimize the same way
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
MAX_GRAD_NORM = 1.0
TIMING_WARMUP_STEPS = 3  # steps left out of the steady-state speed: compilation, allocator growth, autotuning
# torch.compile of the transformer layers pays after this many optimizer steps. Measured on an H100 for
# Whisper large-v3, batch 16 x 2 (bench/results/h100-train-throughput.json "compile"): compiling costs
# 24-29 s (cold cache) and saves 0.115-0.14 s per step (1.16-1.19x): break-even after ~207-210 steps.
COMPILE_MIN_STEPS = 210
SDPA_PROBE_ITERS = 10  # fwd+bwd repetitions per attention backend when picking the fastest


class FastTrainError(ValueError):
    """The fast path cannot run as asked; the message says why and what to change."""


@dataclass
class FastOptions:
    precision: Literal["master", "autocast"] = "master"
    compile: Literal["auto", "on", "off"] = "auto"  # auto: on CUDA when the run has >= COMPILE_MIN_STEPS steps
    compile_parts: Literal["all", "encoder"] = "all"  # which stacks' layers torch.compile takes
    attention: Literal["auto", "flash", "cudnn", "efficient", "default"] = "auto"  # auto: time them, take the fastest
    max_grad_norm: float = MAX_GRAD_NORM
    max_steps: int | None = None  # replaces the plan's max_steps (benchmarks, smoke runs); the schedule follows it
    save: bool = True  # write checkpoints (at save_steps and at the end)
    profile_steps: int = 0  # profile this many steps after the warm-up (torch.profiler); left out of the timing
    profile_trace: str | None = None  # also write the profiled steps as a Chrome trace here (.json or .json.gz)
    prefetch_factor: int = 4  # batches each DataLoader worker prepares ahead
    seed: int = 0  # data order (one permutation per epoch) and dropout
    tensorboard_dir: str | None = None
    progress: bool = True
    host_positions: bool = True  # decoder position ids made on the host: no sync per micro-batch (HostDecoderPositions)
    expandable_segments: bool = True  # CUDA allocator grows segments in place (less fragmentation near a full GPU)


# --- when the fast path applies ------------------------------------------------------------------------


def hf_model_of(trainee: Any) -> Any:
    """The Hugging Face model inside ``trainee`` (a family's trainee exposes it as ``.model``)."""
    inner = getattr(trainee, "model", None)
    return inner if hasattr(inner, "save_pretrained") else trainee


def fast_path_applies(schedule: Schedule, trainee: Any = None) -> tuple[bool, str]:
    """(True, reason) when ``schedule`` trains on one CUDA GPU without DeepSpeed in bf16 and every trainable
    weight belongs to the Hugging Face model (full / freeze-encoder; LoRA stays on the Trainer path)."""
    s = schedule
    checks = (
        (s.device == "cuda", f"device {s.device!r}: the fast path is for CUDA GPUs"),
        (s.world_size == 1, f"world_size {s.world_size}: the fast path trains on one GPU"),
        (s.strategy == "plain", f"strategy {s.strategy!r}: DeepSpeed runs through the Trainer"),
        (s.precision == "bf16", f"precision {s.precision!r}: the fast path computes in bf16"),
        (s.mode in ("full", "freeze-encoder"), f"mode {s.mode!r}: LoRA adapters train through the Trainer"),
    )
    for ok, why in checks:
        if not ok:
            return False, why
    if trainee is not None:
        owned = {id(p) for p in hf_model_of(trainee).parameters()}
        foreign = [n for n, p in trainee.named_parameters() if p.requires_grad and id(p) not in owned]
        if foreign:
            return False, f"trainable tensors outside the Hugging Face model ({foreign[:2]}…)"
    return True, "one GPU, plain strategy, bf16: bf16 weights + fp32 master, fused AdamW, SDPA, compiled layers"


# --- fp32 master weights in flat buffers ----------------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class _FlatGroup:
    """One weight-decay group: fp32 master and bf16 working copy, each one flat buffer (the model's parameters
    become views into the working one), and one persistent flat fp32 gradient buffer (``master.grad``)."""

    def __init__(self, named: Sequence[tuple[str, Any]], weight_decay: float, dtype: Any, device: Any):
        import torch

        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.offsets: list[int] = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += _round_up(n, ALIGN_ELEMENTS)
        self.weight_decay = weight_decay
        self.params = [p for _, p in named]
        with torch.no_grad():
            self.master = torch.zeros(total, dtype=torch.float32, device=device)  # padding stays 0 (zero grads)
            for p, o, n in zip(self.params, self.offsets, self.numels, strict=True):
                self.master[o : o + n].copy_(p.detach().reshape(-1))
            self.work = self.master.to(dtype)
            # allocated once: no multi-GB allocation and free per step (allocator churn, fragmentation)
            self.master.grad = torch.zeros_like(self.master)
        self.grad_views = self.views(self.master.grad)
        for p, view in zip(self.params, self.views(self.work), strict=True):
            p.data = view  # the old fp32 storage is freed once nothing else holds it
            p.grad = None  # autograd hands over each gradient as a fresh bf16 tensor (no add kernel)

    def views(self, flat: Any) -> list[Any]:
        return [flat[o : o + n].view(s) for o, n, s in zip(self.offsets, self.numels, self.shapes, strict=True)]


def _chunks(named: Sequence[tuple[str, Any]]) -> list[list[tuple[str, Any]]]:
    """Consecutive runs of tensors of at most MAX_FLAT_ELEMENTS elements each (one flat buffer per run)."""
    out: list[list[tuple[str, Any]]] = []
    size = 0
    for item in named:
        n = _round_up(item[1].numel(), ALIGN_ELEMENTS)
        if not out or size + n > MAX_FLAT_ELEMENTS:
            out.append([])
            size = 0
        out[-1].append(item)
        size += n
    return out


class MasterWeights:
    """fp32 master copies of ``named`` (trainable parameters) in flat buffers; the parameters themselves
    become ``dtype`` views. Decoupled weight decay skips 1-D tensors (biases, norms), as the Trainer does."""

    def __init__(self, named: Sequence[tuple[str, Any]], weight_decay: float, dtype: Any, device: Any):
        if not named:
            raise FastTrainError("no trainable parameter: nothing for the optimizer to update")
        decay = [(n, p) for n, p in named if p.ndim >= 2]
        no_decay = [(n, p) for n, p in named if p.ndim < 2]
        self.groups = [_FlatGroup(chunk, wd, dtype, device)
                       for g, wd in ((decay, weight_decay), (no_decay, 0.0)) for chunk in _chunks(g)]

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [g.master], "weight_decay": g.weight_decay} for g in self.groups]

    def layout(self) -> list[dict[str, Any]]:
        return [{"names": g.names, "weight_decay": g.weight_decay, "elements": g.master.numel()} for g in self.groups]

    def accumulate(self, first: bool) -> None:
        """Move this micro-batch's bf16 gradients (``p.grad``, as autograd left them) into the fp32 gradients:
        copied on the first micro-batch of a step, added after it; multi-tensor ops, a few launches per group.
        A parameter the micro-batch did not reach (``p.grad`` None) contributes zero."""
        import torch

        with torch.no_grad():
            for g in self.groups:
                dst = [v for v, p in zip(g.grad_views, g.params, strict=True) if p.grad is not None]
                src = [p.grad for p in g.params if p.grad is not None]
                if first:
                    if len(src) < len(g.params):
                        g.master.grad.zero_()
                    if src:
                        torch._foreach_copy_(dst, src)
                elif src:
                    torch._foreach_add_(dst, src)
                for p in g.params:
                    p.grad = None

    def clip_(self, max_norm: float) -> Any:
        """Scale the fp32 gradients to a total L2 norm of at most ``max_norm`` (as clip_grad_norm_, no host
        sync); returns the norm before clipping."""
        import torch

        norms = torch.stack([torch.linalg.vector_norm(g.master.grad) for g in self.groups])
        total = torch.linalg.vector_norm(norms)
        if max_norm > 0:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for g in self.groups:
                g.master.grad.mul_(coef)
        return total

    def publish(self) -> None:
        """Copy the updated masters into the working weights (the fp32 gradients stay allocated)."""
        for g in self.groups:
            g.work.copy_(g.master)

    def named_masters(self) -> Iterator[tuple[str, Any, Any]]:
        """(name, parameter, its fp32 master view)."""
        for g in self.groups:
            yield from zip(g.names, g.params, g.views(g.master), strict=True)

    def restore_fp32(self) -> None:
        """Give every parameter back its own fp32 tensor holding the master value; drop the flat buffers."""
        for _, p, master in self.named_masters():
            p.data = master.clone()
            p.grad = None
        self.groups = []


# --- model preparation ---------------------------------------------------------------------------------


@dataclass
class _Prepared:
    hf: Any
    names: dict[int, str]  # id(parameter) -> its Hugging Face name
    master: MasterWeights | None
    frozen_fp32: dict[int, Any]  # id(tensor) -> its original fp32 value on the CPU (master mode)
    dtype: Any  # what activations and the working weights are in


def _trainable(trainee: Any, hf: Any) -> list[tuple[str, Any]]:
    names = {id(p): n for n, p in hf.named_parameters()}
    out, foreign = [], []
    for n, p in trainee.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) not in names:
            foreign.append(n)
        else:
            out.append((names[id(p)], p))
    if foreign:
        raise FastTrainError(f"trainable tensors outside the Hugging Face model: {foreign[:3]}; use the Trainer "
                             "path (common.training.trainer.make_trainer) for LoRA")
    return out


def prepare_model(trainee: Any, device: Any, precision: str, weight_decay: float) -> _Prepared:
    """Move ``trainee`` to ``device``; in master mode turn its weights into bf16 views over flat buffers with
    fp32 masters (frozen tensors become bf16, their fp32 originals kept on the CPU for checkpoints)."""
    import torch

    hf = hf_model_of(trainee)
    if getattr(hf.config, "_attn_implementation", "sdpa") not in ("sdpa", "flash_attention_2", "flash_attention_3"):
        if hasattr(hf, "set_attn_implementation"):
            hf.set_attn_implementation("sdpa")
        else:
            hf.config._attn_implementation = "sdpa"
        log.info("attention implementation set to sdpa")
    trainee.to(device)
    trainee.train()
    named = _trainable(trainee, hf)
    names = {id(p): n for n, p in hf.named_parameters(remove_duplicate=False)}
    if precision == "autocast":
        return _Prepared(hf, names, None, {}, torch.bfloat16)
    if precision != "master":
        raise FastTrainError(f"precision {precision!r}: expected 'master' or 'autocast'")
    dtype = torch.bfloat16
    trainable = {id(p) for _, p in named}
    frozen: dict[int, Any] = {}
    with torch.no_grad():
        for module in trainee.modules():
            for store in (module._parameters, module._buffers):
                for t in store.values():
                    if t is None or id(t) in trainable or id(t) in frozen or not t.is_floating_point():
                        continue
                    frozen[id(t)] = t.detach().to("cpu", copy=True)
                    t.data = t.data.to(dtype)
    master = MasterWeights(named, weight_decay, dtype, device)
    return _Prepared(hf, names, master, frozen, dtype)


def restore_model(prep: _Prepared, trainee: Any) -> None:
    """Undo prepare_model: fp32 weights holding the master values, frozen tensors as they were."""
    import torch

    if prep.master is not None:
        prep.master.restore_fp32()
    with torch.no_grad():
        for module in trainee.modules():
            for store in (module._parameters, module._buffers):
                for t in store.values():
                    if t is not None and id(t) in prep.frozen_fp32:
                        t.data = prep.frozen_fp32[id(t)].to(t.device)
    prep.frozen_fp32 = {}


def fp32_state_dict(prep: _Prepared) -> dict[str, Any]:
    """The Hugging Face model's state dict with fp32 CPU tensors (masters for trainable weights); tied
    names share one tensor, so save_pretrained writes it once."""

    masters = {id(p): m for _, p, m in prep.master.named_masters()} if prep.master else {}
    by_id: dict[int, Any] = {}

    def fp32(t: Any) -> Any:
        if id(t) not in by_id:
            src = masters.get(id(t), prep.frozen_fp32.get(id(t), t))
            value = src.detach().to("cpu", copy=True)
            by_id[id(t)] = value.float() if value.is_floating_point() else value
        return by_id[id(t)]

    out = {n: fp32(p) for n, p in prep.hf.named_parameters(remove_duplicate=False)}
    for n, b in prep.hf.named_buffers(remove_duplicate=False):
        out.setdefault(n, fp32(b))
    # only what the model itself saves (persistent buffers), in its order
    return {k: out[k] if k in out else v.detach().cpu() for k, v in prep.hf.state_dict().items()}


# --- decoder positions made on the host -------------------------------------------------------------------


class HostDecoderPositions:
    """Keeps one host-device sync per micro-batch out of the training step.

    transformers' mask code (``find_packed_sequence_indices``, 5.x) checks the decoder's position ids for
    packed sequences with a data-dependent ``if`` on a GPU tensor: a sync that empties the GPU's queue just as
    the decoder starts (measured on the H100: the decoder's forward and backward then run at the speed the
    host launches kernels, the GPU ~30 % busy). While installed, the decoder of a model in training gets its
    position ids as a host tensor (``arange`` per row: the values it computes itself without a cache), so
    that check runs on the CPU; the positional embedding then takes its first T rows by slicing, the same
    values it would gather. Nothing changes where the decoder is given positions, a cache or no ``position_ids``
    argument at all."""

    def __init__(self, hf: Any):
        self.handles: list[Any] = []
        self._host: dict[tuple[int, int], Any] = {}
        decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else None
        embed = getattr(decoder, "embed_positions", None)
        if decoder is None or embed is None or "position_ids" not in _parameters_of(decoder.forward):
            return
        self.handles = [decoder.register_forward_pre_hook(self._decoder_hook, with_kwargs=True),
                        embed.register_forward_pre_hook(self._embed_hook, with_kwargs=True)]

    @property
    def active(self) -> bool:
        return bool(self.handles)

    def _decoder_hook(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        import torch

        ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if ref is None and args:
            ref = args[0]
        cached = any(kwargs.get(k) is not None for k in ("past_key_values", "cache", "cache_position"))
        if not module.training or ref is None or kwargs.get("position_ids") is not None or cached:
            return None
        shape = (ref.shape[0], ref.shape[1])
        if shape not in self._host:
            self._host[shape] = torch.arange(shape[1]).expand(*shape)
        return args, {**kwargs, "position_ids": self._host[shape]}

    def _embed_hook(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        positions = kwargs.get("position_ids")
        if positions is None or not any(positions is t for t in self._host.values()):
            return None
        return args, {**kwargs, "position_ids": None}  # rows 0..T-1 by slicing: the same values

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> HostDecoderPositions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _parameters_of(fn: Callable) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


# --- torch.compile and attention -----------------------------------------------------------------------


def transformer_layers(hf: Any, parts: str = "all") -> list[Any]:
    """The repeated blocks (every element of a ModuleList named ``layers``; ``parts="encoder"``: those under
    an ``encoder`` module only): compiled one by one, so the compiled code of one layer serves all its
    siblings (regional compilation: seconds, not minutes)."""
    from torch import nn

    return [layer for name, m in hf.named_modules() if isinstance(m, nn.ModuleList) and name.endswith("layers")
            and (parts == "all" or "encoder" in name.split(".")) for layer in m]


def compile_layers(hf: Any, parts: str = "all") -> int:
    import torch._dynamo

    layers = transformer_layers(hf, parts)
    # Identical layers share one compiled graph; should a torch version guard per instance instead, every
    # layer must still fit the recompilation limit (else the rest would silently run eagerly).
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 2 * len(layers) + 8))
    for layer in layers:
        layer.compile()
    return len(layers)


def uncompile_layers(hf: Any) -> None:
    for layer in transformer_layers(hf):
        layer._compiled_call_impl = None  # what nn.Module.compile() set; the module's own forward runs again


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def sdpa_context(backend: str, strict: bool = False) -> Any:
    """A context preferring ``backend`` for F.scaled_dot_product_attention, the others as fallbacks
    (``strict``: ``backend`` alone, an error where it cannot run)."""
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = getattr(SDPBackend, SDPA_BACKENDS[backend])
    if strict:
        return sdpa_kernel([first])
    order = [first] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                   SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != first]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch < 2.6: no priority order, the backend alone
        return sdpa_kernel([first, SDPBackend.MATH])


def pick_sdpa_backend(batch: int, heads: int, seq: int, head_dim: int, device: Any,
                      candidates: Sequence[str] = ("flash", "cudnn")) -> tuple[str, dict[str, float | str]]:
    """Time forward + backward of the dominant attention shape (the encoder's self-attention) with each
    backend; the fastest whose output matches flash's within bf16 rounding wins."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=torch.bfloat16, generator=gen,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, heads, seq, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    timings: dict[str, float | str] = {}
    reference = None
    for name in candidates:
        try:
            with sdpa_context(name, strict=True):
                out = F.scaled_dot_product_attention(q, k, v)
                if reference is None:
                    reference = out.detach().float()
                err = ((out.detach().float() - reference).norm() / reference.norm()).item()
                if err > 2e-2:
                    timings[name] = f"rejected: relative error {err:.1e} vs {candidates[0]}"
                    continue
                for _ in range(2):
                    F.scaled_dot_product_attention(q, k, v).backward(grad)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(SDPA_PROBE_ITERS):
                    F.scaled_dot_product_attention(q, k, v).backward(grad)
                end.record()
                end.synchronize()
                timings[name] = round(start.elapsed_time(end) / SDPA_PROBE_ITERS, 3)  # ms
        except RuntimeError as e:  # backend unavailable for this shape / build
            timings[name] = f"unavailable: {str(e).splitlines()[0][:120]}"
    timed = {n: t for n, t in timings.items() if isinstance(t, float)}
    if not timed:
        return "default", timings
    return min(timed, key=timed.__getitem__), timings


# --- data ----------------------------------------------------------------------------------------------


class StepBatches:
    """Index lists of the micro-batches of optimizer steps ``start_step``..``end_step - 1``: one random
    permutation per epoch (seeded by ``seed + epoch``), ``accum`` micro-batches per step, and a last,
    shorter step when an epoch does not divide evenly (as the Trainer does). Resuming at step s yields the
    same batches an uninterrupted run would, without reading the skipped ones."""

    def __init__(self, n: int, batch: int, accum: int, seed: int, start_step: int, end_step: int):
        if n < 1:
            raise FastTrainError("the training set is empty")
        self.n, self.batch, self.accum, self.seed = n, batch, accum, seed
        self.start_step, self.end_step = start_step, end_step
        self.micro_per_epoch = math.ceil(n / batch)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / accum)

    def _permutation(self, epoch: int) -> list[int]:
        import torch

        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def steps(self) -> Iterator[tuple[int, list[list[int]]]]:
        """(step, its micro-batches' indices)."""
        perm, perm_epoch = None, -1
        for step in range(self.start_step, self.end_step):
            epoch, j = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = self._permutation(epoch), epoch
            first = j * self.accum
            last = min(first + self.accum, self.micro_per_epoch)
            yield step, [perm[m * self.batch : (m + 1) * self.batch] for m in range(first, last)]

    def group_sizes(self) -> Iterator[int]:
        for step in range(self.start_step, self.end_step):
            j = step % self.steps_per_epoch
            yield min(self.accum, self.micro_per_epoch - j * self.accum)

    def __iter__(self) -> Iterator[list[int]]:
        for _, micro in self.steps():
            yield from micro


class PadDecoder:
    """Wraps a collate function: right-pads ``decoder_input_ids`` (with ``pad_id``) and ``labels`` (with -100)
    to a multiple of ``multiple``. Padding sits after each text, so the causal decoder never reads it and the
    loss skips it; the padded length keeps GEMMs aligned and the compiled shapes few."""

    def __init__(self, collate_fn: Callable[[list], dict], pad_id: int, multiple: int = DECODER_PAD_MULTIPLE):
        self.collate_fn, self.pad_id, self.multiple = collate_fn, pad_id, multiple

    def __call__(self, items: list) -> dict:
        import torch.nn.functional as F

        batch = self.collate_fn(items)
        if "labels" not in batch or self.multiple <= 1:
            return batch
        width = batch["labels"].shape[-1]
        extra = _round_up(width, self.multiple) - width
        if extra:
            batch["labels"] = F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
            if "decoder_input_ids" in batch:
                batch["decoder_input_ids"] = F.pad(batch["decoder_input_ids"], (0, extra), value=self.pad_id)
        return batch


def make_loader(dataset: Any, collate_fn: Callable, batches: StepBatches, workers: int, pin: bool,
                prefetch_factor: int) -> Any:
    from torch.utils.data import DataLoader

    extra = {"prefetch_factor": prefetch_factor} if workers > 0 else {}
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn, num_workers=workers,
                      pin_memory=pin, **extra)


def _to_device(batch: Mapping[str, Any], device: Any, dtype: Any) -> dict[str, Any]:
    """Move tensors (non-blocking from pinned memory); floating inputs (log-mel, cached encoder states) to
    ``dtype`` on the GPU, which halves nothing on the bus but saves a cast in the first layer."""
    out = {}
    for k, v in batch.items():
        if hasattr(v, "to"):
            v = v.to(device, non_blocking=True)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


# --- checkpoints ---------------------------------------------------------------------------------------


def last_checkpoint(folder: Path) -> Path | None:
    """The complete fast-loop checkpoint with the highest step under ``folder``, or None."""
    return ckpts.last_complete(Path(folder), "fast")


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, prep: _Prepared, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> Path:
    """Write ``folder`` (checkpoint-<step>) atomically: temp folder, then rename."""
    import torch

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    prep.hf.save_pretrained(str(tmp), state_dict=fp32_state_dict(prep), safe_serialization=True)
    _mark_fp32(tmp / "config.json")  # save_pretrained recorded the working dtype (bf16); the weights are fp32
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
               tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, ensure_ascii=False))
    publish_dir(tmp, folder)
    return folder


def _mark_fp32(config_json: Path) -> None:
    """Record float32 as the checkpoint's dtype ("dtype" in transformers >= 4.56, "torch_dtype" before), so
    from_pretrained(dtype="auto") loads the fp32 weights as fp32."""
    data = json.loads(config_json.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in data:
            data[key] = "float32"
    config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _rotate(folder: Path, keep: int) -> None:
    for old in ckpts.checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
        log.info("removed old checkpoint %s (save_total_limit %d)", old.name, keep)


def _load_weights(path: Path, device: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    out: dict[str, Any] = {}
    for f in files:
        out.update(load_file(str(path / f), device=str(device)))
    return out


def load_checkpoint(path: Path, prep: _Prepared, optimizer: Any, scheduler: Any, layout: list[dict[str, Any]],
                    device: Any) -> dict[str, Any]:
    """Restore masters (and working weights), optimizer, schedule and RNG from ``path``; returns its state."""
    import torch

    state = json.loads((path / STATE_FILE).read_text())
    saved = state.get("fast_train", {}).get("layout")
    if saved != layout:
        raise FastTrainError(f"checkpoint {path} was written for other trainable tensors or precision; remove the "
                             "checkpoints folder (or run with --force) to start over")
    weights = _load_weights(path, device)
    with torch.no_grad():
        if prep.master is not None:
            for name, _, master in prep.master.named_masters():
                master.copy_(weights[name])
            prep.master.publish()
        else:
            for n, p in prep.hf.named_parameters():
                if p.requires_grad:
                    p.copy_(weights[n])
    blob = torch.load(path / OPTIMIZER_FILE, map_location=device, weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    rng = blob["rng"]
    _set_rng_state({"cpu": rng["cpu"].cpu(), **({"cuda": [s.cpu() for s in rng["cuda"]]} if "cuda" in rng else {})})
    return state


# --- timing and profiling ------------------------------------------------------------------------------


class _StepClock:
    """Per-optimizer-step wall times without a host sync per step: CUDA events at step ends (GPU idle time
    between steps, e.g. waiting for data, counts), read at logging points; on CPU the host clock."""

    def __init__(self, cuda: bool):
        import torch

        self.cuda = cuda
        self.seconds: list[float] = []
        self.excluded: set[int] = set()  # positions of profiled steps
        self._pending: list[Any] = []
        self._last: Any = None
        if cuda:
            self._last = torch.cuda.Event(enable_timing=True)
            self._last.record()
        else:
            self._last = time.perf_counter()

    def tick(self, exclude: bool = False) -> None:
        import torch

        if exclude:
            self.excluded.add(len(self.seconds) + len(self._pending))
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pending.append(ev)
        else:
            now = time.perf_counter()
            self.seconds.append(now - self._last)
            self._last = now

    def flush(self) -> None:
        for ev in self._pending:
            ev.synchronize()
            self.seconds.append(self._last.elapsed_time(ev) / 1000)
            self._last = ev
        self._pending = []

    def steady(self, warmup: int = TIMING_WARMUP_STEPS) -> list[float]:
        self.flush()
        return [s for i, s in enumerate(self.seconds) if i >= warmup and i not in self.excluded]


ATTENTION_KERNEL_MARKS = ("sdpa", "flash", "fmha", "attention")  # cuDNN's are "..._sdpa_sm90_flash_..."
GEMM_KERNEL_MARKS = ("gemm", "xmma", "nvjet", "cutlass", "wgmma", "_mma", "matmul")
HOST_API_MARKS = ("Synchronize", "cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaMemcpy", "cudaLaunchKernel",
                  "cuLaunchKernel")  # host calls that stall (sync, allocation) or show launch overhead


def kernel_kind(name: str) -> str:
    """'attention', 'gemm' or 'other' for a GPU kernel name (attention first: cuDNN's fused attention
    kernels carry GEMM-like tags too)."""
    n = name.lower()
    if any(k in n for k in ATTENTION_KERNEL_MARKS):
        return "attention"
    if any(k in n for k in GEMM_KERNEL_MARKS):
        return "gemm"
    return "other"


def summarize_profile(prof: Any, steps: int, top: int = 15) -> dict[str, Any]:
    """Per optimizer step: GPU kernel time by kind (GEMM / attention / other), how busy the GPU was over the
    profiled span, the top kernels, and host calls that stall or launch (count and host seconds)."""
    from torch.autograd import DeviceType

    by_name: dict[str, list[float]] = {}
    host: dict[str, list[float]] = {}
    spans: list[tuple[float, float, str]] = []
    first, last = math.inf, 0.0
    for evt in prof.events():
        if evt.device_type == DeviceType.CUDA:  # kernels, memcpys, memsets; not record_function ranges
            if getattr(evt, "is_user_annotation", False) or "#" in evt.name:
                continue
            spans.append((evt.time_range.start, evt.time_range.end, evt.name))
            acc = by_name.setdefault(evt.name, [0.0, 0])
            acc[0] += evt.time_range.elapsed_us() / 1e6
            acc[1] += 1
            first, last = min(first, evt.time_range.start), max(last, evt.time_range.end)
        elif any(m in evt.name for m in HOST_API_MARKS):
            acc = host.setdefault(evt.name, [0.0, 0])
            acc[0] += evt.time_range.elapsed_us() / 1e6
            acc[1] += 1
    kernels = sorted(((k, t, c) for k, (t, c) in by_name.items()), key=lambda x: -x[1])
    total = sum(t for _, t, _ in kernels) or 1e-12
    kinds = {kind: sum(t for k, t, _ in kernels if kernel_kind(k) == kind) for kind in ("gemm", "attention", "other")}
    span = (last - first) / 1e6 if last > first else None
    return {
        "steps": steps,
        "gpu_kernel_seconds_per_step": round(total / steps, 4),
        "gpu_span_seconds_per_step": round(span / steps, 4) if span else None,
        "gpu_busy_fraction": round(total / span, 3) if span else None,
        "kernels_per_step": round(sum(c for _, _, c in kernels) / steps),
        **{f"fraction_{kind}": round(t / total, 3) for kind, t in kinds.items()},
        "top_kernels": [
            {"name": k[:160], "kind": kernel_kind(k), "seconds_per_step": round(t / steps, 5),
             "fraction": round(t / total, 4), "calls_per_step": round(c / steps, 1)}
            for k, t, c in kernels[:top]
        ],
        "host_calls_per_step": {n: {"calls": round(c / steps, 1), "host_seconds": round(t / steps, 4)}
                                for n, (t, c) in sorted(host.items(), key=lambda x: -x[1][0])},
        **idle_gaps(spans, steps),
    }


IDLE_GAP_MIN_US = 20.0  # GPU idle stretches shorter than this are launch jitter, not stalls


def idle_gaps(spans: Sequence[tuple[float, float, str]], steps: int, top: int = 12) -> dict[str, Any]:
    """Where the GPU waits: stretches (µs timestamps) with no kernel running, summed per step by length
    class, and the longest ones with the kernels before and after them (a stall's neighbours name it)."""
    ordered = sorted(spans)
    gaps: list[tuple[float, str, str]] = []
    end, before = -math.inf, ""
    for start, stop, name in ordered:
        if start - end >= IDLE_GAP_MIN_US and end > -math.inf:
            gaps.append((start - end, before, name))
        if stop > end:
            end, before = stop, name
    classes = {"20us-100us": (20, 100), "100us-1ms": (100, 1000), "1ms-10ms": (1000, 10000), ">10ms": (10000, math.inf)}
    return {
        "idle_seconds_per_step_by_gap": {k: round(sum(g for g, _, _ in gaps if lo <= g < hi) / 1e6 / steps, 4)
                                         for k, (lo, hi) in classes.items()},
        "idle_gaps_per_step": round(len(gaps) / steps, 1),
        "longest_idle_gaps": [{"ms": round(g / 1000, 3), "after": b[:100], "before": a[:100]}
                              for g, b, a in sorted(gaps, key=lambda x: -x[0])[:top]],
    }


# --- the training loop ---------------------------------------------------------------------------------


def train_fast(
    trainee: Any,
    train_dataset: Any,
    collate_fn: Callable[[list], dict],
    schedule: Schedule,
    out_dir: str | Path,
    *,
    on_checkpoint: Callable[[Path], None] | None = None,
    resume_from: str | Path | None = None,
    eval_dataset: Any = None,
    options: FastOptions | None = None,
) -> dict[str, Any]:
    """Train ``trainee`` as ``schedule`` (a plan's ``.schedule``) says (batch, accumulation, lr, schedule, steps, checkpoints) on its
    device; checkpoints go to ``out_dir/checkpoint-<step>`` (see the module docstring). Returns a summary:
    steps, losses, log history, speed (median step time after the warm-up), peak GPU memory, what ran.
    On return ``trainee`` holds the fp32 master weights as ordinary fp32 tensors."""
    import torch
    from tqdm import tqdm
    from transformers import get_scheduler

    opt = options or FastOptions()
    out_dir = Path(out_dir)
    device = torch.device(schedule.device)
    cuda = device.type == "cuda"
    batch = schedule.per_device_batch
    accum = schedule.grad_accum
    total_steps = int(opt.max_steps or schedule.max_steps)
    save_steps = schedule.save_steps
    keep = schedule.save_total_limit
    logging_steps = schedule.logging_steps
    eval_steps = schedule.eval_steps
    workers = schedule.dataloader_num_workers
    torch.manual_seed(opt.seed)
    if cuda and schedule.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    t_setup = time.perf_counter()
    if cuda and opt.expandable_segments:
        _expandable_segments()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    prep = prepare_model(trainee, device, opt.precision, schedule.weight_decay)
    hf = prep.hf
    if schedule.gradient_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf.config.use_cache = False
    if prep.master is not None:
        groups, layout = prep.master.param_groups(), prep.master.layout()
    else:
        named = _trainable(trainee, hf)
        decay = [p for _, p in named if p.ndim >= 2]
        no_decay = [p for _, p in named if p.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": schedule.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        layout = [{"names": [n for n, p in named if p.ndim >= 2]}, {"names": [n for n, p in named if p.ndim < 2]}]
    layout = [{**g, "precision": opt.precision} for g in layout]
    optimizer = torch.optim.AdamW(groups, lr=schedule.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                                  fused=True)
    scheduler = get_scheduler(schedule.scheduler, optimizer,
                              num_warmup_steps=schedule.warmup_steps,
                              num_training_steps=total_steps)

    step, log_history, loss_total, resumed = 0, [], 0.0, None
    if resume_from is not None:
        state = load_checkpoint(Path(resume_from), prep, optimizer, scheduler, layout, device)
        step, log_history = int(state["global_step"]), list(state.get("log_history", []))
        loss_total = float(state.get("fast_train", {}).get("loss_total", 0.0))
        resumed = Path(resume_from).name
        log.info("resumed from %s at step %d of %d", resume_from, step, total_steps)

    attention = opt.attention
    attention_probe: dict[str, Any] = {}
    if attention == "auto":
        probe = getattr(trainee, "attention_shape", None)  # the trainee names its dominant attention shape
        shape = probe(batch) if probe else None
        if cuda and shape:
            attention, attention_probe = pick_sdpa_backend(*shape, device=device)
            log.info("attention backend %s (fwd+bwd ms per call at %s: %s)", attention, shape, attention_probe)
        else:
            attention = "default"
    compiled = opt.compile == "on" or (opt.compile == "auto" and cuda and total_steps - step >= COMPILE_MIN_STEPS)
    n_compiled = compile_layers(hf, opt.compile_parts) if compiled else 0
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if opt.precision == "autocast" else contextlib.nullcontext()
    input_dtype = prep.dtype if opt.precision == "master" else None
    pad_id = getattr(hf.config, "pad_token_id", None)
    collate = PadDecoder(collate_fn, pad_id if pad_id is not None else 0)
    batches = StepBatches(len(train_dataset), batch, accum, opt.seed, step, total_steps)
    loader = make_loader(train_dataset, collate, batches, workers, cuda, opt.prefetch_factor)
    writer = _tensorboard(opt.tensorboard_dir)
    setup_seconds = time.perf_counter() - t_setup
    log.info("fast path: precision %s, %s, attention %s, %s compiled layers, batch %d x accum %d, %d steps, "
             "%d loader workers (set up in %.1f s)", opt.precision, device, attention, n_compiled, batch, accum,
             total_steps, workers, setup_seconds)

    clock = _StepClock(cuda)
    first_step = step
    data = iter(loader)
    loss_sum = torch.zeros((), device=device)  # summed on the GPU; read at logging steps only
    since_log, checkpoints, profile = 0, [], None
    profile_at = range(step + TIMING_WARMUP_STEPS, step + TIMING_WARMUP_STEPS + opt.profile_steps)
    prof_ctx: Any = None
    t_train = time.perf_counter()
    sizes = batches.group_sizes()
    bar = tqdm(total=total_steps, initial=step, desc="fast fine-tune", unit="step", disable=not opt.progress)
    positions = HostDecoderPositions(hf) if opt.host_positions else contextlib.nullcontext()
    host_positions = bool(opt.host_positions and positions.active)
    with sdpa_context(attention), positions:
        while step < total_steps:
            if step in profile_at and prof_ctx is None:
                prof_ctx = _start_profiler(cuda)
            n_micro = next(sizes)
            grad_norm = None
            for m in range(n_micro):
                inputs = _to_device(next(data), device, input_dtype)
                try:
                    loss = _forward_backward(trainee, inputs, amp, n_micro)
                except Exception as e:  # compilation failures come as many exception types
                    if not n_compiled or step != first_step or m:
                        raise
                    log.warning("torch.compile failed on the first step (%s: %s); training without it",
                                type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                    uncompile_layers(hf)
                    n_compiled = 0
                    _zero_grads(prep, optimizer)
                    loss = _forward_backward(trainee, inputs, amp, n_micro)
                loss_sum += loss / n_micro
                if prep.master is not None:
                    prep.master.accumulate(first=m == 0)
            if prep.master is not None:
                grad_norm = prep.master.clip_(opt.max_grad_norm)
                optimizer.step()
                prep.master.publish()
            else:
                params = [p for g in groups for p in g["params"]]
                grad_norm = torch.nn.utils.clip_grad_norm_(params, opt.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            since_log += 1
            # profiled steps and the one after (the host summarizes the profile meanwhile) are not timed
            clock.tick(exclude=step - 1 in profile_at or (len(profile_at) > 0 and step - 2 == profile_at[-1]))
            bar.update(1)
            if prof_ctx is not None and step - 1 == profile_at[-1]:
                prof_ctx.__exit__(None, None, None)
                if opt.profile_trace:
                    prof_ctx.export_chrome_trace(opt.profile_trace)
                if cuda:
                    try:
                        profile = summarize_profile(prof_ctx, len(profile_at))
                    except Exception as e:  # a profiler quirk must not cost the training run
                        profile = {"error": f"{type(e).__name__}: {e}"[:500]}
                prof_ctx = None
            if step % logging_steps == 0 or step == total_steps or step == 1:
                mean_loss = loss_sum.item() / since_log
                loss_total += loss_sum.item()
                entry = {"step": step, "epoch": round(step / batches.steps_per_epoch, 4), "loss": round(mean_loss, 5),
                         "learning_rate": scheduler.get_last_lr()[0], "grad_norm": round(float(grad_norm), 5)}
                log_history.append(entry)
                _write_scalars(writer, entry)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                loss_sum.zero_()
                since_log = 0
                clock.flush()
            saving = opt.save and (step % save_steps == 0 or step == total_steps)
            if eval_dataset is not None and eval_steps and (step % int(eval_steps) == 0 or step == total_steps):
                entry = {"step": step, "eval_loss": round(_eval_loss(trainee, eval_dataset, collate, batch, device,
                                                                     input_dtype, amp), 5)}
                log_history.append(entry)
                _write_scalars(writer, entry)
            if saving:
                state = {"global_step": step, "max_steps": total_steps, "epoch": step / batches.steps_per_epoch,
                         "log_history": log_history,
                         "fast_train": {"layout": layout, "loss_total": loss_total, "options": _jsonable(opt)}}
                path = save_checkpoint(out_dir / f"{ckpts.PREFIX}{step}", prep, optimizer, scheduler, state)
                checkpoints.append(path.name)
                _rotate(out_dir, keep)
                log.info("saved %s", path)
                if on_checkpoint is not None:
                    on_checkpoint(path)
    bar.close()
    if writer is not None:
        writer.close()
    train_seconds = time.perf_counter() - t_train
    steady = clock.steady()
    median = statistics.median(steady) if steady else None
    samples_per_step = batch * accum
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    peak_reserved = torch.cuda.max_memory_reserved(device) if cuda else None
    first = clock.seconds[:TIMING_WARMUP_STEPS]
    if n_compiled:
        uncompile_layers(hf)
    del optimizer, scheduler, groups, loader, data
    restore_model(prep, trainee)
    losses = [h["loss"] for h in log_history if "loss" in h]
    return {
        "global_step": step,
        "max_steps": total_steps,
        "resumed_from": resumed,
        "train_loss": round(loss_total / step, 5) if step else None,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "log_history": log_history,
        "checkpoints": checkpoints,
        "last_checkpoint": checkpoints[-1] if checkpoints else None,
        "precision": opt.precision,
        "attention": attention,
        "attention_probe_ms": attention_probe,
        "compiled_layers": n_compiled,
        "host_decoder_positions": host_positions,
        "samples_per_step": samples_per_step,
        "step_seconds": [round(s, 4) for s in clock.seconds],
        "first_steps_seconds": [round(s, 3) for s in first],
        "median_step_seconds": round(median, 4) if median else None,
        "samples_per_s": round(samples_per_step / median, 2) if median else None,
        "timed_steps": len(steady),
        "setup_seconds": round(setup_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "peak_gpu_bytes": peak,
        "peak_gpu_reserved_bytes": peak_reserved,
        "profile": profile,
    }


def _expandable_segments() -> None:
    from common.training.trainer import expandable_segments

    on, why = expandable_segments()
    log.info("CUDA allocator: expandable segments %s (%s)", "on" if on else "off", why)


def _forward_backward(trainee: Any, inputs: Mapping[str, Any], amp: Any, n_micro: int) -> Any:
    """One micro-batch: loss (detached) after its backward; the loss is divided by the micro-batches per step."""
    with amp:
        out = trainee(**inputs)
    loss = out["loss"] if isinstance(out, Mapping) else out.loss
    (loss / n_micro).backward()
    return loss.detach()


def _zero_grads(prep: _Prepared, optimizer: Any) -> None:
    if prep.master is not None:
        for g in prep.master.groups:
            for p in g.params:
                p.grad = None
    else:
        optimizer.zero_grad(set_to_none=True)


def _start_profiler(cuda: bool) -> Any:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities)
    prof.__enter__()
    return prof


def _eval_loss(trainee: Any, dataset: Any, collate: Callable, batch: int, device: Any, dtype: Any, amp: Any) -> float:
    import torch
    from torch.utils.data import DataLoader

    trainee.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for b in DataLoader(dataset, batch_size=batch, collate_fn=collate):
            with amp:
                out = trainee(**_to_device(b, device, dtype))
            loss = out["loss"] if isinstance(out, Mapping) else out.loss
            total += float(loss) * len(b["labels"])
            n += len(b["labels"])
    trainee.train()
    return total / max(1, n)


def _tensorboard(folder: str | None) -> Any:
    if not folder:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        return None
    return SummaryWriter(log_dir=folder)


def _write_scalars(writer: Any, entry: Mapping[str, Any]) -> None:
    if writer is None:
        return
    for k, v in entry.items():
        if k not in ("step", "epoch") and isinstance(v, int | float):
            writer.add_scalar(f"train/{k}" if not k.startswith("eval") else f"eval/{k[5:]}", v, entry["step"])


def _jsonable(opt: FastOptions) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opt).items()}
