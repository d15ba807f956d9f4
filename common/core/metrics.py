"""Scoring of ASR predictions: CER, WER, exact match, similarity, real-time factor.

Every comparison runs on normalized text (:mod:`common.core.text`, a :class:`~common.core.text.TextPolicy`:
by default NFKC, traditional → simplified, lower case, no punctuation, and Chinese numerals read as digits on
both sides, so 「3个」 and 「三个」 match); the edit counts come from jiwer.

Definitions (per utterance, then per group of utterances):

- **CER** (character error rate, 字错率) = (S + D + I) / N over normalized characters, where
  N is the number of reference characters. It can exceed 1 when the hypothesis has many
  insertions. A group's CER is *corpus level*: total edits / total reference characters, so a
  long utterance weighs more than a short one (the mean of per-utterance ratios would let a
  two-character utterance count as much as a paragraph).
- **Empty reference** (nothing scoreable, which prepare normally rejects): the utterance CER
  is 0.0 when the hypothesis is empty too and 1.0 otherwise, so that it stays finite in plots
  and rankings. Its insertions still count in the group's total edits. A group whose
  references hold no character at all has CER ``None`` (undefined).
- **WER** (词错率) uses the mixed-error-rate tokens of :func:`common.core.text.normalize_words`:
  each CJK character is a token, each Latin/digit run is a word. On purely Chinese text that
  would repeat the CER, so a group's WER is reported only *where words exist*: when at least
  one reference in the group contains a Latin/digit word token. Otherwise it is ``None``.
- **exact** (完全正确率) = share of utterances whose normalized hypothesis equals the
  normalized reference.
- **similarity** (相似度) = max(0, 1 - CER).
- **audio_seconds** = sum of the rows' ``duration`` (None when no row carries one);
  **rtf** (real-time factor) = sum of ``decode_seconds`` / sum of ``duration`` over the rows
  that carry both (None when there are none). Below 1 means faster than real time.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jiwer

from common.core.text import DEFAULT_POLICY, TextPolicy, is_cjk_char, normalize, normalize_words

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("id", "reference", "hypothesis", "model", "set")
OPTIONAL_NUMBER_KEYS = ("duration", "decode_seconds")
MAX_REPORTED_ERRORS = 20  # a broken file gives thousands of identical errors; show the first ones

# Keys that utterance_errors() adds to a row; aggregate() sums the counts.
_CHAR_COUNTS = ("ref_chars", "char_hits", "char_substitutions", "char_deletions", "char_insertions")
_WORD_COUNTS = ("ref_words", "word_hits", "word_substitutions", "word_deletions", "word_insertions")


class PredictionsError(ValueError):
    """Prediction rows that cannot be scored; the message lists every problem found (up to a limit)."""


# ---------------------------------------------------------------------------------------------
# One utterance
# ---------------------------------------------------------------------------------------------


def _error_rate(edits: int, ref_len: int) -> float:
    """edits / ref_len, with the empty-reference rule of the module docstring."""
    if ref_len == 0:
        return 0.0 if edits == 0 else 1.0
    return edits / ref_len


def _char_counts(ref_norm: str, hyp_norm: str) -> dict[str, int]:
    if not ref_norm and not hyp_norm:  # jiwer needs at least one side to align
        return dict.fromkeys(_CHAR_COUNTS, 0)
    out = jiwer.process_characters(ref_norm, hyp_norm)
    return {
        "ref_chars": len(ref_norm),
        "char_hits": out.hits,
        "char_substitutions": out.substitutions,
        "char_deletions": out.deletions,
        "char_insertions": out.insertions,
    }


def _word_counts(ref_words: list[str], hyp_words: list[str]) -> dict[str, int]:
    if not ref_words and not hyp_words:
        return dict.fromkeys(_WORD_COUNTS, 0)
    # Tokens contain neither spaces nor punctuation, so joining with one space and letting
    # jiwer split on whitespace gives back exactly these tokens.
    out = jiwer.process_words(" ".join(ref_words), " ".join(hyp_words))
    return {
        "ref_words": len(ref_words),
        "word_hits": out.hits,
        "word_substitutions": out.substitutions,
        "word_deletions": out.deletions,
        "word_insertions": out.insertions,
    }


def utterance_errors(reference: str, hypothesis: str, policy: TextPolicy = DEFAULT_POLICY) -> dict[str, Any]:
    """Errors of one hypothesis against its reference, on text normalized by ``policy``.

    Returns ``ref_norm``, ``hyp_norm``; character counts ``ref_chars``, ``char_hits``,
    ``char_substitutions``, ``char_deletions``, ``char_insertions``, ``char_errors`` (S+D+I)
    and ``cer``; the same for words (``ref_words``, ``word_*``, ``word_errors``, ``wer``) plus
    ``has_words`` (the reference holds a Latin/digit word); and ``exact``.

    >>> e = utterance_errors("我用 iPhone 打电话", "我用iphone打电")
    >>> round(e["cer"], 4), e["char_deletions"], round(e["wer"], 4), e["exact"]  # 1/11 chars, 1/6 words
    (0.0909, 1, 0.1667, False)
    """
    ref_norm, hyp_norm = normalize(reference, policy), normalize(hypothesis, policy)
    ref_words, hyp_words = normalize_words(reference, policy), normalize_words(hypothesis, policy)
    chars = _char_counts(ref_norm, hyp_norm)
    words = _word_counts(ref_words, hyp_words)
    char_errors = chars["char_substitutions"] + chars["char_deletions"] + chars["char_insertions"]
    word_errors = words["word_substitutions"] + words["word_deletions"] + words["word_insertions"]
    assert chars["char_hits"] + chars["char_substitutions"] + chars["char_deletions"] == len(ref_norm)
    return {
        "ref_norm": ref_norm,
        "hyp_norm": hyp_norm,
        **chars,
        "char_errors": char_errors,
        "cer": _error_rate(char_errors, chars["ref_chars"]),
        **words,
        "word_errors": word_errors,
        "wer": _error_rate(word_errors, words["ref_words"]),
        "has_words": any(not is_cjk_char(w) and any(ch.isalnum() for ch in w) for w in ref_words),
        "exact": ref_norm == hyp_norm,
    }


# ---------------------------------------------------------------------------------------------
# Groups of utterances
# ---------------------------------------------------------------------------------------------


def with_errors(row: Mapping[str, Any], policy: TextPolicy | None = None) -> Mapping[str, Any]:
    """The row with its utterance_errors fields (computed when the row does not carry them, or always when a
    ``policy`` is given)."""
    if policy is None and "char_errors" in row and "word_errors" in row:
        return row
    return {**row, **utterance_errors(row["reference"], row["hypothesis"], policy or DEFAULT_POLICY)}


def _sum_optional(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return sum(values) if values else None


def _rtf(rows: Sequence[Mapping[str, Any]]) -> float | None:
    timed = [r for r in rows if r.get("duration") is not None and r.get("decode_seconds") is not None]
    audio = sum(float(r["duration"]) for r in timed)
    if audio <= 0:
        return None
    return sum(float(r["decode_seconds"]) for r in timed) / audio


def aggregate(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Corpus-level metrics of a group of rows (scored rows, or rows with reference/hypothesis).

    Returns ``cer``, ``wer``, ``exact``, ``similarity``, ``n``, ``audio_seconds``, ``rtf`` as
    defined in the module docstring, plus the totals they come from (``ref_chars``,
    ``char_errors``, ``char_substitutions``, ``char_deletions``, ``char_insertions``,
    ``ref_words``, ``word_errors``, ``decode_seconds``) so that groups can be compared and
    re-added. An empty group gives ``n`` 0 and ``None`` rates.
    """
    scored = [with_errors(r) for r in rows]
    n = len(scored)
    total = {k: sum(int(r[k]) for r in scored) for k in (*_CHAR_COUNTS, *_WORD_COUNTS)}
    char_errors = sum(int(r["char_errors"]) for r in scored)
    word_errors = sum(int(r["word_errors"]) for r in scored)
    cer = char_errors / total["ref_chars"] if total["ref_chars"] else None
    has_words = any(r["has_words"] for r in scored)
    wer = word_errors / total["ref_words"] if has_words and total["ref_words"] else None
    return {
        "cer": cer,
        "wer": wer,
        "exact": sum(bool(r["exact"]) for r in scored) / n if n else None,
        "similarity": max(0.0, 1.0 - cer) if cer is not None else None,
        "n": n,
        "audio_seconds": _sum_optional(scored, "duration"),
        "rtf": _rtf(scored),
        "ref_chars": total["ref_chars"],
        "char_errors": char_errors,
        "char_substitutions": total["char_substitutions"],
        "char_deletions": total["char_deletions"],
        "char_insertions": total["char_insertions"],
        "ref_words": total["ref_words"],
        "word_errors": word_errors,
        "decode_seconds": _sum_optional(scored, "decode_seconds"),
    }


