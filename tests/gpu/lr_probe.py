"""Train a tiny random Whisper for a few steps with DeepSpeed, configured by the planner, and write
the learning rate the optimizer actually used at every step (JSON).

    python tests/gpu/lr_probe.py --strategy zero2 --out lrs.json [--upstream-scheduler]

`--upstream-scheduler` adds the upstream Kimi-Audio recipe's DeepSpeed WarmupLR section to the
generated config (through the planner's `deepspeed` override): the negative control.
Runs as one process (world size 1) without a launcher; used by test_deepspeed_lr_schedule.py.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import Seq2SeqTrainer, TrainerCallback, WhisperConfig, WhisperForConditionalGeneration  # noqa: E402

from common.families.whisper.profile import profile_from_hf_config  # noqa: E402
from common.training.planner import deepspeed_config, detect_resources, plan, training_arguments  # noqa: E402

UPSTREAM_SCHEDULER = {  # finetune_codes/ds_config_zero3.json of MoonshotAI/Kimi-Audio
    "type": "WarmupLR",
    "params": {"warmup_min_lr": 0, "warmup_max_lr": "auto", "warmup_num_steps": "auto"},
}
TINY = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=300, num_mel_bins=80, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
N_TRAIN, LABEL_TOKENS = 64, 8


class RecordLR(TrainerCallback):
    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.losses: list[float] = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--upstream-scheduler", action="store_true")
    a = parser.parse_args()
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)

    config = WhisperConfig(**TINY)
    profile = profile_from_hf_config(config, decoder_seq_len=LABEL_TOKENS)
    overrides: dict = {"strategy": a.strategy}
    if a.upstream_scheduler:
        from common.training.memory import STRATEGIES

        overrides["deepspeed"] = {**deepspeed_config(STRATEGIES[a.strategy], "bf16", profile),
                                  "scheduler": UPSTREAM_SCHEDULER}
    p = plan(profile, n_train=N_TRAIN, n_eval=0, per_device_batch=4, epochs=2, lr=1e-3, warmup_ratio=0.2,
             scheduler="cosine", resources=detect_resources(), overrides=overrides)
    # TrainingArguments before the model: with ZeRO-3 the model is then built partitioned (zero.Init)
    args = training_arguments(p, Path(a.out).parent / f"run-{a.strategy}", report_to="none", save_strategy="no",
                              logging_steps=1, remove_unused_columns=False)
    model = WhisperForConditionalGeneration(config)
    g = torch.Generator().manual_seed(0)
    data = [{"input_features": torch.randn(80, 3000, generator=g),
             "labels": torch.randint(4, 300, (LABEL_TOKENS,), generator=g)} for _ in range(N_TRAIN)]
    recorder = RecordLR()
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
    trainer.train()
    Path(a.out).write_text(json.dumps({
        "strategy": a.strategy,
        "upstream_scheduler": a.upstream_scheduler,
        "lr": p.value("lr"),
        "max_steps": p.max_steps,
        "warmup_steps": p.value("warmup_steps"),
        "optimizer_lrs": recorder.lrs,
        "logged_lrs": [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h],
        "losses": recorder.losses,
        "global_step": trainer.state.global_step,
        "deepspeed": p.deepspeed if not a.upstream_scheduler else overrides["deepspeed"],
    }, indent=1))


if __name__ == "__main__":
    main()
