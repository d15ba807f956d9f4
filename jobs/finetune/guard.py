"""The forgetting guard: after training, choose the model to keep by its gain on your domain and its cost on
general speech — never by your test set.

    n, why = choice_holdout_size(settings, clips)      # training clips kept aside for the choice (deterministic)
    aside = held_aside(ids, n)                         # which ones: the n ids with the smallest sha256
    result = run_guard(ctx, family, trainee, model_dir, choice_examples, records, plan, settings)
    choice = choose(scored, tolerance)                 # the rule below, a pure function (tested on its own)

Two sets are scored, with the same greedy decoding ``evaluate`` uses:

- **domain slice**: clips of your training data held aside before training (``choice_holdout``; by default
  10 % of the clips, at least 8 and at most 40, none with fewer than 40 clips). Which clips: those whose
  ``sha256("choice:" + id)`` is smallest — the same ids on every run, whatever the order of the data.
- **guard set** (``guard``): general-domain speech in your language that the model should not get worse on
  (a CSV + audio folder, or a folder with transcripts.csv + audio/, like any test set).

Candidates are what the model family offers (``candidates``; whisper: WiSE-FT merges of the trained weights
with the pretrained ones, per part: encoder / decoder). The pretrained model is scored on the guard set (the
reference of the tolerance); not on the domain slice, which the choice compares candidates on (a pretrained
model that does not know the domain is the slowest to decode there: it runs on to the token limit).

The rule (``choose``): for each candidate, Δguard = CER(candidate) − CER(pretrained) on the guard set with its
paired-bootstrap 95 % interval (common.core.bootstrap). A candidate **passes** when the upper end of that
interval is ≤ ``guard_tolerance`` CER points: with 97.5 % confidence it is no worse than the tolerance
(a non-inferiority test). Among the candidates that pass, the one with the lowest domain-slice CER is chosen
(ties, or no domain slice: the first in the family's order, which lists the models trained furthest first). When none passes, ``guard_fallback`` decides:
``closest`` keeps the candidate with the lowest upper end (the least evidence of forgetting) and says so in
the log, plan.json and the report; ``pretrained`` writes the pretrained weights as final/.

Cost: each candidate decodes both sets once, the pretrained model the guard set; guard.json records the seconds
per model (whisper-base on a busy 2-core CPU: 3–8 s per clip; on a GPU a small fraction of that).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.core.bootstrap import Interval, paired_cer_difference
from common.families import Candidate

log = logging.getLogger(__name__)

GUARD_FILE = "guard.json"
PRETRAINED = "pretrained"
HOLDOUT_SHARE, HOLDOUT_MIN, HOLDOUT_MAX = 0.10, 8, 40  # auto size of the domain slice
HOLDOUT_MIN_CLIPS = 40  # fewer training clips: hold none aside (every clip is needed for training)
DOMAIN, GUARD = "domain", "guard"


# --- the domain slice -------------------------------------------------------------------------------------


def choice_holdout_size(settings: Any, clips: int) -> tuple[int, str]:
    """(training clips to hold aside for the choice, why)."""
    forced = getattr(settings, "choice_holdout", None)
    if forced is not None:
        if forced >= clips:
            from common.core.stage import StageFailed

            raise StageFailed(f"--choice-holdout {forced}: the data has only {clips} usable clips; hold aside fewer "
                              "so that some remain for training", exit_code=2)
        return forced, "choice_holdout (setting)"
    if getattr(settings, "guard", None) is None:
        return 0, "no guard set: no choice among candidates, nothing held aside"
    if clips < HOLDOUT_MIN_CLIPS:
        return 0, (f"{clips} clips < {HOLDOUT_MIN_CLIPS}: all are needed for training; the choice uses the guard "
                   "set alone (the best domain candidate is the one trained furthest)")
    n = min(HOLDOUT_MAX, max(HOLDOUT_MIN, round(HOLDOUT_SHARE * clips)))
    return n, (f"{HOLDOUT_SHARE:.0%} of {clips} clips, between {HOLDOUT_MIN} and {HOLDOUT_MAX}: scored to choose "
               "among the candidates, never trained on")


def held_aside(ids: Sequence[str], n: int) -> set[str]:
    """The ``n`` ids with the smallest sha256("choice:" + id): deterministic, independent of order and seed."""
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"choice:{i}".encode()).hexdigest())
    return set(ranked[:n])


# --- the rule ----------------------------------------------------------------------------------------------


@dataclass
class Scored:
    """One model's per-utterance errors on both sets (index-aligned with the pretrained model's)."""

    name: str
    description: str
    domain_errors: list[int]
    guard_errors: list[int]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Verdict:
    name: str
    description: str
    domain_cer: float | None
    guard_cer: float | None
    guard_delta: Interval | None
    domain_delta: Interval | None
    passes: bool
    reason: str
    params: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["guard_delta"] = self.guard_delta.as_dict() if self.guard_delta else None
        d["domain_delta"] = self.domain_delta.as_dict() if self.domain_delta else None
        return d


@dataclass
class Choice:
    chosen: str  # a candidate's name, or "pretrained"
    met_tolerance: bool
    reason: str
    tolerance_points: float
    candidates: list[Verdict]
    pretrained: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "met_tolerance": self.met_tolerance, "reason": self.reason,
                "tolerance_points": self.tolerance_points, "pretrained": self.pretrained,
                "candidates": [c.as_dict() for c in self.candidates]}


def _cer(errors: Sequence[int], chars: Sequence[int]) -> float | None:
    return sum(errors) / sum(chars) if sum(chars) else None


def choose(pretrained: Scored, candidates: Sequence[Scored], domain_chars: Sequence[int],
           guard_chars: Sequence[int], tolerance_points: float, fallback: str = "closest") -> Choice:
    """The guard's rule (module docstring) on per-utterance errors: pure, no model, no file."""
    if not candidates:
        raise ValueError("no candidate to choose from")
    tol = tolerance_points / 100
    verdicts = []
    for c in candidates:
        g = paired_cer_difference(pretrained.guard_errors, c.guard_errors, guard_chars)
        d = (paired_cer_difference(pretrained.domain_errors, c.domain_errors, domain_chars)
             if pretrained.domain_errors else None)  # the pretrained model is not decoded on the slice
        passes = g is not None and g.high <= tol
        if g is None:
            reason = "no guard utterance scored"
        else:
            reason = (f"guard Δ {g.text()}: upper end {100 * g.high:+.2f} pp "
                      f"{'≤' if passes else '>'} tolerance {tolerance_points:+.2f} pp")
        verdicts.append(Verdict(c.name, c.description, _cer(c.domain_errors, domain_chars),
                                _cer(c.guard_errors, guard_chars), g, d, passes, reason, c.params))
    order = {v.name: i for i, v in enumerate(verdicts)}
    passing = [v for v in verdicts if v.passes]
    pre = {"domain_cer": _cer(pretrained.domain_errors, domain_chars) if pretrained.domain_errors else None,
           "guard_cer": _cer(pretrained.guard_errors, guard_chars),
           "domain_utterances": len(domain_chars), "guard_utterances": len(guard_chars)}
    inf = float("inf")
    if passing:
        best = min(passing, key=lambda v: (inf if v.domain_cer is None else v.domain_cer, order[v.name]))
        domain = "no domain slice" if best.domain_cer is None else f"domain-slice CER {100 * best.domain_cer:.2f} %"
        reason = (f"{best.name}: the lowest {domain} among the {len(passing)} of {len(verdicts)} candidates whose "
                  f"guard-set CER is, with 95 % confidence, at most {tolerance_points:g} point(s) worse than the "
                  f"pretrained model's")
        return Choice(best.name, True, reason, tolerance_points, verdicts, pre)
    small = too_small(verdicts, tolerance_points)
    if fallback == "pretrained":
        return Choice(PRETRAINED, False, f"no candidate meets the guard tolerance of {tolerance_points:g} point(s); "
                      "guard_fallback=pretrained: final/ holds the pretrained weights" + small, tolerance_points, verdicts, pre)
    closest = min(verdicts, key=lambda v: (inf if v.guard_delta is None else v.guard_delta.high, order[v.name]))
    return Choice(closest.name, False, (
        f"no candidate meets the guard tolerance of {tolerance_points:g} point(s); guard_fallback=closest: kept "
        f"{closest.name}, the one with the least evidence of forgetting ({closest.reason}). Expect it to be worse "
        "on general speech: use more or more varied training data, fewer epochs or a lower learning rate, or "
        "accept a larger tolerance") + small, tolerance_points, verdicts, pre)


