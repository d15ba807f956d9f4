"""Mandarin demo data: graded HSK sentences spoken by eSpeak NG, as a train CSV and a test (answers) CSV.

    from common.core.demo_data import generate_demo_data
    generate_demo_data(Path("demo_data"), n_train=240, n_test=40, seed=0)

writes

    demo_data/audio/<audio_id>.wav       + demo_data/train.csv     (columns audio_id,text)
    demo_data/test_audio/<audio_id>.wav  + demo_data/answers.csv   (columns audio_id,text)
    demo_data/demo_data.json             (parameters and summary; a re-run with the same ones is skipped)
    demo_data/ATTRIBUTION.txt            (CC-BY-SA-4.0 credit for the sentences)

`audio_id` is the sentence's id in the package (e.g. ``hsk3-0123``), without file extension; `text` is the
sentence in simplified characters, punctuation kept. Audio is 16 kHz mono 16-bit PCM.

Sentences come from the PyPI package ``hsk-sentences-audio`` (its ``pinyin_numbered`` field); they are spoken
by ``espeak-ng -v cmn-latn-pinyin`` (the voice ``cmn`` would read the tone digits as English numbers). Each
clip gets a voice variant, speed, pitch and gain drawn from an RNG seeded by (seed, sentence id), so a clip
does not depend on which other clips are generated or on the number of worker processes.

How espeak-ng 1.51 reads numbered pinyin (measured with ``espeak-ng -q -x``): tones 1–4 become the contours
55, 35, 21(4), 51 and tone 5 the short low neutral tone 11; a syllable without a digit is read as tone 1,
so a missing digit is written as 5 (unmarked pinyin means neutral tone); ``v`` and ``ü`` are both [y];
third-tone sandhi is applied (``ni3 hao3`` → 35 214); ``r5`` (儿化) is read as a neutral ``er`` syllable,
which matches the 儿 character in the text. Punctuation would make espeak-ng pause, but the package's pinyin
has none, and anything else than syllables is stripped before synthesis.

Determinism: the same seed gives byte-identical CSVs, and byte-identical audio with the same espeak-ng and
soxr versions (espeak-ng's output was checked byte-identical across runs for every variant used). The
espeak-ng version is recorded in ``demo_data.json``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
import unicodedata
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from common.core.audio import SAMPLE_RATE  # espeak-ng itself writes 22050 Hz

log = logging.getLogger(__name__)

ESPEAK = "espeak-ng"
VOICE = "cmn-latn-pinyin"  # NOT "cmn": that voice reads the tone digits as English words
INSTALL_HINT = "install it with `apt-get install -y espeak-ng` (Debian/Ubuntu) or `make setup`"

# Variants of `espeak-ng --voices=variant` that sound like plain speech with this voice (71 of espeak-ng
# 1.51's 102, and its default). Left out: the whisper variants (unvoiced), the novelty voices (Demonic,
# croak, Tweaky, UniRobot, anikaRobot, announcer, fast, AnxiousAndy), those that clip on more than 0.2 % of
# samples (antonio, ed, iven, Jacky, Marco, paul, klatt4, klatt5), and eleven held out so that accuracy on
# voices the model never heard can be measured: Andy, linda, Michael (the README's check set) and adam,
# Alex, Annie, david, Lee, Mike, steph, steph2, steph3 (development).
VOICE_VARIANTS = (
    "",  # the voice's default
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8",
    "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt6",
    "Alicia", "Andrea", "aunty", "belinda", "benjamin", "boris", "caleb", "Denis", "Diogo", "edward",
    "edward2", "Gene", "Gene2", "grandma", "grandpa", "gustave", "Henrique", "Hugo", "iven2", "iven3",
    "iven4", "john", "kaukovalta", "marcelo", "Mario", "max", "michel", "miguel", "Mr", "Nguyen", "pablo",
    "pedro", "quincy", "RicishayMax", "RicishayMax2", "RicishayMax3", "rob", "robert", "robosoft",
    "robosoft2", "robosoft3", "robosoft4", "robosoft5", "robosoft6", "robosoft7", "robosoft8", "sandro",
    "shelby", "Storm", "travis", "victor", "zac", "anika", "norbert",
)
SPEED_WPM = (130, 230)  # espeak-ng -s, words per minute; its default is 175
PITCH = (25, 75)  # espeak-ng -p, 0..99; its default is 50
GAIN_DB = (-6.0, 0.0)  # attenuation only: espeak-ng already peaks near full scale

# Sentence length in syllables. Measured: ≈0.23 s per syllable at 175 wpm, ≈0.32 s at 130 wpm, plus
# ≈0.05 s of lead-in and ≤0.5 s of trailing silence, so 5..20 syllables ≈ 1.3..7 s.
# The package's sentences have 2..17 syllables (median 7).
MIN_SYLLABLES, MAX_SYLLABLES = 5, 20
MAX_CLIP_SECONDS = 25.0  # a clip longer than this is dropped (cannot happen with MAX_SYLLABLES)

SUMMARY_FILE = "demo_data.json"
ATTRIBUTION_FILE = "ATTRIBUTION.txt"
FORMAT_VERSION = 2  # bump when the same parameters would produce different files

ATTRIBUTION = (
    "The Mandarin demo sentences (Chinese text and numbered pinyin) come from the PyPI package "
    'hsk-sentences-audio ("4,354 HSK 3.0 graded Chinese sentences", by hsk-sentences-audio contributors, '
    "https://github.com/no7z/hsk-sentences-audio). Its packaged dataset is licensed CC-BY-SA-4.0 "
    "(https://creativecommons.org/licenses/by-sa/4.0/); per its ATTRIBUTION.md, parts of it derive from "
    "CC-CEDICT (CC-BY-SA 4.0). Changes: asr-ft selects a subset of the sentences and synthesizes speech "
    "from their pinyin with eSpeak NG; the generated demo data set (audio and transcripts) is shared under "
    "the same license, CC-BY-SA-4.0."
)

_SYLLABLE = re.compile(r"[a-z]+[1-5]")
_HANZI = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


class EspeakError(RuntimeError):
    """espeak-ng or its Mandarin pinyin voice is missing or failed; the message says how to fix it."""


@dataclass(frozen=True)
class DemoSentence:
    id: str  # the package's id, e.g. "hsk3-0123"; used as audio_id
    text: str  # simplified characters, punctuation kept (goes into the CSV)
    pinyin: str  # numbered pinyin as fed to espeak-ng, e.g. "ni3 hao3"
    hsk_level: int


@dataclass(frozen=True)
class ClipSpec:
    audio_id: str
    text: str
    pinyin: str
    voice: str  # e.g. "cmn-latn-pinyin+f2"
    speed_wpm: int
    pitch: int
    gain_db: float


# ---------------------------------------------------------------------------------------------------------
# Sentences


def clean_pinyin(pinyin_numbered: str) -> str | None:
    """Numbered pinyin ready for espeak-ng, or None when it holds something espeak-ng would misread.

    Lower-cases, writes ü as v, strips punctuation, gives a syllable without tone digit the neutral tone 5
    (espeak-ng would read it as tone 1). Anything else that is not `letters + tone digit 1..5` → None.
    """
    text = unicodedata.normalize("NFC", pinyin_numbered).lower().replace("ü", "v").replace("u:", "v")
    text = re.sub(r"[^\w\s]", " ", text)  # punctuation (ASCII and full-width) → space
    syllables = []
    for token in text.split():
        if token.isalpha():
            token += "5"
        if not _SYLLABLE.fullmatch(token):
            return None
        syllables.append(token)
    return " ".join(syllables) or None


def sentence_pool() -> list[DemoSentence]:
    """Usable sentences, in the package's order: clean pinyin, one syllable per character, first of each text.

    Dropped: unreadable pinyin, a syllable count that differs from the number of characters (the pinyin
    would not match the transcript, e.g. digits or Latin letters in the text), fewer than MIN_SYLLABLES or
    more than MAX_SYLLABLES syllables, and repeated texts (the first one is kept).
    """
    from hsk_sentences_audio import load_sentences

    pool: list[DemoSentence] = []
    seen: set[str] = set()
    for record in load_sentences():
        text = record["chinese"].strip()
        pinyin = clean_pinyin(record.get("pinyin_numbered") or "")
        if pinyin is None or text in seen:
            continue
        n_syllables = len(pinyin.split())
        if n_syllables != len(_HANZI.findall(text)) or not MIN_SYLLABLES <= n_syllables <= MAX_SYLLABLES:
            continue
        seen.add(text)
        pool.append(DemoSentence(record["id"], text, pinyin, int(record["hsk_level"])))
    return pool


def split_pool(
    pool: list[DemoSentence], n_train: int, n_test: int, seed: int
) -> tuple[list[DemoSentence], list[DemoSentence]]:
    """Disjoint (train, test) drawn by a seeded shuffle; test is taken first, so growing n_train keeps it."""
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got n_train={n_train}, n_test={n_test}")
    if n_train + n_test > len(pool):
        raise ValueError(
            f"n_train + n_test = {n_train + n_test} but only {len(pool)} usable sentences exist; ask for fewer"
        )
    order = list(pool)
    random.Random(seed).shuffle(order)
    return order[n_test : n_test + n_train], order[:n_test]


def plan_clip(sentence: DemoSentence, seed: int, variants: tuple[str, ...] = VOICE_VARIANTS) -> ClipSpec:
    """Voice, speed, pitch and gain for one sentence, from an RNG seeded by (seed, sentence id)."""
    rng = random.Random(f"asr-ft-demo:{seed}:{sentence.id}")  # str seeds hash with SHA-512: stable
    variant = rng.choice(variants)
    return ClipSpec(
        audio_id=sentence.id,
        text=sentence.text,
        pinyin=sentence.pinyin,
        voice=f"{VOICE}+{variant}" if variant else VOICE,
        speed_wpm=rng.randint(*SPEED_WPM),
        pitch=rng.randint(*PITCH),
        gain_db=round(rng.uniform(*GAIN_DB), 2),
    )


# ---------------------------------------------------------------------------------------------------------
# espeak-ng


def check_espeak(voice: str = VOICE, variants: tuple[str, ...] = VOICE_VARIANTS) -> str:
    """The espeak-ng version (e.g. "1.51"); raises EspeakError when the binary or the voice is missing, or
    when fewer than MIN_VARIANTS of ``variants`` are (see ``espeak_voices``)."""
    return espeak_voices(voice, variants)[0]


# Fewest voice variants the demo accepts: an espeak-ng older than 1.51 may lack some of the named ones; the
# demo then speaks with those it has (a warning says which are missing), unless too few are left.
MIN_VARIANTS = 8


def espeak_voices(voice: str = VOICE, variants: tuple[str, ...] = VOICE_VARIANTS) -> tuple[str, tuple[str, ...]]:
    """(espeak-ng version, the entries of ``variants`` this espeak-ng has, in order; "" = the plain voice)."""
    exe = shutil.which(ESPEAK)
    if exe is None:
        raise EspeakError(f"`{ESPEAK}` is not on PATH; the Mandarin demo data needs it: {INSTALL_HINT}")
    line = _run([exe, "--version"]).decode(errors="replace").strip()
    version = m.group(1) if (m := re.search(r"text-to-speech:\s*(\S+)", line)) else line  # "1.51"
    voices = _run([exe, "--voices=cmn"]).decode(errors="replace").lower()
    if voice.lower() not in voices.split():
        raise EspeakError(
            f"espeak-ng has no voice {voice!r} (it lists: {voices.strip() or 'nothing for cmn'}); "
            f"reinstall the full package: {INSTALL_HINT}"
        )
    # espeak-ng silently falls back to the plain voice for an unknown variant, so check the list
    listed = set(re.findall(r"!v/(\S+)", _run([exe, "--voices=variant"]).decode(errors="replace")))
    missing = [v for v in variants if v and v not in listed]
    have = tuple(v for v in variants if not v or v in listed)
    if missing and len(have) < MIN_VARIANTS:
        raise EspeakError(f"espeak-ng {version} lacks the voice variants {missing} (has {len(listed)}); "
                          f"install espeak-ng 1.51 or newer: {INSTALL_HINT}")
    if missing:
        log.warning("espeak-ng %s lacks %d of the demo's %d voice variants (%s): the demo data uses the other %d, "
                    "so its clips differ from those made with espeak-ng 1.51", version, len(missing), len(variants),
                    ", ".join(missing), len(have))
    return version, have


def _run(cmd: list[str]) -> bytes:
    try:
        done = subprocess.run(cmd, capture_output=True, check=False, timeout=60)
    except FileNotFoundError as e:
        raise EspeakError(f"cannot run {cmd[0]}: {e}; {INSTALL_HINT}") from e
    if done.returncode != 0:
        raise EspeakError(
            f"`{' '.join(cmd[:-1] + [repr(cmd[-1])])}` failed with exit code {done.returncode}: "
            f"{done.stderr.decode(errors='replace').strip()[-500:]}"
        )
    return done.stdout


def synthesize(spec: ClipSpec) -> np.ndarray:
    """The clip as int16 samples at SAMPLE_RATE, mono."""
    wav = _run(
        [ESPEAK, "-v", spec.voice, "-s", str(spec.speed_wpm), "-p", str(spec.pitch), "--stdout", spec.pinyin]
    )
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    audio = soxr.resample(audio.mean(axis=1), rate, SAMPLE_RATE, quality="HQ")
    audio *= 10.0 ** (spec.gain_db / 20.0)
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype(np.int16)  # resampling can overshoot 1.0


def _write_clip(job: tuple[ClipSpec, str]) -> tuple[str, float]:
    spec, path = job
    samples = synthesize(spec)
    sf.write(path, samples, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return spec.audio_id, len(samples) / SAMPLE_RATE


# ---------------------------------------------------------------------------------------------------------
# The data set


def generate_demo_data(
    out_dir: Path,
    n_train: int = 240,
    n_test: int = 40,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the demo data set into out_dir (layout in the module docstring) and return its summary.

    The folder is built next to out_dir and renamed into place, so out_dir is either absent, the previous
    data set, or complete. An existing out_dir made with the same parameters is kept (summary returned with
    "skipped": True); any other non-empty out_dir is an error unless overwrite=True.
    """
    out_dir = Path(out_dir)
    pool = sentence_pool()
    train, test = split_pool(pool, n_train, n_test, seed)  # validates the counts before any work
    version, variants = espeak_voices()
    params = {
        "format": FORMAT_VERSION,
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "espeak_ng": version,
        "voice_variants": len(variants),
    }

    previous = _read_summary(out_dir)
    if previous is not None and previous.get("params") == params and not overwrite:
        log.info("demo data in %s already made with %s; skipping", out_dir, params)
        return {**previous, "skipped": True}
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{out_dir} exists and does not hold demo data made with {params}; "
            "choose an empty or new folder, or pass overwrite=True (CLI: --force) to replace it"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        summary = _build(staging, train, test, seed, workers, progress, variants)
        summary = {"params": params, **summary}
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", "utf-8")
        (staging / ATTRIBUTION_FILE).write_text(ATTRIBUTION + "\n", "utf-8")
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "demo data: %d train + %d test clips, %.0f s of audio, in %s (%.1f s)",
        summary["n_train"],
        summary["n_test"],
        summary["total_seconds"],
        out_dir,
        summary["wall_seconds"],
    )
    return {**summary, "skipped": False}


