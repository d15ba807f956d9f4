"""Stage settings: one pydantic-settings class per stage, loaded from four layers (later wins):

    built-in defaults  <  --config FILE.yaml  <  environment  <  CLI flags

Environment variables are ``ASRFT_<STAGE>_<FIELD>`` (``__`` for nesting, e.g.
``ASRFT_FINETUNE_S3__ENDPOINT_URL``). The common fields (artifacts, run_id, force, log_level, s3) can also be
given once for every stage as ``ASRFT_<FIELD>`` (``ASRFT_ARTIFACTS=s3://bucket/runs``) — this is how the
orchestrator, docker compose and Kubernetes pass them to every container.

A YAML config is either flat (keys of this stage) or a pipeline file with one section per stage plus the
common keys at the top level; a stage reads the top-level common keys and its own section.

Validation collects every error and renders each with the flag and the variable that set it, so the user
knows how to fix it. Secrets (S3 keys) are ``SecretStr``: never printed, never written to manifests.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from common.core.registry import STAGES

log = logging.getLogger(__name__)

ENV_PREFIX = "ASRFT_"
COMMON_FIELDS = ("artifacts", "run_id", "force", "log_level", "s3")
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"  # also a valid Kubernetes label value

_config_file: ContextVar[Path | None] = ContextVar("asrft_config_file", default=None)


class SettingsError(Exception):
    """Bad settings. ``str()`` is a ready-to-print list of every problem and how to fix it."""


class S3Settings(BaseModel):
    """Connection to an S3-compatible store. Unset fields fall back to boto3's own chain
    (AWS_* variables, ~/.aws/credentials, instance roles)."""

    model_config = {"extra": "forbid"}

    endpoint_url: str | None = Field(None, description="S3 endpoint for MinIO & co.", examples=["http://minio:9000"])
    region: str | None = Field(None, description="S3 region", examples=["us-east-1"])
    access_key_id: SecretStr | None = Field(None, description="access key (prefer a Secret / AWS_ACCESS_KEY_ID)")
    secret_access_key: SecretStr | None = Field(None, description="secret key (prefer a Secret)")
    session_token: SecretStr | None = Field(None, description="session token for temporary credentials")
    addressing_style: Literal["auto", "path", "virtual"] = Field("auto", description="bucket addressing style")
    retry_seconds: float = Field(
        600.0, gt=0, description="how long one S3 operation keeps retrying through an outage (adaptive retries, "
        "backing off) before the stage fails; a checkpoint upload waits that long while training pauses",
        examples=[600, 60],
    )
    connect_timeout: float = Field(10.0, gt=0, description="seconds to wait for a connection to the S3 endpoint")
    read_timeout: float = Field(60.0, gt=0, description="seconds to wait for an S3 response (a hung endpoint)")
    lease_seconds: float = Field(
        300.0, ge=5, description="the run lock on S3: a holder that has not renewed it for this long (a killed "
        "pod) is taken over by the next run", examples=[300],
    )


S3_TUNING = ("retry_seconds", "connect_timeout", "read_timeout", "lease_seconds")  # S3Settings' behaviour knobs


class StageSettings(BaseSettings):
    """Fields every stage has. Subclasses set ``model_config`` with their own ``env_prefix``."""

    # env_ignore_empty: a blank variable (common in Helm/compose templates) means "not set", as for ASRFT_<FIELD>.
    model_config = SettingsConfigDict(
        extra="forbid", env_nested_delimiter="__", validate_default=True, env_ignore_empty=True
    )

    artifacts: str = Field(
        "runs/",
        description="where runs live: a folder, a PVC mount path, or s3://bucket/prefix",
        examples=["runs/", "/mnt/artifacts", "s3://my-bucket/asr-ft"],
    )
    run_id: str = Field(
        "default", pattern=RUN_ID_PATTERN, description="run name: outputs go to <artifacts>/<run-id>/<stage>/",
        examples=["demo", "exp-2026-11-25"],
    )
    force: bool = Field(False, description="redo the stage even if its manifest matches")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="logging level")
    s3: S3Settings = Field(default_factory=S3Settings, description="S3 connection (only for s3:// URIs)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: CLI (init kwargs) > stage env > common env > YAML > defaults.
        return (init_settings, env_settings, _CommonEnvSource(settings_cls), _YamlSource(settings_cls))


@contextmanager
def environment(extra: Mapping[str, str]) -> Iterator[None]:
    """os.environ with ``extra`` inside the block (child processes started there copy it), as it was afterwards."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stage_name(cls: type[StageSettings]) -> str:
    prefix = cls.model_config.get("env_prefix", "")
    assert prefix.startswith(ENV_PREFIX), f"{cls.__name__} needs env_prefix ASRFT_<STAGE>_"
    return prefix[len(ENV_PREFIX):].rstrip("_").lower().replace("_", "-")


