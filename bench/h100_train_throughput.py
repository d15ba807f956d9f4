"""Whisper large-v3 training throughput on one GPU: the Hugging Face fine-tuning recipe vs the asr-ft fast path.

    python bench/h100_train_throughput.py [--steps 8] [--results-dir bench/results]

Prints one JSON object and writes it to ``<results-dir>/h100-train-throughput.json``, with the plan the
planner made for this model on this GPU beside it (``h100-train-throughput.plan.json``). One process, one GPU,
random-initialized weights of the real shapes (WhisperConfig d_model 1280, 32 + 32 layers, 20 heads,
128 mel bins, vocab 51866), 30-s inputs (log-mel [128, 3000]) and 40 text tokens per clip (a typical
Chinese sentence; the decoder reads 44 positions with the prompt).

(a) ``hf_recipe``: the Hugging Face blog "Fine-Tune Whisper For Multilingual ASR with 🤗 Transformers" as
    published: Seq2SeqTrainer, fp16 mixed precision, gradient checkpointing, batch 16, learning rate 1e-5,
    warm-up 500, the Trainer's default optimizer, its DataCollatorSpeechSeq2SeqWithPadding (re-written here
    without a tokenizer: features stacked, labels padded with -100, the leading <|startoftranscript|>
    dropped), dataloader defaults. Its evaluation and saving every 1000 steps never come up in the timed
    window and are switched off (they would need an evaluation set).
(b) ``asrft``: ``common.training.fast_train.train_fast`` with the plan ``common.training.planner.plan`` makes for this model on
    this GPU (as the finetune stage calls it: mode auto, 2000 training clips, fp32 load dtype), through the
    stage's own trainee (``common.families.whisper.trainee.make_trainee``) and collator (``WhisperCollator``), default options.
    Further fast-path variants are timed for the record: eager (what ``compile="auto"`` runs for plans shorter
    than ``COMPILE_MIN_STEPS``), ``master-compiled-sync`` (``host_positions=False``: transformers' decoder then
    syncs host and GPU once per micro-batch), encoder-only compilation, autocast, accumulation 1.

Speed: median of the timed optimizer steps after ``TIMING_WARMUP_STEPS`` warm-up steps (compilation and
allocator growth excluded; data loading included), as samples per second. MFU: model FLOPs per sample
(``common.training.fast_train.train_flops_per_sample``: 3 x the forward FLOPs derived from the shapes) x samples/s over
the dense bf16 peak of an H100 SXM (989 TFLOP/s, NVIDIA's datasheet, no sparsity); the bf16 rate a large
GEMM reaches on this GPU is measured and reported too.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench.h100_train_throughput")

RESULTS_NAME = "h100-train-throughput.json"
PLAN_NAME = "h100-train-throughput.plan.json"
LARGE_V3 = dict(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=128,
                vocab_size=51866, max_source_positions=1500, max_target_positions=448)
# large-v3's special tokens (its tokenizer: 51866 entries)
EOT, SOT, ZH, TRANSCRIBE, NO_TIMESTAMPS = 50257, 50258, 50260, 50360, 50364
TOKENS = dict(pad_token_id=EOT, bos_token_id=EOT, eos_token_id=EOT, decoder_start_token_id=SOT)
PROMPT = [SOT, ZH, TRANSCRIBE, NO_TIMESTAMPS]
TEXT_TOKENS = 40  # a ~25-character Chinese sentence
DECODER_LEN = len(PROMPT) + TEXT_TOKENS  # 44 positions: prompt + text in, text + <|endoftext|> out (3 masked)
MEL_FRAMES = 3000  # 30 s at 10 ms
UNIQUE_CLIPS = 64  # distinct random log-mels, cycled
N_TRAIN = 2000  # the data-set size the plan is made for ('large' regime: 3 epochs, effective batch 32)
H100_SXM_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, dense (the 1979 figure assumes 2:4 sparsity)
RECIPE_BATCH = 16


# --- data ----------------------------------------------------------------------------------------------


class RandomClips:
    """``n`` items cycling over UNIQUE_CLIPS random log-mels (float16 in memory, as extract caches them;
    returned as float32 like FeatureSource) with random 40-token texts."""

    def __init__(self, n: int, recipe_labels: bool):
        import torch

        gen = torch.Generator().manual_seed(0)
        self.n = n
        self.features = torch.randn(UNIQUE_CLIPS, LARGE_V3["num_mel_bins"], MEL_FRAMES, generator=gen).to(torch.float16)
        self.texts = torch.randint(0, EOT, (UNIQUE_CLIPS, TEXT_TOKENS), generator=gen).tolist()
        self.recipe_labels = recipe_labels

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        from common.families.whisper.data import make_target

        j = i % UNIQUE_CLIPS
        mel = self.features[j].float().numpy()
        if self.recipe_labels:  # the recipe's tokenizer output: prompt + text + <|endoftext|>
            return {"input_features": mel, "labels": PROMPT + self.texts[j] + [EOT]}
        dec, lab = make_target(PROMPT, self.texts[j], EOT)
        return {"input_features": mel, "decoder_input_ids": dec, "labels": lab}


class RecipeCollator:
    """DataCollatorSpeechSeq2SeqWithPadding of the Hugging Face blog, without the processor object."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import numpy as np
        import torch

        feats = torch.as_tensor(np.stack([it["input_features"] for it in items]))
        width = max(len(it["labels"]) for it in items)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for row, it in enumerate(items):
            labels[row, : len(it["labels"])] = torch.as_tensor(it["labels"])
        if bool((labels[:, 0] == SOT).all()):
            labels = labels[:, 1:]  # the model prepends decoder_start_token_id itself
        return {"input_features": feats, "labels": labels}


