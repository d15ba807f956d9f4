"""Audio IO: decode anything libsndfile or FFmpeg reads into float32 mono 16 kHz, check it, write 16-bit wav.

    samples, info = load_audio("clip.flac")          # float32 mono at SAMPLE_RATE, in [-1, 1] for PCM input
    problem = check_audio(samples)                    # None, or an AudioProblem with a reason code
    write_wav16("out/clip.wav", samples)              # PCM_16 wav, written atomically

Decoding is soundfile (libsndfile: WAV 8/16/24/32-bit integer and 32/64-bit float, FLAC, OGG/Vorbis, MP3,
AIFF, CAF, W64, ...); what it does not read (M4A/AAC, Opus in WebM/Matroska, AMR, WMA, …) is decoded with
FFmpeg through PyAV (``av``, installed with faster-whisper). Several channels are down-mixed by averaging (what a mono microphone at the same
spot would hear), then resampled to 16 kHz with soxr at quality "HQ" (a band-limited resampler with
20-bit, ~120 dB precision; linear interpolation would alias speech energy above 8 kHz into the band).

Problems carry a stable reason code (the same strings prepare writes into ``rejected.jsonl``):

| reason               | when                                                                          |
|----------------------|-------------------------------------------------------------------------------|
| `empty_file`         | the file has 0 bytes                                                          |
| `not_audio`          | libsndfile does not recognise the bytes and they do not start like audio      |
| `unsupported_format` | audio libsndfile cannot decode while PyAV (FFmpeg) is not installed           |
| `corrupt_audio`      | it starts like a known audio format, but decoding fails                       |
| `non_finite_samples` | a decoded sample is NaN or ±inf (float wav/flac written by buggy code)        |
| `too_short`          | shorter than `min_seconds` (default 0.1 s)                                    |
| `too_long`           | longer than `max_seconds` (default 30 s: one model window)                    |
| `silent`             | digital silence: peak below `SILENCE_PEAK` (-80 dBFS) after down-mixing       |
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from common.core.store import atomic_path

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # Hz: the rate every stage stores and reads clips at (what the models' front ends expect)
RESAMPLE_QUALITY = "HQ"  # soxr: 20-bit precision (~120 dB); "VHQ" (28-bit) is slower, no better for 16-bit output
MIN_SECONDS = 0.1  # below this there is not one syllable (a Mandarin syllable lasts ~0.15-0.3 s)
MAX_SECONDS = 30.0  # one model input window (480000 samples at 16 kHz); longer clips are cut off in training
# Digital silence: a 16-bit PCM step (LSB) is 2**-15 ≈ 3.05e-5 (-90.3 dBFS). A peak below 1e-4 (-80 dBFS,
# ≈ 3 LSB) is dither or quantization noise only; any recorded speech peaks far above -40 dBFS.
SILENCE_PEAK = 10 ** (-80 / 20)  # 1e-4
_EMPTY_MESSAGE = "the file is 0 bytes; re-export the recording or remove the row"

# How files start (magic bytes), to tell a damaged audio file from something that is not audio at all.
_READABLE_MAGIC = {  # formats libsndfile decodes
    b"RIFF": "WAV", b"RIFX": "WAV", b"RF64": "RF64", b"BW64": "RF64", b"riff": "W64", b"FORM": "AIFF",
    b"fLaC": "FLAC", b"OggS": "OGG", b"ID3": "MP3", b".snd": "AU", b"caff": "CAF", b"NIST": "NIST",
}
_UNSUPPORTED_MAGIC = {  # audio, but not something libsndfile reads
    b"#!AMR": "AMR", b"\x30\x26\xb2\x75\x8e\x66\xcf\x11": "WMA/ASF", b"\xff\xf1": "AAC (ADTS)", b"\xff\xf9": "AAC (ADTS)",
}


class AudioProblem(Exception):
    """Audio that cannot be used. ``reason`` is a stable code; ``str()`` says what was found and what to do."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class AudioInfo:
    """What the source file was, before conversion."""

    sample_rate: int
    channels: int
    frames: int
    format: str  # libsndfile's major format, e.g. "WAV", "FLAC"
    subtype: str  # e.g. "PCM_16", "PCM_24", "FLOAT"

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def sniff_format(head: bytes) -> tuple[str, bool] | None:
    """(format name, libsndfile reads it) from a file's first bytes, or None when it does not look like audio."""
    for magic, name in _READABLE_MAGIC.items():
        if head.startswith(magic):
            return name, True
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0 and head[:2] not in (b"\xff\xf1", b"\xff\xf9"):
        return "MP3", True  # an MPEG audio frame sync without an ID3 tag
    if head[4:8] == b"ftyp":
        return "MP4/M4A", False
    for magic, name in _UNSUPPORTED_MAGIC.items():
        if head.startswith(magic):
            return name, False
    return None


