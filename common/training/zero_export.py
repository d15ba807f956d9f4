"""DeepSpeed ZeRO checkpoints → a normal Hugging Face model folder (consolidated weights).

A Hugging Face Trainer checkpoint trained with DeepSpeed ZeRO-2/3 looks like

    checkpoint-40/
      latest                     the tag of the newest ZeRO state, e.g. "global_step40"
      global_step40/             ZeRO shards: *_model_states.pt (shapes, buffers) and
                                 *_optim_states.pt (each rank's fp32 master-weight partition + Adam moments)
      zero_to_fp32.py            DeepSpeed's conversion script, copied in by DeepSpeed
      config.json, generation_config.json, trainer_state.json, ...
      model.safetensors          only with stage3_gather_16bit_weights_on_model_save: 16-bit weights

`consolidate_zero_checkpoint()` gathers the fp32 master weights from the shards with DeepSpeed's own
`deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` (lazily, shard file by shard
file, so a 10 B model does not need its fp32 copy in RAM twice) and writes them as safetensors next to
the checkpoint's config files, so `AutoModel*.from_pretrained(out_dir)` loads them. The fp32 master
weights are the exact trained values; the 16-bit `model.safetensors` beside them is a rounded copy.

The export stage calls it when `is_zero_checkpoint(folder)` is true (the folder holds `global_step*/`
ZeRO shards), then exports the consolidated folder as it would `final/`.

Untrusted folders: DeepSpeed's reader unpickles the shards with ``torch.load(weights_only=False)``, which runs
whatever code a crafted file names. Here it reads them only through ``safe_torch_load()``: ``weights_only=True``
(tensors, containers, numbers, strings) plus the few DeepSpeed classes its own shards hold; anything else is
refused with a ZeroCheckpointError before it runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LATEST_FILE = "latest"  # DeepSpeed writes the newest tag into this file
TAG_PATTERN = re.compile(r"^global_step(\d+)$")  # the tag Hugging Face's Trainer gives ZeRO states
MODEL_STATES_GLOB = "*_model_states.pt"
OPTIM_STATES_GLOB = "*_optim_states.pt"
MAX_SHARD_SIZE = "5GB"  # Hugging Face's default shard size for save_pretrained
DTYPES = ("float32", "bfloat16", "float16")

# Trainer/DeepSpeed files of a checkpoint that are no part of an inference model folder.
TRAINING_ONLY_FILES = frozenset({
    LATEST_FILE, "zero_to_fp32.py", "zero_to_torch.py", "trainer_state.json", "training_args.bin", "optimizer.pt",
    "scheduler.pt", "scaler.pt",
})
WEIGHT_FILE = re.compile(
    r"^(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$"
)
RNG_FILE = re.compile(r"^rng_state(_\d+)?\.pth$")


class ZeroCheckpointError(ValueError):
    """The folder is not a ZeRO checkpoint DeepSpeed can consolidate; the message says what to do."""


# The classes (module, name) DeepSpeed's own ZeRO shards pickle besides tensors and plain containers: the fp16
# loss scaler in the optimizer states and the ZeRO stage enum. Nothing else is ever unpickled from a shard.
ZERO_SAFE_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
)


@contextlib.contextmanager
def safe_torch_load(folder: Path) -> Iterator[None]:
    """While the block runs, every ``torch.load`` is ``weights_only=True`` (with ZERO_SAFE_GLOBALS allowed):
    a shard that would run code on loading raises ZeroCheckpointError instead."""
    import importlib
    import pickle

    import torch

    allowed = []
    for module, name in ZERO_SAFE_GLOBALS:
        with contextlib.suppress(ImportError, AttributeError):
            allowed.append(getattr(importlib.import_module(module), name))
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise ZeroCheckpointError(
            f"{folder} holds a shard that is not plain tensor data: loading it would run code from the file, so it "
            f"was refused ({first[:300]}). Use only checkpoints written by asr-ft/DeepSpeed that you trust"
        ) from None
    finally:
        torch.load = original


def zero_tags(folder: str | Path) -> list[str]:
    """Tags (sub-folder names) holding ZeRO model-state shards, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    tags = [p.name for p in folder.iterdir() if p.is_dir() and any(p.glob(MODEL_STATES_GLOB))]

    def step(tag: str) -> tuple[int, str]:
        m = TAG_PATTERN.match(tag)
        return (int(m.group(1)) if m else -1, tag)

    return sorted(tags, key=step)


