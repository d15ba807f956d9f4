"""The export stage: a fine-tuned checkpoint → inference folders (Hugging Face + CTranslate2), verified offline.

    asr-ft export [--checkpoint PATH] [--quantization int8|float16|int8_float16|float32]

Outputs in ``<artifacts>/<run-id>/export/``:

- ``model/`` — Hugging Face Whisper folder: safetensors weights, config, generation config (Chinese
  transcription prompt, suppression lists), feature extractor and tokenizer. No training state.
- ``ct2/`` — CTranslate2 copy for faster-whisper / CTranslate2 (``model.bin``, ``config.json``,
  ``tokenizer.json``, ``preprocessor_config.json``, vocabulary), weights quantized as ``--quantization``
  (int8 by default: a quarter of the float32 size and the fastest on CPU).
- ``export_info.json`` — source, quantization, sha256 of the weights, and the verification: both folders
  are loaded with the network switched off (``local_files_only``; ``HF_HUB_OFFLINE=1``) and each decodes one
  short clip (the run's first test clip, else a synthetic tone).

The source is ``<run>/finetune/final/`` (a plain Whisper folder, LoRA already merged) or ``--checkpoint``
(any local Hugging Face Whisper folder; missing tokenizer/feature-extractor files are taken from the run's
pretrained model). A DeepSpeed ZeRO checkpoint (``global_step*/`` shards, e.g. a ``checkpoint-N/`` of a ZeRO-2/3
run) is first consolidated into a normal fp32 model folder (``common.training.zero_export``; logged), then exported the
same way; ``export_info.json`` records ``zero_consolidated``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.core.audio import SAMPLE_RATE, load_audio
from common.core.models import (
    copy_hf_folder,
    describe_folder_problem,
    folder_format_or_none,
    parse_model_ref,
    ref_fingerprint,
    validate_hf_folder,
    weight_digests,
)
from common.core.records import audio_location, iter_jsonl
from common.core.settings import StageSettings, environment
from common.core.stage import StageContext, StageFailed, upstream_fingerprint
from common.core.store import Store, atomic_write_bytes
from common.training.zero_export import is_zero_checkpoint

log = logging.getLogger(__name__)

STAGE = "export"
QUANTIZATIONS = ("int8", "float16", "int8_float16", "float32")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "normalizer.json",
                   "added_tokens.json", "special_tokens_map.json", "preprocessor_config.json", "processor_config.json")
VERIFY_SECONDS = 2.0  # the synthetic clip used when the run has no test audio
VERIFY_MAX_NEW_TOKENS = 16  # enough to show the model says something; the point is "loads and decodes"


class ExportSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_EXPORT_")

    checkpoint: str | None = Field(
        None, description="Hugging Face Whisper folder to export [default: <run>/finetune/final]",
        examples=["runs/demo/finetune/final", "runs/demo/finetune/checkpoints/checkpoint-40"],
    )
    quantization: Literal[QUANTIZATIONS] = Field(  # type: ignore[valid-type]
        "int8", description="CTranslate2 weight type: int8 (CPU), float16 / int8_float16 (GPU), float32",
    )
    verify: bool = Field(True, description="load both folders offline and decode one clip before finishing")


def export_inputs(settings: ExportSettings, store: Store) -> dict[str, Any]:
    if settings.checkpoint:
        folder = Path(settings.checkpoint).expanduser()
        if not folder.is_dir():
            raise StageFailed(f"--checkpoint {settings.checkpoint}: {describe_folder_problem(folder)}", exit_code=2)
        return {"checkpoint": ref_fingerprint(parse_model_ref(str(folder)))}
    return {"finetune": upstream_fingerprint(store, settings.run_id, "finetune")}


def _source(ctx: StageContext) -> Path:
    settings: ExportSettings = ctx.settings
    src = Path(settings.checkpoint).expanduser() if settings.checkpoint else ctx.input_dir("finetune") / "final"
    if is_zero_checkpoint(src):
        return src  # its shards are consolidated into a normal model folder first (consolidated())
    if folder_format_or_none(src) != "hf":
        raise StageFailed(
            f"{src}: not a Hugging Face Whisper folder ({describe_folder_problem(src)}). Export takes finetune's "
            f"final/ or a merged checkpoint folder; a LoRA adapter alone must be merged first (finetune does).",
            exit_code=2,
        )
    return src


def consolidated(src: Path, work: Path) -> Path:
    """A DeepSpeed ZeRO checkpoint's fp32 master weights gathered into a normal model folder under ``work``."""
    from common.training.zero_export import ZeroCheckpointError, consolidate_zero_checkpoint, zero_checkpoint_tag

    try:
        log.info("export: %s is a DeepSpeed ZeRO checkpoint (tag %s): consolidating its shards into one model "
                 "first", src, zero_checkpoint_tag(src))
        out = consolidate_zero_checkpoint(src, work / "consolidated")
    except ZeroCheckpointError as e:
        raise StageFailed(f"cannot export {src}: {e}", exit_code=2) from None
    if folder_format_or_none(out) != "hf":
        raise StageFailed(f"{src}: the consolidated ZeRO checkpoint is not a Hugging Face Whisper folder "
                          f"({describe_folder_problem(out)})", exit_code=2)
    return out


