"""Benchmark 基准: the ~10 B Kimi-Audio-shaped model on one GPU + its host RAM — the seed's DeepSpeed
recipe vs the planner's choice. Prints JSON and writes it with the planner's plan.json beside it.

    python bench/h100_10b_planner.py [--out bench/results/h100-10b-planner.json] [--host-cap-gb 100]
        [--time-limit-s 240] [--steps 5] [--warmup-steps 2] [--n-train 1000] [--only planner|seed]

Needs a CUDA GPU, DeepSpeed (its CPU Adam is JIT-built on first use, ~1 min) and peft. Environment:
PYTHONUNBUFFERED=1 shows progress. `--tiny` builds the same architecture at toy widths for a CPU smoke
test of the whole harness (set DS_ACCELERATOR=cpu there); its numbers mean nothing.

The model, random-initialized directly on the GPU (or partitioned by deepspeed.zero.Init), never as an
fp32 copy in host RAM: a Whisper-large-v3 encoder (30-s input: 3000 mel frames -> 1500 frames), frames
stacked 4x (12.5 Hz: 375 audio tokens) through a linear adaptor into a Qwen2-style LLM (hidden 3584,
34 layers, 28 heads / 4 KV heads, intermediate 18944, vocab 168448, untied head), whose 512-token
sequence carries the 375 audio positions (adaptor output added to their embeddings) and 137 text
tokens. Loss: next-token cross-entropy over all 512 positions (an upper bound on the logits' memory).

Each case runs in its own process under a watchdog: the summed RSS of its process tree is polled every
0.2 s and the tree is killed above --host-cap-gb; where the cgroup v2 memory controller can be used, the
child also runs in its own cgroup with memory.max slightly above the cap, so even an allocation burst
between polls ends in an OOM kill inside that cgroup and never takes the machine down. A wall-clock
limit ends it too. The child writes its progress (phase, steps, peak GPU memory) to a JSON file as it
goes, so a killed run still says how far it got.

- seed_config: what the seed report ran on one 95 GB GPU — DeepSpeed ZeRO-3, parameters AND optimizer
  offloaded to CPU (pinned), stage3_max_live_parameters 1e8, full fine-tune, bf16, micro-batch 1,
  gradient checkpointing. Expected: host OOM (fp32 master + gradients + Adam moments of 10 B parameters
  are ~160 GB of host RAM before buffers).
- planner: `plan(kimi_audio_profile(), n_train=..., resources=detect_resources())` on this machine, run
  as the plan says (expected: LoRA r=16 on the LLM, frozen base in bf16, plain single-GPU training), with
  a fixed random batch on the GPU (no data loading in the timing). step_s is one optimizer step
  (per_device_batch x grad_accum samples), the median over --steps after --warmup-steps.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.families.kimi_audio.profile import (  # noqa: E402
    KIMI_AUDIO_TOKENS,
    KIMI_HEADS,
    KIMI_HIDDEN,
    KIMI_INTERMEDIATE,
    KIMI_KV_HEADS,
    KIMI_LAYERS,
    KIMI_LLM_SEQ,
    KIMI_STACK_FRAMES,
    KIMI_VOCAB,
    WHISPER_LARGE_V3,
    kimi_audio_profile,
)
from common.families.whisper.conventions import ENCODER_FRAMES as WHISPER_ENCODER_FRAMES  # noqa: E402
from common.families.whisper.conventions import N_FRAMES as WHISPER_MEL_FRAMES  # noqa: E402
from common.training.memory import CUDA_CONTEXT_BYTES, GB  # noqa: E402

log = logging.getLogger("bench.h100_10b_planner")

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "h100-10b-planner.json"
POLL_S = 0.2  # watchdog polling interval; at <= ~10 GB/s of page faults a burst overshoots by ~2 GB
CGROUP_HEADROOM_BYTES = 5 * GB  # cgroup memory.max = cap + this: the hard backstop behind the watchdog
RSS_SAMPLE_EVERY_S = 2.0  # host RSS time series kept in the JSON
MIN_SEED_STEPS = 2  # the seed configuration "ran" if it completed this many optimizer steps
SEED_CANDIDATE = "full/zero3-offload-all+ckpt"  # the planner's row for the seed's recipe
LORA_DROPOUT = 0.05  # what the whisper family's trainee uses
TEXT_TOKENS = KIMI_LLM_SEQ - KIMI_AUDIO_TOKENS  # 512 - 375 = 137 prompt + transcript tokens
AUDIO_SECONDS = WHISPER_MEL_FRAMES // 100  # 10 ms hop  # 30

FULL_SHAPE = {
    "llm_layers": KIMI_LAYERS, "hidden": KIMI_HIDDEN, "heads": KIMI_HEADS, "kv_heads": KIMI_KV_HEADS,
    "intermediate": KIMI_INTERMEDIATE, "vocab": KIMI_VOCAB,
    "encoder_d_model": WHISPER_LARGE_V3["d_model"], "encoder_layers": WHISPER_LARGE_V3["layers"],
    "encoder_heads": WHISPER_LARGE_V3["heads"], "encoder_ffn": WHISPER_LARGE_V3["ffn"],
    "n_mels": WHISPER_LARGE_V3["n_mels"], "encoder_frames": WHISPER_ENCODER_FRAMES,
    "audio_tokens": KIMI_AUDIO_TOKENS, "llm_seq": KIMI_LLM_SEQ,
}
# the same architecture at toy widths: a CPU smoke test of the harness (--tiny)
TINY_SHAPE = {
    "llm_layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 256,
    "encoder_d_model": 32, "encoder_layers": 2, "encoder_heads": 2, "encoder_ffn": 64, "n_mels": 16,
    "encoder_frames": 40, "audio_tokens": 10, "llm_seq": 16,
}


# --- the model ------------------------------------------------------------------------------------------


def build_model(shape: dict[str, int]) -> Any:
    """Whisper encoder -> frames stacked KIMI_STACK_FRAMES x -> linear adaptor -> Qwen2 causal LM.

    Built in the current default device/dtype (and inside zero.Init, partitioned as it is built)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    class KimiShaped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            s = shape
            self.encoder = WhisperEncoder(WhisperConfig(
                d_model=s["encoder_d_model"], encoder_layers=s["encoder_layers"], decoder_layers=1,
                encoder_attention_heads=s["encoder_heads"], decoder_attention_heads=s["encoder_heads"],
                encoder_ffn_dim=s["encoder_ffn"], decoder_ffn_dim=s["encoder_ffn"], num_mel_bins=s["n_mels"],
                max_source_positions=s["encoder_frames"], attn_implementation="sdpa"))
            self.adaptor = torch.nn.Linear(s["encoder_d_model"] * KIMI_STACK_FRAMES, s["hidden"])
            self.llm = Qwen2ForCausalLM(Qwen2Config(
                hidden_size=s["hidden"], num_hidden_layers=s["llm_layers"], num_attention_heads=s["heads"],
                num_key_value_heads=s["kv_heads"], intermediate_size=s["intermediate"], vocab_size=s["vocab"],
                max_position_embeddings=4096, tie_word_embeddings=False, attn_implementation="sdpa"))

        def forward(self, input_features, input_ids, labels):
            frames = self.encoder(input_features).last_hidden_state
            audio = self.adaptor(frames.reshape(frames.shape[0], -1, frames.shape[-1] * KIMI_STACK_FRAMES))
            embeds = self.llm.get_input_embeddings()(input_ids)
            n = audio.shape[1]
            embeds = torch.cat([embeds[:, :n] + audio.to(embeds.dtype), embeds[:, n:]], dim=1)
            return self.llm(inputs_embeds=embeds, labels=labels).loss

    return KimiShaped()


