"""Long recordings: speech segments of at most 30 s found by voice-activity detection, decoded in batches.

    spans = speech_spans(samples)                      # [Span(start=…, end=…), …] in samples, ≤ 30 s each
    segments = transcribe_recording(engine, samples)   # [Segment(start=1.23, end=4.56, text="…"), …]
    texts = transcribe_pieces(engine, pieces, batch_size=8)   # any ≤ 30-s clips, batched, in the input order

Every model family decodes one window of at most 30 s (Whisper's input; Kimi-Audio's Whisper front end), so a
longer recording is cut where nobody speaks. Voice activity comes from Silero VAD (the ONNX model and the
segmentation code faster-whisper ships in ``faster_whisper.vad``): speech probabilities every 32 ms, a
segment ends after ``min_silence_ms`` of silence, is padded by ``speech_pad_ms`` on each side, and a segment
longer than the window is split at its last pause of ≥ 98 ms (or, without one, just before the window's end).
A segment's timestamps are its padded bounds in the recording, in seconds.

Reads and writes nothing: audio is 16-kHz float32 mono, as :func:`common.core.audio.load_audio` returns it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.core.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

WINDOW_SECONDS = 30.0  # the models' input window (Whisper's 30-s log-mel); no segment is longer
WINDOW_SAMPLES = int(WINDOW_SECONDS * SAMPLE_RATE)  # 480000


@dataclass(frozen=True)
class VadOptions:
    """Silero VAD settings (faster-whisper's names). Defaults: a pause of 1 s ends a segment (a sentence's own
    pauses are shorter), 200 ms of audio kept on each side so no syllable is clipped."""

    threshold: float = 0.5  # speech probability above which a 32-ms frame is speech
    min_silence_ms: int = 1000  # silence that ends a segment
    speech_pad_ms: int = 200  # audio kept before and after each segment
    min_speech_ms: int = 250  # shorter bursts (a click, a cough) are dropped
    max_segment_seconds: float = WINDOW_SECONDS

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ValueError(f"VAD threshold {self.threshold}: give a speech probability between 0 and 1")
        if not 1 <= self.max_segment_seconds <= WINDOW_SECONDS:
            raise ValueError(f"max segment {self.max_segment_seconds} s: give 1 … {WINDOW_SECONDS:g} s (the model's "
                             "window)")
        if min(self.min_silence_ms, self.speech_pad_ms, self.min_speech_ms) < 0:
            raise ValueError("VAD durations must be ≥ 0 ms")


@dataclass(frozen=True)
class Span:
    """A stretch of a recording, in samples at 16 kHz: ``samples[start:end]``."""

    start: int
    end: int

    @property
    def start_s(self) -> float:
        return round(self.start / SAMPLE_RATE, 3)

    @property
    def end_s(self) -> float:
        return round(self.end / SAMPLE_RATE, 3)


@dataclass(frozen=True)
class Segment:
    """One decoded segment: start and end in seconds from the recording's start, and its text."""

    start: float
    end: float
    text: str

    def as_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "text": self.text}


def speech_spans(samples: np.ndarray, options: VadOptions = VadOptions()) -> list[Span]:
    """The speech segments of a recording (Silero VAD), each at most ``options.max_segment_seconds`` long, in
    order; none for a recording without speech."""
    from faster_whisper.vad import VadOptions as FwVadOptions
    from faster_whisper.vad import get_speech_timestamps

    if samples.size == 0:
        return []
    fw = FwVadOptions(threshold=options.threshold, min_silence_duration_ms=options.min_silence_ms,
                      speech_pad_ms=options.speech_pad_ms, min_speech_duration_ms=options.min_speech_ms,
                      max_speech_duration_s=options.max_segment_seconds)
    found = get_speech_timestamps(np.ascontiguousarray(samples, dtype=np.float32), fw, sampling_rate=SAMPLE_RATE)
    limit = int(options.max_segment_seconds * SAMPLE_RATE)
    spans = []
    for chunk in found:
        start, end = int(chunk["start"]), min(int(chunk["end"]), len(samples))
        while end - start > limit:  # padding can push a split segment a few ms past the window: cut the rest off
            spans.append(Span(start, start + limit))
            start += limit
        if end > start:
            spans.append(Span(start, end))
    return spans


def window_spans(n_samples: int, window: int = WINDOW_SAMPLES) -> list[Span]:
    """Consecutive windows of at most ``window`` samples covering the recording (no VAD)."""
    return [Span(s, min(s + window, n_samples)) for s in range(0, n_samples, window)]


def transcribe_pieces(engine: Any, pieces: Sequence[np.ndarray], *, batch_size: int = 8,
                      progress: Callable[[int], None] | None = None) -> list[str]:
    """Texts of ``pieces`` (each ≤ 30 s) in the input order, decoded ``batch_size`` at a time, longest first
    (pieces of similar length decode similar numbers of tokens)."""
    assert batch_size >= 1
    order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i]))
    texts: list[str] = [""] * len(pieces)
    for at in range(0, len(order), batch_size):
        rows = order[at:at + batch_size]
        for i, text in zip(rows, engine.transcribe([pieces[i] for i in rows]), strict=True):
            texts[i] = text
        if progress:
            progress(len(rows))
    return texts


def transcribe_recording(engine: Any, samples: np.ndarray, *, batch_size: int = 8, vad: bool = True,
                         options: VadOptions = VadOptions()) -> list[Segment]:
    """A recording of any length → its segments with timestamps and texts (segments decoded to nothing are
    left out). ``vad=False`` cuts it into consecutive 30-s windows instead."""
    spans = speech_spans(samples, options) if vad else window_spans(len(samples))
    texts = transcribe_pieces(engine, [samples[s.start:s.end] for s in spans], batch_size=batch_size)
    return [Segment(s.start_s, s.end_s, t.strip()) for s, t in zip(spans, texts, strict=True) if t.strip()]


def join_texts(texts: Sequence[str]) -> str:
    """Segment texts as one transcript: a space only where neither side of the join is Chinese/Japanese script
    or full-width punctuation (Chinese has no spaces between sentences; Latin words need one)."""
    out = ""
    for text in (t.strip() for t in texts):
        if not text:
            continue
        if out and not (_wide(out[-1]) or _wide(text[0])):
            out += " "
        out += text
    return out


def _wide(ch: str) -> bool:
    from common.core.text import is_cjk_char

    return is_cjk_char(ch) or "\u3000" <= ch <= "\u303f" or "\uff00" <= ch <= "\uffef"
