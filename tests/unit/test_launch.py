"""The finetune stage's own launcher (common/training/launch.py) and the stage's decisions around it: when to launch,
the workers' environment, a failed worker's error, world size 1 through the launcher, the GPU-count note for
small data, the fast-path switch, and checkpoints of the two training loops never resuming each other.

The 2-process gloo run of the whole stage is tests/integration/test_finetune_launch.py."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from common.training.launch import (
    WORKER_ENV,
    WorkerFailed,
    backend_for,
    describe_failure,
    is_worker,
    launch_workers,
    needs_launch,
    worker_env,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Worker processes import this module again (spawn): it imports nothing heavy at the top (no torch, no
# transformers), so a worker starts in a second or two.

# --- when to launch ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "world_size", "worker", "launch"),
    [
        ({}, 1, False, False),  # one process: train here
        ({}, 2, False, True),  # the plan wants 2 and nobody started us: launch
        ({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2"}, 2, True, False),  # a worker never launches again
        ({"WORLD_SIZE": "4"}, 4, True, False),  # any launcher marker counts
        ({"RANK": "0"}, 2, False, True),  # RANK alone is no launcher's mark
    ],
)
def test_needs_launch(env, world_size, worker, launch):
    assert is_worker(env) is worker
    assert needs_launch(world_size, env) is launch


@pytest.mark.parametrize(("device", "backend"), [("cuda", "nccl"), ("cuda:1", "nccl"), ("cpu", "gloo")])
def test_backend(device, backend):
    assert backend_for(device) == backend


def test_backend_of_an_unknown_device():
    with pytest.raises(ValueError, match="expected 'cuda' or 'cpu'"):
        backend_for("mps")


@pytest.mark.parametrize(
    ("env", "nproc", "cpus", "omp"),
    [({}, 2, 16, "8"), ({}, 4, 2, "1"), ({"OMP_NUM_THREADS": "3"}, 2, 16, None)],  # a user's value is kept
)
def test_worker_env(env, nproc, cpus, omp):
    extra = worker_env(nproc, cpus=cpus, env=env)
    assert extra["NCCL_NVLS_ENABLE"] == "0" and extra["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert extra["NVSHMEM_DISABLE_NVLS"] == "1"
    assert extra.get("OMP_NUM_THREADS") == omp


@pytest.mark.parametrize(
    ("message", "expected", "absent"),
    [
        ({"message": "ValueError: bad batch", "extraInfo": {"py_callstack": "Traceback:\n  File x\nValueError: bad batch",
                                                         "timestamp": "1"}},
         ["(exit code 1, pid 7) ValueError: bad batch", "  File x"], []),
        ("Signal 9 (SIGKILL) received by PID 7", ["Signal 9 (SIGKILL)"], ["Traceback"]),
    ],
)
def test_describe_failure(message, expected, absent):
    text = describe_failure(SimpleNamespace(message=message, exitcode=1, pid=7))
    assert all(e in text for e in expected)
    assert not any(a in text for a in absent)


# --- real worker processes ----------------------------------------------------------------------------------


def report_rank(tag: str) -> dict:
    """A worker: its rank, world size and the launcher variables it sees."""
    return {"tag": tag, "rank": int(os.environ["RANK"]), "local_rank": int(os.environ["LOCAL_RANK"]),
            "world": int(os.environ["WORLD_SIZE"]), **{k: os.environ.get(k) for k in WORKER_ENV}}


def fail_on_rank_one() -> int:
    """A worker: both ranks meet in an all-reduce over gloo, then rank 1 raises."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    total = torch.tensor([1.0])
    dist.all_reduce(total)
    rank = dist.get_rank()
    dist.destroy_process_group()
    if rank == 1:
        raise ValueError(f"rank 1 gives up after the all-reduce summed {total.item():g}")
    return rank


def test_world_size_one_through_the_launcher():
    before = {k: os.environ.get(k) for k in WORKER_ENV}
    results = launch_workers(report_rank, ("hello",), 1, device="cpu")
    assert results == {0: {"tag": "hello", "rank": 0, "local_rank": 0, "world": 1, **WORKER_ENV}}
    assert {k: os.environ.get(k) for k in WORKER_ENV} == before  # the parent's environment is restored


def test_a_failed_worker_fails_the_launch_with_its_error():
    with pytest.raises(WorkerFailed) as caught:
        launch_workers(fail_on_rank_one, (), 2, device="cpu")
    assert caught.value.rank == 1
    text = str(caught.value)
    assert "worker rank 1 failed" in text and "ValueError: rank 1 gives up after the all-reduce summed 2" in text
    assert "fail_on_rank_one" in text  # the traceback's tail names the failing function


# --- the stage's decisions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_gpus", "n_train", "note"),
    [
        (8, 9, "training on 1 of 8 GPUs"),  # the seed's NCCL hang: 9 samples on 8 GPUs
        (8, 100, "training on 3 of 8 GPUs"),  # 100 // 32 samples per GPU
        (8, 10_000, None),  # enough data for all of them
        (1, 9, None),
        (0, 9, None),  # CPU
    ],
)
def test_world_size_note_for_small_data(n_gpus, n_train, note):
    from test_planner import PROFILES, gpus

    from common.training.planner import plan
    from jobs.finetune import world_size_note

    p = plan(PROFILES["whisper-base"], n_train=n_train, per_device_batch=1, resources=gpus(n_gpus))
    got = world_size_note(p)
    if note is None:
        assert got is None
    else:
        assert got.startswith(note) and "samples" in got


