"""S3 store and stage runner against a real S3-compatible server process (moto_server on 127.0.0.1).

Credentials come only from the settings (the AWS_* variables and files are hidden), so every passing test
also proves the client uses ``S3Settings``' keys.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid

import pytest
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from common.core import store as store_mod
from common.core.settings import S3Settings, StageSettings, load_settings
from common.core.stage import EXIT_FAILED, EXIT_OK, MANIFEST, run_stage, upstream_fingerprint
from common.core.store import S3Store, StoreError, make_s3_client, open_store

ACCESS_KEY, SECRET_KEY = "AKIDASRFTTEST", "asr-ft-test-secret-never-shown"
MIN_PART = 5 * 1024 * 1024  # S3's (and moto's) smallest non-final multipart part


class ExtractDemoSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_EXTRACT_")

    n: int = Field(2, description="files to write")


@pytest.fixture(autouse=True)
def only_settings_credentials(monkeypatch, tmp_path):
    for var in list(os.environ):
        if var.startswith(("ASRFT_", "AWS_")):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookups
    monkeypatch.setenv("ASRFT_CACHE", str(tmp_path / "cache"))


def s3_settings(endpoint: str, **kw) -> S3Settings:
    keys = {"access_key_id": SecretStr(ACCESS_KEY), "secret_access_key": SecretStr(SECRET_KEY)}
    return S3Settings(endpoint_url=endpoint, region="us-east-1", **{**keys, **kw})


@pytest.fixture
def bucket(s3_server) -> str:
    name = f"asrft-{uuid.uuid4().hex[:12]}"
    make_s3_client(s3_settings(s3_server)).create_bucket(Bucket=name)
    return name


@pytest.fixture
def store(s3_server, bucket) -> S3Store:
    s = open_store(f"s3://{bucket}/team/runs", s3_settings(s3_server))
    assert isinstance(s, S3Store)
    return s


def raw_keys(store: S3Store) -> list[str]:
    """Every object in the bucket, seen with the raw client (not through the store's prefix)."""
    return sorted(o["Key"] for o in store.client.list_objects_v2(Bucket=store.bucket).get("Contents", []))


def open_uploads(store: S3Store) -> list[dict]:
    return store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])


# ------------------------------------------------------------------------------------------- store API


def test_round_trip_and_list(store, tmp_path):
    store.write_bytes("r/a/1.bin", b"\x00\x01")
    store.write_json("r/a/sub/2.json", {"文本": "你好"})
    store.write_text("r/ab/3.txt", "这是一个篇章")
    store.write_bytes("r/b/4.bin", b"")
    assert raw_keys(store)[0] == "team/runs/r/a/1.bin"  # the store's prefix is applied
    assert store.uri_for("r/a/1.bin") == f"s3://{store.bucket}/team/runs/r/a/1.bin"
    assert store.read_bytes("r/a/1.bin") == b"\x00\x01"
    assert store.read_json("r/a/sub/2.json") == {"文本": "你好"}
    assert store.read_text("r/ab/3.txt") == "这是一个篇章"
    assert store.read_bytes("r/b/4.bin") == b""
    assert store.exists("r/a/1.bin") and not store.exists("r/a/nope")
    assert store.local_path("r/a/1.bin") is None

    assert store.list() == ["r/a/1.bin", "r/a/sub/2.json", "r/ab/3.txt", "r/b/4.bin"]
    assert store.list("r/a") == ["r/a/1.bin", "r/a/sub/2.json"]  # a folder, not a string prefix ("r/ab")
    assert store.list("r/a/1.bin") == ["r/a/1.bin"]
    assert store.list("r/none") == []

    store.delete_prefix("r/a")
    assert store.list() == ["r/ab/3.txt", "r/b/4.bin"]
    with pytest.raises(StoreError, match=r"GET of s3://.*/team/runs/r/a/1.bin failed"):
        store.read_bytes("r/a/1.bin")
    with pytest.raises(StoreError, match="invalid artifact key"):
        store.write_bytes("../escape", b"x")


