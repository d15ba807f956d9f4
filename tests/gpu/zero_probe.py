"""Train a small random Whisper with Hugging Face's Seq2SeqTrainer under a planner-generated DeepSpeed
ZeRO config, then resume from its ZeRO checkpoint in a new Trainer; write what happened as JSON.

    python tests/gpu/zero_probe.py --strategy zero3-offload-opt --out DIR/result.json

Run A trains MAX_STEPS steps on a tiny fixed data set and saves a checkpoint every SAVE_STEPS steps;
after training it writes every full weight (the fp32 master weights through DeepSpeed's
safe_get_full_fp32_param; frozen ones, which have none, gathered in 16 bits) to DIR/reference.safetensors. Run B builds a new model (another seed), a new Trainer with the same
arguments, and resumes from checkpoint-SAVE_STEPS. Runs as one process (world size 1) without a
launcher; used by test_zero_offload.py, which checks the numbers and exports the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    Seq2SeqTrainer,
    TrainerCallback,
    WhisperConfig,
    WhisperForConditionalGeneration,
    set_seed,
)

from common.families.whisper.profile import profile_from_hf_config  # noqa: E402
from common.training.planner import detect_resources, plan, training_arguments  # noqa: E402

# small Whisper: d_model 256, 4 + 4 layers; 200 mel frames (max_source_positions 100) keep steps fast
SMALL = dict(d_model=256, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=1024, decoder_ffn_dim=1024, vocab_size=512, num_mel_bins=80, max_source_positions=100,
             max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
MEL_FRAMES = 2 * SMALL["max_source_positions"]  # the encoder's conv2 halves the frames  # 200
N_TRAIN, BATCH, LABEL_TOKENS = 8, 4, 16
LABEL_VOCAB = range(4, 36)  # labels from 32 tokens: loss falls from ln(512) = 6.2 towards ln(32) = 3.5 at least
EPOCHS = 10  # 8 samples / batch 4 = 2 steps per epoch -> 20 steps
SAVE_STEPS = 10
LR = 1e-3


class Record(TrainerCallback):
    """Loss and optimizer learning rate at every optimizer step, keyed by global step."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.lrs: dict[int, float] = {}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.lrs[state.global_step] = float(optimizer.param_groups[0]["lr"])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = float(logs["loss"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixed_data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_features": torch.randn(SMALL["num_mel_bins"], MEL_FRAMES, generator=g),
             "labels": torch.randint(LABEL_VOCAB.start, LABEL_VOCAB.stop, (LABEL_TOKENS,), generator=g)}
            for _ in range(N_TRAIN)]


def engine_facts(trainer: Seq2SeqTrainer) -> dict:
    engine = trainer.model_wrapped
    return {
        "zero_stage": engine.zero_optimization_stage(),
        "offload_optimizer": bool(engine.zero_offload_optimizer()),
        "offload_param": bool(engine.zero_offload_param()),
        "optimizer": type(engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer")
                          else engine.optimizer).__name__,
    }


def full_weights(trainer: Seq2SeqTrainer) -> dict[str, torch.Tensor]:
    """Every parameter in full: the fp32 master weight of a trained one, gathered from the ZeRO
    partitions; the 16-bit weight of a frozen one (it has no master copy), as fp32."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in trainer.model_wrapped.module.named_parameters():
        if param.requires_grad:
            full = safe_get_full_fp32_param(param)
            assert full is not None, f"no fp32 master weight for {name}"
        else:
            with deepspeed.zero.GatheredParameters([param]):
                full = param.data
        out[name] = full.detach().float().cpu().clone()
    return out


def train(strategy: str, folder: Path, *, seed: int, resume: Path | None) -> tuple[Seq2SeqTrainer, Record, float]:
    config = WhisperConfig(**SMALL)
    profile = profile_from_hf_config(config, decoder_seq_len=LABEL_TOKENS)
    p = plan(profile, n_train=N_TRAIN, n_eval=0, per_device_batch=BATCH, grad_accum=1, epochs=EPOCHS, lr=LR,
             save_steps=SAVE_STEPS, scheduler="cosine", resources=detect_resources(),
             overrides={"strategy": strategy, "gradient_checkpointing": False})
    # TrainingArguments before the model: with ZeRO-3 the model is then built partitioned (zero.Init)
    args = training_arguments(p, folder / "checkpoints", report_to="none", logging_steps=1, seed=0,
                              remove_unused_columns=False, save_only_model=False)
    set_seed(seed)
    model = WhisperForConditionalGeneration(config)
    if resume is None:  # full weights before training (ZeRO partitions them only when the Trainer starts)
        from safetensors.torch import save_file

        save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
                   if k != "proj_out.weight"}, str(folder.parent / "initial.safetensors"))
    recorder = Record()
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=fixed_data(), callbacks=[recorder])
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    if resume is None:
        (folder / "plan.json").write_text(p.to_json())
    return trainer, recorder, seconds


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--strategy", required=True, help="planner strategy, e.g. zero3-offload-opt")
    parser.add_argument("--out", required=True, help="result JSON; its folder gets checkpoints and weights")
    a = parser.parse_args()
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    out = Path(a.out)
    folder = out.parent
    folder.mkdir(parents=True, exist_ok=True)

    trainer_a, rec_a, seconds_a = train(a.strategy, folder / "a", seed=0, resume=None)
    facts = engine_facts(trainer_a)
    from safetensors.torch import save_file

    reference = full_weights(trainer_a)
    save_file(reference, str(folder / "reference.safetensors"))
    deepspeed_config = json.loads((folder / "a" / "plan.json").read_text())["deepspeed"]
    ckpt_dir = folder / "a" / "checkpoints"
    checkpoints = sorted(p.name for p in ckpt_dir.glob("checkpoint-*"))
    resume_from = ckpt_dir / f"checkpoint-{SAVE_STEPS}"
    global_step_a = trainer_a.state.global_step
    del trainer_a
    torch.cuda.empty_cache()

    trainer_b, rec_b, seconds_b = train(a.strategy, folder / "b", seed=1, resume=resume_from)
    out.write_text(json.dumps({
        "strategy": a.strategy,
        "deepspeed": deepspeed_config,
        "engine": facts,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "max_steps": EPOCHS * N_TRAIN // BATCH,
        "save_steps": SAVE_STEPS,
        "global_step_a": global_step_a,
        "losses_a": rec_a.losses,
        "lrs_a": rec_a.lrs,
        "seconds_a": round(seconds_a, 2),
        "checkpoints": checkpoints,
        "checkpoint_dir": str(ckpt_dir),
        "final_checkpoint": str(ckpt_dir / f"checkpoint-{global_step_a}"),
        "resumed_from": str(resume_from),
        "global_step_b": trainer_b.state.global_step,
        "losses_b": rec_b.losses,
        "lrs_b": rec_b.lrs,
        "seconds_b": round(seconds_b, 2),
        "reference_weights": str(folder / "reference.safetensors"),
        "initial_weights": str(folder / "initial.safetensors"),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if torch.cuda.is_available() else None,
    }, indent=1))


if __name__ == "__main__":
    main()
