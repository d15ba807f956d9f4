"""Data manifests in the formats people already have → the rows prepare and evaluate check.

    table = read_manifest("data/train.jsonl", split="train")     # format detected
    table.rows, table.rejected, table.audio_dir                   # rows to check, bad lines, default audio folder

Formats (``--format``, default ``auto``):

| format        | what                                                     | example line(s)                              |
|---------------|----------------------------------------------------------|----------------------------------------------|
| `csv`         | CSV/TSV with an id (path) column and a text column; any  | `audio_id,text` / `utt1,你好`                 |
|               | delimiter of `, TAB ; \\|`; UTF-8, GB18030/GBK or Big5    |                                              |
| `jsonl`       | JSON lines: NeMo (`audio_filepath`, `text`, `duration`), | `{"audio_filepath": "a/utt1.wav", "text": …}` |
|               | FunASR (`key`, `source`, `target`), or this project's    | `{"key": "utt1", "source": "utt1.wav", …}`    |
|               | records (`id`, `conversation`)                           |                                              |
| `kaldi`       | a Kaldi data folder: `wav.scp` (`utt1 path`) + `text`    | `utt1 /data/wav/utt1.wav` / `utt1 你好`       |
|               | (`utt1 transcript`); commands (`… \\|`) are rejected       |                                              |
| `audiofolder` | a Hugging Face audiofolder: `metadata.csv` (or `.jsonl`) | `file_name,transcription` / `utt1.wav,你好`    |
|               | with `file_name` + `transcription`/`text` next to audio  |                                              |

``auto`` decides from the path: a folder holding ``wav.scp`` is ``kaldi``, one holding ``metadata.csv`` /
``metadata.jsonl`` is ``audiofolder``; a file ending in ``.jsonl``/``.json`` or whose first character is ``{``
is ``jsonl``; anything else is ``csv``.

Audio paths are relative to the audio folder (``--audio-dir``; default the manifest's own folder) or absolute
inside it or inside an ``--audio-root``. The record id is the manifest's id (CSV id column, FunASR ``key``,
Kaldi utterance id, record ``id``) or, when the format has none (NeMo, audiofolder), the audio path relative to
its folder without the extension — so the same data in any format gives the same records.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from common.core.dataset import (
    CsvTable,
    DatasetError,
    Problem,
    Rejected,
    Row,
    _field_problem,
    decode_lines,
    read_input_bytes,
    undecodable_line,
)
from common.core.settings import S3Settings

log = logging.getLogger(__name__)

FORMATS = ("auto", "csv", "tsv", "jsonl", "kaldi", "audiofolder")

# JSON keys, first present wins: NeMo, FunASR, Hugging Face, generic
JSON_PATH_KEYS = ("audio_filepath", "source", "file_name", "audio_path", "audio", "path", "wav")
JSON_TEXT_KEYS = ("text", "target", "transcription", "transcript", "sentence")
JSON_ID_KEYS = ("key", "id", "utt", "utt_id", "audio_id")


@dataclass
class Manifest:
    """What a manifest holds: rows to check, lines rejected while reading, and where its audio is by default."""

    format: str
    name: str
    rows: list[Row] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    audio_dir: str = ""  # the manifest's own folder: the default --audio-dir
    files: dict[str, bytes] = field(default_factory=dict)  # name → bytes read, for the inputs fingerprint


def _is_local_dir(uri: str) -> bool:
    return not uri.startswith("s3://") and Path(uri.removeprefix("file://")).expanduser().is_dir()


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def _parent(uri: str) -> str:
    if uri.startswith("s3://"):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return str(Path(uri.removeprefix("file://")).expanduser().parent)


def detect_format(uri: str, data: bytes | None = None) -> str:
    """``kaldi`` / ``audiofolder`` for a folder, ``jsonl`` / ``csv`` for a file (see the module doc)."""
    if _is_local_dir(uri):
        folder = Path(uri.removeprefix("file://")).expanduser()
        if (folder / "wav.scp").is_file():
            return "kaldi"
        if (folder / "metadata.csv").is_file() or (folder / "metadata.jsonl").is_file():
            return "audiofolder"
        raise DatasetError(
            f"{folder} is a folder without wav.scp (Kaldi) or metadata.csv/metadata.jsonl (Hugging Face "
            "audiofolder); pass the manifest file itself (CSV or JSON lines), or add --format"
        )
    lower = uri.lower()
    if lower.endswith("/wav.scp") or lower == "wav.scp":
        return "kaldi"
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if lower.endswith((".tsv", ".csv", ".txt")):
        return "csv"
    head = (data or b"").lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    return "jsonl" if head == b"{" else "csv"


def read_manifest(
    uri: str, *, split: str, s3: S3Settings | None = None, fmt: str = "auto", encoding: str | None = None,
    id_column: str | None = None, text_column: str | None = None,
) -> Manifest:
    """Read one manifest (a file or a folder, local or s3://) into rows; DatasetError for a whole-file problem."""
    if fmt not in FORMATS:
        raise DatasetError(f"--format {fmt!r} is not a known format; use one of {', '.join(FORMATS)}")
    data = None
    if fmt == "auto" and not _is_local_dir(uri):
        data = read_input_bytes(uri, s3, what=f"{split} manifest")
    if fmt == "auto":
        fmt = detect_format(uri, data)
    if fmt == "kaldi":
        if uri.rstrip("/").endswith(("/wav.scp", "/text")) and not _is_local_dir(uri):
            uri = _parent(uri)  # a file of the data folder given: the folder
        return _read_kaldi(uri, split, s3, encoding)
    if fmt == "audiofolder":
        if _is_local_dir(uri):
            folder = Path(uri.removeprefix("file://")).expanduser()
            meta = str(folder / ("metadata.jsonl" if (folder / "metadata.jsonl").is_file()
                                 and not (folder / "metadata.csv").is_file() else "metadata.csv"))
            folder_uri = str(folder)
        elif uri.lower().endswith((".csv", ".jsonl", ".tsv")):
            folder_uri, meta = _parent(uri), uri
        else:
            folder_uri, meta = uri, _join(uri, "metadata.csv")
        inner = "jsonl" if meta.lower().endswith(".jsonl") else "csv"
        out = read_manifest(meta, split=split, s3=s3, fmt=inner, encoding=encoding, id_column=id_column,
                            text_column=text_column)
        out.format, out.audio_dir = "audiofolder", folder_uri
        return out
    if _is_local_dir(uri):
        raise DatasetError(f"{uri} is a folder; --format {fmt} reads a file — pass the file, or --format kaldi / "
                           "audiofolder for a folder")
    if data is None:
        data = read_input_bytes(uri, s3, what=f"{split} manifest")
    name = Path(uri).name
    out = Manifest(fmt, name, audio_dir=_parent(uri), files={name: data})
    if fmt == "jsonl":
        out.rows, out.rejected = read_jsonl_manifest(data, name=name, split=split, encoding=encoding)
    else:
        from common.core.dataset import read_csv

        table: CsvTable = read_csv(data, name=name, split=split, id_column=id_column, text_column=text_column,
                                   encoding=encoding, delimiter="\t" if fmt == "tsv" else None)
        out.rows, out.rejected = table.rows, table.rejected
    return out


# ------------------------------------------------------------------------------------------------ JSON lines


def read_jsonl_manifest(data: bytes, *, name: str, split: str,
                        encoding: str | None = None) -> tuple[list[Row], list[Rejected]]:
    """NeMo / FunASR / record JSON lines → rows; a line that is not such an object is a malformed_row."""
    rows: list[Row] = []
    rejected: list[Rejected] = []
    lines = decode_lines(data, name, encoding)
    if not lines:
        raise DatasetError(f"{name} is empty; expected one JSON object per line, e.g. "
                           '{"audio_filepath": "utt1.wav", "text": "你好"}')
    for lineno, text in lines:
        row = Row(split, name, lineno, {})
        if isinstance(text, bytes):
            row.fields = {"raw": text.decode("utf-8", "backslashreplace")}
            rejected.append(Rejected.of(row, undecodable_line(text)))
            continue
        problem = _json_row(row, text)
        if problem is None:
            problem = _field_problem(row)
        if problem is not None:
            rejected.append(Rejected.of(row, problem))
            continue
        rows.append(row)
    log.info("%s: %d JSON lines; %d malformed", name, len(rows) + len(rejected), len(rejected))
    return rows, rejected


def _json_row(row: Row, text: str) -> Problem | None:
    """Fill ``row`` from one JSON line; the Problem when the line is not a usable object."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        row.fields = {"raw": text}
        return Problem("malformed_row", f"not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                                        'JSON object, e.g. {"audio_filepath": "utt1.wav", "text": "你好"}')
    if not isinstance(obj, dict):
        row.fields = {"raw": text}
        return Problem("malformed_row", f"expected a JSON object, got {type(obj).__name__}")
    row.fields = {k: v if isinstance(v, str | int | float | bool) or v is None else json.dumps(v, ensure_ascii=False)
                  for k, v in obj.items()}
    if isinstance(obj.get("conversation"), list):  # this project's record format
        return _record_row(row, obj)
    path_key = next((k for k in JSON_PATH_KEYS if k in obj), None)
    text_key = next((k for k in JSON_TEXT_KEYS if k in obj), None)
    if path_key is None or text_key is None:
        missing = " and ".join(what for what, key in (("an audio path (audio_filepath, source, file_name, …)",
                                                       path_key), ("a transcript (text, target, …)", text_key))
                               if key is None)
        return Problem("malformed_row", f"the object has no {missing}; keys found: {sorted(obj)[:8]}. NeMo lines "
                                        "have audio_filepath + text, FunASR lines key + source + target")
    path, value = obj[path_key], obj[text_key]
    if not isinstance(path, str) or not isinstance(value, str):
        return Problem("malformed_row", f"{path_key!r} and {text_key!r} must be strings, got "
                                        f"{type(path).__name__} and {type(value).__name__}")
    id_key = next((k for k in JSON_ID_KEYS if isinstance(obj.get(k), str | int) and k not in (path_key, text_key)),
                  None)
    row.audio, row.text = path.strip(), value.strip()
    row.id = str(obj[id_key]).strip() if id_key else ""
    if not row.audio:
        return Problem("malformed_row", f"{path_key!r} is empty; every line needs its audio file's path")
    return None


def _record_row(row: Row, obj: dict) -> Problem | None:
    from common.core.records import RecordError, audio_message, transcript

    try:
        row.text = transcript(obj).strip()
        audio = audio_message(obj)["content"]
    except (RecordError, KeyError, TypeError) as e:
        return Problem("malformed_row", f"not a complete record ({e}); a record has an audio message and an "
                                        "assistant text message")
    if not isinstance(audio, str) or not audio.strip():
        return Problem("malformed_row", "the record's audio message has no path")
    row.audio = audio.strip().removeprefix("file://")
    row.id = str(obj.get("id") or "").strip()
    return None


# ------------------------------------------------------------------------------------------------ Kaldi


def _read_kaldi(uri: str, split: str, s3: S3Settings | None, encoding: str | None) -> Manifest:
    """A Kaldi data folder: ``wav.scp`` (``<utt> <path>``) + ``text`` (``<utt> <transcript>``), in text's order."""
    scp_uri, text_uri = _join(uri, "wav.scp"), _join(uri, "text")
    if _is_local_dir(uri) and (Path(uri.removeprefix("file://")).expanduser() / "segments").is_file():
        raise DatasetError(
            f"{uri} has a segments file: its wav.scp names whole recordings that segments cuts into utterances, "
            "which prepare does not do. Cut the utterances into files first (Kaldi's extract-segments, or "
            "`sox rec.wav utt.wav trim START =END` per line) and list those in wav.scp")
    scp_data = read_input_bytes(scp_uri, s3, what="Kaldi wav.scp")
    text_data = read_input_bytes(text_uri, s3, what="Kaldi text")
    name = Path(uri.rstrip("/")).name or uri
    out = Manifest("kaldi", f"{name}/text", audio_dir=uri, files={"wav.scp": scp_data, "text": text_data})
    wavs: dict[str, tuple[int, str]] = {}
    for lineno, line in decode_lines(scp_data, f"{name}/wav.scp", encoding):
        row = Row(split, f"{name}/wav.scp", lineno, {})
        if isinstance(line, bytes):
            row.fields = {"raw": line.decode("utf-8", "backslashreplace")}
            out.rejected.append(Rejected.of(row, undecodable_line(line)))
            continue
        parts = line.strip().split(maxsplit=1)
        row.fields = {"raw": line}
        if len(parts) != 2:
            out.rejected.append(Rejected.of(row, Problem(
                "malformed_row", "expected `<utterance-id> <audio path>` on each wav.scp line")))
            continue
        utt, path = parts
        if utt in wavs:
            out.rejected.append(Rejected.of(row, Problem(
                "duplicate_id", f"wav.scp names {utt!r} twice (first on line {wavs[utt][0]}); the first is kept")))
            continue
        wavs[utt] = (lineno, path.strip())
    seen: set[str] = set()
    for lineno, line in decode_lines(text_data, out.name, encoding):
        row = Row(split, out.name, lineno, {})
        if isinstance(line, bytes):
            row.fields = {"raw": line.decode("utf-8", "backslashreplace")}
            out.rejected.append(Rejected.of(row, undecodable_line(line)))
            continue
        parts = line.strip().split(maxsplit=1)
        row.id, row.text = parts[0], (parts[1].strip() if len(parts) > 1 else "")
        row.fields = {"id": row.id, "text": row.text}
        seen.add(row.id)
        entry = wavs.get(row.id)
        if entry is None:
            out.rejected.append(Rejected.of(row, Problem(
                "missing_file", f"utterance {row.id!r} is in text but not in wav.scp; add its audio path to "
                                "wav.scp or remove the line")))
            continue
        row.audio = entry[1]
        row.fields["wav"] = row.audio
        problem = kaldi_path_problem(row.audio) or _field_problem(row)
        if problem is not None:
            out.rejected.append(Rejected.of(row, problem))
            continue
        out.rows.append(row)
    for utt, (lineno, path) in wavs.items():
        if utt not in seen:
            out.rejected.append(Rejected.of(Row(split, f"{name}/wav.scp", lineno, {"id": utt, "wav": path}), Problem(
                "empty_text", f"utterance {utt!r} has audio in wav.scp but no line in text; add its transcript")))
    log.info("%s: %d utterances in text, %d in wav.scp; %d rejected while reading", name,
             len(seen), len(wavs), len(out.rejected))
    return out


def kaldi_path_problem(path: str) -> Problem | None:
    """kaldi_command for a wav.scp entry that is a command (``sox … |``) or an archive offset (``a.ark:12``)."""
    stripped = path.strip()
    if stripped.endswith("|") or stripped.startswith("|"):
        return Problem("kaldi_command", f"the wav.scp entry {stripped[:60]!r} is a command, which is not run "
                                        "(running commands from a data file is unsafe); write the audio to files "
                                        "first, e.g. with Kaldi's wav-copy or `sox`, and list their paths")
    if ".ark:" in stripped or stripped.endswith(".ark"):
        return Problem("kaldi_command", f"the wav.scp entry {stripped[:60]!r} points into a Kaldi archive; extract "
                                        "the clips to wav files (`wav-copy scp:wav.scp ark,scp:…` then `sox`) and "
                                        "list their paths")
    if " " in stripped and not Path(stripped).suffix:
        return Problem("kaldi_command", f"the wav.scp entry {stripped[:60]!r} looks like a command line; list a "
                                        "plain audio file path per utterance")
    return None
