"""The finetune stage on one CUDA GPU (world size 1, no launch) through the fast path (full mode, bf16 weights +
fp32 masters): plan.json says so, final/ is written, and a run killed after its first checkpoint resumes from
that fast checkpoint (not from scratch, not through the Trainer) when the same command runs again.

Run on the GPU machine: ``pytest -m gpu tests/gpu/test_launch_gpu.py``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))  # the tiny-model run helpers of test_finetune.py

from test_finetune import prepared_run  # noqa: E402

from common.core.stage import MANIFEST  # noqa: E402

N_CLIPS = 10
MAX_STEPS = 300  # long enough that the kill lands between the first checkpoint and the end
SAVE_STEPS = 10
KILL_DEADLINE_S = 240.0  # model load + torch.compile of the layers come before the first step


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """artifacts folder with completed prepare, pretrained (tiny model) and extract stages of run 'g'."""
    return prepared_run(tmp_path_factory.mktemp("gpu-launch"), N_CLIPS, "g", extract_epochs=2)


def _checkpoints(folder: Path) -> list[Path]:
    # fast-path checkpoints appear by renaming a finished temporary folder: one that exists is complete
    return sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def test_fast_path_on_one_gpu_and_resume_after_kill(run_dirs, capfd, monkeypatch):
    import torch

    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA GPU (run them on the GPU machine: pytest -m gpu tests/gpu)")
    for var in list(os.environ):
        if var.startswith("ASRFT_"):
            monkeypatch.delenv(var)
    artifacts, common = run_dirs
    argv = [*common, "--device", "cuda", "--mode", "full", "--batch", "2", "--grad-accum", "1", "--lr", "1e-4",
            "--max-steps", str(MAX_STEPS), "--save-steps", str(SAVE_STEPS), "--context-seconds", "2"]
    out = artifacts / "g" / "finetune"
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.finetune", *argv, "--force"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + KILL_DEADLINE_S
    first = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = _checkpoints(out / "checkpoints")
        if found:
            first = found[0]
            break
        time.sleep(0.05)  # polling interval of the file-system watch, not a synchronisation
    assert first is not None, ("no checkpoint within the deadline: "
                               + (proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "still running"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / MANIFEST).exists(), "the run finished before the kill: raise MAX_STEPS"
    plan = json.loads((out / "plan.json").read_text())
    values = {d["name"]: d["value"] for d in plan["decisions"]}
    assert values["device"] == "cuda" and values["precision"] == "bf16" and values["world_size"] == 1
    assert values["fast_path"] is True and values["processes"]["processes"] == 1
    killed_at = int(_checkpoints(out / "checkpoints")[-1].name.split("-")[1])
    assert SAVE_STEPS <= killed_at < MAX_STEPS
    assert (out / "checkpoints" / f"checkpoint-{killed_at}" / "optimizer.pt").is_file()  # a fast-path checkpoint

    # the same command again (no --force; no manifest, so the body runs): it resumes from the fast checkpoint
    from jobs.finetune.__main__ import main

    capfd.readouterr()
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{killed_at}'}" in err
    assert "fast path 快速训练: on" in err
    summary = json.loads((out / MANIFEST).read_text())["summary"]
    assert summary["fast_path"] is True and summary["global_step"] == MAX_STEPS
    assert summary["resumed_from"] == f"checkpoint-{killed_at}"
    state = json.loads((out / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == MAX_STEPS and steps == sorted(set(steps)) and steps[0] < killed_at < steps[-1]

    from transformers import WhisperForConditionalGeneration

    final = WhisperForConditionalGeneration.from_pretrained(out / "final", torch_dtype="auto")
    assert next(final.parameters()).dtype == torch.float32  # the fp32 master weights, not the bf16 copy
    base = WhisperForConditionalGeneration.from_pretrained(artifacts / "g" / "pretrained" / "model")
    q = "model.decoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(final.state_dict()[q], base.state_dict()[q])  # full fine-tuning changed it


def nccl_all_reduce() -> dict:
    """A worker: pick this rank's GPU, all-reduce its rank + 1 over NCCL, report what it saw."""
    import torch
    import torch.distributed as dist

    from common.training.launch import WORKER_ENV, local_rank

    torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl")
    total = torch.tensor([float(dist.get_rank() + 1)], device="cuda")
    dist.all_reduce(total)
    out = {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": total.item(),
           "device": torch.cuda.current_device(), **{k: os.environ.get(k) for k in WORKER_ENV}}
    dist.destroy_process_group()
    return out


def test_launcher_runs_nccl_workers_on_every_gpu():
    """The stage's launcher on CUDA: one worker per GPU, NCCL between them, NVLink multicast off in each."""
    import torch

    from common.training.launch import WORKER_ENV, launch_workers

    n = torch.cuda.device_count()
    assert n >= 1, "the gpu tests need a CUDA GPU"
    results = launch_workers(nccl_all_reduce, (), n, device="cuda")
    assert sorted(results) == list(range(n))
    for rank, r in results.items():
        assert (r["rank"], r["world"], r["device"]) == (rank, n, rank)
        assert r["sum"] == n * (n + 1) / 2
        assert {k: r[k] for k in WORKER_ENV} == WORKER_ENV