def too_small(verdicts: Sequence[Verdict], tolerance_points: float) -> str:
    """A sentence for when the guard set is too small to confirm the tolerance at all: even the narrowest
    interval is wider on each side than the tolerance, so a candidate exactly as good as the pretrained model
    would fail too. Says roughly how many utterances would do (intervals narrow as 1/sqrt(n)). '' otherwise."""
    halves = [((v.guard_delta.high - v.guard_delta.low) / 2, v.guard_delta.n) for v in verdicts if v.guard_delta]
    if not halves or tolerance_points <= 0:
        return ""
    half, n = min(halves)
    tol = tolerance_points / 100
    if half <= tol:
        return ""
    need = math.ceil(n * (half / tol) ** 2)
    return (f". The guard set is too small to confirm {tolerance_points:g} point(s): its narrowest interval is "
            f"±{100 * half:.2f} points over {n} utterances, so even a candidate exactly as good as the pretrained "
            f"model would fail; about {need} utterances of general speech would be needed")


# --- scoring the candidates in the stage -------------------------------------------------------------------


def load_guard_set(spec: Any, store: Any, run_id: str, work: Path, s3: Any) -> list[Any] | None:
    """The guard set's utterances (evaluate's loading: CSV rows checked like prepare's), or None when an
    optional set's files are missing (warned)."""
    from common.core.stage import StageFailed
    from jobs.evaluate import Plan as EvalPlan
    from jobs.evaluate import SetUnavailable, _set_entry, load_sets

    try:
        entry = _set_entry(spec, store, run_id)
    except SetUnavailable as e:
        if spec.optional:
            log.warning("guard set %r skipped: %s. Training goes on without the forgetting guard: final/ uses the "
                        "merge_alpha settings", spec.name, e)
            return None
        raise StageFailed(f"guard set {spec.name!r}: {e}", exit_code=2) from None
    return load_sets(EvalPlan(sets=[entry]), work, s3)[0].utterances


