"""asr-ft serve — an OpenAI-compatible transcription server for a model (POST /v1/audio/transcriptions).

    asr-ft serve MODEL [--host 0.0.0.0] [--port 8000] [--max-upload-mb 25] [--max-audio-seconds 1800]
    python -m jobs.serve ...             (the same, as run in a container)

MODEL: anything `asr-ft evaluate` takes (an `asr-ft export` folder, runs/demo/export, bundled:whisper-base,
hf://org/name, s3://bucket/prefix). Endpoints: POST /v1/audio/transcriptions (multipart `file`, `model`,
`language`, `response_format` json|text|srt|vtt|verbose_json), GET /v1/models, GET /health, GET /metrics
(Prometheus). Recordings are split at pauses into ≤ 30-s segments; segments of concurrent requests are decoded
together in batches with evaluate's decoding settings. SIGTERM: stop accepting, answer what is in flight, exit 0.

Environment: ASRFT_SERVE_MODEL, ASRFT_SERVE_HOST, ASRFT_SERVE_PORT, ASRFT_SERVE_MAX_UPLOAD_MB,
ASRFT_SERVE_MAX_AUDIO_SECONDS, ASRFT_SERVE_GRACEFUL_SECONDS, ASRFT_SERVE_DEVICE, … (every flag; see below).
"""

from __future__ import annotations

import sys

EXAMPLES = """examples:
  asr-ft serve runs/demo/export                                # http://127.0.0.1:8000
  asr-ft serve bundled:whisper-base --host 0.0.0.0 --port 9000 --served-model-name whisper-base
  curl -F file=@meeting.wav -F model=asr-ft -F response_format=srt http://127.0.0.1:8000/v1/audio/transcriptions

中文: 启动与 OpenAI 兼容的语音转写 HTTP 服务 (POST /v1/audio/transcriptions), 另有 /health 和 /metrics。
"""


def main(argv: list[str] | None = None) -> int:
    from common.core.settings import SettingsError, build_parser, load_settings
    from common.core.stage import EXIT_BAD_INPUT, StageFailed, fail, setup_logging
    from jobs.serve import ServeSettings, serve

    title, _, rest = __doc__.strip().partition("\n")
    parser = build_parser(ServeSettings, prog="asr-ft serve", description=title + "\n" + rest, epilog=EXAMPLES)
    parser.add_argument("model_arg", nargs="?", metavar="MODEL", help="the model (or --model)")
    ns = vars(parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv))
    config = ns.pop("config", None)
    if ns.get("model_arg"):
        ns["model"] = ns["model_arg"]
    ns.pop("model_arg", None)
    try:
        settings = load_settings(ServeSettings, ns, config)
    except SettingsError as e:
        setup_logging("INFO")
        print(f"asr-ft serve: {e}", file=sys.stderr)
        return fail("serve", str(e), EXIT_BAD_INPUT)
    setup_logging(settings.log_level)
    try:
        return serve(settings)
    except StageFailed as e:
        return fail("serve", str(e), e.exit_code)


if __name__ == "__main__":
    sys.exit(main())