# --- helpers -------------------------------------------------------------------------------------------


def whisper_config() -> Any:
    from transformers import WhisperConfig

    return WhisperConfig(**LARGE_V3, **TOKENS)


def new_model(seed: int = 0) -> Any:
    import torch
    from transformers import WhisperForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = WhisperForConditionalGeneration(whisper_config())  # fp32, random, built on the GPU
    model.config.forced_decoder_ids = None
    model.config.suppress_tokens = []
    return model


def free_gpu() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def gemm_tflops() -> float:
    """bf16 rate of an 8192^3 matrix product on random data (median of 20 timed after 5 warm-ups)."""
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end) / 1000)
    del a, b
    return round(2 * n**3 / statistics.median(times) / 1e12, 1)


def environment() -> dict[str, Any]:
    import torch
    import transformers

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gb": round(props.total_memory / 1e9, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def make_the_plan(results_dir: Path) -> Any:
    from common.families.whisper.profile import profile_from_hf_config
    from common.training.planner import detect_resources, plan

    profile = profile_from_hf_config(whisper_config(), decoder_seq_len=DECODER_LEN)
    # the finetune stage's own overrides (jobs/finetune planner_overrides): weights load in fp32 (masters)
    the_plan = plan(profile, n_train=N_TRAIN, mode="auto", resources=detect_resources(),
                    overrides={"load_dtype": "float32", "frozen_dtype": "float32"})
    the_plan.write(results_dir / PLAN_NAME)
    return the_plan


def mfu(samples_per_s: float | None, flops_per_sample: int) -> float | None:
    if not samples_per_s:
        return None
    return round(samples_per_s * flops_per_sample / (H100_SXM_BF16_DENSE_TFLOPS * 1e12), 4)


# --- (a) the Hugging Face recipe -----------------------------------------------------------------------


def run_recipe(warmup: int, steps: int) -> dict[str, Any]:
    import inspect

    import torch
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from common.training.planner import adapt_kwargs

    free_gpu()
    model = new_model()
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    total = warmup + steps + 1
    with tempfile.TemporaryDirectory() as tmp:
        wanted = dict(
            output_dir=tmp, per_device_train_batch_size=RECIPE_BATCH, gradient_accumulation_steps=1,
            learning_rate=1e-5, warmup_steps=500, max_steps=total, gradient_checkpointing=True, fp16=True,
            per_device_eval_batch_size=8, predict_with_generate=True, generation_max_length=225,
            logging_steps=25, report_to=[], eval_strategy="no", save_strategy="no", disable_tqdm=True,
        )
        args = Seq2SeqTrainingArguments(**adapt_kwargs(wanted, inspect.signature(Seq2SeqTrainingArguments).parameters))
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=RandomClips(RECIPE_BATCH * total, True),
                                 data_collator=RecipeCollator(), callbacks=[Clock()])
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        optim = str(getattr(args.optim, "value", args.optim))
    intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    timed = intervals[warmup:]
    median = statistics.median(timed)
    out = {
        "samples_per_s": round(RECIPE_BATCH / median, 2),
        "median_step_seconds": round(median, 4),
        "timed_steps": len(timed),
        "step_seconds": [round(s, 4) for s in intervals],
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1),
        "peak_gpu_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 1),
        "wall_seconds": round(wall, 1),
        "settings": {
            "trainer": "Seq2SeqTrainer", "fp16": True, "gradient_checkpointing": True,
            "per_device_train_batch_size": RECIPE_BATCH, "gradient_accumulation_steps": 1, "learning_rate": 1e-5,
            "warmup_steps": 500, "optim": optim, "attn_implementation": model.config._attn_implementation,
            "dataloader_num_workers": args.dataloader_num_workers, "weights": "fp32 (autocast fp16 + GradScaler)",
        },
    }
    del trainer, model
    free_gpu()
    return out


