"""The evaluate stage: transcribe test sets with each model under one set of decoding settings, then score.

    plan = plan_evaluation(settings, store)   # which models and sets (no model is loaded, no audio read)
    summary = evaluate(ctx, plan)             # transcribe, score, write the outputs

Models: ``--model NAME=REF`` (repeatable; REF is anything ``asr-ft pretrained`` accepts, or an export
folder in Hugging Face or CTranslate2 format). Without it, inside a pipeline run: ``pretrained`` =
``<run>/pretrained/model`` and ``finetuned`` = ``<run>/export/ct2`` (each when that stage has completed).
The first model is the baseline the report compares the others with.

Sets: ``--test-jsonl F`` (records, e.g. prepare's test.jsonl) or ``--test-csv F --test-audio-dir D`` named
``--set-name``; several sets with ``--sets`` or ``sets`` in YAML, scored in the order given::

    evaluate:
      sets:
        - {name: test, jsonl: "run:prepare/test.jsonl"}                   # a file of this run
        - {name: answers, csv: data/answers.csv, audio_dir: data/test_audio}
        - {name: real-zh-dev, dir: "${ASRFT_REAL_ZH_DEV}", optional: true}  # a folder: transcripts.csv + audio/

Exactly the sets given are scored; without any, the run's ``prepare/test.jsonl`` as ``test``. A ``dir`` set is
a folder holding ``transcripts.csv`` (audio id + text) and ``audio/``. Paths may name environment variables
as ``${VAR}``. A set whose variable is unset or whose files are missing stops the stage before any model is
loaded, unless it is ``optional``: then it is skipped with a warning that says what to set. CSV rows go
through prepare's checks (``common.core.convert``); bad rows are reported in ``rejected.jsonl`` and the report,
and never stop the stage. A recording longer than 30 s (up to 4 h) is split at pauses into segments of at
most 30 s (Silero VAD, as ``asr-ft transcribe`` does) and scored as one utterance; its row in
``predictions.jsonl`` gives the number of ``segments``.

Outputs in ``<artifacts>/<run-id>/evaluate/``: ``predictions.jsonl`` (one line per model × utterance:
id, reference, hypothesis, model, set, duration, decode_seconds, normalized texts, CER), ``metrics.json``
(``{model: {set: {cer, wer, exact, similarity, n, audio_seconds, rtf, …}}}``), ``report.md``,
``report.html``, ``run_info.json`` (decoding settings, engines, throughput, model sources) and
``rejected.jsonl``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict
from tqdm import tqdm

from common.core.convert import ClipLimits, Converted, convert, scan_csvs
from common.core.dataset import DatasetError
from common.core.models import (
    ModelRef,
    ModelRefError,
    fetch_model,
    listing_fingerprint,
    parse_model_ref,
    ref_fingerprint,
)
from common.core.records import audio_location, iter_jsonl, transcript
from common.core.settings import StageSettings
from common.core.stage import StageContext, StageFailed, stage_dir, upstream_fingerprint
from common.core.store import Store, atomic_write_bytes, sha256_file
from common.core.text import TEXT_NORM_EXAMPLES, TEXT_NORM_HELP, TextNormSpec
from common.core.transcribe import Utterance, transcribe_utterances
from common.families import (
    DEFAULT_FAMILY,
    EngineRequest,
    FamilyError,
    ModelFamily,
    family_of_pretrained,
    get_family,
)

log = logging.getLogger(__name__)

STAGE = "evaluate"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
RUN_FILE_PREFIX = "run:"  # "run:prepare/test.jsonl" = a file of another stage of this run
DIR_PREFIX = "dir:"  # "NAME=dir:FOLDER", the flag form of a `dir` set
DIR_CSV, DIR_AUDIO = "transcripts.csv", "audio"  # a `dir` set's folder: FOLDER/transcripts.csv + FOLDER/audio/
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")  # ${VAR} in a set's path
BATCH_SIZE = {"cpu": 8, "cuda": 32}  # CPU: no gain beyond ~8 on a few cores; GPU: 32 clips of 30 s in bf16 fit easily
MAX_RECORDING_SECONDS = 4 * 3600.0  # a test recording may be long: over 30 s it is decoded segment by segment
COMPUTE_TYPES = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32")


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


class SetSpec(BaseModel):
    """One test set: records JSONL, a transcript CSV + audio folder, or a folder holding both (``dir``); CSV rows
    are checked like prepare's input. Paths may name environment variables as ``${VAR}``."""

    model_config = {"extra": "forbid"}

    name: str = Field(..., pattern=NAME_PATTERN, description="set name in metrics and reports")
    jsonl: str | None = Field(None, description="records JSONL; run:prepare/test.jsonl = a file of this run")
    csv: str | None = Field(None, description="transcript manifest: CSV/TSV, NeMo/FunASR JSON lines, a Kaldi data "
                                              "folder or a Hugging Face audiofolder (format detected)")
    audio_dir: str | None = Field(None, description="folder with the manifest's audio files [default: the "
                                                    "manifest's folder]")
    dir: str | None = Field(None, description=f"folder holding {DIR_CSV} (audio id + text) and {DIR_AUDIO}/")
    optional: bool = Field(False, description="skip the set with a warning when its files or variables are missing")
    include_ids: str | None = Field(None, description="keep only the utterances whose id matches this regular "
                                    "expression (re.search), e.g. a documented split of a dev set")
    exclude_ids: str | None = Field(None, description="drop the utterances whose id matches this regular expression")
    development: bool = Field(False, description="this set chose something (a recipe, merge factors, a checkpoint): "
                                                 "the report labels its numbers development numbers, not proof")

    @field_validator("include_ids", "exclude_ids")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"{value!r} is not a regular expression ({e})") from None
        return value

    def selects(self, utterance_id: str) -> bool:
        """Whether include_ids / exclude_ids keep this utterance."""
        return ((self.include_ids is None or re.search(self.include_ids, utterance_id) is not None)
                and (self.exclude_ids is None or re.search(self.exclude_ids, utterance_id) is None))

    @model_validator(mode="after")
    def _one_source(self) -> SetSpec:
        if sum(map(bool, (self.jsonl, self.csv, self.dir))) != 1:
            raise ValueError(f"set {self.name!r}: give exactly one of jsonl (records), csv + audio_dir, or dir "
                             f"(a folder holding {DIR_CSV} and {DIR_AUDIO}/)")
        if self.audio_dir and not self.csv:
            raise ValueError(f"set {self.name!r}: audio_dir is given without csv")
        return self

    @classmethod
    def parse(cls, text: str) -> dict[str, Any]:
        """``NAME=FILE.jsonl``, ``NAME=FILE.csv,AUDIO_DIR`` or ``NAME=dir:FOLDER`` (the flag/env form of one set)."""
        name, sep, source = text.partition("=")
        if not sep or not source:
            raise ValueError(f"set {text!r}: expected NAME=FILE.jsonl, NAME=FILE.csv,AUDIO_DIR or NAME=dir:FOLDER")
        if source.startswith(DIR_PREFIX):
            return {"name": name.strip(), "dir": source[len(DIR_PREFIX):].strip()}
        if "," in source:
            csv_path, audio_dir = source.split(",", 1)
            return {"name": name.strip(), "csv": csv_path.strip(), "audio_dir": audio_dir.strip()}
        return {"name": name.strip(), "jsonl": source.strip()}


