"""Reading a transcript CSV and checking its rows: columns, ids → audio files, and why a row is rejected.
(The other manifest formats — JSON lines, Kaldi, audiofolder — are read in ``common.core.manifest`` into the
same rows, checked here.)

A bad row never stops a stage: each problem becomes a *rejected row* with a stable reason code (below)
and an English message that says what was found and how to fix it. Only a problem with a whole file
(not found, UTF-16, no recognisable columns) raises :class:`DatasetError`.

Reason codes (``rejected.jsonl`` → ``reason``; stable, scripts may rely on them):

| reason                       | the row is rejected when                                                      |
|------------------------------|-------------------------------------------------------------------------------|
| `malformed_row`              | the line cannot be decoded, is not parseable CSV (stray quote) or JSON, has   |
|                              | the wrong number of fields or keys, an empty id, or control characters        |
| `kaldi_command`              | a Kaldi wav.scp entry is a command (`sox … \\|`) or an archive offset         |
| `path_escape`                | the path is a URL, contains `..`, is absolute outside the audio folder and    |
|                              | every --audio-root, or resolves (symlink) outside them                        |
| `duplicate_id`               | an earlier row (of this CSV or the train CSV) has the same id — the first one |
|                              | wins; `utt1` and `utt1.wav` are the same id                                   |
| `empty_text`                 | the transcript is empty or only whitespace                                    |
| `punctuation_only_text`      | nothing is left after normalization (`。。。`, `——！`)                          |
| `missing_file`               | no file for the id in the audio folder, as given or with an audio extension   |
| `unreadable_file`            | the file exists but cannot be read (permissions, S3 error)                    |
| `empty_file`                 | the file is 0 bytes                                                           |
| `not_audio`                  | libsndfile does not recognise it and it does not start like audio             |
| `unsupported_format`         | audio libsndfile cannot decode while PyAV (FFmpeg) is not installed           |
| `corrupt_audio`              | it starts like WAV/FLAC/OGG/MP3/M4A/… but cannot be decoded                   |
| `non_finite_samples`         | a sample is NaN or ±inf                                                       |
| `too_short`                  | shorter than `--min-seconds` (0.1 s)                                          |
| `too_long`                   | longer than `--max-seconds` (30 s: one model window)                          |
| `silent`                     | digital silence (peak < -80 dBFS), see ``common.core.audio.SILENCE_PEAK``          |
| `text_too_long_for_duration` | more characters than `5 + 15 × seconds` could be spoken in the clip           |
| `duplicate_audio`            | byte-identical to the audio of an earlier kept row (train/test leakage)       |

Checks run in this order and a row gets the first reason that applies: malformed_row/kaldi_command, path_escape,
duplicate_id, empty_text, punctuation_only_text, missing_file/path_escape (symlink), the audio checks,
text_too_long_for_duration, duplicate_audio.

CSV rules (decided here, documented for users):

- UTF-8 with or without BOM. A file in which no line is UTF-8 is read in the encoding detected (GB18030 —
  a superset of GBK —, Big5, else charset-normalizer's guess; a warning names it), or in ``--encoding``. A
  UTF-16 file is refused as a whole (save it as "CSV UTF-8", or pass --encoding utf-16); in a UTF-8 file, a
  line whose bytes are not UTF-8 is a ``malformed_row`` (with a hint when it looks like GBK/GB18030), and the
  console says which lines.
- One record per line: a transcript never spans lines, so a stray quote costs one row instead of
  swallowing every row after it. Quoted fields (``"你好,世界"``) work as usual within a line.
- Delimiter: tab when the first line contains a tab, else what ``csv.Sniffer`` finds among ``, ; |``, else
  comma. Blank lines are skipped.
- Header: the first line is the header when it names an id column and a text column (case-insensitive):
  id ``id, audio_id, utt, utt_id, file, filename, file_name, path, wav, audio_filepath``; text ``text,
  transcript, transcription, sentence, label, answer`` (the first one present in that order wins), or the names given with ``--id-column`` /
  ``--text-column``. A file whose first line names no known column and that has exactly two columns is read
  as *headerless* ``id,text`` (a warning says so). Anything else is refused with the columns found.
- Extra trailing empty fields (``utt1,你好,`` from spreadsheet exports) are ignored.

Ids are paths relative to the audio folder (``utt1``, ``utt1.wav``, ``spk1/utt1``; ``\\`` counts as
``/``), or absolute paths inside it or inside an ``--audio-root``. The file is looked up as given, then with each extension of :data:`AUDIO_EXTENSIONS` (lower and
upper case). The record id is the id without a known audio extension.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import logging
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from common.core.settings import S3Settings
from common.core.text import is_cjk_char, is_punctuation_only, normalize_words

log = logging.getLogger(__name__)

ID_COLUMNS = ("id", "audio_id", "utt", "utt_id", "file", "filename", "file_name", "path", "wav", "audio_filepath")
TEXT_COLUMNS = ("text", "transcript", "transcription", "sentence", "label", "answer")
# Tried in this order after the id as given; the last ones are audio libsndfile cannot decode, looked up
# anyway so that the row says "unsupported_format: convert it" instead of a misleading "missing_file".
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".oga", ".aiff", ".aif", ".au", ".caf",
                    ".w64", ".rf64", ".m4a", ".mp4", ".aac", ".webm", ".mka", ".3gp", ".amr", ".wma")

REASONS: dict[str, str] = {  # code → short meaning, in check order (stats.json lists them in this order)
    "malformed_row": "line is not valid UTF-8/CSV/JSON, wrong field count, empty id or control characters",
    "kaldi_command": "wav.scp entry is a command or an archive offset, not a file",
    "path_escape": "audio path points outside the audio folder and the allowed roots",
    "duplicate_id": "id already used by an earlier row",
    "empty_text": "transcript empty or blank",
    "punctuation_only_text": "transcript has only punctuation",
    "missing_file": "no audio file for the id",
    "unreadable_file": "audio file cannot be read",
    "empty_file": "audio file is 0 bytes",
    "not_audio": "file is not audio",
    "unsupported_format": "audio format neither libsndfile nor FFmpeg (PyAV) can decode",
    "corrupt_audio": "audio file is damaged",
    "non_finite_samples": "NaN or infinite samples",
    "too_short": "shorter than --min-seconds",
    "too_long": "longer than --max-seconds",
    "silent": "digital silence",
    "text_too_long_for_duration": "transcript too long for the clip's duration",
    "duplicate_audio": "same audio bytes as an earlier kept row",
}

# Speaking rate bound for text_too_long_for_duration. Mandarin is spoken at ~3-6 characters (syllables) per
# second, fast read news at ~6-7, and English at ~2-4 words per second. 15 tokens/s is more than twice the
# fastest normal speech, so only a transcript that cannot belong to the clip (the text of a longer clip, a
# clip cut short) trips it. Short clips get an allowance of 5 tokens because a 0.3-s "好的谢谢" is fine.
MAX_CHARS_PER_SECOND = 15.0
TEXT_ALLOWANCE = 5  # tokens
MAX_NAME_CHARS = 100  # output file names stay far below the 255-byte limit of common file systems

_LINE_BREAK = re.compile(rb"\r\n|\n|\r")
_TEXT_LINE_BREAK = re.compile(r"\r\n|\n|\r")  # not str.splitlines: U+2028, \x1c … stay inside a line
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
_UNSAFE_NAME_CHARS = re.compile(r"[^\w.\-]")  # \w is Unicode: Chinese ids stay readable


class DatasetError(Exception):
    """A problem with a whole input file; the message says what was expected and how to fix it."""


class Problem(NamedTuple):
    reason: str
    message: str


@dataclass
class Row:
    """One data line of a CSV, as read."""

    split: str  # "train" | "test"
    csv: str  # the CSV's name, for messages
    line: int  # 1-based line number in the CSV (the header is line 1)
    fields: dict[str, str]  # the raw row, column name → value, for rejected.jsonl
    id: str = ""
    text: str = ""
    audio: str = ""  # the audio file's path when the format names it apart from the id (else the id is the path)

    @property
    def audio_ref(self) -> str:
        return self.audio or self.id


@dataclass
class Rejected:
    split: str
    csv: str
    line: int
    row: dict[str, Any]
    reason: str
    message: str

    @classmethod
    def of(cls, row: Row, problem: Problem) -> Rejected:
        return cls(row.split, row.csv, row.line, row.fields, problem.reason, problem.message)

    def to_json(self) -> dict[str, Any]:
        return {"split": self.split, "csv": self.csv, "line": self.line, "row": self.row,
                "reason": self.reason, "message": self.message}


@dataclass
class CsvTable:
    id_column: str
    text_column: str
    header: bool
    rows: list[Row] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ CSV


def read_csv(
    data: bytes, *, name: str, split: str, id_column: str | None = None, text_column: str | None = None,
    encoding: str | None = None, delimiter: str | None = None,
) -> CsvTable:
    """Parse a transcript CSV's bytes into rows; bad lines become ``rejected`` entries, never exceptions."""
    numbered = decode_lines(data, name, encoding)
    if not numbered:
        raise DatasetError(f"{name} is empty; expected a header such as `audio_id,text` and one row per clip.")
    first_no, first = numbered[0]
    if isinstance(first, bytes):
        raise DatasetError(f"{name}: line {first_no} is not UTF-8{_gbk_hint(first)}.")
    delimiter = delimiter or sniff_delimiter([t for _, t in numbered[:20] if isinstance(t, str)])
    try:
        head = [h.strip().strip("\ufeff") for h in _parse_line(first, delimiter)]
    except csv.Error as e:
        raise DatasetError(f"{name}: cannot parse line {first_no} as CSV ({e}).") from None
    table = _columns(head, name, id_column, text_column)
    ncols = len(head)
    columns = head if table.header else ["id", "text"]
    id_idx = _index_of(columns, table.id_column)
    text_idx = _index_of(columns, table.text_column)
    for lineno, text in numbered[1:] if table.header else numbered:
        row = Row(split, name, lineno, {})
        if isinstance(text, bytes):
            row.fields = {"raw": text.decode("utf-8", "backslashreplace")}
            table.rejected.append(Rejected.of(row, undecodable_line(text)))
            continue
        try:
            values = _parse_line(text, delimiter)
        except csv.Error as e:
            row.fields = {"raw": text}
            table.rejected.append(Rejected.of(row, Problem(
                "malformed_row",
                f"cannot parse the line as CSV ({e}); quote a field that contains the delimiter or a quote "
                '("你好,世界", with "" for a quote inside); a transcript must fit on one line')))
            continue
        while len(values) > ncols and values[-1].strip() == "":
            values.pop()  # trailing empty fields from spreadsheet exports
        row.fields = _as_dict(columns, values)
        if len(values) != ncols:
            fix = ('quote a transcript that contains the delimiter ("你好,世界")' if len(values) > ncols
                   else "add the missing field")
            table.rejected.append(Rejected.of(row, Problem(
                "malformed_row", f"expected {ncols} fields ({', '.join(columns)}), got {len(values)}; {fix}")))
            continue
        row.id, row.text = values[id_idx].strip(), values[text_idx].strip()
        problem = _field_problem(row)
        if problem:
            table.rejected.append(Rejected.of(row, problem))
            continue
        table.rows.append(row)
    log.info("%s: %d data rows (%s id column %r, text column %r, delimiter %r); %d malformed", name,
             len(table.rows) + len(table.rejected), "header," if table.header else "headerless,",
             table.id_column, table.text_column, delimiter, len(table.rejected))
    return table