# --- (b) the asr-ft fast path ----------------------------------------------------------------------------


VARIANTS = {
    # name: (FastOptions fields, plan overrides, reset compile caches first)
    "master-compiled": ({"precision": "master", "compile": "on"}, {}, True),
    "master-compiled-accum1": ({"precision": "master", "compile": "on"}, {"grad_accum": 1}, False),
    "master-compiled-encoder": ({"precision": "master", "compile": "on", "compile_parts": "encoder"}, {}, False),
    "master-compiled-sync": ({"precision": "master", "compile": "on", "host_positions": False}, {}, False),
    "master-eager": ({"precision": "master", "compile": "off"}, {}, True),
    "autocast-eager": ({"precision": "autocast", "compile": "off"}, {}, True),
}


def run_fast(the_plan: Any, name: str, warmup: int, steps: int, profile_steps: int,
             trace: str | None = None) -> dict[str, Any]:
    import torch

    from common.families.whisper.data import WhisperCollator
    from common.families.whisper.trainee import ModeSpec, make_trainee
    from common.training.fast_train import TIMING_WARMUP_STEPS, FastOptions, train_fast

    fields, plan_overrides, reset = VARIANTS[name]
    assert warmup == TIMING_WARMUP_STEPS
    if reset:
        torch._dynamo.reset()
    free_gpu()
    run_plan = the_plan
    if plan_overrides:
        run_plan = the_plan.model_copy(deep=True)
        for d in run_plan.decisions:
            if d.name in plan_overrides:
                d.value = plan_overrides[d.name]
    model = new_model()
    trainee = make_trainee(model, ModeSpec(mode=run_plan.mode))
    options = FastOptions(**fields, max_steps=warmup + steps + profile_steps, save=False,
                          profile_steps=profile_steps, profile_trace=trace if profile_steps else None,
                          progress=False)
    t0 = time.perf_counter()
    result = train_fast(trainee, RandomClips(N_TRAIN, False), WhisperCollator(EOT), run_plan.schedule, "unused",
                        options=options)
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    for key in ("peak_gpu", "peak_gpu_reserved"):
        value = result.pop(f"{key}_bytes")
        result[f"{key}_gb"] = round(value / 1e9, 1) if value is not None else None
    result["options"] = {**fields, "per_device_batch": run_plan.per_device_batch, "grad_accum": run_plan.grad_accum,
                         "gradient_checkpointing": run_plan.gradient_checkpointing, "lr": run_plan.value("lr"),
                         "dataloader_num_workers": run_plan.value("dataloader_num_workers")}
    for k in ("log_history", "checkpoints", "last_checkpoint", "resumed_from", "max_steps"):
        result.pop(k, None)
    del trainee, model
    free_gpu()
    return result