@contextlib.contextmanager
def skip_hf_weight_init():
    """Under zero.Init each module is partitioned as soon as it is built, so Hugging Face's post_init
    weight init would see empty tensors (Whisper's sinusoid copy fails on them). The weights keep the
    random init torch gives every module as it is built."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.init_weights
    PreTrainedModel.init_weights = lambda self: None
    try:
        yield
    finally:
        PreTrainedModel.init_weights = original


def random_batch(shape: dict[str, int], batch: int, device: Any, dtype: Any) -> tuple[Any, Any]:
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    features = torch.randn(batch, shape["n_mels"], 2 * shape["encoder_frames"], generator=g, device=device,
                           dtype=dtype)
    ids = torch.randint(0, shape["vocab"], (batch, shape["llm_seq"]), generator=g, device=device)
    return features, ids


# --- child processes --------------------------------------------------------------------------------------


class Progress:
    """The child's progress file: rewritten atomically after every phase and step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.monotonic()
        self.data: dict[str, Any] = {"phases": [], "step_times_s": [], "losses": []}

    def phase(self, name: str) -> None:
        log.info("phase: %s", name)
        self.data["phase"] = name
        self.data["phases"].append([name, round(time.monotonic() - self.start, 1)])
        self.write()

    def write(self, **extra: Any) -> None:
        import torch

        self.data.update(extra)
        if torch.cuda.is_available():
            self.data["peak_gpu_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
            self.data["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GB, 2)
            free, total = torch.cuda.mem_get_info()
            self.data["gpu_used_now_gb"] = round((total - free) / GB, 2)  # incl. CUDA context, other processes
        self.data["self_max_rss_gb"] = round(_self_max_rss() / GB, 2)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name, dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def _self_max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _timed_steps(progress: Progress, step, total: int, warmup: int) -> None:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for i in range(total):
        progress.phase(f"step {i + 1}/{total}" + (" (warm-up)" if i < warmup else ""))
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        seconds = time.perf_counter() - t0
        progress.data["losses"].append(round(float(loss), 4))
        if i >= warmup:
            progress.data["step_times_s"].append(round(seconds, 4))
        progress.write(steps_completed=i + 1, warmup_steps=min(i + 1, warmup))


def child_plain(a: argparse.Namespace, progress: Progress) -> None:
    """The planner's choice when it is plain PyTorch (no DeepSpeed): LoRA, full or frozen-encoder."""
    import torch

    choice = json.loads(a.choice)
    shape = TINY_SHAPE if a.tiny else FULL_SHAPE
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mode = choice["mode"]
    # frozen weights in 16 bits where the plan says so; trained weights stay fp32 (the master copy)
    base_dtype = torch.bfloat16 if mode == "lora" and choice["frozen_dtype"] == "bfloat16" else torch.float32
    progress.phase(f"build model on {device} in {base_dtype}")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(base_dtype)
    try:
        with device:
            model = build_model(shape)
    finally:
        torch.set_default_dtype(default)
    progress.write(model_params=sum(p.numel() for p in model.parameters()))
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = choice["lora"]
        if lora["parts"] != ["decoder"]:
            raise SystemExit(f"this bench applies LoRA to the LLM (decoder) only; the plan asks for parts {lora['parts']}")
        model.requires_grad_(False)
        model.llm = get_peft_model(model.llm, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                                         target_modules=list(lora["targets"]),
                                                         lora_dropout=LORA_DROPOUT))
    elif mode == "freeze-encoder":
        model.encoder.requires_grad_(False)
    if choice["gradient_checkpointing"]:
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        model.llm.gradient_checkpointing_enable(**kwargs)
        if mode == "full":
            model.encoder.gradient_checkpointing_enable(**kwargs)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    progress.write(trainable_params=sum(p.numel() for p in trainable),
                   trainable_dtypes=sorted({str(p.dtype) for p in trainable}))
    optimizer = torch.optim.AdamW(trainable, lr=choice["lr"], weight_decay=choice["weight_decay"],
                                  fused=device.type == "cuda")
    batch, accum = choice["per_device_batch"], choice["grad_accum"]
    features, ids = random_batch(shape, batch, device, base_dtype)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=choice["precision"] == "bf16")

    def step() -> float:
        total = 0.0
        for _ in range(accum):
            with autocast:
                loss = model(features, ids, ids) / accum
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # steady state of training; the weights are in it
    _timed_steps(progress, step, a.warmup_steps + a.steps, a.warmup_steps)
    progress.phase("done")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_deepspeed(a: argparse.Namespace, progress: Progress) -> None:
    """A DeepSpeed ZeRO run (the seed's recipe, or a planner choice that uses DeepSpeed), full or
    frozen-encoder fine-tune, built partitioned by zero.Init."""
    import torch

    choice = json.loads(a.choice)
    if choice["mode"] not in ("full", "freeze-encoder"):
        raise SystemExit(f"mode {choice['mode']!r} under DeepSpeed is not covered by this bench (full, freeze-encoder)")
    config = choice["deepspeed"]
    shape = TINY_SHAPE if a.tiny else FULL_SHAPE
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    progress.phase("import deepspeed + init_distributed")
    import deepspeed

    deepspeed.init_distributed()
    zero = config["zero_optimization"]
    offload_param = zero.get("offload_param", {}).get("device") == "cpu"
    progress.phase("build model under zero.Init" + (" (parameters to pinned CPU memory)" if offload_param else ""))
    torch.manual_seed(0)
    with skip_hf_weight_init(), deepspeed.zero.Init(config_dict_or_path=config,
                                                    remote_device="cpu" if offload_param else None,
                                                    pin_memory=True, dtype=torch.bfloat16):
        model = build_model(shape)
    progress.write(model_params=sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()))
    if choice["mode"] == "freeze-encoder":
        model.encoder.requires_grad_(False)
    if choice["gradient_checkpointing"]:
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        model.llm.gradient_checkpointing_enable(**kwargs)
        if choice["mode"] == "full":
            model.encoder.gradient_checkpointing_enable(**kwargs)
    progress.phase("deepspeed.initialize (fp32 master weights, gradients and Adam state on "
                   + ("CPU" if zero.get("offload_optimizer", {}).get("device") == "cpu" else "GPU") + ")")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=config)
    engine.train()
    device = engine.device
    features, ids = random_batch(shape, choice["per_device_batch"], device, torch.bfloat16)
    accum = choice["grad_accum"]

    def step() -> float:
        total = 0.0
        for _ in range(accum):
            loss = engine(features, ids, ids)
            engine.backward(loss)
            engine.step()  # DeepSpeed counts micro-steps; it steps the optimizer at the accumulation boundary
            total += float(loss.detach()) / accum
        return total

    _timed_steps(progress, step, a.warmup_steps + a.steps, a.warmup_steps)
    progress.phase("done")