def parse_model_arg(text: str) -> tuple[str, ModelRef]:
    """``NAME=REF`` → (name, parsed ref); ValueError with the accepted forms otherwise."""
    name, sep, ref = text.partition("=")
    name = name.strip()
    if not sep or not re.match(NAME_PATTERN, name):
        raise ValueError(f"--model {text!r}: expected NAME=REF with NAME made of letters, digits, '.', '_' or '-' "
                         f"(e.g. pretrained=runs/demo/pretrained/model or finetuned=runs/demo/export/ct2)")
    try:
        return name, parse_model_ref(ref)
    except ModelRefError as e:
        raise ValueError(f"--model {text!r}: {e}") from None


class EvaluateSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_EVALUATE_")

    model: list[str] = Field(
        default_factory=list,
        description="NAME=REF of a model to evaluate (REF: bundled:, hf://, s3://, a folder, an export folder); "
                    "default in a run: pretrained=<run>/pretrained/model, finetuned=<run>/export/ct2",
        examples=["pretrained=bundled:whisper-base", "finetuned=runs/demo/export/ct2"],
    )
    test_jsonl: str | None = Field(None, description="test records JSONL (e.g. a prepare test.jsonl)",
                                   examples=["runs/demo/prepare/test.jsonl"])
    test_csv: str | None = Field(None, description="test transcript CSV (checked like prepare's)",
                                 examples=["data/answers.csv"])
    test_audio_dir: str | None = Field(None, description="folder with --test-csv's audio", examples=["data/test_audio"])
    set_name: str = Field("test", pattern=NAME_PATTERN, description="name of the --test-jsonl/--test-csv set")
    sets: list[SetSpec] = Field(
        default_factory=list,
        description=f"several test sets, scored in this order: NAME=FILE.jsonl, NAME=FILE.csv,AUDIO_DIR or "
                    f"NAME=dir:FOLDER (a folder holding {DIR_CSV} and {DIR_AUDIO}/); paths may name environment "
                    "variables as ${VAR} (YAML: list of {name, jsonl | csv + audio_dir | dir, optional})",
        examples=["dev=data/dev.jsonl", "real=data/real.csv,data/real_audio", "real=dir:${MY_DEV_SET}"],
    )
    family: str | None = Field(None, description=f"model family of the models [default: the run's, else "
                               f"{DEFAULT_FAMILY}]", examples=["whisper"])
    backend: str = Field(
        "auto", description="the family's decoder; whisper: ct2 = CTranslate2 (CPU default), hf = transformers "
                            "generate (GPU default; bf16)", examples=["auto", "ct2", "hf"])
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    compute_type: Literal[COMPUTE_TYPES] = Field(  # type: ignore[valid-type]
        "float32", description="CTranslate2 compute type, the same for every model. float32 reproduces the "
                               "transformers output token for token (int8 measured no faster on an AVX2 CPU)")
    beam_size: int = Field(1, ge=1, le=16, description="1 = greedy decoding")
    max_new_tokens: int | None = Field(None, ge=1, description="most tokens decoded per utterance [default: "
                                       "the family's; whisper: 224]")
    batch_size: int = Field(0, ge=0, description="utterances per batch (0 = 8 on CPU, 32 on GPU)")
    threads: int = Field(0, ge=0, description="CPU threads for CTranslate2 (0 = every core this process may use)")
    title: str = Field("ASR evaluation · 语音识别评估", description="report title")
    text_norm: TextNormSpec = Field("default", description=TEXT_NORM_HELP, examples=TEXT_NORM_EXAMPLES)

    @field_validator("model")
    @classmethod
    def _models(cls, values: list[str]) -> list[str]:
        names = [parse_model_arg(v)[0] for v in values]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model name(s) {dupes} used twice; give each --model a different NAME")
        return values

    @field_validator("sets", mode="before")
    @classmethod
    def _set_strings(cls, values: Any) -> Any:
        if isinstance(values, str):
            values = [values]
        return [SetSpec.parse(v) if isinstance(v, str) else v for v in values or []]

    @model_validator(mode="after")
    def _check(self) -> EvaluateSettings:
        problems = []
        if self.test_jsonl and self.test_csv:
            problems.append("--test-jsonl and --test-csv are both given; use one (or list several sets in `sets`)")
        if self.test_audio_dir and not self.test_csv:
            problems.append("--test-audio-dir is given without --test-csv")
        names = [s.name for s in self.sets] + ([self.set_name] if self.test_jsonl or self.test_csv else [])
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"set name(s) {dupes} used twice; give each set a different name (--set-name)")
        if problems:
            raise ValueError("\n  - ".join(problems))
        return self

    def set_specs(self) -> list[SetSpec]:
        specs = list(self.sets)
        if self.test_jsonl:
            specs.append(SetSpec(name=self.set_name, jsonl=self.test_jsonl))
        elif self.test_csv:
            specs.append(SetSpec(name=self.set_name, csv=self.test_csv, audio_dir=self.test_audio_dir))
        return specs


