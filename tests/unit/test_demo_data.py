"""Mandarin demo data: layout, audio format, disjoint splits, determinism, and espeak-ng's reading of pinyin."""

from __future__ import annotations

import csv
import re
import subprocess
from pathlib import Path

import pytest
import soundfile as sf

from common.core import demo_data
from common.core.demo_data import (
    MAX_SYLLABLES,
    MIN_SYLLABLES,
    SAMPLE_RATE,
    VOICE,
    EspeakError,
    check_espeak,
    clean_pinyin,
    generate_demo_data,
    sentence_pool,
    split_pool,
)


def _generate(out: Path, **kwargs) -> dict:
    kwargs = {"n_train": 4, "n_test": 2, "seed": 0, "workers": 1, "progress": False} | kwargs
    return generate_demo_data(out, **kwargs)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _tree(root: Path) -> dict[str, bytes]:
    """Every file's bytes, except the summary (it holds wall-clock times)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != demo_data.SUMMARY_FILE
    }


@pytest.mark.parametrize(
    ("pinyin", "expected"),
    [
        ("ni3 hao3", "ni3 hao3"),
        ("Ni3 hao3!", "ni3 hao3"),  # case and punctuation
        ("ta1 shuo1 ， hao3 。", "ta1 shuo1 hao3"),  # full-width punctuation
        ("nü3 er2", "nv3 er2"),  # ü → v, which espeak-ng reads as [y]
        ("lu:4", "lv4"),
        ("ma1 ma", "ma1 ma5"),  # no digit = neutral tone (espeak-ng would read it as tone 1)
        ("hai2 r5", "hai2 r5"),
        ("mai3 3 ge5", None),  # a bare digit
        ("ma6", None),  # no such tone
        ("ni3 hao3 OK1", "ni3 hao3 ok1"),  # letters+digit pass; sentence_pool's syllable count catches it
        ("", None),
        ("。", None),
    ],
)
def test_clean_pinyin(pinyin: str, expected: str | None) -> None:
    assert clean_pinyin(pinyin) == expected


@pytest.mark.parametrize(
    ("pinyin", "tones"),
    [
        ("ma1 ma2 ma3 ma4 ma5", ["55", "35", "21", "51", "11"]),  # four contours + neutral
        ("ma ma1", ["55", "55"]),  # a missing digit is read as tone 1, hence clean_pinyin's 5
        ("ni3 hao3", ["35", "214"]),  # third-tone sandhi
        ("nv3 lv4", ["21", "51"]),
        ("hai2 r5", ["35", "33"]),  # 儿 as its own neutral syllable
    ],
)
def test_espeak_reads_tone_digits_as_contours(pinyin: str, tones: list[str]) -> None:
    phonemes = subprocess.run(
        ["espeak-ng", "-v", VOICE, "-q", "-x", pinyin], capture_output=True, text=True, check=True
    ).stdout
    assert re.findall(r"\d\d+", phonemes) == tones, phonemes


def test_sentence_pool_is_clean_and_unique() -> None:
    pool = sentence_pool()
    assert len(pool) > 4000  # the package has 4,354; a few are dropped
    assert len({s.text for s in pool}) == len(pool)
    assert len({s.id for s in pool}) == len(pool)
    for s in pool:
        syllables = s.pinyin.split()
        assert all(re.fullmatch(r"[a-z]+[1-5]", x) for x in syllables), s
        assert MIN_SYLLABLES <= len(syllables) <= MAX_SYLLABLES, s
        assert len(syllables) == len(re.findall(r"[\u4e00-\u9fff]", s.text)), s


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_is_disjoint_and_grows_train_only(seed: int) -> None:
    pool = sentence_pool()
    train, test = split_pool(pool, 240, 40, seed)
    assert (len(train), len(test)) == (240, 40)
    assert not {s.text for s in train} & {s.text for s in test}
    bigger_train, same_test = split_pool(pool, 300, 40, seed)
    assert same_test == test and bigger_train[:240] == train


@pytest.mark.parametrize(("n_train", "n_test"), [(0, 5), (5, -1), (5000, 5)])
def test_impossible_counts_fail_before_any_work(tmp_path: Path, n_train: int, n_test: int) -> None:
    with pytest.raises(ValueError, match="n_train"):
        _generate(tmp_path / "demo", n_train=n_train, n_test=n_test)
    assert not (tmp_path / "demo").exists()


def test_layout_csvs_and_audio_format(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    summary = _generate(out, n_train=5, n_test=3)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no staging folder left behind
    train, test = _read_csv(out / "train.csv"), _read_csv(out / "answers.csv")
    for rows, audio_dir, n in [(train, "audio", 5), (test, "test_audio", 3)]:
        assert len(rows) == n and list(rows[0]) == ["audio_id", "text"]
        assert sorted(p.stem for p in (out / audio_dir).iterdir()) == sorted(r["audio_id"] for r in rows)
        for row in rows:
            assert re.search(r"[\u4e00-\u9fff]", row["text"]), row
            info = sf.info(out / audio_dir / f"{row['audio_id']}.wav")
            assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
            assert 1.0 < info.duration < demo_data.MAX_CLIP_SECONDS
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert (summary["n_train"], summary["n_test"], summary["skipped"]) == (5, 3, False)
    assert summary["total_seconds"] == pytest.approx(
        summary["train_seconds"] + summary["test_seconds"], abs=0.02
    )
    assert "CC-BY-SA-4.0" in (out / demo_data.ATTRIBUTION_FILE).read_text("utf-8")


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path: Path) -> None:
    _generate(tmp_path / "a", workers=1)
    _generate(tmp_path / "b", workers=2)
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert len(a) == 2 + 4 + 2 + 1  # two CSVs, 4 + 2 wavs, attribution
    assert a == b


def test_other_seed_other_sentences(tmp_path: Path) -> None:
    _generate(tmp_path / "s0", seed=0)
    _generate(tmp_path / "s1", seed=1)
    ids = [{r["audio_id"] for r in _read_csv(tmp_path / s / "train.csv")} for s in ("s0", "s1")]
    assert ids[0] != ids[1]


def test_rerun_is_skipped_and_other_data_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    _generate(out)
    assert _generate(out)["skipped"] is True
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _generate(out, seed=1)
    replaced = _generate(out, seed=1, overwrite=True)
    assert replaced["skipped"] is False and replaced["params"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_missing_espeak_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(EspeakError, match=r"espeak-ng.*not on PATH.*apt-get install -y espeak-ng"):
        _generate(tmp_path / "demo")
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"voice": "cmn-latn-nosuch"}, "no voice 'cmn-latn-nosuch'"),
        ({"variants": ("f2", "nosuch-variant")}, r"lacks the voice variants \['nosuch-variant'\]"),
    ],
)
def test_missing_voice_or_variant_is_named(kwargs: dict, message: str) -> None:
    with pytest.raises(EspeakError, match=message):
        check_espeak(**kwargs)


def test_an_espeak_ng_missing_some_variants_speaks_with_the_others(caplog: pytest.LogCaptureFixture) -> None:
    from common.core.demo_data import MIN_VARIANTS, VOICE_VARIANTS, espeak_voices

    wanted = VOICE_VARIANTS[:MIN_VARIANTS] + ("nosuch-variant",)
    with caplog.at_level("WARNING"):
        version, have = espeak_voices(variants=wanted)
    assert version and have == VOICE_VARIANTS[:MIN_VARIANTS]
    assert "lacks 1 of the demo's 9 voice variants (nosuch-variant)" in caplog.text
    with pytest.raises(EspeakError, match="lacks the voice variants"):  # too few left
        espeak_voices(variants=VOICE_VARIANTS[: MIN_VARIANTS - 1] + ("nosuch-variant",))
