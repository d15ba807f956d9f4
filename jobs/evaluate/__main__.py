"""asr-ft evaluate — transcribe test sets with each model (same decoding settings) and score them.

    asr-ft evaluate --model NAME=REF [--model NAME=REF ...] \\
        (--test-jsonl F | --test-csv F --test-audio-dir D) [--set-name NAME] [--run-id ID] [--artifacts URI]
    asr-ft evaluate --run-id demo        # in a pipeline run: pretrained vs finetuned on prepare's test set
    python -m jobs.evaluate ...          (the same, as run in a container)

REF: bundled:whisper-base, hf://org/name[@rev], s3://bucket/prefix, a Hugging Face or CTranslate2 folder, or
an `asr-ft export` folder. Decoding: greedy (--beam-size), Chinese transcription prompt, no timestamps, at most
--max-new-tokens tokens, each model's suppression lists; CTranslate2 on CPU (--compute-type for every model),
transformers generate in bf16 on a GPU.

Sets: exactly those given (--test-jsonl / --test-csv, --sets NAME=FILE.jsonl | NAME=FILE.csv,AUDIO_DIR |
NAME=dir:FOLDER, a folder holding transcripts.csv + audio/), else the run's prepare/test.jsonl. Their paths may
name environment variables as ${VAR}; the demo pipeline scores the real Mandarin dev set at ${ASRFT_REAL_ZH_DEV}
when that variable is set.

Environment: ASRFT_EVALUATE_MODEL (JSON list), ASRFT_EVALUATE_TEST_JSONL, ASRFT_EVALUATE_TEST_CSV,
ASRFT_EVALUATE_TEST_AUDIO_DIR, ASRFT_EVALUATE_SET_NAME, ASRFT_EVALUATE_SETS (JSON list),
ASRFT_EVALUATE_BACKEND, ASRFT_EVALUATE_DEVICE, ASRFT_EVALUATE_COMPUTE_TYPE, ASRFT_EVALUATE_BEAM_SIZE,
ASRFT_EVALUATE_MAX_NEW_TOKENS, ASRFT_EVALUATE_BATCH_SIZE, ASRFT_EVALUATE_THREADS, ASRFT_EVALUATE_TITLE;
common: ASRFT_ARTIFACTS, ASRFT_RUN_ID, ASRFT_FORCE, ASRFT_LOG_LEVEL, ASRFT_S3__* .

Writes <artifacts>/<run-id>/evaluate/: predictions.jsonl, metrics.json ({model: {set: {cer, wer, exact,
similarity, n, audio_seconds, rtf, ...}}}), report.md, report.html, run_info.json (decoding settings,
throughput), rejected.jsonl (bad rows of CSV sets).
"""

from __future__ import annotations

import functools
import sys

from common.core.stage import EXIT_BAD_INPUT, run_stage, stage_main
from jobs.evaluate import STAGE, EvaluateSettings, evaluate, plan_evaluation

EXAMPLES = """examples:
  asr-ft evaluate --run-id demo                               # pretrained vs finetuned of the run
  asr-ft evaluate --model base=bundled:whisper-base --model mine=runs/demo/export/ct2 \\
      --test-csv data/answers.csv --test-audio-dir data/test_audio --set-name answers
  asr-ft evaluate --model small=hf://openai/whisper-small --test-jsonl runs/demo/prepare/test.jsonl --beam-size 5
  ASRFT_EVALUATE_SETS='[{"name": "dev", "jsonl": "data/dev.jsonl"}]' asr-ft evaluate --run-id demo
  asr-ft evaluate --run-id demo --sets test=run:prepare/test.jsonl --sets 'real=dir:${MY_DEV_SET}'

中文: 用相同的解码设置转写测试集, 计算字错率等指标, 输出 predictions.jsonl、metrics.json 与报告。
"""


def main(argv: list[str] | None = None) -> int:
    settings = stage_main(EvaluateSettings, argv, __doc__, EXAMPLES)
    if settings is None:
        return EXIT_BAD_INPUT
    plan = functools.cache(lambda store: plan_evaluation(settings, store))  # planned once: fingerprint + body
    return run_stage(STAGE, settings, lambda store: plan(store).inputs, lambda ctx: evaluate(ctx, plan(ctx.store)))


if __name__ == "__main__":
    sys.exit(main())