DELIMITERS = ",\t;|"


def sniff_delimiter(lines: list[str]) -> str:
    """The CSV delimiter: tab when the first line has one, else the one of ``, ; |`` that splits the header into
    known column names, else what ``csv.Sniffer`` finds among them in the first lines, else comma."""
    if not lines:
        return ","
    if "\t" in lines[0]:
        return "\t"
    known = {*ID_COLUMNS, *TEXT_COLUMNS}
    for delimiter in ",;|":  # a header naming known columns decides, whatever the transcripts contain
        names = [_column_key(n) for n in lines[0].split(delimiter)]
        if len(names) >= 2 and known & set(names):
            return delimiter
    try:
        return csv.Sniffer().sniff("\n".join(lines), delimiters=DELIMITERS).delimiter
    except csv.Error:
        counts = {d: lines[0].count(d) for d in ",;|"}
        best = max(counts, key=lambda d: counts[d])
        return best if counts[best] else ","


# Encodings tried, in order, for a file that is not UTF-8: GB18030 (a superset of GBK/GB2312, what Excel and
# WPS save on a Chinese Windows) and Big5 first, then charset-normalizer's guess. A candidate is taken only when
# it decodes the whole file and most of its non-ASCII characters are CJK.
_CJK_ENCODINGS = ("gb18030", "big5")


