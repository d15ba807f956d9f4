"""Scoring normalization: NFKC, traditional → simplified, punctuation/whitespace removal, lower case."""

from __future__ import annotations

import pytest

from common.core import text
from common.core.text import is_cjk_char, is_punctuation_only, normalize, normalize_words

NORMALIZE_CASES = [
    # (raw, normalized, why)
    ("這是一個篇章", "这是一个篇章", "traditional → simplified"),
    ("这是一个篇章", "这是一个篇章", "simplified stays"),
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