# ---------------------------------------------------------------------------------------------
# Plan: which models and sets (cheap; decides the fingerprint)
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelEntry:
    name: str
    ref: ModelRef
    fingerprint: Any


@dataclass
class SetEntry:
    spec: SetSpec
    path: Path  # the JSONL or CSV
    audio_dir: Path | None  # the manifest's audio folder (None: the manifest's own folder)
    fingerprint: Any
    manifest: bool = False  # read through common.core.manifest (CSV, NeMo, Kaldi, …), not as prepare records


@dataclass
class Plan:
    models: list[ModelEntry] = field(default_factory=list)
    sets: list[SetEntry] = field(default_factory=list)
    skipped_sets: list[dict[str, str]] = field(default_factory=list)  # optional sets not found: {set, reason}

    @property
    def inputs(self) -> dict[str, Any]:
        return {"models": {m.name: {"ref": m.ref.raw, "fingerprint": m.fingerprint} for m in self.models},
                "sets": {s.spec.name: s.fingerprint for s in self.sets}}


def _run_stage_folder(store: Store, run_id: str, stage: str) -> tuple[Path, str] | None:
    """(local folder, fingerprint) of a completed stage of this run, else None."""
    try:
        return stage_dir(store, run_id, stage), upstream_fingerprint(store, run_id, stage)
    except StageFailed:
        return None


