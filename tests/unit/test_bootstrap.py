"""Paired bootstrap of a CER difference over utterances: known answers on constructed cases."""

from __future__ import annotations

import numpy as np
import pytest

from common.core.bootstrap import BETTER, SAME, WORSE, compare, paired_cer_difference, verdict


def _refs(n: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(8, 30, n)


def test_identical_systems_interval_is_zero():
    chars = _refs()
    errors = np.random.default_rng(1).binomial(chars, 0.2)
    ci = paired_cer_difference(errors, errors, chars)
    assert ci.delta == 0 and ci.low <= 0 <= ci.high and ci.verdict == SAME and ci.n == 60


def test_ten_points_better_on_every_utterance_excludes_zero():
    chars = _refs() * 10  # multiples of 10: exactly 10 points fewer errors on each utterance
    base = np.random.default_rng(2).binomial(chars, 0.3) + chars // 10
    model = base - chars // 10
    ci = paired_cer_difference(base, model, chars)
    assert ci.delta == pytest.approx(-0.10)
    assert ci.high < 0 and ci.verdict == BETTER
    assert ci.low == pytest.approx(-0.10) and ci.high == pytest.approx(-0.10)  # the same gain on every resample
    flipped = paired_cer_difference(model, base, chars)
    assert flipped.low > 0 and flipped.verdict == WORSE


def test_noisy_equal_systems_interval_straddles_zero_and_is_seeded():
    chars = _refs(200)
    rng = np.random.default_rng(3)
    a, b = rng.binomial(chars, 0.2), rng.binomial(chars, 0.2)
    first, again = paired_cer_difference(a, b, chars), paired_cer_difference(a, b, chars)
    assert first == again  # seeded: the same data give the same interval
    assert first.low < first.delta < first.high
    assert first.high - first.low < 0.05  # 200 utterances of ~20 chars: a few points wide, not more


def test_pairing_narrows_the_interval():
    """Two systems whose difference is small but consistent: paired resampling sees it."""
    chars = _refs(100) * 4
    base = np.random.default_rng(4).binomial(chars, 0.4)
    model = base - chars // 20  # 5 points better on every utterance, on top of large shared variation
    assert paired_cer_difference(base, model, chars).verdict == BETTER


@pytest.mark.parametrize(("low", "high", "expected"), [(-0.2, -0.01, BETTER), (0.01, 0.2, WORSE),
                                                       (-0.01, 0.01, SAME), (0.0, 0.0, SAME)])
def test_verdict(low, high, expected):
    assert verdict(low, high) == expected


def test_edges():
    assert paired_cer_difference([], [], []) is None
    assert paired_cer_difference([1], [0], [0]) is None  # no reference character
    one = paired_cer_difference([3], [1], [10])
    assert one.delta == pytest.approx(-0.2) and one.low == one.high == one.delta
    with pytest.raises(ValueError, match="differ in length"):
        paired_cer_difference([1, 2], [1], [5, 5])


def test_compare_pairs_rows_by_set_and_id():
    rows = [
        {"model": "a", "set": "s", "id": "1", "char_errors": 2, "ref_chars": 10},
        {"model": "a", "set": "s", "id": "2", "char_errors": 4, "ref_chars": 10},
        {"model": "b", "set": "s", "id": "2", "char_errors": 0, "ref_chars": 10},
        {"model": "b", "set": "s", "id": "1", "char_errors": 0, "ref_chars": 10},
        {"model": "b", "set": "other", "id": "1", "char_errors": 9, "ref_chars": 10},
    ]
    ci = compare(rows, "a", "b", "s")
    assert ci.n == 2 and ci.delta == pytest.approx(-0.3) and ci.verdict == BETTER
