"""`asr-ft transcribe` end to end on a tiny random Whisper (structure) and Kimi-Audio's stand-in (the seam).

A 3-minute recording made of espeak-ng Mandarin clips separated by silences: one segment per clip, each within
0.5 s of the clip's speech, in every output format (parsed back with the `srt` and `webvtt-py` packages); bad
inputs are reported and skipped; folders, globs and s3:// inputs; stdout output; settings errors.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from long_recording import SR, build_recording, espeak_clips
from test_evaluate import save_tiny_whisper

from jobs.cli import main as cli

N_CLIPS = 8
TOLERANCE = 0.5
FAST = ["--max-new-tokens", "4"]  # a random model never ends a text by itself


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
def recording(tmp_path_factory):
    rec = build_recording([c for c, _ in espeak_clips(N_CLIPS)], seconds=180.0, seed=3, noise=1e-4)
    path = tmp_path_factory.mktemp("audio") / "talk.wav"
    sf.write(path, rec.samples, SR, subtype="PCM_16")
    return path, rec


def test_three_minutes_every_format(tiny, recording, tmp_path):
    path, rec = recording
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio at all")
    out = tmp_path / "out"
    code = cli(["transcribe", str(tiny), str(path), str(bad), str(tmp_path / "missing.flac"), *FAST,
                "--format", "text", "--format", "jsonl", "--format", "srt,vtt", "--output-dir", str(out)])
    assert code == 1  # two inputs skipped, the recording transcribed
    assert sorted(p.name for p in out.iterdir()) == ["talk.srt", "talk.txt", "talk.vtt", "transcripts.jsonl"]

    import srt
    import webvtt

    subs = list(srt.parse((out / "talk.srt").read_text(encoding="utf-8")))
    assert len(subs) == N_CLIPS
    for sub, (start, end) in zip(subs, rec.truth, strict=True):
        assert abs(sub.start.total_seconds() - start) <= TOLERANCE, (sub, start)
        assert abs(sub.end.total_seconds() - end) <= TOLERANCE, (sub, end)
        assert sub.content.strip()
    vtt = webvtt.read(str(out / "talk.vtt"))
    assert [c.text for c in vtt.captions] == [s.content for s in subs]
    assert [c.start[:8] for c in vtt.captions] == [srt.timedelta_to_srt_timestamp(s.start)[:8] for s in subs]
    (line,) = (out / "transcripts.jsonl").read_text(encoding="utf-8").splitlines()
    row = json.loads(line)
    assert row["audio"] == str(path) and row["duration"] == pytest.approx(180.0, abs=0.01)
    assert [s["text"] for s in row["segments"]] == [s.content for s in subs]
    assert (out / "talk.txt").read_text(encoding="utf-8").strip() == row["text"]


def test_bad_inputs_are_named_in_the_log(tiny, recording, tmp_path, caplog):
    path, _ = recording
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    code = cli(["transcribe", str(tiny), str(empty), str(tmp_path / "nothing" / "*.wav"), *FAST,
                "--output-dir", str(tmp_path / "o")])
    assert code == 1
    text = caplog.text
    assert "empty.wav" in text and "empty_file" in text
    assert "no file matches this pattern" in text


def test_folders_globs_and_stdout(tiny, recording, tmp_path, capsys):
    path, rec = recording
    short = rec.samples[int((rec.truth[0][0] - 1) * SR):int((rec.truth[1][1] + 1) * SR)]  # the first two clips
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    sf.write(folder / "a.wav", short, SR)
    sf.write(folder / "sub" / "b.flac", short, SR)
    (folder / "readme.txt").write_text("not a recording")
    out = tmp_path / "out"
    assert cli(["transcribe", str(tiny), str(folder), str(folder / "*.wav"), *FAST, "--format", "jsonl",
                "--output-dir", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "transcripts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [Path(r["audio"]).name for r in rows] == ["a.wav", "b.flac", "a.wav"]
    assert all(len(r["segments"]) == 2 for r in rows)
    assert rows[0]["segments"] == rows[1]["segments"]  # the same audio as WAV and FLAC

    capsys.readouterr()
    assert cli(["transcribe", str(tiny), str(folder / "a.wav"), *FAST]) == 0
    assert capsys.readouterr().out.strip() == rows[0]["text"]


def test_s3_inputs(tiny, recording, tmp_path, s3_server):
    from testkit import S3_TEST_CREDENTIALS

    from common.core.settings import S3Settings
    from common.core.store import make_s3_client

    path, rec = recording
    s3 = S3Settings(endpoint_url=s3_server, **S3_TEST_CREDENTIALS)
    client = make_s3_client(s3)
    client.create_bucket(Bucket="transcribe-inputs")
    short = io.BytesIO()
    sf.write(short, rec.samples[: int((rec.truth[0][1] + 1) * SR)], SR, format="WAV")
    client.put_object(Bucket="transcribe-inputs", Key="calls/one.wav", Body=short.getvalue())
    out = tmp_path / "out"
    flags = ["--s3-endpoint-url", s3_server, "--s3-access-key-id", "testing", "--s3-secret-access-key", "testing",
             "--s3-region", "us-east-1"]
    assert cli(["transcribe", str(tiny), "s3://transcribe-inputs/calls/", *FAST, *flags, "--format", "jsonl",
                "--output-dir", str(out)]) == 0
    (row,) = [json.loads(x) for x in (out / "transcripts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert row["audio"] == "s3://transcribe-inputs/calls/one.wav" and len(row["segments"]) == 1


@pytest.mark.parametrize("args, message", [
    (["--format", "docx"], "expected one or more of text, jsonl, srt, vtt"),
    (["--format", "srt", "--format", "vtt"], "need --output-dir"),
    (["--normalize", "loud"], "expected one of none, simplified, scoring"),
])
def test_settings_errors_say_what_to_do(tiny, recording, args, message, capsys):
    assert cli(["transcribe", str(tiny), str(recording[0]), *args]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_model_is_a_clear_error(tmp_path, recording, caplog):
    assert cli(["transcribe", str(tmp_path / "no-model"), str(recording[0])]) == 2
    assert "no such folder" in caplog.text


def test_kimi_audio_standin_runs_through_transcribe(recording, tmp_path):
    """The seam: the Kimi-Audio family's engine behind the same command (random stand-in: texts mean nothing)."""
    path, rec = recording
    short = rec.samples[int((rec.truth[0][0] - 1) * SR):int((rec.truth[1][1] + 1) * SR)]
    sf.write(tmp_path / "two.wav", short, SR)
    out = tmp_path / "out"
    assert cli(["transcribe", "bundled:kimi-audio-tiny", str(tmp_path / "two.wav"), "--max-new-tokens", "4",
                "--format", "jsonl", "--output-dir", str(out)]) == 0
    (row,) = [json.loads(x) for x in (out / "transcripts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(row["segments"]) == 2
    first = rec.truth[0][0] - (rec.truth[0][0] - 1)
    assert abs(row["segments"][0]["start"] - first) <= TOLERANCE
    assert np.all(np.diff([s["start"] for s in row["segments"]]) > 0)


def test_evaluate_scores_a_long_recording_per_recording(tiny, recording, tmp_path):
    path, rec = recording
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "talk.wav").write_bytes(path.read_bytes())
    sf.write(audio / "short.wav", rec.samples[int((rec.truth[0][0] - 0.5) * SR):int((rec.truth[0][1] + 0.5) * SR)], SR)
    texts = [t for _, t in espeak_clips(N_CLIPS)]
    (tmp_path / "test.csv").write_text(f"audio_id,text\ntalk,{''.join(texts)}\nshort,{texts[0]}\n", encoding="utf-8")
    assert cli(["evaluate", "--model", f"tiny={tiny}", "--test-csv", str(tmp_path / "test.csv"), "--test-audio-dir",
                str(audio), "--max-new-tokens", "4", "--run-id", "long", "--artifacts", str(tmp_path / "runs")]) == 0
    out = tmp_path / "runs" / "long" / "evaluate"
    rows = {r["id"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines())}
    assert (rows["talk"]["segments"], rows["short"]["segments"]) == (N_CLIPS, 1)
    assert rows["talk"]["duration"] == pytest.approx(180.0, abs=0.01)
    assert (out / "rejected.jsonl").read_text() == ""


@pytest.mark.slow
def test_whisper_base_on_real_speech_matches_evaluate(real_zh_dev):
    """Content: 15 real clips in a 3-minute recording, transcribed with bundled:whisper-base, against the same
    clips decoded one by one as evaluate does — the same order, one segment per clip, CER within 2 points."""
    from long_recording import real_clips

    from common.core.inference import open_model
    from common.core.metrics import aggregate
    from common.core.segment import join_texts, transcribe_recording
    from jobs.transcribe import TranscribeSettings

    clips = real_clips(real_zh_dev, 15)
    rec = build_recording([c for _, c, _ in clips], seconds=180.0, seed=5)
    loaded = open_model(TranscribeSettings(model="bundled:whisper-base", audio=["-"]))
    alone = loaded.engine.transcribe([c for _, c, _ in clips][:8]) + loaded.engine.transcribe(
        [c for _, c, _ in clips][8:])
    segments = transcribe_recording(loaded.engine, rec.samples, batch_size=loaded.batch_size)

    placed = []  # each clip's whole extent in the recording (real clips carry their own silences)
    for (start, _), (_, c, _) in zip(rec.truth, clips, strict=True):
        placed.append((start, start + len(c) / SR))
    owner = [next(i for i, (a, b) in enumerate(placed) if s.start >= a - TOLERANCE and s.end <= b + TOLERANCE)
             for s in segments]
    assert owner == sorted(owner) and sorted(set(owner)) == list(range(len(clips)))  # in order, every clip
    assert len(segments) == len(clips)
    texts = [join_texts([s.text for s, o in zip(segments, owner, strict=True) if o == i]) for i in range(len(clips))]
    evaluate_cer = aggregate([{"reference": r, "hypothesis": h} for (_, _, r), h in zip(clips, alone, strict=True)])
    transcribe_cer = aggregate([{"reference": r, "hypothesis": h} for (_, _, r), h in zip(clips, texts, strict=True)])
    print(f"CER: clip by clip (evaluate) {evaluate_cer['cer']:.4f}, 3-minute recording (transcribe) "
          f"{transcribe_cer['cer']:.4f}")
    assert abs(transcribe_cer["cer"] - evaluate_cer["cer"]) <= 0.02, (transcribe_cer["cer"], evaluate_cer["cer"])
    assert transcribe_cer["cer"] < 0.5  # whisper-base reads real Mandarin (about 30 % CER on this set)
