"""Long recordings for the transcribe/serve tests: clips placed in silence, with where each clip's speech is.

    rec = build_recording(clips, seconds=180.0, seed=0)   # Recording(samples, truth=[(start_s, end_s), ...])
    clips = espeak_clips(10)                               # (samples, text) of Mandarin demo speech (espeak-ng)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SR = 16_000
SPEECH_LEVEL = 1e-3  # a sample above this (-60 dBFS) is part of a clip's speech, for the truth


@dataclass
class Recording:
    samples: np.ndarray
    truth: list[tuple[float, float]]  # per clip: first and last sample above SPEECH_LEVEL, in seconds

    @property
    def seconds(self) -> float:
        return len(self.samples) / SR


def build_recording(clips: list[np.ndarray], seconds: float, seed: int = 0, noise: float = 0.0) -> Recording:
    """The clips in order, separated by silences of random lengths (≥ 2 s) that fill ``seconds`` in all."""
    speech = sum(len(c) for c in clips)
    room = int(seconds * SR) - speech
    assert room >= 2 * SR * (len(clips) + 1), "not enough room for 2-s silences"
    rng = np.random.default_rng(seed)
    weights = rng.uniform(1.0, 2.0, len(clips) + 1)
    gaps = (2 * SR + (room - 2 * SR * (len(clips) + 1)) * weights / weights.sum()).astype(int)
    parts, truth, pos = [], [], 0
    for gap, clip in zip(gaps, clips, strict=False):
        parts.append(np.zeros(gap, np.float32))
        pos += gap
        loud = np.flatnonzero(np.abs(clip) > SPEECH_LEVEL)
        truth.append(((pos + loud[0]) / SR, (pos + loud[-1]) / SR))
        parts.append(clip.astype(np.float32))
        pos += len(clip)
    parts.append(np.zeros(int(seconds * SR) - pos, np.float32))
    samples = np.concatenate(parts)
    if noise:
        samples = samples + noise * rng.standard_normal(samples.size).astype(np.float32)
    return Recording(samples, truth)


def espeak_clips(n: int) -> list[tuple[np.ndarray, str]]:
    """``n`` Mandarin demo sentences spoken by espeak-ng (16 kHz float32) with their texts."""
    from common.core import demo_data

    pool = demo_data.sentence_pool()[:n]
    clips = [demo_data.synthesize(demo_data.plan_clip(s, i)) for i, s in enumerate(pool)]  # int16 samples
    return [(c.astype(np.float32) / 32768, s.text) for c, s in zip(clips, pool, strict=True)]


def real_clips(folder, n: int) -> list[tuple[str, np.ndarray, str]]:
    """The first ``n`` clips of a real Mandarin dev set (``transcripts.csv`` + ``audio/``): (id, samples, text)."""
    import csv
    from pathlib import Path

    from common.core.audio import load_audio

    folder = Path(folder)
    with open(folder / "transcripts.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    return [(r["audio_id"], load_audio(folder / "audio" / f"{r['audio_id']}.wav")[0], r["text"]) for r in rows]
