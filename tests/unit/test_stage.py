"""Stage runner (local store): manifest written last, fingerprint skip, redo rules, failures, inputs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.core import stage as stage_mod
from common.core.settings import StageSettings, load_settings
from common.core.stage import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    MANIFEST,
    StageFailed,
    cache_dir,
    run_stage,
    upstream_fingerprint,
)
from common.core.store import LocalStore, StoreError


class ExtractDemoSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_EXTRACT_")

    n: int = Field(2, description="how many files to write")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in list(os.environ):
        if var.startswith(("ASRFT_", "AWS_")):
            monkeypatch.delenv(var)
    monkeypatch.setenv("ASRFT_CACHE", str(tmp_path / "cache"))


def settings(tmp_path: Path, **cli) -> ExtractDemoSettings:
    return load_settings(ExtractDemoSettings, {"artifacts": str(tmp_path / "runs"), "run_id": "r1", **cli})


class Body:
    """A stage body that records its calls and writes ``n`` files (one in a sub-folder)."""

    def __init__(self):
        self.calls = 0
        self.seen: list[list[str]] = []  # files present in the stage folder when each call started

    def __call__(self, ctx):
        self.calls += 1
        self.seen.append(sorted(p.relative_to(ctx.out).as_posix() for p in ctx.out.rglob("*") if p.is_file()))
        for i in range(ctx.settings.n):
            (ctx.out / "sub").mkdir(exist_ok=True)
            (ctx.out / ("sub" if i else "") / f"part{i}.txt").write_text(f"part {i} 第{i}段\n" * (i + 1))
        return {"written": ctx.settings.n}


def manifest_path(tmp_path: Path, stage: str = "extract") -> Path:
    return tmp_path / "runs" / "r1" / stage / MANIFEST


def test_manifest_written_last_with_outputs(tmp_path, monkeypatch):
    order: list[tuple[str, list[str]]] = []
    real_write = LocalStore.write_bytes

    def spy(self, key, data):  # what the stage folder holds when each store write happens
        order.append((key, sorted(p.name for p in (tmp_path / "runs/r1/extract").rglob("*") if p.is_file())))
        real_write(self, key, data)

    monkeypatch.setattr(LocalStore, "write_bytes", spy)

    def body(ctx):
        assert not (ctx.out / MANIFEST).exists()
        ctx.manifest_extra["device"] = "cpu"
        return Body()(ctx)

    s = settings(tmp_path, n=3)
    assert run_stage("extract", s, {"prepare": "abc"}, body) == EXIT_OK
    assert order[-1] == ("r1/extract/_manifest.json", ["part0.txt", "part1.txt", "part2.txt"])

    m = json.loads(manifest_path(tmp_path).read_text())
    out = tmp_path / "runs/r1/extract"
    assert m["outputs"] == [
        {"path": rel, "size": (out / rel).stat().st_size, "sha256": hashlib.sha256((out / rel).read_bytes()).hexdigest()}
        for rel in ["part0.txt", "sub/part1.txt", "sub/part2.txt"]
    ]
    assert m["stage"] == "extract" and m["inputs"] == {"prepare": "abc"} and m["summary"] == {"written": 3}
    assert m["settings"]["n"] == 3 and m["device"] == "cpu" and len(m["fingerprint"]) == 64
    assert m["started"] <= m["finished"] and m["seconds"] >= 0 and m["code_version"]


def test_skip_when_fingerprint_matches(tmp_path, caplog):
    body = Body()
    assert run_stage("extract", settings(tmp_path), {"prepare": "abc"}, body) == EXIT_OK
    before = manifest_path(tmp_path).read_bytes()
    caplog.clear()
    assert run_stage("extract", settings(tmp_path, log_level="DEBUG"), {"prepare": "abc"}, body) == EXIT_OK
    assert body.calls == 1
    assert "extract: skipped" in caplog.text and "use --force to redo" in caplog.text
    assert manifest_path(tmp_path).read_bytes() == before


@pytest.mark.parametrize(
    ("second_settings", "second_inputs", "redo"),
    [
        ({}, {"prepare": "abc"}, False),
        ({"force": "true"}, {"prepare": "abc"}, True),
        ({"n": "1"}, {"prepare": "abc"}, True),  # a setting that changes the result
        ({}, {"prepare": "CHANGED"}, True),  # upstream redone
        ({"log_level": "WARNING"}, {"prepare": "abc"}, False),  # how loudly it logs does not matter
    ],
    ids=["same", "force", "setting", "input", "log-level"],
)
def test_redo_rules(tmp_path, monkeypatch, second_settings, second_inputs, redo):
    monkeypatch.setenv("ASRFT_PIPELINE", "1")  # as a step of `asr-ft run` (alone, a changed setting is refused)
    body = Body()
    assert run_stage("extract", settings(tmp_path, n=2), {"prepare": "abc"}, body) == EXIT_OK
    fp1 = json.loads(manifest_path(tmp_path).read_text())["fingerprint"]
    assert run_stage("extract", settings(tmp_path, **{"n": "2", **second_settings}), second_inputs, body) == EXIT_OK
    assert body.calls == (2 if redo else 1)
    m = json.loads(manifest_path(tmp_path).read_text())
    if redo:
        # The outdated manifest and outputs were gone before the body ran, so the new manifest lists only
        # what the redo wrote.
        assert body.seen[1] == []
        assert [o["path"] for o in m["outputs"]] == ["part0.txt", "sub/part1.txt"][: m["summary"]["written"]]
    assert (m["fingerprint"] != fp1) is (redo and second_settings.get("force") is None)


def test_outdated_manifest_removed_before_redo(tmp_path, monkeypatch):
    monkeypatch.setenv("ASRFT_PIPELINE", "1")
    assert run_stage("extract", settings(tmp_path, n=3), {}, Body()) == EXIT_OK

    def body(ctx):
        assert not manifest_path(tmp_path).exists()  # a half-redone stage never looks complete
        raise StageFailed("crashed during the redo")

    assert run_stage("extract", settings(tmp_path, n=1), {}, body) == EXIT_FAILED
    assert not manifest_path(tmp_path).exists()


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (StageFailed("no good rows; check the CSV"), EXIT_FAILED),
        (StageFailed("bad CSV header; name the columns", exit_code=EXIT_BAD_INPUT), EXIT_BAD_INPUT),
        (StoreError("s3://b/x: access denied; check the credentials"), EXIT_FAILED),
        (KeyboardInterrupt(), 130),
    ],
)
def test_failure_exit_code_and_no_manifest(tmp_path, caplog, error, code):
    def body(ctx):
        (ctx.out / "partial.txt").write_text("half")
        raise error

    assert run_stage("extract", settings(tmp_path), {}, body) == code
    assert not manifest_path(tmp_path).exists()
    assert "extract failed:" in caplog.text
    if not isinstance(error, KeyboardInterrupt):
        assert str(error) in caplog.text


@pytest.mark.parametrize("level, traceback", [("INFO", False), ("DEBUG", True)])
def test_unexpected_error_is_one_message_without_manifest(tmp_path, capsys, level, traceback):
    def body(ctx):
        raise ZeroDivisionError("a bug")

    s = settings(tmp_path).model_copy(update={"log_level": level})
    assert run_stage("extract", s, {}, body) == 1
    assert not manifest_path(tmp_path).exists()
    err = capsys.readouterr().err
    assert "extract failed: unexpected error ZeroDivisionError: a bug" in err and "--log-level DEBUG" in err
    assert ("Traceback (most recent call last)" in err) is traceback


def test_crashed_run_resumes_with_its_files(tmp_path):
    def crash(ctx):
        (ctx.out / "checkpoint-10").mkdir()
        (ctx.out / "checkpoint-10" / "w.bin").write_bytes(b"w")
        raise StageFailed("out of memory")

    assert run_stage("extract", settings(tmp_path), {}, crash) == EXIT_FAILED
    body = Body()
    assert run_stage("extract", settings(tmp_path), {}, body) == EXIT_OK
    assert body.seen[0] == ["checkpoint-10/w.bin"]  # no manifest → nothing was deleted; the body may resume


def test_inputs_from_upstream_stage(tmp_path):
    s = settings(tmp_path)
    ctx_dirs = {}

    def missing(ctx):
        ctx.input_dir("prepare")

    assert run_stage("extract", s, {}, missing) == EXIT_FAILED  # prepare has not run

    def prepare(ctx):
        (ctx.out / "train.jsonl").write_text('{"id": "u1"}\n')

    assert run_stage("prepare", s, {"csv": "v1"}, prepare) == EXIT_OK

    def extract(ctx):
        ctx_dirs["prepare"] = ctx.input_dir("prepare")
        return {"lines": len((ctx.input_dir("prepare") / "train.jsonl").read_text().splitlines())}

    stores_seen = []

    def inputs(store):
        stores_seen.append(store)
        return {"prepare": upstream_fingerprint(store, "r1", "prepare")}

    assert run_stage("extract", s, inputs, extract) == EXIT_OK
    assert ctx_dirs["prepare"] == tmp_path / "runs/r1/prepare"
    assert isinstance(stores_seen[0], LocalStore)
    m = json.loads(manifest_path(tmp_path).read_text())
    assert m["inputs"]["prepare"] == json.loads(manifest_path(tmp_path, "prepare").read_text())["fingerprint"]
    assert m["summary"] == {"lines": 1}

    # prepare redone with other inputs → its fingerprint changes → extract is redone too
    assert run_stage("prepare", s, {"csv": "v2"}, prepare) == EXIT_OK
    ran = []
    assert run_stage("extract", s, inputs, lambda ctx: ran.append(1)) == EXIT_OK
    assert ran == [1]


def test_upstream_fingerprint_missing(tmp_path):
    with pytest.raises(StageFailed, match="Run `asr-ft prepare` first"):
        upstream_fingerprint(LocalStore(tmp_path), "r1", "prepare")


def test_cache_dir(monkeypatch, tmp_path):
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("ASRFT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "asr-ft"


def test_setup_logging_keeps_other_handlers():
    import logging

    root = logging.getLogger()
    keep = logging.NullHandler()
    root.addHandler(keep)
    try:
        stage_mod.setup_logging("INFO")
        stage_mod.setup_logging("DEBUG")
        ours = [h for h in root.handlers if h.get_name() == "asr-ft"]
        assert keep in root.handlers and len(ours) == 1 and root.level == logging.DEBUG
    finally:
        root.removeHandler(keep)


def test_alone_a_changed_setting_is_refused_and_force_redoes(tmp_path, caplog):
    body = Body()
    assert run_stage("extract", settings(tmp_path, n=2), {"prepare": "abc"}, body) == EXIT_OK
    before = manifest_path(tmp_path).read_bytes()
    assert run_stage("extract", settings(tmp_path, n=1), {"prepare": "abc"}, body) == EXIT_BAD_INPUT
    assert "other settings (n: 2 → 1)" in caplog.text and "--force" in caplog.text
    assert body.calls == 1 and manifest_path(tmp_path).read_bytes() == before
    assert run_stage("extract", settings(tmp_path, n=2), {"prepare": "CHANGED"}, body) == EXIT_OK  # new inputs
    assert body.calls == 2
    assert run_stage("extract", settings(tmp_path, n=1, force="true"), {"prepare": "CHANGED"}, body) == EXIT_OK
    assert body.calls == 3