# ---------------------------------------------------------------------------------------------
# Prediction files: validation at the boundary, then scoring per model and set
# ---------------------------------------------------------------------------------------------


class _InvalidJson(str):
    """A JSONL line that did not parse; its text is the parser's complaint."""


def _row_problems(row: Any, where: str) -> list[str]:
    """Everything wrong with one prediction row, each message naming ``where`` and the key."""
    if isinstance(row, _InvalidJson):
        return [f"{where}: not valid JSON ({row}); each line must hold one JSON object"]
    if not isinstance(row, Mapping):
        return [
            f"{where}: expected a JSON object with keys {', '.join(REQUIRED_KEYS)}, got {type(row).__name__}"
        ]
    problems = []
    for key in REQUIRED_KEYS:
        if key not in row:
            problems.append(
                f"{where}: missing key {key!r} (every row needs {', '.join(REQUIRED_KEYS)}; "
                f"this row has {', '.join(map(str, row)) or 'no keys'})"
            )
        elif key in ("reference", "hypothesis") and not isinstance(row[key], str):
            problems.append(
                f"{where}: {key!r} must be a string, got {type(row[key]).__name__} {row[key]!r} "
                f'(write "" for a model that recognized nothing)'
            )
        elif key in ("id", "model", "set") and (not isinstance(row[key], str | int) or str(row[key]) == ""):
            problems.append(f"{where}: {key!r} must be a non-empty string, got {row[key]!r}")
    for key in OPTIONAL_NUMBER_KEYS:
        value = row.get(key)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            problems.append(f"{where}: {key!r} must be a number of seconds >= 0 or absent, got {value!r}")
    return problems


