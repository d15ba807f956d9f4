"""Fixtures shared by every test folder.

``s3_server``: a real S3-compatible server process (moto's ``moto_server``, from ``moto[server]``) on
127.0.0.1 with a free port, started once per test session; yields its endpoint URL. moto accepts any
credentials: pass :data:`testkit.S3_TEST_CREDENTIALS` (or the matching ``--s3-*`` flags) to clients and stages.
Each test should create its own bucket (e.g. named after the test) so tests do not see each other's objects.

``real_zh_dev``: the folder of a real Mandarin dev set (``transcripts.csv`` with columns audio_id,text +
``audio/<audio_id>.wav``) for tests that need real human speech. It comes from the developer's or CI's
environment, never from a path written here:

    ASRFT_REAL_ZH_DEV=/data/real-zh-dev make test

Unset, those tests are skipped (``-ra`` lists them with the variable to set); set to a folder without that
layout, they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no Hugging Face hub in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from testkit import free_port as _free_port  # noqa: E402

S3_SERVER_START_TIMEOUT = 30.0  # seconds; moto_server starts in ~1-2 s on an idle machine
REAL_ZH_DEV_ENV = "ASRFT_REAL_ZH_DEV"  # the variable jobs/run/demo.yaml reads the real Mandarin dev set from
REAL_ZH_DEV2_ENV = "ASRFT_REAL_ZH_DEV2"  # general speech for the demo's forgetting guard (its guard split)


def _speech_folder(env: str) -> Path:
    """A real speech folder named by ``env`` (transcripts.csv + audio/, kept outside the repository); the test is
    skipped when the variable is unset (`.ci/run` sets it from the workplace's data), fails when it is wrong."""
    value = os.environ.get(env)
    if not value:
        pytest.skip(f"needs real Mandarin speech: set {env} to a folder holding transcripts.csv "
                    "(audio_id,text) and audio/")
    root = Path(value).expanduser()
    if not ((root / "transcripts.csv").is_file() and (root / "audio").is_dir()):
        pytest.fail(f"{env}={value}: expected a folder holding transcripts.csv (audio_id,text) and audio/")
    return root


@pytest.fixture(scope="session")
def real_zh_dev() -> Path:
    """The real Mandarin dev set's folder, from $ASRFT_REAL_ZH_DEV."""
    return _speech_folder(REAL_ZH_DEV_ENV)


@pytest.fixture(scope="session")
def real_zh_dev2() -> Path:
    """The second real Mandarin dev set (the demo's guard split comes from it), from $ASRFT_REAL_ZH_DEV2."""
    return _speech_folder(REAL_ZH_DEV2_ENV)


def _wait_until_serving(url: str, proc: subprocess.Popen, deadline: float, log_path) -> None:
    """Poll the endpoint until it answers HTTP (any status) or the process dies or the deadline passes."""
    while True:
        if proc.poll() is not None:
            out = log_path.read_text(errors="replace") if log_path.exists() else ""
            raise RuntimeError(f"moto_server exited with code {proc.returncode} before serving:\n{out[-2000:]}")
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not answer on {url} within {S3_SERVER_START_TIMEOUT} s") from None
            time.sleep(0.05)  # polling interval of a readiness check, not synchronization


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[str]:
    """Endpoint URL of a moto S3 server process on 127.0.0.1 (one per test session). Its log goes to a file:
    a pipe nobody reads would fill up and block the server after a few hundred requests."""
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed at teardown
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log_file, stderr=subprocess.STDOUT, env=env,
    )
    try:
        _wait_until_serving(url, proc, time.monotonic() + S3_SERVER_START_TIMEOUT, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()
