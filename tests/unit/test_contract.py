"""The container contract (common/executors/contract.py) against the images that implement it: each Dockerfile
runs as the contract's user, sets the contract's environment, works in the artifacts folder and starts
`asr-ft`; its usage line builds the image name the executors ask for. The executors themselves are checked
against the contract in test_compose.py and test_k8s_jobs.py (their services and Jobs)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from common.executors import contract

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [(contract.DOCKERFILE, False), (contract.CUDA_DOCKERFILE, True)]  # (path, builds the CUDA image)


def instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined, comments left out."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            out.append((keyword.upper(), " ".join(args.split())))
            pending = ""
    return out


def last(path: Path, keyword: str) -> str:
    """The arguments of the last ``keyword`` instruction (the one in force when the container starts)."""
    return [args for kw, args in instructions(path) if kw == keyword][-1]


def env_of(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for kw, args in instructions(path):
        if kw == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


@pytest.mark.parametrize("dockerfile, gpu", DOCKERFILES)
def test_dockerfile_implements_the_contract(dockerfile, gpu):
    path = REPO / dockerfile
    assert contract.dockerfile(gpu) == dockerfile
    assert last(path, "USER") == f"{contract.UID}:{contract.GID}"
    assert last(path, "WORKDIR") == contract.ARTIFACTS_PATH
    assert json.loads(last(path, "ENTRYPOINT")) == [contract.ENTRYPOINT]
    env = env_of(path)
    assert {k: env.get(k) for k in contract.CONTAINER_ENV} == contract.CONTAINER_ENV
    assert env["ASRFT_CACHE"].startswith(contract.TMP_PATH + "/")  # writable on a read-only root filesystem


@pytest.mark.parametrize("dockerfile, gpu", DOCKERFILES)
def test_dockerfile_usage_line_builds_the_contract_image_name(dockerfile, gpu):
    text = (REPO / dockerfile).read_text(encoding="utf-8")
    built = re.search(r"docker build -f (\S+) -t (\S+) \.", text)
    assert built is not None, f"{dockerfile}: no `docker build -f … -t … .` usage line"
    assert built.group(1) == dockerfile
    repo, _, tag = built.group(2).rpartition(":")
    assert repo == contract.IMAGE_REPO
    assert tag.endswith(contract.CUDA_SUFFIX) == gpu


@pytest.mark.parametrize("version, cpu, cuda", [
    ("0.1.0", "ghcr.io/asr-ft/asr-ft:0.1.0", "ghcr.io/asr-ft/asr-ft:0.1.0-cuda"),
    ("1.2.3rc1", "ghcr.io/asr-ft/asr-ft:1.2.3rc1", "ghcr.io/asr-ft/asr-ft:1.2.3rc1-cuda"),
])
def test_image_names(version, cpu, cuda):
    assert contract.image(version) == cpu
    assert contract.cuda_image(contract.image(version)) == cuda


def test_gpu_steps_and_writable_paths():
    assert contract.GPU_STEPS == ("finetune",)  # from the stage registry
    assert contract.WRITABLE_PATHS == ("/artifacts", "/tmp", "/dev/shm")
    assert contract.CACHE_PATH == "/tmp/asr-ft-cache"


@pytest.mark.parametrize("artifacts", ["/artifacts", "s3://bucket/runs"])
def test_step_env_is_the_section_the_common_values_and_the_container_env(artifacts):
    pipeline = {"prepare": {"train_csv": "data/train.csv", "min_seconds": 0.5}}
    common = {"artifacts": "runs/", "run_id": "exp1", "log_level": "INFO", "force": None,
              "s3": {"endpoint_url": None}}
    assert contract.step_env("prepare", pipeline, common, artifacts) == {
        "ASRFT_PREPARE_TRAIN_CSV": "data/train.csv", "ASRFT_PREPARE_MIN_SECONDS": "0.5",
        "ASRFT_ARTIFACTS": artifacts, "ASRFT_CACHE": "/tmp/asr-ft-cache", "ASRFT_LOG_LEVEL": "INFO",
        "ASRFT_RUN_ID": "exp1", "HOME": "/tmp", "PYTHONUNBUFFERED": "1", "ASRFT_PIPELINE": "1",
    }
