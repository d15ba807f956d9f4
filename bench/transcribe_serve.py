"""Using a model on the CPU: `asr-ft transcribe` on a 3-minute recording next to faster-whisper's own
`WhisperModel.transcribe(vad_filter=True)` (same file, same CTranslate2 model, same run), and `asr-ft serve`
latency and throughput at 1 and 8 concurrent clients.

    ASRFT_REAL_ZH_DEV=/data/real-zh-dev python bench/transcribe_serve.py [--model runs/demo/export/ct2] \\
        [--repeats 3] [--requests 12] [--out bench/results/cpu-transcribe-serve.json]

The recording: the first 15 clips of the real Mandarin dev set ($ASRFT_REAL_ZH_DEV) separated by silences,
180 s in all (built in memory, written to a temporary WAV; nothing is copied into the repository). Model:
``--model`` (default ``bundled:whisper-base``; a CTranslate2 folder, e.g. an export's ``ct2/``, for the
faster-whisper comparison). Both decoders run greedy (beam 1) with language zh, float32, every core this
process may use; faster-whisper keeps its other defaults (temperature fallback off: 0 only; conditioning on
the previous text on). Real-time factor = decoding wall time / audio seconds (model loading excluded; audio
decoding and VAD included), median of ``--repeats`` runs. CER of each against the 15 references joined.

Serving: `python -m jobs.serve MODEL` in a subprocess on 127.0.0.1; each client posts real clips (rotating
over the 15) one after the other; latency = request to response; requests/s = requests / wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results" / "cpu-transcribe-serve.json"
SR = 16_000
N_CLIPS = 15
SECONDS = 180.0


def real_clips(folder: Path, n: int) -> list[tuple[str, np.ndarray, str, Path]]:
    from common.core.audio import load_audio

    with open(folder / "transcripts.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    return [(r["audio_id"], load_audio(folder / "audio" / f"{r['audio_id']}.wav")[0], r["text"],
             folder / "audio" / f"{r['audio_id']}.wav") for r in rows]


def build_recording(clips: list[np.ndarray], seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    room = int(seconds * SR) - sum(len(c) for c in clips)
    weights = rng.uniform(1.0, 2.0, len(clips) + 1)
    gaps = (room * weights / weights.sum()).astype(int)
    parts = []
    for gap, clip in zip(gaps, clips, strict=False):
        parts += [np.zeros(gap, np.float32), clip]
    parts.append(np.zeros(int(seconds * SR) - sum(len(p) for p in parts), np.float32))
    return np.concatenate(parts)


def cer(reference: str, hypothesis: str) -> float:
    from common.core.metrics import aggregate

    return round(aggregate([{"reference": reference, "hypothesis": hypothesis}])["cer"], 4)


def bench_transcribe(model: str, wav: Path, samples: np.ndarray, reference: str, repeats: int) -> dict[str, Any]:
    from faster_whisper import WhisperModel

    from common.core.audio import load_audio
    from common.core.inference import open_model
    from common.core.segment import join_texts, transcribe_recording
    from common.core.transcribe import cpu_threads
    from jobs.transcribe import TranscribeSettings

    loaded = open_model(TranscribeSettings(model=model, audio=[str(wav)], device="cpu"))
    ct2_dir = Path(loaded.info["folder"])
    ours, ours_cpu, text = [], [], ""
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        audio, _ = load_audio(wav)
        segments = transcribe_recording(loaded.engine, audio, batch_size=loaded.batch_size)
        ours.append(time.perf_counter() - t0)
        ours_cpu.append(time.process_time() - c0)
        text = join_texts([s.text for s in segments])
    del loaded

    fw = WhisperModel(str(ct2_dir), device="cpu", compute_type="float32", cpu_threads=cpu_threads())
    theirs, theirs_cpu, fw_text, fw_segments = [], [], "", 0
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        result, _info = fw.transcribe(str(wav), language="zh", task="transcribe", beam_size=1, temperature=0.0,
                                      vad_filter=True)
        result = list(result)
        theirs.append(time.perf_counter() - t0)
        theirs_cpu.append(time.process_time() - c0)
        fw_text, fw_segments = "".join(s.text for s in result), len(result)
    del fw
    audio_s = len(samples) / SR
    return {
        "audio_seconds": audio_s, "model_folder": ct2_dir.name, "threads": cpu_threads(), "repeats": repeats,
        "asr_ft_transcribe": {"seconds": [round(x, 2) for x in ours], "rtf_median": round(statistics.median(ours) / audio_s, 4),
                              "cpu_seconds": [round(x, 2) for x in ours_cpu],
                              "cpu_rtf_median": round(statistics.median(ours_cpu) / audio_s, 4),
                              "segments": len(segments), "cer": cer(reference, text),
                              "settings": "Silero VAD (min silence 1 s, pad 200 ms) → ≤30-s segments, batches of 8, "
                                          "greedy, language zh, no timestamps tokens, float32"},
        "faster_whisper_transcribe_vad": {"seconds": [round(x, 2) for x in theirs],
                                          "rtf_median": round(statistics.median(theirs) / audio_s, 4),
                                          "cpu_seconds": [round(x, 2) for x in theirs_cpu],
                                          "cpu_rtf_median": round(statistics.median(theirs_cpu) / audio_s, 4),
                                          "segments": fw_segments, "cer": cer(reference, fw_text),
                                          "settings": "WhisperModel.transcribe(vad_filter=True, beam_size=1, "
                                                      "temperature=0, language='zh'), float32, sequential 30-s "
                                                      "windows over the speech"},
        "speedup_median": round(statistics.median(theirs) / statistics.median(ours), 2),
        "cpu_speedup_median": round(statistics.median(theirs_cpu) / statistics.median(ours_cpu), 2),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_serve(model: str, files: list[Path], requests: int) -> dict[str, Any]:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="asrft-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.serve", model, "--port", str(port), "--device", "cpu"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve did not start; see {log.name}") from None
                time.sleep(0.2)
        payloads = [(f.name, f.read_bytes()) for f in files]
        out = {}
        with httpx.Client(timeout=600) as client:
            client.post(url + "/v1/audio/transcriptions", files={"file": payloads[0]}, data={"model": "m"})  # warm-up
            for clients in (1, 8):
                n = requests if clients == 1 else requests * 4

                def one(i: int) -> float:
                    t0 = time.perf_counter()
                    r = client.post(url + "/v1/audio/transcriptions", files={"file": payloads[i % len(payloads)]},
                                    data={"model": "m"})
                    r.raise_for_status()
                    return time.perf_counter() - t0

                t0 = time.perf_counter()
                with ThreadPoolExecutor(max_workers=clients) as pool:
                    latencies = sorted(pool.map(one, range(n)))
                wall = time.perf_counter() - t0
                out[f"clients_{clients}"] = {
                    "requests": n, "latency_p50_s": round(float(np.percentile(latencies, 50)), 3),
                    "latency_p95_s": round(float(np.percentile(latencies, 95)), 3),
                    "requests_per_s": round(n / wall, 3), "wall_s": round(wall, 2)}
        out["clip_seconds_mean"] = round(float(np.mean([sf_seconds(f) for f in files])), 2)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sf_seconds(path: Path) -> float:
    import soundfile as sf

    return sf.info(str(path)).duration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled:whisper-base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=12, help="requests for 1 client (8 clients: 4×)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--parts", default="transcribe,serve",
                        help="what to measure; a part left out keeps its result from --out (with its own date)")
    args = parser.parse_args()
    folder = os.environ.get("ASRFT_REAL_ZH_DEV")
    if not folder:
        sys.exit("set ASRFT_REAL_ZH_DEV to the real Mandarin dev set (transcripts.csv + audio/)")
    import soundfile as sf

    from common.core.files import atomic_write_bytes

    clips = real_clips(Path(folder), N_CLIPS)
    samples = build_recording([c for _, c, _, _ in clips], SECONDS)
    reference = "".join(t for _, _, t, _ in clips)
    parts = set(args.parts.split(","))
    old = json.loads(args.out.read_text(encoding="utf-8")) if args.out.is_file() else {}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    load = {"start": [round(x, 2) for x in os.getloadavg()]}
    if "transcribe" in parts:
        with tempfile.TemporaryDirectory(prefix="asrft-bench-") as work:
            wav = Path(work) / "recording.wav"
            sf.write(wav, samples, SR, subtype="PCM_16")
            transcribe = {"date": now, **bench_transcribe(args.model, wav, samples, reference, args.repeats)}
    else:
        transcribe = old.get("transcribe")
    serve = ({"date": now, **bench_serve(args.model, [p for _, _, _, p in clips], args.requests)}
             if "serve" in parts else old.get("serve"))
    load["end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "benchmark": "cpu-transcribe-serve", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "note": "2-core development machine, CPU shared with other jobs running at the same time: "
                            "wall times are pessimistic and noisy; cpu_seconds (this process's CPU time) compare the "
                            "two decoders better; they ran back to back in one run",
                    "load_average_1_5_15_min": load},
        "model": args.model, "recording": f"{N_CLIPS} real-zh-dev clips + silences, {SECONDS:.0f} s",
        "transcribe": transcribe, "serve": serve,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, (json.dumps(result, ensure_ascii=False, indent=2) + "\n").encode())
    print(json.dumps(result, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
