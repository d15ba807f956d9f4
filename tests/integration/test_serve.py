"""`asr-ft serve` as a real process on 127.0.0.1, answered to by real HTTP clients (a tiny random Whisper).

The official `openai` client unchanged (every response_format); 4xx with a message for oversize, overlong and
non-audio uploads; /health and /metrics; SIGTERM while a request is in flight (its body half sent, seen in
/metrics) still answers it, and the process exits 0. 50 concurrent requests run against a server whose family
(tests/integration/label_family.py, through ASRFT_FAMILIES) tells the clips apart — a random tiny Whisper gives
every clip the same text — so each answer must be its own clip's.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from long_recording import SR, espeak_clips
from test_evaluate import save_tiny_whisper
from testkit import free_port as _free_port

REPO = Path(__file__).resolve().parents[2]
N_CLIPS = 5
START_TIMEOUT = 120.0  # seconds for the server to load the model and listen (2 busy cores: usually ~5 s)
MAX_UPLOAD_MB, MAX_AUDIO_SECONDS = 1, 20


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASRFT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from common.families.whisper.ct2 import export_hf_to_ct2

    root = tmp_path_factory.mktemp("tiny")
    return export_hf_to_ct2(save_tiny_whisper(root / "hf"), root / "ct2", "float32")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    """Short recordings: a clip with half a second of silence on each side, clip i peaking at 0.2 + 0.05·i."""
    from label_family import PEAK0, PEAK_STEP

    folder = tmp_path_factory.mktemp("clips")
    paths = []
    for i, (samples, _) in enumerate(espeak_clips(N_CLIPS)):
        pad = np.zeros(SR // 2, np.float32)
        samples = samples / np.abs(samples).max() * (PEAK0 + PEAK_STEP * i)
        sf.write(folder / f"clip{i}.wav", np.concatenate([pad, samples, pad]), SR, subtype="FLOAT")
        paths.append(folder / f"clip{i}.wav")
    return paths


@pytest.fixture(scope="module")
def expected(tiny, clips) -> list[str]:
    """What `asr-ft transcribe` says for each clip with the same model and settings (in this process)."""
    from common.core.audio import load_audio
    from common.core.inference import open_model
    from common.core.segment import join_texts, transcribe_recording
    from jobs.transcribe import TranscribeSettings

    loaded = open_model(TranscribeSettings(model=str(tiny), audio=["-"], max_new_tokens=4))
    texts = [join_texts([s.text for s in transcribe_recording(loaded.engine, load_audio(p)[0])]) for p in clips]
    assert all(texts)
    return texts


def start_server(model: Path, log: Path, *extra: str, env: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.serve", str(model), "--port", str(port), "--max-new-tokens", "4",
         "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-audio-seconds", str(MAX_AUDIO_SECONDS),
         "--served-model-name", "tiny", *extra],
        cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while True:  # readiness check: poll /health until it answers, the process dies, or the deadline passes
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"serve did not answer within {START_TIMEOUT} s") from None
            time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    proc, url = start_server(tiny, tmp_path_factory.mktemp("serve") / "serve.log")
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def label_server(tmp_path_factory):
    """A server of the test family that tells the clips apart (see the module docstring)."""
    folder = tmp_path_factory.mktemp("label-model")
    env = {"ASRFT_FAMILIES": "label=label_family", "PYTHONPATH": f"{REPO}{os.pathsep}{Path(__file__).parent}"}
    proc, url = start_server(folder, folder / "serve.log", "--family", "label", env=env)
    yield url
    stop(proc)


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
              or line.startswith(name + "{")]
    return sum(values)


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="not-checked", max_retries=0, timeout=120)


def test_the_openai_client_works_unchanged(server, clips, expected):
    import srt
    import webvtt

    c = client(server)
    with open(clips[0], "rb") as f:
        result = c.audio.transcriptions.create(model="tiny", file=f)
    assert result.text == expected[0]
    with open(clips[1], "rb") as f:
        assert c.audio.transcriptions.create(model="tiny", file=f, response_format="text",
                                             language="zh").strip() == expected[1]
    with open(clips[2], "rb") as f:
        verbose = c.audio.transcriptions.create(model="tiny", file=f, response_format="verbose_json")
    assert verbose.text == expected[2] and verbose.duration == pytest.approx(sf.info(clips[2]).duration, abs=0.01)
    assert len(verbose.segments) == 1 and 0 <= verbose.segments[0].start < verbose.segments[0].end
    with open(clips[3], "rb") as f:
        (sub,) = srt.parse(c.audio.transcriptions.create(model="tiny", file=f, response_format="srt"))
    assert sub.content == expected[3]
    with open(clips[4], "rb") as f:
        vtt = webvtt.from_buffer(io.StringIO(c.audio.transcriptions.create(model="tiny", file=f,
                                                                           response_format="vtt")))
    assert [cap.text for cap in vtt.captions] == [expected[4]]
    assert [m.id for m in c.models.list()] == ["tiny"]


def test_fifty_concurrent_requests_all_answered_correctly(label_server, clips):
    c = client(label_server)
    before = {m: metric(label_server, m) for m in ("asrft_transcription_requests_total",
                                                    "asrft_transcription_batches_total")}

    def one(i: int) -> str:
        with open(clips[i % N_CLIPS], "rb") as f:
            return c.audio.transcriptions.create(model="tiny", file=f).text

    with ThreadPoolExecutor(max_workers=16) as pool:  # bounded: 16 connections at a time on loopback
        texts = list(pool.map(one, range(50)))
    assert texts == [f"clip{i % N_CLIPS}" for i in range(50)]
    assert metric(label_server, "asrft_transcription_requests_total") - before["asrft_transcription_requests_total"] == 50
    batches = metric(label_server, "asrft_transcription_batches_total") - before["asrft_transcription_batches_total"]
    assert 0 < batches <= 50
    assert metric(label_server, "asrft_transcription_requests_in_flight") == 0


def test_whisper_answers_concurrent_requests_like_transcribe(server, clips, expected):
    c = client(server)

    def one(i: int) -> str:
        with open(clips[i % N_CLIPS], "rb") as f:
            return c.audio.transcriptions.create(model="tiny", file=f).text

    with ThreadPoolExecutor(max_workers=16) as pool:
        assert list(pool.map(one, range(50))) == [expected[i % N_CLIPS] for i in range(50)]


def post(url: str, data: bytes, filename: str = "a.wav", **fields: str) -> tuple[int, dict]:
    import httpx

    r = httpx.post(url + "/v1/audio/transcriptions", files={"file": (filename, data)},
                   data={"model": "tiny", **fields}, timeout=60)
    return r.status_code, r.json()


def wav_bytes(seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, 0.1 * np.sin(np.arange(int(seconds * SR)) / 5).astype(np.float32), SR, format="WAV")
    return buf.getvalue()


@pytest.mark.parametrize("make, filename, fields, status, code, words", [
    (lambda: os.urandom(MAX_UPLOAD_MB * 2**20 + 10), "big.wav", {}, 413, "file_too_large", "larger than"),
    (lambda: wav_bytes(MAX_AUDIO_SECONDS + 5), "long.wav", {}, 413, "too_long", "longer than"),
    (lambda: b"%PDF-1.4 this is a document", "doc.pdf", {}, 400, "not_audio", "not audio"),
    (lambda: b"", "empty.wav", {}, 400, "empty_file", "0 bytes"),
    (lambda: wav_bytes(1), "a.wav", {"response_format": "docx"}, 400, "invalid_response_format", "json, text"),
    (lambda: wav_bytes(1), "a.wav", {"language": "fr"}, 400, "unsupported_language", "'zh'"),
])
def test_bad_requests_get_a_4xx_with_a_message(server, make, filename, fields, status, code, words):
    got, body = post(server, make(), filename, **fields)
    assert got == status, body
    assert body["error"]["code"] == code and words in body["error"]["message"]


def test_the_openai_client_sees_the_message(server):
    import openai

    with pytest.raises(openai.BadRequestError, match="not audio"):
        client(server).audio.transcriptions.create(model="tiny", file=("notes.txt", b"hello, not a recording"))


def test_health_and_metrics(server):
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        health = json.load(r)
    assert health == {"status": "ok", "model": "tiny", "family": "whisper", "device": "cpu", "batch_size": 8}
    post(server, wav_bytes(2.0))
    assert metric(server, "asrft_transcription_audio_seconds_total") >= 2.0
    assert metric(server, "asrft_transcription_latency_seconds_count") >= 1


def test_sigterm_answers_the_request_in_flight_then_exits_0(tiny, clips, expected, tmp_path):
    proc, url = start_server(tiny, tmp_path / "serve.log")
    try:
        boundary = "asrftboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ntiny\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"clip0.wav\"\r\n"
                "Content-Type: audio/wav\r\n\r\n").encode() + clips[0].read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=120)
        conn.putrequest("POST", "/v1/audio/transcriptions")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        conn.send(body[:1000])  # the request is in flight: headers and part of its body are there
        deadline = time.monotonic() + 60
        while metric(url, "asrft_transcription_requests_in_flight") < 1:  # the server has it (an event, no sleep)
            assert time.monotonic() < deadline, "the server never saw the request"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        conn.send(body[1000:])
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["text"] == expected[0]
        assert proc.wait(timeout=60) == 0
        log = (tmp_path / "serve.log").read_text(errors="replace")
        assert "stopped by SIGTERM" in log
    finally:
        stop(proc)
