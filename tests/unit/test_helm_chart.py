"""The Helm chart helm/asr-ft, rendered by Helm's own engine (PyPI helm-python-sdk: Helm v4's Go SDK through
ctypes, no helm binary): lint, values schema, every rendered object valid for two Kubernetes minor versions
(kubernetes-validate, strict), and what the objects must say — security context, ServiceAccount, minimal RBAC,
a pipeline the orchestrator can load, S3 keys only through Secrets — consistent with the plain manifests in k8s/.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from common.core.registry import STAGES, pipeline_steps, stage
from common.core.settings import COMMON_FIELDS, StageSettings, load_settings
from common.executors.pipeline import demo_config_path, load_pipeline, steps_of

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "asr-ft"
CI_FILES = sorted((CHART / "ci").glob("*.yaml"))
SCENARIOS = ["defaults", *(p.name for p in CI_FILES)]
KUBE_VERSIONS = ("1.30.0", "1.35.0")  # the oldest and newest minor versions checked (chart: kubeVersion >=1.27)
RELEASE, NAMESPACE = "asr-ft", "asr-ft"  # with this release name, object names equal k8s/README.md's
UID = 10001
# The orchestrator's Role: what issue 4 lists, plus pods watch (common/executors/k8s.py watches a step's pod until it runs).
RBAC_RULES = {
    ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get"},
    ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "list", "watch", "delete"},  # multi-node finetune
}
S3_CREDENTIALS = {"accessKeyId": "AKIATESTONLY0000", "secretAccessKey": "test-secret-do-not-use-0000"}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in [v for v in os.environ if v.startswith("ASRFT_")]:
        monkeypatch.delenv(var)


def scenario_values(name: str) -> dict[str, Any]:
    return {} if name == "defaults" else yaml.safe_load((CHART / "ci" / name).read_text(encoding="utf-8"))


def render(chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders (NOTES.txt left out), as dicts."""
    out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for obj in objects:
        assert obj["kind"] not in kinds, f"two {obj['kind']} objects; the tests expect one of each"
        kinds[obj["kind"]] = obj
    return kinds


def pipeline_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(by_kind(objects)["ConfigMap"]["data"]["pipeline.yaml"])


