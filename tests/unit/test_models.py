"""Model references: parsing (table), what a folder holds, family checks, and the hub's offline error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.core.models import ModelRef, ModelRefError, fetch_model, parse_model_ref
from common.core.settings import SettingsError, load_settings
from common.core.stage import StageFailed
from common.families.whisper.model import check_model_type, folder_format, inference_folder
from jobs.evaluate import EvaluateSettings, parse_model_arg
from jobs.pretrained import PretrainedSettings


@pytest.mark.parametrize(
    ("ref", "kind", "location", "revision"),
    [
        ("bundled:whisper-base", "bundled", "whisper-base", None),
        ("hf://openai/whisper-small", "hf", "openai/whisper-small", None),
        ("hf://openai/whisper-small@main", "hf", "openai/whisper-small", "main"),
        ("hf://org.x/name_v2-b@3f2c1a0", "hf", "org.x/name_v2-b", "3f2c1a0"),
        ("s3://bucket/models/whisper", "s3", "s3://bucket/models/whisper", None),
        ("s3://bucket/models/whisper/", "s3", "s3://bucket/models/whisper", None),
        ("/mnt/models/whisper-small", "path", "/mnt/models/whisper-small", None),
        ("runs/demo/export/ct2", "path", "runs/demo/export/ct2", None),
        ("file:///mnt/models/w", "path", "/mnt/models/w", None),
        ("  bundled:whisper-base  ", "bundled", "whisper-base", None),
    ],
)
def test_parse_model_ref(ref: str, kind: str, location: str, revision: str | None) -> None:
    parsed = parse_model_ref(ref)
    assert (parsed.kind, parsed.location, parsed.revision) == (kind, location, revision)
    assert parsed.raw == ref


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("", "empty model reference"),
        ("bundled:whisper-large", "bundled models: bundled:kimi-audio-tiny, bundled:whisper-base"),
        ("hf://whisper-small", "expected hf://org/name"),
        ("hf://a/b/c", "expected hf://org/name"),
        ("hf://openai/whisper-small@", "nothing after '@'"),
        ("hf:openai/whisper-small", "write hf://org/name"),
        ("s3://bucket", "expected s3://bucket/prefix"),
        ("s3://bucket/", "expected s3://bucket/prefix"),
        ("gs://bucket/model", "unsupported scheme 'gs'"),
        ("https://huggingface.co/openai/whisper-small", "unsupported scheme 'https'"),
    ],
)
def test_bad_refs_say_what_is_accepted(ref: str, message: str) -> None:
    with pytest.raises(ModelRefError) as err:
        parse_model_ref(ref)
    assert message in str(err.value)
    if "unsupported" in message or "empty" in message:
        assert "bundled:NAME, hf://org/name" in str(err.value)  # the accepted forms are listed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ({"family": "gemma-audio"}, "unknown model family 'gemma-audio'; known: kimi-audio, whisper"),
        ({"model": "bundled:kimi-audio"}, "unknown bundled model 'kimi-audio'"),
        ({"model": "bundled:whisper-base", "family": "toy"}, "unknown model family 'toy'"),
    ],
)
def test_unknown_families_are_refused_before_any_work(argv: dict, message: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(PretrainedSettings, argv)
    assert message in str(err.value)


def test_the_family_is_chosen_not_guessed() -> None:
    """A reference's name never decides the family: --family does (default whisper), a bundled model names its own."""
    assert load_settings(PretrainedSettings, {"model": "/models/kimia-7b"}).resolved_family == "whisper"
    assert load_settings(PretrainedSettings, {"model": "bundled:whisper-base"}).resolved_family == "whisper"


@pytest.mark.parametrize(
    ("model_type", "ok"), [(None, True), ("whisper", True), ("kimi_audio", False), ("wav2vec2", False)],
)
def test_whisper_family_checks_the_architecture(tmp_path: Path, model_type: str | None, ok: bool) -> None:
    folder = _touch(tmp_path / "m", {"config.json": {} if model_type is None else {"model_type": model_type}})
    if ok:
        check_model_type(folder)
    else:
        with pytest.raises(StageFailed, match="--family"):
            check_model_type(folder)