def _check(numbered_rows: Iterable[tuple[str, Any]], source: str) -> None:
    """Raise :class:`PredictionsError` listing every malformed or duplicate row.

    ``numbered_rows`` pairs each row with where it came from (``"preds.jsonl line 3"``).
    """
    problems: list[str] = []
    first_seen: dict[tuple[str, str, str], str] = {}
    for where, row in numbered_rows:
        row_problems = _row_problems(row, where)
        problems += row_problems
        if row_problems:
            continue
        key = (str(row["model"]), str(row["set"]), str(row["id"]))
        if key in first_seen:
            problems.append(
                f"{where}: duplicate id {key[2]!r} for model {key[0]!r}, set {key[1]!r} "
                f"(first seen at {first_seen[key]}); each utterance must be scored once per model"
            )
        first_seen.setdefault(key, where)
    if problems:
        shown = problems[:MAX_REPORTED_ERRORS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise PredictionsError(f"{len(problems)} problem(s) in {source}:\n  " + "\n  ".join(shown) + more)


def validate_rows(rows: Sequence[Any], source: str = "predictions") -> None:
    """Raise :class:`PredictionsError` listing every malformed or duplicate row.

    Rows are numbered from 1 like the lines of the JSONL file they came from
    (``predictions line 3: missing key 'hypothesis' ...``).
    """
    _check(((f"{source} line {i}", row) for i, row in enumerate(rows, start=1)), source)


def _read_jsonl(path: Path) -> Iterable[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, _InvalidJson(f"{e.msg} at column {e.colno}")


def load_predictions(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read and validate prediction JSONL files (one object per line; blank lines skipped).

    Errors name the file and line; duplicates are found across files too. Rows come back in
    file order, files in the given order.
    """
    numbered = [item for path in paths for item in _read_jsonl(Path(path))]
    _check(numbered, "the predictions files")
    return [dict(row) for _, row in numbered]


def score_rows(rows: Sequence[Mapping[str, Any]], source: str = "predictions",
               policy: TextPolicy = DEFAULT_POLICY) -> list[dict[str, Any]]:
    """Validate prediction rows and return each one extended with its :func:`utterance_errors`."""
    validate_rows(rows, source)
    return [{**row, **utterance_errors(row["reference"], row["hypothesis"], policy)} for row in rows]


def metrics_by_model_set(scored_rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: {set: aggregate(...)}}`` with models and sets in order of first appearance."""
    groups: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for row in scored_rows:
        groups.setdefault(str(row["model"]), {}).setdefault(str(row["set"]), []).append(row)
    return {model: {name: aggregate(rows) for name, rows in sets.items()} for model, sets in groups.items()}


def score_predictions(rows: Sequence[Mapping[str, Any]],
                      policy: TextPolicy = DEFAULT_POLICY) -> dict[str, dict[str, dict[str, Any]]]:
    """Metrics per model and set for rows ``{"id","reference","hypothesis","model","set"}``
    (optional ``"duration"``, ``"decode_seconds"`` in seconds).

    Returns ``{model: {set: {"cer","wer","exact","similarity","n","audio_seconds","rtf", …totals}}}``.
    Raises :class:`PredictionsError` naming the line and key of every malformed row.
    Use :func:`score_rows` + :func:`metrics_by_model_set` to keep the per-utterance rows too.
    """
    return metrics_by_model_set(score_rows(rows, policy=policy))
