"""The prepare stage end to end on a messy data set built here: every rejection reason, awkward-but-valid
audio, both split modes, resume by manifest, --force, a data set with no good row, and audio on S3."""

from __future__ import annotations

import codecs
import json
import os
import shutil
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
import soundfile as sf

from common.core.dataset import REASONS
from common.core.records import read_jsonl, transcript
from common.core.settings import S3Settings
from common.core.store import open_store
from jobs.prepare import duration_bin_labels, duration_histogram, split_by_ratio
from jobs.prepare.__main__ import main

SR_OUT = 16_000


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in list(os.environ):
        if var.startswith("ASRFT_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("ASRFT_CACHE", str(tmp_path / "cache"))


def tone(seconds: float, sr: int, amp: float = 0.5, freq: float = 330.0, channels: int = 1) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    mono = (amp * np.sin(2 * np.pi * freq * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t)) / 1.3).astype(np.float32)
    if channels == 1:
        return mono
    return np.stack([mono * (1 + 0.5 * c) / 1.25 for c in range(channels)], axis=1)  # channels differ in level


def write(path: Path, samples: np.ndarray, sr: int, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, sr, **kw)
    return path


# Good rows: id in the CSV → (file, seconds, source rate, channels, kwargs for soundfile, transcript).
GOOD_TRAIN = {
    "stereo44k": ("stereo44k.wav", 1.5, 44100, 2, {"subtype": "PCM_16"}, "這是一個篇章"),  # traditional kept raw
    "tel8k": ("tel8k.wav", 1.2, 8000, 1, {"subtype": "PCM_16"}, "你好世界"),
    "float32.wav": ("float32.wav", 1.0, 16000, 1, {"subtype": "FLOAT"}, "浮点音频"),  # id with extension
    "pcm24": ("pcm24.wav", 2.0, 48000, 1, {"subtype": "PCM_24"}, "二十四位"),
    "lossless": ("lossless.flac", 1.1, 22050, 1, {}, "无损压缩，格式。"),
    "spk1/nested": ("spk1/nested.wav", 0.8, 16000, 1, {"subtype": "PCM_16"}, "子目录"),
    "UPPER": ("UPPER.WAV", 0.6, 11025, 1, {"subtype": "PCM_U8"}, "八位"),
    "loud_float": ("loud_float.wav", 0.9, 16000, 1, {"subtype": "FLOAT"}, "太响了"),  # peak 1.6 → scaled
}
GOOD_TEST = {
    "t_good": ("t_good.wav", 1.3, 16000, 1, {"subtype": "PCM_16"}, "测试一"),
    "t_flac": ("t_flac.flac", 1.0, 44100, 2, {}, "測試二"),
}
# Bad rows: what the CSV line says → expected reason.
BAD_TRAIN = {
    "path_up": ("../outside", "外面", "path_escape"),
    "path_abs": ("/etc/hostname", "绝对路径", "path_escape"),
    "path_link": ("link_out", "链接", "path_escape"),
    "dup_id": ("tel8k", "重复的编号", "duplicate_id"),
    "dup_id_ext": ("tel8k.wav", "也重复", "duplicate_id"),
    "empty_text": ("has_audio1", "   ", "empty_text"),
    "punct": ("has_audio2", "。。。！", "punctuation_only_text"),
    "missing": ("nowhere", "没有文件", "missing_file"),
    "zero": ("zero", "零字节", "empty_file"),
    "text_file": ("notes", "不是音频", "not_audio"),
    "corrupt": ("corrupt", "坏文件", "corrupt_audio"),
    "m4a": ("phone", "手机录音", "corrupt_audio"),  # an MP4 header and zeros: FFmpeg cannot decode it
    "nan": ("nan", "非数", "non_finite_samples"),
    "short": ("short", "短", "too_short"),
    "long": ("long", "太长了", "too_long"),
    "silent": ("silent", "安静", "silent"),
    "rate": ("half_second", "这句话的文字远远多于半秒钟之内能够说出来的字数，肯定是别的音频的转写", "text_too_long_for_duration"),
    "copy": ("copy_of_tel8k", "复制的音频", "duplicate_audio"),
}


