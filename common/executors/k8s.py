"""The Kubernetes executor: one ``batch/v1`` Job per pipeline step, watched to the end, logs streamed.

    asr-ft run --config pipeline.yaml --executor k8s [--namespace NS] [--dry-run]

Each step runs ``asr-ft <step>`` in its own Job with the same environment contract as every other executor
(``common_env(secrets=False)`` + ``section_env``; see common/executors/pipeline.py). Image, user, writable
paths, the extra environment and the GPU step come from the container contract (common/executors/contract.py);
each step's default CPU and memory from the stage registry (common/core/registry.py). S3 credentials reach
the pods only through a Secret (``envFrom``), never as literal values. The artifacts live on a
PersistentVolumeClaim mounted at ``/artifacts`` (then ``ASRFT_ARTIFACTS=/artifacts``) or in S3.

Names and labels (k8s/README.md documents them for the chart and the plain manifests):

    Job name   asrft-<run-id>-<step>        DNS-1123, ≤ 63 characters; a short hash is appended when the
                                            run id had to be shortened or changed to fit
    labels     app.kubernetes.io/name=asr-ft, app.kubernetes.io/component=<step>,
               app.kubernetes.io/managed-by=asr-ft, asr-ft/run-id=<run-id>, asr-ft/stage=<step>

How a run goes: a step whose ``_manifest.json`` is already in the store (read from where the orchestrator
runs: the PVC mounted at the same path in-cluster, or S3) with the same settings and code version is skipped
without a Job. Otherwise a finished Job of the same name is deleted, the Job is created, its pod is watched
from Pending to Running, its log is followed with a ``[step]`` prefix, and the Job is watched until it is
Complete or Failed. Watches resume from the last resourceVersion when the server ends them, re-list after
410 Gone, and reconnect after a dropped connection (a bounded number of times in a row). The first failure
stops the pipeline and prints the pod's termination message and its last log lines.

The training Job (finetune) takes its GPU count, memory request/limit and ``/dev/shm`` size from the
fine-tune planner, run here in-process, and records them in the annotation ``asr-ft/resources``.

More than one node (``k8s.nodes`` > 1 and a plan that uses them): the finetune step is a Kubeflow Trainer
``trainer.kubeflow.org/v1alpha1`` TrainJob instead (``build_trainjob``) on a torchrun ClusterTrainingRuntime
(``k8s.trainer_runtime``, default ``torch-distributed``): ``numNodes`` x ``numProcPerNode`` and
``resourcesPerNode`` from the plan, every node running ``torchrun --module jobs.finetune``, the same image,
environment, volumes and security context (a runtime patch). The run checks first that the cluster serves
TrainJobs (and says how to install Kubeflow Trainer), follows node 0's log (global rank 0), waits for the
TrainJob's Complete / Failed condition and reports the termination message of the pod that failed first.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from common.core.registry import pipeline_steps, stage
from common.core.settings import SettingsError, redact_tree
from common.core.stage import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, MANIFEST, StageFailed, code_version
from common.core.store import LocalStore, Store, StoreError, open_store
from common.executors import contract
from common.executors.contract import ARTIFACTS_PATH, GID, GPU_STEPS, IMAGE_REPO, SHM_PATH, TMP_PATH, UID
from common.executors.local import StepResult
from common.executors.pipeline import env_value, yaml_section

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ constants

APP = "asr-ft"
LABEL_NAME, LABEL_COMPONENT = "app.kubernetes.io/name", "app.kubernetes.io/component"
LABEL_MANAGED_BY, LABEL_VERSION = "app.kubernetes.io/managed-by", "app.kubernetes.io/version"
LABEL_RUN_ID, LABEL_STAGE = "asr-ft/run-id", "asr-ft/stage"
ANNOTATION_RESOURCES, ANNOTATION_COMMAND = "asr-ft/resources", "asr-ft/command"
NAME_MAX = 63  # DNS-1123 label: the Job name is also the value of its pods' job-name label (≤ 63 characters)
NAME_HASH_LEN = 6  # hex digits of sha256(run-id/step) appended when the name had to be shortened or changed
TERMINATION_MESSAGE_PATH = "/dev/termination-log"  # common/core/stage.py writes a failed stage's reason here
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
TAIL_LINES = 25  # log lines of a failed step shown again
# Each step's default CPU and memory request: the stage registry's (common/core/registry.py).
DEFAULT_GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}  # set by NVIDIA GPU feature discovery
DEFAULT_GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

# Kubeflow Trainer (multi-node finetune): TrainJob trainer.kubeflow.org/v1alpha1 on a torchrun runtime
TRAINER_GROUP, TRAINER_VERSION, TRAINJOBS = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
TRAINER_RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime Kubeflow Trainer installs for torchrun
TRAINER_CONTAINER = "node"  # the trainer container of the torch runtimes (their replicated job is "node" too)
TRAINER_COMMAND = ["torchrun", "--module", "jobs.finetune"]  # torchrun reads the runtime's PET_* variables
PATCH_MANAGER = "asr-ft"  # owner of the TrainJob's runtime patch (volumes, security context, node placement)
LABEL_NODE_INDEX = "batch.kubernetes.io/job-completion-index"  # the node (0 = global rank 0) of a TrainJob pod
INSTALL_TRAINER = (
    "Install Kubeflow Trainer (its controller, the CRDs and the torch-distributed ClusterTrainingRuntime; "
    "https://www.kubeflow.org/docs/components/trainer/operator-guides/installation/):\n"
    "  kubectl apply --server-side -k \"https://github.com/kubeflow/trainer.git/manifests/overlays/manager?ref=<release>\"\n"
    "  kubectl apply --server-side -k \"https://github.com/kubeflow/trainer.git/manifests/overlays/runtimes?ref=<release>\"\n"
    "or train on one node: --k8s-nodes 1 (k8s.nodes)."
)

_QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")


class K8sError(Exception):
    """The cluster cannot be reached or refused a request; the message says what to check."""


# ------------------------------------------------------------------------------------------------ settings


# SIGTERM → kill: finishing a training step and writing + uploading a checkpoint (fp32 weights + optimizer of a
# few B parameters, tens of GB at ~0.5-1 GB/s to disk or S3) takes minutes, not the 30 s Kubernetes gives by default
TERMINATION_GRACE_SECONDS = 600


class K8sSettings(BaseModel):
    """``asr-ft run --executor k8s`` settings: flags ``--k8s-<field>``, env ``ASRFT_RUN_K8S__<FIELD>``, or the
    ``k8s:`` mapping of the pipeline file's ``run:`` section. Mappings and lists take JSON on the command line."""

    model_config = {"extra": "forbid"}

    namespace: str | None = Field(
        None, description="namespace of the Jobs (default: the pod's own in-cluster, else the kubeconfig context's)",
        examples=["asr-ft"])
    image: str | None = Field(None, description=f"image of the steps (default: {IMAGE_REPO}:<version>)",
                              examples=[f"{IMAGE_REPO}:0.1.0"])
    gpu_image: str | None = Field(None, description="image of the GPU step finetune (default: <image>-cuda)",
                                  examples=[f"{IMAGE_REPO}:0.1.0-cuda"])
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="imagePullPolicy")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secrets for a private registry")
    pvc: str | None = Field("asr-ft-artifacts", description="PersistentVolumeClaim holding the artifacts "
                            "(and relative data paths); empty: none (artifacts must be s3://)")
    mount_path: str = Field(ARTIFACTS_PATH, description="where the PVC is mounted; ASRFT_ARTIFACTS unless s3://")
    s3_secret: str | None = Field(None, description="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                                  "(or ASRFT_S3__*) given to every step via envFrom", examples=["asr-ft-s3"])
    service_account: str | None = Field(None, description="ServiceAccount of the step pods (default: namespace default)")
    backoff_limit: int = Field(0, ge=0, description="retries of a failed step pod (0: fail fast)")
    ttl_seconds_after_finished: int | None = Field(86400, ge=0, description="delete finished Jobs after this long")
    active_deadline_seconds: int | None = Field(None, ge=1, description="time limit of each Job")
    termination_grace_seconds: int = Field(
        TERMINATION_GRACE_SECONDS, ge=30, description="how long a step pod may take to stop after SIGTERM "
        "(preemption, node drain): finetune finishes its step and saves a checkpoint in that time",
        examples=[600, 1800])
    gpus: int = Field(1, ge=0, description="GPUs a training node offers the finetune Job (plan input; the plan "
                      "may use fewer, e.g. one for a small data set; 0: train on CPU)")
    nodes: int = Field(1, ge=1, description="training nodes the finetune step may span (plan input); when the plan "
                       "uses more than one, finetune runs as a Kubeflow Trainer TrainJob (Kubeflow Trainer must be "
                       "installed), else as a plain Job")
    trainer_runtime: str = Field(TRAINER_RUNTIME, description="ClusterTrainingRuntime of a multi-node finetune: a "
                                 "torchrun runtime (it gives every node PET_* for torchrun)",
                                 examples=[TRAINER_RUNTIME])
    deepspeed_runtime: str | None = Field(None, description="ClusterTrainingRuntime when the plan uses DeepSpeed "
                                          "(default: trainer_runtime; DeepSpeed runs under torchrun)",
                                          examples=[TRAINER_RUNTIME])
    gpu_memory_gb: float = Field(80.0, gt=0, description="memory of one GPU on the training nodes (plan input)")
    gpu_node_memory_gb: float = Field(125.0, gt=0, description="host RAM of a training node (plan input: offload "
                                      "needs host RAM)")
    gpu_node_cpus: int = Field(16, ge=1, description="CPUs of a training node (plan input)")
    gpu_product: str | None = Field(None, description="pin the finetune Job to this GPU model (node label "
                                    "nvidia.com/gpu.product)", examples=["NVIDIA-H100-80GB-HBM3"])
    gpu_resource: str = Field("nvidia.com/gpu", description="extended resource name of a GPU")
    gpu_node_selector: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_GPU_NODE_SELECTOR),
                                              description="nodeSelector of the finetune Job (JSON or k=v,k=v)")
    gpu_tolerations: list[dict[str, Any]] = Field(default_factory=lambda: [dict(t) for t in DEFAULT_GPU_TOLERATIONS],
                                                  description="tolerations of the finetune Job (JSON list)")
    cpu: dict[str, str] = Field(default_factory=dict, description="CPU request per step over the defaults "
                                + str({s: stage(s).cpu for s in pipeline_steps()}), examples=['{"evaluate": "8"}'])
    memory: dict[str, str] = Field(default_factory=dict, description="memory request = limit per step over the "
                                   "defaults (finetune: the plan's)", examples=['{"evaluate": "12Gi"}'])
    tmp_size: str | None = Field(None, description="sizeLimit of the /tmp emptyDir (holds ASRFT_CACHE)",
                                 examples=["20Gi"])
    kubeconfig: str | None = Field(None, description="kubeconfig file (default: in-cluster, else KUBECONFIG "
                                   "or ~/.kube/config)")
    context: str | None = Field(None, description="kubeconfig context")
    watch_timeout_seconds: int = Field(120, ge=1, description="server-side timeout of one watch request")
    watch_retries: int = Field(5, ge=0, description="reconnects in a row before giving up on a watch")

    @field_validator("gpu_node_selector", "gpu_tolerations", "cpu", "memory", "image_pull_secrets", mode="before")
    @classmethod
    def _parse_text(cls, value: Any) -> Any:
        """A flag or variable gives a string: JSON, or ``k=v,k=v`` for a mapping, or ``a,b`` for a list."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text[:1] in "[{":
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON ({e}); e.g. '{{\"key\": \"value\"}}' or '[...]'") from None
        if "=" in text:
            return dict(item.split("=", 1) for item in text.split(",") if item.strip())
        return [item.strip() for item in text.split(",") if item.strip()]

    @field_validator("cpu", "memory")
    @classmethod
    def _check_per_step(cls, value: dict[str, str]) -> dict[str, str]:
        for step, quantity in value.items():
            if step not in pipeline_steps():
                raise ValueError(f"unknown step {step!r}; expected some of {list(pipeline_steps())}")
            if not _QUANTITY_RE.match(str(quantity)):
                raise ValueError(f"{step}: {quantity!r} is not a Kubernetes quantity (e.g. 500m, 2, 4Gi)")
        return value

    @field_validator("tmp_size")
    @classmethod
    def _check_quantity(cls, value: str | None) -> str | None:
        if value is not None and not _QUANTITY_RE.match(value):
            raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 20Gi)")
        return value

    @model_validator(mode="after")
    def _check_paths(self) -> K8sSettings:
        if not self.mount_path.startswith("/"):
            raise ValueError(f"k8s.mount_path must be an absolute path, got {self.mount_path!r} (e.g. /artifacts)")
        if self.pvc == "":
            self.pvc = None
        return self

    def step_image(self, step: str, gpus: int = 0) -> str:
        image = self.image or contract.image()
        if step in GPU_STEPS and gpus > 0:
            return self.gpu_image or contract.cuda_image(image)
        return image


# ------------------------------------------------------------------------------------------------ names


def job_name(run_id: str, step: str) -> str:
    """``asrft-<run-id>-<step>``, made DNS-1123 safe. When the run id had to be changed (upper case, ``_``,
    ``.``) or shortened to fit 63 characters, a short hash of the original keeps distinct runs distinct;
    the step name is always kept whole."""
    name = f"asrft-{run_id}-{step}"
    if re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= NAME_MAX:
        return name
    digest = hashlib.sha256(f"{run_id}/{step}".encode()).hexdigest()[:NAME_HASH_LEN]
    safe = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", run_id.lower())).strip("-")
    room = NAME_MAX - len(f"asrft--{step}-{digest}")  # 63 - 6 - 1 - len(step) - 1 - 6
    return "-".join(p for p in ("asrft", safe[:room].strip("-"), step, digest) if p)


def job_labels(run_id: str, step: str) -> dict[str, str]:
    labels = {LABEL_NAME: APP, LABEL_COMPONENT: step, LABEL_MANAGED_BY: APP, LABEL_RUN_ID: run_id, LABEL_STAGE: step}
    version = code_version()
    if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?", version):  # label values allow no "+"
        labels[LABEL_VERSION] = version
    return labels


def run_selector(run_id: str, step: str) -> str:
    return f"{LABEL_RUN_ID}={run_id},{LABEL_STAGE}={step}"


# ------------------------------------------------------------------------------------------------ resources


@dataclass(frozen=True)
class PodResources:
    """The training pod's resources (from the fine-tune plan) and where they came from."""

    gpus: int
    memory_request: str
    memory_limit: str
    shm_size: str
    cpu: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""  # the plan's inputs and choice, for the Job's asr-ft/resources annotation
    setup: dict[str, Any] = field(default_factory=dict)  # the training setup the plan chose (mode, strategy, …)

    @property
    def nodes(self) -> int:
        """Nodes the plan trains on (> 1: a TrainJob of ``nodes`` pods, ``gpus`` processes each)."""
        return int(self.setup.get("nodes", 1))


