"""The fault injector (common/core/faults.py) and complete-or-absent checkpoints (common/training/checkpoints.py):
what a torn, truncated or unsealed checkpoint looks like to resume, and what each injected fault does."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common.core import faults
from common.core.files import atomic_write_bytes
from common.training import checkpoints as ckpts

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("spec", "rules"),
    [
        ("a:kill", [("a", "kill", 1)]),
        ("finetune/checkpoint.*:enospc:2,x:term", [("finetune/checkpoint.*", "enospc", 2), ("x", "term", 1)]),
        ("", []),
    ],
)
def test_parse(spec, rules):
    assert faults.parse(spec) == rules


@pytest.mark.parametrize("spec", ["a", "a:explode", "a:kill:x", "a:kill:1:2"])
def test_parse_refuses_malformed(spec):
    with pytest.raises(faults.FaultSpecError, match="POINT:ACTION"):
        faults.parse(spec)


@pytest.fixture
def fresh_faults(monkeypatch):
    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setattr(faults, "_scope", "")
    for var in (faults.ENV, faults.TRACE_ENV):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(("spec", "hits_before_error"), [("files.atomic_write:enospc", 0),
                                                         ("prepare/files.*:enospc:3", 2),
                                                         ("other/files.atomic_write:enospc", None)])
def test_enospc_at_the_nth_hit_leaves_no_file(tmp_path, monkeypatch, fresh_faults, spec, hits_before_error):
    monkeypatch.setenv(faults.ENV, spec)
    faults.set_scope("prepare")
    written = 0
    for i in range(4):
        try:
            atomic_write_bytes(tmp_path / f"f{i}.json", b"{}")
            written += 1
        except OSError as e:
            assert e.errno == errno.ENOSPC and "injected at prepare/files.atomic_write" in str(e)
            break
    assert written == (4 if hits_before_error is None else hits_before_error)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"f{i}.json" for i in range(written)]  # no temp file


def test_trace_names_each_point_with_its_stage(tmp_path, monkeypatch, fresh_faults):
    monkeypatch.setenv(faults.TRACE_ENV, str(tmp_path / "trace"))
    faults.set_scope("export")
    atomic_write_bytes(tmp_path / "a", b"1")
    faults.fault_point("store.put")
    assert (tmp_path / "trace").read_text().splitlines() == ["export/files.atomic_write", "export/store.put"]


@pytest.mark.parametrize(("action", "signum"), [("kill", signal.SIGKILL), ("term", signal.SIGTERM)])
def test_kill_and_term_end_the_process_there(tmp_path, action, signum):
    code = ("from common.core.faults import fault_point\n"
            "print('before', flush=True)\nfault_point('p')\nprint('after', flush=True)\n")
    env = {**os.environ, faults.ENV: f"p:{action}", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signum and proc.stdout == "before\n"


# --- checkpoints: complete or absent ---------------------------------------------------------------------------


def write_checkpoint(folder: Path, step: int, kind: str = "trainer") -> Path:
    """A checkpoint written the way both loops do: staging folder → files → publish (fsync, marker, rename)."""
    final = folder / f"checkpoint-{step}"
    tmp = ckpts.staging_folder(final)
    tmp.mkdir(parents=True)
    names = ckpts.REQUIRED[kind] + (("model.safetensors",) if kind == "fast" else ())
    for name in names + ("optimizer.pt",):
        data = json.dumps({"global_step": step}) if name.endswith(".json") else f"weights of step {step}" * 50
        (tmp / name).write_text(data)
    return ckpts.publish(tmp, final)


def tear(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flip":  # same size, other content: only the checksum can tell
        path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    elif how == "delete":
        path.unlink()


@pytest.mark.parametrize(
    ("file", "how", "problem"),
    [
        ("trainer_state.json", "empty", "trainer_state.json has 0 bytes"),
        ("trainer_state.json", "truncate", "trainer_state.json has"),
        ("optimizer.pt", "flip", "optimizer.pt does not match its checksum"),
        ("trainable.safetensors", "truncate", "trainable.safetensors has"),
        ("trainable.safetensors", "delete", "trainable.safetensors is missing"),
        (ckpts.MARKER, "delete", "no completion marker"),
        (ckpts.MARKER, "truncate", "unreadable completion marker"),
    ],
)
def test_a_torn_latest_checkpoint_is_skipped_for_the_one_before(tmp_path, caplog, file, how, problem):
    folder = tmp_path / "checkpoints"
    write_checkpoint(folder, 2)
    latest = write_checkpoint(folder, 4)
    assert ckpts.last_complete(folder, "trainer") == latest
    tear(latest / file, how)
    with caplog.at_level(logging.WARNING):
        assert ckpts.last_complete(folder, "trainer") == folder / "checkpoint-2"
    assert f"skipping checkpoint {latest}: {problem}" in caplog.text


def test_a_state_file_sealed_unreadable_is_refused(tmp_path):
    ckpt = write_checkpoint(tmp_path, 3)
    (ckpt / "trainer_state.json").write_text("{not json")
    ckpts.seal(ckpt)  # sizes and checksums now match the broken file
    assert ckpts.verify(ckpt, "trainer").startswith("unreadable trainer_state.json")


@pytest.mark.parametrize("point", ["checkpoint.before_marker", "checkpoint.before_rename"])
def test_a_save_that_fails_before_publishing_leaves_no_checkpoint(tmp_path, monkeypatch, fresh_faults, point):
    monkeypatch.setenv(faults.ENV, f"{point}:enospc")
    with pytest.raises(OSError):
        write_checkpoint(tmp_path, 5)
    assert ckpts.checkpoints(tmp_path) == []  # only the hidden staging folder, which the next save replaces
    monkeypatch.delenv(faults.ENV)
    assert ckpts.last_complete(tmp_path, "trainer") is None
    assert ckpts.verify(write_checkpoint(tmp_path, 5), "trainer") is None


def test_the_marker_lists_every_file_with_size_and_sha256(tmp_path):
    from common.core.store import sha256_file

    ckpt = write_checkpoint(tmp_path, 7, kind="fast")
    marker = json.loads((ckpt / ckpts.MARKER).read_text())["files"]
    assert sorted(marker) == sorted(p.name for p in ckpt.iterdir() if p.name != ckpts.MARKER)
    for name, entry in marker.items():
        assert entry == {"size": (ckpt / name).stat().st_size, "sha256": sha256_file(ckpt / name)}
    assert ckpts.verify(ckpt, "fast") is None and ckpts.verify(ckpt, "trainer") is not None  # kinds never mix


def test_rotate_keeps_the_newest_and_drops_unsealed_older_ones(tmp_path):
    for step in (1, 2, 3, 4):
        write_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-2" / ckpts.MARKER).unlink()  # an interrupted save among them
    removed = ckpts.rotate(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["checkpoint-1", "checkpoint-2"]
    assert [p.name for p in ckpts.checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