def build_messy(root: Path) -> dict[str, Path]:
    audio, test_audio = root / "audio", root / "test_audio"
    for utt, (name, seconds, sr, ch, kw, _) in GOOD_TRAIN.items():
        amp = 1.6 if utt == "loud_float" else 0.5
        write(audio / name, tone(seconds, sr, amp=amp, channels=ch), sr, **kw)
    for name, seconds, sr, ch, kw, _ in GOOD_TEST.values():
        write(test_audio / name, tone(seconds, sr, freq=550, channels=ch), sr, **kw)
    write(audio / "has_audio1.wav", tone(1.0, 16000, freq=200), 16000)
    write(audio / "has_audio2.wav", tone(1.0, 16000, freq=250), 16000)
    (audio / "zero.wav").write_bytes(b"")
    (audio / "notes.wav").write_text("这不是音频文件, just some notes\n" * 20)
    (audio / "corrupt.wav").write_bytes(b"RIFF\x00\x10\x00\x00WAVEfmt " + bytes(range(256)) * 8)
    (audio / "phone.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00" + b"\x00" * 2000)
    nan = tone(1.0, 16000)
    nan[1234] = np.nan
    write(audio / "nan.wav", nan, 16000, subtype="FLOAT")
    write(audio / "short.wav", tone(0.05, 16000), 16000)
    write(audio / "long.wav", tone(31.0, 8000), 8000)
    write(audio / "silent.wav", np.zeros(16000, np.float32), 16000)
    write(audio / "half_second.wav", tone(0.5, 16000, freq=700), 16000)
    shutil.copyfile(audio / "tel8k.wav", audio / "copy_of_tel8k.wav")
    (root / "outside.wav").write_bytes((audio / "has_audio1.wav").read_bytes())
    os.symlink(root / "outside.wav", audio / "link_out.wav")
    shutil.copyfile(audio / "pcm24.wav", test_audio / "leak.wav")  # a train clip again in test

    lines = ["audio_id,text"]
    lines += [f"{utt},{text}" for utt, (*_, text) in GOOD_TRAIN.items()]
    lines += [f"{raw},{text}" for raw, text, _ in BAD_TRAIN.values()]
    lines += ["too,many,fields", 'stray,"quote', ",无编号"]  # malformed: 3 fields, unterminated quote, empty id
    train = codecs.BOM_UTF8 + "\r\n".join(lines).encode("utf-8") + b"\r\n"
    train += "gbk_row,你好\r\n".encode("gbk")  # malformed: not UTF-8
    (root / "train.csv").write_bytes(train)

    test_lines = ["file,sentence"]  # other column names, no BOM, LF
    test_lines += [f"{utt},{text}" for utt, (*_, text) in GOOD_TEST.items()]
    test_lines += ["lossless,训练集里的编号", "leak,泄漏"]  # duplicate_id across splits; duplicate_audio
    (root / "answers.csv").write_text("\n".join(test_lines) + "\n", encoding="utf-8")
    return {"root": root, "train": root / "train.csv", "audio": audio, "test": root / "answers.csv",
            "test_audio": test_audio}


MALFORMED_LINES = 3  # plus the GBK line
EXPECTED_TEST_REJECTS = {"lossless": "duplicate_id", "leak": "duplicate_audio"}


def run(data: dict, artifacts: Path | str, run_id: str, *extra: str) -> int:
    return main(["--train-csv", str(data["train"]), "--audio-dir", str(data["audio"]),
                 "--artifacts", str(artifacts), "--run-id", run_id, *extra])


def two_csv_flags(data: dict) -> list[str]:
    return ["--test-csv", str(data["test"]), "--test-audio-dir", str(data["test_audio"])]


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> dict:
    return build_messy(tmp_path_factory.mktemp("messy"))


@pytest.fixture(scope="module")
def prepared(messy, tmp_path_factory) -> Path:
    """One run of the seed's two-CSV layout over the messy data set; the stage folder."""
    artifacts = tmp_path_factory.mktemp("runs")
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("ASRFT_")}
    try:
        assert run(messy, artifacts, "messy", *two_csv_flags(messy)) == 0
    finally:
        os.environ.update(saved)
    return artifacts / "messy" / "prepare"


def rejected_by_key(out: Path) -> dict[tuple[str, str], dict]:
    rows = read_jsonl(out / "rejected.jsonl")
    return {(r["split"], next(iter(r["row"].values()))): r for r in rows}


