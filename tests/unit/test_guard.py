"""The forgetting guard's rule and its held-aside slice (jobs/finetune/guard.py), on constructed cases."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from common.core.stage import StageFailed
from jobs.finetune.guard import PRETRAINED, Scored, choice_holdout_size, choose, held_aside, too_small

N = 50
GUARD_CHARS = [20] * N
DOMAIN_CHARS = [10] * 30
RNG = np.random.default_rng(0)
PRE_GUARD = list(RNG.binomial(20, 0.2, N))  # pretrained: ~20 % CER on general speech
PRE_DOMAIN = [10] * 30  # pretrained: 100 % CER on the domain


def _model(name: str, domain_errors: int, guard_shift: int) -> Scored:
    """domain_errors per domain utterance; guard errors = pretrained's + guard_shift on every utterance."""
    return Scored(name, name, [domain_errors] * 30, [e + guard_shift for e in PRE_GUARD])


PRETRAINED_SCORED = Scored(PRETRAINED, "", PRE_DOMAIN, PRE_GUARD)


def test_best_domain_candidate_breaking_the_tolerance_is_not_chosen():
    candidates = [
        _model("as-trained", 1, 2),   # best domain (10 %), but 2 chars of 20 = +10 points on every guard clip
        _model("half", 2, 0),         # 20 % on the domain, guard unchanged
        _model("quarter", 5, 0),      # 50 % on the domain, guard unchanged
    ]
    choice = choose(PRETRAINED_SCORED, candidates, DOMAIN_CHARS, GUARD_CHARS, tolerance_points=1.0)
    assert choice.chosen == "half" and choice.met_tolerance
    verdicts = {v.name: v for v in choice.candidates}
    assert not verdicts["as-trained"].passes and verdicts["as-trained"].guard_delta.low > 0.01
    assert verdicts["half"].passes and verdicts["quarter"].passes
    assert verdicts["as-trained"].domain_cer == pytest.approx(0.1)
    assert "+1.00 pp" in verdicts["as-trained"].reason or ">" in verdicts["as-trained"].reason
    assert choice.pretrained["guard_cer"] == pytest.approx(sum(PRE_GUARD) / (20 * N))


def test_a_loss_within_the_tolerance_passes_and_a_generous_tolerance_admits_more():
    small = Scored("small-loss", "", [1] * 30, [e + (1 if i % 10 == 0 else 0) for i, e in enumerate(PRE_GUARD)])
    # +1 char on 5 of 50 clips of 20 chars = +0.5 point: within 1 point with confidence
    choice = choose(PRETRAINED_SCORED, [small, _model("safe", 4, 0)], DOMAIN_CHARS, GUARD_CHARS, 1.0)
    assert choice.chosen == "small-loss"
    strict = choose(PRETRAINED_SCORED, [small, _model("safe", 4, 0)], DOMAIN_CHARS, GUARD_CHARS, 0.0)
    assert strict.chosen == "safe"  # tolerance 0: only candidates with no evidence of any loss
    loose = choose(PRETRAINED_SCORED, [_model("as-trained", 1, 2), _model("half", 2, 0)], DOMAIN_CHARS,
                   GUARD_CHARS, 15.0)
    assert loose.chosen == "as-trained"


def test_none_passes_says_so_and_falls_back():
    candidates = [_model("a", 1, 3), _model("b", 2, 2)]
    closest = choose(PRETRAINED_SCORED, candidates, DOMAIN_CHARS, GUARD_CHARS, 1.0, "closest")
    assert not closest.met_tolerance and closest.chosen == "b"  # the smaller loss on the guard set
    assert "no candidate meets the guard tolerance" in closest.reason
    pre = choose(PRETRAINED_SCORED, candidates, DOMAIN_CHARS, GUARD_CHARS, 1.0, "pretrained")
    assert not pre.met_tolerance and pre.chosen == PRETRAINED