def fill_deepspeed_auto(config: dict[str, Any], *, batch: int, accum: int, lr: float, weight_decay: float) -> dict:
    """The "auto" fields Hugging Face's Trainer would fill (this bench drives DeepSpeed directly)."""
    config = json.loads(json.dumps(config))
    config.update(train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=accum,
                  train_batch_size=batch * accum, gradient_clipping=1.0)
    params = config.get("optimizer", {}).get("params", {})
    for key, value in {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": weight_decay}.items():
        if params.get(key) == "auto":
            params[key] = value
    return config


def seed_deepspeed_config(hidden: int) -> dict[str, Any]:
    """The seed report's ds_config_zero3.json after its fixes: ZeRO-3, optimizer and parameters
    offloaded to CPU, stage3_max_live_parameters 1e9 -> 1e8; Hugging Face's "auto" values for this
    hidden size; bf16; micro-batch 1. (Its WarmupLR scheduler is left out: no effect on memory.)"""
    return {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-6, "betas": [0.9, 0.999], "eps": 1e-8,
                                                   "weight_decay": 0.01}},
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "offload_param": {"device": "cpu", "pin_memory": True},
            "overlap_comm": True,
            "contiguous_gradients": True,
            "sub_group_size": int(1e9),
            "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden,
            "stage3_max_live_parameters": int(1e8),
            "stage3_max_reuse_distance": int(1e9),
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "wall_clock_breakdown": False,
    }