def test_files_and_dirs(store, tmp_path):
    src = tmp_path / "src"
    (src / "audio").mkdir(parents=True)
    (src / "audio" / "u1.wav").write_bytes(os.urandom(2048))
    (src / "train.jsonl").write_text('{"id": "u1"}\n')
    assert store.put_dir(src, "run/prepare") == ["run/prepare/audio/u1.wav", "run/prepare/train.jsonl"]
    back = store.get_dir("run/prepare", tmp_path / "back")
    for rel in ["audio/u1.wav", "train.jsonl"]:
        assert (back / rel).read_bytes() == (src / rel).read_bytes()
    store.get_file("run/prepare/train.jsonl", tmp_path / "one" / "t.jsonl")
    assert (tmp_path / "one" / "t.jsonl").read_text() == '{"id": "u1"}\n'
    with pytest.raises(StoreError, match="download"):
        store.get_file("run/prepare/missing", tmp_path / "missing")
    assert not (tmp_path / "missing").exists() and list((tmp_path).glob(".missing*")) == []


def test_multipart_file_round_trip(store, tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "CHUNK", MIN_PART)  # 2 parts for a file just over 5 MiB
    data = os.urandom(MIN_PART + 100_000)
    (tmp_path / "model.bin").write_bytes(data)
    store.put_file(tmp_path / "model.bin", "run/export/model.bin")
    store.get_file("run/export/model.bin", tmp_path / "back.bin")
    assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    assert open_uploads(store) == []


class Trickle(io.RawIOBase):
    """A pipe-like stream: every read returns at most ``step`` bytes; optionally dies after ``fail_after``."""

    def __init__(self, data: bytes, step: int, fail_after: int | None = None):
        self.data, self.step, self.fail_after, self.pos = data, step, fail_after, 0

    def read(self, size: int = -1) -> bytes:
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise ConnectionResetError("producer died mid-upload (simulated)")
        n = min(self.step, len(self.data) - self.pos, size if size >= 0 else len(self.data))
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def test_put_stream_fills_parts_from_short_reads(store, monkeypatch):
    monkeypatch.setattr(store_mod, "CHUNK", MIN_PART)
    data = os.urandom(MIN_PART + 1000)
    store.put_stream(Trickle(data, step=256 * 1024), "run/x/stream.bin")  # 64 KiB-ish reads, 5 MiB parts
    assert store.read_bytes("run/x/stream.bin") == data


@pytest.mark.parametrize(
    ("stream_bytes", "fail_after", "error"),
    [
        # The producer dies after ~1.5 parts: part 1 is uploaded, part 2 never completes.
        (1_000_000, 384 * 1024, ConnectionResetError),
        # All data sent, but S3 refuses to complete (non-final parts under 5 MiB): the upload is aborted too.
        (600 * 1024, None, StoreError),
    ],
    ids=["producer-dies", "complete-refused"],
)
def test_interrupted_upload_leaves_no_object(store, monkeypatch, stream_bytes, fail_after, error):
    monkeypatch.setattr(store_mod, "CHUNK", 256 * 1024)  # moto checks part sizes only at completion
    store.write_bytes("run/x/keep.bin", b"old version")
    for key in ("run/x/new.bin", "run/x/keep.bin"):
        with pytest.raises(error):
            store.put_stream(Trickle(os.urandom(stream_bytes), step=100_000, fail_after=fail_after), key)
    assert not store.exists("run/x/new.bin")
    assert store.read_bytes("run/x/keep.bin") == b"old version"  # an interrupted overwrite keeps the old object
    assert store.list("run/x") == ["run/x/keep.bin"]
    assert open_uploads(store) == []  # aborted, not left to accumulate storage


