"""The export stage: a fine-tuned model → inference folders, verified offline.

    asr-ft export [--checkpoint PATH] [--quantization int8|float16|int8_float16|float32]

Outputs in ``<artifacts>/<run-id>/export/`` (the model family decides the folders; whisper):

- ``model/`` — Hugging Face Whisper folder: safetensors weights, config, generation config (Chinese
  transcription prompt, suppression lists), feature extractor and tokenizer. No training state.
- ``ct2/`` — CTranslate2 copy for faster-whisper / CTranslate2 (``model.bin``, ``config.json``,
  ``tokenizer.json``, ``preprocessor_config.json``, vocabulary), weights quantized as ``--quantization``
  (int8 by default: a quarter of the float32 size and the fastest on CPU).
- ``export_info.json`` — family, source, quantization, sha256 of the weights, and the verification: every
  folder is loaded with the network switched off and decodes one short clip (the run's first test clip, else
  a synthetic tone).

The source is ``<run>/finetune/final/`` or ``--checkpoint`` (a folder of the family's format; missing
tokenizer files are taken from the run's pretrained model). A DeepSpeed ZeRO checkpoint (``global_step*/``
shards, e.g. a ``checkpoint-N/`` of a ZeRO-2/3 run) is first consolidated into a normal fp32 model folder
(``common.training.zero_export``; logged), then exported the same way; ``export_info.json`` records
``zero_consolidated``. The family is the run's (pretrained/provenance.json), else ``--family``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.core.audio import SAMPLE_RATE, load_audio
from common.core.models import describe_folder, parse_model_ref, ref_fingerprint
from common.core.records import audio_location, iter_jsonl
from common.core.settings import StageSettings
from common.core.stage import StageContext, StageFailed, upstream_fingerprint
from common.core.store import Store, atomic_write_bytes
from common.families import DEFAULT_FAMILY, FamilyError, ModelFamily, family_of_pretrained, get_family
from common.training.zero_export import is_zero_checkpoint

log = logging.getLogger(__name__)

STAGE = "export"
QUANTIZATIONS = ("int8", "float16", "int8_float16", "float32")
VERIFY_SECONDS = 2.0  # the synthetic clip used when the run has no test audio


class ExportSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_EXPORT_")

    checkpoint: str | None = Field(
        None, description="model folder to export [default: <run>/finetune/final]",
        examples=["runs/demo/finetune/final", "runs/demo/finetune/checkpoints/checkpoint-40"],
    )
    quantization: Literal[QUANTIZATIONS] = Field(  # type: ignore[valid-type]
        "int8", description="CTranslate2 weight type: int8 (CPU), float16 / int8_float16 (GPU), float32",
    )
    verify: bool = Field(True, description="load the exported folders offline and decode one clip before finishing")
    family: str | None = Field(None, description="model family of --checkpoint [default: the run's, else "
                               f"{DEFAULT_FAMILY}]", examples=["whisper"])


def export_inputs(settings: ExportSettings, store: Store) -> dict[str, Any]:
    if settings.checkpoint:
        folder = Path(settings.checkpoint).expanduser()
        if not folder.is_dir():
            raise StageFailed(f"--checkpoint {settings.checkpoint}: {describe_folder(folder)}", exit_code=2)
        return {"checkpoint": ref_fingerprint(parse_model_ref(str(folder)))}
    return {"finetune": upstream_fingerprint(store, settings.run_id, "finetune")}


def model_family(ctx: StageContext) -> tuple[ModelFamily, Path | None]:
    """(the family, the run's pretrained model folder or None): the run's, else --family, else the default."""
    settings: ExportSettings = ctx.settings
    try:
        pretrained = ctx.input_dir("pretrained")
    except StageFailed:
        pretrained = None
    try:
        if settings.family:
            return get_family(settings.family), pretrained / "model" if pretrained else None
        if pretrained is not None:
            return family_of_pretrained(pretrained), pretrained / "model"
        return get_family(DEFAULT_FAMILY), None
    except FamilyError as e:
        raise StageFailed(str(e), exit_code=2) from None


def consolidated(src: Path, work: Path) -> Path:
    """A DeepSpeed ZeRO checkpoint's fp32 master weights gathered into a normal model folder under ``work``."""
    from common.training.zero_export import (
        ZeroCheckpointError,
        consolidate_zero_checkpoint,
        zero_checkpoint_tag,
    )

    try:
        log.info("export: %s is a DeepSpeed ZeRO checkpoint (tag %s): consolidating its shards into one model "
                 "first", src, zero_checkpoint_tag(src))
        return consolidate_zero_checkpoint(src, work / "consolidated")
    except ZeroCheckpointError as e:
        raise StageFailed(f"cannot export {src}: {e}", exit_code=2) from None


def verification_clip(ctx: StageContext) -> tuple[np.ndarray, str]:
    """The run's first test clip (else first train clip), or a synthetic tone when the run has none."""
    for name in ("test.jsonl", "train.jsonl"):
        try:
            path = ctx.input_dir("prepare") / name
        except StageFailed:
            break
        for rec in iter_jsonl(path) if path.is_file() else []:
            samples, _ = load_audio(audio_location(rec, path.parent.parent))
            return samples, f"prepare/{name}: {rec['id']}"
    t = np.arange(int(VERIFY_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), f"synthetic {VERIFY_SECONDS:.0f}-s 440 Hz tone"


def export(ctx: StageContext) -> dict[str, Any]:
    settings: ExportSettings = ctx.settings
    src = Path(settings.checkpoint).expanduser() if settings.checkpoint else ctx.input_dir("finetune") / "final"
    family, donor = model_family(ctx)
    zero = is_zero_checkpoint(src)
    clip, clip_name = verification_clip(ctx) if settings.verify else (None, None)
    # a ZeRO checkpoint is gathered beside the outputs (same disk: a 10 B model is ~40 GB in fp32), then exported
    with tempfile.TemporaryDirectory(prefix=".zero-", dir=ctx.out) as zero_work:
        source = consolidated(src, Path(zero_work)) if zero else src
        info = family.export(source, ctx.out, donor, settings.model_dump(), clip)
    info = {"family": family.name, "source": str(src), "zero_consolidated": zero, **info}
    if clip is not None:
        info["verification"] = {"clip": clip_name, **info["verification"]}
        log.info("export: verified offline on %s — %s", clip_name,
                 "; ".join(f"{k}: {v['text'][:60]!r}" for k, v in info["verification"].items() if k != "clip"))
    atomic_write_bytes(ctx.out / "export_info.json", (json.dumps(info, ensure_ascii=False, indent=2) + "\n").encode())
    weights = {k: sum(w["size"] for w in v) for k, v in info.items() if k.endswith("_weights")}
    return {"family": family.name, "source": info["source"], "quantization": settings.quantization,
            **{k.replace("_weights", "_bytes"): v for k, v in weights.items()}, "verified": settings.verify}
