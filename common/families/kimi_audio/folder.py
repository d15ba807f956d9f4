"""A Kimi-Audio model folder: its layout, and a check of every file against the configuration, without loading
any weights.

    folder = model_folder(path)              # a model folder, or an export folder's model/
    problems = folder_problems(folder)       # [] for a usable folder, else one line per problem
    check_model_folder(folder)               # ModelFolderError listing every problem at once

The layout (a downloaded Kimi-Audio-7B(-Instruct) folder has it; asr-ft adds the GLM-4-Voice tokenizer):

    config.json                  Qwen2 fields + every kimia_* field (conventions.KimiAudioConfig reads it)
    *.safetensors                the LLM with the released parameter names (+ model.safetensors.index.json
                                 when sharded)
    tiktoken.model               optional: the text tokenizer's BPE (else the pinned stand-in, tokenizer.py)
    other files                  tokenizer config, modeling code, generation config … (not read here)
    whisper-large-v3/            a Hugging Face WhisperModel folder: config.json, *.safetensors and maybe
                                 preprocessor_config.json; only its encoder is used
    glm-4-voice-tokenizer/       the GLM-4-Voice speech tokenizer (GlmSpeechTokenizer.save's layout)
    STANDIN.txt                  only in a random stand-in (standin.py): its transcripts mean nothing

Reads: ``config.json`` files and the headers of the safetensors files (8 bytes + a JSON header each; the
expected names and shapes come from the model built on ``meta``), so a 20-GB folder is checked in seconds.
Decides: nothing. Writes: nothing.

Each part has its own check (:func:`llm_problems`, :func:`whisper_problems`, :func:`glm_problems`) so export
can check the parts it is about to assemble from two folders before writing anything.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from common.families import FamilyError
from common.families.kimi_audio.conventions import STACK, WHISPER_N_MELS, WHISPER_SUBFOLDER, KimiAudioConfig
from common.families.kimi_audio.glm_tokenizer import N_FFT
from common.families.whisper.conventions import CHUNK_SECONDS, HOP_LENGTH, SAMPLE_RATE

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"  # the shard map of a sharded LLM (Hugging Face's name)
GLM_SUBFOLDER = "glm-4-voice-tokenizer"  # asr-ft's addition: the tokenizer the model's speech codes come from
STANDIN_FILE = "STANDIN.txt"  # marks a random stand-in (standin.py)
EXPORT_SUBFOLDER = "model"  # export writes the model folder here (export.py)
PREPROCESSOR_FILE = "preprocessor_config.json"  # optional in whisper-large-v3/ (upstream computes its own log-mel)
# Whisper's log-mel settings (upstream's whisper_Lv3 hard-codes the same); a preprocessor_config.json must agree.
WHISPER_LOG_MEL = {"sampling_rate": SAMPLE_RATE, "hop_length": HOP_LENGTH, "n_fft": N_FFT, "chunk_length": CHUNK_SECONDS}
FLOAT_DTYPES = ("F32", "BF16", "F16")  # safetensors dtype names of the weights a model folder may hold
HEADER_SIZE_LIMIT = 100_000_000  # bytes: a larger JSON header means the file is not safetensors
FOLDER_HINT = ("Expected a Kimi-Audio-7B(-Instruct) folder (config.json, the LLM *.safetensors, whisper-large-v3/) "
               f"with the GLM-4-Voice tokenizer in {GLM_SUBFOLDER}/ (`asr-ft pretrained --speech-tokenizer` adds it), "
               "or an export folder holding such a folder in model/.")


class ModelFolderError(FamilyError):
    """A folder that is not a usable Kimi-Audio model folder; the message lists every problem."""


def model_folder(path: Path) -> Path:
    """``path`` when it holds config.json, else its ``model/`` (an export folder); ModelFolderError otherwise."""
    path = Path(path)
    for candidate in (path, path / EXPORT_SUBFOLDER):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    what = "no such folder" if not path.exists() else (
        "it holds: " + (", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing") if path.is_dir()
        else "a file, not a folder")
    raise ModelFolderError(f"{path}: no {CONFIG_FILE} here or in {EXPORT_SUBFOLDER}/ ({what}). {FOLDER_HINT}")


def check_model_folder(folder: Path) -> KimiAudioConfig:
    """The folder's configuration when every part checks out; ModelFolderError listing every problem otherwise."""
    problems = folder_problems(folder)
    if problems:
        raise ModelFolderError(problem_report(f"{folder}: not a usable Kimi-Audio model folder", problems))
    return KimiAudioConfig.from_json(Path(folder) / CONFIG_FILE)


def problem_report(headline: str, problems: list[str], hint: str = FOLDER_HINT) -> str:
    """``headline (n problems):``, one problem a line, then what was expected."""
    return (f"{headline} ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  - "
            + "\n  - ".join(problems) + f"\n{hint}")