def compile_economics(compiled: dict[str, Any], eager: dict[str, Any], plan_steps: int) -> dict[str, Any]:
    """Compile cost = the compiled run's warm-up steps minus the eager run's; gain = steady step-time saved."""
    overhead = sum(compiled["first_steps_seconds"]) - sum(eager["first_steps_seconds"])
    gain = eager["median_step_seconds"] - compiled["median_step_seconds"]
    return {
        "compile_overhead_seconds": round(overhead, 1),
        "steady_gain_seconds_per_step": round(gain, 4),
        "steady_speedup": round(eager["median_step_seconds"] / compiled["median_step_seconds"], 3),
        "break_even_steps": round(overhead / gain, 1) if gain > 0 else None,
        "plan_max_steps": plan_steps,
        "net_seconds_saved_over_plan_run": round(plan_steps * gain - overhead, 1),
        "pays_for_plan_run": plan_steps * gain > overhead,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per configuration")
    ap.add_argument("--profile-steps", type=int, default=2, help="steps profiled (torch.profiler) in the main variant")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="fast-path variants; the first is the asrft figure")
    ap.add_argument("--skip-recipe", action="store_true")
    ap.add_argument("--trace", help="write the main variant's profiled steps as a Chrome trace here (.json.gz)")
    ap.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from common.families.whisper.profile import train_flops_per_sample
    from common.training.fast_train import TIMING_WARMUP_STEPS

    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    args.results_dir.mkdir(parents=True, exist_ok=True)
    flops = train_flops_per_sample(whisper_config(), DECODER_LEN, MEL_FRAMES)
    report: dict[str, Any] = {
        "benchmark": "whisper-large-v3 shape training throughput, one GPU",
        **environment(),
        "peak_tflops_used_for_mfu": H100_SXM_BF16_DENSE_TFLOPS,
        "peak_tflops_source": "NVIDIA H100 SXM datasheet, dense bf16 (no sparsity)",
        "measured_bf16_gemm_tflops": gemm_tflops(),
        "model_train_tflop_per_sample": round(flops / 1e12, 3),
        "model_flops_note": "3 x forward FLOPs from the shapes: convs, projections, attention T x T, FFN, "
                            "cross-attention K/V over 1500 frames, vocab projection (fast path pads the decoder "
                            "to 48 positions; FLOPs counted for the real 44)",
        "settings": {"model": LARGE_V3, "mel_frames": MEL_FRAMES, "text_tokens": TEXT_TOKENS,
                     "decoder_positions": DECODER_LEN, "warmup_steps_excluded": TIMING_WARMUP_STEPS,
                     "timed_steps": args.steps, "statistic": "median optimizer-step time",
                     "weights": "random init (real shapes)", "n_train_for_plan": N_TRAIN},
    }
    out_path = args.results_dir / RESULTS_NAME

    def save() -> None:
        out_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")

    the_plan = make_the_plan(args.results_dir)
    report["plan"] = {k: the_plan.value(k) for k in ("mode", "strategy", "precision", "per_device_batch",
                                                      "grad_accum", "gradient_checkpointing",
                                                      "dataloader_num_workers", "max_steps", "optim")}
    report["plan"]["estimated_gpu_gb"] = the_plan.chosen.gpu_gb
    variants = [v for v in args.variants.split(",") if v]
    report["variants"] = {}
    for i, name in enumerate(variants):
        try:
            report["variants"][name] = run_fast(the_plan, name, TIMING_WARMUP_STEPS, args.steps,
                                                args.profile_steps if i == 0 else 0, args.trace)
        except Exception as e:  # one failing variant must not lose the others
            report["variants"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            traceback.print_exc()
            free_gpu()
        log.info("variant %s: %s", name, {k: report["variants"][name].get(k) for k in
                                          ("samples_per_s", "peak_gpu_gb", "first_steps_seconds", "error")})
        save()
    if not args.skip_recipe:
        try:
            report["hf_recipe"] = run_recipe(TIMING_WARMUP_STEPS, args.steps)
        except Exception as e:
            report["hf_recipe"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            traceback.print_exc()
        save()

    main_variant = report["variants"].get(variants[0], {})
    recipe = report.get("hf_recipe", {})
    report["asrft_variant"] = variants[0]
    report["asrft_samples_per_s"] = main_variant.get("samples_per_s")
    report["hf_recipe_samples_per_s"] = recipe.get("samples_per_s")
    if report["asrft_samples_per_s"] and report["hf_recipe_samples_per_s"]:
        report["ratio"] = round(report["asrft_samples_per_s"] / report["hf_recipe_samples_per_s"], 3)
    report["mfu"] = mfu(report["asrft_samples_per_s"], flops)
    report["hf_recipe_mfu"] = mfu(report["hf_recipe_samples_per_s"], flops)
    report["peak_gpu_gb"] = main_variant.get("peak_gpu_gb")
    report["hf_recipe_peak_gpu_gb"] = recipe.get("peak_gpu_gb")
    report["mfu_by_variant"] = {n: mfu(v.get("samples_per_s"), flops) for n, v in report["variants"].items()}
    report["profile"] = main_variant.get("profile")
    eager = report["variants"].get("master-eager", {})
    if main_variant.get("compiled_layers") and eager.get("median_step_seconds"):
        report["compile"] = compile_economics(main_variant, eager, the_plan.max_steps)
    save()
    summary = {k: report.get(k) for k in ("gpu", "asrft_samples_per_s", "hf_recipe_samples_per_s", "ratio", "mfu",
                                          "peak_gpu_gb", "hf_recipe_peak_gpu_gb", "compile")}
    summary["variants"] = {n: v.get("samples_per_s", v.get("error")) for n, v in report["variants"].items()}
    print(json.dumps(report, indent=2, ensure_ascii=False))
    print("SUMMARY", json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
