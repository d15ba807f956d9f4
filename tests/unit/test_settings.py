"""Stage settings: layer precedence, common vs stage env, nesting, strictness, error messages, secrets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from common.core.settings import (
    SettingsError,
    StageSettings,
    build_parser,
    fingerprint_fields,
    load_settings,
    parse_args,
    redacted,
)
from common.core.stage import run_stage, stage_main

SECRET = "s3cr3t-VALUE-never-shown"
HF_SECRET = "hf_TOKEN-never-shown"


class FinetuneDemoSettings(StageSettings):
    """A stand-in stage class (uses the finetune prefix, so it reads the `finetune` section of a pipeline file)."""

    model_config = SettingsConfigDict(env_prefix="ASRFT_FINETUNE_")

    epochs: int = Field(3, description="passes over the data", examples=[5])
    lr: float = Field(1e-4, description="learning rate")
    min_seconds: float = Field(0.1, description="shortest clip")
    max_seconds: float = Field(30.0, description="longest clip")
    max_new_tokens: int = Field(128, description="decoding budget (not a secret despite the name)")
    tags: list[int] = Field(default_factory=list, description="numbers")
    hf_token: SecretStr | None = Field(None, description="Hugging Face token")

    @model_validator(mode="after")
    def _order(self) -> FinetuneDemoSettings:
        if self.min_seconds >= self.max_seconds:
            raise ValueError(
                f"min_seconds ({self.min_seconds}) must be below max_seconds ({self.max_seconds}); "
                "lower --min-seconds or raise --max-seconds"
            )
        return self


class RunDemoSettings(StageSettings):
    """A command whose prefix ASRFT_RUN_ overlaps the common variable ASRFT_RUN_ID."""

    model_config = SettingsConfigDict(env_prefix="ASRFT_RUN_")

    executor: str = "local"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith(("ASRFT_", "AWS_")):
            monkeypatch.delenv(var)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- precedence

LAYERS = {"yaml": 4, "env": 5, "cli": 6}


@pytest.mark.parametrize("pipeline", [False, True], ids=["flat-yaml", "pipeline-yaml"])
@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        ((), 3),
        (("yaml",), 4),
        (("env",), 5),
        (("cli",), 6),
        (("yaml", "env"), 5),
        (("yaml", "cli"), 6),
        (("env", "cli"), 6),
        (("yaml", "env", "cli"), 6),
    ],
)
def test_layer_precedence(tmp_path, monkeypatch, layers, expected, pipeline):
    config = None
    if "yaml" in layers:
        body = {"epochs": LAYERS["yaml"]}
        config = write_yaml(tmp_path / "c.yaml", {"finetune": body, "prepare": {"x": 1}} if pipeline else body)
    if "env" in layers:
        monkeypatch.setenv("ASRFT_FINETUNE_EPOCHS", str(LAYERS["env"]))
    cli = {"epochs": str(LAYERS["cli"])} if "cli" in layers else {}
    assert load_settings(FinetuneDemoSettings, cli, config).epochs == expected


def test_pipeline_yaml_reads_common_keys_and_own_section(tmp_path):
    config = write_yaml(tmp_path / "pipeline.yaml", {
        "artifacts": "s3://bucket/runs",
        "run_id": "exp1",
        "s3": {"endpoint_url": "http://minio:9000"},
        "prepare": {"train_csv": "not/a/finetune/setting.csv"},  # another stage's section is not ours
        "finetune": {"epochs": 7, "s3": {"region": "cn-north-1"}},
    })
    s = load_settings(FinetuneDemoSettings, {}, config)
    assert (s.artifacts, s.run_id, s.epochs) == ("s3://bucket/runs", "exp1", 7)
    assert (s.s3.endpoint_url, s.s3.region) == ("http://minio:9000", "cn-north-1")  # merged, not replaced


def test_pipeline_yaml_unknown_top_level_key(tmp_path):
    config = write_yaml(tmp_path / "pipeline.yaml", {"finetune": {"epochs": 2}, "epohcs": 3})
    with pytest.raises(SettingsError, match=r"unknown top-level key\(s\) \['epohcs'\]"):
        load_settings(FinetuneDemoSettings, {}, config)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"ASRFT_ARTIFACTS": "s3://common/runs"}, "s3://common/runs"),
        ({"ASRFT_FINETUNE_ARTIFACTS": "/mnt/stage"}, "/mnt/stage"),
        ({"ASRFT_ARTIFACTS": "s3://common/runs", "ASRFT_FINETUNE_ARTIFACTS": "/mnt/stage"}, "/mnt/stage"),
        ({"ASRFT_ARTIFACTS": ""}, "from-yaml"),  # blank means unset
        ({"ASRFT_FINETUNE_ARTIFACTS": ""}, "from-yaml"),
    ],
)
def test_common_env_vs_stage_env(tmp_path, monkeypatch, env, expected):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    config = write_yaml(tmp_path / "c.yaml", {"artifacts": "from-yaml"})
    assert load_settings(FinetuneDemoSettings, {}, config).artifacts == expected


def test_nested_s3_env_and_cli(monkeypatch):
    monkeypatch.setenv("ASRFT_S3__ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("ASRFT_S3__REGION", "us-east-1")
    monkeypatch.setenv("ASRFT_FINETUNE_S3__REGION", "cn-north-1")  # stage-specific beats common
    s = load_settings(FinetuneDemoSettings)
    assert (s.s3.endpoint_url, s.s3.region) == ("http://minio:9000", "cn-north-1")
    s = parse_args(FinetuneDemoSettings, ["--s3-region", "eu-west-1"], prog="t", description="t")
    assert (s.s3.endpoint_url, s.s3.region) == ("http://minio:9000", "eu-west-1")


def test_cli_flag_types():
    s = parse_args(FinetuneDemoSettings, ["--force", "--tags", "1", "--tags", "2", "--log-level", "DEBUG"],
                   prog="t", description="t")
    assert (s.force, s.tags, s.log_level) == (True, [1, 2], "DEBUG")
    with pytest.raises(SystemExit):  # argparse rejects a choice outside the Literal
        parse_args(FinetuneDemoSettings, ["--log-level", "LOUD"], prog="t", description="t")


# ------------------------------------------------------------------------------------------- strictness


@pytest.mark.parametrize(
    ("source", "value", "expected"),
    [
        ("yaml", {"epohcs": 5}, ["epohcs: not a finetune setting (from --config", "asr-ft finetune --help"]),
        ("env", {"ASRFT_FINETUNE_EPOHCS": "5"}, ["ASRFT_FINETUNE_EPOHCS: not a finetune setting (environment variable)"]),
        ("env", {"ASRFT_S3__ENDPOINT": "http://x"}, ["s3.endpoint: not a setting of s3"]),
        ("yaml", {"s3": {"regoin": "x"}}, ["s3.regoin: not a setting of s3"]),
    ],
)
def test_unknown_keys_are_rejected(tmp_path, monkeypatch, source, value, expected):
    config = None
    if source == "yaml":
        config = write_yaml(tmp_path / "c.yaml", value)
    else:
        for k, v in value.items():
            monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError) as err:
        load_settings(FinetuneDemoSettings, {}, config)
    for text in expected:
        assert text in str(err.value)


def test_common_variable_is_not_an_unknown_stage_variable(monkeypatch):
    monkeypatch.setenv("ASRFT_RUN_ID", "exp7")  # starts with the ASRFT_RUN_ prefix, but is the common run id
    monkeypatch.setenv("ASRFT_RUN_EXECUTOR", "k8s")
    s = load_settings(RunDemoSettings)
    assert (s.run_id, s.executor) == ("exp7", "k8s")


def test_every_problem_is_reported_with_flag_and_variable(monkeypatch):
    monkeypatch.setenv("ASRFT_FINETUNE_LR", "fast")
    monkeypatch.setenv("ASRFT_FINETUNE_TYPO", "1")
    with pytest.raises(SettingsError) as err:
        parse_args(FinetuneDemoSettings, ["--epochs", "many", "--run-id", "../up", "--tags", "x"],
                   prog="t", description="t")
    msg = str(err.value)
    assert msg.startswith("5 problem(s) with the finetune settings")
    for text in [
        "epochs: Input should be a valid integer", "(got 'many')", "--epochs or ASRFT_FINETUNE_EPOCHS",
        "lr: Input should be a valid number", "--lr or ASRFT_FINETUNE_LR",
        "run_id: String should match pattern", "--run-id or ASRFT_FINETUNE_RUN_ID or ASRFT_RUN_ID",
        "tags.0: Input should be a valid integer", "--tags or ASRFT_FINETUNE_TAGS.",
        "ASRFT_FINETUNE_TYPO: not a finetune setting",
    ]:
        assert text in msg, text


def test_cross_field_check_message():
    with pytest.raises(SettingsError) as err:
        load_settings(FinetuneDemoSettings, {"min_seconds": "40"})
    assert "min_seconds (40.0) must be below max_seconds (30.0); lower --min-seconds or raise --max-seconds" in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("epochs: [1", "not valid YAML"), ("- a\n- b\n", "expected a mapping"), (None, "file not found")],
)
def test_bad_config_file(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SettingsError, match=expected):
        load_settings(FinetuneDemoSettings, {}, path)


# ------------------------------------------------------------------------------------------- secrets


def with_secrets(monkeypatch) -> None:
    monkeypatch.setenv("ASRFT_S3__SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("ASRFT_S3__ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("ASRFT_FINETUNE_HF_TOKEN", HF_SECRET)


def test_redacted_masks_secrets_only(monkeypatch):
    with_secrets(monkeypatch)
    s = load_settings(FinetuneDemoSettings, {"max_new_tokens": "64"})
    assert s.s3.secret_access_key.get_secret_value() == SECRET  # the value itself is there for the client
    r = redacted(s)
    assert r["s3"]["secret_access_key"] == r["s3"]["access_key_id"] == r["hf_token"] == "**********"
    assert r["max_new_tokens"] == 64  # "tokens" in a name is not a secret
    assert SECRET not in json.dumps(r) and HF_SECRET not in json.dumps(r)


@pytest.mark.parametrize(
    ("change", "fingerprint_changes"),
    [
        ({"max_new_tokens": "65"}, True),
        ({"epochs": "4"}, True),
        ({"hf_token": "another"}, False),
        ({"log_level": "DEBUG"}, False),
        ({"run_id": "other"}, False),
        ({"artifacts": "elsewhere/"}, False),
        ({"s3.region": "cn-north-1"}, False),
    ],
)
def test_fingerprint_fields(change, fingerprint_changes):
    start = {"max_new_tokens": "64", "hf_token": "one"}
    base = fingerprint_fields(load_settings(FinetuneDemoSettings, start))
    changed = fingerprint_fields(load_settings(FinetuneDemoSettings, {**start, **change}))
    assert (base != changed) is fingerprint_changes


def test_secret_never_in_help(monkeypatch, capsys):
    with_secrets(monkeypatch)
    parser = build_parser(FinetuneDemoSettings, prog="asr-ft finetune", description="d")
    text = parser.format_help()
    assert "--epochs" in text and "e.g. 5" in text and "ASRFT_FINETUNE_EPOCHS" in text
    assert "--s3-secret-access-key" in text and "ASRFT_S3__SECRET_ACCESS_KEY" in text
    with pytest.raises(SystemExit) as exit_:
        stage_main(FinetuneDemoSettings, ["--help"], "Fine-tune.\n\nlong text")
    assert exit_.value.code == 0
    out = capsys.readouterr()
    assert "--max-new-tokens" in out.out
    assert SECRET not in out.out + out.err and HF_SECRET not in out.out + out.err


def test_secret_never_in_error_messages(monkeypatch, capsys):
    with_secrets(monkeypatch)
    monkeypatch.setenv("ASRFT_S3__SECRET_KEY", SECRET)  # misspelt secret variable: rejected, value not echoed
    monkeypatch.setenv("ASRFT_S3__SESSION_TOKEN", "")
    assert stage_main(FinetuneDemoSettings, ["--epochs", "x"], "Fine-tune.") is None
    err = capsys.readouterr().err
    assert "s3.secret_key: not a setting of s3" in err and "epochs" in err
    assert SECRET not in err


def test_secret_never_in_logs_or_manifest(tmp_path, monkeypatch, caplog):
    with_secrets(monkeypatch)
    s = load_settings(FinetuneDemoSettings, {"artifacts": str(tmp_path), "run_id": "r1"})
    caplog.set_level("DEBUG")

    def body(ctx):
        (ctx.out / "model.txt").write_text("weights")
        return {"loss": 0.5}

    assert run_stage("finetune", s, {}, body) == 0
    manifest = (tmp_path / "r1" / "finetune" / "_manifest.json").read_text()
    assert '"**********"' in manifest and '"loss": 0.5' in manifest
    assert "finetune settings:" in caplog.text
    for text in (manifest, caplog.text):
        assert SECRET not in text and HF_SECRET not in text and "AKIDEXAMPLE" not in text


# ------------------------------------------------------------------------------------------------ report_to


@pytest.mark.parametrize(("value", "expected"), [
    (None, ["tensorboard"]), ("tensorboard", ["tensorboard"]), ("none", ["none"]), (["tensorboard"], ["tensorboard"]),
])
def test_report_to_accepts_the_installed_trackers(value, expected):
    from jobs.finetune import FinetuneSettings

    kwargs = {} if value is None else {"report_to": value}
    assert FinetuneSettings(**kwargs).report_to == expected


@pytest.mark.parametrize(("value", "message"), [
    ("tensorboard,none", "'none' cannot be combined"),
    ("comet", "report_to"),  # not one of the trackers offered
])
def test_report_to_rejects_what_cannot_work(value, message):
    from pydantic import ValidationError

    from jobs.finetune import FinetuneSettings

    with pytest.raises(ValidationError, match=message):
        FinetuneSettings(report_to=value)


def test_report_to_a_tracker_that_is_not_installed_says_what_to_install(monkeypatch):
    import importlib.util

    from pydantic import ValidationError

    from jobs.finetune import FinetuneSettings

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ValidationError, match="pip install mlflow"):
        FinetuneSettings(report_to=["tensorboard", "mlflow"])
