"""Chinese-aware text normalization for scoring ASR output.

Scoring compares what was said with what was recognized, not how it was typed, so both sides
go through the same steps before any error is counted:

1. Unicode NFKC: full-width forms become half-width (``ＡＢＣ１２３`` → ``ABC123``,
   ``，`` → ``,``), compatibility ideographs become their unified form, ``…`` → ``...``.
2. Traditional → simplified Chinese with OpenCC's character-level ``t2s`` table
   (``這是一個篇章`` → ``这是一个篇章``). Regional vocabulary is deliberately *not* rewritten
   (``軟體`` → ``软体``, not ``软件``): a different word is a different word.
3. Latin lower-cased (``iPhone`` → ``iphone``).
4. Punctuation (every Unicode ``P*`` character: ASCII and CJK alike, ``、。，！？：；“”‘’《》【】…—·``),
   the ASCII symbols of :data:`string.punctuation` (``$ + < = > ^ ` | ~``), control and
   format characters (zero-width space, BOM) and every kind of whitespace are removed.
   Non-ASCII symbols such as ``¥`` or ``°`` are kept: they stand for spoken words.

:func:`normalize` returns one string for character error rate (CER). :func:`normalize_words`
keeps word boundaries for WER in the *mixed error rate* style used for Chinese/English
code-switching: each CJK character (Han ideograph, kana) is one token, and each run of other
letters or digits (Latin words, numbers, Hangul) is one token. So ``我用 iPhone 15 打电话`` gives
``我 用 iphone 15 打 电 话``; on purely Chinese text WER then equals CER, and English words are
counted as words rather than as letters. ``"".join(normalize_words(t)) == normalize(t)`` always.

Functions never modify their inputs (strings are immutable anyway); callers keep the raw text
next to the normalized one.
"""

from __future__ import annotations

import functools
import logging
import re
import string
import unicodedata

import opencc

log = logging.getLogger(__name__)

OPENCC_CONFIG = "t2s"  # Traditional Chinese (OpenCC standard) → Simplified Chinese, character level

# Characters that are scored one by one: Han ideographs and Japanese kana (languages written
# without spaces). Ranges from the Unicode blocks of the same names.
_CJK_CHAR_RE = re.compile(
    "["
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3400-\u4dbf"  # CJK Unified Ideographs Extension A
    "\u4e00-\u9fff"  # CJK Unified Ideographs
    "\uf900-\ufaff"  # CJK Compatibility Ideographs (NFKC maps most of them away)
    "\U00020000-\U0003134f"  # Extensions B..G, Compatibility Ideographs Supplement
    "]"
)
_ASCII_PUNCTUATION = frozenset(string.punctuation)  # !"#$%&'()*+,-./:;<=>?@[\]^_`{|}~


@functools.cache
def _converter() -> opencc.OpenCC:
    """The OpenCC converter, built once on first use (loading its dictionaries takes a few ms)."""
    log.debug("loading OpenCC converter %r", OPENCC_CONFIG)
    return opencc.OpenCC(OPENCC_CONFIG)


def _is_separator(ch: str) -> bool:
    """True for characters that carry no spoken content: punctuation, ASCII symbols, spaces, controls."""
    if ch in _ASCII_PUNCTUATION or ch.isspace():
        return True
    category = unicodedata.category(ch)
    return category[0] in "PZC"  # Punctuation, separators (spaces), controls/format/unassigned


def _canonical(text: str) -> str:
    """Steps 1-3 (NFKC, traditional → simplified, lower case); punctuation still in place."""
    if not isinstance(text, str):
        raise TypeError(f"expected a transcript as str, got {type(text).__name__}: {text!r}")
    text = unicodedata.normalize("NFKC", text)
    # OpenCC works on phrases, so convert before punctuation is removed and phrases run together.
    text = _converter().convert(text)
    return text.lower()


def normalize(text: str) -> str:
    """Normalized text for CER: NFKC, simplified Chinese, lower case, no punctuation or whitespace.

    >>> normalize("“這是 iPhone，ＡＢＣ１２３！”")
    '这是iphoneabc123'
    """
    return "".join(ch for ch in _canonical(text) if not _is_separator(ch))


def normalize_words(text: str) -> list[str]:
    """Tokens for WER: each CJK character alone, each run of other letters/digits as one word.

    Punctuation and whitespace separate tokens and are dropped.

    >>> normalize_words("我用 iPhone 15打電話。")
    ['我', '用', 'iphone', '15', '打', '电', '话']
    """
    tokens: list[str] = []
    run: list[str] = []
    for ch in _canonical(text):
        if _is_separator(ch) or is_cjk_char(ch):
            if run:
                tokens.append("".join(run))
                run.clear()
            if not _is_separator(ch):
                tokens.append(ch)
        else:
            run.append(ch)
    if run:
        tokens.append("".join(run))
    return tokens


def is_cjk_char(token: str) -> bool:
    """True for one Han ideograph or kana, the tokens that :func:`normalize_words` emits alone."""
    return len(token) == 1 and _CJK_CHAR_RE.match(token) is not None


def is_punctuation_only(text: str) -> bool:
    """True when nothing scoreable is left after normalization.

    That covers empty and whitespace-only transcripts as well as ``"。。。"`` or ``"——！"``:
    prepare rejects all of them, since a model cannot learn or be scored on them.
    """
    return normalize(text) == ""


def simplified(text: str) -> str:
    """Steps 1-2 only (NFKC, traditional → simplified): a transcript to read, punctuation and case kept."""
    if not isinstance(text, str):
        raise TypeError(f"expected a transcript as str, got {type(text).__name__}: {text!r}")
    return _converter().convert(unicodedata.normalize("NFKC", text))