def orchestrator(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(objects)["Job"]["spec"]["template"]["spec"]


# ------------------------------------------------------------------------------------------------ Helm checks


def test_ci_scenarios_are_the_three_of_issue_4():
    assert [p.name for p in CI_FILES] == ["cpu-only-values.yaml", "gpu-values.yaml", "s3-values.yaml"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_is_clean(scenario):
    report = helm.lint(CHART, scenario_values(scenario), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert report["errors"] == [] and problems == [], report


def test_schema_has_one_pipeline_section_per_stage_of_the_registry():
    """values.schema.json (JSON: it cannot import the registry) accepts exactly the sections a pipeline file has."""
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    sections = schema["properties"]["pipeline"]["properties"]
    names = [s.name for s in STAGES]
    assert set(sections) == {*COMMON_FIELDS, *names, *(n.replace("-", "_") for n in names)}
    assert schema["properties"]["pipeline"]["additionalProperties"] is False


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_values_pass_the_schema(chart, scenario):
    chart.validate_schema(chart.merge_values(scenario_values(scenario)))


@pytest.mark.parametrize("values, where", [
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"replicaCount": 2}, "replicaCount"),
    ({"persistence": {"size": "lots"}}, "/persistence/size"),
    ({"persistence": {"accessModes": ["ReadWriteSometimes"]}}, "/persistence/accessModes/0"),
    ({"pipeline": {"run_id": "my run"}}, "/pipeline/run_id"),
    ({"pipeline": {"train": {}}}, "train"),
    ({"pipeline": {"s3": {"secret_access_key": "x"}}}, "secret_access_key"),
    ({"k8s": {"gpu": 1}}, "gpu"),
    ({"k8s": {"gpus": -1}}, "/k8s/gpus"),
    ({"k8s": {"memory": {"finetune": "8 GB"}}}, "/k8s/memory/finetune"),
    ({"s3": {"secretKey": "x"}}, "secretKey"),
    ({"orchestrator": {"replicas": 1}}, "replicas"),
])
def test_schema_rejects_bad_values(chart, values, where):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(chart.merge_values(values))
    assert where in str(err.value)
    with pytest.raises(helm.HelmValuesError):  # install/template check the schema too
        render(chart, values)


@pytest.mark.parametrize("values, message", [
    ({"s3": {"enabled": True, "existingSecret": "s"}}, "set pipeline.artifacts to s3://"),
    ({"pipeline": {"artifacts": "s3://b/runs"}}, "set s3.enabled=true"),
    ({"persistence": {"enabled": False}}, "the artifacts need a PVC or S3"),
    ({"s3": {"enabled": True}, "pipeline": {"artifacts": "s3://b/runs"}}, "s3.enabled needs credentials"),
])
def test_impossible_combinations_fail_with_the_fix(chart, values, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, values)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_object_validates_strictly(chart, scenario, kube_version):
    objects = render(chart, scenario_values(scenario))
    assert {o["kind"] for o in objects} >= {"PersistentVolumeClaim", "ServiceAccount", "Role", "RoleBinding",
                                             "ConfigMap", "Job"}
    for obj in objects:
        kubernetes_validate.validate(obj, kube_version, strict=True)  # raises on any unknown or wrong field


# ------------------------------------------------------------------------------------------------ what they say


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_orchestrator_job_runs_the_pipeline_non_root_read_only(chart, scenario):
    objects = render(chart, scenario_values(scenario))
    kinds = by_kind(objects)
    pod = orchestrator(objects)
    (container,) = pod["containers"]
    assert container["command"] == ["asr-ft", "run", "--config", "/config/pipeline.yaml", "--executor", "k8s"]
    assert pod["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"] == "asr-ft"
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    assert container["securityContext"] == {"runAsNonRoot": True, "readOnlyRootFilesystem": True,
                                             "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/config"]["name"]]["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # the only writable path of a read-only root
    assert mounts["/artifacts"]["readOnly"] is True  # it reads manifests; the steps write
    claim = volumes[mounts["/artifacts"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == kinds["PersistentVolumeClaim"]["metadata"]["name"] == "asr-ft-artifacts"
    assert container["image"] == "ghcr.io/asr-ft/asr-ft:0.1.0"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ASRFT_CACHE"] == "/tmp/asr-ft-cache" and env["HOME"] == "/tmp"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rbac_is_minimal_and_bound_to_the_service_account(chart, scenario):
    kinds = by_kind(render(chart, scenario_values(scenario)))
    rules = {(group, resource): set(rule["verbs"])
             for rule in kinds["Role"]["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}
    assert rules == RBAC_RULES
    binding = kinds["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": kinds["Role"]["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "asr-ft", "namespace": NAMESPACE}]


def _stage_settings_classes() -> dict[str, type[StageSettings]]:
    """The settings class of every step whose entry point exists (jobs/<step>/__main__.py)."""
    classes = {}
    for step in pipeline_steps():
        if importlib.util.find_spec(stage(step).module) is None:
            continue
        for value in vars(importlib.import_module(stage(step).module + ".__main__")).values():
            if isinstance(value, type) and issubclass(value, StageSettings) and value is not StageSettings \
                    and value.model_config.get("env_prefix") == f"ASRFT_{step.upper().replace('-', '_')}_":
                classes[step] = value
    return classes


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_configmap_holds_a_pipeline_the_orchestrator_and_steps_accept(chart, scenario, tmp_path):
    from jobs.run.__main__ import RunSettings

    values = chart.merge_values(scenario_values(scenario))
    objects = render(chart, scenario_values(scenario))
    path = tmp_path / "pipeline.yaml"
    path.write_text(by_kind(objects)["ConfigMap"]["data"]["pipeline.yaml"], encoding="utf-8")
    pipeline = load_pipeline(path)
    run = load_settings(RunSettings, {}, path)  # validates run: and run.k8s (K8sSettings)
    assert run.executor == "k8s"
    assert run.run_id == values["pipeline"]["run_id"]
    assert run.k8s.pvc == "asr-ft-artifacts" and run.k8s.mount_path == "/artifacts"
    assert run.k8s.image == "ghcr.io/asr-ft/asr-ft:0.1.0" and run.k8s.gpu_image == "ghcr.io/asr-ft/asr-ft:0.1.0-cuda"
    for key, value in values["k8s"].items():  # the values' k8s settings reach the executor
        assert getattr(run.k8s, key) == value, key
    for step, cls in _stage_settings_classes().items():
        if step in pipeline:
            load_settings(cls, {}, path)  # every step's section is valid for that step


def test_default_pipeline_is_the_built_in_demo_on_the_volume(chart):
    """values.yaml's pipeline = jobs/run/demo.yaml with its relative paths under /artifacts, and the real dev set
    the demo finds through $ASRFT_REAL_ZH_DEV at /artifacts/real-zh-dev."""
    demo = load_pipeline(demo_config_path())
    chart_pipeline = pipeline_of(render(chart))

    def on_volume(value):
        if isinstance(value, list):
            return [on_volume(v) for v in value]
        if isinstance(value, dict):
            return {k: on_volume(v) for k, v in value.items()}
        if value in ("${ASRFT_REAL_ZH_DEV}", "${ASRFT_REAL_ZH_DEV2}"):
            return "/artifacts/" + value[len("${ASRFT_"):-1].lower().replace("_", "-")
        return f"/artifacts/{value}" if isinstance(value, str) and value.startswith("demo_data") else value

    for step in pipeline_steps():
        assert chart_pipeline[step] == {k: on_volume(v) for k, v in (demo[step] or {}).items()}, step
    assert chart_pipeline["run_id"] == demo["run_id"]


@pytest.mark.parametrize("scenario, gpus", [("defaults", 1), ("gpu-values.yaml", 1), ("cpu-only-values.yaml", 0)])
def test_step_jobs_made_from_the_configmap(chart, scenario, gpus, tmp_path):
    """Values → ConfigMap → the k8s executor's step Jobs (as `asr-ft run --executor k8s --dry-run` makes them)."""
    from common.executors.k8s import build_jobs
    from jobs.run.__main__ import RunSettings

    path = tmp_path / "pipeline.yaml"
    path.write_text(by_kind(render(chart, scenario_values(scenario)))["ConfigMap"]["data"]["pipeline.yaml"])
    run = load_settings(RunSettings, {}, path)
    pipeline = load_pipeline(path)
    common = {k: getattr(run, k) for k in COMMON_FIELDS if k != "s3"} | {"force": None, "s3": dict(run.s3)}
    jobs = {j["metadata"]["labels"]["asr-ft/stage"]: j for j in
            build_jobs(steps_of(pipeline), pipeline, common, run.k8s, None, NAMESPACE)}
    assert list(jobs) == steps_of(pipeline)
    for job in jobs.values():
        pod = job["spec"]["template"]["spec"]
        assert {"claimName": "asr-ft-artifacts"} in [v.get("persistentVolumeClaim") for v in pod["volumes"]]
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(job, version, strict=True)
    finetune = jobs["finetune"]["spec"]["template"]["spec"]
    (container,) = finetune["containers"]
    if gpus:
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
        assert finetune["nodeSelector"]["nvidia.com/gpu.present"] == "true"
        assert container["image"] == "ghcr.io/asr-ft/asr-ft:0.1.0-cuda"
    else:
        assert "nvidia.com/gpu" not in container["resources"]["limits"] and "nodeSelector" not in finetune
        assert container["image"] == "ghcr.io/asr-ft/asr-ft:0.1.0"


def test_s3_scenario_takes_keys_only_from_a_secret(chart):
    values = scenario_values("s3-values.yaml")
    objects = render(chart, values)
    kinds = by_kind(objects)
    assert "Secret" not in kinds  # existingSecret: the chart creates none
    (container,) = orchestrator(objects)["containers"]
    env = {e["name"]: e for e in container["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "asr-ft-s3", "key": key}}
    assert not [e for e in container["env"] if "value" in e and any(w in e["name"] for w in ("KEY", "SECRET", "TOKEN"))]
    pipeline = pipeline_of(objects)
    assert pipeline["artifacts"] == "s3://asr-ft/runs"
    assert pipeline["run"]["k8s"]["s3_secret"] == "asr-ft-s3"  # the step Jobs get it through envFrom
    assert pipeline["s3"] == {"endpoint_url": "http://minio.minio.svc:9000", "region": "us-east-1",
                              "addressing_style": "path"}


def test_s3_keys_in_values_become_a_secret_and_nothing_else(chart):
    values = scenario_values("s3-values.yaml")
    values["s3"] = {**values["s3"], "existingSecret": "", **S3_CREDENTIALS}
    objects = render(chart, values)
    secret = by_kind(objects)["Secret"]
    assert secret["metadata"]["name"] == "asr-ft-s3"
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "AWS_ACCESS_KEY_ID": S3_CREDENTIALS["accessKeyId"], "AWS_SECRET_ACCESS_KEY": S3_CREDENTIALS["secretAccessKey"]}
    for obj in objects:
        if obj["kind"] != "Secret":
            text = yaml.safe_dump(obj)
            assert S3_CREDENTIALS["accessKeyId"] not in text and S3_CREDENTIALS["secretAccessKey"] not in text


# ------------------------------------------------------------------------------------------------ same as k8s/


def _k8s_manifests() -> dict[str, dict[str, Any]]:
    objects = {}
    for path in sorted((REPO / "k8s").glob("**/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                objects[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objects


def test_names_rules_and_security_match_the_plain_manifests(chart):
    plain = _k8s_manifests()
    objects = render(chart)
    for obj in objects:
        if obj["kind"] != "Secret":
            assert f"{obj['kind']}/{obj['metadata']['name']}" in plain, f"no {obj['kind']} of that name in k8s/"
    kinds = by_kind(objects)
    assert kinds["Role"]["rules"] == plain["Role/asr-ft-orchestrator"]["rules"]
    plain_pod = plain["Job/asr-ft-pipeline"]["spec"]["template"]["spec"]
    (plain_container,) = plain_pod["containers"]
    (container,) = orchestrator(objects)["containers"]
    assert orchestrator(objects)["securityContext"] == plain_pod["securityContext"]
    assert container["securityContext"] == plain_container["securityContext"]
    assert container["command"] == plain_container["command"]
    assert by_kind(objects)["Job"]["spec"]["podFailurePolicy"] == plain["Job/asr-ft-pipeline"]["spec"]["podFailurePolicy"]


# ------------------------------------------------------------------------------------------------ serve mode

SERVE = {"serve": {"enabled": True, "model": "/artifacts/demo/export"}}


def serve_objects(chart, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(Deployment, its pod spec, Service) of a render with the serve mode on."""
    kinds = by_kind(render(chart, values))
    deployment = kinds["Deployment"]
    return deployment, deployment["spec"]["template"]["spec"], kinds["Service"]


def test_serve_is_off_by_default(chart):
    assert {"Deployment", "Service"}.isdisjoint(o["kind"] for o in render(chart))


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("extra", [{}, {"serve": {"gpus": 1}}, yaml.safe_load((CHART / "ci" / "s3-values.yaml").read_text())])
def test_serve_mode_validates_strictly_and_lints(chart, kube_version, extra):
    values = {**extra, "serve": {**SERVE["serve"], **extra.get("serve", {})}}
    for obj in render(chart, values):
        kubernetes_validate.validate(obj, kube_version, strict=True)
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_serve_deployment_runs_asr_ft_serve_with_the_jobs_security(chart):
    from common.executors.k8s import CONTAINER_SECURITY_CONTEXT, POD_SECURITY_CONTEXT
    from jobs.serve import ServeSettings

    deployment, pod, service = serve_objects(chart, SERVE)
    (container,) = pod["containers"]
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == "asr-ft-serve"
    assert container["command"] == ["asr-ft", "serve"]
    assert pod["securityContext"] == POD_SECURITY_CONTEXT == orchestrator(render(chart))["securityContext"]
    assert container["securityContext"] == CONTAINER_SECURITY_CONTEXT
    assert pod["automountServiceAccountToken"] is False  # the server needs no Kubernetes API
    # the environment is settings `asr-ft serve` accepts, and says what the values say
    env = {e["name"]: e["value"] for e in container["env"]}
    serve_env = {k: v for k, v in env.items() if k.startswith("ASRFT_SERVE_")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in serve_env.items():
            mp.setenv(k, v)
        settings = load_settings(ServeSettings)
    assert (settings.model, settings.host, settings.port, settings.max_upload_mb, settings.max_audio_seconds,
            settings.graceful_seconds) == ("/artifacts/demo/export", "0.0.0.0", 8000, 25, 1800, 120)
    assert pod["terminationGracePeriodSeconds"] == 130  # in-flight requests get their time before SIGKILL
    # probes and the Service reach the container's port; the Service selects exactly these pods
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("http", 8000)
    assert all(container[p]["httpGet"] == {"path": "/health", "port": "http"}
               for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"].items() <= labels.items() and labels["app.kubernetes.io/component"] == "serve"
    # the model is read from the artifacts volume, read-only; /tmp is the only writable path
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["/artifacts"]["readOnly"] is True
    assert volumes[mounts["/artifacts"]["name"]]["persistentVolumeClaim"] == {"claimName": "asr-ft-artifacts",
                                                                              "readOnly": True}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert container["image"] == "ghcr.io/asr-ft/asr-ft:0.1.0" and "nvidia.com/gpu" not in container["resources"]["limits"]


def test_serve_on_a_gpu_and_with_s3(chart):
    s3 = yaml.safe_load((CHART / "ci" / "s3-values.yaml").read_text())
    _, pod, _ = serve_objects(chart, {**s3, "serve": {**SERVE["serve"], "model": "s3://models/mine", "gpus": 1}})
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/asr-ft/asr-ft:0.1.0-cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["envFrom"] == [{"secretRef": {"name": s3["s3"].get("existingSecret") or "asr-ft-s3"}}]
    assert not any("SECRET" in e["name"] or "KEY" in e["name"] for e in container["env"])  # keys only via the Secret


@pytest.mark.parametrize("values, problem", [
    ({"serve": {"enabled": True}}, "serve.enabled needs serve.model"),
])
def test_serve_needs_a_model(chart, values, problem):
    with pytest.raises(helm.HelmRenderError, match=problem):
        render(chart, values)


@pytest.mark.parametrize("values, where", [
    ({"serve": {"port": 80}}, "/serve/port"),  # non-root cannot bind a privileged port
    ({"serve": {"service": {"type": "Ingress"}}}, "/serve/service/type"),
    ({"serve": {"gracefulSeconds": 0}}, "/serve/gracefulSeconds"),
    ({"serve": {"replicaCount": 2}}, "replicaCount"),
])
def test_serve_values_are_checked(chart, values, where):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(chart.merge_values(values))
    assert where in str(err.value)
def test_multi_node_values_make_a_valid_trainjob(chart, tmp_path):
    """values k8s.nodes / gpus / trainer_runtime → ConfigMap → the executor's finetune step: a TrainJob that the
    real TrainJob CRD accepts (Kimi-Audio-7B full fine-tune on 2 nodes x 8 GPUs)."""
    import sys

    from common.executors.k8s import build_jobs
    from jobs.run.__main__ import RunSettings

    sys.path.insert(0, str(REPO / "tests"))
    from k8s_crds import errors

    values = {"k8s": {"nodes": 2, "gpus": 8, "gpu_node_memory_gb": 250, "gpu_node_cpus": 64,
                      "trainer_runtime": "torch-distributed"},
              "pipeline": {"pretrained": {"model": "/artifacts/models/Kimi-Audio-7B", "family": "kimi-audio"},
                           "finetune": {"mode": "full", "epochs": 3, "lr": None, "batch": None, "context_seconds": None,
                                        "merge_alpha_encoder": None, "merge_alpha_decoder": None}}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(by_kind(render(chart, values))["ConfigMap"]["data"]["pipeline.yaml"])
    run = load_settings(RunSettings, {}, path)
    pipeline = load_pipeline(path)
    common = {k: getattr(run, k) for k in COMMON_FIELDS if k != "s3"} | {"force": None, "s3": dict(run.s3)}
    (tj,) = build_jobs(["finetune"], pipeline, common, run.k8s, None, NAMESPACE)
    assert tj["kind"] == "TrainJob" and errors(tj) == []
    trainer = tj["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 8)
    assert tj["spec"]["runtimeRef"] == {"name": "torch-distributed"}
    assert trainer["image"] == "ghcr.io/asr-ft/asr-ft:0.1.0-cuda"
