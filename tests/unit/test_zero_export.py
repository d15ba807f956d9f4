"""ZeRO checkpoint detection and the errors of consolidate_zero_checkpoint (no GPU, no real shards).

The consolidation itself (DeepSpeed's zero_to_fp32 on real ZeRO-3 shards, loaded back with
from_pretrained) is tested on the GPU machine: tests/gpu/test_zero_offload.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.training.zero_export import (
    ZeroCheckpointError,
    _companion_files,
    consolidate_zero_checkpoint,
    is_zero_checkpoint,
    zero_checkpoint_tag,
    zero_tags,
)

MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
OPTIM_STATES = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"


def make_checkpoint(root: Path, files: dict[str, str]) -> Path:
    """A folder with the given relative files (placeholder contents: only names matter here)."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


ZERO = {
    "config.json": "{}",
    "latest": "global_step20\n",
    f"global_step10/{MODEL_STATES}": "",
    f"global_step10/{OPTIM_STATES}": "",
    f"global_step20/{MODEL_STATES}": "",
    f"global_step20/{OPTIM_STATES}": "",
}


@pytest.mark.parametrize(
    "files, expected_tags",
    [
        (ZERO, ["global_step10", "global_step20"]),
        ({f"global_step9/{MODEL_STATES}": "", f"global_step10/{MODEL_STATES}": ""},
         ["global_step9", "global_step10"]),  # numeric order, not string order
        ({"config.json": "{}", "model.safetensors": ""}, []),  # a plain Hugging Face model folder
        ({"global_step5/notes.txt": ""}, []),  # a global_step folder without model states
        ({}, []),
    ],
    ids=["zero", "numeric-order", "hf-model", "no-model-states", "empty"],
)
def test_zero_checkpoint_detection(tmp_path, files, expected_tags):
    folder = make_checkpoint(tmp_path / "checkpoint", files)
    assert zero_tags(folder) == expected_tags
    assert is_zero_checkpoint(folder) == bool(expected_tags)


def test_missing_folder_is_not_a_zero_checkpoint(tmp_path):
    assert not is_zero_checkpoint(tmp_path / "absent")
    with pytest.raises(ZeroCheckpointError, match="not a folder"):
        zero_checkpoint_tag(tmp_path / "absent")


@pytest.mark.parametrize(
    "latest, expected",
    [("global_step10\n", "global_step10"), (None, "global_step20"), ("global_step20", "global_step20")],
)
def test_tag_comes_from_latest_else_the_highest_step(tmp_path, latest, expected):
    files = {k: v for k, v in ZERO.items() if k != "latest"}
    if latest is not None:
        files["latest"] = latest
    assert zero_checkpoint_tag(make_checkpoint(tmp_path / "c", files)) == expected


@pytest.mark.parametrize(
    "files, kwargs, message",
    [
        ({"config.json": "{}", "model.safetensors": ""}, {}, "not a ZeRO checkpoint.*export it directly"),
        ({**ZERO, "latest": "global_step30"}, {}, "names 'global_step30'.*incomplete"),
        ({k: v for k, v in ZERO.items() if OPTIM_STATES not in k}, {}, "fp32 master weights are missing"),
        ({k: v for k, v in ZERO.items() if k != "config.json"}, {}, "no config.json"),
        (ZERO, {"tag": "global_step15"}, "no ZeRO shards for tag 'global_step15'"),
        (ZERO, {"dtype": "int8"}, "dtype 'int8' unknown"),
    ],
    ids=["hf-model", "latest-names-missing-tag", "no-optimizer-states", "no-config", "unknown-tag", "bad-dtype"],
)
def test_consolidate_refuses_what_it_cannot_convert(tmp_path, files, kwargs, message):
    folder = make_checkpoint(tmp_path / "checkpoint", files)
    out = tmp_path / "model"
    with pytest.raises(ZeroCheckpointError, match=message):
        consolidate_zero_checkpoint(folder, out, **kwargs)
    assert not out.exists()  # nothing half-written
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_consolidate_refuses_a_non_empty_output_folder(tmp_path):
    folder = make_checkpoint(tmp_path / "checkpoint", ZERO)
    out = make_checkpoint(tmp_path / "model", {"model.safetensors": "old"})
    with pytest.raises(ZeroCheckpointError, match="already exists and is not empty"):
        consolidate_zero_checkpoint(folder, out)
    assert (out / "model.safetensors").read_text() == "old"


@pytest.mark.parametrize(
    "name, kept",
    [
        ("config.json", True),
        ("generation_config.json", True),
        ("preprocessor_config.json", True),
        ("tokenizer.json", True),
        ("tokenizer_config.json", True),
        ("special_tokens_map.json", True),
        ("vocab.json", True),
        ("merges.txt", True),
        ("model.safetensors", False),  # the 16-bit copy: replaced by the consolidated weights
        ("model-00001-of-00002.safetensors", False),
        ("model.safetensors.index.json", False),
        ("pytorch_model.bin", False),
        ("adapter_model.safetensors", False),
        ("trainer_state.json", False),
        ("training_args.bin", False),
        ("scheduler.pt", False),
        ("optimizer.pt", False),
        ("rng_state.pth", False),
        ("rng_state_3.pth", False),
        ("latest", False),
        ("zero_to_fp32.py", False),
    ],
)
def test_companion_files_are_the_inference_ones(tmp_path, name, kept):
    folder = make_checkpoint(tmp_path / "checkpoint", {**ZERO, name: "x"})
    assert (name in [p.name for p in _companion_files(folder)]) == kept
    assert "global_step20" not in [p.name for p in _companion_files(folder)]  # folders never copied