def env_name(cls: type[StageSettings], field: str) -> str:
    return f"{cls.model_config['env_prefix']}{field.upper()}"


class _CommonEnvSource(PydanticBaseSettingsSource):
    """ASRFT_ARTIFACTS, ASRFT_RUN_ID, ASRFT_S3__ENDPOINT_URL, ... shared by every stage."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in COMMON_FIELDS:
            key = f"{ENV_PREFIX}{name.upper()}"
            if name == "s3":
                nested = {
                    k[len(key) + 2:].lower(): v for k, v in os.environ.items() if k.startswith(key + "__") and v != ""
                }
                if nested:
                    out["s3"] = nested
            elif os.environ.get(key, "") != "":
                out[name] = os.environ[key]
        return out


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get()
        if path is None:
            return {}
        return yaml_section(load_yaml(path), stage_name(self.settings_cls), path)


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"--config {path}: file not found. Pass the path of a YAML settings file.") from None
    except yaml.YAMLError as e:
        raise SettingsError(f"--config {path}: not valid YAML ({e}). Fix the syntax and retry.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"--config {path}: expected a mapping of settings at the top level, got {type(data).__name__}.")
    return data


def yaml_section(data: dict[str, Any], stage: str, path: Path | str = "<config>") -> dict[str, Any]:
    """A pipeline file (has a section named after any stage) → common keys + this stage's section.
    Its sections: one per command of the stage registry (the orchestrator's own is ``run``)."""
    sections = [s.name for s in STAGES]
    section_names = {s.replace("-", "_") for s in sections} | set(sections)
    if not any(k in section_names for k in data):
        return dict(data)  # flat file for this stage
    unknown = [k for k in data if k not in section_names and k not in COMMON_FIELDS]
    if unknown:
        raise SettingsError(
            f"--config {path}: unknown top-level key(s) {unknown}. A pipeline file has the common keys "
            f"{list(COMMON_FIELDS)} and one section each of {sections}."
        )
    section = data.get(stage) or data.get(stage.replace("-", "_")) or {}
    if not isinstance(section, dict):
        raise SettingsError(f"--config {path}: section '{stage}' must be a mapping, got {type(section).__name__}.")
    merged = {k: v for k, v in data.items() if k in COMMON_FIELDS}
    for key, value in section.items():  # one level deep, so top-level s3.endpoint_url + section s3.region both hold
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = {**merged[key], **value}
        merged[key] = value
    return merged


# ----------------------------------------------------------------------------------------------- CLI flags


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _help_for(cls: type[StageSettings], name: str, info: FieldInfo, env: str) -> str:
    parts = [info.description or ""]
    default = info.get_default(call_default_factory=False)
    if default is not None and default is not PydanticUndefined and not isinstance(default, BaseModel | SecretStr):
        parts.append(f"[default: {default}]")
    if info.examples:
        parts.append("e.g. " + ", ".join(str(e) for e in info.examples))
    parts.append(f"env {env}")
    return " ".join(p for p in parts if p).replace("%", "%%")


def build_parser(cls: type[StageSettings], *, prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """argparse parser with one flag per settings field (nested models flattened one level:
    ``--s3-endpoint-url``). Flags default to "not given" so lower layers show through."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS, allow_abbrev=False,  # `--epoch 3` is an error, not --epochs
    )
    aliases: dict[str, tuple[str, ...]] = getattr(cls, "cli_aliases", {})
    parser.add_argument("--config", type=Path, help="YAML settings file (flat, or a pipeline file with stage sections)")
    groups = {"stage": parser.add_argument_group(f"{stage_name(cls)} settings"),
              "common": parser.add_argument_group("common settings (every stage)")}
    for name, info in cls.model_fields.items():
        group = groups["common" if name in COMMON_FIELDS else "stage"]
        tp = _unwrap_optional(info.annotation)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            for sub, sub_info in tp.model_fields.items():
                group.add_argument(
                    _flag(f"{name}_{sub}"), dest=f"{name}.{sub}", metavar="VALUE",
                    help=_help_for(cls, sub, sub_info, f"{ENV_PREFIX}{name.upper()}__{sub.upper()}" if name in COMMON_FIELDS
                                  else env_name(cls, f"{name}__{sub}")),
                )
            continue
        kwargs: dict[str, Any] = {"dest": name, "help": _help_for(cls, name, info, env_name(cls, name))}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple):
            kwargs.update(action="append", metavar="VALUE")
            kwargs["help"] += " (repeat the flag for several values)"
        elif typing.get_origin(tp) is Literal:
            kwargs.update(choices=[str(c) for c in typing.get_args(tp)], metavar="{" + ",".join(map(str, typing.get_args(tp))) + "}")
        else:
            kwargs["metavar"] = name.upper()
        group.add_argument(_flag(name), *aliases.get(name, ()), **kwargs)
    return parser


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if "." in key:
            top, sub = key.split(".", 1)
            out.setdefault(top, {})[sub] = value
        else:
            out[key] = value
    return out


def unknown_env_vars(cls: type[StageSettings]) -> list[str]:
    """``ASRFT_<STAGE>_*`` variables that name no field of ``cls`` (typos pydantic-settings would ignore).
    Common variables (``ASRFT_RUN_ID`` for a stage whose prefix is ``ASRFT_RUN_``) are not counted."""
    prefix = cls.model_config["env_prefix"].upper()
    common = {f"{ENV_PREFIX}{name.upper()}" for name in COMMON_FIELDS}
    unknown = []
    for var in os.environ:
        upper = var.upper()
        if not upper.startswith(prefix) or upper in common or upper.startswith(f"{ENV_PREFIX}S3__"):
            continue
        field = upper[len(prefix):].split("__", 1)[0].lower()
        if field not in cls.model_fields:
            unknown.append(var)
    return sorted(unknown)


def load_settings(cls: type[StageSettings], cli: dict[str, Any] | None = None, config: Path | None = None):
    """Build settings from all layers; raise SettingsError listing every problem and how to fix it."""
    token = _config_file.set(Path(config) if config else None)
    problems: list[str] = []
    settings = None
    try:
        settings = cls(**_nest(cli or {}))
    except ValidationError as e:
        problems = format_validation_error(cls, e, config).splitlines()[1:]
    finally:
        _config_file.reset(token)
    stage = stage_name(cls)
    problems += [
        f"  - {var}: not a {stage} setting (environment variable). Unset it, or check the spelling; "
        f"`asr-ft {stage} --help` lists each setting's variable."
        for var in unknown_env_vars(cls)
    ]
    if problems:
        raise SettingsError("\n".join([f"{len(problems)} problem(s) with the {stage} settings · 配置有误:", *problems]))
    return settings


def parse_args(cls: type[StageSettings], argv: list[str] | None, *, prog: str, description: str, epilog: str = ""):
    parser = build_parser(cls, prog=prog, description=description, epilog=epilog)
    ns = vars(parser.parse_args(argv))
    config = ns.pop("config", None)
    return load_settings(cls, ns, config)


def _is_model_field(cls: type[StageSettings], name: str) -> bool:
    tp = _unwrap_optional(cls.model_fields[name].annotation)
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def format_validation_error(cls: type[StageSettings], err: ValidationError, config: Path | str | None = None) -> str:
    stage = stage_name(cls)
    origin = f" (from --config {config})" if config else ""
    lines = [f"{len(err.errors())} problem(s) with the {stage} settings · 配置有误:"]
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        msg = e["msg"].removeprefix("Value error, ")
        if not loc:  # a cross-field check; its message says how to fix it
            lines.append(f"  - {msg}")
            continue
        field = loc[0]
        if field not in cls.model_fields:  # only a YAML file can bring an unknown top-level key
            lines.append(
                f"  - {field}: not a {stage} setting{origin}. Remove it, or check the spelling; "
                f"`asr-ft {stage} --help` lists the settings."
            )
            continue
        # Flags and variables exist per field and per field of a nested model (--s3-endpoint-url), not per
        # list item: tags.0 is set with --tags.
        path = loc[:2] if len(loc) > 1 and _is_model_field(cls, field) else loc[:1]
        dotted = ".".join(loc)
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {dotted}: not a setting of {field}; remove it or check the spelling "
                         f"(`asr-ft {stage} --help` lists them).")
            continue
        flag = _flag("_".join(path))
        envs = [env_name(cls, "__".join(path))]
        if field in COMMON_FIELDS:
            envs.append(ENV_PREFIX + "__".join(p.upper() for p in path))
        got = e.get("input")
        if any(_SECRET_RE.search(p) for p in loc):
            got_s = ""  # never echo a secret, not even a malformed one
        else:
            got_s = "" if isinstance(got, dict) or got is None else f" (got {str(got)[:80]!r})"
        lines.append(f"  - {dotted}: {msg}{got_s}. Set it with {flag} or {' or '.join(envs)}.")
    return "\n".join(lines)


# A name is secret-looking when it ends in one of these words: hf_token, secret_access_key, db_password,
# but not max_new_tokens, tokenizer or audio_tokens (those change results and must be fingerprinted).
_SECRET_RE = re.compile(
    r"(^|_)(secret|secret_key|password|passwd|token|api_key|access_key|access_key_id|credentials?)$", re.I
)


SECRET_MASK = "**********"  # what a secret shows as in manifests, logs and dry runs


def is_secret_name(name: str) -> bool:
    """A setting's or environment variable's name that holds a secret (ASRFT_S3__SESSION_TOKEN, hf_token,
    AWS_SECRET_ACCESS_KEY), not one that merely mentions tokens (max_new_tokens)."""
    return bool(_SECRET_RE.search(name))


def redact_env(env: dict[str, Any]) -> dict[str, Any]:
    """An environment (or any name → value mapping) with the values of secret-looking names masked."""
    return {k: SECRET_MASK if v not in (None, "") and is_secret_name(k) else v for k, v in env.items()}


def redact_tree(obj: Any) -> Any:
    """A manifest-like tree (Kubernetes Jobs, compose services) with secrets masked: values under
    secret-looking keys and ``{"name": <secret-looking>, "value": ...}`` environment entries."""
    if isinstance(obj, dict):
        if isinstance(obj.get("name"), str) and "value" in obj and is_secret_name(obj["name"]):
            return {**obj, "value": SECRET_MASK}
        return {k: SECRET_MASK if isinstance(v, str) and v and is_secret_name(str(k)) else redact_tree(v)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_tree(v) for v in obj]
    return obj


def secret_values(settings: BaseModel | None = None, env: dict[str, str] | None = None) -> set[str]:
    """The secret strings this process knows (settings' SecretStr fields and secret-looking environment
    variables): what the log filter masks wherever they appear, e.g. in a library's DEBUG output."""
    found: set[str] = set()

    def walk(obj: Any, key: str = "") -> None:
        if isinstance(obj, SecretStr):
            found.add(obj.get_secret_value())
        elif isinstance(obj, BaseModel):
            for name in type(obj).model_fields:
                walk(getattr(obj, name), name)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, str(k))
        elif isinstance(obj, str) and key and is_secret_name(key):
            found.add(obj)

    if settings is not None:
        walk(settings)
    for k, v in (os.environ if env is None else env).items():
        if v and is_secret_name(k):
            found.add(v)
    return {v for v in found if len(v) >= 4}  # a 1-3 character "secret" would mask unrelated text


def redacted(settings: BaseModel) -> dict[str, Any]:
    """JSON-safe settings with every secret masked (SecretStr and secret-looking names)."""

    def walk(obj: Any, key: str = "") -> Any:
        if isinstance(obj, dict):
            return {k: walk(v, k) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if obj is not None and _SECRET_RE.search(key):
            return SECRET_MASK
        return obj

    return walk(settings.model_dump(mode="json"))


def fingerprint_fields(settings: StageSettings) -> dict[str, Any]:
    """Settings that change a stage's result (not where it lives or how loudly it logs)."""
    data = redacted(settings)
    for k in ("artifacts", "run_id", "force", "log_level", "s3"):
        data.pop(k, None)
    return data