def test_settings_credentials_are_used(s3_server, bucket):
    with_keys = open_store(f"s3://{bucket}", s3_settings(s3_server))
    with_keys.write_bytes("k.txt", b"ok")  # signed with the settings' keys (nothing else is available)
    no_keys = open_store(f"s3://{bucket}", S3Settings(endpoint_url=s3_server, region="us-east-1"))
    with pytest.raises(StoreError, match="credentials") as err:
        no_keys.read_bytes("k.txt")
    assert "Unable to locate credentials" in str(err.value)
    frozen = with_keys.client._request_signer._credentials.get_frozen_credentials()
    assert (frozen.access_key, frozen.secret_key) == (ACCESS_KEY, SECRET_KEY)


# ------------------------------------------------------------------------------------------- stage runner


def stage_settings(monkeypatch, s3_server: str, bucket: str, **cli) -> ExtractDemoSettings:
    """Settings the way a container gets them: ASRFT_ARTIFACTS and ASRFT_S3__* from the environment."""
    monkeypatch.setenv("ASRFT_ARTIFACTS", f"s3://{bucket}/runs")
    monkeypatch.setenv("ASRFT_S3__ENDPOINT_URL", s3_server)
    monkeypatch.setenv("ASRFT_S3__REGION", "us-east-1")
    monkeypatch.setenv("ASRFT_S3__ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("ASRFT_S3__SECRET_ACCESS_KEY", SECRET_KEY)
    return load_settings(ExtractDemoSettings, {"run_id": "r1", **cli})


def write_parts(ctx) -> dict:
    for i in range(ctx.settings.n):
        (ctx.out / "sub").mkdir(exist_ok=True)
        (ctx.out / ("sub" if i else "") / f"part{i}.txt").write_text(f"part {i}\n" * (i + 1))
    return {"written": ctx.settings.n}


def test_run_stage_on_s3_writes_outputs_then_skips(s3_server, bucket, monkeypatch, caplog):
    s = stage_settings(monkeypatch, s3_server, bucket, n=3)
    store = open_store(s.artifacts, s.s3)
    calls = []

    def body(ctx):
        calls.append(ctx.out)
        assert ctx.store.local_path(ctx.key()) is None and ctx.uri("x") == f"s3://{bucket}/runs/r1/extract/x"
        return write_parts(ctx)

    assert run_stage("extract", s, {"prepare": "fp"}, body) == EXIT_OK
    assert store.list("r1/extract") == [
        "r1/extract/_manifest.json", "r1/extract/part0.txt", "r1/extract/sub/part1.txt", "r1/extract/sub/part2.txt"
    ]
    manifest_text = store.read_text("r1/extract/_manifest.json")
    m = json.loads(manifest_text)
    for out in m["outputs"]:
        data = store.read_bytes(f"r1/extract/{out['path']}")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (out["size"], out["sha256"])
    assert SECRET_KEY not in manifest_text and ACCESS_KEY not in manifest_text
    assert m["settings"]["s3"]["endpoint_url"] == s3_server

    caplog.clear()
    assert run_stage("extract", s, {"prepare": "fp"}, body) == EXIT_OK
    assert len(calls) == 1 and "extract: skipped" in caplog.text
    assert SECRET_KEY not in caplog.text


def test_redo_on_s3_removes_old_outputs(s3_server, bucket, monkeypatch):
    monkeypatch.setenv("ASRFT_PIPELINE", "1")  # a step of `asr-ft run`: a changed setting redoes it
    assert run_stage("extract", stage_settings(monkeypatch, s3_server, bucket, n=3), {}, write_parts) == EXIT_OK
    s = stage_settings(monkeypatch, s3_server, bucket, n=1)
    assert run_stage("extract", s, {}, write_parts) == EXIT_OK
    store = open_store(s.artifacts, s.s3)
    assert store.list("r1/extract") == ["r1/extract/_manifest.json", "r1/extract/part0.txt"]
    assert [o["path"] for o in store.read_json("r1/extract/_manifest.json")["outputs"]] == ["part0.txt"]


@pytest.fixture
def uploads(monkeypatch) -> list[str]:
    """File names S3Store.put_file sends, in order (the uploads still happen)."""
    sent: list[str] = []
    real_put = S3Store.put_file

    def spy(self, local, key):
        sent.append(key.rsplit("/", 1)[-1])
        real_put(self, local, key)

    monkeypatch.setattr(S3Store, "put_file", spy)
    return sent


def test_sync_uploads_only_changed_files(s3_server, bucket, monkeypatch, uploads):
    def body(ctx):
        (ctx.out / "checkpoint-1.bin").write_bytes(b"a" * 100)
        ctx.sync()
        ctx.sync()  # nothing changed
        assert ctx.store.read_bytes(ctx.key("checkpoint-1.bin")) == b"a" * 100  # visible mid-run
        (ctx.out / "checkpoint-1.bin").write_bytes(b"b" * 100)  # same size, new content
        (ctx.out / "checkpoint-2.bin").write_bytes(b"c")
        ctx.sync()

    assert run_stage("extract", stage_settings(monkeypatch, s3_server, bucket), {}, body) == EXIT_OK
    # the final sync inside run_stage sends nothing new; only the manifest follows
    assert uploads == ["checkpoint-1.bin", "checkpoint-1.bin", "checkpoint-2.bin"]
    store = open_store(f"s3://{bucket}/runs", s3_settings(s3_server))
    assert store.read_bytes("r1/extract/checkpoint-1.bin") == b"b" * 100


def test_adopted_upload_record_is_not_sent_again(s3_server, bucket, monkeypatch, uploads):
    """A launched worker syncs into the stage folder; the parent adopts its record and uploads only new files."""
    from common.core.stage import StageContext

    def body(ctx):
        worker = StageContext(ctx.stage, ctx.settings, ctx.store, ctx.run_prefix, ctx.out)  # e.g. rank 0
        (ctx.out / "checkpoint-1.bin").write_bytes(b"a" * 100)
        worker.sync()
        ctx.adopt_upload_record(worker.upload_record())
        (ctx.out / "final.bin").write_bytes(b"f")
        ctx.sync()

    assert run_stage("extract", stage_settings(monkeypatch, s3_server, bucket), {}, body) == EXIT_OK
    assert uploads == ["checkpoint-1.bin", "final.bin"]  # the worker's upload is not repeated by the parent


def test_input_dir_downloads_upstream_outputs(s3_server, bucket, monkeypatch, tmp_path):
    monkeypatch.setenv("ASRFT_PIPELINE", "1")  # each extract below runs with another setting, as in a pipeline
    s = stage_settings(monkeypatch, s3_server, bucket)
    content = {"v1": {"train.jsonl": "aaaa\n", "audio/u1.wav": "1111", "audio/old.wav": "x"},
               "v2": {"train.jsonl": "bbbb\n", "audio/u1.wav": "2222"}}  # same sizes, other content

    def prepare(version):
        def body(ctx):
            for rel, text in content[version].items():
                (ctx.out / rel).parent.mkdir(parents=True, exist_ok=True)
                (ctx.out / rel).write_text(text)
        return body

    def missing(ctx):
        ctx.input_dir("prepare")

    assert run_stage("extract", s, {}, missing) == EXIT_FAILED  # prepare has not completed

    seen = {}

    def extract(ctx):
        folder = ctx.input_dir("prepare")
        seen[ctx.settings.n] = (folder, {p.relative_to(folder).as_posix(): p.read_text()
                                         for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST})

    def inputs(store):
        return {"prepare": upstream_fingerprint(store, "r1", "prepare")}

    for n, version in enumerate(["v1", "v2"]):
        assert run_stage("prepare", s, {"csv": version}, prepare(version)) == EXIT_OK
        assert run_stage("extract", s.model_copy(update={"n": n}), inputs, extract) == EXIT_OK
        folder, files = seen[n]
        assert folder.is_relative_to(tmp_path / "cache")  # a local copy, not the staging folder
        assert files == content[version]  # fresh: same-size files re-downloaded, stale files removed