def training_node(k8s: K8sSettings, finetune: dict[str, Any]) -> dict[str, Any]:
    """One training node as k8s describes it (the plan's machine; nothing is detected on this machine)."""
    gpus = 0 if finetune.get("device") == "cpu" else k8s.gpus
    return {"gpus": gpus, "gpu_mem_bytes": int(k8s.gpu_memory_gb * 1e9) if gpus else 0,
            "host_ram_bytes": int(k8s.gpu_node_memory_gb * 1e9), "cpu_count": k8s.gpu_node_cpus,
            "gpu_name": k8s.gpu_product or "", "bf16_supported": gpus > 0, "nodes": k8s.nodes if gpus else 1}


def finetune_resources(pipeline: dict[str, Any], common: dict[str, Any], k8s: K8sSettings,
                       store: Store | None) -> PodResources:
    """The training pod's resources from the plan the pod itself will make: the finetune stage plans it
    (its registry entry's ``pod_resources``) from the environment the pod gets, the run's pretrained config and extract's data
    facts in the store, on the node k8s.gpus / gpu_memory_gb / gpu_node_memory_gb / gpu_node_cpus describes.
    Before those outputs exist (a dry run ahead of the run) the Job gets the default resources, and says so.
    k8s.memory / k8s.cpu for finetune replace the plan's numbers."""
    import importlib

    module, _, function = (stage("finetune").pod_resources or "").partition(":")
    pod_from_store = getattr(importlib.import_module(module), function)
    finetune = {k: v for k, v in yaml_section(pipeline, "finetune").items() if k not in common}
    node = training_node(k8s, finetune)
    try:
        pod, setup, note = pod_from_store(step_env("finetune", pipeline, common, k8s), store, common["run_id"], node,
                                          yaml_section(pipeline, "pretrained").get("family"))
    except StageFailed as e:  # no setup fits, invalid settings: the pod re-plans and fails with the same reason
        pod, setup, note = None, {}, f"the planner gave no plan: {e}"
    if pod is None:
        log.warning("finetune Job: default resources (%s); the pod plans for itself when it starts", note)
        res = PodResources(node["gpus"], stage("finetune").memory, stage("finetune").memory, "2Gi",
                           source=f"defaults, {note}")
    else:
        log.info("finetune %s: %s%d GPU, memory %s/%s, /dev/shm %s from the plan (%s, %s, batch %d)",
                 "TrainJob" if setup.get("nodes", 1) > 1 else "Job",
                 f"{setup['nodes']} nodes x " if setup.get("nodes", 1) > 1 else "", pod.gpus,
                 pod.memory_request, pod.memory_limit, pod.shm_size, setup["mode"], setup["strategy"],
                 setup["per_device_batch"])
        nodes = f"{setup['nodes']} of {k8s.nodes} nodes" if k8s.nodes > 1 else "a node"
        source = (f"{note}: {setup['mode']}, {setup['strategy']}, batch {setup['per_device_batch']} on {nodes} of "
                  f"{node['gpus']} x {k8s.gpu_memory_gb:g} GB GPU, {k8s.gpu_node_memory_gb:g} GB RAM, "
                  f"{k8s.gpu_node_cpus} CPUs")
        res = PodResources(pod.gpus, pod.memory_request, pod.memory_limit, pod.shm_size, str(pod.cpu),
                           dict(pod.node_selector), [dict(t) for t in pod.tolerations], source, setup)
    memory, cpu = k8s.memory.get("finetune"), k8s.cpu.get("finetune")
    source = res.source + (f"; memory set by k8s.memory.finetune={memory}" if memory else "") \
        + (f"; cpu set by k8s.cpu.finetune={cpu}" if cpu else "")
    return PodResources(res.gpus, memory or res.memory_request, memory or res.memory_limit, res.shm_size,
                        cpu or res.cpu, res.node_selector, res.tolerations, source, res.setup)


