"""Paired bootstrap over utterances: is model B's CER really different from model A's on the same set?

    ci = paired_cer_difference(base_errors, model_errors, ref_chars)   # per-utterance arrays, same order
    ci.delta, ci.low, ci.high, ci.verdict                               # B − A in CER (fractions), 95 % interval

The standard comparison of two ASR systems on one test set (Bisani & Ney, "Bootstrap estimates for confidence
intervals in ASR performance evaluation", ICASSP 2004): resample the utterances with replacement — the same
utterances for both systems (paired) — and recompute the corpus-level CER difference on every resample:

    Δ = Σ errors_B / Σ ref_chars − Σ errors_A / Σ ref_chars        (sums over the resampled utterances)

The 95 % interval is the 2.5th … 97.5th percentile of Δ over ``N_RESAMPLES`` resamples
(``scipy.stats.bootstrap``, ``paired=True``, vectorised, seeded: the same data give the same interval).
Verdict: "better" when the whole interval is below 0 (B makes fewer errors), "worse" when it is above 0,
else "no significant difference".

Percentile intervals (not BCa): they stay defined when every utterance has the same difference (identical
systems give exactly [0, 0]), and with a few dozen utterances or more they agree with BCa to a few tenths of a
point. Utterances are treated as independent; many clips of one speaker make the interval too narrow for
other speakers (say so when you report it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 10_000
SEED = 0
BETTER, WORSE, SAME = "better", "worse", "no significant difference"
METHOD = f"paired bootstrap over utterances, {N_RESAMPLES} resamples, percentile {int(CONFIDENCE * 100)} % interval"


@dataclass(frozen=True)
class Interval:
    """Δ CER (model − baseline, fractions: 0.01 = one point) with its 95 % interval and the verdict."""

    delta: float
    low: float
    high: float
    verdict: str
    n: int

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "method": METHOD}

    def text(self) -> str:
        """'-12.30 pp [-15.10, -9.80] better' (percentage points)."""
        return f"{100 * self.delta:+.2f} pp [{100 * self.low:+.2f}, {100 * self.high:+.2f}] {self.verdict}"


def verdict(low: float, high: float) -> str:
    return BETTER if high < 0 else WORSE if low > 0 else SAME


def paired_cer_difference(base_errors: Sequence[float], model_errors: Sequence[float],
                          ref_chars: Sequence[float], *, n_resamples: int = N_RESAMPLES,
                          seed: int = SEED) -> Interval | None:
    """Interval of CER(model) − CER(baseline) over the same utterances (index i = one utterance in all three
    arrays). None when there is nothing to compare (no utterance, or no reference character)."""
    from scipy.stats import bootstrap

    a, b, n = (np.asarray(x, dtype=float) for x in (base_errors, model_errors, ref_chars))
    if not (len(a) == len(b) == len(n)):
        raise ValueError(f"per-utterance arrays differ in length: {len(a)}, {len(b)}, {len(n)}")
    if len(a) == 0 or n.sum() <= 0:
        return None
    delta = float((b.sum() - a.sum()) / n.sum())
    if len(a) == 1 or np.all(b - a == (b - a)[0]) and np.all(n == n[0]):
        low = high = delta  # every resample is the same set of values: no spread
    else:
        def statistic(x, y, chars, axis=-1):
            total = chars.sum(axis=axis)
            return (y.sum(axis=axis) - x.sum(axis=axis)) / np.where(total > 0, total, np.nan)

        res = bootstrap((a, b, n), statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                        confidence_level=CONFIDENCE, method="percentile", batch=1000,
                        rng=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return Interval(delta, low, high, verdict(low, high), int(len(a)))


def paired_rows(rows: Sequence[Mapping[str, Any]], baseline: str, model: str, set_name: str
                ) -> tuple[list[int], list[int], list[int]]:
    """(baseline errors, model errors, reference characters) of the utterances of ``set_name`` that both
    models transcribed, in one order. Rows are scored prediction rows (``char_errors``, ``ref_chars``)."""
    base = {str(r["id"]): r for r in rows if str(r["model"]) == baseline and str(r["set"]) == set_name}
    a, b, n = [], [], []
    for r in rows:
        if str(r["model"]) == model and str(r["set"]) == set_name and str(r["id"]) in base:
            a.append(int(base[str(r["id"])]["char_errors"]))
            b.append(int(r["char_errors"]))
            n.append(int(r["ref_chars"]))
    return a, b, n


def compare(rows: Sequence[Mapping[str, Any]], baseline: str, model: str, set_name: str) -> Interval | None:
    """The paired interval of ``model`` − ``baseline`` on ``set_name`` from scored prediction rows."""
    return paired_cer_difference(*paired_rows(rows, baseline, model, set_name))