def decode_lines(data: bytes, name: str, encoding: str | None = None) -> list[tuple[int, str | bytes]]:
    """Non-blank lines of a text file as ``(line number, text)``; a line that cannot be decoded is kept as its
    raw ``bytes`` (the caller rejects it). ``encoding`` forces one; else UTF-8 (BOM ok), and a file that is not
    UTF-8 at all is decoded in the encoding detected (a warning says which). DatasetError for UTF-16 or a forced
    encoding that does not fit."""
    if encoding:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise DatasetError(f"--encoding {encoding!r} is not an encoding Python knows; use e.g. utf-8, gb18030, "
                               "big5") from None
        try:
            text = data.decode(encoding).removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise DatasetError(f"{name}: line {line} is not {encoding} (byte {e.start}); check --encoding, or drop "
                               "it to detect the encoding") from None
        return _numbered(text)
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DatasetError(
            f"{name} is UTF-16 encoded; expected UTF-8. Save it as 'CSV UTF-8' (Excel) or convert it with "
            f"`iconv -f UTF-16 -t UTF-8 {name} > fixed.csv` (or pass --encoding utf-16)."
        )
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return _numbered(data.decode("utf-8"))
    except UnicodeDecodeError:
        pass
    raw_lines = _LINE_BREAK.split(data)
    if not any(_is_utf8(raw) for raw in raw_lines if not raw.isascii()):  # no line is UTF-8: another encoding
        detected = detect_encoding(data)
        if detected is not None:
            log.warning("%s is not UTF-8; reading it as %s (detected). If the text looks wrong, pass --encoding "
                        "(e.g. --encoding big5) or save the file as UTF-8.", name, detected)
            return _numbered(data.decode(detected))
    out: list[tuple[int, str | bytes]] = []
    bad: list[int] = []
    for n, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        try:
            out.append((n, raw.decode("utf-8")))
        except UnicodeDecodeError:
            out.append((n, raw))
            bad.append(n)
    log.error("%s: %d line(s) are not UTF-8 (line%s %s) and are rejected as malformed_row%s", name, len(bad),
              "s" if len(bad) > 1 else "", ", ".join(map(str, bad[:10])) + (", …" if len(bad) > 10 else ""),
              _gbk_hint(raw_lines[bad[0] - 1]) if bad else "")
    return out