# ------------------------------------------------------------------------------------------------ Job objects


def artifacts_for_pods(common: dict[str, Any], k8s: K8sSettings) -> str:
    """ASRFT_ARTIFACTS inside the pods: an s3:// URI as is, else the PVC's mount path."""
    artifacts = str(common.get("artifacts") or "")
    if artifacts.startswith("s3://"):
        return artifacts
    if k8s.pvc is None:
        raise SettingsError(
            f"artifacts {artifacts!r} is a local folder, but the k8s executor has no PVC to put it on "
            "(k8s.pvc is empty). Set --k8s-pvc CLAIM (default asr-ft-artifacts; see k8s/pvc.yaml) or use "
            "--artifacts s3://bucket/prefix with --k8s-s3-secret."
        )
    return k8s.mount_path


def step_env(step: str, pipeline: dict[str, Any], common: dict[str, Any], k8s: K8sSettings) -> dict[str, str]:
    """The container's environment: the container contract's (the same as a compose service's), S3 secrets
    left out, the artifacts where the pods see them."""
    return contract.step_env(step, pipeline, common, artifacts_for_pods(common, k8s))


POD_SECURITY_CONTEXT = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": GID, "fsGroup": GID,
                        "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY_CONTEXT = {"runAsNonRoot": True, "readOnlyRootFilesystem": True,
                              "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def step_resources(step: str, k8s: K8sSettings, plan: PodResources | None) -> tuple[int, dict[str, Any]]:
    """(GPUs, container resources): the plan's for the GPU step, else k8s.cpu/k8s.memory over the defaults.
    CPU is only requested (a CPU limit throttles a batch step and protects nobody); memory limit = request
    except where the plan leaves headroom."""
    if step in GPU_STEPS:
        if plan is None:
            raise ValueError(f"the {step} Job needs the fine-tune plan's PodResources")
        gpus, cpu, request, limit = plan.gpus, plan.cpu or k8s.cpu.get(step, stage(step).cpu), \
            plan.memory_request, plan.memory_limit
    else:
        gpus, cpu = 0, k8s.cpu.get(step, stage(step).cpu)
        request = limit = k8s.memory.get(step, stage(step).memory)
    resources: dict[str, Any] = {"requests": {"cpu": cpu, "memory": request}, "limits": {"memory": limit}}
    if gpus:
        resources["limits"][k8s.gpu_resource] = str(gpus)  # an extended resource's request defaults to its limit
    return gpus, resources


