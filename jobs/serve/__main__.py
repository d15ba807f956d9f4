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
    from common.core.inference import command_main
    from jobs.serve import ServeSettings, serve

    return command_main("serve", ServeSettings, serve, __doc__, EXAMPLES, argv)


if __name__ == "__main__":
    sys.exit(main())