def detect_encoding(data: bytes) -> str | None:
    """The encoding of text that is not UTF-8 (see _CJK_ENCODINGS), or None when nothing fits."""
    import charset_normalizer

    guesses = [m.encoding for m in charset_normalizer.from_bytes(data)]
    # Big5 bytes also decode as GB18030 (into other characters): Big5 wins when charset-normalizer rules
    # GB18030 out; GB18030 otherwise (GBK text is often guessed as Big5 or CP949 among other candidates).
    first = ("big5", "gb18030") if "big5" in guesses and "gb18030" not in guesses else _CJK_ENCODINGS
    for enc in dict.fromkeys([*first, *guesses]):
        try:
            text = data.decode(enc)
        except (UnicodeDecodeError, LookupError):
            continue
        wide = [ch for ch in text if not ch.isascii()]
        if enc in _CJK_ENCODINGS and wide and sum(map(_is_cjk_or_punct, wide)) < 0.9 * len(wide):
            continue
        return enc
    return None


def _is_cjk_or_punct(ch: str) -> bool:
    return is_cjk_char(ch) or unicodedata.category(ch)[0] in "PSZ"


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _numbered(text: str) -> list[tuple[int, str | bytes]]:
    return [(n, line) for n, line in enumerate(_TEXT_LINE_BREAK.split(text), 1) if line.strip()]