def domain_utterances(examples: Sequence[Any], records: Mapping[str, dict], run_dir: Path) -> list[Any]:
    from common.core.records import audio_location, transcript
    from common.core.transcribe import Utterance

    return [Utterance(e.id, transcript(records[e.id]), audio_location(records[e.id], run_dir),
                      records[e.id].get("duration")) for e in examples]


def _errors(engine: Any, utterances: Sequence[Any], batch_size: int) -> tuple[list[int], list[int], list[dict]]:
    """(char errors, reference chars, rows) per utterance, in the given order."""
    from common.core.metrics import utterance_errors
    from common.core.transcribe import transcribe_utterances

    rows = transcribe_utterances(engine, utterances, batch_size=batch_size)
    errors, chars, out = [], [], []
    for r in rows:
        e = utterance_errors(r["reference"], r.get("hypothesis", ""))
        errors.append(e["char_errors"])
        chars.append(e["ref_chars"])
        out.append({"id": r["id"], "hypothesis": r.get("hypothesis", ""), "cer": e["cer"]})
    return errors, chars, out


def score_models(family: Any, models: Sequence[tuple[str, Path]], domain: Sequence[Any], guard: Sequence[Any],
                 device: str) -> dict[str, Any]:
    """Decode both sets with each (name, folder); per model: errors per set, rows and seconds."""
    from common.families import EngineRequest

    request = EngineRequest(device=device, max_new_tokens=GUARD_MAX_NEW_TOKENS)
    batch = 32 if device == "cuda" else 8
    out: dict[str, Any] = {}
    for name, folder in models:
        t0 = time.perf_counter()
        engine, used = family.open_engine(folder, request)
        result: dict[str, Any] = {}
        for set_name, utts in ((DOMAIN, [] if name == PRETRAINED else domain), (GUARD, guard)):
            errors, chars, rows = _errors(engine, utts, batch) if utts else ([], [], [])
            result[set_name] = {"errors": errors, "chars": chars, "rows": rows}
        del engine
        if name != PRETRAINED and used.get("conversion") and Path(used.get("folder", "")).is_dir():
            shutil.rmtree(used["folder"], ignore_errors=True)  # a temporary candidate's cached conversion
        result["seconds"] = round(time.perf_counter() - t0, 1)
        log.info("guard: scored %s in %.1f s", name, result["seconds"])
        out[name] = result
    return out


