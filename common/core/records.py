"""Data records in the conversation format of upstream Kimi-Audio fine-tuning, so data prepared here works
there and vice versa:

    {"id": "utt1", "task_type": "understanding",
     "conversation": [
        {"role": "user", "message_type": "text", "content": "请把这段语音转录成文本。"},
        {"role": "user", "message_type": "audio", "content": "<absolute URI of the 16 kHz wav>"},
        {"role": "assistant", "message_type": "text", "content": "<transcript>"}],
     "duration": 2.31, "audio_path": "prepare/audio/utt1.wav", ...}

``audio_path`` is relative to the run folder, so records stay valid when the artifacts are mounted
elsewhere (a PVC in a pod, a volume in compose); ``content`` keeps the URI upstream scripts expect.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from common.core.store import atomic_write_bytes

PROMPT_ZH = "请把这段语音转录成文本。"  # the Kimi-Audio evaluation kit's Chinese ASR prompt; train and test alike


class RecordError(ValueError):
    pass


def make_record(rec_id: str, audio_uri: str, audio_path: str, text: str, duration: float, **extra: Any) -> dict:
    return {
        "id": rec_id,
        "task_type": "understanding",
        "conversation": [
            {"role": "user", "message_type": "text", "content": PROMPT_ZH},
            {"role": "user", "message_type": "audio", "content": audio_uri},
            {"role": "assistant", "message_type": "text", "content": text},
        ],
        "duration": round(float(duration), 4),
        "audio_path": audio_path,
        **extra,
    }


def transcript(rec: dict) -> str:
    for msg in reversed(rec["conversation"]):
        if msg["role"] == "assistant" and msg["message_type"] == "text":
            return msg["content"]
    raise RecordError(f"record {rec.get('id')!r} has no assistant text message (the transcript)")


def audio_message(rec: dict) -> dict:
    for msg in rec["conversation"]:
        if msg["message_type"] == "audio":
            return msg
    raise RecordError(f"record {rec.get('id')!r} has no audio message")


def audio_location(rec: dict, run_dir: Path | None = None) -> str:
    """Where to read the audio: the run-relative path when the run folder is known, else the URI."""
    if run_dir is not None and rec.get("audio_path"):
        return str(Path(run_dir) / rec["audio_path"])
    return audio_message(rec)["content"]


def read_jsonl(path: Path) -> list[dict]:
    return list(iter_jsonl(path))


def iter_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise RecordError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield obj


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_bytes(Path(path), ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))
    return len(lines)