def is_zero_checkpoint(folder: str | Path) -> bool:
    """True when `folder` holds DeepSpeed ZeRO shards (a `global_step*/` folder with model states)."""
    return bool(zero_tags(folder))


def zero_checkpoint_tag(folder: str | Path) -> str:
    """The tag to consolidate: the one named in `latest`, else the highest `global_stepN`.

    Raises ZeroCheckpointError when the folder holds no ZeRO shards or `latest` names a missing tag.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ZeroCheckpointError(f"{folder} is not a folder; pass a checkpoint folder such as checkpoint-40/")
    tags = zero_tags(folder)
    if not tags:
        raise ZeroCheckpointError(
            f"{folder} holds no DeepSpeed ZeRO shards (no global_step*/ folder with {MODEL_STATES_GLOB}); "
            "it is not a ZeRO checkpoint. A checkpoint trained without DeepSpeed (or final/) is already a "
            "normal model folder: export it directly"
        )
    latest = folder / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag not in tags:
            raise ZeroCheckpointError(
                f"{latest} names {tag!r} but {folder} only holds ZeRO shards for {tags}; "
                "the checkpoint is incomplete (interrupted save?): use an earlier checkpoint"
            )
        return tag
    return tags[-1]


def _check_shards(folder: Path, tag: str) -> None:
    shards = folder / tag
    if not any(shards.glob(OPTIM_STATES_GLOB)):
        raise ZeroCheckpointError(
            f"{shards} has model states but no {OPTIM_STATES_GLOB}: the fp32 master weights are missing "
            "(saved with save_only_model?); use the checkpoint's model.safetensors instead"
        )


def _companion_files(folder: Path) -> list[Path]:
    """Top-level files an inference folder needs: config, generation config, tokenizer/processor files."""
    keep = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name in TRAINING_ONLY_FILES or WEIGHT_FILE.match(p.name) or RNG_FILE.match(p.name):
            continue
        keep.append(p)
    return keep


def _set_config_dtype(config_path: Path, dtype: str) -> None:
    """Make config.json name the dtype the weights are written in (from_pretrained(dtype="auto") reads it)."""
    config: dict[str, Any] = json.loads(config_path.read_text())
    changed = False
    for key in ("dtype", "torch_dtype"):
        if key in config and config[key] != dtype:
            config[key] = dtype
            changed = True
    if changed:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _unique_tensors(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop aliases of tied parameters (same object under two names, e.g. Whisper's proj_out and
    embed_tokens): safetensors refuses shared tensors, and from_pretrained ties them again."""
    seen: dict[int, str] = {}
    unique: dict[str, Any] = {}
    for name, tensor in state_dict.items():
        if id(tensor) in seen:
            log.info("zero export: %s is tied to %s; written once", name, seen[id(tensor)])
            continue
        seen[id(tensor)] = name
        unique[name] = tensor
    return unique


def _write_weights(state_dict: dict[str, Any], out: Path, dtype: str) -> list[str]:
    """Write the (lazy) state dict as safetensors shards (+ index when more than one); returns file names."""
    import torch
    from deepspeed.utils.zero_to_fp32 import to_torch_tensor
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch_dtype = getattr(torch, dtype)
    # sizes only: empty tensors are never touched, so no memory is committed for them
    sizes = to_torch_tensor(state_dict, return_empty_tensor=True, dtype=torch_dtype)
    split = split_torch_state_dict_into_shards(
        sizes, filename_pattern="model{suffix}.safetensors", max_shard_size=MAX_SHARD_SIZE
    )
    for shard_file, names in tqdm(split.filename_to_tensors.items(), desc="consolidated shards", disable=None):
        shard = to_torch_tensor({n: state_dict[n] for n in names}, dtype=torch_dtype)
        save_file({n: t.contiguous() for n, t in shard.items()}, str(out / shard_file), metadata={"format": "pt"})
        for n in names:  # free this shard's gathered tensors before the next
            state_dict.pop(n, None)
        del shard
    files = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append("model.safetensors.index.json")
    return files


