"""asr-ft prepare — check a transcript manifest + audio folder and convert it into train/test records.

    asr-ft prepare --train-csv data/train.csv --audio-dir data/audio \\
        --test-csv data/answers.csv --test-audio-dir data/test_audio [--run-id ID] [--artifacts URI]
    python -m jobs.prepare ...            (the same, as run in a container)

Environment: ASRFT_PREPARE_TRAIN_CSV, ASRFT_PREPARE_AUDIO_DIR, ASRFT_PREPARE_TEST_CSV,
ASRFT_PREPARE_TEST_AUDIO_DIR, ASRFT_PREPARE_TEST_RATIO, ASRFT_PREPARE_SEED, ASRFT_PREPARE_ID_COLUMN,
ASRFT_PREPARE_TEXT_COLUMN, ASRFT_PREPARE_FORMAT, ASRFT_PREPARE_ENCODING, ASRFT_PREPARE_AUDIO_ROOT,
ASRFT_PREPARE_MIN_SECONDS, ASRFT_PREPARE_MAX_SECONDS,
ASRFT_PREPARE_MAX_CHARS_PER_SECOND, ASRFT_PREPARE_WORKERS; common: ASRFT_ARTIFACTS, ASRFT_RUN_ID,
ASRFT_FORCE, ASRFT_LOG_LEVEL, ASRFT_S3__ENDPOINT_URL (and the other ASRFT_S3__* keys).

Reads CSV/TSV (delimiter detected; UTF-8 with or without BOM, GB18030/GBK or Big5 detected, or --encoding)
with auto-detected id/text columns, JSON lines (NeMo, FunASR, this project's records), Kaldi data folders
(wav.scp + text) and Hugging Face audiofolders (--format, default auto); decodes any audio libsndfile or
FFmpeg (PyAV) reads (WAV, FLAC, MP3, OGG, M4A/AAC, Opus, WebM, …), down-mixes to mono and resamples to 16 kHz (soxr). Writes <artifacts>/<run-id>/prepare/: audio/*.wav
(16 kHz 16-bit), train.jsonl, test.jsonl, rejected.jsonl (each bad row with a reason code and how to fix
it) and stats.json. A bad row never stops the stage; exit 0 with at least one good train row, else 2.
"""

from __future__ import annotations

import functools
import sys

from common.core.stage import EXIT_BAD_INPUT, run_stage, stage_main
from jobs.prepare import STAGE, PrepareSettings, prepare, scan_inputs

EXAMPLES = """examples:
  # two CSVs: train CSV + audio/, test answers CSV + test_audio/
  asr-ft prepare --train-csv demo_data/train.csv --audio-dir demo_data/audio \\
      --test-csv demo_data/answers.csv --test-audio-dir demo_data/test_audio --run-id demo

  # one CSV, hold out 10 % of its good rows as the test set (deterministic for a --seed)
  asr-ft prepare --train-csv data/all.csv --audio-dir data/wavs --test-ratio 0.1 --seed 7 \\
      --id-column utt --text-column transcript

  # audio and artifacts on S3 / MinIO
  asr-ft prepare --train-csv s3://bucket/data/train.csv --audio-dir s3://bucket/data/audio --test-ratio 0.1 \\
      --artifacts s3://bucket/runs --s3-endpoint-url http://minio:9000

  # other manifest formats (detected; --format to force one)
  asr-ft prepare --train data/train_manifest.json --audio-root /data/corpus --test-ratio 0.1  # NeMo, absolute paths
  asr-ft prepare --train data/funasr_train.jsonl --audio-dir data/wav --test-ratio 0.1        # FunASR key/source/target
  asr-ft prepare --train data/kaldi/train --test data/kaldi/test --audio-root /data/wav       # Kaldi wav.scp + text
  asr-ft prepare --train data/my_audiofolder --test-ratio 0.1                                  # metadata.csv + audio
  asr-ft prepare --train data/gbk.csv --audio-dir data/audio --encoding gb18030 --test-ratio 0.1

中文: 检查标注清单 (CSV/TSV、NeMo/FunASR JSONL、Kaldi 目录、Hugging Face audiofolder) 与音频, 转成 16 kHz 单声道 wav, 输出 train/test.jsonl、被拒行 rejected.jsonl(含原因) 与统计 stats.json。
"""


def main(argv: list[str] | None = None) -> int:
    settings = stage_main(PrepareSettings, argv, __doc__, EXAMPLES)
    if settings is None:
        return EXIT_BAD_INPUT
    scan = functools.cache(lambda: scan_inputs(settings))  # read once: its fingerprint decides the skip
    return run_stage(STAGE, settings, lambda store: scan().inputs, lambda ctx: prepare(ctx, scan()))


if __name__ == "__main__":
    sys.exit(main())
