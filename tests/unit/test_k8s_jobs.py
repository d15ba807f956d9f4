"""Kubernetes Job objects of the k8s executor (build_job), the plain manifests in k8s/, and `--dry-run`.

Every object is checked against the Kubernetes OpenAPI schemas of two minor versions with kubernetes-validate
in strict mode (unknown fields are errors).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from pydantic import SecretStr

from common.core.registry import pipeline_steps
from common.core.settings import S3Settings, SettingsError, load_settings
from common.core.stage import MANIFEST, code_version
from common.core.store import LocalStore
from common.executors import k8s as k8s_mod
from common.executors.k8s import (
    ANNOTATION_RESOURCES,
    K8sSettings,
    PodResources,
    build_job,
    done_in_store,
    finetune_resources,
    job_name,
)
from common.executors.pipeline import load_pipeline, steps_of
from jobs.run.__main__ import RunSettings, main

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "k8s"
VERSIONS = ("1.30", "1.33")  # oldest and a recent minor version whose schemas kubernetes-validate ships
DEMO_STEPS = list(pipeline_steps())  # the demo pipeline has every step, demo-data included
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                      "capabilities": {"drop": ["ALL"]}}
PLAN = PodResources(gpus=2, memory_request="40Gi", memory_limit="44Gi", shm_size="6Gi", cpu="12",
                    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    source="test plan")
SECRET_VALUES = ("AKIA-ASRFT-TEST-KEY", "asr-ft-secret-never-in-a-job")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in list(os.environ):
        if var.startswith(("ASRFT_", "AWS_", "KUBERNETES_")) or var == "KUBECONFIG":
            monkeypatch.delenv(var)
    monkeypatch.setenv("ASRFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def validate(obj: dict, versions=VERSIONS) -> None:
    for version in versions:
        kubernetes_validate.validate(obj, version, strict=True)


def demo(**cli) -> tuple[dict, dict, K8sSettings]:
    """The built-in demo pipeline, its common values (as `asr-ft run` resolves them) and k8s settings."""
    from common.executors.pipeline import demo_config_path

    pipeline = load_pipeline(None)
    settings = load_settings(RunSettings, cli, demo_config_path())
    common = {k: getattr(settings, k) for k in ("artifacts", "run_id", "force", "log_level")}
    common["force"] = None
    common["s3"] = dict(settings.s3)
    return pipeline, common, settings.k8s


def container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def env_of(job: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(job).get("env", [])}


# ------------------------------------------------------------------------------------------------ every Job


@pytest.mark.parametrize("step", DEMO_STEPS)
def test_job_for_each_demo_step(step):
    pipeline, common, k8s = demo()
    job = build_job(step, pipeline, common, k8s, PLAN)
    validate(job)
    name = f"asrft-demo-{step}"
    assert job["metadata"]["name"] == name
    labels = {"app.kubernetes.io/name": "asr-ft", "app.kubernetes.io/component": step,
              "app.kubernetes.io/managed-by": "asr-ft", "asr-ft/run-id": "demo", "asr-ft/stage": step}
    assert labels.items() <= job["metadata"]["labels"].items()
    assert labels.items() <= job["spec"]["template"]["metadata"]["labels"].items()
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (spec["backoffLimit"], spec["ttlSecondsAfterFinished"]) == (0, 86400)
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"] == POD_SECURITY
    c = container(job)
    assert c["securityContext"] == CONTAINER_SECURITY
    assert c["command"] == ["asr-ft", step]
    assert c["terminationMessagePath"] == "/dev/termination-log"
    # read-only root filesystem: /tmp (holding ASRFT_CACHE) and the artifacts are the writable places
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["/tmp"] == "tmp" and "emptyDir" in volumes["tmp"]
    assert volumes[mounts["/artifacts"]]["persistentVolumeClaim"] == {"claimName": "asr-ft-artifacts"}
    assert c["workingDir"] == "/artifacts"
    env = env_of(job)
    assert env["ASRFT_ARTIFACTS"] == "/artifacts" and env["ASRFT_RUN_ID"] == "demo"
    assert env["ASRFT_CACHE"].startswith("/tmp/") and env["HOME"] == "/tmp"
    assert "ASRFT_FORCE" not in env
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]


@pytest.mark.parametrize("step, key, value", [
    ("demo-data", "ASRFT_DEMO_DATA_N_TRAIN", "660"),
    ("prepare", "ASRFT_PREPARE_TRAIN_CSV", "demo_data/train.csv"),
    ("pretrained", "ASRFT_PRETRAINED_MODEL", "bundled:whisper-base"),
    ("export", "ASRFT_EXPORT_QUANTIZATION", "float16"),
])
def test_step_section_becomes_its_env(step, key, value):
    pipeline, common, k8s = demo()
    env = env_of(build_job(step, pipeline, common, k8s, PLAN))
    assert env[key] == value
    assert not any(k.startswith("ASRFT_EVALUATE_") for k in env if step != "evaluate")


def test_cpu_steps_get_no_gpu_and_no_plan():
    pipeline, common, k8s = demo()
    job = build_job("evaluate", pipeline, common, k8s, PLAN)
    pod = job["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert "nvidia.com/gpu" not in container(job)["resources"]["limits"]
    assert ANNOTATION_RESOURCES not in job["metadata"]["annotations"]
    assert not container(job)["image"].endswith("-cuda")


# ------------------------------------------------------------------------------------------------ training Job


def test_training_job_takes_gpus_memory_and_shm_from_the_plan():
    pipeline, common, k8s = demo(**{"k8s.gpu_node_selector": "pool=gpu",
                                    "k8s.gpu_tolerations": '[{"key": "dedicated", "operator": "Equal", '
                                                           '"value": "asr", "effect": "NoSchedule"}]'})
    job = build_job("finetune", pipeline, common, k8s, PLAN)
    validate(job)
    c, pod = container(job), job["spec"]["template"]["spec"]
    assert c["resources"] == {"requests": {"cpu": "12", "memory": "40Gi"},
                              "limits": {"memory": "44Gi", "nvidia.com/gpu": "2"}}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": "gpu"}
    assert {"key": "dedicated", "operator": "Equal", "value": "asr", "effect": "NoSchedule"} in pod["tolerations"]
    assert PLAN.tolerations[0] in pod["tolerations"]
    shm = next(m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert next(v for v in pod["volumes"] if v["name"] == shm["name"])["emptyDir"] == \
        {"medium": "Memory", "sizeLimit": "6Gi"}
    assert c["image"] == f"ghcr.io/asr-ft/asr-ft:{code_version()}-cuda"
    note = job["metadata"]["annotations"][ANNOTATION_RESOURCES]
    assert note.startswith("resources from plan: 2 GPU, memory 40Gi request / 44Gi limit, /dev/shm 6Gi")
    assert pod["securityContext"] == POD_SECURITY and c["securityContext"] == CONTAINER_SECURITY


WHISPER_BASE = dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                    decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, vocab_size=51865,
                    num_mel_bins=80, max_source_positions=1500, max_target_positions=448)
DEMO_FACTS = {"clips": 300, "longest_seconds": 4.75, "longest_labels": 40, "rejected": []}


def run_store(root: Path, config: dict | None = None, facts: dict | None = None, run_id: str = "demo") -> LocalStore:
    """A store holding what the executor plans the training pod from: the family and model config written by
    `pretrained`, and extract's data facts."""
    from transformers import WhisperConfig

    store = LocalStore(root)
    store.write_json(f"{run_id}/pretrained/provenance.json", {"family": "whisper", "ref": "bundled:whisper-base"})
    store.write_json(f"{run_id}/pretrained/model/config.json", WhisperConfig(**(config or WHISPER_BASE)).to_dict())
    store.write_json(f"{run_id}/extract/data_facts.json", facts or DEMO_FACTS)
    return store


