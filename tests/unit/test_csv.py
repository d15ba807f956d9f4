"""common.core.dataset: CSV reading (BOM, columns, malformed lines), ids → files, path safety, text checks."""

from __future__ import annotations

import codecs
import os

import pytest

from common.core.dataset import (
    AUDIO_EXTENSIONS,
    DatasetError,
    LocalAudioDir,
    Problem,
    candidate_paths,
    check_id_path,
    check_text,
    check_text_rate,
    read_csv,
    safe_file_name,
    utterance_id,
)


def read(text: str | bytes, **kw):
    data = text.encode("utf-8") if isinstance(text, str) else text
    return read_csv(data, name="t.csv", split="train", **kw)


def rows(table) -> list[tuple[int, str, str]]:
    return [(r.line, r.id, r.text) for r in table.rows]


def reasons(table) -> list[tuple[int, str]]:
    return [(r.line, r.reason) for r in table.rejected]


# ------------------------------------------------------------------------------------------- columns


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("audio_id,text", ("audio_id", "text", True)),
        ("Audio_ID,Text", ("Audio_ID", "Text", True)),  # case-insensitive, original spelling kept
        (" id , transcript ", ("id", "transcript", True)),  # spaces around names ignored
        ("utt,sentence", ("utt", "sentence", True)),
        ("utt_id,label", ("utt_id", "label", True)),
        ("file,answer", ("file", "answer", True)),
        ("filename,text", ("filename", "text", True)),
        ("path,text", ("path", "text", True)),
        ("wav,text", ("wav", "text", True)),
        ("speaker,wav,duration,text", ("wav", "text", True)),
        ("id,path,text", ("id", "text", True)),  # several id columns: the first of ID_COLUMNS wins
        ("text,audio_id", ("audio_id", "text", True)),  # any order
        ("utt1,你好世界", ("id", "text", False)),  # two columns, no known name: headerless
    ],
)
def test_column_detection(header, expected):
    table = read(f"{header}\n")
    assert (table.id_column, table.text_column, table.header) == expected


@pytest.mark.parametrize(
    ("header", "flags", "expected"),
    [
        ("clip,words", {"id_column": "clip", "text_column": "words"}, ("clip", "words")),
        ("CLIP,transcript", {"id_column": "clip"}, ("CLIP", "transcript")),  # the other column auto-detected
        ("audio_id,text,norm", {"text_column": "NORM"}, ("audio_id", "norm")),
    ],
)
def test_columns_named_by_flags(header, flags, expected):
    table = read(f"{header}\nu1,a,b\n" if header.count(",") == 2 else f"{header}\nu1,a\n", **flags)
    assert (table.id_column, table.text_column, table.header) == (*expected, True)


@pytest.mark.parametrize(
    ("header", "flags", "message"),
    [
        ("clip,words,speaker", {}, "--id-column NAME and --text-column NAME"),  # 3 unknown columns
        ("audio_id,words", {}, "cannot tell"),  # id known, text not: not silently headerless
        ("audio_id,text", {"id_column": "clip"}, "--id-column 'clip' not found"),
        ("audio_id,text", {"text_column": "words"}, "--text-column 'words' not found"),
    ],
)
def test_column_errors_say_how_to_fix(header, flags, message):
    with pytest.raises(DatasetError, match=message):
        read(f"{header}\nu1,a,b\n", **flags)


def test_headerless_rows_start_at_line_one():
    table = read("utt1,你好\nutt2,世界\n")
    assert rows(table) == [(1, "utt1", "你好"), (2, "utt2", "世界")]


# ------------------------------------------------------------------------------------------- encoding


def test_bom_and_no_bom_read_the_same():
    body = "audio_id,text\nutt1,这是一个篇章\nutt2,新篇章的开始\n"
    plain, bom = read(body.encode("utf-8")), read(codecs.BOM_UTF8 + body.encode("utf-8"))
    assert rows(plain) == rows(bom) == [(2, "utt1", "这是一个篇章"), (3, "utt2", "新篇章的开始")]
    assert bom.id_column == "audio_id"  # not "\ufeffaudio_id"


