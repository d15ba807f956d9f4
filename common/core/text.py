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

Which steps run is a :class:`TextPolicy` (the settings' ``text_norm``: ``default``, ``none`` or a comma list of
``fullwidth, simplified, lowercase, punctuation, numbers``). The same policy makes the training targets
(:func:`training_target`, applied by the extract stage) and the scored text, so a model is trained on what it is
scored on. ``numbers`` is inverse text normalization for scoring only: Chinese numerals become digits on both
sides with cn2an (``三个`` → ``3个``, ``二零二四年`` / ``两千零二十四年`` → ``2024年``), so a model writing ``3个``
for a reference ``三个`` makes no error. Training targets keep numbers as transcribed.

Functions never modify their inputs (strings are immutable anyway); callers keep the raw text
next to the normalized one.
"""

from __future__ import annotations

import functools
import logging
import re
import string
import unicodedata
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

import opencc
from pydantic import AfterValidator

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


TEXT_NORM_STEPS = ("fullwidth", "simplified", "lowercase", "punctuation", "numbers")
STEP_MEANING = {
    "fullwidth": "NFKC: full-width → half-width",
    "simplified": "traditional → simplified (OpenCC t2s)",
    "lowercase": "Latin lower-cased",
    "punctuation": "punctuation removed",
    "numbers": "Chinese numerals → digits when scoring (cn2an)",
}


@dataclass(frozen=True)
class TextPolicy:
    """Which normalization steps run (see the module doc); ``TextPolicy.parse("default")`` runs them all."""

    steps: frozenset[str] = frozenset(TEXT_NORM_STEPS)

    @classmethod
    def parse(cls, spec: str | Iterable[str] | TextPolicy | None) -> TextPolicy:
        """``default`` (every step), ``none``, or steps separated by commas; ValueError naming a wrong step."""
        if isinstance(spec, TextPolicy):
            return spec
        if spec is None:
            return cls()
        items = [p.strip().lower() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
        if items == ["default"]:
            return cls()
        if items in ([], ["none"]):
            return cls(frozenset())
        unknown = [p for p in items if p not in TEXT_NORM_STEPS]
        if unknown:
            raise ValueError(f"text_norm: unknown step(s) {unknown}; use 'default', 'none' or a comma list of "
                             f"{', '.join(TEXT_NORM_STEPS)}")
        return cls(frozenset(items))

    def spec(self) -> str:
        """The policy as the setting writes it: ``default``, ``none`` or the steps in their fixed order."""
        if self.steps == frozenset(TEXT_NORM_STEPS):
            return "default"
        return ",".join(s for s in TEXT_NORM_STEPS if s in self.steps) or "none"

    def describe(self) -> str:
        """The steps in words, for reports."""
        return "; ".join(STEP_MEANING[s] for s in TEXT_NORM_STEPS if s in self.steps) or "none (raw text)"


DEFAULT_POLICY = TextPolicy()


def _policy_spec(value: str) -> str:
    return TextPolicy.parse(value).spec()


# The ``text_norm`` setting of every stage that makes training targets or scores (extract, evaluate, score): a
# policy spec, checked and written in its canonical form.
TextNormSpec = Annotated[str, AfterValidator(_policy_spec)]
TEXT_NORM_HELP = ("text normalization, the same for training targets (extract) and scoring (evaluate, score): "
                  "default (every step), none, or a comma list of fullwidth, simplified, lowercase, punctuation, "
                  "numbers (Chinese numerals → digits, scoring only)")
TEXT_NORM_EXAMPLES = ["default", "fullwidth,simplified,punctuation"]


@functools.cache
def _cn2an():
    import cn2an

    return cn2an


def numbers_to_digits(text: str) -> str:
    """Chinese numerals → Arabic digits with cn2an (``三个`` → ``3个``, ``二零二四年`` → ``2024年``); text it cannot
    read (``万一``) is kept."""
    if not any("\u4e00" <= ch <= "\u9fff" or ch in "〇零" for ch in text):
        return text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cn2an warns about every idiom it leaves alone
        try:
            return _cn2an().transform(text, "cn2an")
        except Exception:  # a sentence cn2an cannot parse is scored as written
            log.debug("cn2an could not transform %r", text, exc_info=True)
            return text


def _is_separator(ch: str) -> bool:
    """True for characters that carry no spoken content: punctuation, ASCII symbols, spaces, controls."""
    if ch in _ASCII_PUNCTUATION or ch.isspace():
        return True
    category = unicodedata.category(ch)
    return category[0] in "PZC"  # Punctuation, separators (spaces), controls/format/unassigned


def _canonical(text: str, policy: TextPolicy = DEFAULT_POLICY, numbers: bool = True) -> str:
    """Steps 1-3 (NFKC, traditional → simplified, lower case) and, for scoring, numbers → digits; punctuation
    still in place."""
    if not isinstance(text, str):
        raise TypeError(f"expected a transcript as str, got {type(text).__name__}: {text!r}")
    steps = policy.steps
    if "fullwidth" in steps:
        text = unicodedata.normalize("NFKC", text)
    if "simplified" in steps:
        # OpenCC works on phrases, so convert before punctuation is removed and phrases run together.
        text = _converter().convert(text)
    if "lowercase" in steps:
        text = text.lower()
    if numbers and "numbers" in steps:
        text = numbers_to_digits(text)
    return text


def _drops(ch: str, policy: TextPolicy) -> bool:
    """Whether scoring drops ``ch``: whitespace and controls always, punctuation when the policy says so."""
    if ch.isspace() or unicodedata.category(ch)[0] in "ZC":
        return True
    return "punctuation" in policy.steps and _is_separator(ch)


def training_target(text: str, policy: TextPolicy = DEFAULT_POLICY) -> str:
    """The transcript as a model is trained on it: the policy's steps but numbers (kept as transcribed), with
    punctuation removed and a single space kept only between two Latin/digit words (``我用 iPhone，15 块。`` →
    ``我用iphone 15块``); an apostrophe inside a word stays (``don't``).

    >>> training_target("這是「iPhone 15」，好嗎？")
    '这是iphone 15好吗'
    """
    text = _canonical(text, policy, numbers=False)
    out: list[str] = []
    gap = False
    for i, ch in enumerate(text):
        inner_apostrophe = ch in "'’" and 0 < i < len(text) - 1 and text[i - 1].isalpha() and text[i + 1].isalpha()
        if not inner_apostrophe and _drops(ch, policy):
            gap = True
            continue
        if gap and out and not is_cjk_char(ch) and not is_cjk_char(out[-1]) and not _drops(out[-1], policy):
            out.append(" ")
        gap = False
        out.append(ch)
    return "".join(out)


def normalize(text: str, policy: TextPolicy = DEFAULT_POLICY) -> str:
    """Normalized text for CER: NFKC, simplified Chinese, lower case, no punctuation or whitespace.

    >>> normalize("“這是 iPhone，ＡＢＣ１２３！”")
    '这是iphoneabc123'
    """
    return "".join(ch for ch in _canonical(text, policy) if not _drops(ch, policy))


def normalize_words(text: str, policy: TextPolicy = DEFAULT_POLICY) -> list[str]:
    """Tokens for WER: each CJK character alone, each run of other letters/digits as one word.

    Punctuation and whitespace separate tokens and are dropped.

    >>> normalize_words("我用 iPhone 15打電話。")
    ['我', '用', 'iphone', '15', '打', '电', '话']
    """
    tokens: list[str] = []
    run: list[str] = []
    for ch in _canonical(text, policy):
        drop = _drops(ch, policy)
        if drop or is_cjk_char(ch) or _is_separator(ch):  # kept punctuation is a token of its own
            if run:
                tokens.append("".join(run))
                run.clear()
            if not drop:
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
