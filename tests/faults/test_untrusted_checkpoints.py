"""A crafted checkpoint cannot run code: ZeRO shards are read through a weights-only unpickler, and no module
of asr-ft calls torch.load without weights_only=True."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this runs a shell command that creates a file (what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def crafted_zero_checkpoint(folder: Path, marker: Path) -> Path:
    """A folder that looks like a Trainer + DeepSpeed ZeRO checkpoint whose shards carry the payload."""
    import torch

    shards = folder / "global_step1"
    shards.mkdir(parents=True)
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"buffer_names": [], "module": {}, "evil": _Payload(marker)}, shards / name)
    (folder / "latest").write_text("global_step1")
    (folder / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    return folder


def test_the_crafted_shard_is_live(tmp_path):
    """Control: a plain (pickle-trusting) torch.load of the shard runs the payload — so the tests below mean
    something."""
    marker = tmp_path / "owned"
    ckpt = crafted_zero_checkpoint(tmp_path / "ckpt", marker)
    shard = next((ckpt / "global_step1").glob("*model_states.pt"))
    code = f"import torch; torch.load({str(shard)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=False, timeout=120, capture_output=True)
    assert marker.exists()


@pytest.mark.parametrize("reader", ["zero_fp32_weights", "consolidate_zero_checkpoint"])
def test_a_crafted_zero_checkpoint_does_not_execute(tmp_path, reader):
    from common.training import zero_export

    marker = tmp_path / "owned"
    ckpt = crafted_zero_checkpoint(tmp_path / "ckpt", marker)
    call = getattr(zero_export, reader)
    args = (ckpt,) if reader == "zero_fp32_weights" else (ckpt, tmp_path / "out")
    with pytest.raises(zero_export.ZeroCheckpointError, match="refused"):
        call(*args)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_torch_load_is_back_to_normal_after_a_refusal(tmp_path):
    import torch

    from common.training import zero_export

    original = torch.load
    with pytest.raises(zero_export.ZeroCheckpointError):
        zero_export.zero_fp32_weights(crafted_zero_checkpoint(tmp_path / "c", tmp_path / "m"))
    assert torch.load is original


def test_every_torch_load_in_the_code_is_weights_only():
    """Whatever a user can hand asr-ft (checkpoints, models, caches) is read without running pickled code."""
    calls = []
    for path in [*REPO.glob("common/**/*.py"), *REPO.glob("jobs/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((path.relative_to(REPO).as_posix(), node.lineno, safe))
    assert calls, "no torch.load found: the scan is broken"
    assert [c for c in calls if not c[2]] == []
