"""Local artifact store: the API round-trips, keys cannot escape the root, writes are atomic."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from common.core import store as store_mod
from common.core.store import (
    LocalStore,
    StoreError,
    atomic_path,
    atomic_write_bytes,
    open_store,
    sha256_file,
    split_uri,
)


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "root")


def all_files(root: Path) -> list[str]:
    """Every file under root, hidden ones included (what a reader could stumble on)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_bytes_json_text_round_trip(store):
    store.write_bytes("run/prepare/a.bin", b"\x00\x01")
    store.write_json("run/prepare/stats.json", {"文本": "你好", "n": 2})
    store.write_text("run/prepare/notes.txt", "这是一个篇章")
    assert store.read_bytes("run/prepare/a.bin") == b"\x00\x01"
    assert store.read_json("run/prepare/stats.json") == {"文本": "你好", "n": 2}
    assert "你好" in (store.root / "run/prepare/stats.json").read_text(encoding="utf-8")  # not \\u-escaped
    assert store.read_text("run/prepare/notes.txt") == "这是一个篇章"
    assert store.exists("run/prepare/a.bin") and not store.exists("run/prepare/missing.bin")
    with pytest.raises(StoreError, match="does not exist"):
        store.read_bytes("run/prepare/missing.bin")


def test_list_exists_delete(store):
    for key in ["r/a/1.txt", "r/a/sub/2.txt", "r/ab/3.txt", "r/b/4.txt"]:
        store.write_bytes(key, key.encode())
    assert store.list() == ["r/a/1.txt", "r/a/sub/2.txt", "r/ab/3.txt", "r/b/4.txt"]
    assert store.list("r/a") == ["r/a/1.txt", "r/a/sub/2.txt"]  # a folder, not a string prefix ("r/ab")
    assert store.list("r/a/") == ["r/a/1.txt", "r/a/sub/2.txt"]
    assert store.list("r/a/1.txt") == ["r/a/1.txt"]
    assert store.list("r/none") == []
    store.delete_prefix("r/a")
    assert store.list("r") == ["r/ab/3.txt", "r/b/4.txt"]
    store.delete_prefix("r/b/4.txt")
    assert store.list() == ["r/ab/3.txt"]
    store.delete_prefix("r/never")  # nothing to delete is fine


def test_put_get_files_and_dirs(store, tmp_path):
    src = tmp_path / "src"
    (src / "audio").mkdir(parents=True)
    (src / "audio" / "u1.wav").write_bytes(b"RIFF" + bytes(100))
    (src / "train.jsonl").write_text('{"id": "u1"}\n')
    keys = store.put_dir(src, "run/prepare")
    assert keys == ["run/prepare/audio/u1.wav", "run/prepare/train.jsonl"]
    assert store.local_path("run/prepare/train.jsonl") == store.root / "run/prepare/train.jsonl"
    assert store.uri_for("run/prepare/train.jsonl") == str(store.root / "run/prepare/train.jsonl")

    back = store.get_dir("run/prepare", tmp_path / "back")
    assert all_files(back) == ["audio/u1.wav", "train.jsonl"]
    assert sha256_file(back / "audio/u1.wav") == sha256_file(src / "audio/u1.wav")
    whole = store.get_dir("", tmp_path / "whole")  # the whole store: paths keep their first letter
    assert all_files(whole) == ["run/prepare/audio/u1.wav", "run/prepare/train.jsonl"]

    store.get_file("run/prepare/train.jsonl", tmp_path / "one" / "t.jsonl")
    assert (tmp_path / "one" / "t.jsonl").read_text() == '{"id": "u1"}\n'
    with pytest.raises(StoreError, match="does not exist"):
        store.get_file("run/prepare/missing", tmp_path / "x")
    store.put_file(store.local_path("run/prepare/train.jsonl"), "run/prepare/train.jsonl")  # onto itself: no-op
    assert store.read_text("run/prepare/train.jsonl") == '{"id": "u1"}\n'


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(3 * 1024 + 7)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


BAD_KEYS = ["../escape.txt", "a/../../escape.txt", "a/..", "/etc/passwd", ""]
OPS = ["write_bytes", "read_bytes", "exists", "uri_for", "delete_prefix", "list"]