def load_audio(
    source: str | Path | bytes | BinaryIO, *, max_seconds: float | None = None
) -> tuple[np.ndarray, AudioInfo]:
    """Decode ``source`` (a path, the file's bytes, or a binary file object) → (float32 mono 16 kHz, info).

    Raises AudioProblem for an empty, unreadable or damaged file, NaN/inf samples, and — before decoding
    anything, from the header alone — a file longer than ``max_seconds`` (so an hour-long file costs nothing).
    """
    if isinstance(source, str | Path):
        if Path(source).stat().st_size == 0:
            raise AudioProblem("empty_file", _EMPTY_MESSAGE)
        with open(source, "rb") as f:  # decoded from the file: a huge file is not read whole before its header
            return _decode(f, max_seconds=max_seconds)
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(bytes(source))
    if not source.read(1):
        raise AudioProblem("empty_file", _EMPTY_MESSAGE)
    source.seek(0)
    return _decode(source, max_seconds=max_seconds)


def _decode(f: BinaryIO, *, max_seconds: float | None = None) -> tuple[np.ndarray, AudioInfo]:
    try:
        with sf.SoundFile(f) as snd:
            info = AudioInfo(snd.samplerate, snd.channels, snd.frames, snd.format, snd.subtype)
            if max_seconds is not None and info.seconds > max_seconds:
                raise AudioProblem("too_long", _too_long_message(info.seconds, max_seconds))
            frames = snd.read(dtype="float32", always_2d=True)
    except AudioProblem:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError) as e:
        f.seek(0)
        head = f.read(16)
        sniffed = sniff_format(head)
        if sniffed is not None and sniffed[1]:  # a format libsndfile reads, damaged: FFmpeg would guess
            raise _decode_problem(head, e) from None
        f.seek(0)
        return _decode_ffmpeg(f, head, e, max_seconds=max_seconds)
    if not np.isfinite(frames).all():
        bad = int(np.count_nonzero(~np.isfinite(frames)))
        raise AudioProblem(
            "non_finite_samples",
            f"{bad} of {frames.size} samples are NaN or infinite ({info.format}/{info.subtype}); "
            "the file was written by faulty code — regenerate it",
        )
    return resample(downmix(frames), info.sample_rate), info


def _decode_ffmpeg(f: BinaryIO, head: bytes, sf_error: Exception, *,
                   max_seconds: float | None) -> tuple[np.ndarray, AudioInfo]:
    """Decode what libsndfile does not read (M4A/AAC, Opus in WebM, AMR, WMA, …) with FFmpeg through PyAV."""
    try:
        import av
    except ImportError:  # PyAV comes with faster-whisper; without it only libsndfile's formats are read
        raise _decode_problem(head, sf_error) from None
    try:
        with av.open(f, mode="r") as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise AudioProblem("not_audio", "the file holds no audio stream (FFmpeg found "
                                                f"{', '.join(s.type for s in container.streams) or 'nothing'}); "
                                                "point the row at the recording")
            fmt = f"{container.format.name.split(',')[0].upper()}/{stream.codec_context.name.upper()}"
            if max_seconds is not None and container.duration and container.duration / av.time_base > max_seconds:
                raise AudioProblem("too_long", _too_long_message(container.duration / av.time_base, max_seconds))
            resampler = av.AudioResampler(format="fltp")  # planar float, the source's rate and channels
            chunks, rate = [], stream.codec_context.sample_rate or stream.rate
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
                    rate = out.sample_rate
                if max_seconds is not None and rate and sum(c.shape[1] for c in chunks) > (max_seconds + 1) * rate:
                    raise AudioProblem("too_long", _too_long_message(sum(c.shape[1] for c in chunks) / rate,
                                                                     max_seconds))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
    except AudioProblem:
        raise
    except Exception as e:  # av.error.FFmpegError and what a demuxer throws on odd input
        if sniff_format(head) is None:
            raise _decode_problem(head, sf_error) from None
        name = sniff_format(head)[0]
        why = getattr(e, "strerror", None) or str(e)
        raise AudioProblem("corrupt_audio", f"looks like {name} but FFmpeg cannot decode it ({why}); re-export the "
                                            "file, or convert it with `ffmpeg -i in.m4a -ar 16000 -ac 1 out.wav`") from None
    if not chunks or not rate:
        raise AudioProblem("corrupt_audio", f"{fmt}: no audio frames could be decoded; re-export the file")
    frames = np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False)
    if not np.isfinite(frames).all():
        raise AudioProblem("non_finite_samples", f"NaN or infinite samples ({fmt}); regenerate the file")
    info = AudioInfo(int(rate), frames.shape[1], frames.shape[0], fmt.split("/")[0], fmt.split("/")[1])
    return resample(downmix(frames), info.sample_rate), info


