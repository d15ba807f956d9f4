"""S3 through a fault-injecting proxy on 127.0.0.1 (tests/faults/s3proxy.py): connection resets, 5xx answers,
a 30-s outage, a hung endpoint. A stage that uploads a small file and a multipart one (3 parts) either completes
or fails with one clear message within its retry budget; the bucket is consistent either way (a manifest only
over whole outputs) and no multipart upload is left open."""

from __future__ import annotations

import json
import time

import boto3
import pytest
from s3proxy import FaultProxy

from common.core.runlock import S3_LEASE
from common.core.settings import S3Settings, load_settings
from common.core.stage import MANIFEST, run_stage
from common.core.store import CHUNK

BIG = 2 * CHUNK + 1234  # a multipart upload of 3 parts
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def bucket(s3_server, request, monkeypatch):
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    name = "f-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:50].strip("-")
    boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server)
    yield p
    p.close()


def stage(bucket: str, endpoint: str, retry_seconds: float = 120, read_timeout: float = 2,
          lease_seconds: float = 300) -> tuple[int, float]:
    from jobs.prepare import PrepareSettings  # any stage's settings will do

    s3 = S3Settings(endpoint_url=endpoint, retry_seconds=retry_seconds, read_timeout=read_timeout,
                    connect_timeout=2, lease_seconds=lease_seconds)
    settings = load_settings(PrepareSettings, {"artifacts": f"s3://{bucket}/runs", "run_id": "r", "train_csv": "x.csv",
                                               "audio_dir": ".", "s3": s3.model_dump(mode="json")})

    def body(ctx):
        (ctx.out / "small.json").write_text('{"ok": true}')
        (ctx.out / "big.bin").write_bytes(bytes(range(256)) * (BIG // 256) + b"x" * (BIG % 256))
        ctx.sync()  # mid-stage upload (what finetune does after each checkpoint)
        return {}

    t0 = time.monotonic()
    return run_stage("prepare", settings, {}, body), time.monotonic() - t0


def consistent(s3_server: str, bucket: str, complete: bool) -> None:
    """A manifest exactly when complete, listing only whole objects; no open multipart upload."""
    client = boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1")
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    keys = {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}
    manifest_key = f"runs/r/prepare/{MANIFEST}"
    assert (manifest_key in keys) is complete
    if complete:
        manifest = json.loads(client.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
        for out in manifest["outputs"]:
            assert keys[f"runs/r/prepare/{out['path']}"] == out["size"]
        assert keys["runs/r/prepare/big.bin"] == BIG


@pytest.mark.parametrize(
    ("mode", "count", "when"),
    [("reset", 3, None), ("503", 4, None), ("reset", 4, r"partNumber=2"), ("503", 3, r"PUT [^ ]*_manifest"),
     ("hang", 2, r"partNumber=3")],
    ids=["resets", "5xx", "resets-mid-multipart", "5xx-at-manifest", "hung-requests"],
)
def test_transient_faults_are_ridden_out(s3_server, bucket, proxy, capsys, mode, count, when):
    proxy.fault(mode, count=count, when=when)
    code, _ = stage(bucket, proxy.url)
    assert code == 0, capsys.readouterr().err[-3000:]
    assert any(line.startswith("start") for line in proxy.log), proxy.log  # the fault did happen
    consistent(s3_server, bucket, complete=True)


def test_an_outage_longer_than_the_budget_fails_clearly_within_it(s3_server, bucket, proxy, capsys):
    proxy.fault("reset", seconds=60, when=r"partNumber=2")  # mid multipart upload
    code, seconds = stage(bucket, proxy.url, retry_seconds=8, lease_seconds=5)
    err = capsys.readouterr().err
    # the budget for the part, then for aborting the upload, plus the last attempts' timeouts
    assert code == 1 and seconds < 2 * 8 + 15
    assert "prepare failed: S3 upload of part 2" in err and "retried for" in err and "ASRFT_S3__RETRY_SECONDS" in err
    assert "Traceback" not in err
    proxy.close()  # the outage ends; the next run completes and cleans what the failed one left ...
    lease = f"runs/r/{S3_LEASE}"
    client = boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1")
    if "Contents" in client.list_objects_v2(Bucket=bucket, Prefix=lease):  # ... once the failed run's lease,
        expires = json.loads(client.get_object(Bucket=bucket, Key=lease)["Body"].read())["expires_epoch"]
        while time.time() <= expires:  # which it could not remove during the outage, has expired
            time.sleep(0.2)  # waiting for the lease's own deadline (5 s), not a synchronisation
    code, _ = stage(bucket, s3_server)
    assert code == 0
    consistent(s3_server, bucket, complete=True)


def test_a_hung_endpoint_fails_clearly_within_the_budget(s3_server, bucket, proxy, capsys):
    proxy.fault("hang", seconds=120)
    code, seconds = stage(bucket, proxy.url, retry_seconds=6, read_timeout=1)
    err = capsys.readouterr().err
    assert code == 1 and seconds < 6 + 15
    assert "failed" in err and "retried for" in err and "Traceback" not in err


def test_a_killed_multipart_upload_is_aborted_by_the_next_run(s3_server, bucket):
    client = boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_multipart_upload(Bucket=bucket, Key="runs/r/prepare/big.bin")  # what a SIGKILL leaves
    assert len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1
    code, _ = stage(bucket, s3_server)
    assert code == 0
    consistent(s3_server, bucket, complete=True)


@pytest.mark.slow
def test_a_30_second_outage_mid_upload_is_ridden_out(s3_server, bucket, proxy, capsys):
    proxy.fault("reset", seconds=30, when=r"partNumber=2")
    code, seconds = stage(bucket, proxy.url, retry_seconds=120)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert seconds >= 30 and "retrying in" in err
    consistent(s3_server, bucket, complete=True)
