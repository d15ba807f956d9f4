"""Transcribing a set of utterances with any model family's engine, batch by batch.

    rows = transcribe_utterances(engine, utterances, batch_size=8, progress=bar.update)

An engine (a family's, see common/families/) turns a batch of 16-kHz float32 clips into texts; it carries
``info`` (what ran: backend, device, dtype, …, and ``comparable``: the settings that must be equal across
the models of one evaluation, such as prompt tokens). Every model of a run gets the same utterances in the
same batches, so a comparison measures the models and nothing else.

Timing: ``decode_seconds`` of an utterance is its share of its batch's wall time (feature extraction,
encoder and decoder; audio file reading excluded), split in proportion to the utterances' durations.
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
    """Transcribe ``utterances`` in batches; rows ``{id, reference, hypothesis, duration, decode_seconds}``
    in the input order. An audio file that cannot be read gives a row with ``error`` (and no hypothesis)."""
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
            texts = engine.transcribe(audios)
            seconds = time.perf_counter() - t0
            total = sum(u.duration or 0.0 for u in ok) or float(len(ok))
            for u, text in zip(ok, texts, strict=True):
                share = (u.duration or 0.0) / total if total else 1 / len(ok)
                rows[u.id] = {"id": u.id, "reference": u.reference, "hypothesis": text,
                              "duration": u.duration, "decode_seconds": round(seconds * share, 6), **u.extra}
        if progress:
            progress(len(batch))
    return [rows[u.id] for u in utterances]

