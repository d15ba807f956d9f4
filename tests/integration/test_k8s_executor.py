"""The k8s executor (`asr-ft run --executor k8s`) against FakeKubeAPI, a test double of the Job, pod and pod-log
endpoints (tests/k8s_fake_api.py): success, a failing step, resume that skips done steps, watch reconnects.

The orchestrator is driven through `jobs.run.__main__.main` with a kubeconfig that points at the double; the
"PVC" is a local folder given as --k8s-mount-path, which the simulated pods write their manifests into.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from common.core.registry import pipeline_steps
from common.core.stage import MANIFEST

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from k8s_fake_api import FakeKubeAPI, Outcome  # noqa: E402

from jobs.run.__main__ import main  # noqa: E402

pytestmark = pytest.mark.timeout(60)

STEPS = list(pipeline_steps())  # PIPELINE has every step, demo-data included
PIPELINE = """
run_id: k8s-test
artifacts: runs/
demo-data: {out: data, n_train: 8, n_test: 2}
prepare: {train_csv: data/train.csv, audio_dir: data/audio, test_ratio: 0.1}
pretrained: {model: "bundled:whisper-base"}
extract: {}
finetune: {}
export: {quantization: int8}
evaluate: {}
"""
FAIL_MESSAGE = "finetune: CUDA out of memory at batch 32; set finetune.batch_size lower"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in list(os.environ):
        if var.startswith(("ASRFT_", "AWS_", "KUBERNETES_")) or var == "KUBECONFIG":
            monkeypatch.delenv(var)
    monkeypatch.setenv("ASRFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def api():
    with FakeKubeAPI() as fake:
        yield fake


def run(api: FakeKubeAPI, tmp_path: Path, *extra: str) -> int:
    config = tmp_path / "pipeline.yaml"
    config.write_text(PIPELINE)
    pvc = tmp_path / "pvc"
    pvc.mkdir(exist_ok=True)
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    return main(["--config", str(config), "--executor", "k8s", "--k8s-kubeconfig", str(kubeconfig),
                 "--k8s-mount-path", str(pvc), "--k8s-watch-timeout-seconds", "5", *extra])


def created_steps(api: FakeKubeAPI) -> list[str]:
    return [j["metadata"]["labels"]["asr-ft/stage"] for j in api.created]


def test_all_steps_succeed(api, tmp_path, capsys):
    assert run(api, tmp_path) == 0
    err = capsys.readouterr().err
    assert created_steps(api) == STEPS
    assert [j["metadata"]["name"] for j in api.created] == [f"asrft-k8s-test-{s}" for s in STEPS]
    assert all(j["metadata"]["namespace"] == "asr-ft-test" for j in api.created)  # the kubeconfig context's
    for step in STEPS[1:]:  # demo-data writes no manifest
        assert (tmp_path / "pvc" / "k8s-test" / step / MANIFEST).is_file()
    for step in STEPS:
        # Each log line arrived in two chunks split mid-character and came out whole, with its prefix.
        assert f"[{step}] {step}: 完成 done" in err
    assert all(phases == ["Pending", "Running", "Succeeded"] for phases in api.pod_phases.values())
    assert "not scheduled yet: 0/1 nodes are available" in err  # Pending reason reported
    assert re.search(r"✓ evaluate\s+done", err)
    assert api.deleted == []


def test_failing_step_stops_pipeline_with_its_termination_message(api, tmp_path, capsys):
    api.outcomes["finetune"] = Outcome(3, FAIL_MESSAGE, ["loading model", "step 1/10 loss 2.31", "OOM here"])
    assert run(api, tmp_path) == 3  # the container's exit code
    err = capsys.readouterr().err
    assert created_steps(api) == STEPS[:STEPS.index("finetune") + 1]  # fail fast
    assert "✗ finetune failed" in err
    assert FAIL_MESSAGE in err
    tail = err.split("Last log lines")[1]
    assert "step 1/10 loss 2.31" in tail and "OOM here" in tail
    assert re.search(r"· export\s+not run", err) and re.search(r"· evaluate\s+not run", err)
    assert not (tmp_path / "pvc" / "k8s-test" / "finetune" / MANIFEST).exists()


def test_resume_skips_done_steps_and_replaces_the_failed_job(api, tmp_path, capsys):
    api.outcomes["finetune"] = Outcome(1, FAIL_MESSAGE)
    assert run(api, tmp_path) == 1
    api.outcomes.clear()
    first = len(api.created)
    assert run(api, tmp_path) == 0
    err = capsys.readouterr().err
    assert created_steps(api)[first:] == ["finetune", "export", "evaluate"]  # no Job for done steps
    assert api.deleted == ["asrft-k8s-test-finetune"]  # the failed Job of the same name, before re-creating
    assert re.search(r"↷ extract\s+skipped", err) and re.search(r"↷ demo-data\s+skipped", err)
    assert "[finetune] finetune: 完成 done" in err

    # All done now: a third run creates no Job at all; changing a step's settings re-runs it and what follows.
    third = len(api.created)
    assert run(api, tmp_path) == 0
    assert len(api.created) == third
    (tmp_path / "pipeline.yaml").write_text(PIPELINE.replace("quantization: int8", "quantization: float16"))
    assert main(["--config", str(tmp_path / "pipeline.yaml"), "--executor", "k8s",
                 "--k8s-kubeconfig", str(tmp_path / "kubeconfig"), "--k8s-mount-path", str(tmp_path / "pvc")]) == 0
    assert created_steps(api)[third:] == ["export", "evaluate"]


def test_force_runs_every_step_again(api, tmp_path):
    assert run(api, tmp_path) == 0
    assert run(api, tmp_path, "--force") == 0
    assert created_steps(api) == STEPS * 2
    assert all(e == {"name": "ASRFT_FORCE", "value": "true"} for j in api.created[len(STEPS):]
               for e in j["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "ASRFT_FORCE")


def test_failed_pod_is_retried_within_backoff_limit(api, tmp_path, capsys):
    api.outcomes["extract"] = [Outcome(1, "extract: disk hiccup", ["attempt 1"]), Outcome(0, "", ["attempt 2"])]
    assert run(api, tmp_path, "--stages", "prepare", "--stages", "extract", "--k8s-backoff-limit", "1") == 0
    err = capsys.readouterr().err
    assert "the Job retries (1 of backoffLimit 1)" in err and "extract: disk hiccup" in err
    assert "[extract] attempt 1" in err and "[extract] attempt 2" in err  # both pods' logs followed
    assert created_steps(api) == ["prepare", "extract"]  # one Job, two pods
    assert sorted(p[-1] for n, p in api.pod_phases.items() if "extract" in n) == ["Failed", "Succeeded"]


def test_pod_that_cannot_start_fails_the_step_and_frees_its_node(api, tmp_path, capsys):
    api.outcomes["prepare"] = Outcome(stuck="ImagePullBackOff")
    assert run(api, tmp_path, "--k8s-image", "registry.invalid/asr-ft:nope") == 1
    err = capsys.readouterr().err
    assert "cannot start: ImagePullBackOff" in err and "registry.invalid/asr-ft:nope" in err
    assert api.deleted == ["asrft-k8s-test-prepare"]  # a stuck pod would hold its node's resources forever
    assert created_steps(api) == ["demo-data", "prepare"]


@pytest.mark.parametrize("trouble", ["drop", "expire"])
def test_watch_reconnects(api, tmp_path, capsys, trouble):
    if trouble == "drop":
        api.drop_job_watches = 1  # the connection breaks right before the Job's Complete event
    else:
        api.expire_next_job_watch = True  # 410 Gone: resourceVersion too old, list again
    assert run(api, tmp_path, "--stages", "prepare", "--stages", "extract") == 0
    assert created_steps(api) == ["prepare", "extract"]
    assert (api.dropped, api.expired) == ((1, 0) if trouble == "drop" else (0, 1))
    assert all(j["status"].get("succeeded") == 1 for j in api.jobs())
    assert "extract: 完成 done" in capsys.readouterr().err


def test_watch_gives_up_after_bounded_retries(api, tmp_path, capsys):
    """Every Job watch breaking: the executor stops after k8s.watch_retries reconnects instead of hanging."""
    api.drop_job_watches = 100
    assert run(api, tmp_path, "--stages", "prepare", "--k8s-watch-retries", "1") == 1
    err = capsys.readouterr().err
    assert "lost the connection to the API server while watching Job asrft-k8s-test-prepare 2 times" in err
    assert api.dropped == 2


def test_unreachable_cluster_says_how_to_fix(tmp_path, capsys):
    (tmp_path / "pipeline.yaml").write_text(PIPELINE)
    code = main(["--config", str(tmp_path / "pipeline.yaml"), "--executor", "k8s",
                 "--k8s-kubeconfig", str(tmp_path / "missing-kubeconfig")])
    assert code == 1
    assert "cannot load a Kubernetes configuration" in capsys.readouterr().err


def test_jobs_sent_match_build_job(api, tmp_path):
    """What reaches the API is exactly what --dry-run prints (same builder), with the namespace filled in."""
    assert run(api, tmp_path, "--stages", "prepare") == 0
    sent = api.created[0]
    assert sent["spec"]["template"]["spec"]["containers"][0]["command"] == ["asr-ft", "prepare"]
    env = {e["name"]: e["value"] for e in sent["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["ASRFT_ARTIFACTS"] == str(tmp_path / "pvc")
    assert env["ASRFT_PREPARE_TEST_RATIO"] == "0.1"