def test_training_resources_come_from_the_stages_own_plan(tmp_path):
    """finetune_resources gives the pod what the finetune stage's planning gives for the run's model config and
    data facts in the store, on the node k8s describes."""
    from common.families import get_family
    from common.training.planner import detect_resources
    from jobs.finetune import FinetuneSettings
    from jobs.finetune.plan import make_plan

    pipeline, common, k8s = demo(**{"k8s.gpus": "1", "k8s.gpu_memory_gb": "80", "k8s.gpu_node_memory_gb": "125"})
    pipeline["finetune"] = {}  # planner defaults on both sides
    large = {**WHISPER_BASE, "d_model": 1280, "encoder_layers": 32, "decoder_layers": 32, "encoder_attention_heads": 20,
             "decoder_attention_heads": 20, "encoder_ffn_dim": 5120, "decoder_ffn_dim": 5120, "num_mel_bins": 128}
    facts = {"clips": 5000, "longest_seconds": 12.0, "longest_labels": 60, "rejected": []}
    store = run_store(tmp_path / "pvc", large, facts)
    res = finetune_resources(pipeline, common, k8s, store)

    node = detect_resources(gpus=1, gpu_mem_bytes=80 * 10**9, host_ram_bytes=125 * 10**9, cpu_count=16,
                            gpu_name="", bf16_supported=True)
    config = store.read_json("demo/pretrained/model/config.json")
    expected, _ = make_plan(FinetuneSettings(), get_family("whisper"), config, facts, node)
    assert (res.gpus, res.memory_request, res.memory_limit, res.shm_size) == \
        (expected.pod.gpus, expected.pod.memory_request, expected.pod.memory_limit, expected.pod.shm_size)
    assert "5000 training clips from extract/data_facts.json" in res.source
    assert res.setup["mode"] == expected.mode and res.setup["per_device_batch"] == expected.per_device_batch

    # Nothing in the store yet (a dry run before the run): default resources, and the Job says why.
    early = finetune_resources(pipeline, common, k8s, None)
    assert early.source.startswith("defaults, not planned") and "run pretrained and extract first" in early.source
    assert (early.memory_request, early.gpus) == ("16Gi", 1)


