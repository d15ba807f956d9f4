"""The transcribe command: recordings of any length → timed segments → text, JSONL, SRT or WebVTT.

    settings = TranscribeSettings(model="runs/demo/export", audio=["talks/"], format=["srt"], output_dir="subs")
    code = transcribe(settings)      # 0: every recording transcribed; 1: some were skipped (each one logged)

Reads: the model (anything ``evaluate`` takes, see :mod:`common.core.inference`) and each AUDIO: a file, a folder
(its audio files, recursively), a glob (``"talks/*.flac"``) or ``s3://bucket/key`` (an object, or every audio
object under a prefix). Decides: the segments (Silero VAD, ≤ 30 s each, see :mod:`common.core.segment`).
Writes: with ``--output-dir``, one ``<name>.<ext>`` per recording and format (``transcripts.jsonl`` collects
the JSONL lines of all of them), each written atomically; without it, the transcripts on stdout.

A file that cannot be read or decoded is logged with its reason and skipped; the others are transcribed.
"""

from __future__ import annotations

import glob
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict
from tqdm import tqdm

from common.core.dataset import AUDIO_EXTENSIONS
from common.core.inference import DecodingSettings, open_model
from common.core.segment import VadOptions, transcribe_recording
from common.core.transcripts import EXTENSIONS, FORMATS, NORMALIZE, normalized, render

log = logging.getLogger(__name__)

JSONL_FILE = "transcripts.jsonl"  # in --output-dir: one line per recording


class TranscribeSettings(DecodingSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_TRANSCRIBE_")

    audio: list[str] = Field(..., min_length=1, description="recordings: files, folders, globs or s3:// URIs",
                             examples=["talk.wav", "recordings/", "'calls/*.flac'", "s3://bucket/calls/"])
    format: list[str] = Field(default_factory=lambda: ["text"], description=f"output format(s): {', '.join(FORMATS)}",
                              examples=["srt", "vtt"])
    output_dir: str | None = Field(None, description="folder for the output files [default: print to stdout]",
                                   examples=["transcripts/"])
    normalize: str = Field("none", description="text normalisation: none (as decoded), simplified (NFKC + "
                                               "traditional → simplified), scoring (what the evaluation report "
                                               "scores: also no punctuation, spaces or case)")
    vad: bool = Field(True, description="split at pauses found by Silero VAD (off: consecutive 30-s windows)")
    min_silence_ms: int = Field(1000, ge=100, le=10_000, description="a pause this long (ms) ends a segment")

    @field_validator("format", mode="before")
    @classmethod
    def _formats(cls, values):
        values = [values] if isinstance(values, str) else list(values or [])
        values = [v.strip().lower() for item in values for v in str(item).split(",") if v.strip()]
        bad = [v for v in values if v not in FORMATS]
        if bad or not values:
            raise ValueError(f"format {bad or values}: expected one or more of {', '.join(FORMATS)}")
        return list(dict.fromkeys(values))

    @field_validator("normalize")
    @classmethod
    def _normalize(cls, value: str) -> str:
        if value not in NORMALIZE:
            raise ValueError(f"normalize {value!r}: expected one of {', '.join(NORMALIZE)}")
        return value

    @model_validator(mode="after")
    def _stdout(self) -> TranscribeSettings:
        if self.output_dir is None and len(self.format) > 1:
            raise ValueError(f"several formats ({', '.join(self.format)}) need --output-dir (one file per format)")
        return self


@dataclass
class Source:
    """One recording to transcribe: where it is, the name its outputs get, or why it cannot be had."""

    uri: str
    name: str
    error: str | None = None


def _is_audio(name: str) -> bool:
    return name.lower().endswith(AUDIO_EXTENSIONS)


def expand_inputs(items: list[str], s3=None) -> list[Source]:
    """Files, folders, globs and s3:// URIs → one Source per recording, in the order given (folders sorted)."""
    sources: list[Source] = []
    for item in items:
        if item.startswith("s3://"):
            sources += _s3_sources(item, s3)
            continue
        path = Path(item).expanduser()
        if any(ch in item for ch in "*?["):
            matches = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            sources += [Source(p, Path(p).stem) for p in matches]
            if not matches:
                sources.append(Source(item, Path(item).stem, "no file matches this pattern"))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _is_audio(p.name))
            sources += [Source(str(p), p.relative_to(path).with_suffix("").as_posix()) for p in files]
            if not files:
                sources.append(Source(item, path.name, f"no audio file ({', '.join(AUDIO_EXTENSIONS[:4])}, …) in "
                                                       "this folder"))
        elif path.is_file():
            sources.append(Source(str(path), path.stem))
        else:
            sources.append(Source(item, path.stem, "no such file or folder"))
    return _unique_names(sources)


