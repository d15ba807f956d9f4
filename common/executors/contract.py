"""The container contract: what an asr-ft container is, the same for docker compose and Kubernetes, and what
the images build (images/Dockerfile, images/Dockerfile.cuda).

    from common.executors import contract

    contract.image()                       # 'ghcr.io/asr-ft/asr-ft:0.1.0'   (the code version as the tag)
    contract.cuda_image(contract.image())  # 'ghcr.io/asr-ft/asr-ft:0.1.0-cuda'
    contract.step_env("prepare", pipeline, common, artifacts=contract.ARTIFACTS_PATH)

Reads the code version (the image tag) and the stage registry (common/core/registry.py: which steps are GPU
steps).

Decides the image names (CPU ``<repo>:<version>``, CUDA ``<repo>:<version>-cuda``, which Dockerfile builds
each), the fixed non-root user, the paths a read-only root filesystem leaves writable (``/tmp`` with the cache
under it, ``/dev/shm``, the artifacts volume), where the artifacts volume is mounted (also the working
directory, so relative data paths of a pipeline file land on it) and the environment every container gets on
top of the pipeline's.

Writes nothing: compose (common/executors/compose.py) and Kubernetes (common/executors/k8s.py) build their
services and Jobs from it; tests/unit/test_contract.py checks the Dockerfiles against it.
"""

from __future__ import annotations

from typing import Any

from common.core.registry import gpu_steps
from common.core.settings import ENV_PREFIX
from common.core.stage import code_version
from common.executors.pipeline import common_env, section_env

IMAGE_REPO = "ghcr.io/asr-ft/asr-ft"  # CPU image <repo>:<version>; CUDA image <repo>:<version>-cuda
CUDA_SUFFIX = "-cuda"  # the CUDA image's tag = the CPU image's tag + this
DOCKERFILE, CUDA_DOCKERFILE = "images/Dockerfile", "images/Dockerfile.cuda"  # relative to the repository root
ENTRYPOINT = "asr-ft"  # the images' ENTRYPOINT: a container's command is the step name (`asr-ft <step>`)
UID = GID = 10001  # the images' fixed non-root user (USER 10001:10001); files on the volume belong to it

ARTIFACTS_PATH = "/artifacts"  # the artifacts volume / PVC: ASRFT_ARTIFACTS (unless s3://) and the WORKDIR
TMP_PATH = "/tmp"  # writable (tmpfs / emptyDir): the root filesystem is read-only
CACHE_PATH = f"{TMP_PATH}/asr-ft-cache"  # ASRFT_CACHE: model conversions, S3 staging (lives as long as the container)
SHM_PATH = "/dev/shm"  # writable: the training step's data loader workers share batches here
WRITABLE_PATHS = (ARTIFACTS_PATH, TMP_PATH, SHM_PATH)  # everything a step may write to

# What every container gets on top of the pipeline's environment (the images set the same values).
CONTAINER_ENV = {"ASRFT_CACHE": CACHE_PATH, "HOME": TMP_PATH, "PYTHONUNBUFFERED": "1"}
GPU_STEPS = gpu_steps()  # steps that get the CUDA image and a GPU: ('finetune',)


def image(version: str | None = None) -> str:
    """The CPU image of this code version (or of ``version``)."""
    return f"{IMAGE_REPO}:{version or code_version()}"


def cuda_image(cpu_image: str) -> str:
    """The CUDA image that goes with a CPU image."""
    return f"{cpu_image}{CUDA_SUFFIX}"


def dockerfile(gpu: bool) -> str:
    """The Dockerfile that builds the image of a GPU step (``gpu``) or of any other step."""
    return CUDA_DOCKERFILE if gpu else DOCKERFILE


def step_env(step: str, pipeline: dict[str, Any], common: dict[str, Any], artifacts: str) -> dict[str, str]:
    """A container's environment: the step's section (ASRFT_<STEP>_*) under the common settings without
    secrets (S3 keys reach containers through a Secret or the caller's environment), ``ASRFT_ARTIFACTS`` as
    the container sees it (``artifacts``: an s3:// URI or ARTIFACTS_PATH) and CONTAINER_ENV."""
    shared = {**common_env(common, secrets=False), f"{ENV_PREFIX}ARTIFACTS": artifacts, **CONTAINER_ENV}
    return {**section_env(pipeline, step), **dict(sorted(shared.items()))}