@pytest.mark.parametrize("how", ["k8s.gpus=0", "finetune.device=cpu"])
def test_cpu_only_training_has_no_gpu_request(how, tmp_path):
    pipeline, common, k8s = demo(**({"k8s.gpus": "0"} if how == "k8s.gpus=0" else {}))
    if how == "finetune.device=cpu":
        pipeline["finetune"] = {"device": "cpu"}
    res = finetune_resources(pipeline, common, k8s, run_store(tmp_path))
    assert res.setup["world_size"] == 1 and "plan for" in res.source
    job = build_job("finetune", pipeline, common, k8s, res)
    validate(job)
    pod = job["spec"]["template"]["spec"]
    assert res.gpus == 0 and "nvidia.com/gpu" not in container(job)["resources"]["limits"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert not container(job)["image"].endswith("-cuda")


def test_finetune_settings_reach_the_plan(tmp_path):
    """The section's batch (the stage's name for it) and mode are the planner's requests."""
    pipeline, common, k8s = demo()
    pipeline["finetune"] = {"batch": 4, "mode": "lora"}
    res = finetune_resources(pipeline, common, k8s, run_store(tmp_path))
    assert "lora, plain, batch 4" in res.source


def test_memory_override_wins_over_the_plan(tmp_path):
    pipeline, common, k8s = demo(**{"k8s.memory": '{"finetune": "300Gi"}'})
    res = finetune_resources(pipeline, common, k8s, run_store(tmp_path))
    assert (res.memory_request, res.memory_limit) == ("300Gi", "300Gi")
    assert "k8s.memory.finetune=300Gi" in res.source


def test_invalid_finetune_settings_leave_the_pod_to_fail_with_the_reason(tmp_path):
    pipeline, common, k8s = demo()
    pipeline["finetune"] = {"mode": "full", "overrides": {"strategy": "zero3", "no_such_decision": 1}}
    res = finetune_resources(pipeline, common, k8s, run_store(tmp_path))
    assert res.source.startswith("defaults, the planner gave no plan") and "no_such_decision" in res.source


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("run_id, step, expected", [
    ("demo", "prepare", "asrft-demo-prepare"),
    ("exp-2026-11-25", "demo-data", "asrft-exp-2026-11-25-demo-data"),
    ("Exp_1", "finetune", r"asrft-exp-1-finetune-[0-9a-f]{6}"),  # changed to fit: hash keeps it distinct
    ("a" * 63, "evaluate", r"asrft-a{41}-evaluate-[0-9a-f]{6}"),  # shortened to 63 characters
])
def test_job_names(run_id, step, expected):
    name = job_name(run_id, step)
    assert re.fullmatch(expected, name), name
    assert len(name) <= 63 and DNS_1123_LABEL.match(name)


@pytest.mark.parametrize("a, b", [("a_b", "a-b"), ("A.b", "a-b"), ("x" * 60 + "1", "x" * 60 + "2")])
def test_distinct_run_ids_get_distinct_job_names(a, b):
    assert job_name(a, "finetune") != job_name(b, "finetune")


# ------------------------------------------------------------------------------------------------ S3


def test_s3_credentials_only_through_the_secret():
    pipeline = load_pipeline(None)
    s3 = S3Settings(endpoint_url="http://minio:9000", access_key_id=SecretStr(SECRET_VALUES[0]),
                    secret_access_key=SecretStr(SECRET_VALUES[1]))
    common = {"artifacts": "s3://bucket/runs", "run_id": "demo", "log_level": "INFO", "s3": dict(s3)}
    k8s = K8sSettings(s3_secret="asr-ft-s3", pvc="")
    for step in DEMO_STEPS:
        job = build_job(step, pipeline, common, k8s, PLAN)
        validate(job)
        text = json.dumps(job)
        assert not any(secret in text for secret in SECRET_VALUES)
        assert container(job)["envFrom"] == [{"secretRef": {"name": "asr-ft-s3"}}]
        env = env_of(job)
        assert env["ASRFT_ARTIFACTS"] == "s3://bucket/runs"
        assert env["ASRFT_S3__ENDPOINT_URL"] == "http://minio:9000"
        assert not any("KEY" in k or "SECRET" in k for k in env)
        assert all("persistentVolumeClaim" not in v for v in job["spec"]["template"]["spec"]["volumes"])


def test_dry_run_never_prints_s3_secrets(monkeypatch, capsys):
    monkeypatch.setenv("ASRFT_S3__SECRET_ACCESS_KEY", SECRET_VALUES[1])
    assert main(["--executor", "k8s", "--dry-run", "--artifacts", "s3://bucket/runs",
                 "--k8s-s3-secret", "asr-ft-s3"]) == 0
    out, err = capsys.readouterr()
    assert SECRET_VALUES[1] not in out + err
    assert out.count("name: asr-ft-s3") == len(DEMO_STEPS)


def test_local_artifacts_need_a_pvc(capsys):
    assert main(["--executor", "k8s", "--dry-run", "--k8s-pvc", ""]) == 2
    assert "--k8s-pvc" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ --dry-run


def _no_cluster(*args, **kwargs):
    raise AssertionError("--dry-run must not contact a cluster")


def test_dry_run_prints_one_job_per_step(monkeypatch, capsys):
    monkeypatch.setattr(k8s_mod, "connect", _no_cluster)
    assert main(["--executor", "k8s", "--dry-run"]) == 0
    jobs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert [j["metadata"]["name"] for j in jobs] == [f"asrft-demo-{s}" for s in DEMO_STEPS]
    assert [container(j)["command"] for j in jobs] == [["asr-ft", s] for s in DEMO_STEPS]
    assert all("namespace" not in j["metadata"] for j in jobs)  # left to `kubectl apply -n`
    for job in jobs:
        validate(job)
    finetune = jobs[DEMO_STEPS.index("finetune")]
    assert container(finetune)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert finetune["metadata"]["annotations"][ANNOTATION_RESOURCES].startswith("resources from plan:")


def test_dry_run_of_the_kimi_audio_pipeline_sizes_the_gpu_job_by_its_plan(monkeypatch, capsys):
    """Before the run has any output the pipeline names its family, so the GPU Job is planned from
    Kimi-Audio-7B's published shape (LoRA on one 80 GB GPU), not given the defaults."""
    monkeypatch.setattr(k8s_mod, "connect", _no_cluster)
    assert main(["--config", str(ROOT / "jobs/run/kimi-audio.yaml"), "--executor", "k8s", "--dry-run"]) == 0
    jobs = {j["metadata"]["labels"]["asr-ft/stage"]: j for j in yaml.safe_load_all(capsys.readouterr().out) if j}
    for job in jobs.values():
        validate(job)
    finetune = jobs["finetune"]
    note = finetune["metadata"]["annotations"][ANNOTATION_RESOURCES]
    assert "Kimi-Audio-7B's published shape" in note and ": lora, plain" in note
    limits = container(finetune)["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and int(limits["memory"].removesuffix("Gi")) > 16  # the plan's, not 16Gi
    assert container(finetune)["image"].endswith("-cuda")


def test_dry_run_with_a_config_namespace_and_steps(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(k8s_mod, "connect", _no_cluster)
    config = tmp_path / "p.yaml"
    config.write_text("run_id: exp1\nartifacts: runs/\nprepare: {train_csv: a.csv, audio_dir: audio}\n"
                      "finetune: {epochs: 3}\nrun: {k8s: {backoff_limit: 2, image: registry.local/asr:1}}\n")
    assert main(["--config", str(config), "--executor", "k8s", "--dry-run", "--namespace", "speech",
                 "--stages", "prepare", "--stages", "finetune"]) == 0
    jobs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert [j["metadata"]["name"] for j in jobs] == ["asrft-exp1-prepare", "asrft-exp1-finetune"]
    assert all(j["metadata"]["namespace"] == "speech" and j["spec"]["backoffLimit"] == 2 for j in jobs)
    assert [container(j)["image"] for j in jobs] == ["registry.local/asr:1", "registry.local/asr:1-cuda"]
    assert env_of(jobs[1])["ASRFT_FINETUNE_EPOCHS"] == "3"


# ------------------------------------------------------------------------------------------------ settings


def test_k8s_settings_from_env_and_flags(monkeypatch):
    monkeypatch.setenv("ASRFT_RUN_K8S__NAMESPACE", "from-env")
    monkeypatch.setenv("ASRFT_RUN_K8S__GPU_NODE_SELECTOR", '{"pool": "a100"}')
    k8s = load_settings(RunSettings, {"k8s.cpu": "evaluate=8", "k8s.image_pull_secrets": "regcred,other"}).k8s
    assert (k8s.namespace, k8s.gpu_node_selector, k8s.cpu) == ("from-env", {"pool": "a100"}, {"evaluate": "8"})
    assert k8s.image_pull_secrets == ["regcred", "other"]


@pytest.mark.parametrize("cli, problem", [
    ({"k8s.memory": "evaluat=8Gi"}, "unknown step 'evaluat'"),
    ({"k8s.memory": "evaluate=8GB"}, "not a Kubernetes quantity"),
    ({"k8s.gpu_tolerations": "[{bad"}, "not valid JSON"),
    ({"k8s.mount_path": "artifacts"}, "absolute path"),
])
def test_bad_k8s_settings_say_what_to_fix(cli, problem):
    with pytest.raises(SettingsError, match=re.escape(problem)):
        load_settings(RunSettings, cli)


# ------------------------------------------------------------------------------------------------ skipping


@pytest.mark.parametrize("manifest, pipeline_change, skipped", [
    ({"settings": {"quantization": "float16"}}, None, True),
    ({"settings": {"quantization": "float16"}}, {"quantization": "int8"}, False),  # settings changed
    ({"settings": {"quantization": "float16"}, "code_version": "0.0.0-old"}, None, False),  # other code
    (None, None, False),  # never ran
])
def test_done_in_store(tmp_path, manifest, pipeline_change, skipped):
    store = LocalStore(tmp_path)
    pipeline = load_pipeline(None)
    if pipeline_change:
        pipeline["export"] = pipeline_change
    if manifest is not None:
        store.write_json(f"demo/export/{MANIFEST}", {"code_version": code_version(), "finished": "now", **manifest})
    assert (done_in_store(store, "demo", "export", pipeline) is not None) == skipped


def test_demo_data_has_no_manifest_so_it_is_never_done_by_itself(tmp_path):
    assert done_in_store(LocalStore(tmp_path), "demo", "demo-data", load_pipeline(None)) is None


# ------------------------------------------------------------------------------------------------ k8s/


def manifests(pattern: str = "**/*.yaml") -> list[tuple[str, int, dict]]:
    """Every built-in kind of k8s/ (the TrainJob is checked against its CRD: tests/integration/test_k8s_trainjob.py)."""
    out = []
    for path in sorted(K8S_DIR.glob(pattern)):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc and doc["kind"] != "TrainJob":
                out.append((path.relative_to(K8S_DIR).as_posix(), i, doc))
    return out


def test_k8s_folder_has_the_documented_files():
    names = {p.relative_to(K8S_DIR).as_posix() for p in K8S_DIR.glob("**/*.yaml")}
    assert names == {"pvc.yaml", "rbac.yaml", "configmap.yaml", "jobs/pipeline-job.yaml", "jobs/finetune-job.yaml", "jobs/finetune-trainjob.yaml",
                     "examples/secret.example.yaml", "examples/data-pod.yaml"}
    readme = (K8S_DIR / "README.md").read_text()
    for path in K8S_DIR.glob("**/*.yaml"):
        assert path.read_text().startswith("# "), f"{path.name}: starts with a comment saying how to use it"
        assert f"`{path.relative_to(K8S_DIR).as_posix()}`" in readme  # each file is in the README's table


def test_apply_of_the_folder_is_safe_together():
    """`kubectl apply -f k8s/` (not recursive) applies the top-level files only: no Job, Pod or Secret, so it
    starts nothing and holds no credentials; what starts work or must be filled in sits in a subfolder."""
    top = {d["kind"] for _, _, d in manifests("*.yaml")}
    assert top == {"PersistentVolumeClaim", "ServiceAccount", "Role", "RoleBinding", "ConfigMap"}
    assert {d["kind"] for _, _, d in manifests("jobs/*.yaml")} == {"Job"}
    assert {d["kind"] for _, _, d in manifests("examples/*.yaml")} == {"Secret", "Pod"}
    assert "kubectl -n asr-ft apply -f k8s/ " in (K8S_DIR / "README.md").read_text()


def test_data_pod_mounts_the_artifacts_volume_as_the_steps_user():
    pod = by_kind()[("Pod", "asr-ft-data")]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"] == POD_SECURITY and c["securityContext"] == CONTAINER_SECURITY
    claim = {v["name"]: v for v in pod["volumes"]}["artifacts"]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in by_kind()
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/artifacts", "/tmp"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name, index, doc", manifests(), ids=lambda v: v if isinstance(v, str) else None)
def test_k8s_manifests_validate(name, index, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def by_kind() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for _, _, d in manifests()}


def test_rbac_allows_only_what_the_executor_does():
    role = by_kind()[("Role", "asr-ft-orchestrator")]
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    assert rules == {(("batch",), ("jobs",)): {"create", "get", "list", "watch", "delete"},
                     (("",), ("pods",)): {"get", "list", "watch"},
                     (("",), ("pods/log",)): {"get"},
                     (("trainer.kubeflow.org",), ("trainjobs",)): {"create", "get", "list", "watch", "delete"}}
    binding = by_kind()[("RoleBinding", "asr-ft-orchestrator")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "asr-ft"}]
    assert ("ServiceAccount", "asr-ft") in by_kind()


def test_pipeline_job_and_configmap_fit_together():
    objs = by_kind()
    job = objs[("Job", "asr-ft-pipeline")]
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["serviceAccountName"] == "asr-ft"
    assert c["command"] == ["asr-ft", "run", "--config", "/config/pipeline.yaml", "--executor", "k8s"]
    assert pod["securityContext"] == POD_SECURITY and c["securityContext"] == CONTAINER_SECURITY
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/config"]]["configMap"]["name"] == "asr-ft-pipeline"
    claim = volumes[mounts["/artifacts"]]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in objs

    # The ConfigMap's pipeline is a valid pipeline for the k8s executor, on that PVC and mount.
    config = Path("pipeline.yaml")
    config.write_text(objs[("ConfigMap", "asr-ft-pipeline")]["data"]["pipeline.yaml"])
    settings = load_settings(RunSettings, {}, config)
    assert settings.executor == "k8s" and settings.artifacts == "/artifacts"
    assert (settings.k8s.pvc, settings.k8s.mount_path) == (claim, "/artifacts")
    assert steps_of(load_pipeline(config)) == DEMO_STEPS


def test_dry_run_of_the_configmap_pipeline_validates(monkeypatch, capsys):
    monkeypatch.setattr(k8s_mod, "connect", _no_cluster)
    Path("pipeline.yaml").write_text(by_kind()[("ConfigMap", "asr-ft-pipeline")]["data"]["pipeline.yaml"])
    assert main(["--config", "pipeline.yaml", "--dry-run"]) == 0  # executor k8s comes from the file
    jobs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert len(jobs) == len(DEMO_STEPS)
    for job in jobs:
        validate(job)
        assert env_of(job)["ASRFT_ARTIFACTS"] == "/artifacts"


def test_standalone_finetune_job_matches_the_executors(tmp_path):
    """k8s/jobs/finetune-job.yaml keeps the executor's contract: same security, command, volumes, GPU request."""
    manual = by_kind()[("Job", "asr-ft-finetune")]
    pipeline, common, k8s = demo()
    built = build_job("finetune", pipeline, common, k8s, finetune_resources(pipeline, common, k8s, run_store(tmp_path)))
    mc, bc = container(manual), container(built)
    mp, bp = manual["spec"]["template"]["spec"], built["spec"]["template"]["spec"]
    for key in ("securityContext", "restartPolicy", "automountServiceAccountToken", "nodeSelector", "tolerations"):
        assert mp[key] == bp[key], key
    for key in ("securityContext", "command", "workingDir", "terminationMessagePath", "volumeMounts"):
        assert mc[key] == bc[key], key
    assert [v["name"] for v in mp["volumes"]] == [v["name"] for v in bp["volumes"]]
    shm = {v["name"]: v for v in mp["volumes"]}["dshm"]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"]
    assert mc["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert mc["resources"]["limits"]["memory"] == bc["resources"]["limits"]["memory"]  # the plan's for the demo
    assert {"ASRFT_ARTIFACTS", "ASRFT_RUN_ID", "ASRFT_CACHE", "HOME"} <= env_of(manual).keys()
    assert mc["image"] == f"ghcr.io/asr-ft/asr-ft:{code_version()}-cuda"