def test_every_bad_row_is_rejected_with_its_reason(prepared):
    rejected = rejected_by_key(prepared)
    for raw, _, reason in BAD_TRAIN.values():
        assert rejected[("train", raw)]["reason"] == reason, raw
    for raw, reason in EXPECTED_TEST_REJECTS.items():
        assert rejected[("test", raw)]["reason"] == reason, raw
    malformed = [r for r in read_jsonl(prepared / "rejected.jsonl") if r["reason"] == "malformed_row"]
    assert len(malformed) == MALFORMED_LINES + 1
    assert {r["split"] for r in malformed} == {"train"}
    total = len(BAD_TRAIN) + len(EXPECTED_TEST_REJECTS) + MALFORMED_LINES + 1
    assert len(read_jsonl(prepared / "rejected.jsonl")) == total
    reasons_seen = {r["reason"] for r in read_jsonl(prepared / "rejected.jsonl")}
    # every reason but a permissions problem, Kaldi commands (tests/integration/test_manifests.py) and
    # unsupported_format (only without PyAV: tests/unit/test_audio.py)
    assert reasons_seen == set(REASONS) - {"unreadable_file", "kaldi_command", "unsupported_format"}


def test_rejected_rows_carry_line_row_and_message(prepared):
    rejected = rejected_by_key(prepared)
    dup = rejected[("train", "tel8k")]
    assert dup["row"] == {"audio_id": "tel8k", "text": "重复的编号"}
    assert dup["csv"] == "train.csv" and dup["line"] == 2 + len(GOOD_TRAIN) + 3  # header + goods + 4th bad row
    assert "line 3 of train.csv" in dup["message"]  # where the id was used first
    assert "train CSV" in rejected[("test", "lossless")]["message"]
    assert "ffmpeg" in rejected[("train", "phone")]["message"]
    gbk = [r for r in read_jsonl(prepared / "rejected.jsonl") if "raw" in r["row"]]
    assert any("GB18030" in r["message"] for r in gbk)
    for r in read_jsonl(prepared / "rejected.jsonl"):
        assert r["message"] and r["reason"] in REASONS


def test_every_good_row_is_kept_and_converted(prepared, messy):
    train = {r["id"]: r for r in read_jsonl(prepared / "train.jsonl")}
    test = {r["id"]: r for r in read_jsonl(prepared / "test.jsonl")}
    expected_train = {"float32" if k == "float32.wav" else k for k in GOOD_TRAIN}
    assert set(train) == expected_train
    assert set(test) == set(GOOD_TEST)
    for table, records, folder in ((GOOD_TRAIN, train, messy["audio"]), (GOOD_TEST, test, messy["test_audio"])):
        for utt, (name, seconds, sr, ch, _, text) in table.items():
            rec = records[utt.removesuffix(".wav")]
            assert transcript(rec) == text  # raw text, traditional characters and punctuation kept
            assert (rec["orig_sample_rate"], rec["orig_channels"]) == (sr, ch)
            assert rec["source"] == str(folder / name)
            assert rec["audio_path"].startswith("prepare/audio/") and rec["audio_path"].endswith(".wav")
            wav = prepared.parent / rec["audio_path"]
            assert rec["conversation"][1]["content"] == str(wav)
            info = sf.info(wav)
            assert (info.samplerate, info.channels, info.subtype) == (SR_OUT, 1, "PCM_16")
            assert abs(info.frames / SR_OUT - seconds) < 0.01  # duration preserved within 10 ms
            assert abs(rec["duration"] - seconds) < 0.01
            samples, _ = sf.read(wav, dtype="float32")
            peak = float(np.max(np.abs(samples)))
            expected_peak = 1.0 if utt == "loud_float" else 0.5  # stereo channels at 0.8 and 1.2 average to 1
            assert abs(peak - expected_peak) < 0.03, (utt, peak)
    loud, _ = sf.read(messy["audio"] / "loud_float.wav", dtype="float32")
    assert train["loud_float"]["gain"] == pytest.approx(1 / float(np.max(np.abs(loud))), rel=1e-4)
    assert "gain" not in train["tel8k"]
    nested = train["spk1/nested"]["audio_path"]
    assert nested.startswith("prepare/audio/spk1__nested-")  # one flat folder, safe names


