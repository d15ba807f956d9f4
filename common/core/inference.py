"""Using a model outside the pipeline: open any model ``evaluate`` takes, with ``evaluate``'s decoding settings.

    settings = TranscribeSettings(model="runs/demo/export", audio=["talk.wav"])   # a DecodingSettings
    loaded = open_model(settings)          # Loaded(engine, family, device, batch_size, info)
    loaded.engine.transcribe([clip])       # every family's engine: 16-kHz clips of ≤ 30 s → texts

MODEL: ``bundled:NAME``, ``hf://org/name[@rev]``, ``s3://bucket/prefix``, a model or ``asr-ft export`` folder, or
a run's stage folder (``runs/demo/export``, ``runs/demo/pretrained/model``). Its family: ``--family``, else the
family of a ``bundled:`` model, else the one the run's ``pretrained`` stage recorded (``provenance.json`` beside
or above the folder), else whisper. Device: ``auto`` = CUDA when there is one, else the CPU.

The decoding fields (backend, device, compute type, beam size, new-token limit, batch size, threads) are the
``evaluate`` stage's, with the same defaults, so a transcript here is what ``evaluate`` scored.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from common.core.models import ModelRefError, fetch_model, parse_model_ref
from common.core.settings import StageSettings
from common.core.stage import StageFailed
from common.families import (
    DEFAULT_FAMILY,
    PROVENANCE,
    EngineRequest,
    FamilyError,
    ModelFamily,
    bundled_family,
    family_of_pretrained,
    get_family,
)

log = logging.getLogger(__name__)

BATCH_SIZE = {"cpu": 8, "cuda": 32}  # evaluate's: no gain beyond ~8 on a few CPU cores; 32 clips of 30 s on a GPU
COMPUTE_TYPES = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32")


class DecodingSettings(StageSettings):
    """The model and how it decodes: the fields and defaults of ``asr-ft evaluate``."""

    model: str = Field(..., description="the model: bundled:NAME, hf://org/name, s3://bucket/prefix, a model or "
                                        "export folder, or a run's stage folder",
                       examples=["runs/demo/export", "bundled:whisper-base"])
    family: str | None = Field(None, description="model family [default: the model's own (bundled:, a run's "
                                                 f"provenance.json), else {DEFAULT_FAMILY}]", examples=["whisper"])
    backend: str = Field("auto", description="the family's decoder; whisper: ct2 = CTranslate2 (CPU default), hf = "
                                             "transformers generate (GPU default; bf16)", examples=["auto", "ct2", "hf"])
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    compute_type: Literal[COMPUTE_TYPES] = Field(  # type: ignore[valid-type]
        "float32", description="CTranslate2 compute type (float32 = what evaluate uses)")
    beam_size: int = Field(1, ge=1, le=16, description="1 = greedy decoding")
    max_new_tokens: int | None = Field(None, ge=1, description="most tokens decoded per segment [default: the "
                                                               "family's; whisper: 224]")
    batch_size: int = Field(0, ge=0, description="segments decoded together (0 = 8 on CPU, 32 on GPU)")
    threads: int = Field(0, ge=0, description="CPU threads (0 = every core this process may use)")

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:
        try:
            parse_model_ref(value)
        except ModelRefError as e:
            raise ValueError(str(e)) from None
        return value


@dataclass
class Loaded:
    engine: Any  # common.core.transcribe.Engine
    family: str
    device: str
    batch_size: int
    info: dict[str, Any]  # what was loaded and how it decodes (for logs and /health)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_family(ref: str, folder: Path, family: str | None) -> ModelFamily:
    """--family, else a bundled model's family, else the run's pretrained provenance, else the default."""
    try:
        if family:
            return get_family(family)
        parsed = parse_model_ref(ref)
        if parsed.kind == "bundled":
            return get_family(bundled_family(parsed.location) or DEFAULT_FAMILY)
        if parsed.kind == "path":
            here = Path(parsed.location).expanduser().resolve()
            for candidate in (here, here.parent, here.parent / "pretrained", here.parent.parent / "pretrained"):
                if (candidate / PROVENANCE).is_file():
                    return family_of_pretrained(candidate)
        return get_family(DEFAULT_FAMILY)
    except FamilyError as e:
        raise StageFailed(str(e), exit_code=2) from None


def open_model(settings: DecodingSettings) -> Loaded:
    """Fetch the model and open its family's engine; StageFailed (exit 2) with what to do when it cannot."""
    t0 = time.perf_counter()
    folder, facts = fetch_model(settings.model, settings.s3)
    family = model_family(settings.model, folder, settings.family)
    device = resolve_device(settings.device)
    request = EngineRequest(backend=settings.backend, device=device, compute_type=settings.compute_type,
                            threads=settings.threads, beam_size=settings.beam_size,
                            max_new_tokens=settings.max_new_tokens)
    try:
        engine, used = family.open_engine(folder, request)
    except FamilyError as e:
        raise StageFailed(f"model {settings.model}: {e}", exit_code=2) from None
    batch_size = settings.batch_size or BATCH_SIZE.get(device, BATCH_SIZE["cpu"])
    info = {"model": settings.model, "family": family.name, "device": device, "batch_size": batch_size,
            "resolved_source": facts.get("resolved_source"), **used,
            "load_seconds": round(time.perf_counter() - t0, 3), "engine": engine.info}
    log.info("model %s (%s family) on %s: %s, batches of %d, loaded in %.1f s", settings.model, family.name, device,
             used.get("backend") or engine.info.get("backend"), batch_size, info["load_seconds"])
    return Loaded(engine, family.name, device, batch_size, info)


def command_main(name: str, settings_cls: type, body: Any, doc: str, examples: str, argv: list[str] | None,
                 audio: bool = False) -> int:
    """``asr-ft NAME MODEL [AUDIO…]`` (transcribe, serve): flags and environment as for the stages, MODEL (and,
    with ``audio``, recordings) also as positional arguments; bad settings or a StageFailed end as one message
    and the stage contract's exit code."""
    import sys

    from common.core.settings import SettingsError, build_parser, load_settings
    from common.core.stage import EXIT_BAD_INPUT, fail, setup_logging

    title, _, rest = doc.strip().partition("\n")
    parser = build_parser(settings_cls, prog=f"asr-ft {name}", description=title + "\n" + rest, epilog=examples)
    parser.add_argument("model_arg", nargs="?", metavar="MODEL", help="the model (or --model)")
    if audio:
        parser.add_argument("audio_args", nargs="*", metavar="AUDIO", help="recordings (or --audio)")
    ns = vars(parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv))
    config = ns.pop("config", None)
    model = ns.pop("model_arg", None)
    if model:
        ns["model"] = model
    positional = ns.pop("audio_args", None) or []
    if positional:
        ns["audio"] = [*ns.get("audio", []), *positional]
    try:
        settings = load_settings(settings_cls, ns, config)
    except SettingsError as e:
        setup_logging("INFO")
        print(f"asr-ft {name}: {e}", file=sys.stderr)
        return fail(name, str(e), EXIT_BAD_INPUT)
    setup_logging(settings.log_level)
    try:
        return body(settings)
    except StageFailed as e:
        return fail(name, str(e), e.exit_code)
