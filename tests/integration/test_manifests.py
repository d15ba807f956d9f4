"""One small data set written in every manifest format prepare reads (CSV, TSV, semicolon CSV, GBK CSV, NeMo,
FunASR, records, Kaldi, Hugging Face audiofolder) over audio in wav/flac/mp3/m4a/ogg: every format gives the
same records; each malformed variant is rejected with its reason code."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from common.core.records import read_jsonl, transcript
from jobs.prepare.__main__ import main

SR = 16_000
# id → (file, transcript); one clip per audio format
CLIPS = {
    "utt1": ("utt1.wav", "你好世界"),
    "utt2": ("utt2.flac", "今天天气很好"),
    "utt3": ("utt3.mp3", "我们一起学习"),
    "utt4": ("utt4.m4a", "手机录音"),
    "utt5": ("utt5.ogg", "再见朋友"),
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in list(os.environ):
        if var.startswith("ASRFT_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("ASRFT_CACHE", str(tmp_path / "cache"))


def tone(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_m4a(path: Path, x: np.ndarray) -> None:
    buf = io.BytesIO()
    with av.open(buf, "w", format="ipod") as out:
        stream = out.add_stream("aac", rate=SR)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray((x[None, :] * 32767).astype(np.int16), format="s16", layout="mono")
        frame.sample_rate = SR
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("set") / "audio"
    folder.mkdir()
    for i, (name, _) in enumerate(CLIPS.values()):
        x = tone(1.0 + 0.2 * i, 300 + 100 * i)
        ext = name.rsplit(".", 1)[1]
        if ext == "m4a":
            write_m4a(folder / name, x)
        else:
            sf.write(folder / name, x, SR, **{"wav": {}, "flac": {}, "mp3": {"format": "MP3"},
                                               "ogg": {"format": "OGG", "subtype": "VORBIS"}}[ext])
    return folder


# ------------------------------------------------------------------------------------ the same set, every format


def csv_text(delim: str, header=("audio_id", "text")) -> str:
    return "\n".join([delim.join(header)] + [f"{name}{delim}{text}" for name, text in CLIPS.values()]) + "\n"


def nemo(audio: Path) -> str:
    return "".join(json.dumps({"audio_filepath": str(audio / name), "text": text, "duration": 1.0},
                              ensure_ascii=False) + "\n" for name, text in CLIPS.values())


def funasr(audio: Path) -> str:
    return "".join(json.dumps({"key": utt, "source": name, "source_len": 100, "target": text, "target_len": 4},
                              ensure_ascii=False) + "\n" for utt, (name, text) in CLIPS.items())


def records(audio: Path) -> str:
    from common.core.records import make_record

    return "".join(json.dumps(make_record(utt, str(audio / name), f"x/{name}", text, 1.0), ensure_ascii=False)
                   + "\n" for utt, (name, text) in CLIPS.items())


def write_set(kind: str, audio: Path, where: Path) -> tuple[Path, list[str]]:
    """Write the set as ``kind`` under ``where``; (the manifest path, extra prepare flags)."""
    where.mkdir(parents=True, exist_ok=True)
    audio_flags = ["--audio-dir", str(audio)]
    if kind == "csv":
        (where / "train.csv").write_text(csv_text(","), encoding="utf-8")
        return where / "train.csv", audio_flags
    if kind == "tsv":
        (where / "train.tsv").write_text(csv_text("\t", ("utt", "transcript")), encoding="utf-8")
        return where / "train.tsv", audio_flags
    if kind == "semicolon_csv_with_bom":
        (where / "train.csv").write_text(csv_text(";"), encoding="utf-8-sig")
        return where / "train.csv", audio_flags
    if kind == "gbk_csv":
        (where / "train.csv").write_bytes(csv_text(",").encode("gbk"))
        return where / "train.csv", audio_flags
    if kind == "nemo":  # absolute paths under the audio folder
        (where / "train_manifest.json").write_text(nemo(audio), encoding="utf-8")
        return where / "train_manifest.json", audio_flags
    if kind == "funasr":
        (where / "train.jsonl").write_text(funasr(audio), encoding="utf-8")
        return where / "train.jsonl", audio_flags
    if kind == "records":
        (where / "data.txt").write_text(records(audio), encoding="utf-8")  # detected by its first character
        return where / "data.txt", audio_flags + ["--format", "jsonl"]
    if kind == "kaldi":  # absolute paths: allowed by --audio-root; the audio folder defaults to the data folder
        (where / "wav.scp").write_text("".join(f"{u} {audio / n}\n" for u, (n, _) in CLIPS.items()), encoding="utf-8")
        (where / "text").write_text("".join(f"{u} {t}\n" for u, (_, t) in reversed(CLIPS.items())), encoding="utf-8")
        return where, ["--audio-root", str(audio)]
    if kind == "audiofolder":
        folder = where / "audiofolder"
        folder.mkdir()
        for name, _ in CLIPS.values():
            (folder / name).write_bytes((audio / name).read_bytes())
        (folder / "metadata.csv").write_text(csv_text(",", ("file_name", "transcription")), encoding="utf-8")
        return folder, []
    raise AssertionError(kind)


KINDS = ["csv", "tsv", "semicolon_csv_with_bom", "gbk_csv", "nemo", "funasr", "records", "kaldi", "audiofolder"]


def prepared(tmp_path: Path, run_id: str, manifest: Path, *flags: str) -> tuple[int, Path]:
    rc = main(["--train-csv", str(manifest), *flags, "--artifacts", str(tmp_path / "runs"), "--run-id", run_id])
    return rc, tmp_path / "runs" / run_id / "prepare"


def essence(out: Path) -> list[tuple]:
    return sorted((r["id"], transcript(r), r["duration"], r["orig_format"]) for r in read_jsonl(out / "train.jsonl"))


@pytest.fixture(scope="module")
def reference(audio, tmp_path_factory) -> list[tuple]:
    tmp = tmp_path_factory.mktemp("ref")
    manifest, flags = write_set("csv", audio, tmp / "ref")
    rc, out = prepared(tmp, "ref", manifest, *flags)
    assert rc == 0
    return essence(out)


def test_reference_has_every_clip_and_audio_format(reference):
    assert [r[0] for r in reference] == list(CLIPS)
    assert [r[1] for r in reference] == [t for _, t in CLIPS.values()]
    formats = {r[3].split("/")[0] for r in reference}
    assert formats == {"WAV", "FLAC", "MP3", "MOV", "OGG"}  # MOV: FFmpeg's name for the MP4/M4A container
    assert all(1.0 <= r[2] < 2.0 for r in reference)


@pytest.mark.parametrize("kind", KINDS)
def test_every_format_gives_the_same_records(kind, audio, reference, tmp_path, caplog):
    manifest, flags = write_set(kind, audio, tmp_path / kind)
    with caplog.at_level(logging.WARNING):
        rc, out = prepared(tmp_path, kind, manifest, *flags)
    assert rc == 0
    assert essence(out) == reference
    assert read_jsonl(out / "rejected.jsonl") == []
    if kind == "gbk_csv":  # read in the detected encoding, and the console says so
        assert any("GB18030" in r.getMessage().upper() for r in caplog.records if r.levelno == logging.WARNING)


def test_encoding_flag_overrides_detection(audio, tmp_path):
    manifest, flags = write_set("gbk_csv", audio, tmp_path / "gbk")
    rc, out = prepared(tmp_path, "forced", manifest, *flags, "--encoding", "gbk")
    assert rc == 0 and len(essence(out)) == len(CLIPS)
    rc, _ = prepared(tmp_path, "wrong", manifest, *flags, "--encoding", "utf-8")
    assert rc == 2  # a forced encoding that does not fit is a whole-file error


# ------------------------------------------------------------------------------------ malformed variants


def malformed(kind: str, audio: Path, where: Path) -> tuple[Path, list[str]]:
    """The set as ``kind`` plus bad lines; each bad line's expected (key, reason) is in EXPECTED[kind]."""
    manifest, flags = write_set(kind, audio, where)
    outside = where / "outside.wav"
    outside.write_bytes((audio / "utt1.wav").read_bytes())
    if kind == "csv":
        with open(manifest, "a", encoding="utf-8") as f:
            f.write("extra,你好,世界\n../utt1.wav,向上\n" f"{outside},外面\n")
    elif kind == "nemo":
        with open(manifest, "a", encoding="utf-8") as f:
            f.write("not json\n")
            f.write(json.dumps({"audio_filepath": str(outside), "text": "外面"}) + "\n")
            f.write(json.dumps({"audio_filepath": str(audio / "utt1.wav")}) + "\n")  # no text
            f.write("[1, 2]\n")
    elif kind == "funasr":
        with open(manifest, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": "gone", "source": "gone.wav", "target": "没有"}, ensure_ascii=False) + "\n")
            f.write(json.dumps({"key": "num", "source": 7, "target": "数字"}, ensure_ascii=False) + "\n")
    elif kind == "kaldi":
        with open(manifest / "wav.scp", "a", encoding="utf-8") as f:
            f.write("piped sox in.wav -t wav - |\nark /data/feats.ark:1234\nnotext /x.wav\n")
        with open(manifest / "text", "a", encoding="utf-8") as f:
            f.write("piped 管道\nark 归档\nnowav 没有音频\n")
    elif kind == "tsv":
        with open(manifest, "a", encoding="utf-8") as f:
            f.write("extra\t你好\t世界\n../utt1.wav\t向上\n")
    elif kind == "audiofolder":  # paths relative to the folder: a missing file, one outside it
        with open(manifest / "metadata.csv", "a", encoding="utf-8") as f:
            f.write("gone.wav,没有\n../outside.wav,外面\n")
    elif kind == "gbk_csv":  # one GBK line in a UTF-8 file: that line only
        manifest.write_bytes(csv_text(",").encode("utf-8") + "bad,坏行\n".encode("gbk"))
    return manifest, flags


EXPECTED = {  # kind → sorted (line, reason)
    "csv": [(7, "malformed_row"), (8, "path_escape"), (9, "path_escape")],
    "nemo": [(6, "malformed_row"), (7, "path_escape"), (8, "malformed_row"), (9, "malformed_row")],
    "funasr": [(6, "missing_file"), (7, "malformed_row")],
    "kaldi": [(6, "kaldi_command"), (7, "kaldi_command"), (8, "empty_text"), (8, "missing_file")],
    "gbk_csv": [(7, "malformed_row")],
    "tsv": [(7, "malformed_row"), (8, "path_escape")],
    "audiofolder": [(7, "missing_file"), (8, "path_escape")],
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_malformed_variants_are_rejected_with_a_reason(kind, audio, reference, tmp_path, caplog):
    manifest, flags = malformed(kind, audio, tmp_path / kind)
    with caplog.at_level(logging.ERROR):
        rc, out = prepared(tmp_path, kind, manifest, *flags)
    assert rc == 0
    assert essence(out) == reference  # the good lines still make the same records
    rejected = read_jsonl(out / "rejected.jsonl")
    assert sorted((r["line"], r["reason"]) for r in rejected) == EXPECTED[kind]
    assert all(r["message"] for r in rejected)
    if kind == "gbk_csv":  # an encoding problem is on the console, not only in rejected.jsonl
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("not UTF-8" in m and "line 7" in m for m in errors)


def test_kaldi_command_message_says_why(audio, tmp_path):
    manifest, flags = malformed("kaldi", audio, tmp_path / "k")
    _, out = prepared(tmp_path, "k", manifest, *flags)
    piped = next(r for r in read_jsonl(out / "rejected.jsonl") if r["row"].get("id") == "piped")
    assert piped["reason"] == "kaldi_command" and "not run" in piped["message"]


def test_absolute_path_outside_the_roots_names_the_flag(audio, tmp_path):
    manifest, flags = malformed("csv", audio, tmp_path / "c")
    _, out = prepared(tmp_path, "c", manifest, *flags)
    outside = next(r for r in read_jsonl(out / "rejected.jsonl") if r["line"] == 9)
    assert "--audio-root" in outside["message"]


def test_kaldi_without_audio_root_rejects_absolute_paths(audio, tmp_path):
    manifest, _ = write_set("kaldi", audio, tmp_path / "k")
    rc, out = prepared(tmp_path, "k", manifest)
    assert rc == 2  # no usable row
    assert {r["reason"] for r in read_jsonl(out / "rejected.jsonl")} == {"path_escape"}


def test_folder_without_a_manifest_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _ = prepared(tmp_path, "e", tmp_path / "empty")
    assert rc == 2
    assert "wav.scp" in capsys.readouterr().err


def test_aliases_and_no_abbreviations(audio, tmp_path, capsys):
    manifest, flags = write_set("csv", audio, tmp_path / "a")
    rc = main(["--train", str(manifest), *flags, "--artifacts", str(tmp_path / "runs"), "--run-id", "alias"])
    assert rc == 0
    with pytest.raises(SystemExit):
        main(["--train-c", str(manifest), *flags, "--artifacts", str(tmp_path / "runs"), "--run-id", "abbrev"])
    assert "unrecognized arguments: --train-c" in capsys.readouterr().err


def test_kaldi_given_as_its_wav_scp_file(audio, tmp_path):
    folder, flags = write_set("kaldi", audio, tmp_path / "k")
    rc, out = prepared(tmp_path, "scp", folder / "wav.scp", *flags)
    assert rc == 0 and [r[0] for r in essence(out)] == list(CLIPS)


def test_kaldi_segments_are_refused_with_how_to_cut_them(audio, tmp_path, capsys):
    folder, flags = write_set("kaldi", audio, tmp_path / "k")
    (folder / "segments").write_text("utt1 rec1 0.0 1.0\n", encoding="utf-8")
    rc, _ = prepared(tmp_path, "seg", folder, *flags)
    assert rc == 2 and "segments" in capsys.readouterr().err