def test_stereo_is_averaged(prepared, messy):
    """The channels carry the tone at 0.8 and 1.2 of its level → the mono file carries their mean."""
    rec = next(r for r in read_jsonl(prepared / "train.jsonl") if r["id"] == "stereo44k")
    out, _ = sf.read(prepared.parent / rec["audio_path"], dtype="float32")
    src, _ = sf.read(messy["audio"] / "stereo44k.wav", dtype="float32")
    assert abs(float(np.max(np.abs(out))) - float(np.max(np.abs(src.mean(axis=1))))) < 0.01


def test_stats(prepared):
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["kept"] == {"train": len(GOOD_TRAIN), "test": len(GOOD_TEST)}
    assert stats["rejected"] == {"train": len(BAD_TRAIN) + MALFORMED_LINES + 1, "test": len(EXPECTED_TEST_REJECTS)}
    assert stats["rows"] == {"train": stats["kept"]["train"] + stats["rejected"]["train"],
                             "test": stats["kept"]["test"] + stats["rejected"]["test"]}
    assert list(stats["rejected_by_reason"]) == list(REASONS)
    assert stats["rejected_by_reason"]["malformed_row"] == MALFORMED_LINES + 1
    assert stats["rejected_by_reason"]["duplicate_id"] == 3
    train_seconds = sum(v[1] for v in GOOD_TRAIN.values())
    assert stats["hours"]["train"] == pytest.approx(train_seconds / 3600, abs=1e-4)
    assert sum(stats["duration_histogram"]["train"]) == len(GOOD_TRAIN)
    assert stats["duration_histogram"]["train"][:3] == [4, 4, 0]  # (0,1]: 0.6 0.8 0.9 1.0; (1,2]: 1.1 1.2 1.5 2.0
    assert len(stats["duration_histogram"]["bins"]) == len(stats["duration_histogram"]["test"])
    chars = stats["characters"]
    assert chars["total"] == sum(len(t.replace(" ", "")) for *_, t in [*GOOD_TRAIN.values(), *GOOD_TEST.values()])
    assert ["這", 1] in chars["top"] and chars["by_class"]["punctuation_symbol"] == 2
    assert stats["original_audio"]["sample_rate"]["16000"] == 4
    assert stats["original_audio"]["channels"] == {"1": 8, "2": 2}
    assert stats["original_audio"]["format"]["WAV/PCM_24"] == 1


def test_only_kept_clips_are_stored(prepared):
    stored = sorted(p.name for p in (prepared / "audio").iterdir())
    referenced = sorted(Path(r["audio_path"]).name for f in ("train.jsonl", "test.jsonl")
                        for r in read_jsonl(prepared / f))
    assert stored == referenced and len(stored) == len(GOOD_TRAIN) + len(GOOD_TEST)
    manifest = json.loads((prepared / "_manifest.json").read_text())
    assert manifest["summary"]["kept"] == {"train": len(GOOD_TRAIN), "test": len(GOOD_TEST)}
    assert set(manifest["inputs"]) == {"train_csv", "test_csv", "audio"}


def identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_rerun_skips_and_force_redoes(messy, tmp_path):
    assert run(messy, tmp_path, "r", *two_csv_flags(messy)) == 0
    out = tmp_path / "r" / "prepare"
    files = [out / "_manifest.json", out / "train.jsonl", out / "audio" / "tel8k.wav"]
    before = [identity(f) for f in files]
    records = read_jsonl(out / "train.jsonl")
    assert run(messy, tmp_path, "r", *two_csv_flags(messy)) == 0
    assert [identity(f) for f in files] == before  # skipped: nothing rewritten
    assert run(messy, tmp_path, "r", *two_csv_flags(messy), "--force") == 0
    after = [identity(f) for f in files]
    assert all(a != b for a, b in zip(after, before, strict=True))  # redone: every file written anew
    assert read_jsonl(out / "train.jsonl") == records  # the same result


def test_changed_csv_is_redone(messy, tmp_path):
    data = {**messy, "train": tmp_path / "train.csv"}
    shutil.copyfile(messy["train"], data["train"])
    assert run(data, tmp_path, "c") == 0
    with open(data["train"], "ab") as f:
        f.write("has_audio1,后来补上的文字\n".encode())
    assert run(data, tmp_path, "c") == 0
    ids = {r["id"] for r in read_jsonl(tmp_path / "c" / "prepare" / "train.jsonl")}
    assert "has_audio1" not in ids  # its first row (empty text) claimed the id: the new row is a duplicate
    rejected = read_jsonl(tmp_path / "c" / "prepare" / "rejected.jsonl")
    assert [r["reason"] for r in rejected if r["row"].get("audio_id") == "has_audio1"] == ["empty_text", "duplicate_id"]


