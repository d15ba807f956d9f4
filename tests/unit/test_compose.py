"""The compose executor (common/executors/compose.py) and the committed docker-compose.yml / docker-compose.cpu.yml:
one service per step in the order of `asr-ft run`, the same environment contract as the other executors,
GPU reservation with a CPU override, podman translation, and running the steps in order with a stand-in
`podman` (a test double: a shell script on PATH that records its arguments and exits as told).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from common.core.registry import pipeline_steps
from common.core.settings import S3Settings
from common.executors.compose import (
    ComposeSettings,
    compose_project,
    interpolate,
    podman_command,
    render_compose,
    run_compose,
    service_order,
)
from common.executors.pipeline import common_env, demo_config_path, load_pipeline, section_env, steps_of

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
CPU_OVERRIDE = REPO / "docker-compose.cpu.yml"
DEMO_COMMON = {"artifacts": "runs/", "run_id": "demo", "log_level": "INFO", "force": None,
               "s3": dict(S3Settings())}  # what `asr-ft run` passes on for the demo with a clean environment


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in [v for v in os.environ if v.startswith("ASRFT_")]:
        monkeypatch.delenv(var)


@pytest.fixture(scope="module")
def demo() -> dict[str, Any]:
    return load_pipeline(demo_config_path())


class _ComposeLoader(yaml.SafeLoader):
    """Compose's YAML: `!reset` (drop the key when merging) and `!override` (replace it)."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())
_ComposeLoader.add_multi_constructor("!override", lambda loader, suffix, node: _Override(
    loader.construct_object(node, deep=True) if not isinstance(node, yaml.ScalarNode) else loader.construct_scalar(node)))


class _Reset:
    pass


class _Override:
    def __init__(self, value):
        self.value = value


def merge_compose(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Compose's merge rules for what the override file uses: mappings merge, scalars replace, !reset drops."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, _Reset):
            out.pop(key, None)
        elif isinstance(value, _Override):
            out[key] = value.value
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_compose(out[key], value)
        else:
            out[key] = value
    return out


def load_committed() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("x-")}


# ------------------------------------------------------------------------------------------------ the committed file


def test_committed_compose_file_is_up_to_date(capsys):
    """docker-compose.yml is generated from jobs/run/demo.yaml; regenerate it when this fails."""
    from jobs.run.__main__ import main

    assert main(["--executor", "compose", "--dry-run"]) == 0
    generated = capsys.readouterr().out
    assert COMPOSE_FILE.read_text(encoding="utf-8") == generated, (
        "docker-compose.yml is out of date: regenerate it with no ASRFT_* variables set:\n"
        "  asr-ft run --executor compose --dry-run > docker-compose.yml")


def test_one_service_per_step_chained_in_order(demo):
    project = load_committed()
    assert list(project["services"]) == steps_of(demo) == list(pipeline_steps())
    assert service_order(project) == steps_of(demo)
    services = list(project["services"].items())
    assert "depends_on" not in services[0][1]
    for (previous, _), (name, service) in zip(services, services[1:], strict=False):
        assert service["depends_on"] == {previous: {"condition": "service_completed_successfully"}}, name
        assert service["command"] == [name]


@pytest.mark.parametrize("step", pipeline_steps())
def test_service_environment_is_the_pipeline_contract(demo, step):
    """Each service's environment (after compose's interpolation) = what common.executors.pipeline gives that step,
    with the artifacts on the volume and the read-only-root paths — the same as a Kubernetes step Job."""
    from common.executors.k8s import K8sSettings
    from common.executors.k8s import step_env as k8s_step_env

    env = {k: interpolate(v, {}) for k, v in load_committed()["services"][step]["environment"].items()}
    expected = {**section_env(demo, step), **common_env(DEMO_COMMON, secrets=False),
                "ASRFT_ARTIFACTS": "/artifacts", "ASRFT_CACHE": "/tmp/asr-ft-cache", "HOME": "/tmp",
                "PYTHONUNBUFFERED": "1"}
    assert env == expected
    assert env == k8s_step_env(step, demo, DEMO_COMMON, K8sSettings())


def test_services_are_non_root_read_only_on_one_volume():
    project = load_committed()
    assert project["volumes"] == {"artifacts": {}}
    for name, service in project["services"].items():
        assert service["user"] == "10001:10001", name
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"], name
        assert service["volumes"] == ["artifacts:/artifacts"] and service["working_dir"] == "/artifacts", name
        assert service["init"] is True, name


