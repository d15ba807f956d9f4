"""Scoring normalization: NFKC, traditional → simplified, punctuation/whitespace removal, lower case."""

from __future__ import annotations

import pytest

from common.core import text
from common.core.text import is_cjk_char, is_punctuation_only, normalize, normalize_words

NORMALIZE_CASES = [
    # (raw, normalized, why)
    ("這是一個篇章", "这是1个篇章", "traditional → simplified, then the numeral read as a digit"),
    ("这是一个篇章", "这是1个篇章", "simplified stays"),
    ("“你好，世界！”", "你好世界", "full-width CJK punctuation removed"),
    ("ＡＢＣ１２３", "abc123", "full-width letters/digits → half-width, lower case"),
    ("Hello World", "helloworld", "Latin lower-cased, spaces removed"),
    ("、。，！？：；“”‘’《》【】…—·", "", "every CJK punctuation mark of the brief"),
    ("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "", "ASCII punctuation and symbols"),
    (" \t\n\u3000中 文\u200b\ufeff", "中文", "ASCII, ideographic and zero-width spaces, BOM"),
    ("我用 iPhone 打電話。", "我用iphone打电话", "mixed script"),
    ("【重要】《紅樓夢》", "重要红楼梦", "brackets and a title"),
    ("臺灣的軟體", "台湾的软体", "character-level t2s: regional words are not rewritten"),
    ("¥100", "¥100", "non-ASCII symbols are spoken content and stay"),
    ("", "", "empty"),
]


@pytest.mark.parametrize(("raw", "expected", "why"), NORMALIZE_CASES)
def test_normalize(raw: str, expected: str, why: str) -> None:
    assert normalize(raw) == expected, why


@pytest.mark.parametrize(
    ("raw", "tokens"),
    [
        ("我用 iPhone 打电话", ["我", "用", "iphone", "打", "电", "话"]),
        ("我用iPhone15打電話", ["我", "用", "iphone15", "打", "电", "话"]),
        ("第3章", ["第", "3", "章"]),
        ("Hello, World!", ["hello", "world"]),
        ("well-known", ["well", "known"]),  # punctuation separates words
        ("ＡＢＣ１２３", ["abc123"]),
        ("カラオケ", ["カ", "ラ", "オ", "ケ"]),  # kana, like Han, one token per character
        ("", []),
        ("。。。", []),
    ],
)
def test_normalize_words(raw: str, tokens: list[str]) -> None:
    assert normalize_words(raw) == tokens


@pytest.mark.parametrize(
    "raw", [case[0] for case in NORMALIZE_CASES] + ["我用 iPhone 15 打电话", "第3章 Hello-World"]
)
def test_words_join_to_normalized_text(raw: str) -> None:
    # CER and WER see the same content, only the token boundaries differ.
    assert "".join(normalize_words(raw)) == normalize(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", True),
        ("   \t\n", True),
        ("。。。", True),
        ("——！", True),
        ("…", True),
        ("“”", True),
        ("你好。", False),
        ("ok", False),
        ("１", False),
    ],
)
def test_is_punctuation_only(raw: str, expected: bool) -> None:
    assert is_punctuation_only(raw) is expected


@pytest.mark.parametrize(
    ("token", "expected"), [("中", True), ("カ", True), ("a", False), ("中文", False), ("1", False)]
)
def test_is_cjk_char(token: str, expected: bool) -> None:
    assert is_cjk_char(token) is expected


def test_input_is_left_unchanged_and_converter_is_built_once() -> None:
    raw = "“這是 ＡＢＣ”"
    copy = str(raw)
    normalize(raw)
    normalize_words(raw)
    assert raw == copy
    assert text._converter() is text._converter()