def _default_models(store: Store, run_id: str) -> list[ModelEntry]:
    models = []
    for name, stage, sub in (("pretrained", "pretrained", "model"), ("finetuned", "export", "")):
        found = _run_stage_folder(store, run_id, stage)
        if found is None:
            log.info("evaluate: no completed '%s' stage in run '%s'; model '%s' not evaluated", stage, run_id, name)
            continue
        folder, fingerprint = found
        path = folder / sub if sub else folder  # export: the family picks the folder its engine loads
        models.append(ModelEntry(name, parse_model_ref(str(path)), {"stage": stage, "fingerprint": fingerprint}))
    if not models:
        raise StageFailed(f"no model to evaluate: run '{run_id}' has no completed pretrained/export stage. Pass "
                          f"--model NAME=REF (e.g. --model pretrained=bundled:whisper-base), or run "
                          f"`asr-ft pretrained` first.", exit_code=2)
    return models


def _model_fingerprint(ref: ModelRef) -> Any:
    if ref.kind == "path" and not Path(ref.location).expanduser().is_dir():
        raise StageFailed(f"--model {ref.raw}: no such folder. Expected a model folder of the family (whisper: "
                          f"Hugging Face or CTranslate2 format, or an export folder), bundled:NAME, hf://org/name "
                          f"or s3://bucket/prefix.", exit_code=2)
    return ref_fingerprint(ref)