def test_only_finetune_reserves_a_gpu_and_uses_the_cuda_image():
    services = load_committed()["services"]
    gpu = {name for name, s in services.items() if "deploy" in s}
    assert gpu == {"finetune"}
    assert services["finetune"]["deploy"] == {"resources": {"reservations": {"devices": [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}}
    assert interpolate(services["finetune"]["image"], {}) == "ghcr.io/asr-ft/asr-ft:0.1.0-cuda"
    assert services["finetune"]["build"]["dockerfile"] == "images/Dockerfile.cuda"
    for name in set(services) - gpu:
        assert interpolate(services[name]["image"], {}) == "ghcr.io/asr-ft/asr-ft:0.1.0", name
        assert services[name]["build"] == {"context": ".", "dockerfile": "images/Dockerfile"}, name


def test_cpu_override_gives_the_cpu_only_project(demo):
    override = yaml.load(CPU_OVERRIDE.read_text(encoding="utf-8"), Loader=_ComposeLoader)  # noqa: S506 (SafeLoader)
    merged = merge_compose(load_committed(), override)
    assert merged == compose_project(steps_of(demo), demo, DEMO_COMMON, gpu=False)


def test_images_are_overridable_from_the_environment():
    services = load_committed()["services"]
    env = {"ASRFT_IMAGE": "registry.local/asr-ft:dev", "ASRFT_GPU_IMAGE": "registry.local/asr-ft:dev-gpu"}
    assert interpolate(services["prepare"]["image"], env) == "registry.local/asr-ft:dev"
    assert interpolate(services["finetune"]["image"], env) == "registry.local/asr-ft:dev-gpu"


# ------------------------------------------------------------------------------------------------ the project


def test_s3_artifacts_pass_credentials_through_never_as_values(demo):
    secret = "do-not-write-me-0000"
    common = {**DEMO_COMMON, "artifacts": "s3://bucket/runs",
              "s3": dict(S3Settings(endpoint_url="http://minio:9000", access_key_id="AKIA0000", secret_access_key=secret))}
    project = compose_project(steps_of(demo), demo, common)
    text = render_compose(project)
    assert secret not in text and "AKIA0000" not in text
    env = project["services"]["prepare"]["environment"]
    assert env["ASRFT_ARTIFACTS"] == "s3://bucket/runs" and env["ASRFT_S3__ENDPOINT_URL"] == "http://minio:9000"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "ASRFT_S3__SECRET_ACCESS_KEY"):
        assert env[name] is None  # `NAME:` with no value: compose copies it from the caller's environment
    cmd = podman_command(project, "prepare", base_dir=REPO, env={"AWS_SECRET_ACCESS_KEY": secret})
    assert "AWS_SECRET_ACCESS_KEY" in cmd and secret not in " ".join(cmd)  # `--env NAME`: podman reads it
    assert "AWS_ACCESS_KEY_ID" not in cmd  # not set by the caller: not passed


@pytest.mark.parametrize("value", ["price: $5", "a$$b", "${HOME}"])
def test_dollar_signs_in_settings_survive_compose_interpolation(demo, value):
    pipeline = {**demo, "evaluate": {"name": value}}
    project = compose_project(["evaluate"], pipeline, DEMO_COMMON)
    loaded = {k: v for k, v in yaml.safe_load(render_compose(project)).items() if not k.startswith("x-")}
    assert loaded == project
    raw = loaded["services"]["evaluate"]["environment"]["ASRFT_EVALUATE_NAME"]
    assert interpolate(raw, {"HOME": "/root"}) == value


@pytest.mark.parametrize("text, env, expected", [
    ("${IMG:-repo/x:1}", {}, "repo/x:1"),
    ("${IMG:-repo/x:1}", {"IMG": "mine:2"}, "mine:2"),
    ("${IMG:-repo/x:1}", {"IMG": ""}, "repo/x:1"),
    ("${IMG-repo/x:1}", {"IMG": ""}, ""),
    ("${IMG}", {}, ""),
    ("$IMG/tag", {"IMG": "r"}, "r/tag"),
    ("a$$b", {}, "a$b"),
    ("plain", {}, "plain"),
])
def test_interpolate(text, env, expected):
    assert interpolate(text, env) == expected


def test_host_folder_volume_is_a_bind_mount(demo, tmp_path):
    project = compose_project(["prepare"], demo, DEMO_COMMON, volume="./work")
    assert "volumes" not in project and project["services"]["prepare"]["volumes"] == ["./work:/artifacts"]
    cmd = podman_command(project, "prepare", base_dir=tmp_path, env={})
    assert f"{tmp_path / 'work'}:/artifacts" in cmd


def test_podman_command_translates_a_service(demo):
    project = compose_project(steps_of(demo), demo, DEMO_COMMON, image="img:1", gpu_image="img:1-gpu",
                              project="asrft-test")
    cmd = podman_command(project, "finetune", base_dir=REPO, env={})
    assert cmd[:5] == ["podman", "run", "--rm", "--name", "asrft-test-finetune"]
    flags = " ".join(cmd)
    for expected in ("--user 10001:10001", "--read-only", "--tmpfs /tmp", "--init", "--workdir /artifacts",
                     "--volume asrft-test_artifacts:/artifacts", "--shm-size 2g", "--device nvidia.com/gpu=all",
                     "--env ASRFT_RUN_ID=demo", "--env ASRFT_ARTIFACTS=/artifacts"):
        assert expected in flags
    assert cmd[-2:] == ["img:1-gpu", "finetune"]
    assert "--device" not in podman_command(project, "prepare", base_dir=REPO, env={})


def test_podman_command_refuses_what_it_cannot_translate(demo):
    project = compose_project(["prepare"], demo, DEMO_COMMON)
    project["services"]["prepare"]["ports"] = ["8080:80"]
    with pytest.raises(ValueError, match="cannot translate"):
        podman_command(project, "prepare", base_dir=REPO)


@pytest.mark.parametrize("deps, error", [
    ({"a": ["b"], "b": ["a"]}, "cycle"),
    ({"a": ["missing"]}, "not a service"),
])
def test_service_order_errors(deps, error):
    project = {"services": {name: {"depends_on": {d: {} for d in ds}} for name, ds in deps.items()}}
    with pytest.raises(ValueError, match=error):
        service_order(project)


# ------------------------------------------------------------------------------------------------ running


def fake_podman(bin_dir: Path, log: Path, fail_on: str | None = None) -> None:
    """A stand-in `podman` (test double): records each call; `run … <fail_on>` exits 3."""
    bin_dir.mkdir()
    script = bin_dir / "podman"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        f'if [ "$1" = run ] && [ -n "{fail_on or ""}" ]; then for a; do last=$a; done; '
        f'[ "$last" = "{fail_on}" ] && exit 3; fi\n'
        "exit 0\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("fail_on, expected_code, ran", [
    (None, 0, ["demo-data", "prepare", "pretrained", "extract", "finetune", "export", "evaluate"]),
    ("extract", 3, ["demo-data", "prepare", "pretrained", "extract"]),
])
def test_run_compose_runs_steps_in_order_and_stops_at_a_failure(demo, tmp_path, monkeypatch, fail_on,
                                                                expected_code, ran):
    log = tmp_path / "podman.log"
    fake_podman(tmp_path / "bin", log, fail_on)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    settings = SimpleNamespace(dry_run=False, compose=ComposeSettings(engine="podman", gpu=False, image="img:1",
                                                                      project="asrft-test"))
    assert run_compose(steps_of(demo), demo, DEMO_COMMON, settings) == expected_code
    calls = log.read_text().splitlines()
    runs = [c.split()[-1] for c in calls if c.startswith("run ")]
    assert runs == ran
    assert calls[0] == "image exists img:1"  # checked before each step runs


