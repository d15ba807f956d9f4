"""Transcribing a set of utterances with any model family's engine, batch by batch.

    rows = transcribe_utterances(engine, utterances, batch_size=8, progress=bar.update)

An engine (a family's, see common/families/) turns a batch of 16-kHz float32 clips into texts; it carries
``info`` (what ran: backend, device, dtype, …, and ``comparable``: the settings that must be equal across
the models of one evaluation, such as prompt tokens). Every model of a run gets the same utterances in the
same batches, so a comparison measures the models and nothing else.

Long recordings: an utterance longer than one model window (30 s) is split at pauses by voice-activity
detection (:mod:`common.core.segment`, as ``asr-ft transcribe`` does), its segments decoded in the same
batches, and their texts joined into the utterance's one hypothesis; its row says how many ``segments``.

Timing: ``decode_seconds`` of an utterance is its share of its batch's wall time (feature extraction,
voice-activity detection for long recordings, encoder and decoder; audio file reading excluded), split in
proportion to the utterances' durations.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)


class Engine(Protocol):
    info: dict[str, Any]

    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]: ...



def cpu_threads() -> int:
    """Cores this process may use (cgroup/affinity aware when the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1



@dataclass
class Utterance:
    id: str
    reference: str
    audio: str  # local path of the audio file
    duration: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)



def _batches(items: Sequence[Utterance], size: int) -> Iterator[list[Utterance]]:
    # Longest first: clips of similar length decode similar numbers of tokens, so a batch waits less
    # for its longest hypothesis (every clip is padded to 30 s, so the encoder cost is the same).
    ordered = sorted(items, key=lambda u: -(u.duration or 0.0))
    for i in range(0, len(ordered), size):
        yield ordered[i:i + size]



def transcribe_utterances(
    engine: Engine,
    utterances: Sequence[Utterance],
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Transcribe ``utterances`` in batches; rows ``{id, reference, hypothesis, duration, decode_seconds,
    segments}`` in the input order. An audio file that cannot be read gives a row with ``error`` (and no
    hypothesis). Recordings longer than 30 s are decoded as their VAD segments (see the module docstring)."""
    from common.core.audio import SAMPLE_RATE, AudioProblem, load_audio

    rows: dict[str, dict[str, Any]] = {}
    for batch in _batches(utterances, batch_size):
        audios, ok = [], []
        for u in batch:
            try:
                samples, _ = load_audio(u.audio)
            except (AudioProblem, OSError) as e:
                rows[u.id] = {"id": u.id, "error": f"{getattr(e, 'reason', 'unreadable')}: {e}"}
                continue
            u.duration = u.duration if u.duration is not None else round(len(samples) / SAMPLE_RATE, 4)
            audios.append(samples)
            ok.append(u)
        if ok:
            t0 = time.perf_counter()
            texts, counts = _decode(engine, audios, batch_size)
            seconds = time.perf_counter() - t0
            total = sum(u.duration or 0.0 for u in ok) or float(len(ok))
            for u, text, count in zip(ok, texts, counts, strict=True):
                share = (u.duration or 0.0) / total if total else 1 / len(ok)
                rows[u.id] = {"id": u.id, "reference": u.reference, "hypothesis": text,
                              "duration": u.duration, "decode_seconds": round(seconds * share, 6),
                              "segments": count, **u.extra}
        if progress:
            progress(len(batch))
    return [rows[u.id] for u in utterances]




def _decode(engine: Engine, audios: list[np.ndarray], batch_size: int) -> tuple[list[str], list[int]]:
    """Texts of whole clips; a clip longer than the window is decoded as its VAD segments, texts joined.
    Returns (texts, segments per clip)."""
    from common.core.segment import WINDOW_SAMPLES, join_texts, speech_spans, transcribe_pieces

    if all(len(a) <= WINDOW_SAMPLES for a in audios):
        return engine.transcribe(audios), [1] * len(audios)
    pieces: list[np.ndarray] = []
    owner: list[int] = []
    for i, audio in enumerate(audios):
        parts = [audio] if len(audio) <= WINDOW_SAMPLES else [audio[s.start:s.end] for s in speech_spans(audio)]
        pieces += parts
        owner += [i] * len(parts)
    texts = transcribe_pieces(engine, pieces, batch_size=batch_size)
    grouped: list[list[str]] = [[] for _ in audios]
    for i, text in zip(owner, texts, strict=True):
        grouped[i].append(text)
    return [join_texts(g) for g in grouped], [owner.count(i) for i in range(len(audios))]
