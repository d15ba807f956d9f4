"""asr-ft transcribe — transcribe recordings of any length with a model; text, JSONL, SRT or WebVTT.

    asr-ft transcribe MODEL AUDIO [AUDIO ...] [--format text|jsonl|srt|vtt ...] [--output-dir DIR]
    python -m jobs.transcribe ...        (the same, as run in a container)

MODEL: anything `asr-ft evaluate` takes: an `asr-ft export` folder, a run's stage folder (runs/demo/export),
bundled:whisper-base, hf://org/name, s3://bucket/prefix. AUDIO: files, folders (recursively), quoted globs,
s3:// objects or prefixes. Recordings longer than 30 s are split at pauses (Silero VAD) into segments of at
most 30 s, decoded in batches with evaluate's decoding settings; each segment keeps its start and end time.
CPU by default; the GPU when there is one (--device). A file that cannot be read is reported and skipped.

Environment: ASRFT_TRANSCRIBE_MODEL, ASRFT_TRANSCRIBE_AUDIO (JSON list), ASRFT_TRANSCRIBE_FORMAT,
ASRFT_TRANSCRIBE_OUTPUT_DIR, ASRFT_TRANSCRIBE_NORMALIZE, ASRFT_TRANSCRIBE_VAD, ASRFT_TRANSCRIBE_DEVICE, …
(every flag; see below); ASRFT_S3__* for s3:// inputs and models.

Exit code: 0 when every recording was transcribed, 1 when some were skipped (each is logged with its reason),
2 for bad settings or a model that cannot be loaded.
"""

from __future__ import annotations

import sys

EXAMPLES = """examples:
  asr-ft transcribe runs/demo/export meeting.wav                          # text on stdout
  asr-ft transcribe runs/demo/export recordings/ --format srt --format vtt --output-dir subtitles/
  asr-ft transcribe bundled:whisper-base 'calls/*.flac' --format jsonl --output-dir out/ --normalize simplified
  asr-ft transcribe s3://models/mine s3://bucket/calls/ --output-dir out/ --format jsonl

中文: 用模型转写任意长度的录音(按静音自动切分为不超过 30 秒的片段), 输出文本、JSONL、SRT 或 WebVTT 字幕。
"""


def main(argv: list[str] | None = None) -> int:
    from common.core.inference import command_main
    from jobs.transcribe import TranscribeSettings, transcribe

    return command_main("transcribe", TranscribeSettings, transcribe, __doc__, EXAMPLES, argv, audio=True)


if __name__ == "__main__":
    sys.exit(main())
