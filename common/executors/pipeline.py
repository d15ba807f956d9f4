"""A pipeline: one YAML file that configures every step, and the environment contract each step runs with.

    run_id: demo                 # common keys, passed to every step as ASRFT_<FIELD>
    artifacts: runs/
    run: {executor: local}       # the orchestrator's own settings
    demo-data: {out: demo_data}  # optional first step: make demo speech
    prepare: {train_csv: ..., audio_dir: ...}
    pretrained: {model: "bundled:whisper-base"}
    extract: {}
    finetune: {...}
    export: {...}
    evaluate: {...}

The steps and their order come from the stage registry (common/core/registry.py). Every executor (local
subprocesses, docker compose, Kubernetes Jobs) runs the same command, ``asr-ft <step>``, with the same
environment: ``ASRFT_<FIELD>`` for the common keys and ``ASRFT_<STEP>_<FIELD>`` for each key of the step's
section (JSON for lists and mappings). Values the user already set in the environment win over the file, as
they do for a single stage.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from common.core.registry import STAGES, pipeline_steps, stage
from common.core.settings import (
    COMMON_FIELDS,
    ENV_PREFIX,
    S3_TUNING,
    S3Settings,
    SettingsError,
    load_yaml,
    yaml_section,
)

DEMO_CONFIG = "demo.yaml"  # packaged with jobs/run
PIPELINE_ENV = f"{ENV_PREFIX}PIPELINE"  # set for every step `asr-ft run` starts


def demo_config_path() -> Path:
    return Path(str(resources.files("jobs.run") / DEMO_CONFIG))


def load_pipeline(path: Path | None) -> dict[str, Any]:
    data = load_yaml(path or demo_config_path())
    sections = {s.name for s in STAGES}  # the steps', the orchestrator's own ("run"), score's
    for key in data:
        if key not in COMMON_FIELDS and key.replace("_", "-") not in sections:
            raise SettingsError(
                f"{path}: unknown top-level key {key!r}. Expected the common keys {list(COMMON_FIELDS)}, "
                f"'run', and step sections {list(pipeline_steps())}."
            )
    return data


def steps_of(pipeline: dict[str, Any], only: list[str] | None = None) -> list[str]:
    """The pipeline's steps in order: every step of the registry, an optional one (demo-data) only when the
    file has its section; ``only`` picks some of them."""
    steps = [s for s in pipeline_steps()
             if not stage(s).optional or s in pipeline or s.replace("-", "_") in pipeline]
    if only:
        unknown = sorted(set(only) - set(steps))
        if unknown:
            raise SettingsError(f"--stages: unknown step(s) {unknown}; this pipeline has {steps}")
        steps = [s for s in steps if s in only]
    return steps


def settings_class(step: str):
    """The StageSettings subclass of a step (its module's class whose env prefix is ``ASRFT_<STEP>_``)."""
    import importlib

    from common.core.settings import StageSettings

    prefix = f"{ENV_PREFIX}{step.upper().replace('-', '_')}_"
    for name in (stage(step).module, stage(step).module + ".__main__"):
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, StageSettings) and value is not StageSettings
                    and value.model_config.get("env_prefix", "").upper() == prefix):
                return value
    raise LookupError(f"no settings class with prefix {prefix} in {module.__name__}")


def validate_pipeline(pipeline: dict[str, Any], path: Path | str, steps: list[str],
                      common: dict[str, Any]) -> list[str]:
    """Every problem of every step's section, checked with that step's own settings class before anything runs:
    ``<file>: section '<step>', key '<key>': <what is wrong>``. Values come from the file, the common values
    from the orchestrator, anything else from the environment as the step will see it."""
    from pydantic import ValidationError

    problems: list[str] = []
    given = {k: v for k, v in common.items() if v is not None and k != "s3"}
    for step in steps:
        try:
            section = yaml_section(pipeline, step, path)
        except SettingsError as e:
            problems.append(str(e))
            continue
        own = {k: v for k, v in section.items() if k not in COMMON_FIELDS}
        cls = settings_class(step)
        try:
            cls(**{**own, **given})
        except ValidationError as e:
            for err in e.errors():
                loc = ".".join(str(p) for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                where = f"section '{step}'" + (f", key '{loc}'" if loc else "")
                if err["type"] == "extra_forbidden":
                    msg = (f"not a setting of {step}; check the spelling (`asr-ft {step} --help` lists the "
                           "settings)")
                elif err["type"] == "missing":
                    msg = f"required; add `{loc}:` to the '{step}' section"
                got = err.get("input")
                if loc and err["type"] not in ("missing", "extra_forbidden") and not isinstance(got, dict) \
                        and got is not None and "secret" not in loc and "password" not in loc:
                    msg += f" (got {repr(got)[:80]})"
                problems.append(f"{path}: {where}: {msg}")
    return problems


def env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def common_env(common: dict[str, Any], *, secrets: bool) -> dict[str, str]:
    """ASRFT_<FIELD> for the orchestrator's resolved common values (CLI > env > file). S3 secrets only when
    ``secrets`` (a local subprocess); containers get them from a Secret instead."""
    env: dict[str, str] = {}
    for key, value in common.items():
        if value is None:
            continue
        if key == "s3":
            for sub, v in value.items():
                if v is None or (sub in S3_TUNING and v == S3Settings.model_fields[sub].default):
                    continue  # the retry/timeout/lease knobs only when changed: the steps have the same defaults
                if hasattr(v, "get_secret_value"):
                    if not secrets:
                        continue
                    v = v.get_secret_value()
                env[f"{ENV_PREFIX}S3__{sub.upper()}"] = env_value(v)
        else:
            env[f"{ENV_PREFIX}{key.upper()}"] = env_value(value)
    env[PIPELINE_ENV] = "1"  # the step runs in a pipeline: changed settings redo it without --force
    return env


def section_env(pipeline: dict[str, Any], step: str) -> dict[str, str]:
    """ASRFT_<STEP>_<FIELD> for each key of the step's section of the pipeline file."""
    prefix = f"{ENV_PREFIX}{step.upper().replace('-', '_')}_"
    section = {k: v for k, v in yaml_section(pipeline, step).items() if k not in COMMON_FIELDS}
    return {prefix + k.upper(): env_value(v) for k, v in section.items() if v is not None}


def local_env(common: dict[str, Any], pipeline: dict[str, Any], step: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """A local step's process environment: file < user's environment < orchestrator's common values."""
    base = dict(os.environ if base is None else base)
    return {**section_env(pipeline, step), **base, **common_env(common, secrets=True)}