# --- the watchdog ------------------------------------------------------------------------------------------


def _make_cgroup(limit_bytes: int) -> tuple[Path | None, str]:
    """A cgroup v2 child group with memory.max = limit (swap off); (None, why) where it cannot be made."""
    root = Path("/sys/fs/cgroup")
    if not (root / "cgroup.controllers").is_file():
        return None, "no cgroup v2 hierarchy at /sys/fs/cgroup"
    try:
        if "memory" not in (root / "cgroup.controllers").read_text().split():
            return None, "cgroup v2 has no memory controller"
        if "memory" not in (root / "cgroup.subtree_control").read_text().split():
            (root / "cgroup.subtree_control").write_text("+memory")
        group = root / f"asrft-bench-{os.getpid()}-{time.monotonic_ns()}"
        group.mkdir()
        (group / "memory.max").write_text(str(limit_bytes))
        if (group / "memory.swap.max").exists():
            (group / "memory.swap.max").write_text("0")
        return group, f"cgroup {group.name}: memory.max {limit_bytes / GB:.0f} GB"
    except OSError as e:
        return None, f"cgroup v2 not usable here: {e}"


def _cgroup_oom_kills(group: Path | None) -> int:
    if group is None:
        return 0
    try:
        for line in (group / "memory.events").read_text().splitlines():
            key, value = line.split()
            if key == "oom_kill":
                return int(value)
    except OSError:
        pass
    return 0


