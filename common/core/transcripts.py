"""A recording's segments as text, JSON, SRT or WebVTT, with the report's Chinese normalisation if asked.

    segments = [Segment(0.52, 3.1, "你好。"), Segment(5.0, 7.25, "今天天气很好。")]
    render(segments, "srt")               # "1\\n00:00:00,520 --> 00:00:03,100\\n你好。\\n\\n2\\n…"
    render(segments, "vtt")               # "WEBVTT\\n\\n00:00:00.520 --> 00:00:03.100\\n你好。\\n…"
    render(segments, "text")              # "你好。今天天气很好。\\n"
    record("a.wav", 7.4, segments)        # {"audio": "a.wav", "duration": 7.4, "text": …, "segments": [...]}
    normalizer("simplified")("這是")       # "这是"

SRT is written with the ``srt`` package and WebVTT with ``webvtt-py`` (both parse what they write back).
Normalisation (``--normalize``): ``none`` (the model's text), ``simplified`` (Unicode NFKC + traditional →
simplified Chinese, punctuation kept: to read) or ``scoring`` (exactly what the evaluation report scores:
also lower case, punctuation and spaces removed; see :mod:`common.core.text`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Literal

from common.core.segment import Segment, join_texts

Format = Literal["text", "jsonl", "srt", "vtt"]
FORMATS: tuple[str, ...] = ("text", "jsonl", "srt", "vtt")
EXTENSIONS = {"text": "txt", "jsonl": "jsonl", "srt": "srt", "vtt": "vtt"}
Normalize = Literal["none", "simplified", "scoring"]
NORMALIZE: tuple[str, ...] = ("none", "simplified", "scoring")


def normalizer(name: str) -> Callable[[str], str]:
    from common.core import text

    return {"none": lambda t: t, "simplified": text.simplified, "scoring": text.normalize}[name]


def normalized(segments: Sequence[Segment], name: str) -> list[Segment]:
    """The segments with their texts normalised; segments left empty are dropped."""
    norm = normalizer(name)
    out = [dataclasses.replace(s, text=norm(s.text).strip()) for s in segments]
    return [s for s in out if s.text]


def _vtt_time(seconds: float) -> str:
    ms = round(seconds * 1000)
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    return f"{h:02d}:{m:02d}:{rest // 1000:02d}.{rest % 1000:03d}"


def _one_line(text: str) -> str:
    """A cue's text on one line: a blank line would end the cue, and ``-->`` would start a new one."""
    return " ".join(text.split()).replace("-->", "→")


def as_srt(segments: Sequence[Segment]) -> str:
    import srt

    return srt.compose([srt.Subtitle(i, timedelta(seconds=s.start), timedelta(seconds=s.end), _one_line(s.text))
                        for i, s in enumerate(segments, 1)], reindex=False)


def as_vtt(segments: Sequence[Segment]) -> str:
    import webvtt

    vtt = webvtt.WebVTT()
    for s in segments:
        vtt.captions.append(webvtt.Caption(_vtt_time(s.start), _vtt_time(s.end), _one_line(s.text)))
    return vtt.content


def record(audio: str, duration: float, segments: Sequence[Segment]) -> dict[str, Any]:
    """One recording as a JSON object: its source, duration (s), whole text and timed segments."""
    return {"audio": audio, "duration": round(duration, 3), "text": join_texts([s.text for s in segments]),
            "segments": [s.as_dict() for s in segments]}


def render(segments: Sequence[Segment], fmt: str, *, audio: str = "", duration: float = 0.0) -> str:
    """The text of one recording's output file in ``fmt`` (text, jsonl, srt, vtt)."""
    import json

    if fmt == "text":
        return join_texts([s.text for s in segments]) + "\n"
    if fmt == "jsonl":
        return json.dumps(record(audio, duration, segments), ensure_ascii=False) + "\n"
    if fmt == "srt":
        return as_srt(segments)
    if fmt == "vtt":
        return as_vtt(segments)
    raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