def undecodable_line(raw: bytes) -> Problem:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Problem("malformed_row", f"byte {e.start} of the line is not UTF-8{_gbk_hint(raw)}")
    return Problem("malformed_row", "the line cannot be decoded")


def _parse_line(line: str, delimiter: str) -> list[str]:
    # strict: a stray quote is an error instead of a silently merged field
    return next(csv.reader([line], delimiter=delimiter, strict=True, skipinitialspace=True), [])


def _column_key(name: str) -> str:
    return name.strip().strip("\ufeff").lower()


def _index_of(columns: list[str], name: str) -> int:
    return [_column_key(c) for c in columns].index(_column_key(name))


def _as_dict(columns: list[str], values: list[str]) -> dict[str, str]:
    out = {col or f"col{i + 1}": v for i, (col, v) in enumerate(zip(columns, values, strict=False))}
    for i in range(len(columns), len(values)):
        out[f"col{i + 1}"] = values[i]
    return out


def _columns(head: list[str], name: str, id_column: str | None, text_column: str | None) -> CsvTable:
    """Which columns hold the id and the text, and whether the first line is a header."""
    keys = [_column_key(h) for h in head]

    def pick(flag: str | None, candidates: tuple[str, ...]) -> str | None:
        if flag is not None:
            return head[keys.index(_column_key(flag))] if _column_key(flag) in keys else None
        return next((head[keys.index(c)] for c in candidates if c in keys), None)

    id_col, text_col = pick(id_column, ID_COLUMNS), pick(text_column, TEXT_COLUMNS)
    if id_col is not None and text_col is not None:
        return CsvTable(id_col, text_col, header=True)
    given = [f for f in (id_column, text_column) if f is not None]
    if given:
        missing = [f"--{kind}-column {flag!r}" for kind, flag, col in
                   (("id", id_column, id_col), ("text", text_column, text_col)) if flag is not None and col is None]
        raise DatasetError(
            f"{name}: {' and '.join(missing) or 'the other column'} not found in the header {head}. "
            f"Name the columns exactly as in the first line of the CSV (case does not matter)."
        )
    if id_col is None and text_col is None and len(head) == 2:
        log.warning("%s: the first line %s names no known column; reading the file as headerless `id,text` "
                    "(the first line is data). Add a header such as `audio_id,text` to silence this.", name, head)
        return CsvTable("id", "text", header=False)
    raise DatasetError(
        f"{name}: cannot tell the id and text columns from the first line {head}. Expected a header with an id "
        f"column ({', '.join(ID_COLUMNS)}) and a text column ({', '.join(TEXT_COLUMNS)}), or pass "
        f"--id-column NAME and --text-column NAME."
    )


