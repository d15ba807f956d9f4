"""Multi-node finetune as a Kubeflow Trainer TrainJob: what the k8s executor renders (checked against the real
TrainJob CRD, and the JobSet the torch-distributed runtime expands it to against the JobSet CRD; tests/k8s_crds.py),
and the executor's TrainJob path against FakeKubeAPI (tests/k8s_fake_api.py): success, a failing node, the CRD
missing. The plan is Kimi-Audio-7B's published shape on 1000 clips (the pipeline names its family), which the
planner spreads over 2 nodes x 8 GPUs."""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from k8s_crds import errors, runtime  # noqa: E402
from k8s_fake_api import FakeKubeAPI, Outcome  # noqa: E402

from common.core.stage import MANIFEST  # noqa: E402
from common.executors import k8s as k8s_mod  # noqa: E402
from jobs.run.__main__ import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(60)

PIPELINE = """
run_id: big
artifacts: runs/
pretrained: {model: models/Kimi-Audio-7B, family: kimi-audio}
finetune: {mode: full}
"""
NODES = ["--k8s-nodes", "2", "--k8s-gpus", "8", "--k8s-gpu-node-memory-gb", "250", "--k8s-gpu-node-cpus", "64"]
NODE_ERROR = "finetune: rank 9 of 16: CUDA error: an illegal memory access was encountered"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in list(os.environ):
        if var.startswith(("ASRFT_", "AWS_", "KUBERNETES_")) or var == "KUBECONFIG":
            monkeypatch.delenv(var)
    monkeypatch.setenv("ASRFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    Path("pipeline.yaml").write_text(PIPELINE)


def dry_run(capsys, monkeypatch, *extra: str) -> dict:
    monkeypatch.setattr(k8s_mod, "connect", lambda *a, **k: pytest.fail("--dry-run must not contact a cluster"))
    assert main(["--config", "pipeline.yaml", "--executor", "k8s", "--dry-run", "--stages", "finetune", *extra]) == 0
    return next(d for d in yaml.safe_load_all(capsys.readouterr().out) if d)


def expand(trainjob: dict, runtime_obj: dict) -> dict:
    """The JobSet Kubeflow Trainer makes of a TrainJob on a torch runtime (its Torch and JobSet plugins, in
    short): the runtime's template, the trainer's image/command/env/resources on the "node" container,
    numNodes pods (an indexed Job), the PET_* variables for torchrun, then the runtime patch's pod spec."""
    trainer = trainjob["spec"]["trainer"]
    jobset = {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
              "metadata": {"name": trainjob["metadata"]["name"], "namespace": "asr-ft"},
              "spec": copy.deepcopy(runtime_obj["spec"]["template"]["spec"])}
    patches = {p["name"]: p for p in trainjob["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
               ["replicatedJobs"]}
    for rj in jobset["spec"]["replicatedJobs"]:
        job = rj["template"]["spec"]
        job.update(parallelism=trainer["numNodes"], completions=trainer["numNodes"], completionMode="Indexed")
        pod = job["template"]
        container = next(c for c in pod["spec"]["containers"] if c["name"] == "node")
        name = trainjob["metadata"]["name"]
        pet = {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
               "PET_MASTER_ADDR": f"{name}-node-0-0.{name}", "PET_MASTER_PORT": "29400"}
        container.update(image=trainer["image"], command=trainer["command"], resources=trainer["resourcesPerNode"],
                         env=[*trainer["env"], *({"name": k, "value": v} for k, v in pet.items()),
                              {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
                                  "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}],
                         ports=[{"containerPort": 29400}])
        patch = patches.pop(rj["name"], None)
        if patch is None:
            continue
        ppod = patch["template"]["spec"]["template"]
        pod.setdefault("metadata", {}).setdefault("labels", {}).update(ppod["metadata"]["labels"])
        for key, value in ppod["spec"].items():
            if key != "containers":
                pod["spec"][key] = value
        for cpatch in ppod["spec"]["containers"]:
            target = next(c for c in pod["spec"]["containers"] if c["name"] == cpatch["name"])
            target.update({k: v for k, v in cpatch.items() if k != "name"})
    assert not patches, f"runtime patches for replicated jobs the runtime does not have: {list(patches)}"
    return jobset


def test_a_multi_node_plan_renders_a_valid_trainjob(capsys, monkeypatch):
    tj = dry_run(capsys, monkeypatch, *NODES)
    assert tj["kind"] == "TrainJob" and tj["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert errors(tj) == []
    spec, trainer = tj["spec"], tj["spec"]["trainer"]
    assert spec["runtimeRef"] == {"name": "torch-distributed"}
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 8)
    assert trainer["command"] == ["torchrun", "--module", "jobs.finetune"]
    assert trainer["image"].endswith("-cuda")
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["ASRFT_ARTIFACTS"] == "/artifacts" and env["ASRFT_FINETUNE_MODE"] == "full"
    assert not any(k.startswith("PET_") for k in env)  # the runtime's (reserved: the webhook refuses them)
    annotation = tj["metadata"]["annotations"]["asr-ft/resources"]
    assert "2 nodes x 8 process(es)" in annotation and "zero3" in annotation  # the plan's ZeRO stage
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"][
        "spec"]["template"]
    assert pod["metadata"]["labels"]["asr-ft/stage"] == "finetune"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    node = pod["spec"]["containers"][0]
    assert node["name"] == "node" and node["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in node["volumeMounts"]}
    assert {"/tmp", "/artifacts", "/dev/shm"} <= mounts
    # what the runtime makes of it is a valid JobSet with the container contract on the node pods
    jobset = expand(tj, runtime("torch-distributed"))
    assert errors(jobset) == []
    node_pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert node_pod["containers"][0]["securityContext"] == node["securityContext"]


def test_the_deepspeed_runtime_name_is_used_when_the_plan_uses_deepspeed(capsys, monkeypatch):
    tj = dry_run(capsys, monkeypatch, *NODES, "--k8s-deepspeed-runtime", "torch-deepspeed")
    assert tj["spec"]["runtimeRef"] == {"name": "torch-deepspeed"} and errors(tj) == []


def test_s3_credentials_reach_the_nodes_from_the_secret_by_key(capsys, monkeypatch):
    Path("pipeline.yaml").write_text(PIPELINE.replace("artifacts: runs/", "artifacts: s3://bucket/runs"))
    tj = dry_run(capsys, monkeypatch, *NODES, "--k8s-s3-secret", "asr-ft-s3")
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in tj["spec"]["trainer"]["env"] if "valueFrom" in e}
    assert refs["AWS_ACCESS_KEY_ID"]["name"] == "asr-ft-s3" and refs["AWS_SECRET_ACCESS_KEY"]["key"] == \
        "AWS_SECRET_ACCESS_KEY"
    assert errors(tj) == []


def test_a_one_node_plan_stays_a_plain_job(capsys, monkeypatch):
    job = dry_run(capsys, monkeypatch, "--k8s-nodes", "2", "--k8s-gpus", "1")  # 1 GPU per node: LoRA on one
    assert job["kind"] == "Job"


# --- against the fake API ----------------------------------------------------------------------------------


def run(api: FakeKubeAPI, tmp_path: Path) -> int:
    pvc = tmp_path / "pvc"
    pvc.mkdir(exist_ok=True)
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    return main(["--config", "pipeline.yaml", "--executor", "k8s", "--stages", "finetune",
                 "--k8s-kubeconfig", str(kubeconfig), "--k8s-mount-path", str(pvc), "--k8s-watch-timeout-seconds", "5",
                 *NODES])


def test_trainjob_runs_to_success_with_node_zeros_log(tmp_path, capsys):
    with FakeKubeAPI() as api:
        assert run(api, tmp_path) == 0
    err = capsys.readouterr().err
    [tj] = api.created
    assert tj["kind"] == "TrainJob" and errors(tj) == []
    assert "[finetune] finetune: 完成 done" in err  # node 0's log, streamed
    assert (tmp_path / "pvc" / "big" / "finetune" / MANIFEST).is_file()
    assert re.search(r"✓ finetune\s+done", err)
    assert "2 nodes x 8 processes" in err


def test_a_failing_node_fails_the_step_with_its_own_message(tmp_path, capsys):
    with FakeKubeAPI() as api:
        api.node_outcomes[1] = Outcome(1, NODE_ERROR)
        assert run(api, tmp_path) != 0
    err = capsys.readouterr().err
    message = err.split("Termination message")[1]
    assert "node 1" in message and NODE_ERROR in message  # the node that failed first, not rank 0's echo
    assert not (tmp_path / "pvc" / "big" / "finetune" / MANIFEST).exists()


def test_missing_trainjob_crd_says_how_to_install_kubeflow_trainer(tmp_path, capsys):
    with FakeKubeAPI() as api:
        api.trainer_installed = False
        assert run(api, tmp_path) != 0
    err = capsys.readouterr().err
    assert "no TrainJob CRD" in err and "Install Kubeflow Trainer" in err and "--k8s-nodes 1" in err
    assert api.created == []  # checked before any step ran


def test_standalone_trainjob_example_matches_the_executors(capsys, monkeypatch):
    """k8s/jobs/finetune-trainjob.yaml is a valid TrainJob (and JobSet once expanded) with the executor's contract."""
    manual = yaml.safe_load((ROOT / "k8s" / "jobs" / "finetune-trainjob.yaml").read_text())
    assert errors(manual) == [] and errors(expand(manual, runtime("torch-distributed"))) == []
    Path("pipeline.yaml").write_text(PIPELINE.replace("run_id: big", "run_id: demo"))
    built = dry_run(capsys, monkeypatch, *NODES)
    for key in ("runtimeRef",):
        assert manual["spec"][key] == built["spec"][key]
    mt, bt = manual["spec"]["trainer"], built["spec"]["trainer"]
    for key in ("command", "numNodes", "numProcPerNode", "resourcesPerNode"):
        assert mt[key] == bt[key], key  # the plan's numbers for Kimi-Audio-7B, full, on 2 x 8 x 80 GB
    assert {e["name"] for e in mt["env"]} >= {"ASRFT_ARTIFACTS", "ASRFT_RUN_ID", "ASRFT_CACHE", "HOME"}

    def pod(tj):
        return tj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
            "template"]["spec"]["template"]["spec"]

    mp, bp = pod(manual), pod(built)
    for key in ("securityContext", "nodeSelector", "tolerations", "volumes"):
        assert mp[key] == bp[key], key
    assert mp["containers"] == bp["containers"]
