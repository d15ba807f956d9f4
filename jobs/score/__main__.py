"""asr-ft score — score existing predictions: metrics.json, report.md and report.html.

    asr-ft score --predictions F.jsonl [--predictions G.jsonl ...] [--run-id ID] [--artifacts URI]
    python -m jobs.score ...            (the same, as run in a container)

Lines: {"id","reference","hypothesis","model","set"} (+ optional "duration", "decode_seconds" in seconds).
Chinese-aware normalization (NFKC, traditional → simplified, no punctuation/spaces, Latin lower-cased), then
CER, WER (where words exist), exact match, similarity and real-time factor per model and set.

Environment: ASRFT_SCORE_PREDICTIONS (JSON list), ASRFT_SCORE_TITLE; common: ASRFT_ARTIFACTS, ASRFT_RUN_ID,
ASRFT_FORCE, ASRFT_LOG_LEVEL.

Writes <artifacts>/<run-id>/score/: metrics.json ({model: {set: {cer, wer, exact, similarity, n, audio_seconds,
rtf, ...}}}), report.md, report.html.
"""

from __future__ import annotations

import sys

from common.core.stage import EXIT_BAD_INPUT, run_stage, stage_main
from jobs.score import STAGE, ScoreSettings, score, score_inputs

EXAMPLES = """examples:
  asr-ft score --predictions runs/demo/evaluate/predictions.jsonl --run-id demo
  asr-ft score --predictions baseline.jsonl --predictions mine.jsonl --run-id compare --title "A vs B"

中文: 对已有的识别结果打分(字错率等), 生成 metrics.json 与报告。
"""


def main(argv: list[str] | None = None) -> int:
    settings = stage_main(ScoreSettings, argv, __doc__, EXAMPLES)
    if settings is None:
        return EXIT_BAD_INPUT
    return run_stage(STAGE, settings, lambda store: score_inputs(settings), score)


if __name__ == "__main__":
    sys.exit(main())