def _field_problem(row: Row) -> Problem | None:
    for what, value in (("id", row.id), ("text", row.text)):
        bad = next((ch for ch in value if unicodedata.category(ch) == "Cc" and ch != "\t"), None)
        if bad is not None:
            return Problem("malformed_row", f"the {what} contains the control character U+{ord(bad):04X}; "
                                            "the file is probably damaged or binary — fix or remove the line")
    if not row.audio_ref:
        return Problem("malformed_row", "the id is empty; every row needs the audio file's id")
    return None


def _gbk_hint(raw: bytes) -> str:
    try:
        raw.decode("gb18030")
    except UnicodeDecodeError:
        return "; save the file as UTF-8"
    return ("; it looks GBK/GB18030-encoded — convert the file with `iconv -f GB18030 -t UTF-8 in.csv > out.csv`, "
            "or pass --encoding gb18030 when the whole file is GB18030")


# ------------------------------------------------------------------------------------------------ ids


def relative_id(raw_id: str) -> str:
    """The id as a clean relative path: ``\\`` → ``/``, no ``./`` or empty parts."""
    return "/".join(p for p in raw_id.replace("\\", "/").split("/") if p not in ("", "."))


def utterance_id(raw_id: str) -> str:
    """The record id: the relative id without a known audio extension (``utt1.WAV`` → ``utt1``)."""
    rel = relative_id(raw_id)
    lower = rel.lower()
    for ext in AUDIO_EXTENSIONS:
        if lower.endswith(ext) and len(rel) > len(ext):
            return rel[: -len(ext)]
    return rel


def check_id_path(raw_id: str, roots: tuple[Path, ...] = ()) -> Problem | None:
    """path_escape for audio paths that are URLs, climb out with ``..``, or are absolute outside every allowed
    root (``roots``: the audio folder and each --audio-root); checked before any file access."""
    if _URI_SCHEME.match(raw_id):
        why = "is a URL"
    elif raw_id.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(raw_id):
        if raw_id.startswith("/") and root_of(raw_id, roots) is not None:
            return None
        if roots and raw_id.startswith("/"):
            shown = ", ".join(str(r) for r in roots)
            return Problem("path_escape", f"the audio path {raw_id!r} is outside the audio folder and the allowed "
                                          f"roots ({shown}); pass --audio-root with the folder that holds it, "
                                          "or give paths relative to --audio-dir")
        why = "is an absolute path"
    elif ".." in raw_id.replace("\\", "/").split("/"):
        why = "contains '..'"
    else:
        return None
    return Problem("path_escape", f"the id {raw_id!r} {why}; ids must be file names (or relative paths) inside "
                                  "the audio folder — give --audio-dir the folder and the id relative to it")


def root_of(path: str, roots: tuple[Path, ...]) -> tuple[Path, str] | None:
    """(root, path relative to it) for an absolute path lexically inside one of ``roots`` (no ``..``), else None."""
    if ".." in path.split("/"):
        return None
    p = Path(os.path.normpath(path))
    for root in roots:
        for base in dict.fromkeys((root, root.resolve())):
            if p.is_relative_to(base) and p != base:
                return root, p.relative_to(base).as_posix()
    return None


def candidate_paths(raw_id: str) -> list[str]:
    """Relative paths to try for an id: as given, then the stem with each audio extension (lower, upper)."""
    rel, stem = relative_id(raw_id), utterance_id(raw_id)
    out = [rel]
    for ext in AUDIO_EXTENSIONS:
        out += [stem + ext, stem + ext.upper()]
    return list(dict.fromkeys(out))