def _decode_problem(head: bytes, err: Exception) -> AudioProblem:
    why = getattr(err, "error_string", None) or str(err)  # libsndfile's own words, without the file name
    sniffed = sniff_format(head)
    if sniffed is None:
        return AudioProblem(
            "not_audio",
            f"not an audio file libsndfile recognises ({why.strip()}; it starts with {head[:12]!r}); "
            "point the row at the real recording (WAV, FLAC, OGG or MP3)",
        )
    name, readable = sniffed
    if not readable:
        return AudioProblem(
            "unsupported_format",
            f"{name} audio cannot be decoded by libsndfile (and PyAV/FFmpeg is not installed); convert it, e.g. "
            "`ffmpeg -i in.m4a -ar 16000 -ac 1 out.wav`, and point the row at the WAV",
        )
    return AudioProblem("corrupt_audio", f"looks like {name} but cannot be decoded ({why.strip()}); re-export the file")


def downmix(frames: np.ndarray) -> np.ndarray:
    """(frames, channels) → (frames,) by averaging the channels."""
    assert frames.ndim == 2, frames.shape
    if frames.shape[1] == 1:
        return np.ascontiguousarray(frames[:, 0], dtype=np.float32)
    weights = np.full(frames.shape[1], 1.0 / frames.shape[1], dtype=np.float32)
    return frames @ weights  # a BLAS matrix-vector product: ~25x faster than frames.mean(axis=1)


def resample(samples: np.ndarray, sample_rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 at ``sample_rate`` → mono float32 at ``target`` (soxr, quality HQ)."""
    if sample_rate == target or samples.size == 0:
        return samples.astype(np.float32, copy=False)
    return soxr.resample(samples, sample_rate, target, quality=RESAMPLE_QUALITY).astype(np.float32, copy=False)


def duration(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    return len(samples) / sample_rate


def check_audio(
    samples: np.ndarray, *, min_seconds: float = MIN_SECONDS, max_seconds: float = MAX_SECONDS
) -> AudioProblem | None:
    """The first problem of decoded 16 kHz mono audio, or None when it is usable."""
    if not np.isfinite(samples).all():
        return AudioProblem("non_finite_samples", "NaN or infinite samples; regenerate the file")
    seconds = duration(samples)
    if seconds < min_seconds:
        return AudioProblem(
            "too_short", f"{seconds:.3f} s is shorter than {min_seconds} s (--min-seconds); nothing to transcribe"
        )
    if seconds > max_seconds:
        return AudioProblem("too_long", _too_long_message(seconds, max_seconds))
    peak = float(np.max(np.abs(samples)))
    if peak < SILENCE_PEAK:
        return AudioProblem(
            "silent",
            f"digital silence: peak {peak:.2e} is below {SILENCE_PEAK:.0e} (-80 dBFS); "
            "the recording is empty or muted — re-record or remove the row",
        )
    return None


def _too_long_message(seconds: float, max_seconds: float) -> str:
    return (
        f"{seconds:.2f} s is longer than {max_seconds:g} s (--max-seconds, the model's window); "
        "split the recording into shorter utterances with their own transcripts"
    )


def fit_full_scale(samples: np.ndarray) -> tuple[np.ndarray, float]:
    """Scale float audio whose peak exceeds 1.0 (float wavs may) down to 1.0 instead of clipping it.

    Returns (samples, gain applied); the gain is 1.0 for audio already in range.
    """
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak <= 1.0:
        return samples, 1.0
    return (samples / peak).astype(np.float32), 1.0 / peak


def write_wav16(path: str | Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float samples as a 16-bit PCM wav, atomically (temp file + rename). Values are clipped to [-1, 1]."""
    clipped = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    with atomic_path(Path(path)) as tmp:
        sf.write(tmp, clipped, sample_rate, subtype="PCM_16", format="WAV")
