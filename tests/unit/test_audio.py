"""common.core.audio: decoding every libsndfile format to 16 kHz mono, the problem checks, 16-bit wav output."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import soundfile as sf

from common.core.audio import (
    SAMPLE_RATE,
    SILENCE_PEAK,
    AudioProblem,
    check_audio,
    downmix,
    fit_full_scale,
    load_audio,
    resample,
    sniff_format,
    write_wav16,
)


def tone(seconds: float, sr: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encoded(samples: np.ndarray, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "subtype", "sr", "channels", "tolerance"),
    [
        ("WAV", "PCM_U8", 8000, 1, 1 / 64),  # 8-bit: 1/128 steps
        ("WAV", "PCM_16", 16000, 1, 1e-3),
        ("WAV", "PCM_16", 44100, 2, 1e-3),
        ("WAV", "PCM_24", 48000, 1, 1e-3),
        ("WAV", "PCM_32", 22050, 1, 1e-3),
        ("WAV", "FLOAT", 16000, 1, 1e-3),
        ("WAV", "DOUBLE", 32000, 2, 1e-3),
        ("FLAC", "PCM_16", 22050, 1, 1e-3),
        ("FLAC", "PCM_24", 96000, 2, 1e-3),
        ("OGG", "VORBIS", 44100, 1, 0.05),  # lossy
    ],
)
def test_load_audio_converts_to_16k_mono(fmt, subtype, sr, channels, tolerance):
    mono = tone(1.25, sr, amp=0.5)
    data = np.stack([mono] * channels, axis=1) if channels > 1 else mono
    samples, info = load_audio(encoded(data, sr, fmt, subtype))
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert (info.sample_rate, info.channels, info.format, info.subtype) == (sr, channels, fmt, subtype)
    assert abs(len(samples) / SAMPLE_RATE - 1.25) < 0.01  # duration preserved within 10 ms
    middle = samples[len(samples) // 4: 3 * len(samples) // 4]  # away from the resampler's edges
    assert abs(float(np.max(np.abs(middle))) - 0.5) < tolerance


def test_load_audio_reads_mp3_and_paths(tmp_path):
    path = tmp_path / "a.mp3"
    sf.write(path, tone(1.0, 16000), 16000, format="MP3")
    samples, info = load_audio(path)
    assert info.format == "MP3" and abs(len(samples) / SAMPLE_RATE - 1.0) < 0.1


def test_downmix_averages_channels():
    left, right = tone(0.5, 16000, amp=0.6), tone(0.5, 16000, amp=0.2)
    mixed = downmix(np.stack([left, right], axis=1))
    np.testing.assert_allclose(mixed, (left + right) / 2, atol=1e-7)
    samples, _ = load_audio(encoded(np.stack([left, -left], axis=1), 16000, "WAV", "FLOAT"))
    assert check_audio(samples).reason == "silent"  # opposite phases cancel: what a mono listener gets


def test_resampler_is_band_limited():
    """A 12 kHz tone at 44.1 kHz is above the 8 kHz Nyquist limit of 16 kHz audio: a real resampler removes
    it; naive decimation or linear interpolation would alias it to 4 kHz at nearly full amplitude."""
    out = resample(tone(1.0, 44100, freq=12000, amp=0.5), 44100)
    assert float(np.max(np.abs(out[1000:-1000]))) < 1e-3
    kept = resample(tone(1.0, 44100, freq=1000, amp=0.5), 44100)
    spectrum = np.abs(np.fft.rfft(kept))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / len(kept) - 1000) < 2  # the tone stays at 1 kHz


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_file"),
        (b"hello, this is a transcript and not audio\n" * 5, "not_audio"),
        (b"RIFF\x00\x00\x00\x00WAVE" + bytes(range(256)) * 4, "corrupt_audio"),  # no data chunk
        (b"ID3" + b"\x00" * 500, "corrupt_audio"),  # an MP3 tag, no frames
        (b"fLaC" + b"\xaa" * 300, "corrupt_audio"),
        (b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00" + b"\x00" * 300, "corrupt_audio"),  # FFmpeg fails too
        (b"#!AMR\n" + b"\x00" * 300, "corrupt_audio"),
    ],
)
def test_load_audio_problems(data, reason):
    with pytest.raises(AudioProblem) as e:
        load_audio(data)
    assert e.value.reason == reason
    assert str(e.value)  # a human-readable message


def test_without_pyav_m4a_is_unsupported(monkeypatch):
    m4a = encode_av(tone(1.0, 16000), 16000, "ipod", "aac")
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    with pytest.raises(AudioProblem) as e:
        load_audio(m4a)
    assert e.value.reason == "unsupported_format" and "ffmpeg -i" in str(e.value)


def encode_av(x: np.ndarray, sr: int, container: str, codec: str, rate: int | None = None) -> bytes:
    """Mono float samples → the bytes of ``container`` with ``codec`` (FFmpeg through PyAV)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate or sr)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray((x[None, :] * 32767).astype(np.int16), format="s16", layout="mono")
        frame.sample_rate = sr
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize(("container", "codec", "rate", "fmt"), [
    ("ipod", "aac", 16000, "AAC"),  # .m4a from a phone
    ("adts", "aac", 16000, "AAC"),  # raw .aac
    ("webm", "libopus", 48000, "OPUS"),  # browser recordings
    ("ogg", "libopus", 48000, "OPUS"),  # .opus
])
def test_ffmpeg_formats_decode(container, codec, rate, fmt):
    samples, info = load_audio(encode_av(tone(1.0, 16000, freq=440, amp=0.5), 16000, container, codec, rate))
    assert info.subtype == fmt and info.sample_rate == rate
    assert 0.95 < len(samples) / SAMPLE_RATE < 1.2  # encoder priming/padding adds a few ms
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / len(samples) - 440) < 5  # the tone survives