def build_job(step: str, pipeline: dict[str, Any], common: dict[str, Any], k8s: K8sSettings,
              resources: PodResources | None = None, namespace: str | None = None) -> dict[str, Any]:
    """The ``batch/v1`` Job that runs ``asr-ft <step>`` (a plain dict, ready for the API or YAML).
    ``resources`` (the fine-tune plan's) is required for finetune; ``namespace`` None leaves it to kubectl."""
    run_id = common["run_id"]
    labels = job_labels(run_id, step)
    gpus, container_resources = step_resources(step, k8s, resources)
    env = step_env(step, pipeline, common, k8s)
    container: dict[str, Any] = {
        "name": step,
        "image": k8s.step_image(step, gpus),
        "imagePullPolicy": k8s.image_pull_policy,
        "command": ["asr-ft", step],
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "resources": container_resources,
        "securityContext": json.loads(json.dumps(CONTAINER_SECURITY_CONTEXT)),
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,  # common/core/stage.py writes why a step failed here
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "tmp", "mountPath": TMP_PATH}],
    }
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": k8s.tmp_size} if k8s.tmp_size else {}}]
    if k8s.pvc is not None:
        container["workingDir"] = k8s.mount_path  # relative data paths of the pipeline file resolve on the PVC
        container["volumeMounts"].append({"name": "artifacts", "mountPath": k8s.mount_path})
        volumes.append({"name": "artifacts", "persistentVolumeClaim": {"claimName": k8s.pvc}})
    if k8s.s3_secret:
        container["envFrom"] = [{"secretRef": {"name": k8s.s3_secret}}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": k8s.termination_grace_seconds,
        "automountServiceAccountToken": False,  # the steps never call the Kubernetes API
        "securityContext": json.loads(json.dumps(POD_SECURITY_CONTEXT)),
        "containers": [container],
        "volumes": volumes,
    }
    if k8s.service_account:
        pod_spec["serviceAccountName"] = k8s.service_account
    if k8s.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in k8s.image_pull_secrets]
    annotations = {ANNOTATION_COMMAND: f"asr-ft {step}"}
    if step in GPU_STEPS and resources is not None:
        container["volumeMounts"].append({"name": "dshm", "mountPath": SHM_PATH})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": resources.shm_size}})
        if gpus:
            pod_spec["nodeSelector"] = {**resources.node_selector, **k8s.gpu_node_selector}
            pod_spec["tolerations"] = _unique([*k8s.gpu_tolerations, *resources.tolerations])
        annotations[ANNOTATION_RESOURCES] = (
            f"resources from plan: {gpus} GPU, memory {resources.memory_request} request / "
            f"{resources.memory_limit} limit, /dev/shm {resources.shm_size} — {resources.source}"
        )
    spec: dict[str, Any] = {"backoffLimit": k8s.backoff_limit}
    if k8s.ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = k8s.ttl_seconds_after_finished
    if k8s.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = k8s.active_deadline_seconds
    spec["template"] = {"metadata": {"labels": dict(labels)}, "spec": pod_spec}
    metadata: dict[str, Any] = {"name": job_name(run_id, step), "labels": labels, "annotations": annotations}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def _unique(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for item in items:
        if dict(item) not in out:
            out.append(dict(item))
    return out


def build_jobs(steps: list[str], pipeline: dict[str, Any], common: dict[str, Any], k8s: K8sSettings,
               store: Store | None = None, namespace: str | None = None) -> list[dict[str, Any]]:
    resources = finetune_resources(pipeline, common, k8s, store) if set(steps) & set(GPU_STEPS) else None
    return [build_trainjob(s, pipeline, common, k8s, resources, namespace)
            if s in GPU_STEPS and resources is not None and resources.nodes > 1
            else build_job(s, pipeline, common, k8s, resources, namespace) for s in steps]


def trainer_runtime(k8s: K8sSettings, resources: PodResources) -> tuple[str, str]:
    """(ClusterTrainingRuntime name, why) for a multi-node finetune."""
    if resources.setup.get("deepspeed"):
        name = k8s.deepspeed_runtime or k8s.trainer_runtime
        return name, (f"the plan uses DeepSpeed ({resources.setup.get('strategy')}): k8s.deepspeed_runtime"
                      + ("" if k8s.deepspeed_runtime else f" unset, the torchrun runtime {name}"))
    return k8s.trainer_runtime, "k8s.trainer_runtime"


def build_trainjob(step: str, pipeline: dict[str, Any], common: dict[str, Any], k8s: K8sSettings,
                   resources: PodResources, namespace: str | None = None) -> dict[str, Any]:
    """The ``trainer.kubeflow.org/v1alpha1`` TrainJob of a multi-node finetune: ``resources.nodes`` pods on a
    torchrun runtime, each running ``torchrun --module jobs.finetune`` with ``resources.gpus`` processes. The
    container contract is the plain Job's (image, environment, PVC, /tmp, /dev/shm, non-root read-only
    security context, node placement); what a TrainJob's trainer cannot say goes into a runtime patch."""
    job = build_job(step, pipeline, common, k8s, resources, namespace)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = list(container["env"])
    if k8s.s3_secret:  # a TrainJob's trainer has no envFrom: the two keys from the Secret, by name
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": k8s.s3_secret, "key": key, "optional": True}}}
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    runtime, why = trainer_runtime(k8s, resources)
    pod_patch: dict[str, Any] = {
        "securityContext": pod["securityContext"],
        "volumes": pod["volumes"],
        "containers": [{"name": TRAINER_CONTAINER, "securityContext": container["securityContext"],
                        "volumeMounts": container["volumeMounts"]}],
    }
    for key in ("nodeSelector", "tolerations", "imagePullSecrets", "serviceAccountName"):
        if key in pod:
            pod_patch[key] = pod[key]
    labels = job["spec"]["template"]["metadata"]["labels"]
    metadata = json.loads(json.dumps(job["metadata"]))
    metadata["annotations"][ANNOTATION_COMMAND] = " ".join(TRAINER_COMMAND)
    metadata["annotations"][ANNOTATION_RESOURCES] = (
        f"TrainJob on {runtime} ({why}): {resources.nodes} nodes x {resources.gpus} process(es); per node "
        + metadata["annotations"].get(ANNOTATION_RESOURCES, "").removeprefix("resources from plan: ")
    )
    spec: dict[str, Any] = {
        "runtimeRef": {"name": runtime},
        "trainer": {
            "image": container["image"],
            "command": list(TRAINER_COMMAND),
            "numNodes": resources.nodes,
            "numProcPerNode": resources.gpus,
            "resourcesPerNode": container["resources"],
            "env": env,
        },
        "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
            "replicatedJobs": [{"name": TRAINER_CONTAINER, "template": {"spec": {"template": {
                "metadata": {"labels": dict(labels)}, "spec": pod_patch}}}}]}}}}],
    }
    if k8s.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = k8s.active_deadline_seconds
    return {"apiVersion": f"{TRAINER_GROUP}/{TRAINER_VERSION}", "kind": "TrainJob", "metadata": metadata,
            "spec": spec}


def jobs_yaml(jobs: list[dict[str, Any]], header: str = "") -> str:
    import yaml

    body = yaml.safe_dump_all(jobs, sort_keys=False, allow_unicode=True, explicit_start=True)
    return (header + body) if header else body


# ------------------------------------------------------------------------------------------------ the store


def orchestrator_store(common: dict[str, Any], k8s: K8sSettings) -> tuple[Store | None, str]:
    """The store the pods write to, as seen from here: S3 directly; the PVC when it is mounted here at the
    same path (the orchestrator running in-cluster); else None and why."""
    artifacts = str(common.get("artifacts") or "")
    try:
        if artifacts.startswith("s3://"):
            from common.core.settings import S3Settings

            s3 = common.get("s3") or {}
            return open_store(artifacts, s3 if isinstance(s3, S3Settings) else S3Settings(**s3)), artifacts
        if k8s.pvc is not None and Path(k8s.mount_path).is_dir():
            return LocalStore(k8s.mount_path), k8s.mount_path
    except Exception as e:  # boto3 raises its own errors for bad credentials before any StoreError
        return None, f"the artifacts store {artifacts} is not reachable from here ({type(e).__name__}: {e})"
    return None, (f"PVC {k8s.pvc!r} is not mounted here at {k8s.mount_path}, so the orchestrator cannot see "
                  "which steps are done; every step gets a Job and a step that is done skips itself in its pod")


