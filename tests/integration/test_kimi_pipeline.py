"""Kimi-Audio end to end on the CPU: `asr-ft run --config jobs/run/kimi-tiny.yaml` (the random stand-in
`bundled:kimi-audio-tiny`) runs every stage, the loss falls, export reloads offline, and a second run skips
every stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_finetune import first_checkpoint

REPO = Path(__file__).resolve().parents[2]
STAGES = ("prepare", "pretrained", "extract", "finetune", "export", "evaluate")


@pytest.fixture(scope="module")
def kimi_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("kimi")
    config = yaml.safe_load((REPO / "jobs/run/kimi-tiny.yaml").read_text(encoding="utf-8"))
    config["artifacts"] = str(root / "runs")
    cfg = root / "kimi-tiny.yaml"
    cfg.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASRFT_")}
    env |= {"ASRFT_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    def run():
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "jobs.run", "--config", str(cfg)], env=env, cwd=root,
                              capture_output=True, text=True, timeout=900)
        return done, time.perf_counter() - t0

    first, seconds = run()
    second, _ = run() if first.returncode == 0 else (first, 0.0)
    return root / "runs" / "kimi-tiny", first, second, seconds


def test_every_stage_runs_on_the_cpu(kimi_run):
    run, first, _, seconds = kimi_run
    assert first.returncode == 0, first.stderr[-5000:]
    for stage in STAGES:
        assert (run / stage / "_manifest.json").is_file(), stage
    provenance = json.loads((run / "pretrained/provenance.json").read_text())
    assert provenance["family"] == "kimi-audio" and provenance["model"]["random_standin"] is True
    assert "meaningless" in first.stderr  # every log says the stand-in is random
    records = [json.loads(line) for line in (run / "extract/train.jsonl").read_text().splitlines()]
    assert all(r["speech_codes"] for r in records)  # GLM-4-Voice codes cached once per clip
    metrics = json.loads((run / "evaluate/metrics.json").read_text())
    assert set(metrics) == {"pretrained", "finetuned"}
    print(f"kimi-tiny pipeline: {seconds:.0f} s")


def test_the_loss_falls_when_overfitting_a_few_clips(kimi_run):
    run, first, _, _ = kimi_run
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((run / "finetune/trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    plan = {d["name"]: d["value"] for d in json.loads((run / "finetune/plan.json").read_text())["decisions"]}
    assert plan["mode"] == "lora" and plan["instruction"] == "请把这段语音转录成文本。"


def test_a_second_run_skips_every_stage(kimi_run):
    run, first, second, _ = kimi_run
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("skipped") >= len(STAGES)


def test_a_killed_finetune_resumes(kimi_run, tmp_path):
    """SIGKILL once the first checkpoint is complete; the same command again resumes from it (no step twice)."""
    import signal

    run, first, _, _ = kimi_run
    assert first.returncode == 0, first.stderr[-3000:]
    root = run.parent.parent
    out = run / "finetune"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASRFT_")}
    env |= {"ASRFT_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "jobs.finetune", "--config", str(root / "kimi-tiny.yaml"), "--max-steps", "60",
            "--save-steps", "3"]
    shutil.rmtree(out)  # no checkpoint or manifest of the first run may satisfy the watch below
    proc = subprocess.Popen([*argv, "--force"], env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = first_checkpoint(proc, out / "checkpoints", 300)
    assert ckpt is not None, proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "no checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "_manifest.json").exists()
    again = subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == 60 and steps == sorted(set(steps))
