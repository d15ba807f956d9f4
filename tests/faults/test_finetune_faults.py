"""finetune under faults, on the tiny random Whisper of tests/integration (LoRA, CPU, 6 steps, a checkpoint every
2): a torn file in the newest checkpoint, kill -9 at each publish point of a checkpoint save (injected, not timed),
SIGTERM mid-training. Each re-run must end with final/ bit-identical to an uninterrupted run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from faultkit import run_module
from test_finetune import finetune_args, prepared_run

from common.core.stage import MANIFEST
from common.core.store import sha256_file
from common.training import checkpoints as ckpts

STEPS, SAVE = 6, 2


def args(common: list[str]) -> list[str]:
    return finetune_args(common, "--max-steps", str(STEPS), "--save-steps", str(SAVE), "--save-total-limit", "10",
                         "--context-seconds", "2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A prepared run (prepare, pretrained, extract) and an uninterrupted finetune of it: (root, sha256 of
    final/model.safetensors)."""
    from jobs.finetune.__main__ import main

    root = tmp_path_factory.mktemp("ref")
    artifacts, common = prepared_run(root, 10, "r", extract_epochs=3)
    assert main(args(common)) == 0
    out = artifacts / "r" / "finetune"
    assert [p.name for p in ckpts.checkpoints(out / "checkpoints")] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    return root, sha256_file(out / "final" / "model.safetensors")


def copy_run(reference, dest: Path, keep_finetune: bool) -> tuple[Path, list[str]]:
    """The reference's run folder copied to ``dest`` (finetune's outputs kept or removed)."""
    root, _ = reference
    shutil.copytree(root / "runs", dest / "runs")
    out = dest / "runs" / "r" / "finetune"
    if not keep_finetune:
        shutil.rmtree(out)
    return out, ["--artifacts", str(dest / "runs"), "--run-id", "r"]


def final_sha(out: Path) -> str:
    assert (out / MANIFEST).is_file()
    return sha256_file(out / "final" / "model.safetensors")


@pytest.mark.parametrize(
    ("file", "how"),
    [("trainer_state.json", "empty"), pytest.param("trainer_state.json", "truncate", marks=pytest.mark.slow),
     ("optimizer.pt", "flip"), pytest.param("trainable.safetensors", "truncate", marks=pytest.mark.slow)],
)
def test_torn_file_in_the_newest_checkpoint_resumes_from_the_one_before(reference, tmp_path, capsys, file, how):
    from test_injector_and_checkpoints import tear

    from jobs.finetune.__main__ import main

    out, common = copy_run(reference, tmp_path, keep_finetune=True)
    for p in (out / MANIFEST, out / "trainer_state.json"):
        p.unlink()
    shutil.rmtree(out / "final")  # as if killed after the last checkpoint, before final/
    tear(out / "checkpoints" / "checkpoint-6" / file, how)
    capsys.readouterr()
    assert main(args(common)) == 0
    err = capsys.readouterr().err
    assert f"skipping checkpoint {out / 'checkpoints' / 'checkpoint-6'}: {file}" in err
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-4'}" in err
    assert final_sha(out) == reference[1]
    assert ckpts.verify(out / "checkpoints" / "checkpoint-6", "trainer") is None  # written again, whole


KILL_POINTS = [
    pytest.param("finetune/checkpoint.before_marker:kill:2", "checkpoint-2", id="before-marker"),
    pytest.param("finetune/checkpoint.before_rename:kill:3", "checkpoint-4",
                 marks=pytest.mark.slow, id="before-rename"),
    pytest.param("finetune/files.publish_dir:kill:1", None, marks=pytest.mark.slow, id="first-publish"),
    pytest.param("finetune/stage.manifest:kill", "checkpoint-6", marks=pytest.mark.slow, id="before-manifest"),
]


@pytest.mark.parametrize(("fault", "resumes_from"), KILL_POINTS)
def test_kill_at_a_publish_point_then_rerun_gives_the_same_model(reference, tmp_path, capsys, fault, resumes_from):
    from jobs.finetune.__main__ import main

    out, common = copy_run(reference, tmp_path, keep_finetune=False)
    killed = run_module("jobs.finetune", args(common), ASRFT_FAULT=fault)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (out / MANIFEST).exists()
    for ckpt in ckpts.checkpoints(out / "checkpoints"):  # every visible checkpoint is whole, or is skipped
        assert ckpts.verify(ckpt, "trainer") is None or not (ckpt / ckpts.MARKER).exists()
    capsys.readouterr()
    assert main(args(common)) == 0
    err = capsys.readouterr().err
    if resumes_from:
        assert f"resuming from {out / 'checkpoints' / resumes_from}" in err
    else:
        assert "resuming from" not in err
    assert final_sha(out) == reference[1]
    assert not list(out.rglob(".*.tmp")) and not list(out.rglob(".*.staging"))  # no temp file left behind


def test_sigterm_mid_training_saves_a_checkpoint_exits_143_and_resumes(reference, tmp_path, capsys):
    from jobs.finetune.__main__ import main

    out, common = copy_run(reference, tmp_path, keep_finetune=False)
    stopped = run_module("jobs.finetune", args(common), ASRFT_FAULT="finetune/train.step_end:term:3")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    ckpt = out / "checkpoints" / "checkpoint-3"  # off the save schedule: saved because of the signal
    assert ckpts.verify(ckpt, "trainer") is None
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 3
    assert f"stopped at step 3; checkpoint saved: {ckpt}" in stopped.stderr
    assert "finetune failed: stopped by a signal at step 3" in stopped.stderr
    assert "Traceback" not in stopped.stderr and not (out / MANIFEST).exists() and not (out / "final").exists()
    capsys.readouterr()
    assert main(args(common)) == 0
    assert f"resuming from {ckpt}" in capsys.readouterr().err
    assert final_sha(out) == reference[1]


@pytest.mark.slow
def test_force_starts_clean_without_a_manifest(reference, tmp_path, capsys):
    """--force after a crash (no manifest): the old checkpoints go, training starts from step 0."""
    from jobs.finetune.__main__ import main

    out, common = copy_run(reference, tmp_path, keep_finetune=True)
    (out / MANIFEST).unlink()
    (out / "checkpoints" / "checkpoint-6" / "trainer_state.json").write_text("")  # would break a resume
    capsys.readouterr()
    assert main([*args(common), "--force"]) == 0
    assert "resuming from" not in capsys.readouterr().err
    assert final_sha(out) == reference[1]


def test_a_whole_checkpoint_of_another_model_is_one_clear_message(reference, tmp_path, capsys):
    from safetensors.torch import save_file

    from jobs.finetune.__main__ import main

    out, common = copy_run(reference, tmp_path, keep_finetune=True)
    for p in (out / MANIFEST, out / "trainer_state.json"):
        p.unlink()
    ckpt = out / "checkpoints" / "checkpoint-6"
    import torch

    save_file({"not.a.parameter": torch.zeros(2)}, str(ckpt / "trainable.safetensors"))
    ckpts.seal(ckpt)  # intact as files: only loading can tell
    capsys.readouterr()
    assert main(args(common)) == 1
    err = capsys.readouterr().err
    assert "finetune failed: checkpoint" in err and "does not fit this model/mode" in err and "--force" in err
    assert "Traceback" not in err
