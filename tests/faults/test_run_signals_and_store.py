"""`asr-ft run` passes SIGTERM on to the running step and waits for it; the store mirrors checkpoint rotation in
the bucket (marker first on delete, last on upload) and cleans the temp files a killed run left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from faultkit import REPO, child_env
from test_run_lock import wait_stopped

from common.training import checkpoints as ckpts


def children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
            for c in (t / "children").read_text().split()]


@pytest.mark.slow
def test_sigterm_to_asr_ft_run_reaches_the_step_which_saves_and_stops(tmp_path):
    from test_finetune import prepared_run

    artifacts, _ = prepared_run(tmp_path, 10, "r", extract_epochs=3)
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump({"run_id": "r", "artifacts": str(artifacts), "finetune": {
        "device": "cpu", "threads": 1, "mode": "lora", "lora_r": 4, "batch": 2, "grad_accum": 1, "lr": 1e-3,
        "frozen_encoder_layers": 1, "max_steps": 6, "save_steps": 4, "context_seconds": 2}}))
    env = child_env(ASRFT_FAULT="finetune/train.step_end:stop:2")  # the step freezes itself mid-training
    run = subprocess.Popen([sys.executable, "-m", "jobs.run", "--config", str(cfg), "--stages", "finetune"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not children(run.pid):
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.05)  # polling interval of a process watch, not a synchronisation
    step = children(run.pid)[0]
    wait_stopped(step)
    run.send_signal(signal.SIGTERM)  # what Kubernetes does to the pod's main process
    deadline = time.monotonic() + 30
    while not _pending_term(step):  # the frozen step holds the passed-on SIGTERM as pending
        assert time.monotonic() < deadline, "the run did not pass SIGTERM on"
        time.sleep(0.05)  # polling interval of a process watch, not a synchronisation
    os.kill(step, signal.SIGCONT)
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 143, out[-3000:]
    assert "SIGTERM received: passed on to finetune" in out
    assert "stopped at step 2; checkpoint saved" in out
    assert ckpts.verify(artifacts / "r" / "finetune" / "checkpoints" / "checkpoint-2", "trainer") is None
    assert not Path(f"/proc/{step}").exists()  # no step left running on its own


def _pending_term(pid: int) -> bool:
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    pending = int(fields.get("SigPnd", "0"), 16) | int(fields.get("ShdPnd", "0"), 16)
    return bool(pending & (1 << (signal.SIGTERM - 1)))


def test_sync_mirrors_rotation_in_the_bucket_marker_last_up_and_first_down(s3_server, tmp_path, monkeypatch):
    import boto3

    from common.core.settings import S3Settings, load_settings
    from common.core.stage import StageContext
    from common.core.store import S3Store
    from jobs.prepare import PrepareSettings

    for k, v in {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t"}.items():
        monkeypatch.setenv(k, v)
    boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="rot")
    s3 = S3Settings(endpoint_url=s3_server, region="us-east-1")
    settings = load_settings(PrepareSettings, {"artifacts": "s3://rot/runs", "run_id": "r", "train_csv": "x",
                                               "audio_dir": ".", "s3": s3.model_dump(mode="json")})
    store = S3Store("s3://rot/runs", s3)
    calls: list[tuple[str, str]] = []
    put, delete = store.put_file, store.delete_prefix
    monkeypatch.setattr(store, "put_file", lambda p, k: (calls.append(("put", k)), put(p, k))[1])
    monkeypatch.setattr(store, "delete_prefix", lambda k: (calls.append(("delete", k)), delete(k))[1])
    ctx = StageContext("finetune", settings, store, "r", tmp_path / "out")
    folder = ctx.out / "checkpoints"
    from test_injector_and_checkpoints import write_checkpoint

    for step in (1, 2, 3):
        write_checkpoint(folder, step)
        ckpts.rotate(folder, 2)
        ctx.sync()
    remote = {k.split("/")[3] for k in store.list("r/finetune/checkpoints")}
    assert remote == {"checkpoint-2", "checkpoint-3"}  # checkpoint-1 rotated away in the bucket too
    for step in (1, 2, 3):
        mine = [(op, k.rsplit("/", 1)[1]) for op, k in calls if f"checkpoint-{step}/" in k]
        puts = [name for op, name in mine if op == "put"]
        assert puts[-1] == ckpts.MARKER and len(puts) == len(set(puts))  # marker last, each file once
        deletes = [name for op, name in mine if op == "delete"]
        assert deletes == ([] if step > 1 else [ckpts.MARKER, *sorted(set(puts) - {ckpts.MARKER})])


def test_a_stage_removes_the_temp_files_a_killed_run_left(tmp_path, monkeypatch):
    from common.core.settings import load_settings
    from common.core.stage import run_stage
    from jobs.prepare import PrepareSettings

    monkeypatch.setenv("ASRFT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs" / "r" / "export"
    leftovers = [out / ".model.tmp-k2j3", out / "ct2" / ".ct2.tmp-9x", out / ".metrics.json.abc.tmp",
                 out / "checkpoints" / ".checkpoint-4.tmp", tmp_path / "cache" / ".whisper-base-ct2-1.0.tmp-old"]
    for p in leftovers:
        if p.name.endswith(".abc.tmp"):  # a file
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("x")
        else:  # a folder holding a (part of a) model
            p.mkdir(parents=True)
            (p / "model.bin").write_bytes(b"w")
    old = time.time() - 7 * 3600
    os.utime(leftovers[-1], (old, old))
    fresh = tmp_path / "cache" / ".someone-elses.tmp-now"  # a live conversion of another run: kept
    fresh.mkdir()
    settings = load_settings(PrepareSettings, {"artifacts": str(tmp_path / "runs"), "run_id": "r", "train_csv": "x",
                                               "audio_dir": "."})
    assert run_stage("export", settings, {}, lambda ctx: {}) == 0
    assert [p for p in leftovers if p.exists()] == [] and fresh.exists()
