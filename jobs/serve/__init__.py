"""The serve command: the model behind an OpenAI-compatible HTTP endpoint (FastAPI app on uvicorn).

    settings = ServeSettings(model="runs/demo/export", port=8000)
    code = serve(settings)         # returns 0 after SIGTERM/SIGINT, once the requests in flight are answered

Reads: the model (anything ``evaluate`` takes, see :mod:`common.core.inference`). Serves: see
:mod:`common.core.serve`. Shutdown: on SIGTERM (what Kubernetes sends) or Ctrl-C the server stops accepting
connections, answers every request it has already received (up to ``--graceful-seconds``), then exits 0.
"""

from __future__ import annotations

import logging
import signal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from common.core.inference import DecodingSettings, open_model

log = logging.getLogger(__name__)


class ServeSettings(DecodingSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_SERVE_")

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface, as in a container)",
                      examples=["127.0.0.1", "0.0.0.0"])
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port, logged at start)")
    served_model_name: str | None = Field(None, description="the model's name in /v1/models and /health "
                                                            "[default: MODEL as given]", examples=["my-whisper"])
    max_upload_mb: float = Field(25.0, gt=0, le=2048, description="largest upload accepted (MiB); larger → 413")
    max_audio_seconds: float = Field(1800.0, gt=0, le=86_400, description="longest recording accepted (s); "
                                                                          "longer → 413")
    normalize: str = Field("none", description="text normalisation: none (as decoded), simplified (NFKC + "
                                               "traditional → simplified), scoring (what the evaluation report "
                                               "scores: also no punctuation, spaces or case)")
    graceful_seconds: int = Field(120, ge=1, le=3600, description="on SIGTERM: how long requests in flight may "
                                                                  "still take before the server exits anyway")

    @field_validator("normalize")
    @classmethod
    def _normalize(cls, value: str) -> str:
        from common.core.transcripts import NORMALIZE

        if value not in NORMALIZE:
            raise ValueError(f"normalize {value!r}: expected one of {', '.join(NORMALIZE)}")
        return value


def serve(settings: ServeSettings) -> int:
    import uvicorn

    from common.core.serve import Limits, create_app

    loaded = open_model(settings)
    limits = Limits(max_upload_bytes=int(settings.max_upload_mb * 2**20), max_audio_seconds=settings.max_audio_seconds)
    app = create_app(loaded, limits, model_name=settings.served_model_name or settings.model,
                     normalize=settings.normalize)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            timeout_graceful_shutdown=settings.graceful_seconds, log_config=None,
                            access_log=settings.log_level == "DEBUG")
    server = uvicorn.Server(config)
    stopped: list[int] = []
    # uvicorn handles SIGTERM/SIGINT itself (stop listening, finish the requests in flight) and afterwards
    # re-raises the signal to the handler that was there before: this one, so that the exit is a clean 0.
    previous = {sig: signal.signal(sig, lambda s, _frame: stopped.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        log.info("serve: stopped by %s after answering the requests in flight", signal.Signals(stopped[0]).name)
    return 0 if server.started else 1