def consolidate_zero_checkpoint(
    checkpoint_dir: str | Path, out_dir: str | Path, *, dtype: str = "float32", tag: str | None = None
) -> Path:
    """Gather a ZeRO-2/3 checkpoint's fp32 master weights into a normal Hugging Face model folder.

    `out_dir` gets `model.safetensors` (sharded above 5 GB) in `dtype` plus the checkpoint's config,
    generation-config and tokenizer/processor files; it must not exist or be empty, and appears
    complete or not at all (built beside it, then renamed). `tag` picks a ZeRO state (default: the
    one in `latest`). Returns `out_dir`.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ZeroCheckpointError(f"dtype {dtype!r} unknown; choose from {list(DTYPES)}")
    tag = tag or zero_checkpoint_tag(checkpoint_dir)
    if tag not in zero_tags(checkpoint_dir):
        raise ZeroCheckpointError(f"{checkpoint_dir} has no ZeRO shards for tag {tag!r}; it has {zero_tags(checkpoint_dir)}")
    _check_shards(checkpoint_dir, tag)
    if not (checkpoint_dir / "config.json").is_file():
        raise ZeroCheckpointError(
            f"{checkpoint_dir} has ZeRO shards but no config.json; a Hugging Face Trainer checkpoint has one "
            "(save it with the model's save_pretrained, or copy the pretrained model's config.json in)"
        )
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ZeroCheckpointError(f"{out_dir} already exists and is not empty; remove it or choose another folder")

    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise ZeroCheckpointError(
            f"consolidating {checkpoint_dir} needs DeepSpeed ({e}); install it with: pip install 'asr-ft[gpu]'"
        ) from e

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        log.info("zero export: consolidating %s/%s (fp32 master weights) -> %s as %s", checkpoint_dir, tag,
                 out_dir, dtype)
        with safe_torch_load(checkpoint_dir):
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag, lazy_mode=True)
        files = _write_weights(_unique_tensors(dict(state_dict)), tmp, dtype)
        for p in _companion_files(checkpoint_dir):
            shutil.copy2(p, tmp / p.name)
        _set_config_dtype(tmp / "config.json", dtype)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); os.replace needs the name free or an empty folder
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("zero export: wrote %s (%s)", out_dir, ", ".join(files))
    return out_dir


def zero_fp32_weights(checkpoint_dir: str | Path, *, tag: str | None = None,
                      trainable_only: bool = True) -> dict[str, Any]:
    """The fp32 master weights of a ZeRO-2/3 checkpoint by parameter name, as the trained module named them.

    Values are lazy where DeepSpeed allows (ZeRO-3): `value.contiguous()` reads one tensor, so the caller can
    copy weight by weight without a second fp32 copy of the model in RAM. `trainable_only` leaves out frozen
    parameters: ZeRO keeps no fp32 master of those, only their 16-bit training copy (take them from the
    pretrained model instead). Tied weights appear under each of their names. `tag` as in
    `consolidate_zero_checkpoint`. Needs no GPU.
    """
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag or zero_checkpoint_tag(checkpoint_dir)
    if tag not in zero_tags(checkpoint_dir):
        raise ZeroCheckpointError(f"{checkpoint_dir} has no ZeRO shards for tag {tag!r}; it has {zero_tags(checkpoint_dir)}")
    _check_shards(checkpoint_dir, tag)
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise ZeroCheckpointError(
            f"reading the fp32 master weights of {checkpoint_dir} needs DeepSpeed ({e}); install it with: "
            "pip install 'asr-ft[gpu]'"
        ) from e
    log.info("zero weights: reading the fp32 master weights of %s/%s%s", checkpoint_dir, tag,
             " (trainable parameters)" if trainable_only else "")
    with safe_torch_load(checkpoint_dir):
        return dict(get_fp32_state_dict_from_zero_checkpoint(
            str(checkpoint_dir), tag=tag, exclude_frozen_parameters=trainable_only, lazy_mode=True))