def safe_file_name(utt_id: str) -> str:
    """A file name for an utterance id, unique per id: the id itself when it is already safe, else a
    sanitized form plus a short hash of the id (``spk1/utt 1`` → ``spk1__utt_1-3f2a9c01d4``)."""
    name = _UNSAFE_NAME_CHARS.sub("_", utt_id.replace("/", "__"))
    if name == utt_id and len(name) <= MAX_NAME_CHARS and not name.startswith("."):
        return name
    digest = hashlib.sha256(utt_id.encode("utf-8")).hexdigest()[:10]
    return f"{name[:MAX_NAME_CHARS].lstrip('.') or 'utt'}-{digest}"


# ------------------------------------------------------------------------------------------------ text


def check_text(text: str) -> Problem | None:
    if all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in text):
        return Problem("empty_text", "the transcript is empty; write what is said in the clip, or remove the row")
    if is_punctuation_only(text):
        return Problem("punctuation_only_text",
                       f"the transcript {text[:40]!r} has only punctuation/symbols; write the spoken words")
    return None


def spoken_length(text: str) -> int:
    """Tokens a speaker has to say: CJK characters one by one, Latin words and numbers as one each."""
    return len(normalize_words(text))


def check_text_rate(text: str, seconds: float, max_per_second: float = MAX_CHARS_PER_SECOND) -> Problem | None:
    n = spoken_length(text)
    limit = TEXT_ALLOWANCE + max_per_second * seconds
    if n <= limit:
        return None
    return Problem(
        "text_too_long_for_duration",
        f"{n} characters/words in {seconds:.2f} s of audio ({n / max(seconds, 1e-9):.1f}/s; at most "
        f"{TEXT_ALLOWANCE} + {max_per_second:g}/s = {limit:.0f} can be spoken); the transcript probably belongs "
        "to another clip or the audio is cut short — check the pair (--max-chars-per-second to change the bound)",
    )


# ------------------------------------------------------------------------------------------------ audio dirs


@dataclass(frozen=True)
class AudioFile:
    rel: str  # path inside the audio folder
    uri: str  # local path or s3:// URI (shown to users, kept in records as "source")
    size: int
    version: str  # mtime_ns locally, ETag on S3 — for the inputs fingerprint


class LocalAudioDir:
    """An audio folder on the local file system (or a PVC mount). Absolute audio paths are allowed inside the
    folder and inside each of ``extra_roots`` (--audio-root)."""

    def __init__(self, path: str | Path, extra_roots: tuple[str | Path, ...] = ()):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise DatasetError(f"audio folder {self.path} does not exist or is not a folder; "
                               "pass the folder holding the CSV's audio files")
        self.root = self.path.resolve()
        self.uri = str(self.path)
        roots = [self.path.absolute()]
        for extra in extra_roots:
            r = Path(extra).expanduser()
            if not r.is_dir():
                raise DatasetError(f"--audio-root {r} does not exist or is not a folder; pass a folder that "
                                   "holds audio files named by absolute paths")
            roots.append(r.absolute())
        self.roots = tuple(roots)

    def relative(self, raw_id: str) -> str:
        """The path an id names, relative to the root holding it (for record ids): ``utt1.wav`` stays,
        ``/data/a/utt1.wav`` with root ``/data`` → ``a/utt1.wav``."""
        found = root_of(raw_id, self.roots) if raw_id.startswith("/") else None
        return found[1] if found else relative_id(raw_id)

    def find(self, raw_id: str) -> AudioFile | Problem:
        if raw_id.startswith("/"):
            found = root_of(raw_id, self.roots)
            if found is None:
                return check_id_path(raw_id, self.roots) or _missing(raw_id, self.uri, [raw_id])
            base, rel = found
        else:
            base, rel = self.path, raw_id
        tried = candidate_paths(rel)
        for rel in tried:
            p = base / rel
            try:
                if not p.is_file():
                    continue
                real = p.resolve()
                st = p.stat()
            except OSError as e:  # a name too long for the file system, a link loop, ...
                return Problem("missing_file", f"cannot look up {p}: {e.strerror}; check the id")
            if not any(real.is_relative_to(r.resolve()) for r in self.roots):
                return Problem("path_escape", f"{p} is a link to {real}, outside the audio folder "
                                              f"{self.root}; copy the file into the folder")
            return AudioFile(str(p.relative_to(self.path)) if base == self.path else str(p), str(p), st.st_size,
                             str(st.st_mtime_ns))
        return _missing(raw_id, self.uri, tried)

    def fetch(self, f: AudioFile) -> Path:
        return self.path / f.rel