def test_utf8_sig_decoded_text_with_bom_char_in_header():
    assert read("\ufeffaudio_id,text\nu,好\n".encode()).id_column == "audio_id"


@pytest.mark.parametrize("bom", [codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE])
def test_utf16_is_refused_with_a_fix(bom):
    with pytest.raises(DatasetError, match="UTF-16.*CSV UTF-8"):
        read(bom + "audio_id,text\n".encode("utf-16-le"))


def test_empty_file_is_refused():
    with pytest.raises(DatasetError, match="empty"):
        read("\n\n")


def test_gbk_line_is_a_malformed_row_with_a_hint():
    data = "audio_id,text\nutt1,好的\n".encode() + "utt2,你好世界\n".encode("gbk") + b"utt3,ok\n"
    table = read(data)
    assert rows(table) == [(2, "utt1", "好的"), (4, "utt3", "ok")]
    [bad] = table.rejected
    assert (bad.line, bad.reason) == (3, "malformed_row")
    assert "GB18030" in bad.message and "iconv" in bad.message
    assert bad.row["raw"].startswith("utt2,\\x")  # undecodable bytes shown escaped, JSON-safe


# ------------------------------------------------------------------------------------------- malformed lines


def test_malformed_lines_cost_only_themselves():
    text = (
        "audio_id,text\r\n"
        "good1,你好\r\n"
        "extra,你好,世界\r\n"  # unquoted comma in the transcript: 3 fields
        "missing\r\n"  # 1 field
        'quote,"unterminated\r\n'  # a stray quote must not swallow the next lines
        "good2,世界\r\n"
        "\r\n"  # blank lines are skipped, not rejected
        ",no id\r\n"
        "nul,a\x00b\r\n"
        'quoted,"你好,世界"\r\n'  # a quoted comma is fine
        "trailing,再见,\r\n"  # a trailing empty field from a spreadsheet is fine
        "tab\tin,text\twith tab\r\n"  # a tab inside a comma-separated field is data
    )
    table = read(text)
    assert rows(table) == [(2, "good1", "你好"), (6, "good2", "世界"), (10, "quoted", "你好,世界"),
                           (11, "trailing", "再见"), (12, "tab\tin", "text\twith tab")]
    assert reasons(table) == [(3, "malformed_row"), (4, "malformed_row"), (5, "malformed_row"),
                              (8, "malformed_row"), (9, "malformed_row")]
    by_line = {r.line: r for r in table.rejected}
    assert "expected 2 fields" in by_line[3].message and "got 3" in by_line[3].message
    assert by_line[3].row == {"audio_id": "extra", "text": "你好", "col3": "世界"}
    assert "add the missing field" in by_line[4].message
    assert "one line" in by_line[5].message
    assert "id is empty" in by_line[8].message
    assert "U+0000" in by_line[9].message


def test_tab_separated_file():
    table = read("utt\ttranscript\nu1\t你好,世界\n")
    assert rows(table) == [(2, "u1", "你好,世界")]


def test_old_mac_line_endings():
    assert rows(read("audio_id,text\ru1,好\ru2,坏\r")) == [(2, "u1", "好"), (3, "u2", "坏")]


def test_very_long_line_is_rejected_not_fatal():
    table = read("audio_id,text\nu1," + "好" * 200_000 + "\nu2,ok\n")  # above csv's 131072-character field limit
    assert rows(table) == [(3, "u2", "ok")]
    assert reasons(table) == [(2, "malformed_row")]


# ------------------------------------------------------------------------------------------- ids and paths


@pytest.mark.parametrize(
    ("raw", "utt"),
    [
        ("utt1", "utt1"),
        ("utt1.wav", "utt1"),
        ("utt1.WAV", "utt1"),
        ("utt1.flac", "utt1"),
        ("spk1/utt1.mp3", "spk1/utt1"),
        ("spk1\\utt1.wav", "spk1/utt1"),
        ("./utt1.wav", "utt1"),
        ("utt.01", "utt.01"),  # not an audio extension
        ("a.b.ogg", "a.b"),
        (".wav", ".wav"),  # nothing left without the extension: kept as is
    ],
)
def test_utterance_id(raw, utt):
    assert utterance_id(raw) == utt