def _s3_sources(uri: str, s3) -> list[Source]:
    from common.core.store import StoreError, open_store, split_uri

    bucket, key = split_uri(uri)
    try:
        store = open_store(bucket, s3)
        if _is_audio(key) and store.exists(key):
            return [Source(uri, Path(key).stem)]
        prefix = key.rstrip("/") + "/" if key else ""
        keys = sorted(k for k in store.list(prefix) if _is_audio(k))
    except StoreError as e:
        return [Source(uri, Path(key).stem or "s3", f"cannot list it ({e})")]
    if not keys:
        return [Source(uri, Path(key).stem or "s3", "no audio object at this key or under this prefix")]
    return [Source(f"{bucket}/{k}", Path(k[len(prefix):]).with_suffix("").as_posix()) for k in keys]


def _unique_names(sources: list[Source]) -> list[Source]:
    seen: set[str] = set()
    for s in sources:
        name, n = s.name, 1
        while name in seen:
            n += 1
            name = f"{s.name}-{n}"
        s.name = name
        seen.add(name)
    return sources


def _local_copy(source: Source, work: Path, s3) -> Path:
    if not source.uri.startswith("s3://"):
        return Path(source.uri)
    from common.core.store import open_store, split_uri

    bucket, key = split_uri(source.uri)
    local = work / "s3" / key
    open_store(bucket, s3).get_file(key, local)
    return local


def transcribe(settings: TranscribeSettings) -> int:
    """Transcribe every recording (see the module docstring); 0 when all worked, 1 when any was skipped."""
    from common.core.audio import AudioProblem, load_audio
    from common.core.files import atomic_write_bytes
    from common.core.store import StoreError

    sources = expand_inputs(settings.audio, settings.s3)
    loaded = open_model(settings)
    options = VadOptions(min_silence_ms=settings.min_silence_ms)
    out = Path(settings.output_dir).expanduser() if settings.output_dir else None
    skipped: list[Source] = [s for s in sources if s.error]
    jsonl: list[str] = []
    audio_seconds = 0.0
    with tempfile.TemporaryDirectory(prefix="asrft-transcribe-") as work, \
            tqdm(total=len(sources), desc="transcribe", unit="file", mininterval=1.0) as bar:
        for source in sources:
            if source.error:
                bar.update(1)
                continue
            try:
                samples, _ = load_audio(_local_copy(source, Path(work), settings.s3))
            except (AudioProblem, OSError, StoreError) as e:
                source.error = f"{getattr(e, 'reason', 'unreadable')}: {e}"
                skipped.append(source)
                log.warning("transcribe: %s skipped: %s", source.uri, source.error)
                bar.update(1)
                continue
            duration = len(samples) / 16_000
            audio_seconds += duration
            bar.set_postfix_str(f"{source.name} ({duration:.0f} s)")
            segments = transcribe_recording(loaded.engine, samples, batch_size=loaded.batch_size,
                                            vad=settings.vad, options=options)
            segments = normalized(segments, settings.normalize)
            for fmt in settings.format:
                text = render(segments, fmt, audio=source.uri, duration=duration)
                if fmt == "jsonl":
                    jsonl.append(text)
                elif out is not None:
                    atomic_write_bytes(out / f"{source.name}.{EXTENSIONS[fmt]}", text.encode())
                else:
                    if len(sources) > 1 and fmt == "text":
                        text = f"# {source.uri}\n{text}"
                    sys.stdout.write(text)
                    sys.stdout.flush()
            bar.update(1)
    if jsonl:
        if out is not None:
            atomic_write_bytes(out / JSONL_FILE, "".join(jsonl).encode())
        else:
            sys.stdout.write("".join(jsonl))
    done = len(sources) - len(skipped)
    log.info("transcribe: %d recording(s), %.1f s of audio%s%s", done, audio_seconds,
             f" → {out}" if out else "", f"; {len(skipped)} skipped" if skipped else "")
    for s in skipped:
        log.warning("transcribe: skipped %s: %s", s.uri, s.error)
    return 1 if skipped else 0
