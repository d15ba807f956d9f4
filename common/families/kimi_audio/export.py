"""Export a trained Kimi-Audio model: one offline, inference-ready folder in the released layout, checked before
anything is written and, given a clip, loaded and decoded once with the network blocked.

    info = export(final_dir, out_dir, donor=pretrained_model_dir, settings={}, clip=audio)   # the family protocol
    # → out_dir/model/: config.json, the LLM safetensors (+ index), tokenizer and code files,
    #   whisper-large-v3/, glm-4-voice-tokenizer/ (see common.families.kimi_audio.folder)

Reads: ``source``, a trained folder in the model folder's layout (finetune's ``final/``: the LLM weights with
LoRA already merged, and its config.json), and ``donor``, the run's pretrained model folder (either may be an
export folder; its ``model/`` is used). Decides where each part comes from:

    LLM weights (+ index)       source only: the donor's are the weights before training
    config.json                 the donor's fields updated with the source's; every KimiAudioConfig field
                                (all kimia_* ones included) written out, so the file stands alone
    whisper-large-v3/           source's, else the donor's
    glm-4-voice-tokenizer/      source's, else the donor's
    other top-level files       the donor's, then the source's (the source wins a name both have): tokenizer
                                files, modeling and tokenizer code, generation config, STANDIN.txt …; weight
                                files (*.safetensors, *.bin, *.pt …) and dot-files are never taken this way
    other subfolders            the donor's (the source's when there is no donor), copied whole: e.g. the
                                speech-output detokenizer, unused by ASR but part of the original folder

Every part is checked first (every safetensors header against the merged configuration, the Whisper
encoder's and GLM tokenizer's names and shapes); the problems are listed together and nothing is written.
Writes: ``out_dir/model/``, published in one step (:func:`common.core.files.atomic_dir`), so a reader sees the
old folder or the new one. With a clip, the written folder is loaded with HF_HUB_OFFLINE=1 and every socket
connection refused (:func:`network_blocked`) and transcribes it: ``info["verification"]["kimi"]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.core.stage import StageFailed
from common.families.kimi_audio.conventions import WHISPER_SUBFOLDER, KimiAudioConfig
from common.families.kimi_audio.folder import (
    CONFIG_FILE,
    EXPORT_SUBFOLDER,
    GLM_SUBFOLDER,
    INDEX_FILE,
    STANDIN_FILE,
    folder_problems,
    glm_problems,
    llm_problems,
    llm_weight_files,
    problem_report,
    read_config,
    read_header,
    whisper_problems,
)

log = logging.getLogger(__name__)

FRONT_END_SUBFOLDERS = (WHISPER_SUBFOLDER, GLM_SUBFOLDER)  # taken from the source, else from the donor
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
VERIFY_MAX_NEW_TOKENS = 32  # enough to show the model says something; the point is "loads and decodes offline"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Files a training folder may hold that are not part of a model (an adapter_config.json beside merged weights
# would even make PEFT-aware loaders treat the folder as a LoRA adapter).
TRAINING_STATE_FILES = ("adapter_config.json", "trainer_state.json", "zero_to_fp32.py", "latest")
EXPORT_HINT = ("Export takes finetune's final/ (the trained LLM's safetensors and config.json, LoRA merged) and "
               "completes it from the run's pretrained model folder (whisper-large-v3/, glm-4-voice-tokenizer/, "
               "tokenizer and code files).")


@dataclass
class ExportPlan:
    """Where each part of the exported folder comes from (decided and checked before anything is written)."""

    source: Path
    donor: Path | None
    config: dict[str, Any]  # the merged config.json
    llm_files: list[Path]  # the source's LLM safetensors (and its index, when sharded)
    subfolders: dict[str, Path] = field(default_factory=dict)  # name in the export → folder copied whole
    files: dict[str, Path] = field(default_factory=dict)  # top-level non-weight file → where it is copied from
    left_out: list[str] = field(default_factory=list)  # what was seen and not exported, with why


def export(source: Path, out_dir: Path, donor: Path | None, settings: Mapping[str, Any], clip: Any) -> dict[str, Any]:
    """``out_dir/model``: the trained model as a complete Kimi-Audio folder; with a ``clip``, loaded and decoded
    once with the network blocked. StageFailed (exit code 2) listing every problem when the parts do not fit.
    ``settings`` (the export stage's) holds nothing this family reads: the weights are copied as they are."""
    from common.core.files import atomic_dir
    from common.core.models import weight_digests

    plan = plan_export(Path(source), Path(donor) if donor is not None else None)
    model_dir = Path(out_dir) / EXPORT_SUBFOLDER
    t0 = time.perf_counter()
    with atomic_dir(model_dir) as staged:
        write_export(plan, staged)
        problems = folder_problems(staged)
        if problems:  # the parts were checked before writing; this catches a copy that went wrong
            raise StageFailed(problem_report(f"{model_dir}: the written folder does not check out", problems))
    info: dict[str, Any] = {
        "model": model_facts(plan),
        "parts": {"llm": str(plan.source), **{name: str(path) for name, path in plan.subfolders.items()},
                  **{name: str(path) for name, path in plan.files.items()}},
        "left_out": plan.left_out,
        "standin": (model_dir / STANDIN_FILE).is_file(),
        "copy_seconds": round(time.perf_counter() - t0, 2),
        "model_weights": weight_digests(model_dir),
        "whisper_weights": weight_digests(model_dir / WHISPER_SUBFOLDER),
        "glm_tokenizer_weights": weight_digests(model_dir / GLM_SUBFOLDER),
    }
    for item in plan.left_out:
        log.info("export: left out %s", item)
    if clip is not None:
        info["verification"] = verify_offline(model_dir, clip)
    return info


def plan_export(source: Path, donor: Path | None) -> ExportPlan:
    """Decide where each part comes from and check every part; StageFailed listing every problem."""
    source, donor = _model_dir(source), _model_dir(donor) if donor is not None else None
    if not source.is_dir():
        raise StageFailed(f"{source}: no such folder; export takes finetune's final/ (or a folder in the "
                          "Kimi-Audio model layout)", exit_code=2)
    config_data, config, problems = merged_config(source, donor)
    llm_files, _ = llm_weight_files(source)
    problems += llm_problems(source, config)
    index = [source / INDEX_FILE] if (source / INDEX_FILE).is_file() else []
    plan = ExportPlan(source=source, donor=donor, config=config_data, llm_files=llm_files + index)
    for name in FRONT_END_SUBFOLDERS:
        chosen = next((d / name for d in (source, donor) if d is not None and (d / name).is_dir()), None)
        check = whisper_problems if name == WHISPER_SUBFOLDER else glm_problems
        problems += check(chosen if chosen is not None else source / name, config)
        if chosen is not None:
            plan.subfolders[name] = chosen
    _plan_the_rest(plan)
    if problems:
        with_donor = f" (with the pretrained model {donor})" if donor else ""
        raise StageFailed(problem_report(f"cannot export {source}{with_donor}", problems, EXPORT_HINT), exit_code=2)
    return plan


def merged_config(source: Path, donor: Path | None) -> tuple[dict[str, Any], KimiAudioConfig | None, list[str]]:
    """(config.json to write, its configuration, problems): the donor's fields updated with the source's, with
    every field of the configuration written out (:func:`complete_config`)."""
    data: dict[str, Any] = {}
    problems: list[str] = []
    for path in [d / CONFIG_FILE for d in (donor, source) if d is not None and (d / CONFIG_FILE).is_file()]:
        try:
            data.update(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            problems.append(f"{path}: unreadable ({e})")
    if not data:
        return data, None, problems or [f"no {CONFIG_FILE} in {source}{' or ' + str(donor) if donor else ''}"]
    config, bad = read_config(source / CONFIG_FILE, data)
    return (complete_config(data, config) if config else data), config, problems + bad


def _plan_the_rest(plan: ExportPlan) -> None:
    """Top-level side files (the donor's, then the source's) and the other subfolders (the donor's, or the
    source's without a donor), noting in ``left_out`` what is not exported and why."""
    source, donor = plan.source, plan.donor
    for sub in sorted(p for p in (donor or source).iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name not in FRONT_END_SUBFOLDERS:
            plan.subfolders[sub.name] = sub
    if donor is not None:
        plan.left_out += [f"{p.name}/ of {source} (subfolders other than {' and '.join(FRONT_END_SUBFOLDERS)} come "
                          "from the pretrained model)" for p in sorted(source.iterdir())
                          if p.is_dir() and not p.name.startswith(".") and p.name not in FRONT_END_SUBFOLDERS]
    for where in [d for d in (donor, source) if d is not None]:
        for p in sorted(where.iterdir()):
            if not p.is_file() or p.name == CONFIG_FILE or not _side_file(p.name):
                continue
            if p.name in TRAINING_STATE_FILES:
                plan.left_out.append(f"{p.name} of {where} (training state, not part of a model)")
            else:
                plan.files[p.name] = p
    if donor is not None:
        plan.left_out += [f"{p.name} of {donor} (the weights before training)" for p in sorted(donor.iterdir())
                          if p.is_file() and not p.name.startswith(".") and not _side_file(p.name)]


def write_export(plan: ExportPlan, dest: Path) -> None:
    """Copy every part of ``plan`` into the empty folder ``dest`` (what the plan checked, nothing else)."""
    (dest / CONFIG_FILE).write_text(json.dumps(plan.config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    # Contents only (copyfile): the files get this process's default permissions, whatever the source's were.
    for path in plan.llm_files:
        shutil.copyfile(path, dest / path.name)
    for name, path in plan.files.items():
        shutil.copyfile(path, dest / name)
    for name, path in plan.subfolders.items():
        shutil.copytree(path, dest / name, ignore=shutil.ignore_patterns(".*"), copy_function=shutil.copyfile)


def complete_config(data: Mapping[str, Any], config: KimiAudioConfig) -> dict[str, Any]:
    """``data`` with every field of the configuration it resolves to written out (kimia_* fields included), so
    the file means the same to any reader whatever its defaults; the fields already there are kept as they are."""
    return {**config.to_json_dict(), **data}


def model_facts(plan: ExportPlan) -> dict[str, Any]:
    """The exported model's shape and its LLM dtypes (a trainer may have saved float32 weights)."""
    config = KimiAudioConfig.from_dict(plan.config)
    dtypes = sorted({dtype for p in plan.llm_files if p.suffix == ".safetensors"
                     for dtype, _ in read_header(p)[0].values()})
    return {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "kimia_mimo_layers": config.kimia_mimo_layers, "vocab_size": config.vocab_size, "llm_dtypes": dtypes}


# --- verification ---------------------------------------------------------------------------------------------


def verify_offline(model_dir: Path, clip: Any) -> dict[str, Any]:
    """Load ``model_dir`` with the network blocked and transcribe ``clip``; StageFailed when it does not load or
    decode. On CUDA when present (bfloat16), else on the CPU in the dtype the LLM is stored in when that is
    bfloat16 (the released 10-B model needs 20 GB of RAM so, 40 GB in float32), else float32."""
    import torch

    from common.families.kimi_audio.engines import KimiEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    stored = {dtype for p in llm_weight_files(model_dir)[0] for dtype, _ in read_header(p)[0].values()}
    dtype = torch.bfloat16 if device == "cuda" or stored == {"BF16"} else torch.float32
    with network_blocked():
        try:
            t0 = time.perf_counter()
            engine = KimiEngine(model_dir, device=device, dtype=dtype, max_new_tokens=VERIFY_MAX_NEW_TOKENS,
                                batch_size=1)
            text = engine.transcribe([clip])[0]
        except Exception as e:  # any failure to load or decode offline is the export's failure
            raise StageFailed(f"export verification failed: {model_dir} does not load/decode offline "
                              f"({type(e).__name__}: {e})") from e
    return {"kimi": {"text": text, "seconds": round(time.perf_counter() - t0, 3), "device": device,
                     "dtype": str(dtype).removeprefix("torch.")}}


@contextlib.contextmanager
def network_blocked() -> Iterator[None]:
    """Inside the block: HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1, and every socket connection or name lookup
    of this process raises ConnectionRefusedError, so nothing loaded here can have come from the network."""
    from common.core.settings import environment

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError("the network is blocked while an exported model is checked: the folder must "
                                     "load without it")

    patched = [(socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection"),
               (socket, "getaddrinfo")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in patched]
    with environment(OFFLINE_ENV):
        try:
            for owner, name in patched:
                setattr(owner, name, refuse)
            yield
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)


# --- helpers ----------------------------------------------------------------------------------------------------


def _model_dir(path: Path) -> Path:
    """``path``, or its ``model/`` when ``path`` is an export folder."""
    path = Path(path)
    inner = path / EXPORT_SUBFOLDER
    return inner if not (path / CONFIG_FILE).is_file() and (inner / CONFIG_FILE).is_file() else path


def _side_file(name: str) -> bool:
    """A top-level file export copies by name: not a weight file, not the LLM index, not a dot-file."""
    return not (name.startswith(".") or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"))
