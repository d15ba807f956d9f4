"""The transcription HTTP server: OpenAI's ``POST /v1/audio/transcriptions`` in front of any family's engine.

    app = create_app(loaded, Limits(max_upload_bytes=25 << 20, max_audio_seconds=1800))
    uvicorn.run(app, host="0.0.0.0", port=8000)      # jobs/serve runs it, with graceful shutdown

Endpoints:

| method, path                    | what                                                                          |
|---------------------------------|-------------------------------------------------------------------------------|
| POST /v1/audio/transcriptions   | multipart ``file`` (+ ``model``, ``language``, ``response_format`` = json,   |
|                                 | text, srt, vtt or verbose_json; other OpenAI fields are accepted and ignored) |
| GET /v1/models                  | the served model, in OpenAI's list format                                     |
| GET /health                     | ``{"status": "ok", "model": …, "family": …, "device": …}``                     |
| GET /metrics                    | Prometheus text: requests by status, audio seconds, latency histogram, in flight |

How a request is decoded: the upload is decoded to 16-kHz mono (libsndfile: WAV, FLAC, OGG, MP3 …) and split
at pauses (Silero VAD, ≤ 30-s segments, see :mod:`common.core.segment`); the segments of every request waiting
go into one queue, and one worker decodes them ``batch_size`` at a time, so concurrent requests share batches
and none is dropped (a request waits its turn). Limits: an upload above ``max_upload_bytes`` gets 413 before
its body is read; audio longer than ``max_audio_seconds`` gets 413 from the file's header alone; anything
that is not decodable audio gets 400. Errors use OpenAI's shape: ``{"error": {"message", "type", "param",
"code"}}``, so the official client raises them with the message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool

from common.core.segment import VadOptions, speech_spans
from common.core.transcripts import normalized, render

log = logging.getLogger(__name__)

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
TRANSCRIPTIONS = "/v1/audio/transcriptions"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)  # seconds
BATCH_WAIT_SECONDS = 0.005  # how long the worker waits for more segments before decoding a partial batch


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 25 * 1024 * 1024  # OpenAI's own limit for this endpoint: 25 MB
    max_audio_seconds: float = 1800.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(message: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------
# Batching segments across requests
# ---------------------------------------------------------------------------------------------


class Batcher:
    """One worker thread decodes the queued segments of all requests, ``batch_size`` at a time."""

    def __init__(self, engine: Any, batch_size: int, on_batch: Any = None):
        self.engine, self.batch_size, self.on_batch = engine, batch_size, on_batch
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asrft-decode")
        self.task: asyncio.Task | None = None
        self.batches = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=True)

    async def transcribe(self, pieces: Sequence[np.ndarray]) -> list[str]:
        loop = asyncio.get_running_loop()
        futures = []
        for piece in pieces:
            future = loop.create_future()
            await self.queue.put((piece, future))
            futures.append(future)
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + BATCH_WAIT_SECONDS
            while len(batch) < self.batch_size:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except TimeoutError:
                    break
            batch.sort(key=lambda item: -len(item[0]))  # similar lengths together (see transcribe_pieces)
            try:
                texts = await loop.run_in_executor(self.pool, self.engine.transcribe, [p for p, _ in batch])
            except Exception as e:  # the engine failed: every request of this batch gets the error
                log.exception("serve: decoding a batch of %d segments failed", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.batches += 1
            if self.on_batch:
                self.on_batch(len(batch))
            for (_, future), text in zip(batch, texts, strict=True):
                if not future.done():
                    future.set_result(text)


# ---------------------------------------------------------------------------------------------
# Metrics and limits (pure ASGI middleware: it sees a request before its body is read)
# ---------------------------------------------------------------------------------------------


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("asrft_transcription_requests", "transcription requests by HTTP status",
                                ["status"], registry=self.registry)
        self.audio_seconds = Counter("asrft_transcription_audio_seconds", "seconds of audio transcribed",
                                     registry=self.registry)
        self.latency = Histogram("asrft_transcription_latency_seconds", "time from request to response",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("asrft_transcription_requests_in_flight", "transcription requests being handled",
                               registry=self.registry)
        self.segments = Counter("asrft_transcription_segments", "speech segments decoded", registry=self.registry)
        self.batches = Counter("asrft_transcription_batches", "batches decoded (segments of several requests "
                               "share one)", registry=self.registry)


class GuardMiddleware:
    """Counts transcription requests in flight, their status and latency, and refuses an oversize body (413)
    from its Content-Length before reading it, or once more bytes than allowed have arrived."""

    def __init__(self, app, metrics: Metrics, limits: Limits):
        self.app, self.metrics, self.limits = app, metrics, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != TRANSCRIPTIONS:
            return await self.app(scope, receive, send)
        m, limit = self.metrics, self.limits.max_upload_bytes
        t0 = time.perf_counter()
        status = {"code": 500}
        m.in_flight.inc()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        too_big = JSONResponse(error_body(f"the upload is larger than the server's limit of {limit} bytes "
                                          f"({limit / 2**20:.0f} MiB); send a shorter or compressed recording "
                                          "(FLAC, OGG, MP3)", "file_too_large", "file"), status_code=413)
        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await too_big(scope, receive, send_status)
                return
            received = 0

            async def bounded_receive():
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge()
                return message

            try:
                await self.app(scope, bounded_receive, send_status)
            except _TooLarge:
                await too_big(scope, receive, send_status)
        finally:
            m.in_flight.dec()
            m.requests.labels(str(status["code"])).inc()
            m.latency.observe(time.perf_counter() - t0)


class _TooLarge(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------------


def create_app(loaded: Any, limits: Limits = Limits(), *, model_name: str | None = None,
               vad: VadOptions | None = None, normalize: str = "none"):
    """The FastAPI application around ``loaded`` (a :class:`common.core.inference.Loaded`); ``normalize``: the
    texts' normalisation (see :mod:`common.core.transcripts`)."""
    from common.core.audio import SAMPLE_RATE, AudioProblem, load_audio
    from common.core.segment import Segment, join_texts

    vad = vad or VadOptions()
    metrics = Metrics()
    name = model_name or loaded.info.get("model") or "asr-ft"
    served = (loaded.engine.info.get("decoding") or {}).get("language") or "zh"
    batcher = Batcher(loaded.engine, loaded.batch_size, on_batch=lambda n: metrics.batches.inc())

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        log.info("serve: ready — model %s (%s) on %s, batches of %d, uploads ≤ %d bytes, audio ≤ %g s", name,
                 loaded.family, loaded.device, loaded.batch_size, limits.max_upload_bytes, limits.max_audio_seconds)
        yield
        await batcher.stop()
        log.info("serve: stopped after %d batches", batcher.batches)

    app = FastAPI(title="asr-ft transcription server", lifespan=lifespan)
    app.add_middleware(GuardMiddleware, metrics=metrics, limits=limits)
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.message, e.code, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):  # OpenAI answers 400, naming the field
        fields = sorted({str(err["loc"][-1]) for err in e.errors()})
        return JSONResponse(error_body(f"missing or invalid field(s): {', '.join(fields)}; send multipart form data "
                                       "with the recording as `file`", "invalid_request_error",
                                       fields[0] if fields else None), status_code=400)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "family": loaded.family, "device": loaded.device,
                "batch_size": loaded.batch_size}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "asr-ft"}]}

    @app.post(TRANSCRIPTIONS)
    async def transcriptions(file: Annotated[UploadFile, File()], model: Annotated[str, Form()] = "",
                             language: Annotated[str | None, Form()] = None,
                             response_format: Annotated[str, Form()] = "json",
                             prompt: Annotated[str | None, Form()] = None,
                             temperature: Annotated[float | None, Form()] = None):
        if response_format not in RESPONSE_FORMATS:
            raise ApiError(400, f"response_format {response_format!r}: expected one of {', '.join(RESPONSE_FORMATS)}",
                           "invalid_response_format", "response_format")
        if language and language.strip().lower() not in (served, language_name(served)):
            raise ApiError(400, f"language {language!r}: this model transcribes {served!r} only; leave language out "
                           f"or send {served!r}", "unsupported_language", "language")
        data = await file.read()
        try:
            samples, _ = await run_in_threadpool(load_audio, data, max_seconds=limits.max_audio_seconds)
        except AudioProblem as e:
            status = 413 if e.reason == "too_long" else 400
            message = {
                "too_long": f"the recording is longer than the server's limit of {limits.max_audio_seconds:g} s; "
                            "split it into shorter files",
                "not_audio": f"{file.filename or 'the upload'} is not audio this server can decode; send WAV, FLAC, "
                             "OGG or MP3",
            }.get(e.reason, f"{file.filename or 'the upload'}: {e}")
            raise ApiError(status, message, e.reason, "file") from None
        duration = len(samples) / SAMPLE_RATE
        spans = await run_in_threadpool(speech_spans, samples, vad)
        texts = await batcher.transcribe([samples[s.start:s.end] for s in spans]) if spans else []
        segments = normalized([Segment(s.start_s, s.end_s, t) for s, t in zip(spans, texts, strict=True)], normalize)
        metrics.audio_seconds.inc(duration)
        metrics.segments.inc(len(spans))
        text = join_texts([s.text for s in segments])
        log.info("serve: %s, %.1f s, %d segment(s) → %d characters", file.filename, duration, len(spans), len(text))
        if response_format == "json":
            return {"text": text}
        if response_format == "text":
            return PlainTextResponse(text)
        if response_format in ("srt", "vtt"):
            return PlainTextResponse(render(segments, response_format))
        return {"task": "transcribe", "language": language_name(served), "duration": round(duration, 3),
                "text": text, "segments": [{"id": i, "seek": 0, **s.as_dict()} for i, s in enumerate(segments)]}

    return app


LANGUAGE_NAMES = {"zh": "chinese", "en": "english", "yue": "cantonese", "ja": "japanese"}


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)