def done_in_store(store: Store, run_id: str, step: str, pipeline: dict[str, Any]) -> str | None:
    """Why ``step`` needs no Job (its manifest is there, made by this code version with this pipeline's
    settings for the step), or None. The step's own fingerprint check (in its pod) stays the final word."""
    if step == "demo-data":
        return None  # writes no manifest; its own check makes it quick
    key = store.join(run_id, step, MANIFEST)
    try:
        if not store.exists(key):
            return None
        manifest = store.read_json(key)
    except (StoreError, ValueError, OSError) as e:
        log.warning("%s: cannot read %s (%s); running it", step, store.uri_for(key), e)
        return None
    if manifest.get("code_version") != code_version():
        return None
    recorded = manifest.get("settings") or {}
    section = {k: v for k, v in yaml_section(pipeline, step).items() if k not in ("artifacts", "run_id", "force",
                                                                                  "log_level", "s3")}
    for k, v in section.items():
        if v is not None and env_value(recorded.get(k)) != env_value(v):
            return None
    return f"done at {manifest.get('finished', '?')} ({store.uri_for(key)})"


def done_steps(store: Store, run_id: str, steps: list[str], pipeline: dict[str, Any]) -> dict[str, str]:
    """The leading steps that need no Job, each with why. demo-data (no manifest of its own) counts as done
    when prepare is: prepare's manifest fingerprints the data it read."""
    done: dict[str, str] = {}
    for step in steps:
        if step == "demo-data":
            continue
        reason = done_in_store(store, run_id, step, pipeline)
        if reason is None:
            break  # this step runs, so every later one must run too
        done[step] = reason
    if "demo-data" in steps and "prepare" in done:
        done["demo-data"] = "prepare is done (its manifest fingerprints the demo data it read)"
    return done


# ------------------------------------------------------------------------------------------------ the cluster


@dataclass
class Cluster:
    batch: Any  # kubernetes.client.BatchV1Api
    core: Any  # kubernetes.client.CoreV1Api
    namespace: str
    k8s: K8sSettings
    custom: Any = None  # kubernetes.client.CustomObjectsApi (TrainJobs)


def connect(k8s: K8sSettings, api_client: Any = None) -> Cluster:
    """API clients for the configured cluster: in-cluster when running in a pod (and no kubeconfig is given),
    else a kubeconfig file. ``api_client`` (tests) skips configuration loading."""
    from kubernetes import client, config

    namespace = k8s.namespace
    if api_client is None:
        cfg = client.Configuration()
        try:
            if k8s.kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config(client_configuration=cfg)
                if namespace is None and SA_NAMESPACE_FILE.exists():
                    namespace = SA_NAMESPACE_FILE.read_text().strip()
            else:
                config.load_kube_config(config_file=k8s.kubeconfig, context=k8s.context,
                                        client_configuration=cfg, persist_config=False)
                if namespace is None:
                    contexts, active = config.list_kube_config_contexts(config_file=k8s.kubeconfig)
                    chosen = next((c for c in contexts if c["name"] == k8s.context), active) if k8s.context else active
                    namespace = (chosen or {}).get("context", {}).get("namespace")
        except (config.ConfigException, OSError, ValueError, TypeError) as e:
            raise K8sError(
                f"cannot load a Kubernetes configuration ({e}). In a cluster, run with a ServiceAccount "
                "(k8s/rbac.yaml); elsewhere point KUBECONFIG or --k8s-kubeconfig at a kubeconfig and pick "
                "--k8s-context. `--dry-run` prints the Jobs without a cluster."
            ) from None
        api_client = client.ApiClient(cfg)
    return Cluster(client.BatchV1Api(api_client), client.CoreV1Api(api_client), namespace or "default", k8s,
                   client.CustomObjectsApi(api_client))


def _is_transient(exc: BaseException) -> bool:
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(exc, ApiException):
        return exc.status in (0, 429, 500, 502, 503, 504)
    return isinstance(exc, (HTTPError, OSError))


def _pause(failures: int) -> None:
    """Before reconnect number ``failures``: none for the first, then 1, 2, 4 … 10 s."""
    if failures > 1:
        time.sleep(min(2 ** (failures - 2), 10))


def watch_until(cluster: Cluster, list_fn: Callable[..., Any], what: str, done: Callable[[str, Any], Any],
                on_list: Callable[[list[Any]], Any] | None = None, **selectors: Any) -> Any:
    """List, then watch from the list's resourceVersion until ``done(event_type, obj)`` returns non-None
    (listed objects come as event type "LISTED"; ``on_list(items)`` may answer from the whole list, e.g. when
    the object is gone). A watch the server ends is resumed from the last resourceVersion; 410 Gone re-lists;
    a dropped connection reconnects, at most ``k8s.watch_retries`` times in a row."""
    from kubernetes import watch
    from kubernetes.client.rest import ApiException

    rv: str | None = None
    failures = 0
    while True:
        try:
            if rv is None:
                listed = list_fn(cluster.namespace, **selectors)
                for item in listed.items:
                    result = done("LISTED", item)
                    if result is not None:
                        return result
                result = on_list(listed.items) if on_list else None
                if result is not None:
                    return result
                rv = listed.metadata.resource_version
            w = watch.Watch()
            stream = w.stream(list_fn, cluster.namespace, resource_version=rv, allow_watch_bookmarks=True,
                              timeout_seconds=cluster.k8s.watch_timeout_seconds, **selectors)
            try:
                for event in stream:
                    failures = 0
                    rv = w.resource_version or rv
                    if event["type"] in ("BOOKMARK", "ERROR"):
                        continue
                    result = done(event["type"], event["object"])
                    if result is not None:
                        return result
            finally:
                stream.close()
            rv = w.resource_version or rv  # the server ended the watch (its timeout): resume from here
        except ApiException as e:
            if e.status == 410:  # our resourceVersion is too old: list again
                log.info("watch on %s expired (410 Gone); listing again", what)
                rv = None
            elif not _is_transient(e):
                raise K8sError(f"the API server refused to list/watch {what}: {e.status} {e.reason}. "
                               "Check the ServiceAccount's Role (k8s/rbac.yaml) or your kubeconfig user.") from None
            failures += 1
            if failures > cluster.k8s.watch_retries:
                raise K8sError(f"lost the watch on {what} {failures} times in a row (last: {e.status} {e.reason})") from None
            _pause(failures)
        except Exception as e:
            if not _is_transient(e):
                raise
            failures += 1
            if failures > cluster.k8s.watch_retries:
                raise K8sError(f"lost the connection to the API server while watching {what} {failures} times "
                               f"in a row ({type(e).__name__}: {e}). Check that the cluster is reachable.") from None
            log.info("watch on %s dropped (%s); reconnecting from resourceVersion %s", what, type(e).__name__, rv)
            _pause(failures)


# ------------------------------------------------------------------------------------------------ one step


FATAL_WAITING = ("ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError",
                 "CreateContainerError")
OK_CONDITIONS, FAILED_CONDITIONS = ("Complete", "SuccessCriteriaMet"), ("Failed", "FailureTarget")


