"""The prepare stage: transcript manifest(s) + audio folder(s) → checked, converted train/test records.

Manifests: CSV/TSV, JSON lines (NeMo, FunASR, records), Kaldi data folders, Hugging Face audiofolders — read by
``common.core.manifest`` into the same rows (the format is detected, or ``--format``).

    scan = scan_inputs(settings)     # read the CSVs, check each row, find its audio file (no decoding)
    summary = prepare(ctx, scan)     # decode + convert the audio, split, write the outputs

The row checks and the conversion of one clip are ``common.core.convert``'s (evaluate checks its CSV sets with
the same code); this stage adds the split, the records, the duplicate-audio check and the stats.

Outputs in ``<artifacts>/<run-id>/prepare/``:

- ``audio/<name>.wav`` — every kept clip once, 16 kHz mono 16-bit PCM (``<name>`` is the id, made
  file-name safe: see ``common.core.dataset.safe_file_name``). Train and test share the folder: ids are unique
  across both splits (a test row reusing a train id is a ``duplicate_id``).
- ``train.jsonl``, ``test.jsonl`` — records in the conversation format (``common.core.records.make_record``)
  with the raw transcript, ``audio_path`` = ``prepare/audio/<name>.wav`` and where the clip came from
  (``source``, ``csv_line``, ``orig_sample_rate``, ``orig_channels``, ``orig_format``).
- ``rejected.jsonl`` — one line per bad row: ``{"split", "csv", "line", "row", "reason", "message"}``
  (reason codes: the table in ``common.core.dataset``).
- ``stats.json`` — rows kept/rejected per split and per reason, hours, a duration histogram with fixed
  bins, the character inventory, and the sample rates / channels / formats of the original files.

The test split is either a second CSV (``--test-csv``, e.g. an answers.csv) or a deterministic hold-out of
the train CSV's good rows (``--test-ratio``): rows are ranked by sha256("<seed>:<id>") and the first
``round(ratio × n)`` go to test. A row's rank does not depend on the other rows, so adding or removing rows
moves few others between the splits (a shuffled list would reshuffle them all).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import unicodedata
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict
from tqdm import tqdm

from common.core.convert import MAX_SECONDS, MIN_SECONDS, ClipLimits, Converted, Job, Scan, convert, scan_csvs
from common.core.dataset import MAX_CHARS_PER_SECOND, REASONS, DatasetError, Problem, Rejected, safe_file_name
from common.core.manifest import FORMATS as MANIFEST_FORMATS
from common.core.records import make_record, transcript, write_jsonl
from common.core.settings import StageSettings
from common.core.stage import StageContext, StageFailed
from common.core.store import atomic_write_bytes
from common.core.text import is_cjk_char

log = logging.getLogger(__name__)

STAGE = "prepare"
# Right-closed duration bins in seconds: (0, 1], (1, 2], …, (25, 30], (30, ∞). Fixed so that stats of
# different data sets compare bin by bin; 30 s is one model input window.
DURATION_EDGES = (0, 1, 2, 3, 5, 10, 15, 20, 25, 30)
TOP_CHARS = 50  # characters listed in stats.json's inventory


class PrepareSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_PREPARE_")

    cli_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"train_csv": ("--train",), "test_csv": ("--test",)}

    train_csv: str = Field(
        ..., description="training manifest (alias --train): a CSV/TSV, a JSON-lines file (NeMo, FunASR, records), "
                         "a Kaldi data folder (wav.scp + text) or a Hugging Face audiofolder (local or s3://)",
        examples=["data/train.csv", "data/train_manifest.jsonl", "data/kaldi/train", "s3://bucket/data/train.csv"],
    )
    audio_dir: str | None = Field(
        None, description="folder the manifest's relative audio paths start from (local or s3://bucket/prefix) "
                          "[default: the manifest's folder]",
        examples=["data/audio", "s3://bucket/data/audio"],
    )
    test_csv: str | None = Field(
        None, description="test manifest (alias --test; any format --train-csv takes, e.g. answers.csv); "
                          "or use --test-ratio instead",
        examples=["data/answers.csv"],
    )
    format: Literal[MANIFEST_FORMATS] = Field(  # type: ignore[valid-type]
        "auto", description="manifest format; auto: a folder with wav.scp is kaldi, with metadata.csv audiofolder, "
                            "a .jsonl file (or one starting with '{') jsonl, else csv (delimiter detected)")
    encoding: str | None = Field(
        None, description="text encoding of the manifests [default: UTF-8 (BOM ok), else detected, e.g. GB18030]",
        examples=["gb18030", "big5"],
    )
    audio_root: list[str] = Field(
        default_factory=list,
        description="folders absolute audio paths may point into, besides --audio-dir (a path elsewhere is "
                    "rejected as path_escape)", examples=["/data/corpus"],
    )
    test_audio_dir: str | None = Field(
        None, description="folder with the test CSV's audio [default: --audio-dir]", examples=["data/test_audio"],
    )
    test_ratio: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="hold out this fraction of the good train rows as the test set (0 = no hold-out)",
        examples=[0.1],
    )
    seed: int = Field(0, description="seed of the --test-ratio split (same seed → same split)", examples=[0, 7])
    id_column: str | None = Field(
        None, description="id column name [default: auto: id, audio_id, utt, utt_id, file, filename, path, wav]",
        examples=["audio_id"],
    )
    text_column: str | None = Field(
        None, description="transcript column name [default: auto: text, transcript, sentence, label, answer]",
        examples=["text"],
    )
    min_seconds: float = Field(MIN_SECONDS, gt=0, description="shortest clip kept, seconds")
    max_seconds: float = Field(
        MAX_SECONDS, gt=0, description="longest clip kept, seconds (30 s: one model input window)", examples=[30],
    )
    max_chars_per_second: float = Field(
        MAX_CHARS_PER_SECOND, gt=0, description="reject transcripts longer than 5 + this × seconds (characters/words)",
    )
    workers: int = Field(0, ge=0, description="decoding threads (0 = one per CPU, at most 8)", examples=[0, 4])

    @model_validator(mode="after")
    def _check_combinations(self) -> PrepareSettings:
        problems = []
        if self.test_csv and self.test_ratio > 0:
            problems.append(
                f"--test-csv ({self.test_csv}) and --test-ratio {self.test_ratio} are both given; use --test-csv "
                "for a separate test set OR --test-ratio to hold out part of the train CSV, not both"
            )
        if self.test_audio_dir and not self.test_csv:
            problems.append("--test-audio-dir is given without --test-csv; add --test-csv FILE or drop it")
        if self.encoding:
            import codecs

            try:
                codecs.lookup(self.encoding)
            except LookupError:
                problems.append(f"--encoding {self.encoding!r} is not a known encoding; use e.g. utf-8, gb18030, big5")
        if self.test_csv and self.test_csv == self.train_csv:
            problems.append("--test-csv is the train CSV; a model tested on its training data proves nothing — "
                            "pass a separate test CSV or use --test-ratio")
        if self.min_seconds >= self.max_seconds:
            problems.append(f"--min-seconds {self.min_seconds} must be below --max-seconds {self.max_seconds}")
        if problems:
            raise ValueError("\n  - ".join(problems))
        return self


# ------------------------------------------------------------------------------------------------ scan


def scan_inputs(settings: PrepareSettings) -> Scan:
    """Read the CSV(s), check every row up to finding its file; fingerprint the inputs. No audio is decoded."""
    sources = [("train", settings.train_csv, settings.audio_dir)]
    if settings.test_csv:
        sources.append(("test", settings.test_csv, settings.test_audio_dir or settings.audio_dir))
    # a test manifest without its own audio folder: the --audio-dir when given, else its own folder
    try:
        return scan_csvs(sources, settings.s3, id_column=settings.id_column, text_column=settings.text_column,
                         fmt=settings.format, encoding=settings.encoding, audio_roots=tuple(settings.audio_root))
    except DatasetError as e:
        raise StageFailed(str(e), exit_code=2) from None


# ------------------------------------------------------------------------------------------------ convert


def clip_limits(settings: PrepareSettings) -> ClipLimits:
    """The audio checks of common.core.convert.convert, from --min-seconds, --max-seconds, --max-chars-per-second."""
    return ClipLimits(settings.min_seconds, settings.max_seconds, settings.max_chars_per_second)


def _workers(settings: PrepareSettings) -> int:
    return settings.workers or min(8, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------------ stage body


OUTPUTS = ("train.jsonl", "test.jsonl", "rejected.jsonl", "stats.json")


def prepare(ctx: StageContext, scan: Scan) -> dict[str, Any]:
    """The stage body: convert every job's audio, reject what fails, split, write outputs; summary dict."""
    settings: PrepareSettings = ctx.settings
    out_audio = ctx.out / "audio"
    shutil.rmtree(out_audio, ignore_errors=True)  # a failed earlier attempt must not leave stale clips
    for name in OUTPUTS:
        (ctx.out / name).unlink(missing_ok=True)
    out_audio.mkdir(parents=True, exist_ok=True)

    names = _file_names(scan.jobs)
    limits = clip_limits(settings)
    with ThreadPoolExecutor(max_workers=_workers(settings)) as pool:  # IO and libsndfile/soxr release the GIL
        results = list(tqdm(pool.map(lambda j: convert(j, out_audio, names[j.utt_id], limits), scan.jobs),
                            total=len(scan.jobs), desc="prepare: decoding audio", unit="clip", mininterval=1.0))
    records, rejected, kept = _assemble(ctx, scan, results)
    if settings.test_ratio > 0:
        records["train"], records["test"] = split_by_ratio(records["train"], settings.test_ratio, settings.seed)

    stats = build_stats(records, rejected, scan.rows, kept, settings)
    _write_outputs(ctx.out, records, rejected, stats)
    _log_summary(stats)
    if not records["train"]:
        ctx.sync()  # let the user see rejected.jsonl even on S3
        reasons = ", ".join(f"{code} {n}" for code, n in stats["rejected_by_split_and_reason"]["train"].items())
        raise StageFailed(
            f"no usable training rows: {scan.rows['train']} row(s) in {Path(settings.train_csv).name}, 0 kept "
            f"({reasons or 'the CSV has no data rows'}). Each row's reason and how to fix it: "
            f"{ctx.uri('rejected.jsonl')}",
            exit_code=2,
        )
    if not records["test"]:
        log.warning("no test records: evaluate will have nothing to score. Pass --test-csv FILE or --test-ratio 0.1.")
    return {"kept": stats["kept"], "rejected": stats["rejected"], "hours": stats["hours"],
            "rejected_by_reason": {code: n for code, n in stats["rejected_by_reason"].items() if n}}


