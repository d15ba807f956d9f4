"""asr-ft extract — prepare's records → the same records + the model's features cached when it pays.

    asr-ft extract [--cache auto|always|never] [--epochs 3] [--run-id ID] [--artifacts URI]
    python -m jobs.extract ...            (the same, as run in a container)

Environment: ASRFT_EXTRACT_CACHE, ASRFT_EXTRACT_EPOCHS, ASRFT_EXTRACT_MAX_CACHE_GB, ASRFT_EXTRACT_MODEL_DIR,
ASRFT_EXTRACT_FAMILY, ASRFT_EXTRACT_SHARD_ROWS; common: ASRFT_ARTIFACTS, ASRFT_RUN_ID, ASRFT_FORCE,
ASRFT_LOG_LEVEL, ASRFT_S3__ENDPOINT_URL (and the other ASRFT_S3__* keys).

Reads <artifacts>/<run-id>/prepare/{train,test}.jsonl and their audio, and the run's pretrained model (run
`asr-ft pretrained` first, or pass --model-dir); writes <artifacts>/<run-id>/extract/: train.jsonl,
test.jsonl (records, with the cache reference when cached), skipped.jsonl (clips longer than the model's
window), data_facts.json (what the fine-tune planner needs of the data) and the family's cache (whisper:
float16 log-mel in features/*.npy, features.json).
"""

from __future__ import annotations

import sys

from common.core.stage import EXIT_BAD_INPUT, run_stage, stage_main
from jobs.extract import STAGE, ExtractSettings, extract, extract_inputs

EXAMPLES = """examples:
  asr-ft extract --run-id demo                       # cache decided from --epochs and size
  asr-ft extract --run-id demo --cache never         # finetune computes log-mel from the audio
  asr-ft extract --run-id big --epochs 10 --max-cache-gb 200 --artifacts s3://bucket/runs

中文: 按模型族计算输入特征(whisper: float16 对数梅尔缓存), 多轮训练时免去重复计算; 不划算时跳过缓存。
"""


def main(argv: list[str] | None = None) -> int:
    settings = stage_main(ExtractSettings, argv, __doc__, EXAMPLES)
    if settings is None:
        return EXIT_BAD_INPUT
    return run_stage(STAGE, settings, lambda store: extract_inputs(settings, store), extract)


if __name__ == "__main__":
    sys.exit(main())
