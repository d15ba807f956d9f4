"""asr-ft export — fine-tuned checkpoint → Hugging Face and CTranslate2 inference folders, checked offline.

    asr-ft export [--checkpoint PATH] [--quantization int8|float16|int8_float16|float32] [--run-id ID]
    python -m jobs.export ...            (the same, as run in a container)

Environment: ASRFT_EXPORT_CHECKPOINT, ASRFT_EXPORT_QUANTIZATION, ASRFT_EXPORT_VERIFY, ASRFT_EXPORT_FAMILY; common: ASRFT_ARTIFACTS,
ASRFT_RUN_ID, ASRFT_FORCE, ASRFT_LOG_LEVEL, ASRFT_S3__* .

Reads <artifacts>/<run-id>/finetune/final/ (or --checkpoint); writes <artifacts>/<run-id>/export/: model/
(safetensors, processor, generation config), ct2/ (faster-whisper / CTranslate2) and export_info.json. Both
folders are loaded with no network and decode one short clip before the stage finishes.
"""

from __future__ import annotations

import sys

from common.core.stage import EXIT_BAD_INPUT, run_stage, stage_main
from jobs.export import STAGE, ExportSettings, export, export_inputs

EXAMPLES = """examples:
  asr-ft export --run-id demo                                   # finetune/final → model/ + ct2/ (int8)
  asr-ft export --run-id demo --quantization float16 --force    # for faster-whisper on a GPU
  asr-ft export --checkpoint runs/demo/finetune/checkpoints/checkpoint-40 --run-id demo-ckpt40

  # use the result
  python -c "from faster_whisper import WhisperModel; m = WhisperModel('runs/demo/export/ct2'); \\
             print(''.join(s.text for s in m.transcribe('clip.wav', language='zh')[0]))"

中文: 导出推理模型: Hugging Face 目录与 CTranslate2(faster-whisper)目录, 均可离线加载。
"""


def main(argv: list[str] | None = None) -> int:
    settings = stage_main(ExportSettings, argv, __doc__, EXAMPLES)
    if settings is None:
        return EXIT_BAD_INPUT
    return run_stage(STAGE, settings, lambda store: export_inputs(settings, store), export)


if __name__ == "__main__":
    sys.exit(main())