@pytest.mark.parametrize("bad", [None, 123, b"bytes"])
def test_non_string_is_rejected_with_its_type(bad: object) -> None:
    with pytest.raises(TypeError, match=type(bad).__name__):
        normalize(bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- policy, numbers


def test_numbers_are_read_as_digits_on_both_sides() -> None:
    from common.core.metrics import utterance_errors

    for ref, hyp in [("我有三个苹果", "我有3个苹果"), ("二零二四年", "2024年"), ("两千零二十四年", "2024年"),
                     ("二〇二四年三月五日", "2024年3月5日"), ("三点五公斤", "3.5公斤")]:
        errors = utterance_errors(ref, hyp)
        assert errors["cer"] == 0.0 and errors["exact"], (ref, hyp, errors["ref_norm"], errors["hyp_norm"])
    raw = text.TextPolicy.parse("fullwidth,simplified,lowercase,punctuation")  # numbers off: an error
    assert utterance_errors("我有三个苹果", "我有3个苹果", raw)["char_errors"] == 1
    assert utterance_errors("二零二四年", "2024年", raw)["char_errors"] == 4
    assert utterance_errors("我有三个苹果", "我有四个苹果")["char_errors"] == 1  # a wrong number stays wrong


def test_policy_parse_and_spec() -> None:
    P = text.TextPolicy.parse
    assert P("default") == P(None) == text.DEFAULT_POLICY and P("default").spec() == "default"
    assert P("none").steps == frozenset() and P("none").spec() == "none"
    assert P("punctuation, fullwidth").spec() == "fullwidth,punctuation"  # fixed order
    with pytest.raises(ValueError, match="unknown step.*'traditional'"):
        P("traditional")
    assert "cn2an" in P("default").describe()
    assert normalize("這是，ＡＢＣ", P("none")) == "這是，ＡＢＣ"  # nothing but whitespace removed
    assert normalize("你好，世界", P("fullwidth")) == "你好,世界"  # punctuation kept: scored as a token
    assert normalize_words("你好，世界", P("fullwidth")) == ["你", "好", ",", "世", "界"]


@pytest.mark.parametrize(("raw", "target"), [
    ("這是「iPhone 15」，好嗎？", "这是iphone 15好吗"),
    ("I don't know, 我们走吧!", "i don't know我们走吧"),
    ("ＡＢＣ，　测试。", "abc测试"),
    ("我有三个苹果", "我有三个苹果"),  # numbers stay as transcribed in training targets
    ("hello,world", "hello world"),  # punctuation between words becomes one space
])
def test_training_target(raw: str, target: str) -> None:
    assert text.training_target(raw) == target


@pytest.mark.parametrize("raw", ["這是「iPhone 15」，好嗎？", "I don't know, 我们走吧!", "二零二四年，三個人。", "ＡＢＣ１２３"])
def test_training_targets_score_like_the_raw_transcript(raw: str) -> None:
    """A model that outputs exactly its training target scores CER 0 against the raw reference."""
    from common.core.metrics import utterance_errors

    assert utterance_errors(raw, text.training_target(raw))["cer"] == 0.0


def test_extract_trains_on_the_targets_scoring_sees() -> None:
    """extract rewrites each train record's transcript to its training target (the raw one kept in raw_text);
    the target scores CER 0 against the raw reference, and text_norm none leaves records untouched."""
    from common.core.metrics import utterance_errors
    from common.core.records import make_record, transcript
    from jobs.extract import ExtractSettings, normalized_targets

    raws = ["這是一個篇章。", "ＯＫ，好的！", "我有三个苹果"]
    records = [make_record(f"u{i}", f"/a/u{i}.wav", f"prepare/audio/u{i}.wav", t, 1.0) for i, t in enumerate(raws)]
    out = normalized_targets(records, text.TextPolicy.parse(ExtractSettings().text_norm))
    assert [transcript(r) for r in out] == ["这是一个篇章", "ok好的", "我有三个苹果"]
    assert [r.get("raw_text") for r in out] == ["這是一個篇章。", "ＯＫ，好的！", None]
    assert [transcript(r) for r in records] == raws  # the input records are not modified
    assert all(utterance_errors(raw, transcript(r))["cer"] == 0.0 for raw, r in zip(raws, out, strict=True))
    assert normalized_targets(records, text.TextPolicy.parse("none")) == records
    with pytest.raises(ValueError, match="unknown step"):
        ExtractSettings(text_norm="fullwidth,tradtional")