def _build(
    staging: Path,
    train: list[DemoSentence],
    test: list[DemoSentence],
    seed: int,
    workers: int | None,
    progress: bool,
    variants: tuple[str, ...],
) -> dict[str, Any]:
    started = time.perf_counter()
    splits = {"train": (train, "audio", "train.csv"), "test": (test, "test_audio", "answers.csv")}
    jobs: list[tuple[ClipSpec, str]] = []
    split_of: dict[str, str] = {}
    for split, (sentences, audio_dir, _) in splits.items():
        (staging / audio_dir).mkdir()
        for sentence in sentences:
            spec = plan_clip(sentence, seed, variants)
            jobs.append((spec, str(staging / audio_dir / f"{spec.audio_id}.wav")))
            split_of[spec.audio_id] = split
    specs = {spec.audio_id: spec for spec, _ in jobs}
    assert len(specs) == len(jobs), "audio ids must be unique across train and test"

    seconds = dict(_run_jobs(jobs, workers, progress))
    too_long = sorted(a for a, s in seconds.items() if s > MAX_CLIP_SECONDS)
    for audio_id, path in ((spec.audio_id, path) for spec, path in jobs if spec.audio_id in too_long):
        log.warning(
            "dropping %s: %.1f s is longer than %.0f s", audio_id, seconds.pop(audio_id), MAX_CLIP_SECONDS
        )
        os.unlink(path)

    counts = {}
    for split, (sentences, _, csv_name) in splits.items():
        rows = sorted((s.id, s.text) for s in sentences if s.id in seconds)
        _write_csv(staging / csv_name, rows)
        counts[split] = len(rows)
    durations = np.array(sorted(seconds.values()))
    wall = time.perf_counter() - started
    return {
        "n_train": counts["train"],
        "n_test": counts["test"],
        "dropped_too_long": too_long,
        "train_seconds": round(sum(s for a, s in seconds.items() if split_of[a] == "train"), 2),
        "test_seconds": round(sum(s for a, s in seconds.items() if split_of[a] == "test"), 2),
        "total_seconds": round(float(durations.sum()), 2),
        "clip_seconds": {
            k: round(float(v), 2)
            for k, v in zip(
                ("min", "p10", "median", "p90", "max"),
                np.percentile(durations, [0, 10, 50, 90, 100]),
                strict=True,
            )
        },
        "voices": dict(sorted(Counter(specs[a].voice for a in seconds).items())),
        "wall_seconds": round(wall, 2),
        "seconds_per_clip": round(wall / max(1, len(jobs)), 4),
        "workers": _n_workers(workers, len(jobs)),
        "clips": [
            asdict(specs[a]) | {"split": split_of[a], "seconds": round(seconds[a], 3)}
            for a in sorted(seconds)
        ],
    }


def _n_workers(workers: int | None, n_jobs: int) -> int:
    return max(1, min(workers or os.cpu_count() or 1, n_jobs))


def _run_jobs(
    jobs: list[tuple[ClipSpec, str]], workers: int | None, progress: bool
) -> list[tuple[str, float]]:
    n = _n_workers(workers, len(jobs))
    bar = tqdm(total=len(jobs), desc="synthesizing demo clips", unit="clip", disable=not progress)
    with bar:
        if n == 1:
            results = []
            for job in jobs:
                results.append(_write_clip(job))
                bar.update()
            return results
        with ProcessPoolExecutor(max_workers=n) as pool:
            results = []
            for result in pool.map(_write_clip, jobs, chunksize=8):  # one clip is ≈20 ms of work
                results.append(result)
                bar.update()
            return results


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["audio_id", "text"])
        writer.writerows(rows)


def _read_summary(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / SUMMARY_FILE
    needed = [out_dir / "train.csv", out_dir / "answers.csv", out_dir / "audio", out_dir / "test_audio"]
    if not path.is_file() or not all(p.exists() for p in needed):
        return None
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Rename staging → out_dir; an existing out_dir is moved aside first and removed afterwards."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
