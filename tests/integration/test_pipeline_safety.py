"""Pipeline safety: every section of a pipeline file checked before the first step, no flag abbreviations, a
stage run alone refusing to replace results made with other settings, and `asr-ft status`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from common.core.stage import MANIFEST
from common.core.store import open_store
from jobs.prepare.__main__ import main as prepare_main
from jobs.run.__main__ import main as run_main
from jobs.status import stage_states
from jobs.status.__main__ import main as status_main


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in list(os.environ):
        if var.startswith("ASRFT_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("ASRFT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def data(tmp_path) -> Path:
    audio = tmp_path / "data" / "audio"
    audio.mkdir(parents=True)
    for i in range(3):
        t = np.arange(16000) / 16000
        sf.write(audio / f"u{i}.wav", (0.3 * np.sin(2 * np.pi * (300 + 50 * i) * t)).astype(np.float32), 16000)
    (tmp_path / "data" / "train.csv").write_text("audio_id,text\nu0,你好\nu1,世界\nu2,再见\n", encoding="utf-8")
    return tmp_path / "data"


# ------------------------------------------------------------------------------------------- the pipeline file


PIPELINE = """\
run_id: safe
artifacts: {artifacts}
prepare: {{train_csv: {data}/train.csv, audio_dir: {data}/audio, test_ratio: 0.34}}
pretrained: {{model: "bundled:whisper-base"}}
extract: {{}}
finetune: {{epochs: 1, learning_rate: -1}}
export: {{}}
evaluate: {{beam_size: 2, max_new_token: 8}}
"""


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_typo_in_the_last_section_stops_the_run_before_the_first_step(tmp_path, data, capsys, dry_run):
    config = tmp_path / "pipeline.yaml"
    config.write_text(PIPELINE.format(artifacts=tmp_path / "runs", data=data), encoding="utf-8")
    rc = run_main(["--config", str(config), *(["--dry-run"] if dry_run else [])])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{config}: section 'evaluate', key 'max_new_token': not a setting of evaluate" in err
    assert f"{config}: section 'finetune', key 'learning_rate'" in err  # every problem at once
    assert "2 problem(s)" in err and "nothing was run" in err
    assert not (tmp_path / "runs").exists()  # prepare never started


def test_a_valid_pipeline_passes_the_check(tmp_path, data, capsys):
    config = tmp_path / "pipeline.yaml"
    config.write_text(PIPELINE.format(artifacts=tmp_path / "runs", data=data)
                      .replace(", learning_rate: -1", "").replace("max_new_token", "max_new_tokens"), encoding="utf-8")
    assert run_main(["--config", str(config), "--dry-run"]) == 0
    assert "asr-ft evaluate" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- abbreviations


@pytest.mark.parametrize("command, flag", [("finetune", "--epoch"), ("prepare", "--train-c"), ("evaluate", "--beam"),
                                           ("run", "--dry")])
def test_abbreviated_flags_are_rejected(command, flag, capsys):
    from jobs.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, flag, "3"])
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- overwriting


def prepare(data: Path, tmp_path: Path, *extra: str) -> int:
    return prepare_main(["--train-csv", str(data / "train.csv"), "--audio-dir", str(data / "audio"),
                         "--artifacts", str(tmp_path / "runs"), "--run-id", "r1", "--test-ratio", "0.34", *extra])


def test_a_stage_alone_refuses_to_replace_results_made_with_other_settings(tmp_path, data, caplog, monkeypatch):
    manifest = tmp_path / "runs" / "r1" / "prepare" / MANIFEST
    assert prepare(data, tmp_path) == 0
    first = json.loads(manifest.read_text())
    assert prepare(data, tmp_path) == 0  # same settings: skipped
    assert prepare(data, tmp_path, "--min-seconds", "0.2", "--seed", "3") == 2
    assert "already holds prepare results made with other settings" in caplog.text
    assert "min_seconds: 0.1 → 0.2" in caplog.text and "seed: 0 → 3" in caplog.text and "--force" in caplog.text
    assert json.loads(manifest.read_text()) == first  # untouched
    assert stage_states(open_store(str(tmp_path / "runs")), "r1")[1].state == "done"  # a refusal is no failure

    assert prepare(data, tmp_path, "--min-seconds", "0.2", "--force") == 0
    assert json.loads(manifest.read_text())["settings"]["min_seconds"] == 0.2
    monkeypatch.setenv("ASRFT_PIPELINE", "1")  # a step of `asr-ft run`: the pipeline file changed, redo it
    assert prepare(data, tmp_path, "--min-seconds", "0.3") == 0
    assert json.loads(manifest.read_text())["settings"]["min_seconds"] == 0.3


def test_new_inputs_with_the_same_settings_are_redone(tmp_path, data):
    assert prepare(data, tmp_path) == 0
    with open(data / "train.csv", "a", encoding="utf-8") as f:
        f.write("u0.wav,又一个\n")  # a duplicate id: rejected, but the CSV changed
    assert prepare(data, tmp_path) == 0
    assert json.loads((tmp_path / "runs" / "r1" / "prepare" / "stats.json").read_text())["rejected"]["train"] == 1


# ------------------------------------------------------------------------------------------- status


def states(tmp_path: Path, run: str = "r1") -> dict[str, str]:
    return {s.stage: s.state for s in stage_states(open_store(str(tmp_path / "runs")), run)}


def test_status_done_stale_failed_running(tmp_path, data, capsys):
    runs = tmp_path / "runs"
    assert prepare(data, tmp_path) == 0
    assert states(tmp_path)["prepare"] == "done" and states(tmp_path)["extract"] == "—"

    # extract made from another prepare: stale
    (runs / "r1" / "extract").mkdir()
    (runs / "r1" / "extract" / MANIFEST).write_text(json.dumps({"fingerprint": "e" * 64, "inputs": {
        "prepare": "0" * 64}, "finished": "2026-01-01T00:00:00+00:00", "seconds": 1}))
    assert states(tmp_path)["extract"] == "stale"

    # a failed attempt leaves .failed.json with its message
    assert prepare_main(["--train-csv", str(data / "missing.csv"), "--audio-dir", str(data / "audio"),
                         "--artifacts", str(runs), "--run-id", "r2"]) == 2
    failing = data / "bad.csv"
    failing.write_text("audio_id,text\nnothing,没有\n", encoding="utf-8")
    assert prepare_main(["--train-csv", str(failing), "--audio-dir", str(data / "audio"),
                         "--artifacts", str(runs), "--run-id", "r3"]) == 2
    assert (runs / "r3" / ".state" / "prepare.failed.json").is_file()
    assert not (runs / "r3" / ".state" / "prepare.running.json").exists()
    assert states(tmp_path, "r3")["prepare"] == "failed"

    # running: a live process holds the marker; a dead one means the attempt was killed
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        import socket

        marker = runs / "r1" / ".state" / "export.running.json"
        marker.parent.mkdir(exist_ok=True)
        marker.write_text(json.dumps({"host": socket.gethostname(), "pid": child.pid, "started": "now"}))
        assert states(tmp_path)["export"] == "running"
    finally:
        child.communicate(b"")
    assert states(tmp_path)["export"] == "failed"  # the process is gone

    assert status_main(["--artifacts", str(runs)]) == 0
    listing = capsys.readouterr().out
    assert "r1" in listing and "prepare:done" in listing and "extract:stale" in listing and "r3" in listing
    assert "r2" not in listing  # a run that never started a stage (bad input before it) is not a run
    assert status_main(["r1", "--artifacts", str(runs)]) == 0
    one = capsys.readouterr().out
    assert "prepare" in one and "stale" in one and "prepare changed since" in one
    assert status_main(["nope", "--artifacts", str(runs)]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


def test_status_takes_the_run_as_a_flag_too(tmp_path, data, capsys):
    assert prepare(data, tmp_path) == 0
    assert status_main(["--run-id", "r1", "--artifacts", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run r1") and "prepare" in out and "done" in out