def folder_problems(folder: Path) -> list[str]:
    """Every problem of a model folder: configuration, LLM weights, Whisper encoder, GLM tokenizer."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    config, problems = read_config(folder / CONFIG_FILE)
    problems += llm_problems(folder, config)
    problems += whisper_problems(folder / WHISPER_SUBFOLDER, config)
    problems += glm_problems(folder / GLM_SUBFOLDER, config)
    return problems


# --- the parts ----------------------------------------------------------------------------------------------


def read_config(path: Path, data: Mapping[str, Any] | None = None) -> tuple[KimiAudioConfig | None, list[str]]:
    """(configuration, []) or (None, [why]); ``data`` instead of the file when given (export merges configs)."""
    try:
        if data is None:
            return KimiAudioConfig.from_json(path), []
        return KimiAudioConfig.from_dict(dict(data), source=str(path)), []
    except ValueError as e:  # the message names the file and every problem
        return None, [str(e)]


def llm_weight_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The LLM's safetensors files (the index's, when the folder has one) and the index's problems."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return sorted(folder.glob("*.safetensors")), []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [], [f"{INDEX_FILE}: unreadable ({type(e).__name__}: {e}); expected {{'weight_map': {{name: file}}}}"]
    missing = [n for n in names if not (folder / n).is_file()]
    problems = [f"{INDEX_FILE}: lists {n}, which is missing" for n in missing]
    return [folder / n for n in names if n not in missing], problems


def llm_problems(folder: Path, config: KimiAudioConfig | None, files: Iterable[Path] | None = None) -> list[str]:
    """Problems of the LLM weights in ``folder`` (or of ``files``) against ``config``: every missing, unexpected
    or misshapen parameter, files that are not safetensors or are truncated, keys the index maps elsewhere."""
    import torch

    from common.families.kimi_audio.model import build_on_meta, check_state_dict

    problems: list[str] = []
    if files is None:
        files, problems = llm_weight_files(folder)
    files = list(files)
    if not files and not problems:
        return [f"no LLM weights: no *.safetensors in {folder}"]
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, str] = {}
    for path in files:
        header, bad = read_header(path)
        problems += bad
        for name, (dtype, shape) in header.items():
            if name in where:
                problems.append(f"{path.name}: {name} is also in {where[name]}")
            if dtype not in FLOAT_DTYPES:
                problems.append(f"{path.name}: {name} has dtype {dtype}, expected one of {', '.join(FLOAT_DTYPES)}")
            shapes[name], where[name] = shape, path.name
    problems += _index_mismatches(folder / INDEX_FILE, where) if (folder / INDEX_FILE).is_file() else []
    if config is not None and shapes:
        model = build_on_meta(config)
        given = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
        problems += [f"LLM weights: {p}" for p in check_state_dict(model, given)]
    return problems


def whisper_problems(folder: Path, config: KimiAudioConfig | None) -> list[str]:
    """Problems of the ``whisper-large-v3/`` subfolder: its config, feature extractor and encoder weights."""
    import torch
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    name = f"{WHISPER_SUBFOLDER}/"
    if not folder.is_dir():
        return [f"{name} is missing: Kimi-Audio reads Whisper-large-v3 encoder features from it (a Hugging Face "
                "WhisperModel folder; copy it from the Kimi-Audio-7B-Instruct download)"]
    problems = []
    try:
        wconfig = WhisperConfig.from_json_file(str(folder / CONFIG_FILE))
    except (OSError, ValueError) as e:
        return [f"{name}{CONFIG_FILE}: unreadable ({type(e).__name__}: {e})"]
    if wconfig.model_type != "whisper":
        problems.append(f"{name}{CONFIG_FILE}: model_type {wconfig.model_type!r}, expected 'whisper'")
    if wconfig.num_mel_bins != WHISPER_N_MELS:
        problems.append(f"{name}{CONFIG_FILE}: num_mel_bins {wconfig.num_mel_bins}, expected {WHISPER_N_MELS} "
                        "(Whisper-large-v3)")
    if config is not None and STACK * wconfig.d_model != config.kimia_adaptor_input_dim:
        problems.append(f"{name}{CONFIG_FILE}: d_model {wconfig.d_model} × {STACK} stacked frames ≠ the adaptor's "
                        f"input {config.kimia_adaptor_input_dim} (kimia_adaptor_input_dim): not this model's encoder")
    if (folder / PREPROCESSOR_FILE).is_file():  # optional: without it the engine uses Whisper's own settings
        try:
            pre = json.loads((folder / PREPROCESSOR_FILE).read_text(encoding="utf-8"))
            expected = {**WHISPER_LOG_MEL, "feature_size": wconfig.num_mel_bins}
            wrong = {k: pre[k] for k, v in expected.items() if k in pre and pre[k] != v}
            if wrong:
                problems.append(f"{name}{PREPROCESSOR_FILE}: {wrong}, expected {expected} (Whisper-large-v3's "
                                "log-mel, which the model was trained on)")
        except (OSError, ValueError) as e:
            problems.append(f"{name}{PREPROCESSOR_FILE}: unreadable ({type(e).__name__}: {e})")
    files, index_problems = llm_weight_files(folder)
    problems += [f"{name}{p}" for p in index_problems]
    if not files:
        return problems + [f"{name}: no *.safetensors (the Whisper weights)"]
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        header, bad = read_header(path, f"{name}{path.name}")
        problems += bad
        shapes.update({k: shape for k, (_, shape) in header.items()})
    prefix = whisper_prefix(shapes)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in WhisperEncoder(wconfig).state_dict().items()}
    given = {k.removeprefix(prefix): v for k, v in shapes.items() if k.startswith(prefix)}
    problems += [f"{name}: missing {prefix}{k} (expected shape {s})" for k, s in expected.items() if k not in given]
    problems += [f"{name}: wrong shape: {prefix}{k} is {given[k]}, expected {s}"
                 for k, s in expected.items() if k in given and given[k] != s]
    problems += [f"{name}: unexpected {prefix}{k} {s}" for k, s in given.items() if k not in expected]
    return problems


def glm_problems(folder: Path, config: KimiAudioConfig | None) -> list[str]:
    """Problems of the ``glm-4-voice-tokenizer/`` subfolder: its config and weights (names and shapes)."""
    import torch

    from common.families.kimi_audio.glm_tokenizer import GlmConfig, GlmSpeechEncoder, GlmTokenizerError

    name = f"{GLM_SUBFOLDER}/"
    if not folder.is_dir():
        return [f"{name} is missing: the GLM-4-Voice tokenizer makes the speech codes the model reads (run "
                "`asr-ft pretrained --speech-tokenizer FOLDER`, or copy THUDM/glm-4-voice-tokenizer there)"]
    try:
        gconfig = GlmConfig.from_hf(json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")),
                                    f"{name}{CONFIG_FILE}")
    except (OSError, ValueError) as e:  # GlmTokenizerError is a ValueError
        reason = str(e) if isinstance(e, GlmTokenizerError) else f"{name}{CONFIG_FILE}: unreadable ({e})"
        return [reason]
    problems = []
    if config is not None and gconfig.codebook_size > config.num_codes:
        problems.append(f"{name}{CONFIG_FILE}: {gconfig.codebook_size} codes, the LLM embeds {config.num_codes} "
                        f"(vocab_size − kimia_token_offset)")
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        return problems + [f"{name}: no model*.safetensors (the tokenizer's weights)"]
    given: dict[str, tuple[int, ...]] = {}
    for path in files:
        header, bad = read_header(path, f"{name}{path.name}")
        problems += bad
        given.update({k: shape for k, (_, shape) in header.items()})
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GlmSpeechEncoder(gconfig).state_dict().items()}
    problems += [f"{name}: missing {k} (expected shape {s})" for k, s in expected.items() if k not in given]
    problems += [f"{name}: wrong shape: {k} is {given[k]}, expected {s}"
                 for k, s in expected.items() if k in given and given[k] != s]
    problems += [f"{name}: unexpected {k} {s}" for k, s in given.items() if k not in expected]
    return problems


def whisper_prefix(keys: Iterable[str]) -> str:
    """How a Whisper checkpoint names its encoder: ``model.encoder.`` (WhisperForConditionalGeneration),
    ``encoder.`` (WhisperModel), or no prefix (a WhisperEncoder saved alone)."""
    keys = list(keys)
    return next((p for p in ("model.encoder.", "encoder.") if any(k.startswith(p) for k in keys)), "")


# --- safetensors headers -------------------------------------------------------------------------------------


def read_header(path: Path, label: str | None = None) -> tuple[dict[str, tuple[str, tuple[int, ...]]], list[str]]:
    """({tensor name: (dtype, shape)}, problems) of one safetensors file, from its header alone.

    The format: 8 bytes (little-endian length n), n bytes of JSON ``{name: {dtype, shape, data_offsets}}``,
    then the data; a file shorter than the header's last offset is truncated."""
    label = label or path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, HEADER_SIZE_LIMIT):
                return {}, [f"{label}: not a safetensors file (no valid header)"]
            meta = json.loads(f.read(n))
        tensors = {k: v for k, v in meta.items() if k != "__metadata__"}
        out = {k: (str(v["dtype"]), tuple(int(d) for d in v["shape"])) for k, v in tensors.items()}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return {}, [f"{label}: not a readable safetensors file ({type(e).__name__}: {e})"]
    if 8 + n + end > size:
        return out, [f"{label}: truncated: its header needs {8 + n + end} bytes, the file has {size} (copy it again)"]
    return out, []


def _index_mismatches(index: Path, where: Mapping[str, str]) -> list[str]:
    """Keys the index maps to a file that does not hold them, and keys of the shards the index does not map
    (a key mapped to a missing file is already reported with that file)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # already reported by llm_weight_files
    present = set(where.values())
    wrong = [f"{INDEX_FILE}: maps {k} to {f}, but {'it is in ' + where[k] if k in where else 'that file lacks it'}"
             for k, f in weight_map.items() if where.get(k) != f and f in present]
    wrong += [f"{INDEX_FILE}: does not map {k} (in {f})" for k, f in where.items() if k not in weight_map]
    return wrong