def test_no_good_rows_fails_with_a_clear_message(messy, tmp_path, capsys):
    csv = tmp_path / "bad.csv"
    csv.write_text("audio_id,text\nnowhere,没有\nzero,零\nsilent,安静\nsilent,再来\n", encoding="utf-8")
    code = main(["--train-csv", str(csv), "--audio-dir", str(messy["audio"]), "--artifacts", str(tmp_path),
                 "--run-id", "bad"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no usable training rows" in err
    for reason in ("missing_file 1", "empty_file 1", "silent 1", "duplicate_id 1"):
        assert reason in err
    out = tmp_path / "bad" / "prepare"
    assert "rejected.jsonl" in err and len(read_jsonl(out / "rejected.jsonl")) == 4
    assert not (out / "_manifest.json").exists()  # the stage did not complete


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--test-csv", "answers.csv", "--test-ratio", "0.2"], "not both"),
        (["--test-audio-dir", "x"], "without --test-csv"),
        (["--test-ratio", "1.5"], "test_ratio"),
        (["--min-seconds", "5", "--max-seconds", "2"], "must be below"),
    ],
)
def test_bad_settings_exit_2_with_how_to_fix(messy, tmp_path, capsys, argv, message):
    assert run(messy, tmp_path, "s", *argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_missing_csv_fails_with_a_clear_message(messy, tmp_path, capsys):
    data = {**messy, "train": tmp_path / "nope.csv"}
    assert run(data, tmp_path, "m") == 2
    assert "does not exist" in capsys.readouterr().err


def test_test_ratio_split_is_deterministic(messy, tmp_path):
    def split(run_id: str, seed: int) -> tuple[list[str], list[str]]:
        assert run(messy, tmp_path, run_id, "--test-ratio", "0.25", "--seed", str(seed)) == 0
        out = tmp_path / run_id / "prepare"
        return ([r["id"] for r in read_jsonl(out / "train.jsonl")], [r["id"] for r in read_jsonl(out / "test.jsonl")])

    train, test = split("a", 1)
    assert len(test) == round(0.25 * len(GOOD_TRAIN)) == 2
    assert not set(train) & set(test) and len(train) + len(test) == len(GOOD_TRAIN)
    assert split("b", 1) == (train, test)  # same seed → same split
    others = {tuple(split(f"s{seed}", seed)[1]) for seed in (2, 3, 4)}
    assert others != {tuple(test)}  # the seed matters
    stats = json.loads((tmp_path / "a" / "prepare" / "stats.json").read_text())
    assert stats["test_split"].startswith("ratio 0.25") and stats["kept"] == {"train": 6, "test": 2}


def test_no_test_split_by_default(messy, tmp_path):
    assert run(messy, tmp_path, "n") == 0
    out = tmp_path / "n" / "prepare"
    assert read_jsonl(out / "test.jsonl") == [] and len(read_jsonl(out / "train.jsonl")) == len(GOOD_TRAIN)


# ------------------------------------------------------------------------------------------- S3


def test_audio_and_csv_on_s3(s3_server, messy, tmp_path):
    keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    client = boto3.client("s3", endpoint_url=s3_server, **keys)
    bucket = f"prepare-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    for name in ("tel8k.wav", "pcm24.wav", "lossless.flac", "spk1/nested.wav", "zero.wav", "corrupt.wav"):
        client.upload_file(str(messy["audio"] / name), bucket, f"data/audio/{name}")
    rows = ["audio_id,text", "tel8k,你好世界", "pcm24.wav,二十四位", "lossless,无损", "spk1/nested,子目录",
            "zero,零", "corrupt,坏", "nowhere,没有", "../escape,外面"]
    client.put_object(Bucket=bucket, Key="data/train.csv", Body="\n".join(rows).encode("utf-8-sig"))
    flags = ["--s3-endpoint-url", s3_server, "--s3-access-key-id", "testing", "--s3-secret-access-key", "testing",
             "--s3-region", "us-east-1"]
    argv = ["--train-csv", f"s3://{bucket}/data/train.csv", "--audio-dir", f"s3://{bucket}/data/audio",
            "--test-ratio", "0.25", "--artifacts", str(tmp_path), "--run-id", "s3", *flags]
    assert main(argv) == 0
    out = tmp_path / "s3" / "prepare"
    records = read_jsonl(out / "train.jsonl") + read_jsonl(out / "test.jsonl")
    assert sorted(r["id"] for r in records) == ["lossless", "pcm24", "spk1/nested", "tel8k"]
    assert {r["source"] for r in records} >= {f"s3://{bucket}/data/audio/pcm24.wav"}
    for r in records:
        assert sf.info(tmp_path / "s3" / r["audio_path"]).samplerate == SR_OUT
    reasons = {r["row"]["audio_id"]: r["reason"] for r in read_jsonl(out / "rejected.jsonl")}
    assert reasons == {"zero": "empty_file", "corrupt": "corrupt_audio", "nowhere": "missing_file",
                       "../escape": "path_escape"}
    manifest = json.loads((out / "_manifest.json").read_text())
    assert "testing" not in json.dumps(manifest)  # the secret is never written
    assert main(argv) == 0  # unchanged objects (same ETags): skipped
    assert json.loads((out / "_manifest.json").read_text()) == manifest
    client.put_object(Bucket=bucket, Key="data/audio/lossless.flac", Body=(messy["audio"] / "tel8k.wav").read_bytes())
    assert main(argv) == 0  # an object changed: redone
    assert json.loads((out / "_manifest.json").read_text())["inputs"] != manifest["inputs"]


def test_artifacts_on_s3(s3_server, messy, tmp_path):
    bucket = f"prepare-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    flags = ["--s3-endpoint-url", s3_server, "--s3-access-key-id", "testing", "--s3-secret-access-key", "testing",
             "--s3-region", "us-east-1"]
    data = {**messy, "train": tmp_path / "small.csv"}
    data["train"].write_text("audio_id,text\ntel8k,你好世界\nlossless,无损\nzero,零\n", encoding="utf-8")
    assert run(data, f"s3://{bucket}/runs", "remote", *flags) == 0
    store = open_store(f"s3://{bucket}/runs", S3Settings(endpoint_url=s3_server, region="us-east-1",
                                                          access_key_id="testing", secret_access_key="testing"))
    keys = store.list("remote/prepare")
    assert {"remote/prepare/_manifest.json", "remote/prepare/train.jsonl", "remote/prepare/rejected.jsonl",
            "remote/prepare/audio/tel8k.wav", "remote/prepare/audio/lossless.wav"} <= set(keys)
    records = [json.loads(line) for line in store.read_text("remote/prepare/train.jsonl").splitlines()]
    assert [r["conversation"][1]["content"] for r in records] == [
        f"s3://{bucket}/runs/remote/prepare/audio/tel8k.wav", f"s3://{bucket}/runs/remote/prepare/audio/lossless.wav"]


