"""asr-ft finetune — plan, then fine-tune the run's pretrained model (full / freeze-encoder / LoRA) on extract's records.

    asr-ft finetune [--mode auto|full|freeze-encoder|lora] [--epochs N] [--lr LR] [--batch B] [--run-id ID]
                    [--guard-dir FOLDER | --guard-csv F --guard-audio-dir D] [--guard-tolerance POINTS]
    python -m jobs.finetune ...            (the same, as run in a container)

Environment: ASRFT_FINETUNE_<SETTING> for every flag (ASRFT_FINETUNE_MODE, ASRFT_FINETUNE_EPOCHS,
ASRFT_FINETUNE_LR, ASRFT_FINETUNE_BATCH, ASRFT_FINETUNE_GRAD_ACCUM, ASRFT_FINETUNE_MAX_STEPS,
ASRFT_FINETUNE_LORA_R, ASRFT_FINETUNE_FROZEN_ENCODER_LAYERS, ASRFT_FINETUNE_DEVICE, ASRFT_FINETUNE_OVERRIDES
(JSON) …; `--help` lists them all); common: ASRFT_ARTIFACTS, ASRFT_RUN_ID, ASRFT_FORCE, ASRFT_LOG_LEVEL,
ASRFT_S3__ENDPOINT_URL (and the other ASRFT_S3__* keys). TENSORBOARD_LOGGING_DIR is set by the stage.

Reads <run>/extract/ (records, data_facts.json, the feature cache) and <run>/pretrained/ (model/ and the
family in provenance.json); writes <run>/finetune/: plan.json (before any weight is loaded), checkpoints/
checkpoint-N/, tensorboard/, trainer_state.json, final/ (the family's model folder; whisper: a plain Hugging
Face Whisper folder, LoRA merged). With a guard set (general speech the model must not get worse on), final/ is
the candidate chosen by the forgetting guard and guard.json records every candidate and the reason.
Interrupted? Run the same command again: it resumes from the last checkpoint.

Several machines: every node runs `torchrun --module jobs.finetune [flags]` (a Kubeflow Trainer TrainJob does
this, its torch runtime giving torchrun PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR,
PET_MASTER_PORT); each process is one rank, global rank 0 plans and writes the stage's outputs.
"""

from __future__ import annotations

import sys

from common.core.stage import EXIT_BAD_INPUT, fail, run_stage, setup_logging, stage_main
from common.training.launch import is_worker, not_started_by_torchrun
from jobs.finetune import STAGE, FinetuneSettings, finetune, finetune_inputs, run_as_rank

EXAMPLES = """examples:
  asr-ft finetune --run-id demo                                   # every choice by the planner
  asr-ft finetune --run-id demo --mode lora --lora-r 32 --frozen-encoder-layers 3 --epochs 4 --lr 1e-3
  asr-ft finetune --run-id big --mode full --batch 32 --overrides '{"strategy": "zero2", "save_steps": 200}'
  asr-ft finetune --run-id demo --device cpu --max-steps 20       # a quick smoke run
  asr-ft finetune --run-id demo --guard-dir data/general-zh --guard-tolerance 1.0   # keep general speech safe

中文: 先写出训练计划 plan.json(每个自动决策及原因, 可用设置覆盖), 再训练; 中断后重跑同一命令即从最近的检查点续训。
"""


def main(argv: list[str] | None = None) -> int:
    settings = stage_main(FinetuneSettings, argv, __doc__, EXAMPLES)
    if settings is None:
        return EXIT_BAD_INPUT
    if why := not_started_by_torchrun():
        setup_logging(settings.log_level)
        return fail(STAGE, why, EXIT_BAD_INPUT)
    if is_worker():  # one rank of a world torchrun started (several nodes: a Kubeflow Trainer TrainJob)
        return run_as_rank(settings)
    return run_stage(STAGE, settings, lambda store: finetune_inputs(settings, store), finetune)


if __name__ == "__main__":
    sys.exit(main())
