"""The compose executor: a pipeline as a compose project, one service per step, run one after another.

    asr-ft run --config pipeline.yaml --executor compose             # run it (docker compose, or podman)
    asr-ft run --executor compose --dry-run > docker-compose.yml     # how the committed demo file is made

The project (``compose_project``) has one service per step running ``asr-ft <step>`` in the asr-ft image with
the environment every executor gives a step (``common_env(secrets=False)`` + ``section_env``, see
common/executors/pipeline.py), plus the paths a read-only root filesystem needs. Image, user, paths, that
environment and the GPU step come from the container contract (common/executors/contract.py), as for
Kubernetes. Services run as uid 10001 with a read-only root filesystem and a tmpfs ``/tmp``; they share one
volume at ``/artifacts`` (``ASRFT_ARTIFACTS`` unless the pipeline's artifacts are ``s3://``), which is also
their working directory, so relative data paths of the pipeline file resolve inside the volume. Each service
``depends_on`` the previous one with ``condition: service_completed_successfully``, so ``docker compose up``
runs the steps in order. The GPU step (finetune) uses the CUDA image and reserves one NVIDIA GPU;
``gpu: false`` (or the documented override file docker-compose.cpu.yml) keeps it on the CPU image without a
reservation.

Running (``run_compose``): the project is written to a temporary file and each step is started on its own,
in order, so the run stops at the first failure with that step's exit code:

    docker   docker compose -p PROJECT -f FILE run --rm --no-deps STEP   (Compose v2; builds missing images)
    podman   podman run --rm … IMAGE STEP      the same service translated to podman flags (``podman_command``);
             works without podman-compose (GPUs through CDI: ``--device nvidia.com/gpu=all``)

``engine: auto`` takes docker when ``docker compose version`` answers, else podman. A step whose manifest in
the volume matches its inputs skips itself, so running again resumes. S3 credentials never appear in the
file: for ``s3://`` artifacts the services pass AWS_* / ASRFT_S3__* through from the caller's environment.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, field_validator

from common.core.settings import ENV_PREFIX, redact_tree
from common.core.stage import EXIT_BAD_INPUT, EXIT_OK
from common.executors import contract
from common.executors.contract import ARTIFACTS_PATH, GID, GPU_STEPS, IMAGE_REPO, TMP_PATH, UID
from common.executors.pipeline import load_pipeline

log = logging.getLogger(__name__)

GPU_SHM_SIZE = "2gb"  # /dev/shm of the training step (data loader workers); docker's default is 64 MB
VOLUME = "artifacts"  # the named volume's key; compose names it <project>_artifacts
DEFAULT_PROJECT = "asr-ft"
IMAGE_VAR, GPU_IMAGE_VAR = "ASRFT_IMAGE", "ASRFT_GPU_IMAGE"  # `ASRFT_IMAGE=… docker compose up` picks another image
CPU_OVERRIDE_FILE = "docker-compose.cpu.yml"
# Passed through from the caller's environment (never written into the file) when artifacts are s3://.
S3_PASS_THROUGH = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   f"{ENV_PREFIX}S3__ACCESS_KEY_ID", f"{ENV_PREFIX}S3__SECRET_ACCESS_KEY", f"{ENV_PREFIX}S3__SESSION_TOKEN")


class ComposeSettings(BaseModel):
    """``asr-ft run --executor compose`` settings (the ``compose:`` mapping of the pipeline's ``run:`` section)."""

    model_config = {"extra": "forbid"}

    engine: Literal["auto", "docker", "podman"] = Field(
        "auto", description="container engine: docker (Compose v2) or podman (no podman-compose needed); "
        "auto: docker when `docker compose` works, else podman")
    image: str | None = Field(None, description=f"image of the steps (default {IMAGE_REPO}:<version>)",
                              examples=[f"{IMAGE_REPO}:0.1.0"])
    gpu_image: str | None = Field(None, description="image of the GPU step finetune (default <image>-cuda)")
    gpu: bool | None = Field(None, description="reserve one NVIDIA GPU for finetune (default: when nvidia-smi "
                             "lists one); false keeps finetune on the CPU image")
    project: str = Field(DEFAULT_PROJECT, description="compose project name (prefix of the volume and containers)")
    volume: str = Field(VOLUME, description="named volume at /artifacts, or a host folder (./work, /data/asr) "
                        "bind-mounted there (writable by uid 10001)")

    @field_validator("project")
    @classmethod
    def _check_project(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", value):
            raise ValueError(f"{value!r}: a compose project name is lower-case letters, digits, '-' and '_'")
        return value


# ------------------------------------------------------------------------------------------------ the project


def _is_host_path(volume: str) -> bool:
    return volume.startswith(("/", "./", "../", "~")) or volume in (".", "..")


def artifacts_in_containers(common: dict[str, Any]) -> str:
    """ASRFT_ARTIFACTS inside the services: an s3:// URI as is, else the volume's mount path."""
    artifacts = str(common.get("artifacts") or "")
    return artifacts if artifacts.startswith("s3://") else ARTIFACTS_PATH


def step_env(step: str, pipeline: dict[str, Any], common: dict[str, Any]) -> dict[str, str]:
    """A service's full environment: the container contract's (the same as a Kubernetes step Job's)."""
    return contract.step_env(step, pipeline, common, artifacts_in_containers(common))


def compose_project(steps: list[str], pipeline: dict[str, Any], common: dict[str, Any], *,
                    image: str | None = None, gpu_image: str | None = None, gpu: bool = True,
                    project: str = DEFAULT_PROJECT, volume: str = VOLUME) -> dict[str, Any]:
    """The compose project as a plain dict: exactly what ``yaml.safe_load`` reads back from the rendered file,
    before compose's interpolation (image ``${ASRFT_IMAGE:-<default>}``, a literal ``$`` written ``$$``)."""
    image = image or f"${{{IMAGE_VAR}:-{contract.image()}}}"
    gpu_image = gpu_image or f"${{{GPU_IMAGE_VAR}:-{_cuda_tag(image)}}}"
    s3 = str(common.get("artifacts") or "").startswith("s3://")
    mount = f"{volume}:{ARTIFACTS_PATH}"
    services: dict[str, Any] = {}
    previous = None
    for step in steps:
        on_gpu = gpu and step in GPU_STEPS
        # Values as compose reads them: "$" written "$$" (interpolate() turns them back).
        env: dict[str, str | None] = {k: v.replace("$", "$$") for k, v in step_env(step, pipeline, common).items()}
        if s3:
            env.update(dict.fromkeys(S3_PASS_THROUGH))  # null: taken from the caller's environment if set
        service: dict[str, Any] = {
            "image": gpu_image if on_gpu else image,
            "build": {"context": ".", "dockerfile": contract.dockerfile(on_gpu)},
            "user": f"{UID}:{GID}",
            "read_only": True,
            "tmpfs": [TMP_PATH],
            "working_dir": ARTIFACTS_PATH,
            "volumes": [mount],
            "init": True,
            "command": [step],
        }
        if previous:
            service["depends_on"] = {previous: {"condition": "service_completed_successfully"}}
        if step in GPU_STEPS:
            service["shm_size"] = GPU_SHM_SIZE
        if on_gpu:
            service["deploy"] = {"resources": {"reservations": {"devices": [
                {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}}
        service["environment"] = env
        services[step] = service
        previous = step
    out: dict[str, Any] = {"name": project, "services": services}
    if not _is_host_path(volume):
        out["volumes"] = {volume: {}}
    return out


def _cuda_tag(image: str) -> str:
    m = re.fullmatch(r"\$\{\w+:-(.*)\}", image)  # the default inside ${ASRFT_IMAGE:-…}
    return contract.cuda_image(m.group(1) if m else image)


# ------------------------------------------------------------------------------------------------ rendering

_ANCHORED = ("image", "build", "user", "read_only", "tmpfs", "working_dir", "volumes", "init")  # x-step keys


def _flow(value: Any) -> str:
    """One YAML value on one line (flow style), quoted where YAML needs it (and "uid:gid" always)."""
    if isinstance(value, str) and re.fullmatch(r"\d+:\d+", value):
        return f'"{value}"'
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000, sort_keys=False)
    return text.removesuffix("\n...\n").strip()


def _env_value(value: str | None) -> str:
    return "" if value is None else " " + _flow(value)  # nothing after the colon: null, a pass-through


def render_compose(project: dict[str, Any], header: str = "") -> str:
    """The project as a readable compose file: shared service keys in an ``x-step`` anchor, the shared
    environment in an ``x-env`` anchor, one block per service. ``yaml.safe_load(text) == project``."""
    services: dict[str, Any] = project["services"]
    first = next(iter(services.values()))
    shared_keys = {k: first[k] for k in _ANCHORED}
    envs = [s["environment"] for s in services.values()]
    shared = {k: v for k, v in envs[0].items() if all(k in e and e[k] == v for e in envs)}

    lines = [header.rstrip("\n")] if header else []
    lines += [f"name: {project['name']}", "", "x-step: &step"]
    lines += [f"  {k}: {_flow(v)}" for k, v in shared_keys.items()]
    lines += ["", "x-env: &env"]
    lines += [f"  {k}:{_env_value(v)}" for k, v in shared.items()]
    lines += ["", "services:"]
    for name, service in services.items():
        lines += [f"  {name}:", "    <<: *step"]
        for key, value in service.items():
            if key in _ANCHORED and value == shared_keys[key]:
                continue
            if key == "environment":
                own = {k: v for k, v in value.items() if k not in shared}
                if not own:
                    lines.append("    environment: *env")
                    continue
                lines += ["    environment:", "      <<: *env"]
                lines += [f"      {k}:{_env_value(v)}" for k, v in own.items()]
            elif key == "depends_on":
                lines.append("    depends_on:")
                lines += [f"      {dep}: {_flow(cond)}" for dep, cond in value.items()]
            elif key == "deploy":
                devices = value["resources"]["reservations"]["devices"]
                lines += ["    deploy:", "      resources:", "        reservations:",
                          f"          devices: {_flow(devices)}"]
            else:
                lines.append(f"    {key}: {_flow(value)}")
    if "volumes" in project:
        lines += ["", "volumes:"] + [f"  {k}: {_flow(v)}" for k, v in project["volumes"].items()]
    text = "\n".join(lines) + "\n"
    loaded = {k: v for k, v in yaml.safe_load(text).items() if not k.startswith("x-")}
    assert loaded == project, "render_compose lost or changed something"
    return text


def compose_header(config: str, steps: list[str]) -> str:
    usage = [
        ("docker compose up", "GPU host: finetune reserves 1 GPU"),
        (f"docker compose -f docker-compose.yml -f {CPU_OVERRIDE_FILE} up", "CPU only (see that file)"),
        (f"{IMAGE_VAR}=registry/asr-ft:tag docker compose up", f"another image ({GPU_IMAGE_VAR}: finetune's)"),
        ("asr-ft run --executor compose", "the same, step by step; stops at a failure"),
    ]
    width = max(len(cmd) for cmd, _ in usage)
    return "\n".join([
        "# asr-ft pipeline as a compose project: one service per step, each waiting for the previous one to",
        "# complete successfully, all sharing one volume at /artifacts:",
        f"#   {' → '.join(steps)}",
        f"# Generated from {config} by `asr-ft run --executor compose --dry-run > <file>`; regenerate, don't edit.",
        "#",
        *(f"#   {cmd:<{width}}   # {what}" for cmd, what in usage),
        "#",
        f"# Every service runs `asr-ft <step>` as uid {UID} on a read-only root filesystem, with the environment",
        "# `asr-ft run` gives each step: ASRFT_<FIELD> for the common settings, ASRFT_<STEP>_<FIELD> for the step's",
        "# section. /artifacts is the working directory: relative paths of the pipeline (demo_data/…) land in the",
        "# volume. A step whose _manifest.json matches skips itself, so `up` again resumes. Read the report:",
        "#   docker compose run --rm --no-deps --entrypoint cat evaluate /artifacts/<run-id>/evaluate/report.md",
    ]) + "\n"


# ------------------------------------------------------------------------------------------------ running


def service_order(project: dict[str, Any]) -> list[str]:
    """Services in dependency order (each after everything it depends_on); errors on a cycle."""
    services = project["services"]
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ValueError(f"depends_on cycle: {' → '.join((*path, name))}")
        if name not in services:
            raise ValueError(f"{path[-1]} depends on {name!r}, which is not a service")
        state[name] = "visiting"
        for dep in services[name].get("depends_on") or {}:
            visit(dep, (*path, name))
        state[name] = "done"
        order.append(name)

    for name in services:
        visit(name, ())
    return order


_VAR_RE = re.compile(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*))?\}|\$(\w+)")


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose variable interpolation, the subset used here: ``${NAME}``, ``$NAME``, ``${NAME:-default}``
    (unset or empty), ``${NAME-default}`` (unset), ``$$`` for a literal ``$``."""
    env = os.environ if env is None else env

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group(1) or m.group(4), m.group(2), m.group(3)
        value = env.get(name)
        if op == ":-" and not value or op == "-" and value is None:
            return default
        return value or ""

    return _VAR_RE.sub(sub, text)


def podman_command(project: dict[str, Any], service: str, *, base_dir: Path,
                   env: dict[str, str] | None = None) -> list[str]:
    """``podman run`` flags for one compose service (the keys this module writes; others are refused)."""
    s = project["services"][service]
    known = {"image", "build", "user", "read_only", "tmpfs", "working_dir", "volumes", "init", "command",
             "environment", "depends_on", "shm_size", "deploy"}
    unknown = sorted(set(s) - known)
    if unknown:
        raise ValueError(f"service {service}: podman engine cannot translate {unknown}; use docker compose")
    cmd = ["podman", "run", "--rm", "--name", f"{project['name']}-{service}"]
    if s.get("user"):
        cmd += ["--user", str(s["user"])]
    if s.get("read_only"):
        cmd.append("--read-only")
    for tmp in s.get("tmpfs") or []:
        cmd += ["--tmpfs", tmp]
    if s.get("init"):
        cmd.append("--init")
    if s.get("working_dir"):
        cmd += ["--workdir", s["working_dir"]]
    for mount in s.get("volumes") or []:
        source, _, target = mount.partition(":")
        if _is_host_path(source):
            source = str((base_dir / Path(source).expanduser()).resolve())
        elif source in (project.get("volumes") or {}):
            source = f"{project['name']}_{source}"  # compose's name for a project volume
        cmd += ["--volume", f"{source}:{target}"]
    if s.get("shm_size"):
        cmd += ["--shm-size", str(s["shm_size"]).removesuffix("b")]
    if (s.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices"):
        cmd += ["--device", "nvidia.com/gpu=all"]  # CDI (nvidia-ctk cdi generate); the count is not translated
    for key, value in (s.get("environment") or {}).items():
        if value is None:  # pass-through: only when the caller has it, and never on the command line
            if (env or os.environ).get(key):
                cmd += ["--env", key]
            continue
        cmd += ["--env", f"{key}={interpolate(str(value), env)}"]
    cmd.append(interpolate(s["image"], env))
    cmd += [str(c) for c in s.get("command") or []]
    return cmd


def docker_command(file: Path, project: dict[str, Any], service: str, base_dir: Path) -> list[str]:
    tty = [] if sys.stdout.isatty() else ["-T"]
    return ["docker", "compose", "-p", project["name"], "-f", str(file), "--project-directory", str(base_dir),
            "run", "--rm", "--no-deps", *tty, service]


def detect_engine() -> str | None:
    if shutil.which("docker") and _quiet(["docker", "compose", "version"]):
        return "docker"
    if shutil.which("podman"):
        return "podman"
    return None


def detect_gpu() -> bool:
    return bool(shutil.which("nvidia-smi")) and _quiet(["nvidia-smi", "-L"])


def _quiet(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_compose(steps: list[str], pipeline: dict[str, Any], common: dict[str, Any], settings: Any) -> int:
    """Print the compose project (``settings.dry_run``) or run its services in order; the run's exit code.
    ``settings.compose`` (a ComposeSettings) when the run settings have it, else the defaults."""
    cfg: ComposeSettings = settings.compose
    gpu = cfg.gpu if cfg.gpu is not None else (True if settings.dry_run else detect_gpu())
    project = compose_project(steps, pipeline, common, image=cfg.image, gpu_image=cfg.gpu_image, gpu=gpu,
                              project=cfg.project, volume=cfg.volume)
    source = "jobs/run/demo.yaml" if pipeline == load_pipeline(None) else "the pipeline file"
    text = render_compose(project, compose_header(source, steps))
    if settings.dry_run:  # printed with secrets masked, as in the manifests
        sys.stdout.write(render_compose(redact_tree(project), compose_header(source, steps)))
        return EXIT_OK
    engine = detect_engine() if cfg.engine == "auto" else cfg.engine
    if engine is None:
        print("asr-ft run: --executor compose needs docker (with Compose v2) or podman, and neither was found. "
              "Install one, or print the compose file with --dry-run and run it elsewhere.", file=sys.stderr)
        return EXIT_BAD_INPUT
    base_dir = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="asr-ft-compose-") as tmp:
        file = Path(tmp) / "docker-compose.yml"
        file.write_text(text, encoding="utf-8")
        log.info("compose project %s (%s, GPU for %s: %s) in %s", project["name"], engine, "/".join(GPU_STEPS),
                 "yes" if gpu else "no", file)
        return _run_services(project, file, engine, base_dir)


def _run_services(project: dict[str, Any], file: Path, engine: str, base_dir: Path) -> int:
    rows: list[str] = []
    code = EXIT_OK
    for service in service_order(project):
        if engine == "podman":
            cmd = podman_command(project, service, base_dir=base_dir)
            image = interpolate(project["services"][service]["image"])
            if not _quiet(["podman", "image", "exists", image]):
                print(f"asr-ft run: image {image} is not in podman's store. Build it first, e.g. "
                      f"`podman build -f images/Dockerfile -t {image} .` (or `make image`).", file=sys.stderr)
                return EXIT_BAD_INPUT
        else:
            cmd = docker_command(file, project, service, base_dir)
        print(f"\n━━ {service} ━━", file=sys.stderr, flush=True)
        log.debug("%s", " ".join(cmd))
        t0 = time.perf_counter()
        code = subprocess.run(cmd).returncode
        seconds = time.perf_counter() - t0
        if code != EXIT_OK:
            rows.append(f"✗ {service:<11} failed   {seconds:7.1f}s  (exit {code})")
            print(f"\n✗ {service} failed (exit {code}); its output is above. Rerun only this step with:\n  "
                  + " ".join(cmd), file=sys.stderr)
            break
        rows.append(f"✓ {service:<11} done     {seconds:7.1f}s")
    print("\n".join(["", f"compose project {project['name']} ({engine}) · 运行汇总", *rows]), file=sys.stderr)
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it
