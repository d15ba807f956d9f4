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
    from common.core.settings import SettingsError, build_parser, load_settings
    from common.core.stage import EXIT_BAD_INPUT, StageFailed, fail, setup_logging
    from jobs.transcribe import TranscribeSettings, transcribe

    title, _, rest = __doc__.strip().partition("\n")
    parser = build_parser(TranscribeSettings, prog="asr-ft transcribe", description=title + "\n" + rest,
                          epilog=EXAMPLES)
    parser.add_argument("model_arg", nargs="?", metavar="MODEL", help="the model (or --model)")
    parser.add_argument("audio_args", nargs="*", metavar="AUDIO", help="recordings (or --audio)")
    ns = vars(parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv))
    config = ns.pop("config", None)
    if ns.get("model_arg"):
        ns["model"] = ns.pop("model_arg")
    ns.pop("model_arg", None)
    positional = ns.pop("audio_args", None) or []
    if positional:
        ns["audio"] = [*ns.get("audio", []), *positional]
    try:
        settings = load_settings(TranscribeSettings, ns, config)
    except SettingsError as e:
        setup_logging("INFO")
        print(f"asr-ft transcribe: {e}", file=sys.stderr)
        return fail("transcribe", str(e), EXIT_BAD_INPUT)
    setup_logging(settings.log_level)
    try:
        return transcribe(settings)
    except StageFailed as e:
        return fail("transcribe", str(e), e.exit_code)


if __name__ == "__main__":
    sys.exit(main())