def test_candidate_paths_try_the_id_first_then_extensions():
    cands = candidate_paths("utt1")
    assert cands[:3] == ["utt1", "utt1.wav", "utt1.WAV"]
    assert "utt1.flac" in cands and "utt1.m4a" in cands
    assert len(cands) == 1 + 2 * len(AUDIO_EXTENSIONS)
    assert candidate_paths("utt1.mp3")[:2] == ["utt1.mp3", "utt1.wav"]  # the stem with other extensions too


@pytest.mark.parametrize(
    "raw",
    ["../x", "a/../../x", "..", "a/..\\..\\x", "/etc/passwd", "\\\\server\\share\\x.wav", "C:\\data\\x.wav",
     "c:x.wav", "s3://bucket/x.wav", "http://example.com/x.wav", "file:///etc/passwd"],
)
def test_path_escape_ids(raw):
    problem = check_id_path(raw)
    assert problem is not None and problem.reason == "path_escape"


@pytest.mark.parametrize("raw", ["utt1", "a/b/c.wav", "utt..1", "..utt", "utt..", "spk1\\utt1", "中文/句子1"])
def test_safe_ids(raw):
    assert check_id_path(raw) is None


@pytest.fixture
def audio_dir(tmp_path):
    root = tmp_path / "audio"
    (root / "spk1").mkdir(parents=True)
    for name in ("plain", "given.wav", "upper.WAV", "lossless.flac", "spk1/nested.wav", "phone.m4a", "中文.wav"):
        (root / name).write_bytes(b"x")
    (tmp_path / "outside.wav").write_bytes(b"x")
    os.symlink(tmp_path / "outside.wav", root / "link_out.wav")
    os.symlink(root / "plain", root / "link_in.wav")
    return root


@pytest.mark.parametrize(
    ("raw", "found"),
    [
        ("plain", "plain"),
        ("given", "given.wav"),
        ("given.wav", "given.wav"),
        ("upper", "upper.WAV"),
        ("lossless", "lossless.flac"),
        ("lossless.wav", "lossless.flac"),  # the stem with another extension
        ("spk1/nested", "spk1/nested.wav"),
        ("spk1\\nested.wav", "spk1/nested.wav"),
        ("phone", "phone.m4a"),  # found, so the decoder can say "unsupported_format"
        ("中文", "中文.wav"),
        ("link_in", "link_in.wav"),  # a link inside the folder is fine
    ],
)
def test_local_find(audio_dir, raw, found):
    result = LocalAudioDir(audio_dir).find(raw)
    assert not isinstance(result, Problem), result
    assert result.rel == found and result.size == 1 and result.uri == str(audio_dir / found)


@pytest.mark.parametrize(("raw", "reason"), [("nope", "missing_file"), ("spk1", "missing_file"),
                                             ("x" * 300, "missing_file"), ("link_out", "path_escape")],
                         ids=["absent", "a folder", "name too long", "link outside"])
def test_local_find_problems(audio_dir, raw, reason):
    result = LocalAudioDir(audio_dir).find(raw)
    assert isinstance(result, Problem) and result.reason == reason


def test_missing_audio_dir_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        LocalAudioDir(tmp_path / "nope")


@pytest.mark.parametrize(
    ("utt", "expected"),
    [
        ("utt1", "utt1"),
        ("hsk3-0123", "hsk3-0123"),
        ("中文句子", "中文句子"),
        ("spk1/utt1", "spk1__utt1-"),
        ("a b", "a_b-"),
        (".hidden", "hidden-"),
        ("x" * 150, "x" * 100 + "-"),
    ],
)
def test_safe_file_name(utt, expected):
    name = safe_file_name(utt)
    assert name == expected if not expected.endswith("-") else name.startswith(expected) and len(name) == len(expected) + 10


