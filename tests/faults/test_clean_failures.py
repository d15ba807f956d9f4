"""Every failure is one clean stage failure: a full disk (injected ENOSPC at a publish point), an unreachable S3
endpoint → one message saying what happened and what to do, the stage contract's exit code, no traceback unless
--log-level DEBUG; nothing half-published, and the re-run completes."""

from __future__ import annotations

import socket

import pytest
from faultkit import run_module
from test_finetune import write_clips

from common.core.stage import EXIT_FAILED, MANIFEST


def prepare_argv(tmp_path, *extra: str) -> list[str]:
    data = tmp_path / "data"
    if not data.exists():
        write_clips(data, 6)
    return ["--artifacts", str(tmp_path / "runs"), "--run-id", "r", "--train-csv", str(data / "train.csv"),
            "--audio-dir", str(data / "audio"), "--test-ratio", "0.34", *extra]


@pytest.mark.parametrize("point", ["prepare/files.atomic_path:enospc:3", "prepare/files.atomic_write:enospc:2",
                                   "prepare/stage.manifest:enospc"])
def test_disk_full_is_one_message_and_the_rerun_completes(tmp_path, point):
    failed = run_module("jobs.prepare", prepare_argv(tmp_path), ASRFT_FAULT=point)
    assert failed.returncode == EXIT_FAILED
    assert "prepare failed: the disk is full" in failed.stderr and "re-run the same command" in failed.stderr
    assert "Traceback" not in failed.stderr
    out = tmp_path / "runs" / "r" / "prepare"
    assert not (out / MANIFEST).exists() and not list(out.rglob(".*.tmp*"))
    assert run_module("jobs.prepare", prepare_argv(tmp_path)).returncode == 0
    assert (out / MANIFEST).is_file()


def test_debug_shows_the_traceback(tmp_path):
    failed = run_module("jobs.prepare", prepare_argv(tmp_path, "--log-level", "DEBUG"),
                        ASRFT_FAULT="prepare/stage.manifest:enospc")
    assert failed.returncode == EXIT_FAILED and "Traceback (most recent call last)" in failed.stderr


def test_unreachable_s3_is_one_message_within_the_budget(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    failed = run_module("jobs.prepare", [*prepare_argv(tmp_path), "--artifacts", "s3://b/runs"], timeout=120,
                        ASRFT_S3__ENDPOINT_URL=f"http://127.0.0.1:{port}", ASRFT_S3__RETRY_SECONDS="3",
                        ASRFT_S3__CONNECT_TIMEOUT="1", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y",
                        AWS_DEFAULT_REGION="us-east-1")
    assert failed.returncode == EXIT_FAILED
    assert "prepare failed: S3" in failed.stderr and "retried for" in failed.stderr
    assert "ASRFT_S3__ENDPOINT_URL" in failed.stderr and "Traceback" not in failed.stderr


def test_a_long_csv_scan_shows_progress(tmp_path):
    (tmp_path / "audio").mkdir()
    rows = "\n".join(f"u{i:05d},你好世界" for i in range(3000))
    (tmp_path / "big.csv").write_text(f"audio_id,text\n{rows}\n", encoding="utf-8")
    done = run_module("jobs.prepare", ["--artifacts", str(tmp_path / "runs"), "--run-id", "r", "--train-csv",
                                       str(tmp_path / "big.csv"), "--audio-dir", str(tmp_path / "audio")])
    assert "checking the 3000 rows of" in done.stderr and "prepare: checking train rows" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("statuses", "table"), [(["done", "done"], True), (["done", "skipped"], True),
                                                 (["failed", "not run"], False), (["done", "failed"], False)])
def test_the_run_summary_shows_only_this_runs_cer(tmp_path, capsys, statuses, table):
    import json
    from types import SimpleNamespace

    from common.core.settings import S3Settings
    from common.executors.local import StepResult, print_summary

    metrics = tmp_path / "runs" / "r" / "evaluate" / "metrics.json"  # an earlier run's results
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"finetuned": {"test": {"cer": 0.123}}}))
    settings = SimpleNamespace(run_id="r", artifacts=str(tmp_path / "runs"), s3=S3Settings())
    print_summary([StepResult("finetune", statuses[0]), StepResult("evaluate", statuses[1])], settings)
    assert ("12.3%" in capsys.readouterr().err) is table