def _touch(folder: Path, files: dict[str, object]) -> Path:
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content) if isinstance(content, dict) else str(content))
    return folder


HF_CONFIG = {"model_type": "whisper"}
CT2_CONFIG = {"suppress_ids": [1], "suppress_ids_begin": [220], "lang_ids": [50259]}


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"config.json": HF_CONFIG, "model.safetensors": "x"}, "hf"),
        ({"config.json": HF_CONFIG, "model-00001-of-00002.safetensors": "x"}, "hf"),
        ({"config.json": HF_CONFIG, "pytorch_model.bin": "x"}, "hf"),
        ({"config.json": CT2_CONFIG, "model.bin": "x"}, "ct2"),
        ({"model/config.json": HF_CONFIG, "model/model.safetensors": "x"}, "export"),
        ({"ct2/config.json": CT2_CONFIG, "ct2/model.bin": "x"}, "export"),
        ({"config.json": HF_CONFIG}, None),  # no weights
        ({"model.bin": "x"}, None),  # no config
        ({"adapter_model.safetensors": "x", "adapter_config.json": {}}, None),  # a LoRA adapter alone
    ],
)
def test_folder_format(tmp_path: Path, files: dict, expected: str | None) -> None:
    assert folder_format(_touch(tmp_path / "m", files)) == expected


def test_missing_local_folder_suggests_the_hub_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageFailed) as err:
        fetch_model("openai/whisper-small")
    assert "no such folder" in str(err.value) and "Did you mean hf://openai/whisper-small?" in str(err.value)


def test_folder_without_a_model_lists_what_it_has(tmp_path: Path) -> None:
    folder = _touch(tmp_path / "m", {"notes.txt": "hello", "config.json": HF_CONFIG})
    with pytest.raises(StageFailed) as err:
        inference_folder(fetch_model(str(folder))[0], prefer="hf")
    assert "neither a Hugging Face model" in str(err.value) and "notes.txt" in str(err.value)


def test_hub_offline_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StageFailed) as err:
        fetch_model("hf://asr-ft-tests/model-that-is-not-cached@main")
    message = str(err.value)
    assert "the Hugging Face hub is unreachable/offline" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "pass a local path or s3:// URI" in message


def test_hub_unreachable_gives_the_same_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused at once
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with pytest.raises(StageFailed) as err:
        fetch_model("hf://asr-ft-tests/model-that-is-not-cached")
    assert "the Hugging Face hub is unreachable/offline" in str(err.value)
    assert "pass a local path or s3:// URI" in str(err.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("gs://bucket/model", "unsupported scheme 'gs'"),
        ("hf://nope", "expected hf://org/name"),
    ],
)
def test_pretrained_settings_check_the_ref(value: str, message: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(PretrainedSettings, {"model": value})
    assert message in str(err.value) and "--model" in str(err.value)


@pytest.mark.parametrize(
    ("arg", "name", "kind"),
    [
        ("pretrained=bundled:whisper-base", "pretrained", "bundled"),
        ("ft=runs/demo/export/ct2", "ft", "path"),
        ("small=hf://openai/whisper-small@main", "small", "hf"),
        ("a.b_c-1=s3://bucket/m", "a.b_c-1", "s3"),
    ],
)
def test_evaluate_model_arg(arg: str, name: str, kind: str) -> None:
    got_name, ref = parse_model_arg(arg)
    assert got_name == name and isinstance(ref, ModelRef) and ref.kind == kind


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (["bundled:whisper-base"], "expected NAME=REF"),
        (["=bundled:whisper-base"], "expected NAME=REF"),
        (["my model=bundled:whisper-base"], "expected NAME=REF"),
        (["a=gs://x/y"], "unsupported scheme 'gs'"),
        (["a=bundled:whisper-base", "a=runs/x"], "used twice"),
    ],
)
def test_evaluate_settings_reject_bad_models(models: list[str], message: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(EvaluateSettings, {"model": models})
    assert message in str(err.value)