def test_truncated_flac_is_corrupt():
    flac = encoded(tone(1.0, 16000), 16000, "FLAC")
    with pytest.raises(AudioProblem) as e:
        load_audio(flac[: len(flac) // 3])
    assert e.value.reason == "corrupt_audio"


def test_zero_byte_path_is_empty_file(tmp_path):
    (tmp_path / "z.wav").write_bytes(b"")
    with pytest.raises(AudioProblem) as e:
        load_audio(tmp_path / "z.wav")
    assert e.value.reason == "empty_file"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(bad):
    x = tone(0.5, 16000)
    x[100] = bad
    with pytest.raises(AudioProblem) as e:
        load_audio(encoded(x, 16000, "WAV", "FLOAT"))
    assert e.value.reason == "non_finite_samples"


def test_too_long_is_decided_from_the_header():
    data = encoded(np.zeros(31 * 8000, np.float32), 8000, "WAV", "PCM_16")
    with pytest.raises(AudioProblem) as e:
        load_audio(data, max_seconds=30)
    assert e.value.reason == "too_long" and "31.00 s" in str(e.value)
    samples, _ = load_audio(data)  # without a limit it decodes
    assert len(samples) == 31 * SAMPLE_RATE


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        (tone(1.0, SAMPLE_RATE), None),
        (tone(0.1, SAMPLE_RATE), None),  # exactly the minimum
        (tone(0.099, SAMPLE_RATE), "too_short"),
        (np.zeros(0, np.float32), "too_short"),
        (tone(30.0, SAMPLE_RATE), None),  # exactly the maximum
        (tone(30.01, SAMPLE_RATE), "too_long"),
        (np.zeros(SAMPLE_RATE, np.float32), "silent"),
        (tone(1.0, SAMPLE_RATE, amp=SILENCE_PEAK / 2), "silent"),  # dither-level noise
        (tone(1.0, SAMPLE_RATE, amp=SILENCE_PEAK * 3), None),  # quiet but real
        (np.full(SAMPLE_RATE, np.nan, np.float32), "non_finite_samples"),
    ],
    ids=["ok", "min", "short", "empty", "max", "long", "zeros", "dither", "quiet", "nan"],
)
def test_check_audio(samples, expected):
    problem = check_audio(samples, min_seconds=0.1, max_seconds=30)
    assert (problem.reason if problem else None) == expected


def test_check_audio_limits_are_settings():
    assert check_audio(tone(2.0, SAMPLE_RATE), min_seconds=3, max_seconds=10).reason == "too_short"
    assert check_audio(tone(2.0, SAMPLE_RATE), min_seconds=0.1, max_seconds=1.5).reason == "too_long"


def test_write_wav16_round_trip(tmp_path):
    x = tone(0.75, SAMPLE_RATE, amp=0.7)
    write_wav16(tmp_path / "out.wav", x)
    info = sf.info(tmp_path / "out.wav")
    assert (info.samplerate, info.channels, info.subtype, info.format) == (SAMPLE_RATE, 1, "PCM_16", "WAV")
    y, _ = sf.read(tmp_path / "out.wav", dtype="float32")
    assert len(y) == len(x) and np.max(np.abs(y - x)) <= 1 / 32768 + 1e-7
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]  # no temp file left behind


def test_write_wav16_clips_and_fit_full_scale_scales(tmp_path):
    loud = np.array([0.0, 1.5, -2.0, 0.5], np.float32)
    write_wav16(tmp_path / "c.wav", loud)
    y, _ = sf.read(tmp_path / "c.wav", dtype="int16")
    assert y.tolist() == [0, 32767, -32768, 16384]
    scaled, gain = fit_full_scale(loud)
    assert gain == 0.5 and float(np.max(np.abs(scaled))) == 1.0
    same, gain = fit_full_scale(tone(0.1, SAMPLE_RATE))
    assert gain == 1.0


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", ("WAV", True)),
        (b"fLaC\x00\x00\x00\x22", ("FLAC", True)),
        (b"OggS\x00\x02", ("OGG", True)),
        (b"\xff\xfb\x90\x64", ("MP3", True)),
        (b"\x00\x00\x00\x18ftypmp42", ("MP4/M4A", False)),
        (b"\xff\xf1\x50\x80", ("AAC (ADTS)", False)),
        (b"audio_id,text\n", None),
        (b"", None),
    ],
)
def test_sniff_format(head, expected):
    assert sniff_format(head) == expected