@pytest.mark.parametrize(
    ("key", "op"),
    [(k, op) for k in BAD_KEYS for op in OPS if (k, op) != ("", "list")],  # list("") is the whole store
)
def test_bad_keys_rejected(store, key, op):
    args = {"write_bytes": (key, b"x")}.get(op, (key,))
    with pytest.raises(StoreError, match="invalid artifact key"):
        getattr(store, op)(*args)
    assert not (store.root.parent / "escape.txt").exists()


def test_keys_are_normalized(store):
    store.write_bytes("a/./b//c.txt", b"x")
    assert store.list() == ["a/b/c.txt"]


# ------------------------------------------------------------------------------------------- atomicity


def test_crash_in_rename_leaves_old_file_and_no_temp(store, monkeypatch):
    store.write_bytes("run/stage/out.json", b"old")

    def crash(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        store.write_bytes("run/stage/out.json", b"new and longer")
    with pytest.raises(OSError, match="simulated"):
        store.write_bytes("run/stage/other.json", b"new")
    monkeypatch.undo()
    assert store.read_bytes("run/stage/out.json") == b"old"
    assert all_files(store.root) == ["run/stage/out.json"]  # no temp file, hidden or not


def test_crash_mid_write_leaves_nothing(store, tmp_path):
    """A writer that dies half-way through (here: a generator that raises) never exposes a partial file."""

    def chunks():
        yield b"a" * 1000
        raise RuntimeError("killed mid-write (simulated)")

    target = store.local_path("run/stage/big.bin")
    with pytest.raises(RuntimeError, match="simulated"), atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            for chunk in chunks():
                f.write(chunk)
                assert store.list() == []  # the half-written temp file is never listed
    assert not target.exists()
    assert all_files(store.root) == []


def test_put_file_interrupted_copy(store, tmp_path, monkeypatch):
    src = tmp_path / "model.bin"
    src.write_bytes(bytes(10_000))

    def half_copy(a, b):
        Path(b).write_bytes(Path(a).read_bytes()[:5000])
        raise OSError("connection to the PVC lost (simulated)")

    monkeypatch.setattr(shutil, "copyfile", half_copy)
    with pytest.raises(OSError, match="simulated"):
        store.put_file(src, "run/export/model.bin")
    assert not store.exists("run/export/model.bin")
    assert all_files(store.root) == []


def test_atomic_helpers_success(tmp_path):
    atomic_write_bytes(tmp_path / "new" / "a.txt", b"hello")  # creates the folder
    with atomic_path(tmp_path / "new" / "b.wav") as tmp:
        assert tmp.parent == tmp_path / "new" and tmp.suffix == ".wav"  # same folder → rename is atomic
        tmp.write_bytes(b"RIFF")
    assert all_files(tmp_path) == ["new/a.txt", "new/b.wav"]


def test_list_hides_only_temp_files(store):
    store.write_bytes("r/s/data.tmpl", b"template")  # an ordinary file whose name contains ".tmp"
    store.write_bytes("r/s/x.tmp.json", b"{}")
    (store.root / "r/s/.data.json.abc123.tmp").write_bytes(b"half")  # what atomic_write_bytes leaves mid-way
    assert store.list("r/s") == ["r/s/data.tmpl", "r/s/x.tmp.json"]


# ------------------------------------------------------------------------------------------- open_store


@pytest.mark.parametrize(
    ("uri", "kind"),
    [("runs/", LocalStore), ("file:///tmp/runs", LocalStore), ("s3://bucket/prefix", store_mod.S3Store)],
)
def test_open_store_kinds(uri, kind, monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert isinstance(open_store(uri), kind)


@pytest.mark.parametrize("uri", ["gs://bucket/x", "http://host/runs", "s3:///no-bucket"])
def test_open_store_rejects(uri):
    with pytest.raises(StoreError, match="s3://bucket"):
        open_store(uri)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [("s3://b/p/x/y.wav", ("s3://b", "p/x/y.wav")), ("data/audio/u1.wav", ("data/audio", "u1.wav"))],
)
def test_split_uri(uri, expected):
    assert split_uri(uri) == expected
