"""CER/WER/exact/similarity per utterance and per corpus, and prediction-row validation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from common.core.metrics import (
    PredictionsError,
    aggregate,
    load_predictions,
    score_predictions,
    score_rows,
    utterance_errors,
)

# (reference, hypothesis, S, D, I, cer, arithmetic)
CER_CASES = [
    ("這是一個篇章", "这是一个篇章", 0, 0, 0, 0.0, "traditional vs simplified: 0 edits"),
    ("“你好，世界！”", "你好世界", 0, 0, 0, 0.0, "punctuation ignored: 0 edits"),
    ("ＡＢＣ１２３", "abc123", 0, 0, 0, 0.0, "full-width vs half-width: 0 edits"),
    ("今天天气很好", "今天天气很坏", 1, 0, 0, 1 / 6, "好→坏: 1 substitution / 6 chars"),
    ("我们去公园", "我们公园", 0, 1, 0, 1 / 5, "去 dropped: 1 deletion / 5 chars"),
    ("你好", "你好吗", 0, 0, 1, 1 / 2, "吗 added: 1 insertion / 2 chars"),
    ("北京是中国的首都", "北景是中国首都啊", 1, 1, 1, 3 / 8, "京→景, 的 dropped, 啊 added: 3 / 8 chars"),
    ("你好世界", "", 0, 4, 0, 1.0, "empty hypothesis: 4 deletions / 4 chars"),
    ("你好世界", "。！", 0, 4, 0, 1.0, "punctuation-only hypothesis is empty"),
    ("好", "好好好好", 0, 0, 3, 3.0, "3 insertions / 1 char: CER above 1"),
    ("", "", 0, 0, 0, 0.0, "empty reference, empty hypothesis: defined as 0"),
    ("", "你", 0, 0, 1, 1.0, "empty reference, any hypothesis: defined as 1"),
]


@pytest.mark.parametrize(("ref", "hyp", "s", "d", "i", "cer", "arithmetic"), CER_CASES)
def test_utterance_cer(ref: str, hyp: str, s: int, d: int, i: int, cer: float, arithmetic: str) -> None:
    e = utterance_errors(ref, hyp)
    assert (e["char_substitutions"], e["char_deletions"], e["char_insertions"]) == (s, d, i), arithmetic
    assert e["char_errors"] == s + d + i
    assert e["cer"] == pytest.approx(cer), arithmetic
    assert e["exact"] is (s + d + i == 0)


def test_utterance_keeps_normalized_texts() -> None:
    e = utterance_errors("“這是 iPhone！”", "这是IPHONE")
    assert (e["ref_norm"], e["hyp_norm"]) == ("这是iphone", "这是iphone")
    assert e["exact"] is True
    assert (e["ref_chars"], e["char_hits"]) == (8, 8)


# (reference, hypothesis, word S+D+I, ref words, wer, char cer)
WER_CASES = [
    # tokens 我 用 iphone 打 电 话: 6 words, 11 characters
    ("我用 iPhone 打电话", "我用 iphone 打电话", 0, 6, 0.0, 0.0),
    # iphone → i, phone: 1 substitution + 1 insertion = 2 / 6 words; the characters are identical
    ("我用 iPhone 打电话", "我用 I phone 打电话", 2, 6, 2 / 6, 0.0),
    # iphone → 安, 卓: 1 S + 1 I = 2 / 6 words; characters: iphone (6) → 安卓 (2): 2 S + 4 D = 6 / 11
    ("我用 iPhone 打电话", "我用安卓打电话", 2, 6, 2 / 6, 6 / 11),
    # pure Chinese: one word per character, WER = CER = 1 / 4
    ("你好世界", "你好视界", 1, 4, 1 / 4, 1 / 4),
]


@pytest.mark.parametrize(("ref", "hyp", "word_errors", "ref_words", "wer", "cer"), WER_CASES)
def test_utterance_wer_mixed_script(
    ref: str, hyp: str, word_errors: int, ref_words: int, wer: float, cer: float
) -> None:
    e = utterance_errors(ref, hyp)
    assert (e["word_errors"], e["ref_words"]) == (word_errors, ref_words)
    assert e["wer"] == pytest.approx(wer)
    assert e["cer"] == pytest.approx(cer)


def test_corpus_cer_is_total_edits_over_total_chars_not_mean_of_ratios() -> None:
    rows = [
        {"reference": "你好", "hypothesis": "你"},  # 1 deletion / 2 chars = 0.5
        {"reference": "今天天气很好我们去公园散步", "hypothesis": "今天天气很好我们去公园散步"},  # 0 / 13
    ]
    result = aggregate(rows)
    assert result["cer"] == pytest.approx(1 / 15)  # (1 + 0) / (2 + 13)
    mean_of_ratios = (0.5 + 0.0) / 2
    assert result["cer"] != pytest.approx(mean_of_ratios)
    assert (result["ref_chars"], result["char_errors"], result["n"]) == (15, 1, 2)
    assert result["exact"] == pytest.approx(0.5)
    assert result["similarity"] == pytest.approx(1 - 1 / 15)


def test_similarity_is_floored_at_zero_when_insertions_exceed_reference() -> None:
    result = aggregate([{"reference": "好", "hypothesis": "好好好好好好"}])  # 5 insertions / 1 char
    assert result["cer"] == pytest.approx(5.0)
    assert result["similarity"] == 0.0


@pytest.mark.parametrize(
    ("references", "expected_wer"),
    [
        (["你好世界", "今天天气"], None),  # no Latin/digit word anywhere: WER would repeat the CER
        (["你好世界", "我用 iPhone"], 0.0),  # words exist: mixed error rate over all rows
        (["第3章"], 0.0),  # a number is a word too
    ],
)
def test_corpus_wer_only_where_words_exist(references: list[str], expected_wer: float | None) -> None:
    result = aggregate([{"reference": r, "hypothesis": r} for r in references])
    assert result["wer"] == expected_wer
    assert result["cer"] == 0.0


def test_corpus_wer_counts_words_of_all_rows() -> None:
    rows = [
        {"reference": "你好世界", "hypothesis": "你好视界"},  # 1 / 4 tokens
        {"reference": "我用 iPhone 打电话", "hypothesis": "我用安卓打电话"},  # 2 / 6 tokens
    ]
    assert aggregate(rows)["wer"] == pytest.approx(3 / 10)


def test_empty_group_and_empty_references_give_undefined_rates() -> None:
    empty = aggregate([])
    assert (empty["n"], empty["cer"], empty["wer"], empty["exact"], empty["similarity"]) == (
        0,
        None,
        None,
        None,
        None,
    )
    blank = aggregate([{"reference": "。", "hypothesis": "你"}])
    assert blank["cer"] is None and blank["char_insertions"] == 1


@pytest.mark.parametrize(
    ("timings", "audio_seconds", "rtf"),
    [
        ([(2.0, 0.5), (6.0, 1.5)], 8.0, 2.0 / 8.0),  # (duration, decode_seconds) per row
        ([(2.0, None), (6.0, None)], 8.0, None),  # no decode time: no RTF
        ([(None, None), (None, None)], None, None),  # no durations: unknown, not 0
        ([(2.0, 1.0), (6.0, None)], 8.0, 1.0 / 2.0),  # RTF only over rows that carry both
    ],
)
def test_audio_seconds_and_rtf(timings: list, audio_seconds: float | None, rtf: float | None) -> None:
    rows = [
        {"reference": "你好", "hypothesis": "你好", "duration": d, "decode_seconds": t} for d, t in timings
    ]
    result = aggregate(rows)
    assert result["audio_seconds"] == (pytest.approx(audio_seconds) if audio_seconds is not None else None)
    assert result["rtf"] == (pytest.approx(rtf) if rtf is not None else None)


def _row(model: str, name: str, utt: str, ref: str, hyp: str, **extra: float) -> dict:
    return {"id": utt, "reference": ref, "hypothesis": hyp, "model": model, "set": name, **extra}


def test_score_predictions_shape_two_models_two_sets() -> None:
    rows = [
        _row("base", "hsk", "a", "你好世界", "你好视界", duration=2.0, decode_seconds=1.0),
        _row("base", "hsk", "b", "今天天气", "今天天气", duration=2.0, decode_seconds=1.0),
        _row("base", "real", "c", "北京", "背景", duration=1.0, decode_seconds=0.5),
        _row("ft", "hsk", "a", "你好世界", "你好世界", duration=2.0, decode_seconds=0.4),
        _row("ft", "hsk", "b", "今天天气", "今天天气", duration=2.0, decode_seconds=0.4),
        _row("ft", "real", "c", "北京", "北京", duration=1.0, decode_seconds=0.2),
    ]
    before = copy.deepcopy(rows)
    metrics = score_predictions(rows)
    assert rows == before  # inputs are not modified
    assert list(metrics) == ["base", "ft"]
    assert all(list(sets) == ["hsk", "real"] for sets in metrics.values())
    required = {"cer", "wer", "exact", "similarity", "n", "audio_seconds", "rtf"}
    assert all(required <= set(m) for sets in metrics.values() for m in sets.values())
    assert metrics["base"]["hsk"]["cer"] == pytest.approx(1 / 8)  # 视: 1 substitution / 8 chars
    assert metrics["base"]["real"]["cer"] == pytest.approx(1.0)  # 背景: 2 substitutions / 2 chars
    assert metrics["ft"]["hsk"]["cer"] == 0.0
    assert metrics["base"]["hsk"]["n"] == 2
    assert metrics["base"]["hsk"]["exact"] == pytest.approx(0.5)
    assert metrics["base"]["hsk"]["audio_seconds"] == pytest.approx(4.0)
    assert metrics["ft"]["hsk"]["rtf"] == pytest.approx(0.8 / 4.0)
    assert metrics["base"]["hsk"]["wer"] is None  # pure Chinese references
    json.dumps(metrics, allow_nan=False)  # metrics.json-ready


def test_score_rows_keeps_raw_and_adds_errors() -> None:
    [scored] = score_rows([_row("m", "s", "1", "這是", "这是")])
    assert (scored["reference"], scored["ref_norm"], scored["cer"]) == ("這是", "这是", 0.0)


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        ({"id": "2", "reference": "你好", "model": "m", "set": "s"}, r"line 2: missing key 'hypothesis'"),
        ({"id": "2", "hypothesis": "你好", "model": "m", "set": "s"}, r"line 2: missing key 'reference'"),
        (
            {"id": "2", "reference": "你好", "hypothesis": None, "model": "m", "set": "s"},
            r"line 2: 'hypothesis' must be a string",
        ),
        (
            {"id": "2", "reference": "你好", "hypothesis": "", "model": "", "set": "s"},
            r"line 2: 'model' must be a non-empty",
        ),
        (
            {"id": "2", "reference": "你", "hypothesis": "", "model": "m", "set": "s", "duration": -1},
            r"line 2: 'duration' must be",
        ),
        (
            {"id": "1", "reference": "你好", "hypothesis": "你好", "model": "m", "set": "s"},
            r"line 2: duplicate id '1'.*line 1",
        ),
        (["not", "an", "object"], r"line 2: expected a JSON object"),
    ],
)
def test_malformed_row_error_names_line_and_key(bad_row: object, expected: str) -> None:
    rows = [_row("m", "s", "1", "你好", "你好"), bad_row]
    with pytest.raises(PredictionsError, match=expected):
        score_predictions(rows)  # type: ignore[arg-type]


def test_all_problems_are_reported_at_once() -> None:
    rows = [{"id": "1"}, {"id": "2"}]
    with pytest.raises(PredictionsError) as info:
        score_predictions(rows)
    message = str(info.value)
    assert "line 1: missing key 'reference'" in message and "line 2: missing key 'set'" in message


def test_load_predictions_names_file_and_line(tmp_path: Path) -> None:
    good = tmp_path / "base.jsonl"
    good.write_text(
        json.dumps(_row("base", "s", "1", "你好", "你好"), ensure_ascii=False) + "\n\n", encoding="utf-8"
    )
    bad = tmp_path / "ft.jsonl"
    bad.write_text(
        json.dumps(_row("ft", "s", "1", "你好", "你"))
        + "\n{not json\n"
        + json.dumps({"id": "3", "model": "ft"})
        + "\n",
        encoding="utf-8",
    )
    assert [r["model"] for r in load_predictions([good])] == ["base"]
    with pytest.raises(PredictionsError) as info:
        load_predictions([good, bad])
    message = str(info.value)
    assert f"{bad} line 2: not valid JSON" in message
    assert f"{bad} line 3: missing key 'reference'" in message


def test_load_predictions_finds_duplicates_across_files(tmp_path: Path) -> None:
    paths = []
    for name in ("a.jsonl", "b.jsonl"):
        path = tmp_path / name
        path.write_text(json.dumps(_row("m", "s", "1", "你好", "你好")) + "\n", encoding="utf-8")
        paths.append(path)
    with pytest.raises(PredictionsError, match=r"b\.jsonl line 1: duplicate id '1'.*a\.jsonl line 1"):
        load_predictions(paths)