def test_without_a_domain_slice_the_first_passing_candidate_wins():
    a, b = _model("trained-furthest", 0, 0), _model("pulled-back", 0, 0)
    a.domain_errors = b.domain_errors = []
    bad = Scored("forgets", "", [], [e + 3 for e in PRE_GUARD])
    pre = Scored(PRETRAINED, "", [], PRE_GUARD)
    assert choose(pre, [bad, a, b], [], GUARD_CHARS, 1.0).chosen == "trained-furthest"


def test_held_aside_is_deterministic_and_order_free():
    ids = [f"hsk3-{i:04d}" for i in range(330)]
    first = held_aside(ids, 33)
    assert len(first) == 33 and first == held_aside(list(reversed(ids)), 33)
    assert held_aside(ids, 0) == set()
    assert held_aside(ids, 10) <= first  # a smaller slice is part of a larger one


@pytest.mark.parametrize(("guard", "forced", "clips", "expected"), [
    (None, None, 300, 0),        # no guard: nothing held aside
    ("g", None, 330, 33),        # 10 %
    ("g", None, 1000, 40),       # at most 40
    ("g", None, 60, 8),          # at least 8
    ("g", None, 39, 0),          # too little data to spare any
    (None, 5, 100, 5),           # the setting wins
])
def test_choice_holdout_size(guard, forced, clips, expected):
    n, why = choice_holdout_size(SimpleNamespace(guard=guard, choice_holdout=forced), clips)
    assert n == expected and why


def test_choice_holdout_larger_than_the_data_is_refused():
    with pytest.raises(StageFailed, match="hold aside fewer"):
        choice_holdout_size(SimpleNamespace(guard="g", choice_holdout=10), 10)


def test_demo_guard_split_is_speaker_disjoint_from_the_check_split(real_zh_dev2):
    """jobs/run/demo.yaml's guard split of real-zh-dev2: 30 clips of 11 speakers (BZNSYP, 8 AISHELL-3, 2 MOSS);
    the other 150 (AISHELL-1 S0150, 8 other AISHELL-3 speakers, 2 SoulX) are the check split no choice sees."""
    import csv
    import re

    from common.executors.pipeline import demo_config_path, load_pipeline

    pattern = load_pipeline(demo_config_path())["finetune"]["guard"]["include_ids"]
    with (real_zh_dev2 / "transcripts.csv").open(encoding="utf-8") as f:
        ids = [row["audio_id"] for row in csv.DictReader(f)]
    guard = [i for i in ids if re.search(pattern, i)]
    check = [i for i in ids if not re.search(pattern, i)]
    assert (len(guard), len(check)) == (30, 150)

    def speaker(i: str) -> str:
        return i[:7] if i.startswith("SSB") else i.split("_")[0] if not i.startswith("BAC009") else i[:11]

    assert not {speaker(i) for i in guard} & {speaker(i) for i in check}


def test_a_guard_set_too_small_for_the_tolerance_is_named_with_the_size_that_would_do():
    """30 noisy guard utterances: intervals wider than ±1 point, so an unchanged candidate fails the tolerance;
    the reason says so and names a size whose interval would fit. 300 utterances: no such sentence."""
    rng = np.random.default_rng(1)

    def case(n: int):
        pre = list(rng.binomial(20, 0.2, n))
        noisy = [max(0, e + int(d)) for e, d in zip(pre, rng.integers(-3, 4, n), strict=True)]  # no shift on average
        return choose(Scored(PRETRAINED, "", [10] * 30, pre), [Scored("unchanged-ish", "", [1] * 30, noisy)],
                      DOMAIN_CHARS, [20] * n, 1.0)

    small = case(30)
    v = small.candidates[0]
    assert not small.met_tolerance and v.guard_delta.high - v.guard_delta.low > 0.02
    assert "guard set is too small to confirm 1 point(s)" in small.reason
    need = int(small.reason.split("about ")[1].split(" utterances")[0])
    assert need > 30
    large = case(max(need * 2, 300))
    assert too_small(large.candidates, 1.0) == ""  # its interval fits within ±1 point
    assert too_small(small.candidates, 1.0) and too_small(small.candidates, 5.0) == ""