def _tree_rss(proc: Any) -> int:
    import psutil

    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


def supervise(cmd: list[str], *, cap_bytes: int, time_limit_s: float, log_path: Path) -> dict[str, Any]:
    """Run `cmd` in its own session (and cgroup where possible); kill the tree above `cap_bytes` of
    summed RSS or after `time_limit_s`. Returns how it ended and the peak host RSS."""
    import psutil

    group, cgroup_note = _make_cgroup(cap_bytes + CGROUP_HEADROOM_BYTES)

    def enter_cgroup() -> None:  # runs in the child before exec: the whole tree inherits the group
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    killed_by: str | None = None
    peak = 0
    series: list[list[float]] = []
    start = time.monotonic()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=enter_cgroup)
        ps = psutil.Process(proc.pid)
        next_sample = 0.0
        while proc.poll() is None:
            rss = _tree_rss(ps)
            peak = max(peak, rss)
            elapsed = time.monotonic() - start
            if elapsed >= next_sample:
                series.append([round(elapsed, 1), round(rss / GB, 2)])
                next_sample = elapsed + RSS_SAMPLE_EVERY_S
            if rss > cap_bytes:
                killed_by = f"watchdog: host RSS {rss / GB:.1f} GB > cap {cap_bytes / GB:.0f} GB"
            elif elapsed > time_limit_s:
                killed_by = f"watchdog: time limit {time_limit_s:.0f} s"
            if killed_by:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            threading.Event().wait(POLL_S)  # the polling interval
    elapsed = time.monotonic() - start
    oom_kills = _cgroup_oom_kills(group)
    if killed_by is None and oom_kills:
        killed_by = f"kernel OOM killer inside the cgroup (memory.max {(cap_bytes + CGROUP_HEADROOM_BYTES) / GB:.0f} GB)"
    elif killed_by is None and proc.returncode == -signal.SIGKILL:
        killed_by = "SIGKILL from outside (kernel OOM killer?)"
    if group is not None:
        with contextlib.suppress(OSError):
            group.rmdir()
    return {
        "returncode": proc.returncode,
        "killed_by": killed_by,
        "host_oom": bool(killed_by and ("host RSS" in killed_by or "OOM" in killed_by)),
        "timed_out": bool(killed_by and "time limit" in killed_by),
        "elapsed_s": round(elapsed, 1),
        "peak_host_rss_gb": round(peak / GB, 2),
        "host_rss_series_gb": series,
        "memory_guard": {"watchdog_cap_gb": round(cap_bytes / GB, 1), "poll_s": POLL_S, "cgroup": cgroup_note},
    }


def run_case(name: str, choice: dict[str, Any], a: argparse.Namespace, out: Path) -> dict[str, Any]:
    progress_path = out.with_name(f"{out.stem}.{name}.progress.json")
    progress_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--progress", str(progress_path),
           "--choice", json.dumps(choice), "--steps", str(a.steps), "--warmup-steps", str(a.warmup_steps)]
    if a.tiny:
        cmd.append("--tiny")
    log.info("running %s (cap %.0f GB host RSS, %d s)", name, a.host_cap_gb, a.time_limit_s)
    ended = supervise(cmd, cap_bytes=int(a.host_cap_gb * GB), time_limit_s=a.time_limit_s,
                      log_path=out.with_name(f"{out.stem}.{name}.log"))
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {}
    progress_path.unlink(missing_ok=True)
    times = progress.get("step_times_s", [])
    step_s = statistics.median(times) if times else None
    samples = choice["per_device_batch"] * choice["grad_accum"]
    shape = TINY_SHAPE if a.tiny else FULL_SHAPE
    return {
        **ended,
        "steps_completed": progress.get("steps_completed", 0),
        "last_phase": progress.get("phase"),
        "phases_s": progress.get("phases", []),
        "model_params": progress.get("model_params"),
        "trainable_params": progress.get("trainable_params"),
        "step_s": round(step_s, 4) if step_s else None,
        "step_times_s": times,
        "samples_per_step": samples,
        "samples_per_s": round(samples / step_s, 3) if step_s else None,
        "llm_tokens_per_s": round(samples * shape["llm_seq"] / step_s, 1) if step_s else None,
        "audio_seconds_per_s": round(samples * AUDIO_SECONDS / step_s, 1) if step_s else None,
        "losses": progress.get("losses", []),
        "peak_gpu_allocated_gb": progress.get("peak_gpu_allocated_gb"),
        "peak_gpu_reserved_gb": progress.get("peak_gpu_reserved_gb"),
        "gpu_used_at_last_report_gb": progress.get("gpu_used_now_gb"),
        "child_max_rss_gb": progress.get("self_max_rss_gb"),
        "error": progress.get("error"),
    }


