"""Long recordings → VAD segments (common/core/segment.py) and their output formats (common/core/transcripts.py).

The recordings are Mandarin demo sentences spoken by espeak-ng, placed in silence: the truth is where each clip's
speech lies. The engine here is a stand-in that names the clip a segment holds (by its peak level), so the order
of texts after batched, longest-first decoding is checked without a model.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from long_recording import SR, build_recording, espeak_clips

from common.core.segment import (
    WINDOW_SECONDS,
    Segment,
    VadOptions,
    join_texts,
    speech_spans,
    transcribe_pieces,
    transcribe_recording,
    window_spans,
)
from common.core.transcripts import normalized, record, render

N_CLIPS = 10
TOLERANCE = 0.5  # seconds between a segment's bound and the clip's speech


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    """Each clip scaled to its own peak level 0.2 + 0.05·i, which names it."""
    out = []
    for i, (samples, _) in enumerate(espeak_clips(N_CLIPS)):
        out.append((samples / np.abs(samples).max() * (0.2 + 0.05 * i)).astype(np.float32))
    return out


class PeakEngine:
    """Names the clip in each segment by its peak level; records the batches it was given."""

    info = {"backend": "test"}

    def __init__(self):
        self.batches: list[int] = []

    def transcribe(self, audios):
        self.batches.append(len(audios))
        return [f"c{round((np.abs(a).max() - 0.2) / 0.05)}" for a in audios]


def test_three_minutes_give_one_segment_per_clip_at_the_right_time(clips):
    rec = build_recording(clips, seconds=180.0, seed=1)
    spans = speech_spans(rec.samples)
    assert len(spans) == N_CLIPS
    for span, (start, end) in zip(spans, rec.truth, strict=True):
        assert abs(span.start_s - start) <= TOLERANCE and abs(span.end_s - end) <= TOLERANCE, (span, start, end)
        assert span.end - span.start <= WINDOW_SECONDS * SR


def test_texts_come_back_in_the_recording_order(clips):
    rec = build_recording(clips, seconds=180.0, seed=2)
    engine = PeakEngine()
    segments = transcribe_recording(engine, rec.samples, batch_size=3)
    assert [s.text for s in segments] == [f"c{i}" for i in range(N_CLIPS)]
    assert engine.batches == [3, 3, 3, 1]  # batched, not one by one
    assert all(a.end <= b.start for a, b in zip(segments, segments[1:], strict=False))


def test_speech_longer_than_the_window_is_cut_into_segments_of_at_most_30_s(clips):
    gap = np.zeros(int(0.15 * SR), np.float32)  # pauses far shorter than a segment-ending silence
    speech = np.concatenate([x for c in clips * 4 for x in (c, gap)])
    assert len(speech) / SR > 2 * WINDOW_SECONDS
    spans = speech_spans(speech)
    assert len(spans) >= 3
    assert all(0 < s.end - s.start <= WINDOW_SECONDS * SR for s in spans)
    covered = sum(s.end - s.start for s in spans)
    assert covered >= 0.9 * len(speech)  # nothing of the speech is lost


@pytest.mark.parametrize("samples", [np.zeros(0, np.float32), np.zeros(20 * SR, np.float32),
                                     (1e-4 * np.random.default_rng(0).standard_normal(20 * SR)).astype(np.float32)])
def test_no_speech_no_segment(samples):
    assert speech_spans(samples) == []
    assert transcribe_recording(PeakEngine(), samples) == []


def test_without_vad_the_recording_is_cut_into_30_s_windows():
    assert [(s.start, s.end) for s in window_spans(70 * SR)] == [(0, 30 * SR), (30 * SR, 60 * SR), (60 * SR, 70 * SR)]


def test_pieces_are_decoded_longest_first_and_returned_in_the_input_order():
    seen = []

    class LengthEngine:
        def transcribe(self, audios):
            seen.append([len(a) for a in audios])
            return [str(len(a)) for a in audios]

    pieces = [np.zeros(n, np.float32) for n in (5, 9, 1, 7, 3)]
    assert transcribe_pieces(LengthEngine(), pieces, batch_size=2) == ["5", "9", "1", "7", "3"]
    assert seen == [[9, 7], [5, 3], [1]]


@pytest.mark.parametrize("options, problem", [
    ({"threshold": 1.5}, "threshold"), ({"max_segment_seconds": 45}, "max segment"), ({"speech_pad_ms": -1}, "≥ 0"),
])
def test_vad_options_are_checked(options, problem):
    with pytest.raises(ValueError, match=problem):
        VadOptions(**options)


@pytest.mark.parametrize("texts, joined", [
    (["你好。", "今天天气很好。"], "你好。今天天气很好。"),
    (["hello", "world"], "hello world"),
    (["我用", "iPhone", "打电话"], "我用iPhone打电话"),
    (["", " 好 ", ""], "好"),
])
def test_join_texts(texts, joined):
    assert join_texts(texts) == joined


SEGMENTS = [Segment(0.52, 3.1, "這是第一句。"), Segment(65.0, 3671.25, "second line\n\nwith --> arrow"),
            Segment(3700.0, 3702.5, "ＡＢＣ，好")]


def test_srt_parses_back_with_the_srt_package():
    import srt

    subs = list(srt.parse(render(SEGMENTS, "srt")))
    assert [(s.index, s.start.total_seconds(), s.end.total_seconds()) for s in subs] == [
        (1, 0.52, 3.1), (2, 65.0, 3671.25), (3, 3700.0, 3702.5)]
    assert subs[1].content == "second line with → arrow"


def test_webvtt_parses_back_with_webvtt_py():
    import webvtt

    vtt = webvtt.from_buffer(io.StringIO(render(SEGMENTS, "vtt")))
    assert [(c.start, c.end, c.text) for c in vtt.captions] == [
        ("00:00:00.520", "00:00:03.100", "這是第一句。"), ("00:01:05.000", "01:01:11.250", "second line with → arrow"),
        ("01:01:40.000", "01:01:42.500", "ＡＢＣ，好")]


def test_jsonl_and_text():
    line = json.loads(render(SEGMENTS[:1], "jsonl", audio="a.wav", duration=4.0))
    assert line == {"audio": "a.wav", "duration": 4.0, "text": "這是第一句。",
                    "segments": [{"start": 0.52, "end": 3.1, "text": "這是第一句。"}]}
    assert render(SEGMENTS[:1], "text") == "這是第一句。\n"
    assert record("b.wav", 1.0, [])["text"] == ""


@pytest.mark.parametrize("name, texts", [
    ("none", ["這是第一句。", "second line\n\nwith --> arrow", "ＡＢＣ，好"]),
    ("simplified", ["这是第一句。", "second line\n\nwith --> arrow", "ABC,好"]),
    ("scoring", ["这是第1句", "secondlinewitharrow", "abc好"]),  # numbers read as digits, as the report scores
])
def test_normalisation_matches_the_report(name, texts):
    from common.core.text import normalize

    assert [s.text for s in normalized(SEGMENTS, name)] == texts
    if name == "scoring":
        assert texts == [normalize(s.text) for s in SEGMENTS]


def test_evaluate_decodes_a_long_recording_as_its_segments(clips, tmp_path):
    """transcribe_utterances (the evaluate stage's loop): a recording over 30 s is one row, its segments' texts
    joined in order; a short clip beside it is decoded whole."""
    import soundfile as sf

    from common.core.transcribe import Utterance, transcribe_utterances

    rec = build_recording(clips, seconds=180.0, seed=4)
    sf.write(tmp_path / "long.wav", rec.samples, SR, subtype="FLOAT")
    sf.write(tmp_path / "short.wav", clips[3], SR, subtype="FLOAT")
    engine = PeakEngine()
    rows = transcribe_utterances(engine, [Utterance("long", "ref", str(tmp_path / "long.wav")),
                                          Utterance("short", "ref", str(tmp_path / "short.wav"))], batch_size=4)
    assert [(r["id"], r["hypothesis"], r["segments"]) for r in rows] == [
        ("long", " ".join(f"c{i}" for i in range(N_CLIPS)), N_CLIPS), ("short", "c3", 1)]
    assert rows[0]["duration"] == pytest.approx(180.0)
    assert max(engine.batches) <= 4