def test_run_compose_says_how_to_build_a_missing_image(demo, tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "podman").write_text("#!/bin/sh\nexit 1\n")  # `podman image exists` → no
    (bin_dir / "podman").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    settings = SimpleNamespace(dry_run=False, compose=ComposeSettings(engine="podman", gpu=False, image="img:404"))
    assert run_compose(["prepare"], demo, DEMO_COMMON, settings) == 2
    assert "podman build -f images/Dockerfile -t img:404 ." in capsys.readouterr().err


def test_dry_run_of_a_pipeline_file_prints_its_project(tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text("run_id: exp1\nartifacts: runs/\nprepare: {train_csv: data/train.csv, audio_dir: data/audio}\n"
                      "pretrained: {model: /artifacts/models/tiny}\nextract: {}\nfinetune: {max_steps: 2}\n"
                      "export: {}\nevaluate: {}\n")
    out = subprocess.run([sys.executable, "-m", "jobs.run", "--config", str(config), "--executor", "compose",
                          "--dry-run"], capture_output=True, text=True, cwd=REPO, check=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith("ASRFT_")}).stdout
    project = yaml.safe_load(out)
    assert list(project["services"]) == list(pipeline_steps(optional=False))  # no demo-data section
    env = project["services"]["finetune"]["environment"]
    assert env["ASRFT_RUN_ID"] == "exp1" and env["ASRFT_FINETUNE_MAX_STEPS"] == "2"
    assert "Generated from the pipeline file" in out