def _file_fingerprint(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


class SetUnavailable(Exception):
    """A set's files or variables cannot be found; the message says what was expected."""


SOURCE_WHAT = {  # what each path of a set must point to, for messages
    "jsonl": "a records JSONL file (e.g. a prepare test.jsonl)",
    "csv": "a transcript CSV (audio id + text)",
    "audio_dir": "the folder holding the CSV's audio files",
    "dir": f"a folder holding {DIR_CSV} (audio id + text) and {DIR_AUDIO}/ (its audio files)",
}


def expand_env(text: str, what: str) -> str:
    """``text`` with each ``${VAR}`` replaced by that environment variable; SetUnavailable saying which variable
    to set, and to what, when one is unset or empty."""
    def value(m: re.Match) -> str:
        if not os.environ.get(m.group(1)):
            raise SetUnavailable(f"${m.group(1)} is not set; set {m.group(1)} to {what}")
        return os.environ[m.group(1)]

    return ENV_REFERENCE.sub(value, text)


def _set_entry(spec: SetSpec, store: Store, run_id: str) -> SetEntry:
    """Resolve a set's files and fingerprint them; SetUnavailable when a variable is unset or a file missing."""
    source = "jsonl" if spec.jsonl else "csv" if spec.csv else "dir"
    raw = {source: getattr(spec, source), **({"audio_dir": spec.audio_dir} if spec.audio_dir else {})}
    text = {key: expand_env(value, SOURCE_WHAT[key]) for key, value in raw.items()}
    if source == "jsonl" and text["jsonl"].startswith(RUN_FILE_PREFIX):
        rel = Path(text["jsonl"][len(RUN_FILE_PREFIX):])
        stage = rel.parts[0] if rel.parts else ""
        found = _run_stage_folder(store, run_id, stage)
        if found is None:
            raise SetUnavailable(f"{raw['jsonl']} needs the '{stage}' stage of run '{run_id}', which has not "
                                 f"completed; run `asr-ft {stage}` first or give a file path")
        path = found[0] / Path(*rel.parts[1:])
        return SetEntry(spec, path, None, {"stage": stage, "fingerprint": found[1], "file": str(rel)})
    if source == "dir":
        folder = Path(text["dir"]).expanduser()
        path, audio_dir = folder / DIR_CSV, folder / DIR_AUDIO
        missing = [p for p in (path, audio_dir) if not p.exists()] if folder.is_dir() else [folder]
        expected = f"{folder} must be {SOURCE_WHAT['dir']}"
    else:
        path = Path(text[source]).expanduser()
        audio_dir = Path(text["audio_dir"]).expanduser() if "audio_dir" in text else None
        missing = [p for p in (path, audio_dir) if p is not None and not p.exists()]
        expected = "check the path"
    if missing:
        via = [value for key, value in raw.items() if text[key] != value]
        where = f" (from {', '.join(via)})" if via else ""
        if any(not p.is_absolute() for p in missing):
            expected += f" (relative paths are relative to {Path.cwd()})"
        raise SetUnavailable(f"{', '.join(map(str, missing))} not found{where}; {expected}")
    manifest = source != "jsonl" or not _is_records_file(path)
    fingerprint: dict[str, Any] = {"file": _file_fingerprint(path) if path.is_file() else listing_fingerprint(path)}
    if manifest:
        fingerprint["audio"] = listing_fingerprint(audio_dir if audio_dir is not None else
                                                   path if path.is_dir() else path.parent)
    return SetEntry(spec, path, audio_dir, fingerprint, manifest)


def _is_records_file(path: Path) -> bool:
    """Whether a JSON-lines file holds prepare's records (else it is read as a NeMo/FunASR manifest)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = next((line for line in f if line.strip()), "")
        return "conversation" in json.loads(first)
    except (OSError, ValueError, TypeError):
        return True  # the record reader says what is wrong with it


def plan_evaluation(settings: EvaluateSettings, store: Store) -> Plan:
    """Models and sets to evaluate, with their fingerprints. Loads no model and reads no audio: a required set
    that cannot be found stops the stage here; an optional one is skipped with a warning."""
    plan = Plan()
    if settings.model:
        for text in settings.model:
            name, ref = parse_model_arg(text)
            plan.models.append(ModelEntry(name, ref, _model_fingerprint(ref)))
    else:
        plan.models = _default_models(store, settings.run_id)
    specs = settings.set_specs()
    if not specs:
        specs = [SetSpec(name="test", jsonl=RUN_FILE_PREFIX + "prepare/test.jsonl", optional=True)]
    for spec in specs:
        try:
            plan.sets.append(_set_entry(spec, store, settings.run_id))
        except SetUnavailable as e:
            if not spec.optional:
                raise StageFailed(f"set {spec.name!r}: {e}", exit_code=2) from None
            log.warning("evaluate: optional set %r skipped: %s", spec.name, e)
            plan.skipped_sets.append({"set": spec.name, "reason": str(e)})
    if not plan.sets:
        raise StageFailed("no test set to evaluate on: pass --test-jsonl FILE, or --test-csv FILE --test-audio-dir "
                          "DIR, or run `asr-ft prepare` with a test split first", exit_code=2)
    return plan


# ---------------------------------------------------------------------------------------------
# Loading the sets
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadedSet:
    name: str
    utterances: list[Utterance]
    rejected: list[dict[str, Any]]


def _jsonl_set(entry: SetEntry) -> LoadedSet:
    """Records JSONL → utterances; ``audio_path`` is relative to the run folder (the JSONL's grandparent when it
    sits in <run>/<stage>/), else the audio message's URI/path is used."""
    run_dir = entry.path.parent.parent
    utterances, rejected = [], []
    for n, rec in enumerate(iter_jsonl(entry.path), 1):
        if not entry.spec.selects(str(rec.get("id"))):
            continue
        bad = {"set": entry.spec.name, "file": str(entry.path), "line": n, "id": rec.get("id")}
        try:
            where = audio_location(rec, run_dir)
            if not Path(where).is_file():
                where = audio_location(rec, None)
            utterance = Utterance(str(rec["id"]), transcript(rec), where, rec.get("duration"))
        except (KeyError, ValueError) as e:
            rejected.append({**bad, "reason": "malformed_record",
                             "message": f"{e}; each line must be a record of prepare's format"})
            continue
        if not Path(where).is_file():
            rejected.append({**bad, "reason": "missing_file",
                             "message": f"no audio file at {where} (audio_path is relative to the run folder "
                                        f"{run_dir}); fix the record or restore the file"})
            continue
        utterances.append(utterance)
    return LoadedSet(entry.spec.name, utterances, rejected)


def _csv_set(entry: SetEntry, work: Path, s3) -> LoadedSet:
    """CSV + audio folder → utterances, through prepare's checks and conversion with prepare's default limits
    except the length: recordings up to MAX_RECORDING_SECONDS (``common.core.convert``; 16 kHz mono wav in
    ``work``)."""
    try:
        scan = scan_csvs([("test", str(entry.path), str(entry.audio_dir) if entry.audio_dir else None)], s3)
    except DatasetError as e:
        raise StageFailed(f"set {entry.spec.name!r}: {e}", exit_code=2) from None
    scan.jobs = [job for job in scan.jobs if entry.spec.selects(str(job.utt_id))]
    limits = ClipLimits(max_seconds=MAX_RECORDING_SECONDS)  # longer than 30 s: decoded as VAD segments
    out_audio = work / entry.spec.name
    out_audio.mkdir(parents=True, exist_ok=True)
    rejected = [{"set": entry.spec.name, **r.to_json()} for r in scan.rejected]
    utterances = []
    for i, job in enumerate(tqdm(scan.jobs, desc=f"evaluate: checking {entry.spec.name}", unit="clip",
                                 mininterval=1.0)):
        result = convert(job, out_audio, f"{i:06d}.wav", limits)
        if isinstance(result, Converted):
            utterances.append(Utterance(job.utt_id, job.row.text, str(out_audio / result.name), round(result.seconds, 4)))
        else:
            rejected.append({"set": entry.spec.name, "split": job.row.split, "csv": job.row.csv,
                             "line": job.row.line, "row": job.row.fields, "reason": result.reason,
                             "message": result.message})
    for r in rejected:
        r.pop("split", None)
    return LoadedSet(entry.spec.name, utterances, rejected)


def load_sets(plan: Plan, work: Path, s3) -> list[LoadedSet]:
    loaded = []
    for entry in plan.sets:
        data = _csv_set(entry, work, s3) if entry.manifest else _jsonl_set(entry)
        if data.rejected and not data.utterances:
            for r in data.rejected[:10]:
                log.error("evaluate: set %r line %s: %s: %s", data.name, r.get("line"), r["reason"], r["message"])
        elif data.rejected:
            log.warning("evaluate: set %r: %d bad row(s) skipped (see rejected.jsonl): %s", data.name,
                        len(data.rejected), "; ".join(f"line {r.get('line')}: {r['reason']}" for r in data.rejected[:5]))
        if not data.utterances:
            raise StageFailed(f"set {data.name!r} ({entry.path}) has no usable utterance; "
                              f"{len(data.rejected)} row(s) rejected ("
                              + ", ".join(sorted({r['reason'] for r in data.rejected})) + "; each row's reason is "
                              "in the log above)", exit_code=2)
        log.info("evaluate: set %r: %d utterances, %.1f s of audio", data.name, len(data.utterances),
                 sum(u.duration or 0 for u in data.utterances))
        loaded.append(data)
    return loaded


# ---------------------------------------------------------------------------------------------
# Models → engines
# ---------------------------------------------------------------------------------------------


def resolve_device(settings: EvaluateSettings) -> str:
    if settings.device != "auto":
        return settings.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluation_family(settings: EvaluateSettings, store: Store) -> ModelFamily:
    """--family, else the family the run's pretrained stage recorded, else the default."""
    try:
        if settings.family:
            return get_family(settings.family)
        found = _run_stage_folder(store, settings.run_id, "pretrained")
        return family_of_pretrained(found[0]) if found else get_family(DEFAULT_FAMILY)
    except FamilyError as e:
        raise StageFailed(str(e), exit_code=2) from None


def engine_request(settings: EvaluateSettings, device: str) -> EngineRequest:
    return EngineRequest(backend=settings.backend, device=device, compute_type=settings.compute_type,
                         threads=settings.threads, beam_size=settings.beam_size,
                         max_new_tokens=settings.max_new_tokens)


def _throughput(name: str, set_name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = sum(r["decode_seconds"] for r in rows)
    audio = sum(r["duration"] or 0.0 for r in rows)
    return {"model": name, "set": set_name, "utterances": len(rows), "audio_seconds": round(audio, 2),
            "decode_seconds": round(seconds, 2), "rtf": round(seconds / audio, 4) if audio else None,
            "samples_per_second": round(len(rows) / seconds, 3) if seconds else None,
            "audio_seconds_per_second": round(audio / seconds, 2) if seconds else None}


def transcribe_all(plan: Plan, sets: list[LoadedSet], settings: EvaluateSettings, family: ModelFamily
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every model over every set with the same decoding settings → (prediction rows, run info)."""
    device = resolve_device(settings)
    request = engine_request(settings, device)
    batch_size = settings.batch_size or BATCH_SIZE[device]
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {"family": family.name, "device": device, "batch_size": batch_size, "models": {},
                            "throughput": [], "unreadable": []}
    total = sum(len(s.utterances) for s in sets) * len(plan.models)
    with tqdm(total=total, desc="evaluate: transcribing", unit="utt", mininterval=1.0) as bar:
        for model in plan.models:
            folder, facts = fetch_model(model.ref, settings.s3)
            t0 = time.perf_counter()
            try:
                engine, used = family.open_engine(folder, request)
            except FamilyError as e:
                raise StageFailed(f"model {model.name!r} ({model.ref.raw}): {e}", exit_code=2) from None
            used = {"ref": model.ref.raw, "resolved_source": facts.get("resolved_source"), **used,
                    "load_seconds": round(time.perf_counter() - t0, 3), "engine": engine.info}
            log.info("evaluate: model %r: %s → %s", model.name, model.ref.raw, used["folder"])
            info["models"][model.name] = used
            info.setdefault("decoding", engine.info.get("decoding") or {})
            info.setdefault("backend", used.get("backend") or engine.info.get("backend"))
            for data in sets:
                bar.set_postfix_str(f"{model.name} / {data.name}")
                got = transcribe_utterances(engine, data.utterances, batch_size=batch_size, progress=bar.update)
                ok = [r for r in got if "error" not in r]
                info["unreadable"] += [{"model": model.name, "set": data.name, **r} for r in got if "error" in r]
                rows += [{**r, "model": model.name, "set": data.name} for r in ok]
                info["throughput"].append(_throughput(model.name, data.name, ok))
            del engine
            gc.collect()
    if info.get("backend") == "ct2":
        info["compute_type"] = settings.compute_type
    _check_same_settings(info)
    return rows, info


def _check_same_settings(info: dict[str, Any]) -> None:
    """Every engine must have used the same comparable settings (whisper: prompt tokens and mel bins); different
    ones would make the comparison measure the settings rather than the models."""
    seen = {name: m["engine"].get("comparable") for name, m in info["models"].items()}
    if len(set(map(repr, seen.values()))) > 1:
        raise StageFailed(f"the models disagree on {seen}; they are not the same kind of model (e.g. Whisper "
                          f"large-v3 with 128 mel bins vs base with 80). Evaluate them in separate runs.")


PREDICTION_KEYS = ("id", "reference", "hypothesis", "model", "set", "duration", "decode_seconds", "segments",
                   "ref_norm", "hyp_norm", "cer", "char_errors", "ref_chars")


def evaluate(ctx: StageContext, plan: Plan) -> dict[str, Any]:
    from common.core.metrics import metrics_by_model_set, score_rows
    from common.core.records import write_jsonl
    from common.core.report import write_report

    settings: EvaluateSettings = ctx.settings
    with tempfile.TemporaryDirectory(prefix="asrft-evaluate-") as work:
        sets = load_sets(plan, Path(work), settings.s3)
        rows, info = transcribe_all(plan, sets, settings, evaluation_family(settings, ctx.store))
    from common.core.text import TextPolicy
    from jobs.score import text_norm_extra

    policy = TextPolicy.parse(settings.text_norm)
    scored = score_rows(rows, "evaluate predictions", policy)
    metrics = metrics_by_model_set(scored)
    rejected = [r for s in sets for r in s.rejected]
    unreadable = {(r["set"], r["id"]): r["error"] for r in info["unreadable"]}  # the same for every model
    rejected += [{"set": set_name, "id": utt, "reason": "unreadable_audio", "message": error}
                 for (set_name, utt), error in unreadable.items()]
    info["sets"] = {s.name: {"utterances": len(s.utterances), "rejected": len(s.rejected)} for s in sets}
    info["skipped_sets"] = plan.skipped_sets

    info["text_norm"] = policy.spec()
    write_jsonl(ctx.out / "predictions.jsonl", ({k: r.get(k) for k in PREDICTION_KEYS} for r in scored))
    write_jsonl(ctx.out / "rejected.jsonl", rejected)
    atomic_write_bytes(ctx.out / "run_info.json", (json.dumps(info, ensure_ascii=False, indent=2) + "\n").encode())
    write_report(ctx.out, metrics, scored, settings.title,
                 {**report_extra(info, rejected), **training_extra(ctx), **text_norm_extra(policy)},
                 guard=run_guard_result(ctx.store, settings),
                 development=[e.spec.name for e in plan.sets if e.spec.development])
    summary = {m: {s: {"cer": v["cer"], "n": v["n"]} for s, v in sets_.items()} for m, sets_ in metrics.items()}
    for model, sets_ in summary.items():
        for set_name, v in sets_.items():
            log.info("evaluate: %-12s %-14s CER %s on %d utterances", model, set_name,
                     "—" if v["cer"] is None else f"{100 * v['cer']:.1f}%", v["n"])
    return {"metrics": summary, "rejected": len(rejected), "family": info["family"], "backend": info.get("backend"),
            "device": info["device"]}


def training_extra(ctx: StageContext) -> dict[str, Any]:
    """The report's training section when this run fine-tuned a model: the loss on the training data and on the
    held-out clips (eval_holdout) over the steps, and where the curves went (report_to)."""
    from common.core.stage import read_manifest

    try:
        manifest = read_manifest(ctx.store, ctx.settings.run_id, "finetune")
    except Exception:  # a report without this section beats no report
        return {}
    summary = (manifest or {}).get("summary") or {}
    if not summary:
        return {}
    evals = summary.get("eval_losses") or []
    return {"Training · 训练 (finetune)": {
        "mode": summary.get("mode"), "steps": summary.get("global_step"), "train_clips": summary.get("train_clips"),
        "train loss (first → last logged)": f"{summary.get('first_logged_loss')} → {summary.get('last_logged_loss')}",
        "validation loss on held-out clips (step: loss)": ", ".join(f"{st}: {lo}" for st, lo in evals)
        or "none (no clips held out: eval_holdout 0, or too few training clips)",
        "curves": f"report_to {summary.get('report_to') or ['tensorboard']} (TensorBoard: finetune/tensorboard/)",
    }}


def run_guard_result(store: Store, settings: EvaluateSettings) -> dict[str, Any] | None:
    """The forgetting guard's choice (finetune's guard.json) when this run's models are the run's own."""
    if settings.model:
        return None
    key = store.join(settings.run_id, "finetune", "guard.json")
    try:
        return store.read_json(key) if store.exists(key) else None
    except (OSError, ValueError) as e:
        log.warning("evaluate: cannot read the forgetting guard's result %s (%s); the report goes without it",
                    store.uri_for(key), e)
        return None


def report_extra(info: dict[str, Any], rejected: list[dict[str, Any]]) -> dict[str, Any]:
    decoding = {**(info.get("decoding") or {}), "family": info["family"], "backend": info.get("backend"),
                "device": info["device"],
                "batch_size": info["batch_size"]}
    if "compute_type" in info:
        decoding["compute_type"] = info["compute_type"]
    models = [{"model": name, "ref": m["ref"], "loaded_from": m["folder"], "conversion": m.get("conversion", "none"),
               "load_seconds": m["load_seconds"]} for name, m in info["models"].items()]
    extra: dict[str, Any] = {
        "Decoding settings (same for every model) · 解码设置(所有模型相同)": decoding,
        "Throughput · 吞吐量": info["throughput"],
        "Models · 模型": models,
    }
    bad = [{"set": r["set"], "line": r.get("line"), "row": r.get("id") or ",".join(map(str, (r.get("row") or {}).values())),
            "reason": r["reason"], "message": r["message"]} for r in rejected]
    extra["Rejected rows (not scored) · 被拒行(未计分)"] = bad or "None · 无."
    if info["skipped_sets"]:
        extra["Skipped optional sets · 跳过的可选测试集"] = info["skipped_sets"]
    return extra