# --- the report ----------------------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    import torch

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda}
    for package in ("transformers", "deepspeed", "peft", "accelerate"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = None
    try:
        out["nvidia_driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True,
            timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["nvidia_driver"] = None
    return out


def _estimate_summary(candidate: Any) -> dict[str, Any]:
    """A planner candidate row's estimate in GB (the planner's own numbers, term by term)."""
    return {
        "candidate": candidate.id,
        "per_device_batch": candidate.per_device_batch,
        "gpu_gb": round(candidate.gpu_bytes / GB, 1),
        "gpu_gb_without_cuda_context": round((candidate.gpu_bytes - CUDA_CONTEXT_BYTES) / GB, 1),
        "host_gb": round(candidate.host_bytes / GB, 1),
        "fits_gpu": candidate.fits_gpu,
        "fits_host": candidate.fits_host,
        "note": candidate.note,
        "gpu_breakdown_gb": {k: round(v / GB, 2) for k, v in candidate.gpu_breakdown.items()},
        "host_breakdown_gb": {k: round(v / GB, 2) for k, v in candidate.host_breakdown.items()},
    }


def parent(a: argparse.Namespace) -> int:
    import torch

    from common.training.planner import detect_resources, plan

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan_path = out.with_name(f"{out.stem}.plan.json")
    if torch.cuda.is_available():
        resources = detect_resources()
    elif a.tiny:  # CPU smoke test: plan as if on the H100 node the benchmark is for
        resources = detect_resources(gpus=1, gpu_mem_bytes=80 * GB, gpu_name="smoke-test", bf16_supported=True,
                                     host_ram_bytes=125 * GB)
    else:
        print("this benchmark needs a CUDA GPU (or --tiny for a CPU smoke test)", file=sys.stderr)
        return 2
    profile = kimi_audio_profile()
    p = plan(profile, n_train=a.n_train, n_eval=0, resources=resources)
    p.write(plan_path)
    v = p.values
    planner_choice = {
        "mode": v["mode"], "lora": v["lora"], "strategy": v["strategy"],
        "gradient_checkpointing": v["gradient_checkpointing"], "per_device_batch": v["per_device_batch"],
        "grad_accum": v["grad_accum"], "precision": v["precision"], "frozen_dtype": v["frozen_dtype"],
        "load_dtype": v["load_dtype"], "lr": v["lr"], "weight_decay": v["weight_decay"],
        "deepspeed": fill_deepspeed_auto(v["deepspeed"], batch=v["per_device_batch"], accum=v["grad_accum"],
                                         lr=v["lr"], weight_decay=v["weight_decay"]) if v["deepspeed"] else None,
    }
    seed_choice = {
        "mode": "full", "lora": None, "strategy": "zero3-offload-all", "gradient_checkpointing": True,
        "per_device_batch": 1, "grad_accum": 1, "precision": "bf16", "frozen_dtype": "bfloat16",
        "load_dtype": "bfloat16", "lr": 3e-6, "weight_decay": 0.01, "deepspeed": seed_deepspeed_config(KIMI_HIDDEN),
    }
    # one case at a time (--only) updates its own section of an existing result, keeping the other
    result: dict[str, Any] = json.loads(out.read_text()) if a.only and out.exists() else {}
    result.update({
        "benchmark": "h100-10b-planner",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/h100_10b_planner.py", *sys.argv[1:]]),
        "tiny_smoke_test": a.tiny,
        "gpu": resources.gpu_name,
        "gpu_mem_gb": round(resources.gpu_mem_bytes / GB, 1),
        "host_ram_gb": round(resources.host_ram_bytes / GB, 1),
        "host_ram_source": resources.source.get("host_ram"),
        "cpu_count": resources.cpu_count,
        "versions": versions(),
        "model": {"shape": TINY_SHAPE if a.tiny else FULL_SHAPE, "profile_params": profile.total_params},
        "sequence": {
            "audio_seconds": AUDIO_SECONDS, "mel_frames": WHISPER_MEL_FRAMES, "encoder_frames": WHISPER_ENCODER_FRAMES,
            "audio_tokens": KIMI_AUDIO_TOKENS, "text_tokens": TEXT_TOKENS, "llm_tokens": KIMI_LLM_SEQ,
            "note": "per sample: 30 s of audio -> 1500 encoder frames -> 375 audio tokens at 12.5 Hz, "
                    "plus 137 text tokens = 512 LLM tokens; loss over all 512",
        },
        "plan_file": plan_path.name,
    })
    if a.only in (None, "planner"):
        measured = run_case("planner", planner_choice, a, out)
        est = _estimate_summary(p.chosen)
        ratio = None
        if measured["peak_gpu_allocated_gb"]:
            ratio = round(est["gpu_gb_without_cuda_context"] / measured["peak_gpu_allocated_gb"], 3)
        done = measured["steps_completed"] >= a.warmup_steps + a.steps and measured["returncode"] == 0
        result["planner"] = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": result["command"],  # the top-level one is the last run's (--only keeps the other section)
            "choice": {k: planner_choice[k] for k in planner_choice if k != "deepspeed"},
            "deepspeed": planner_choice["deepspeed"],
            "reason": p.decision("mode").reason,
            "ran": done,
            **measured,
            "planner_estimate": est,
            "estimate_vs_measured": {
                "gpu_estimate_gb (excl. CUDA context)": est["gpu_gb_without_cuda_context"],
                "gpu_measured_gb (max_memory_allocated)": measured["peak_gpu_allocated_gb"],
                "gpu_ratio": ratio,
                "host_estimate_gb": est["host_gb"],
                "host_measured_peak_rss_gb": measured["peak_host_rss_gb"],
                "host_note": "the estimate assumes the checkpoint is loaded into host RAM in 16 bits "
                             "(from_pretrained); this bench builds the weights on the GPU, so it needs less",
            },
        }
    if a.only in (None, "seed"):
        measured = run_case("seed", seed_choice, a, out)
        result["seed_config"] = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": result["command"],
            "description": "seed report's recipe: DeepSpeed ZeRO-3, offload_param + offload_optimizer to CPU "
                           "(pinned), stage3_max_live_parameters 1e8, full fine-tune, bf16, micro-batch 1, "
                           "gradient checkpointing",
            "deepspeed": seed_choice["deepspeed"],
            "ran": measured["steps_completed"] >= MIN_SEED_STEPS,
            "ran_means": f"completed >= {MIN_SEED_STEPS} optimizer steps within the limits",
            **measured,
            "planner_estimate": next((_estimate_summary(c) for c in p.candidates if c.id == SEED_CANDIDATE), None),
        }
    text = json.dumps(result, indent=1, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=out.name, dir=out.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="result JSON; the plan goes beside it (.plan.json)")
    parser.add_argument("--host-cap-gb", type=float, default=100.0, help="kill a case above this host RSS (GB)")
    parser.add_argument("--time-limit-s", type=float, default=240.0, help="kill a case after this many seconds")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--n-train", type=int, default=1000, help="training samples the plan is made for")
    parser.add_argument("--only", choices=("planner", "seed"),
                        help="run one case; an existing --out keeps the other case's section")
    parser.add_argument("--tiny", action="store_true", help="toy widths: a CPU smoke test of the harness")
    parser.add_argument("--child", choices=("planner", "seed"), help=argparse.SUPPRESS)
    parser.add_argument("--progress", help=argparse.SUPPRESS)
    parser.add_argument("--choice", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.child:
        progress = Progress(Path(a.progress))
        progress.phase("start")
        choice = json.loads(a.choice)
        try:
            (child_deepspeed if choice["deepspeed"] else child_plain)(a, progress)
        except BaseException as e:  # say why in the progress file, then fail as usual
            progress.write(error=f"{type(e).__name__}: {e}"[:2000])
            raise
        return 0
    return parent(a)


if __name__ == "__main__":
    sys.exit(main())