def _assemble(
    ctx: StageContext, scan: Scan, results: list[Converted | Problem]
) -> tuple[dict[str, list[dict]], list[Rejected], list[Converted]]:
    """In CSV order: records of the kept clips per split, every rejected row, and the kept conversions.
    The first of byte-identical files is kept; later copies become duplicate_audio."""
    records: dict[str, list[dict]] = {"train": [], "test": []}
    rejected = list(scan.rejected)
    kept: list[Converted] = []
    first_with: dict[str, Job] = {}  # sha256 of the original bytes → the job that kept it
    for job, result in zip(scan.jobs, results, strict=True):
        if isinstance(result, Converted) and result.sha256 in first_with:
            (ctx.out / "audio" / result.name).unlink(missing_ok=True)
            result = _duplicate_audio(job, first_with[result.sha256])
        if isinstance(result, Problem):
            rejected.append(Rejected.of(job.row, result))
            continue
        first_with[result.sha256] = job
        kept.append(result)
        extra = {"gain": round(result.gain, 6)} if result.gain != 1.0 else {}
        records[job.row.split].append(make_record(
            job.utt_id, ctx.uri("audio", result.name), f"{ctx.stage}/audio/{result.name}", job.row.text,
            result.seconds, source=job.file.uri, csv_line=job.row.line, orig_sample_rate=result.sample_rate,
            orig_channels=result.channels, orig_format=result.format, **extra,
        ))
    rejected.sort(key=lambda r: (r.split != "train", r.line))
    return records, rejected, kept