class S3AudioDir:
    """An audio folder at ``s3://bucket/prefix``; listed once, then looked up in memory."""

    def __init__(self, uri: str, s3: S3Settings | None):
        from common.core.store import S3Store

        self.store = S3Store(uri, s3)
        self.uri = self.store.uri
        self._objects: dict[str, tuple[int, str]] | None = None

    def _listing(self) -> dict[str, tuple[int, str]]:
        if self._objects is None:
            from botocore.exceptions import BotoCoreError, ClientError

            prefix = self.store.prefix + "/" if self.store.prefix else ""
            objects: dict[str, tuple[int, str]] = {}
            try:
                for page in self.store.client.get_paginator("list_objects_v2").paginate(
                        Bucket=self.store.bucket, Prefix=prefix):
                    for obj in page.get("Contents", []):
                        objects[obj["Key"][len(prefix):]] = (obj["Size"], obj["ETag"].strip('"'))
            except (ClientError, BotoCoreError) as e:
                raise DatasetError(f"cannot list {self.uri}: {e}. Check the bucket name, the credentials and "
                                   "--s3-endpoint-url (ASRFT_S3__ENDPOINT_URL).") from None
            if not objects:
                log.warning("%s holds no objects; every row will be missing_file", self.uri)
            self._objects = objects
        return self._objects

    roots: tuple[Path, ...] = ()  # absolute paths are never inside an S3 folder

    def relative(self, raw_id: str) -> str:
        return relative_id(raw_id)

    def find(self, raw_id: str) -> AudioFile | Problem:
        listing = self._listing()
        tried = candidate_paths(raw_id)
        for rel in tried:
            if rel in listing:
                size, etag = listing[rel]
                return AudioFile(rel, self.store.uri_for(rel), size, etag)
        return _missing(raw_id, self.uri, tried)

    def fetch(self, f: AudioFile) -> bytes:
        return self.store.read_bytes(f.rel)


def _missing(raw_id: str, where: str, tried: list[str]) -> Problem:
    shown = ", ".join(tried[:4]) + (", …" if len(tried) > 4 else "")
    return Problem("missing_file", f"no audio file for id {raw_id!r} in {where} (tried {shown}); "
                                   "check the id and the audio folder (--audio-dir / --test-audio-dir)")


def open_audio_dir(uri: str, s3: S3Settings | None = None,
                   extra_roots: tuple[str, ...] = ()) -> LocalAudioDir | S3AudioDir:
    if uri.startswith("s3://"):
        return S3AudioDir(uri, s3)
    return LocalAudioDir(uri.removeprefix("file://"), extra_roots)


def read_input_bytes(uri: str, s3: S3Settings | None = None, what: str = "file") -> bytes:
    """Bytes of a local file or an ``s3://`` object; DatasetError saying what was expected when absent."""
    if uri.startswith("s3://"):
        from common.core.store import S3Store, StoreError, split_uri

        bucket, key = split_uri(uri)
        try:
            return S3Store(bucket, s3).read_bytes(key)
        except StoreError as e:
            raise DatasetError(f"cannot read the {what} {uri}: {e}") from None
    path = Path(uri.removeprefix("file://")).expanduser()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"the {what} {path} does not exist; pass the path of your CSV") from None
    except IsADirectoryError:
        raise DatasetError(f"the {what} {path} is a folder; pass the CSV file inside it") from None
    except OSError as e:
        raise DatasetError(f"cannot read the {what} {path}: {e.strerror}") from None