def test_safe_file_names_are_unique():
    ids = ["a/b", "a_b", "a__b", "a b", "a?b"]
    assert len({safe_file_name(i) for i in ids}) == len(ids)


# ------------------------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty_text"),
        ("   ", "empty_text"),
        ("\u3000\t", "empty_text"),  # ideographic space
        ("\u200b", "empty_text"),  # zero-width space
        ("。。。", "punctuation_only_text"),
        ("——！", "punctuation_only_text"),
        ("?!...", "punctuation_only_text"),
        ("“”《》", "punctuation_only_text"),
        ("你好", None),
        ("這是一個篇章。", None),
        ("ok", None),
        ("123", None),
    ],
)
def test_check_text(text, reason):
    problem = check_text(text)
    assert (problem.reason if problem else None) == reason


@pytest.mark.parametrize(
    ("text", "seconds", "rejected"),
    [
        ("好的谢谢", 0.2, False),  # the 5-token allowance
        ("你好" * 10, 1.0, False),  # 20 = 5 + 15
        ("你好" * 10 + "啊", 1.0, True),  # 21
        ("这并不是告别这是一个篇章的结束也是新篇章的开始", 10.38, False),  # real clip: 23 chars in 10.4 s
        ("这并不是告别这是一个篇章的结束也是新篇章的开始", 0.5, True),
        ("hello world " * 6, 1.0, False),  # 12 words, not 60 letters
        ("，。！" * 30 + "好", 0.1, False),  # punctuation is not spoken
    ],
)
def test_check_text_rate(text, seconds, rejected):
    problem = check_text_rate(text, seconds)
    assert (problem is not None) == rejected
    if problem:
        assert problem.reason == "text_too_long_for_duration"


def test_check_text_rate_bound_is_a_setting():
    assert check_text_rate("你好" * 5, 1.0, max_per_second=4) is not None
    assert check_text_rate("你好" * 5, 1.0, max_per_second=5) is None


# ------------------------------------------------------------------------------------------- other encodings


@pytest.mark.parametrize(("text", "encoding"), [
    ("audio_id,text\nutt1,这是一个篇章\nutt2,今天天气很好\n", "gbk"),
    ("audio_id,text\nutt1,这是一个篇章\nutt2,今天天气很好\n", "gb18030"),
    ("audio_id,text\nutt1,這是一個篇章\nutt2,今天天氣很好\nutt3,我們一起學習中文\n", "big5"),
])
def test_a_file_in_another_encoding_is_read_in_it(text, encoding, caplog):
    table = read(text.encode(encoding))
    assert [(r.id, r.text) for r in table.rows] == [tuple(line.split(",")) for line in text.splitlines()[1:]]
    assert not table.rejected
    assert "is not UTF-8; reading it as" in caplog.text  # said on the console


def test_encoding_flag_wins_and_a_wrong_one_is_refused():
    data = "audio_id,text\nutt1,你好\n".encode("gbk")
    assert [r.text for r in read(data, encoding="gbk").rows] == ["你好"]
    with pytest.raises(DatasetError, match="line 2 is not utf-8"):
        read(data, encoding="utf-8")
    with pytest.raises(DatasetError, match="not an encoding"):
        read(data, encoding="klingon")


@pytest.mark.parametrize("delimiter", [",", ";", "|", "\t"])
def test_delimiter_is_sniffed(delimiter):
    table = read(f"audio_id{delimiter}text\nutt1{delimiter}你好，世界\nutt2{delimiter}再见\n")
    assert [(r.id, r.text) for r in table.rows] == [("utt1", "你好，世界"), ("utt2", "再见")]


def test_a_header_decides_the_delimiter_over_the_transcripts():
    table = read("audio_id,text\nutt1,一;二;三;四\nutt2,五;六;七;八\n")  # semicolons in every transcript
    assert [r.text for r in table.rows] == ["一;二;三;四", "五;六;七;八"]