def stub_plan(**values) -> SimpleNamespace:
    base = {"device": "cuda", "world_size": 1, "strategy": "plain", "precision": "bf16", "mode": "full"}
    return SimpleNamespace(schedule=SimpleNamespace(**{**base, **values}))


@pytest.mark.parametrize(
    ("fast_path", "values", "blocker", "fast", "why"),
    [
        ("auto", {}, None, True, "one GPU"),
        ("off", {}, None, False, "fast_path=off"),
        ("auto", {"device": "cpu", "precision": "fp32"}, None, False, "CUDA"),
        ("auto", {"world_size": 2}, None, False, "world_size 2"),
        ("auto", {"mode": "lora"}, None, False, "LoRA"),
        ("auto", {"precision": "fp16"}, None, False, "bf16"),
        ("auto", {}, "pack_clips > 1: packed windows are regrouped every epoch", False, "pack_clips"),
    ],
)
def test_fast_path_decision(fast_path, values, blocker, fast, why):
    from common.families import Built
    from jobs.finetune.loops import fast_path_decision

    built = Built(train=[], eval=None, collator=list, fast_path_blocker=blocker)
    decided, reason = fast_path_decision(fast_path, stub_plan(**values), None, built)
    assert decided is fast and why in reason
    assert fast or "Trainer" in reason


def _touch_checkpoint(folder, names, step):
    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    for name in names:
        (ckpt / name).write_text(json.dumps({"global_step": step, "max_steps": 10}) if name.endswith(".json") else "x")
    from common.training.checkpoints import seal

    seal(ckpt)  # the completion marker both loops write last
    return ckpt


FAST_FILES = ("config.json", "trainer_state.json", "optimizer.pt", "model.safetensors")
TRAINER_FILES = ("trainable.safetensors", "trainer_state.json")


@pytest.mark.parametrize(
    ("files", "fast_path", "resumes"),
    [
        (FAST_FILES, True, True),
        (TRAINER_FILES, False, True),
        (FAST_FILES[:-1], True, False),  # no weights: an incomplete fast checkpoint
    ],
)
def test_resume_takes_only_its_own_kind_of_checkpoint(tmp_path, files, fast_path, resumes):
    from common.core.settings import load_settings
    from common.core.stage import StageContext
    from common.core.store import open_store
    from jobs.finetune import FinetuneSettings
    from jobs.finetune.resume import CHECKPOINTS, checkpoint_to_resume, run_signature

    s = load_settings(FinetuneSettings, {"artifacts": str(tmp_path / "runs"), "run_id": "r"})
    ctx = StageContext("finetune", s, open_store(s.artifacts, s.s3), "r", tmp_path / "runs" / "r" / "finetune")
    the_plan = SimpleNamespace(values={"mode": "full", "world_size": 1})
    same = run_signature(ctx, the_plan, {"extract": "e"}, "fast" if fast_path else "trainer")
    other = run_signature(ctx, the_plan, {"extract": "e"}, "trainer" if fast_path else "fast")
    assert same != other  # the loop that trains is part of the setup
    assert checkpoint_to_resume(ctx, same) is None  # nothing yet: a fresh folder with the signature
    ckpt = _touch_checkpoint(ctx.out / CHECKPOINTS, files, 5)
    assert checkpoint_to_resume(ctx, same) == (ckpt if resumes else None)
    if resumes:  # the other loop never resumes it: it starts over and clears the folder
        assert checkpoint_to_resume(ctx, other) is None and not ckpt.exists()


# --- started by an outside launcher (torchrun on every node, e.g. a Kubeflow Trainer TrainJob) ----------------


@pytest.mark.parametrize(
    ("env", "topology"),
    [
        ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "GROUP_WORLD_SIZE": "2", "LOCAL_RANK": "3"}, (2, 8)),
        ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "2", "LOCAL_RANK": "0"}, (2, 1)),
        ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "0"}, (1, 4)),  # no GROUP_WORLD_SIZE: derived
    ],
)
def test_launcher_topology(env, topology):
    from common.training.launch import launcher_topology

    assert launcher_topology(env) == topology


def test_uneven_launcher_world_is_refused():
    from common.training.launch import launcher_topology

    with pytest.raises(ValueError, match="same number of processes on every node"):
        launcher_topology({"WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2"})


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"PET_NNODES": "2", "PET_NODE_RANK": "1"}, "PET_NNODES, PET_NODE_RANK are set"),  # a TrainJob node, no torchrun
        ({"PET_NNODES": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, None),  # torchrun's worker: fine
        ({}, None),
    ],
)
def test_a_trainjob_node_must_start_the_stage_through_torchrun(env, problem):
    from common.training.launch import not_started_by_torchrun

    why = not_started_by_torchrun(env)
    assert (why is None) == (problem is None)
    if problem:
        assert problem in why and "torchrun --module jobs.finetune" in why