def _duplicate_audio(job: Job, first: Job) -> Problem:
    return Problem("duplicate_audio", f"{job.file.uri} has the same bytes as {first.file.uri} (id {first.utt_id!r}, "
                                      f"line {first.row.line} of {first.row.csv}); the first is kept — remove the "
                                      "copy (a clip in both train and test inflates the test score)")


def _file_names(jobs: Iterable[Job]) -> dict[str, str]:
    """utterance id → output file name, unique even on case-insensitive file systems."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for job in jobs:
        name = safe_file_name(job.utt_id)
        if name.lower() in used:
            name = f"{name}-{hashlib.sha256(job.utt_id.encode()).hexdigest()[:10]}"
        used.add(name.lower())
        names[job.utt_id] = name + ".wav"
    return names


def split_by_ratio(records: list[dict], ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test): the round(ratio × n) records ranked first by sha256("<seed>:<id>") go to test (at least
    one when ratio > 0 and n ≥ 2; at least one record always stays in train). Order within each is kept."""
    n = len(records)
    if ratio <= 0 or n < 2:
        return records, []
    n_test = min(n - 1, max(1, round(ratio * n)))
    ranked = sorted(records, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())
    test_ids = {r["id"] for r in ranked[:n_test]}
    return [r for r in records if r["id"] not in test_ids], [r for r in records if r["id"] in test_ids]


# ------------------------------------------------------------------------------------------------ stats + outputs