# ------------------------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("n", "ratio", "n_test"),
    [(10, 0.1, 1), (10, 0.25, 2), (10, 0.5, 5), (3, 0.1, 1), (2, 0.9, 1), (1, 0.5, 0), (0, 0.5, 0), (10, 0.0, 0)],
)
def test_split_by_ratio_sizes(n, ratio, n_test):
    records = [{"id": f"u{i}"} for i in range(n)]
    train, test = split_by_ratio(records, ratio, seed=0)
    assert len(test) == n_test and len(train) == n - n_test
    assert train == [r for r in records if r in train] and test == [r for r in records if r in test]  # order kept


def test_split_by_ratio_is_stable_when_rows_are_added():
    base = [{"id": f"u{i}"} for i in range(100)]
    _, test = split_by_ratio(base, 0.1, seed=5)
    _, test_more = split_by_ratio(base + [{"id": f"new{i}"} for i in range(10)], 0.1, seed=5)
    assert len({r["id"] for r in test} & {r["id"] for r in test_more}) >= 8  # most test rows stay in test


@pytest.mark.parametrize(
    ("seconds", "expected_bin"),
    [(0.1, "0-1 s"), (1.0, "0-1 s"), (1.01, "1-2 s"), (4.99, "3-5 s"), (30.0, "25-30 s"), (45.0, ">30 s")],
)
def test_duration_histogram_bins(seconds, expected_bin):
    counts = duration_histogram([seconds])
    assert sum(counts) == 1 and duration_bin_labels()[counts.index(1)] == expected_bin