# Decoding budget of the choice: the domain slice and the guard set hold sentences; 128 tokens is more than
# any of them needs, and bounds the time a hallucinating model (the pretrained one on a new domain) costs.
GUARD_MAX_NEW_TOKENS = 128


def run_guard(family: Any, candidates: Sequence[Candidate], pretrained_dir: Path, domain: Sequence[Any],
              guard: Sequence[Any], settings: Any, device: str, final_dir: Path) -> tuple[Choice, dict[str, Any]]:
    """Write every candidate to a temporary folder, score it and the pretrained model on both sets, choose,
    and write the chosen one to ``final_dir``. Returns (choice, guard.json content)."""
    from common.core.files import atomic_dir

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="asrft-guard-") as work:
        folders: list[tuple[str, Path]] = [(PRETRAINED, pretrained_dir)]
        written: dict[str, dict[str, Any]] = {}
        for c in candidates:
            folder = Path(work) / c.name
            written[c.name] = c.write(folder)
            folders.append((c.name, folder))
        scored = score_models(family, folders, domain, guard, device)
        pre = scored[PRETRAINED]
        choice = choose(
            Scored(PRETRAINED, "the pretrained model", pre[DOMAIN]["errors"], pre[GUARD]["errors"]),
            [Scored(c.name, c.description, scored[c.name][DOMAIN]["errors"], scored[c.name][GUARD]["errors"],
                    c.params) for c in candidates],
            scored[candidates[0].name][DOMAIN]["chars"] if candidates else [], pre[GUARD]["chars"],
            settings.guard_tolerance, settings.guard_fallback)
        if choice.chosen == PRETRAINED:
            with atomic_dir(final_dir) as tmp:
                for p in pretrained_dir.iterdir():
                    if p.is_file():
                        shutil.copy2(p, tmp / p.name)
            final = {"path": final_dir.name, "candidate": PRETRAINED}
        else:
            with atomic_dir(final_dir) as tmp:
                for p in (Path(work) / choice.chosen).iterdir():
                    shutil.move(str(p), tmp / p.name)
            final = {**written[choice.chosen], "path": final_dir.name, "candidate": choice.chosen}
    seconds = round(time.perf_counter() - t0, 1)
    report = {**choice.as_dict(), "guard_set": settings.guard.name if settings.guard else None,
              "domain_slice_ids": [u.id for u in domain], "guard_ids": [u.id for u in guard],
              "decoding": {"greedy": True, "max_new_tokens": GUARD_MAX_NEW_TOKENS, "device": device},
              "seconds": seconds, "seconds_per_model": {n: s["seconds"] for n, s in scored.items()},
              "hypotheses": {n: {k: s[k]["rows"] for k in (DOMAIN, GUARD)} for n, s in scored.items()},
              "final": final}
    log.info("guard: %s (%.0f s for %d models)", choice.reason, seconds, len(folders))
    for v in choice.candidates:
        log.info("guard: %-22s domain CER %s  guard CER %s  %s", v.name, _pct(v.domain_cer), _pct(v.guard_cer),
                 v.reason)
    return choice, report


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def write_guard(out_dir: Path, report: Mapping[str, Any]) -> None:
    from common.core.store import atomic_write_bytes

    atomic_write_bytes(out_dir / GUARD_FILE, (json.dumps(report, ensure_ascii=False, indent=2) + "\n").encode())