def duration_bin_labels() -> list[str]:
    """["0-1 s", "1-2 s", …, "25-30 s", ">30 s"]: right-closed bins, so a 1.0-s clip is in "0-1 s"."""
    edges = DURATION_EDGES
    return [f"{a}-{b} s" for a, b in zip(edges, edges[1:], strict=False)] + [f">{edges[-1]} s"]


def duration_histogram(seconds: Iterable[float]) -> list[int]:
    counts = [0] * len(DURATION_EDGES)
    for s in seconds:
        counts[min(max(bisect_left(DURATION_EDGES, s) - 1, 0), len(DURATION_EDGES) - 1)] += 1
    return counts


def char_class(ch: str) -> str:
    """cjk | latin | digit | space | punctuation_symbol | other, for the character inventory."""
    if is_cjk_char(ch):
        return "cjk"
    if ch.isascii() and ch.isalpha():
        return "latin"
    if ch.isdigit():
        return "digit"
    cat = unicodedata.category(ch)
    if ch.isspace():
        return "space"
    if cat[0] in "PS":
        return "punctuation_symbol"
    return "other"


def build_stats(
    records: dict[str, list[dict]], rejected: list[Rejected], rows: Counter, kept: list[Converted],
    settings: PrepareSettings,
) -> dict[str, Any]:
    """stats.json: counts per split and reason, hours, duration histogram, characters, original formats."""
    splits = ("train", "test")
    seconds = {s: [r["duration"] for r in records[s]] for s in splits}
    by_reason = Counter(r.reason for r in rejected)
    by_split = {s: Counter(r.reason for r in rejected if r.split == s) for s in splits}
    chars = Counter(ch for s in splits for r in records[s] for ch in transcript(r) if not ch.isspace())
    if settings.test_csv:
        test_split = f"csv {Path(settings.test_csv).name}"
    elif settings.test_ratio > 0:
        test_split = f"ratio {settings.test_ratio} of the train rows, seed {settings.seed}"
    else:
        test_split = "none"
    return {
        "rows": {s: rows.get(s, 0) for s in splits},
        "kept": {s: len(records[s]) for s in splits},
        "rejected": {s: sum(1 for r in rejected if r.split == s) for s in splits},
        "rejected_by_reason": {code: by_reason.get(code, 0) for code in REASONS},
        "rejected_by_split_and_reason": {  # non-zero counts, in REASONS order
            s: {code: by_split[s][code] for code in REASONS if by_split[s][code]} for s in splits
        },
        "test_split": test_split,
        "hours": {s: round(sum(seconds[s]) / 3600, 4) for s in splits},
        "seconds": {
            s: {"total": round(sum(v), 3), "min": round(min(v), 3), "mean": round(sum(v) / len(v), 3),
                "max": round(max(v), 3)} if v else {"total": 0.0} for s, v in seconds.items()
        },
        "duration_histogram": {"bins": duration_bin_labels(), **{s: duration_histogram(seconds[s]) for s in splits}},
        "characters": {
            "total": sum(chars.values()),
            "distinct": len(chars),
            "by_class": dict(_class_counts(chars).most_common()),
            "top": [[ch, n] for ch, n in chars.most_common(TOP_CHARS)],
        },
        "original_audio": {
            "sample_rate": _sorted_counts(str(c.sample_rate) for c in kept),
            "channels": _sorted_counts(str(c.channels) for c in kept),
            "format": _sorted_counts(c.format for c in kept),
        },
        "settings": {"min_seconds": settings.min_seconds, "max_seconds": settings.max_seconds,
                     "max_chars_per_second": settings.max_chars_per_second},
    }


def _class_counts(chars: Counter) -> Counter:
    out: Counter = Counter()
    for ch, n in chars.items():
        out[char_class(ch)] += n
    return out


def _sorted_counts(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items(), key=lambda kv: (-kv[1], kv[0])))


def _write_outputs(out: Path, records: dict[str, list[dict]], rejected: list[Rejected], stats: dict) -> None:

    write_jsonl(out / "train.jsonl", records["train"])
    write_jsonl(out / "test.jsonl", records["test"])
    write_jsonl(out / "rejected.jsonl", (r.to_json() for r in rejected))
    atomic_write_bytes(out / "stats.json", (json.dumps(stats, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))


def _log_summary(stats: dict) -> None:
    log.info("prepare: kept train %d (%.2f h), test %d (%.2f h); rejected train %d, test %d",
             stats["kept"]["train"], stats["hours"]["train"], stats["kept"]["test"], stats["hours"]["test"],
             stats["rejected"]["train"], stats["rejected"]["test"])
    for code, n in stats["rejected_by_reason"].items():
        if n:
            log.info("  rejected %-27s %d", code, n)
