"""Transcript CSV + audio folder → checked clips, converted to 16 kHz mono WAV (prepare's data and evaluate's CSV sets).

    scan = scan_csvs([("train", "data/train.csv", "data/audio")])   # read the CSVs, find each row's file
    for i, job in enumerate(scan.jobs):                               # decode, check, write one clip
        result = convert(job, Path("out/audio"), f"{i:06d}.wav", ClipLimits())
        ...  # a Converted (kept) or the Problem that rejects the row

What it reads: each CSV (local or ``s3://``) and, per row, the audio file the id names in its audio folder.
What it decides: whether a row is kept, in the order of ``common.core.dataset``'s reason table — the row
checks (path, duplicate id, text, file found) in :func:`scan_csvs`, then decoding, the audio checks
(:class:`ClipLimits`) and the speaking-rate check in :func:`convert`. A bad row becomes a
:class:`~common.core.dataset.Rejected` / :class:`~common.core.dataset.Problem` with its reason code and never
stops the caller; only a problem with a whole file (CSV missing, UTF-16, no recognisable columns, audio
folder missing) raises :class:`~common.core.dataset.DatasetError`.
What it writes: one 16-bit PCM WAV per kept clip, scaled down only when a sample would clip
(``Converted.gain``). Nothing else: records, splits and stats are the caller's.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common.core.audio import (
    MAX_SECONDS,
    SAMPLE_RATE,
    AudioProblem,
    check_audio,
    duration,
    fit_full_scale,
    load_audio,
    write_wav16,
)
from common.core.dataset import (
    MAX_CHARS_PER_SECOND,
    AudioFile,
    LocalAudioDir,
    Problem,
    Rejected,
    Row,
    S3AudioDir,
    check_id_path,
    check_text,
    check_text_rate,
    open_audio_dir,
    utterance_id,
)
from common.core.manifest import read_manifest
from common.core.settings import S3Settings
from common.core.store import StoreError, sha256_file

log = logging.getLogger(__name__)

MIN_SECONDS = 0.1  # shorter clips hold no word


@dataclass(frozen=True)
class ClipLimits:
    """The audio checks of :func:`convert` (prepare's --min-seconds, --max-seconds, --max-chars-per-second)."""

    min_seconds: float = MIN_SECONDS
    max_seconds: float = MAX_SECONDS
    max_chars_per_second: float = MAX_CHARS_PER_SECOND


@dataclass
class Job:
    """A row whose text passed and whose audio file exists: to be decoded."""

    row: Row
    utt_id: str
    file: AudioFile
    audio_dir: LocalAudioDir | S3AudioDir


@dataclass
class Scan:
    jobs: list[Job] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    rows: Counter = field(default_factory=Counter)  # data rows per split
    formats: dict[str, str] = field(default_factory=dict)  # split → manifest format read
    inputs: dict[str, Any] = field(default_factory=dict)  # fingerprints: each CSV's bytes, the audio files found


PROGRESS_MIN_ROWS = 2000  # a progress bar for scans of at least this many rows (200k rows take about a minute)


def scan_csvs(sources: Iterable[tuple[str, str, str | None]], s3: S3Settings | None = None, *,
              id_column: str | None = None, text_column: str | None = None, fmt: str = "auto",
              encoding: str | None = None, audio_roots: tuple[str, ...] = ()) -> Scan:
    """Read each ``(split, manifest_uri, audio_dir_uri)`` in order (any format of ``common.core.manifest``; an
    audio folder of None means the manifest's own folder) and check every row up to finding its file; ids are
    unique across all of them (a later row reusing an id is a ``duplicate_id``). No audio is decoded.
    DatasetError for a whole file that cannot be used."""
    scan = Scan()
    first_use: dict[str, Row] = {}  # utterance id → the row that used it first
    for split, uri, audio_uri in sources:
        manifest = read_manifest(uri, split=split, s3=s3, fmt=fmt, encoding=encoding, id_column=id_column,
                                 text_column=text_column)
        digest = hashlib.sha256()
        for name, data in sorted(manifest.files.items()):
            digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        scan.inputs[f"{split}_csv"] = {"uri": uri, "format": manifest.format,
                                       "size": sum(len(d) for d in manifest.files.values()),
                                       "sha256": digest.hexdigest()}
        scan.formats[split] = manifest.format
        scan.rows[split] = len(manifest.rows) + len(manifest.rejected)
        scan.rejected += manifest.rejected
        audio_dir = open_audio_dir(audio_uri or manifest.audio_dir, s3, tuple(audio_roots))
        log.info("checking the %d rows of %s against %s", len(manifest.rows), uri, audio_uri or manifest.audio_dir)
        for row in tqdm(manifest.rows, desc=f"prepare: checking {split} rows", unit="row", mininterval=1.0,
                        disable=len(manifest.rows) < PROGRESS_MIN_ROWS):
            checked = _check_row(row, audio_dir, first_use)
            if isinstance(checked, Job):
                scan.jobs.append(checked)
            else:
                scan.rejected.append(Rejected.of(row, checked))
    listing = sorted((j.file.uri, j.file.size, j.file.version) for j in scan.jobs)
    scan.inputs["audio"] = {"files": len(listing), "sha256": hashlib.sha256(repr(listing).encode()).hexdigest()}
    return scan


def _check_row(row: Row, audio_dir: LocalAudioDir | S3AudioDir, first_use: dict[str, Row]) -> Job | Problem:
    """The checks before decoding, in the documented order: path, duplicate id, text, file."""
    path = row.audio_ref
    problem = check_id_path(path, audio_dir.roots)
    if problem is not None:
        return problem
    utt = utterance_id(row.id if row.audio and row.id else audio_dir.relative(path))
    if not utt:
        return Problem("malformed_row", "the id is empty; every row needs the audio file's id")
    if utt in first_use:
        return _duplicate(utt, first_use[utt])
    first_use[utt] = row  # the first row claims the id even if it is rejected later
    problem = check_text(row.text)
    if problem is not None:
        return problem
    found = audio_dir.find(path)
    return found if isinstance(found, Problem) else Job(row, utt, found, audio_dir)


def _duplicate(utt: str, first: Row) -> Problem:
    where = f"line {first.line} of {first.csv}" + (" (the train CSV)" if first.split == "train" else "")
    return Problem("duplicate_id", f"the id {utt!r} is already used by {where}; the first row is kept. Ids must "
                                   "be unique across train and test (records, features and predictions are keyed "
                                   "by id) — rename one of them or remove the repeated row")


@dataclass
class Converted:
    name: str  # output file name
    seconds: float
    sha256: str  # of the original file's bytes
    sample_rate: int
    channels: int
    format: str
    gain: float


def convert(job: Job, out_audio: Path, name: str, limits: ClipLimits) -> Converted | Problem:
    """Decode, check and write one clip as ``out_audio/name`` → Converted, or the Problem that rejects it."""
    try:
        src = job.audio_dir.fetch(job.file)
        digest = sha256_file(src) if isinstance(src, Path) else hashlib.sha256(src).hexdigest()
        samples, info = load_audio(src, max_seconds=limits.max_seconds)
    except AudioProblem as e:
        return Problem(e.reason, str(e))
    except (OSError, StoreError) as e:
        return Problem("unreadable_file", f"cannot read {job.file.uri}: {e}; check its permissions")
    except Exception as e:  # anything else a decoder throws on odd input is that file's problem, not the run's
        log.debug("decoding %s failed", job.file.uri, exc_info=True)
        return Problem("corrupt_audio", f"decoding failed ({type(e).__name__}: {e}); re-export the file")
    problem = check_audio(samples, min_seconds=limits.min_seconds, max_seconds=limits.max_seconds)
    if problem is not None:
        return Problem(problem.reason, str(problem))
    seconds = duration(samples, SAMPLE_RATE)
    problem = check_text_rate(job.row.text, seconds, limits.max_chars_per_second)
    if problem is not None:
        return problem
    samples, gain = fit_full_scale(samples)
    write_wav16(out_audio / name, samples)
    return Converted(name, seconds, digest, info.sample_rate, info.channels, f"{info.format}/{info.subtype}", gain)