def _with_tokenizer(src: Path, ctx: StageContext, work: Path) -> Path:
    """``src``, or a linked copy completed with the pretrained model's tokenizer/feature-extractor files."""
    if (src / "tokenizer_config.json").is_file() and any(
            (src / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")):
        return src
    try:
        donor = ctx.input_dir("pretrained") / "model"
    except StageFailed:
        raise StageFailed(f"{src} has no tokenizer/feature-extractor files and the run has no pretrained model to "
                          f"take them from; save them next to the weights (processor.save_pretrained).",
                          exit_code=2) from None
    staged = work / "source"
    staged.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (staged / p.name).symlink_to(p.resolve())
    for name in TOKENIZER_FILES:
        if (donor / name).is_file() and not (staged / name).exists():
            (staged / name).symlink_to((donor / name).resolve())
    log.info("export: %s lacks tokenizer files; using those of %s", src, donor)
    return staged


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


def verify_offline(model_dir: Path, ct2_dir: Path, clip: np.ndarray) -> dict[str, Any]:
    """Load both folders with the hub switched off and decode ``clip``; StageFailed when either fails."""
    from faster_whisper import WhisperModel

    from common.core.transcribe import DecodeOptions, HFEngine

    out: dict[str, Any] = {}
    with environment({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}):
        try:
            t0 = time.perf_counter()  # transformers, with the prompt tokens given explicitly (as evaluate does)
            engine = HFEngine(model_dir, DecodeOptions(max_new_tokens=VERIFY_MAX_NEW_TOKENS), device="cpu")
            out["hf"] = {"text": engine.transcribe([clip])[0], "seconds": round(time.perf_counter() - t0, 3)}
            del engine
            t0 = time.perf_counter()
            fw = WhisperModel(str(ct2_dir), device="cpu", compute_type="default", local_files_only=True)
            segments, _ = fw.transcribe(clip, language="zh", task="transcribe", beam_size=1, temperature=0.0,
                                        without_timestamps=True, condition_on_previous_text=False,
                                        max_new_tokens=VERIFY_MAX_NEW_TOKENS)
            out["ct2"] = {"text": "".join(s.text for s in segments).strip(),
                          "seconds": round(time.perf_counter() - t0, 3)}
        except Exception as e:  # any failure to load or decode offline is the export's failure
            raise StageFailed(f"export verification failed: the exported folders do not load/decode offline "
                              f"({type(e).__name__}: {e})") from e
    return out


def export(ctx: StageContext) -> dict[str, Any]:
    from common.families.whisper.ct2 import export_hf_to_ct2

    settings: ExportSettings = ctx.settings
    src = _source(ctx)
    model_dir, ct2_dir = ctx.out / "model", ctx.out / "ct2"
    zero = is_zero_checkpoint(src)
    # a ZeRO checkpoint is gathered beside the outputs (same disk: a 10 B model is ~40 GB in fp32), then copied
    with tempfile.TemporaryDirectory(prefix="asrft-export-") as work, \
            tempfile.TemporaryDirectory(prefix=".zero-", dir=ctx.out) as zero_work:
        source = _with_tokenizer(consolidated(src, Path(zero_work)) if zero else src, ctx, Path(work))
        staged = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=ctx.out))
        try:
            copy_hf_folder(source, staged)
            facts = validate_hf_folder(staged)
            shutil.rmtree(model_dir, ignore_errors=True)
            os.replace(staged, model_dir)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    t0 = time.perf_counter()
    export_hf_to_ct2(model_dir, ct2_dir, settings.quantization)
    ct2_seconds = time.perf_counter() - t0
    info: dict[str, Any] = {
        "source": str(src), "zero_consolidated": zero, "quantization": settings.quantization, "model": facts,
        "hf_weights": weight_digests(model_dir), "ct2_weights": weight_digests(ct2_dir),
        "ct2_convert_seconds": round(ct2_seconds, 2),
    }
    if settings.verify:
        clip, clip_name = verification_clip(ctx)
        info["verification"] = {"clip": clip_name, **verify_offline(model_dir, ct2_dir, clip)}
        log.info("export: verified offline on %s — HF: %r; CTranslate2: %r", clip_name,
                 info["verification"]["hf"]["text"][:60], info["verification"]["ct2"]["text"][:60])
    atomic_write_bytes(ctx.out / "export_info.json", (json.dumps(info, ensure_ascii=False, indent=2) + "\n").encode())
    return {"source": info["source"], "quantization": settings.quantization,
            "hf_bytes": sum(w["size"] for w in info["hf_weights"]), "ct2_bytes": sum(w["size"] for w in info["ct2_weights"]),
            "verified": settings.verify}
