"""One run per run-id: a second run on the same run-id refuses at once (who holds it, since when), the first is
untouched; a dead holder's lock is taken over. Local folder (OS file lock) and S3 (conditional-put lease)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
from faultkit import REPO, child_env, run_module

from common.core.runlock import LOCAL_LOCK, S3_LEASE, RunLocked, _S3Lease, run_lock
from common.core.settings import S3Settings
from common.core.stage import MANIFEST
from common.core.store import LocalStore, S3Store

REFUSE_WITHIN_S = 5.0
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

HOLDER = """
import sys
from common.core.runlock import run_lock
from common.core.store import open_store
from common.core.settings import S3Settings
store = open_store(sys.argv[1], S3Settings(endpoint_url=sys.argv[2] or None, lease_seconds=float(sys.argv[3])))
with run_lock(store, "r", "finetune", ttl=float(sys.argv[3])):
    print("held", flush=True)
    sys.stdin.readline()
"""


def start_holder(artifacts: str, endpoint: str = "", ttl: float = 300) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, artifacts, endpoint, str(ttl)], cwd=REPO,
                            env=child_env(**CREDS), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # blocks until the holder has the lock (or dies)
    assert line == "held\n", proc.stderr.read()
    return proc


def quick_stage(artifacts: str, s3: S3Settings | None = None) -> tuple[int, float]:
    from common.core.settings import load_settings
    from common.core.stage import run_stage
    from jobs.prepare import PrepareSettings  # any stage's settings will do

    values = {"artifacts": artifacts, "run_id": "r", "train_csv": "x.csv", "audio_dir": "."}
    if s3 is not None:
        values["s3"] = s3.model_dump(mode="json")
    settings = load_settings(PrepareSettings, values)
    t0 = time.monotonic()

    def body(ctx):
        (ctx.out / "out.txt").write_text("second run")
        return {}

    return run_stage("prepare", settings, {}, body), time.monotonic() - t0


def test_local_second_run_refuses_at_once_then_takes_over_a_dead_holders_lock(tmp_path, capsys):
    artifacts = str(tmp_path / "runs")
    holder = start_holder(artifacts)
    try:
        code, seconds = quick_stage(artifacts)
        err = capsys.readouterr().err
        assert code == 1 and seconds < REFUSE_WITHIN_S
        assert f"run 'r' is in use by 'finetune' (pid {holder.pid} on " in err and " since 20" in err
        assert not (tmp_path / "runs" / "r" / "prepare").exists()
    finally:
        holder.kill()  # kill -9: no clean-up runs; the kernel drops the lock
        holder.wait()
    code, _ = quick_stage(artifacts)
    assert code == 0 and (tmp_path / "runs" / "r" / "prepare" / MANIFEST).is_file()
    assert (tmp_path / "runs" / "r" / LOCAL_LOCK).read_text() == ""  # released: no holder named


def wait_stopped(pid: int, seconds: float = 120) -> None:
    """Until the process is frozen (state T in /proc), i.e. sits at its injected fault point."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "T":
            return
        time.sleep(0.05)  # polling interval of a process-state watch, not a synchronisation
    raise AssertionError(f"process {pid} did not reach its fault point within {seconds} s")


@pytest.mark.slow
def test_two_finetunes_on_one_run_id_the_second_refuses_and_the_first_finishes(tmp_path, capsys):
    from test_finetune import finetune_args, prepared_run

    from jobs.finetune.__main__ import main

    artifacts, common = prepared_run(tmp_path, 10, "r", extract_epochs=3)
    first_args = finetune_args(common, "--max-steps", "4", "--save-steps", "2")
    env = child_env(ASRFT_FAULT="finetune/train.step_end:stop:3")  # frozen mid-training, holding the lock
    first = subprocess.Popen([sys.executable, "-m", "jobs.finetune", *first_args], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_stopped(first.pid)
        out = artifacts / "r" / "finetune"
        before = sorted(p.name for p in (out / "checkpoints").iterdir())
        capsys.readouterr()
        t0 = time.monotonic()
        assert main(finetune_args(common, "--max-steps", "8", "--lr", "3e-3", "--force")) == 1  # other settings
        assert time.monotonic() - t0 < REFUSE_WITHIN_S
        assert f"is in use by 'finetune' (pid {first.pid}" in capsys.readouterr().err
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing of the first touched
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    assert json.loads((out / MANIFEST).read_text())["summary"]["global_step"] == 4


# --- S3 -------------------------------------------------------------------------------------------------------


@pytest.fixture
def bucket(s3_server, request, monkeypatch):
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    name = "lock-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}/runs"


def test_s3_second_run_refuses_at_once_and_a_stale_lease_is_taken_over(s3_server, bucket, capsys):
    s3 = S3Settings(endpoint_url=s3_server, lease_seconds=5)
    holder = start_holder(bucket, s3_server, ttl=5)
    try:
        code, seconds = quick_stage(bucket, s3)
        err = capsys.readouterr().err
        assert code == 1 and seconds < REFUSE_WITHIN_S
        assert f"is in use by 'finetune' (pid {holder.pid} on " in err
        store = S3Store(bucket, s3)
        first = store.read_json(f"r/{S3_LEASE}")["expires_epoch"]
        deadline = time.monotonic() + 15
        while store.read_json(f"r/{S3_LEASE}")["expires_epoch"] == first:  # the holder renews its lease
            assert time.monotonic() < deadline, "the lease was not renewed"
            time.sleep(0.2)  # polling interval of an object watch, not a synchronisation
    finally:
        holder.kill()  # a killed pod: its lease stays in the bucket until it expires
        holder.wait()
    lease = store.read_json(f"r/{S3_LEASE}")
    store.write_json(f"r/{S3_LEASE}", {**lease, "expires_epoch": time.time() - 1})  # ... which it now has
    code, _ = quick_stage(bucket, s3)
    assert code == 0 and store.exists(f"r/prepare/{MANIFEST}")
    assert "taking over the stale lock" in capsys.readouterr().err
    assert not store.exists(f"r/{S3_LEASE}")  # released at the end


def test_s3_two_takers_at_once_exactly_one_wins(s3_server, bucket):
    store = S3Store(bucket, S3Settings(endpoint_url=s3_server))
    results: list[object] = []
    barrier = threading.Barrier(4)

    def take():
        lease = _S3Lease(store, f"r/{S3_LEASE}", "r", "finetune", 300)
        barrier.wait()
        try:
            lease.acquire(None)
            results.append(lease)
        except RunLocked as e:
            results.append(e)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [r for r in results if isinstance(r, _S3Lease)]
    assert len(results) == 4 and len(winners) == 1
    winners[0].release()
    with run_lock(store, "r", "export"):  # free again
        pass


def test_asr_ft_run_steps_work_under_the_runs_own_lock(tmp_path):
    """`asr-ft run` holds the lock for all its steps; they do not refuse each other (token passed on)."""
    store = LocalStore(tmp_path / "runs")
    with run_lock(store, "r", "run") as token:
        done = run_module("jobs.prepare", ["--artifacts", str(tmp_path / "runs"), "--run-id", "r",
                                           "--train-csv", str(tmp_path / "missing.csv"), "--audio-dir", str(tmp_path)],
                          ASRFT_RUN_LOCK_TOKEN=token)
        assert "in use by" not in done.stderr
        other = run_module("jobs.prepare", ["--artifacts", str(tmp_path / "runs"), "--run-id", "r",
                                            "--train-csv", str(tmp_path / "missing.csv"), "--audio-dir", str(tmp_path)])
        assert other.returncode == 1 and "is in use by 'run'" in other.stderr
