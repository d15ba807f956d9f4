"""The finetune stage as two nodes on this machine, started the way a Kubeflow Trainer TrainJob starts it: on each
"node" ``torchrun --module jobs.finetune`` reads the PET_* variables the trainer's torch runtime sets (number of
nodes, processes per node, node rank, master address and port), here with a c10d rendezvous on 127.0.0.1 and one
gloo process per node, on a tiny random Whisper.

- Both nodes join; one node's worker killed after a checkpoint: both nodes fail (the killed one with its own
  error, rank 0 with the lost peer), no manifest, no final/.
- The same command again resumes from the last checkpoint; the loss of every step, before and after the kill,
  matches one process training the same global batch (batch 2 x 2 nodes = batch 2 x accumulation 2); exactly
  one plan.json, final/ and manifest, written by global rank 0.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from test_finetune import KILL_DEADLINE_S, REPO, first_checkpoint, prepared_run

from common.core.stage import MANIFEST

pytestmark = pytest.mark.timeout(300)

N_CLIPS = 10  # 8 train + 2 test
STEPS, SAVE_STEPS = 8, 2  # 8 clips / global batch 4 = 2 steps per epoch: 4 epochs, a checkpoint every 2 steps
NODE_WAIT_S = 240.0  # one node's whole run, at most (a few seconds of it is training on 2 busy cores)
LOSS_RTOL = 1e-3  # same samples, same weights; float sums in another order


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """artifacts folder with completed prepare, pretrained (tiny model) and extract stages of run 'r'."""
    return prepared_run(tmp_path_factory.mktemp("multinode"), N_CLIPS, "r", extract_epochs=2)


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    for var in list(os.environ):
        if var.startswith(("ASRFT_", "PET_")) or var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("ASRFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def stage_args(common: list[str], batch: int, accum: int, *extra: str) -> list[str]:
    return [*common, "--device", "cpu", "--threads", "1", "--mode", "lora", "--lora-r", "4", "--batch", str(batch),
            "--grad-accum", str(accum), "--lr", "1e-3", "--frozen-encoder-layers", "1", "--context-seconds", "2",
            *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(argv: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """Two torchrun agents, each in its own session (a "node"), configured only by a TrainJob's PET_* variables
    (+ the c10d rendezvous on a free local port). The agent started first joins first: global rank 0."""
    port = free_port()
    procs = []
    for node in range(2):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(node),
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port),
               "PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}", "OMP_NUM_THREADS": "1"}
        log = (log_dir / f"node{node}.log").open("wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--module", "jobs.finetune",
                                       *argv], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def wait_nodes(procs: list[subprocess.Popen], log_dir: Path) -> tuple[list[int], list[str]]:
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=NODE_WAIT_S))
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            raise
    return codes, [(log_dir / f"node{n}.log").read_text(errors="replace") for n in range(len(procs))]


def logged_losses(state_file: Path) -> list[float]:
    state = json.loads(state_file.read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def rank_worker(agent: subprocess.Popen, rank: int) -> psutil.Process | None:
    """The training process of global ``rank`` among the agent's children (torchrun gives it RANK)."""
    for child in psutil.Process(agent.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_two_nodes_train_like_one_process_and_resume_after_a_node_dies(run_dirs, tmp_path, capfd):
    from jobs.finetune.__main__ import main

    artifacts, common = run_dirs
    out = artifacts / "r" / "finetune"
    schedule = ("--max-steps", str(STEPS), "--save-steps", str(SAVE_STEPS))

    # 1. one process, the same global batch: 2 per step x 2 accumulated
    assert main(stage_args(common, 2, 2, *schedule, "--force")) == 0
    single = logged_losses(out / "trainer_state.json")
    assert len(single) == STEPS
    capfd.readouterr()

    # 2. two nodes, one rank each, batch 2 per rank; node 1's process killed once a checkpoint is complete:
    # both nodes fail (node 1 with its own error, rank 0 with the lost peer), nothing looks complete
    argv = stage_args(common, 2, 1, *schedule)
    shutil.rmtree(out)  # no checkpoint of the run above may satisfy the watch below
    procs = start_nodes(argv, tmp_path)
    first = first_checkpoint(procs[0], out / "checkpoints", KILL_DEADLINE_S)
    assert first is not None, "no checkpoint in time"
    victim = rank_worker(procs[1], 1)
    assert victim is not None, "rank 1's process not found under the second agent"
    victim.kill()
    codes, logs = wait_nodes(procs, tmp_path)
    assert codes[0] != 0 and codes[1] != 0
    assert "[rank 0/2]" in logs[0] and "[rank 1/2]" in logs[1]  # both joined; the first agent is global rank 0
    assert "Signal 9 (SIGKILL)" in logs[1]  # the killed node's own error, reported by its torchrun
    assert "finetune failed: rank 0 of 2:" in logs[0]  # rank 0 lost its peer and says where to look
    assert not (out / MANIFEST).exists() and not (out / "final").exists()
    saved = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")
             if (p / "trainer_state.json").is_file()]
    killed_at = max(saved)
    assert killed_at < STEPS

    # 3. the same command again on both nodes: resumes from the last checkpoint and ends as one process would
    procs = start_nodes(argv, tmp_path)
    codes, logs = wait_nodes(procs, tmp_path)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{killed_at}'}" in logs[0]
    plan = json.loads((out / "plan.json").read_text())
    values = {d["name"]: d["value"] for d in plan["decisions"]}
    assert (values["world_size"], values["nodes"], values["procs_per_node"]) == (2, 2, 1)
    assert values["processes"] == {"processes": 2, "nodes": 2, "backend": "gloo", "launched_by_stage": False}
    summary = json.loads((out / MANIFEST).read_text())["summary"]
    assert summary["resumed_from"] == f"checkpoint-{killed_at}" and summary["global_step"] == STEPS
    assert summary["nodes"] == 2
    state = json.loads((out / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps == list(range(1, STEPS + 1))  # one history, continued: no step twice, none missing
    np.testing.assert_allclose(logged_losses(out / "trainer_state.json"), single, rtol=LOSS_RTOL)
    assert (out / "final" / "model.safetensors").is_file()
    assert f"rank 1 done: {STEPS} steps" in logs[1]
    # one writer: rank 0 wrote the stage's files; rank 1's log has no plan, manifest or final/ of its own
    assert "plan written to" in logs[0] and "plan written to" not in logs[1]
    assert "finetune: done in" in logs[0] and "finetune: done in" not in logs[1]
