"""No secret in any output: `asr-ft run --dry-run` of every executor and a stage's DEBUG log (boto3's request
logging included) show the S3 access key id, secret key and session token masked, as the manifests do."""

from __future__ import annotations

import boto3
import pytest
from faultkit import run_module

SECRETS = {
    "ASRFT_S3__ACCESS_KEY_ID": "AKIAFAKEACCESSKEY123",
    "ASRFT_S3__SECRET_ACCESS_KEY": "fakeSecretKey/abcdefghijklmnop0123456789",
    "ASRFT_S3__SESSION_TOKEN": "FakeSessionToken+ZZZZYYYYXXXX0000",
}


def leaks(text: str) -> list[str]:
    return [name for name, value in SECRETS.items() if value in text]


@pytest.mark.parametrize("executor", ["local", "compose", "k8s"])
def test_dry_run_shows_no_secret(tmp_path, executor):
    done = run_module("jobs.run", ["--dry-run", "--executor", executor, "--artifacts", "s3://bucket/runs",
                                   "--run-id", "x"], **SECRETS)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()  # it printed the steps
    assert leaks(done.stdout + done.stderr) == []
    if executor == "local":  # the variables are there, masked
        assert "ASRFT_S3__SESSION_TOKEN=" in done.stdout and "**********" in done.stdout


def test_debug_log_of_a_stage_on_s3_shows_no_secret(s3_server, tmp_path):
    boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="x",
                                   aws_secret_access_key="y").create_bucket(Bucket="secrets-debug")
    (tmp_path / "t.csv").write_text("audio_id,text\n")
    done = run_module("jobs.prepare", ["--artifacts", "s3://secrets-debug/runs", "--run-id", "x", "--log-level",
                                       "DEBUG", "--train-csv", str(tmp_path / "t.csv"), "--audio-dir", str(tmp_path)],
                      ASRFT_S3__ENDPOINT_URL=s3_server, ASRFT_S3__REGION="us-east-1", **SECRETS)
    text = done.stdout + done.stderr
    assert "botocore" in text and "Authorization" in text  # boto3's DEBUG request logging was on
    assert leaks(text) == []