class StepFailed(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


def _owned_by(pod: Any, uid: str) -> bool:
    return any(ref.uid == uid for ref in (pod.metadata.owner_references or []))


def _job_state(job: Any) -> str | None:
    """'ok' | 'failed' | None (still running) from the Job's conditions."""
    for cond in (job.status.conditions or []) if job.status else []:
        if cond.status == "True" and cond.type in OK_CONDITIONS:
            return "ok"
        if cond.status == "True" and cond.type in FAILED_CONDITIONS:
            return "failed"
    return None


def _job_condition_message(job: Any) -> str:
    for cond in (job.status.conditions or []) if job.status else []:
        if cond.status == "True" and cond.type in FAILED_CONDITIONS:
            return f"{cond.reason or cond.type}: {cond.message or ''}".strip()
    return ""


def _terminated(pod: Any) -> Any:
    for cs in (pod.status.container_statuses or []) if pod.status else []:
        if cs.state and cs.state.terminated:
            return cs.state.terminated
        if cs.last_state and cs.last_state.terminated:
            return cs.last_state.terminated
    return None


def _ensure_job(cluster: Cluster, body: dict[str, Any], step: str) -> Any:
    """Create the Job; a finished one of the same name is deleted first, a running one is attached to."""
    from kubernetes.client.rest import ApiException

    name = body["metadata"]["name"]
    try:
        old = cluster.batch.read_namespaced_job(name, cluster.namespace)
    except ApiException as e:
        if e.status != 404:
            raise K8sError(f"cannot read Job {name}: {e.status} {e.reason}") from None
        old = None
    if old is not None:
        if _job_state(old) is None:
            log.info("%s: Job %s is still running (an earlier orchestrator started it); following it", step, name)
            return old
        log.info("%s: deleting the finished Job %s of an earlier run before re-creating it", step, name)
        try:
            cluster.batch.delete_namespaced_job(name, cluster.namespace, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise K8sError(f"cannot delete the old Job {name}: {e.status} {e.reason}") from None
        old_uid = old.metadata.uid
        watch_until(cluster, cluster.batch.list_namespaced_job, f"Job {name} (deletion)",
                    lambda kind, j: True if kind == "DELETED" and j.metadata.uid == old_uid else None,
                    on_list=lambda items: None if any(j.metadata.uid == old_uid for j in items) else True,
                    field_selector=f"metadata.name={name}")
    try:
        return cluster.batch.create_namespaced_job(cluster.namespace, body)
    except ApiException as e:
        hint = " Check the Role (k8s/rbac.yaml) allows jobs create." if e.status == 403 else ""
        raise K8sError(f"cannot create Job {name} in namespace {cluster.namespace}: {e.status} {e.reason} "
                       f"{_api_message(e)}{hint}") from None


def _delete_job(cluster: Cluster, name: str) -> None:
    from kubernetes.client.rest import ApiException

    try:
        cluster.batch.delete_namespaced_job(name, cluster.namespace, propagation_policy="Background")
        log.info("deleted Job %s: its pod could not start", name)
    except ApiException as e:
        log.warning("could not delete Job %s (%s %s); delete it by hand", name, e.status, e.reason)


def _api_message(e: Any) -> str:
    try:
        return json.loads(e.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        return ""


def _wait_pod_started(cluster: Cluster, step: str, job: Any, seen: set[str], what: str | None = None,
                      selector: str | None = None) -> Any:
    """The next pod of this Job (not yet followed) once it runs or has ended; Pending reasons are logged,
    hopeless ones (image not found, bad config) fail the step. ``job`` None: any pod ``selector`` finds."""
    uid = job.metadata.uid if job is not None else None
    reported: set[str] = set()

    def done(kind: str, pod: Any) -> Any:
        if (uid is not None and not _owned_by(pod, uid)) or pod.metadata.name in seen:
            return None
        phase = pod.status.phase if pod.status else None
        if kind == "DELETED" or phase in ("Running", "Succeeded", "Failed"):
            return pod
        for cond in (pod.status.conditions or []) if pod.status else []:
            if cond.type == "PodScheduled" and cond.status == "False" and cond.message not in reported:
                reported.add(cond.message)
                log.warning("%s: pod %s not scheduled yet: %s", step, pod.metadata.name, cond.message)
        for cs in (pod.status.container_statuses or []) if pod.status else []:
            waiting = cs.state.waiting if cs.state else None
            if waiting and waiting.reason in FATAL_WAITING:
                raise StepFailed(f"pod {pod.metadata.name} cannot start: {waiting.reason}: {waiting.message or ''}"
                                 f" (image {cs.image}). Check k8s.image / k8s.image_pull_secrets.")
            if waiting and waiting.reason and waiting.reason not in reported:
                reported.add(waiting.reason)
                log.info("%s: pod %s pending: %s", step, pod.metadata.name, waiting.reason)
        return None

    return watch_until(cluster, cluster.core.list_namespaced_pod, what or f"the pods of Job {job.metadata.name}",
                       done, label_selector=selector or run_selector(job.metadata.labels[LABEL_RUN_ID], step))


def _follow_log(cluster: Cluster, step: str, pod: Any, tail: deque[str], container: str | None = None) -> None:
    """Print the pod's log live, each line prefixed with ``[step]``; keep the last lines in ``tail``."""
    from kubernetes.client.rest import ApiException

    name = pod.metadata.name
    try:
        resp = cluster.core.read_namespaced_pod_log(name, cluster.namespace, container=container or step,
                                                    follow=True, _preload_content=False)
    except ApiException as e:
        log.warning("%s: cannot read the log of pod %s: %s %s", step, name, e.status, e.reason)
        return
    try:
        for line in _lines(resp.stream(amt=None, decode_content=True)):
            print(f"[{step}] {line}", file=sys.stderr, flush=True)
            tail.append(line)
    except Exception as e:
        if not _is_transient(e):
            raise
        log.warning("%s: log stream of pod %s interrupted (%s); `kubectl logs %s` has the rest", step, name,
                    type(e).__name__, name)
    finally:
        resp.release_conn()


def _lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """UTF-8 lines of a byte stream; ``\\r`` (progress bars) ends a line too."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    buffer = ""
    for chunk in chunks:
        buffer += decoder.decode(chunk)
        *complete, buffer = re.split(r"\r\n|\r|\n", buffer)
        yield from (line for line in complete if line.strip())
    buffer += decoder.decode(b"", final=True)
    if buffer.strip():
        yield buffer


def _wait_pod_ended(cluster: Cluster, pod: Any) -> Any:
    name, uid = pod.metadata.name, pod.metadata.uid

    def done(kind: str, p: Any) -> Any:
        if p.metadata.uid != uid:
            return None
        return p if kind == "DELETED" or (p.status and p.status.phase in ("Succeeded", "Failed")) else None

    return watch_until(cluster, cluster.core.list_namespaced_pod, f"pod {name}", done,
                       on_list=lambda items: None if any(p.metadata.uid == uid for p in items) else pod,
                       field_selector=f"metadata.name={name}")


def _wait_job(cluster: Cluster, job: Any, failed_pods: int, retry_possible: bool) -> Any:
    """Watch the Job until it is finished, or (``retry_possible``: its last pod failed) until it counts
    ``failed_pods`` failures and runs a new pod."""
    uid, name = job.metadata.uid, job.metadata.name

    def done(kind: str, j: Any) -> Any:
        if j.metadata.uid != uid:
            return None
        if kind == "DELETED":
            raise StepFailed(f"Job {name} was deleted while running")
        if _job_state(j) is not None:
            return j
        status = j.status
        if retry_possible and status and (status.failed or 0) >= failed_pods and (status.active or 0) > 0:
            return j  # a retry pod is on its way
        return None

    def gone(items: list[Any]) -> Any:
        if not any(j.metadata.uid == uid for j in items):
            raise StepFailed(f"Job {name} was deleted while running")
        return None

    return watch_until(cluster, cluster.batch.list_namespaced_job, f"Job {name}", done, on_list=gone,
                       field_selector=f"metadata.name={name}")


def run_step_job(cluster: Cluster, step: str, body: dict[str, Any]) -> tuple[int, str, list[str]]:
    """Create/attach the step's Job, follow its pods and wait for it: (exit code, failure message, last log lines)."""
    job = _ensure_job(cluster, body, step)
    log.info("%s: Job %s (namespace %s)", step, job.metadata.name, cluster.namespace)
    seen: set[str] = set()
    failed_pods = 0
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    last_pod = None
    while True:
        if _job_state(job) is None:
            try:
                pod = _wait_pod_started(cluster, step, job, seen)
            except StepFailed:  # a pod that can never start still holds its node's resources (a GPU)
                _delete_job(cluster, job.metadata.name)
                raise
            seen.add(pod.metadata.name)
            if pod.status and pod.status.phase != "Pending":
                _follow_log(cluster, step, pod, tail)
                pod = _wait_pod_ended(cluster, pod)
            last_pod = pod
            pod_failed = bool(pod.status and pod.status.phase == "Failed")
            if pod_failed:
                failed_pods += 1
                if failed_pods <= cluster.k8s.backoff_limit:
                    log.warning("%s: pod %s failed (%s); the Job retries (%d of backoffLimit %d)", step,
                                pod.metadata.name, _termination_text(pod), failed_pods, cluster.k8s.backoff_limit)
            job = _wait_job(cluster, job, failed_pods, retry_possible=pod_failed)
        state = _job_state(job)
        if state == "ok":
            return EXIT_OK, "", list(tail)
        if state == "failed":
            term = _terminated(last_pod) if last_pod is not None else None
            code = term.exit_code if term is not None and term.exit_code else EXIT_FAILED
            message = _termination_text(last_pod) if last_pod is not None else ""
            return code, message or _job_condition_message(job) or "the Job failed", list(tail)


def _termination_text(pod: Any) -> str:
    term = _terminated(pod)
    if term is None:
        return ""
    parts = [f"exit {term.exit_code}" + (f", {term.reason}" if term.reason else "")]
    if term.reason == "OOMKilled":
        parts.append("the container ran out of memory: raise k8s.memory for this step (finetune: the plan's "
                     "memory, or k8s.memory.finetune)")
    if term.message:
        parts.append(term.message.strip())
    return ": ".join(parts)


# ------------------------------------------------------------------------------------------------ a TrainJob


def check_trainer_installed(cluster: Cluster) -> None:
    """K8sError with how to install Kubeflow Trainer unless the API server serves TrainJobs (API discovery:
    readable by every authenticated user, no cluster-wide permission needed)."""
    from kubernetes.client.rest import ApiException

    try:
        found = cluster.custom.get_api_resources(TRAINER_GROUP, TRAINER_VERSION)
    except ApiException as e:
        if e.status != 404:
            raise K8sError(f"cannot ask the API server for {TRAINER_GROUP}/{TRAINER_VERSION}: {e.status} "
                           f"{e.reason}") from None
        found = None
    if found is None or TRAINJOBS not in {r.name for r in found.resources or []}:
        raise K8sError(f"the finetune step may span {cluster.k8s.nodes} nodes (k8s.nodes), which runs it as a "
                       f"Kubeflow Trainer TrainJob ({TRAINER_GROUP}/{TRAINER_VERSION}), but this cluster has no "
                       f"TrainJob CRD. {INSTALL_TRAINER}")


def _list_trainjobs(cluster: Cluster) -> Callable[..., Any]:
    """A list function over TrainJobs shaped like the typed APIs' (``.items``, ``.metadata.resource_version``)
    for ``watch_until``; items are dicts (custom objects have no model classes)."""
    from types import SimpleNamespace

    def list_trainjobs(namespace: str, **kwargs: Any) -> Any:
        """:return: object"""  # (watch.Watch reads the return type here: custom objects stay dicts)
        found = cluster.custom.list_namespaced_custom_object(TRAINER_GROUP, TRAINER_VERSION, namespace, TRAINJOBS,
                                                             **kwargs)
        if kwargs.get("watch"):
            return found
        return SimpleNamespace(items=[_obj(i) for i in found["items"]],
                               metadata=SimpleNamespace(resource_version=found["metadata"]["resourceVersion"]))

    return list_trainjobs


def _obj(d: Any) -> Any:
    """A TrainJob dict with attribute access where the shared helpers expect it (metadata.uid / .name)."""
    from types import SimpleNamespace

    if not isinstance(d, dict):
        return d
    meta = d.get("metadata", {})
    return SimpleNamespace(raw=d, metadata=SimpleNamespace(name=meta.get("name"), uid=meta.get("uid")),
                           status=d.get("status") or {})


def _trainjob_state(tj: Any) -> str | None:
    for cond in tj.status.get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in OK_CONDITIONS:
            return "ok"
        if cond.get("status") == "True" and cond.get("type") in FAILED_CONDITIONS:
            return "failed"
    return None


def _trainjob_message(tj: Any) -> str:
    for cond in tj.status.get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in FAILED_CONDITIONS:
            return f"{cond.get('reason') or cond.get('type')}: {cond.get('message') or ''}".strip()
    return ""


def _ensure_trainjob(cluster: Cluster, body: dict[str, Any], step: str) -> Any:
    """Create the TrainJob; a finished one of the same name is deleted first, a running one is followed."""
    from kubernetes.client.rest import ApiException

    name = body["metadata"]["name"]
    args = (TRAINER_GROUP, TRAINER_VERSION, cluster.namespace, TRAINJOBS)
    try:
        old = _obj(cluster.custom.get_namespaced_custom_object(*args, name))
    except ApiException as e:
        if e.status != 404:
            raise K8sError(f"cannot read TrainJob {name}: {e.status} {e.reason}") from None
        old = None
    if old is not None:
        if _trainjob_state(old) is None:
            log.info("%s: TrainJob %s is still running (an earlier orchestrator started it); following it", step, name)
            return old
        log.info("%s: deleting the finished TrainJob %s of an earlier run before re-creating it", step, name)
        try:
            cluster.custom.delete_namespaced_custom_object(*args, name, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise K8sError(f"cannot delete the old TrainJob {name}: {e.status} {e.reason}") from None
        watch_until(cluster, _list_trainjobs(cluster), f"TrainJob {name} (deletion)",
                    lambda kind, j: True if kind == "DELETED" and _obj(j).metadata.uid == old.metadata.uid else None,
                    on_list=lambda items: None if any(j.metadata.uid == old.metadata.uid for j in items) else True,
                    field_selector=f"metadata.name={name}")
    try:
        return _obj(cluster.custom.create_namespaced_custom_object(*args, body))
    except ApiException as e:
        hint = {403: " Check the Role (k8s/rbac.yaml) allows trainjobs create.",
                404: f" {INSTALL_TRAINER}"}.get(e.status, "")
        raise K8sError(f"cannot create TrainJob {name} in namespace {cluster.namespace}: {e.status} {e.reason} "
                       f"{_api_message(e)}{hint}") from None


def _failed_pod_message(cluster: Cluster, selector: str) -> str:
    """The termination message of the pod that failed first (the node whose error stopped the others)."""
    pods = cluster.core.list_namespaced_pod(cluster.namespace, label_selector=selector).items
    failed = [p for p in pods if p.status and p.status.phase == "Failed" and _terminated(p) is not None]
    if not failed:
        return ""
    first = min(failed, key=lambda p: (_terminated(p).finished_at is None, _terminated(p).finished_at or 0))
    node = (first.metadata.labels or {}).get(LABEL_NODE_INDEX, "?")
    return f"node {node} (pod {first.metadata.name}) failed first: {_termination_text(first)}"


def run_trainjob(cluster: Cluster, step: str, body: dict[str, Any]) -> tuple[int, str, list[str]]:
    """Create/attach the step's TrainJob, stream node 0's (global rank 0's) log, wait for the TrainJob's
    Complete / Failed condition: (exit code, the first failed pod's message, last log lines)."""
    tj = _ensure_trainjob(cluster, body, step)
    name = tj.metadata.name
    spec = body["spec"]["trainer"]
    log.info("%s: TrainJob %s (namespace %s, runtime %s): %d nodes x %d processes", step, name, cluster.namespace,
             body["spec"]["runtimeRef"]["name"], spec["numNodes"], spec["numProcPerNode"])
    selector = run_selector(body["metadata"]["labels"][LABEL_RUN_ID], step)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    if _trainjob_state(tj) is None:
        rank0 = _wait_pod_started(cluster, step, None, set(), f"node 0 of TrainJob {name}",
                                  f"{selector},{LABEL_NODE_INDEX}=0")
        if rank0.status and rank0.status.phase != "Pending":
            _follow_log(cluster, step, rank0, tail, TRAINER_CONTAINER)

        def done(kind: str, j: Any) -> Any:
            j = _obj(j)
            if j.metadata.uid != tj.metadata.uid:
                return None
            if kind == "DELETED":
                raise StepFailed(f"TrainJob {name} was deleted while running")
            return j if _trainjob_state(j) is not None else None

        tj = watch_until(cluster, _list_trainjobs(cluster), f"TrainJob {name}", done,
                         field_selector=f"metadata.name={name}")
    if _trainjob_state(tj) == "ok":
        return EXIT_OK, "", list(tail)
    message = _failed_pod_message(cluster, selector) or _trainjob_message(tj) or "the TrainJob failed"
    return EXIT_FAILED, message, list(tail)


# ------------------------------------------------------------------------------------------------ the pipeline


def run_k8s(steps: list[str], pipeline: dict[str, Any], common: dict[str, Any], settings: Any,
            api_client: Any = None) -> int:
    """Run the pipeline's steps as Jobs (or print them with ``settings.dry_run``); the exit code of the run."""
    k8s: K8sSettings = settings.k8s
    try:
        artifacts_for_pods(common, k8s)
    except SettingsError as e:
        print(f"asr-ft run: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _warn_credentials(common, k8s)
    if settings.dry_run:  # no cluster, no S3: the PVC only when it is mounted here
        store = LocalStore(k8s.mount_path) if k8s.pvc is not None and Path(k8s.mount_path).is_dir() else None
        jobs = build_jobs(steps, pipeline, common, k8s, store, k8s.namespace)
        header = (f"# asr-ft run '{common['run_id']}': {len(jobs)} Jobs, one per step ({' → '.join(steps)}).\n"
                  "# Each step reads the previous one's outputs: `asr-ft run --executor k8s` creates them one at a\n"
                  "# time, each after the previous one completed (by hand: kubectl apply, then kubectl wait).\n")
        sys.stdout.write(jobs_yaml(redact_tree(jobs), header))  # secrets masked, as in the manifests
        return EXIT_OK
    try:
        cluster = connect(k8s, api_client)
    except K8sError as e:
        print(f"asr-ft run: {e}", file=sys.stderr)
        return EXIT_FAILED
    if k8s.nodes > 1 and set(steps) & set(GPU_STEPS):
        try:
            check_trainer_installed(cluster)
        except K8sError as e:
            print(f"asr-ft run: {e}", file=sys.stderr)
            return EXIT_FAILED
    store, where = orchestrator_store(common, k8s)
    if store is None:
        log.warning("%s", where)
    results = [StepResult(s, "not run", job=job_name(common["run_id"], s)) for s in steps]
    code = EXIT_OK
    done = done_steps(store, common["run_id"], steps, pipeline) if store is not None and not common.get("force") else {}
    for result in results:
        step = result.step
        if step in done:
            result.status, result.note, result.job = "skipped", done[step], ""
            log.info("%s: skipped, %s", step, done[step])
            continue
        print(f"\n━━ {step} ━━ Job {result.job}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            body = build_jobs([step], pipeline, common, k8s, store, cluster.namespace)[0]
            if body["kind"] == "TrainJob":
                code, message, tail = run_trainjob(cluster, step, body)
            else:
                code, message, tail = run_step_job(cluster, step, body)
        except StepFailed as e:
            code, message, tail = e.exit_code, str(e), []
        except K8sError as e:
            code, message, tail = EXIT_FAILED, str(e), []
        except KeyboardInterrupt:
            print(f"\ninterrupted: Job {result.job} keeps running in namespace {cluster.namespace}; "
                  f"`kubectl -n {cluster.namespace} delete job {result.job}` stops it", file=sys.stderr)
            return 130
        result.seconds = time.perf_counter() - t0
        if code != EXIT_OK:
            result.status, result.code, result.note = "failed", code, f"(exit {code})"
            _print_failure(step, result.job, cluster.namespace, message, tail)
            break
        result.status = "done"
    _print_summary(results, common, cluster.namespace)
    return code


def _warn_credentials(common: dict[str, Any], k8s: K8sSettings) -> None:
    s3 = common.get("s3") or {}
    has_keys = any(hasattr(v, "get_secret_value") and v is not None for v in dict(s3).values())
    if str(common.get("artifacts", "")).startswith("s3://") and not k8s.s3_secret:
        log.warning("artifacts are in S3 but k8s.s3_secret is not set: the step pods get no S3 credentials "
                    "(fine with workload identity; else create a Secret from k8s/examples/secret.example.yaml and set "
                    "--k8s-s3-secret)%s", "; the keys given to this command are NOT passed on" if has_keys else "")


def _print_failure(step: str, job: str, namespace: str, message: str, tail: list[str]) -> None:
    lines = [f"\n✗ {step} failed. Termination message 终止信息:", f"  {message or '(none)'}"]
    if tail:
        lines += ["Last log lines 最后日志:", "─" * 60, *tail, "─" * 60]
    lines.append(f"The Job is kept for inspection: kubectl -n {namespace} describe job {job}; "
                 f"kubectl -n {namespace} logs job/{job}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def _print_summary(results: list[StepResult], common: dict[str, Any], namespace: str) -> None:
    icon = {"done": "✓", "skipped": "↷", "failed": "✗", "not run": "·"}
    rows = [f"{icon[r.status]} {r.step:<11} {r.status:<8} {r.seconds:7.1f}s  {r.job or r.note}" for r in results]
    total = sum(r.seconds for r in results)
    out = ["", f"Run '{common['run_id']}' as Kubernetes Jobs in namespace {namespace} · 运行汇总", *rows,
           f"  {'total':<20} {total:7.1f}s"]
    print("\n".join(out), file=sys.stderr, flush=True)
