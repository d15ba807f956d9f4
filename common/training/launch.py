"""One process per GPU (or per gloo rank on CPU) for a stage's training, started from inside the stage.

    if needs_launch(plan.world_size):                       # > 1 and not already a worker
        results = launch_workers(worker_fn, (settings, plan), plan.world_size, device=plan.device)
        summary = results[0]                                # {global rank: worker_fn's return value}
    # inside worker_fn, one process per rank:
    worker_rank(), worker_world_size(), is_rank_zero(), setup_worker_logging(level)

How: ``torch.distributed.launcher.api.elastic_launch`` — the API ``torchrun`` itself runs — configured as
``torchrun --standalone --nproc-per-node N``: one node, c10d rendezvous on ``localhost:0`` (a free port), no
restarts, workers started with ``spawn``. Each worker gets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT like under torchrun, plus ``WORKER_ENV`` (NVLink multicast off: NVLS/multicast hangs or fails on
machines without fabric-manager support for it) and OMP_NUM_THREADS = CPUs / N when unset (as torchrun).

Why the API and not a ``python -m torch.distributed.run -m jobs.finetune <args>`` subprocess: the workers get
the parent's already resolved settings and plan as Python objects (pickled through the spawn pipe: secrets
never on a command line, in the environment or on disk; settings built in code, e.g. by the pipeline, need no
argv), they run only the stage body (no second skip check, manifest or output clean-up), and the parent gets
each rank's return value, or for a failed rank its exception and traceback (``WorkerFailed``).

Backend: ``nccl`` on CUDA, ``gloo`` on CPU (``backend_for``).

Started by an outside launcher instead (``torchrun`` on every node, e.g. by a Kubeflow Trainer TrainJob, whose
``torch-distributed`` runtime gives each node ``PET_NNODES`` / ``PET_NPROC_PER_NODE`` / ``PET_NODE_RANK`` /
``PET_MASTER_ADDR`` / ``PET_MASTER_PORT``, which torchrun reads as its flags), the stage process is already one
rank of the whole world: ``is_worker()``; ``launcher_topology()`` says (nodes, processes per node);
``join_process_group`` joins the world and ``share_from_rank_zero`` hands rank 0's decisions to every rank:

    join_process_group(device)
    job = share_from_rank_zero(job if is_rank_zero() else None)
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from common.core.settings import environment

log = logging.getLogger(__name__)

# Set in every worker's environment: NVLink SHARP / multicast objects are not available on every
# multi-GPU machine (they need fabric manager + IMEX), and NCCL or torch's symmetric memory may hang or fail
# when they try them. Plain NVLink/PCIe transports are as fast for data-parallel gradients of this size.
WORKER_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# Variables a launcher (torchrun, elastic, a PyTorchJob) sets in a worker: any of them means "already a worker".
WORKER_MARKERS = ("LOCAL_RANK", "WORLD_SIZE")
# What a Kubeflow Trainer torch runtime gives each node for torchrun (torchrun reads PET_<FLAG> as --<flag>).
PET_VARIABLES = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
TORCHRUN_COMMAND = ("torchrun", "--module", "jobs.finetune")  # what a TrainJob node runs
BACKENDS = {"cuda": "nccl", "cpu": "gloo"}
RDZV_ENDPOINT = "localhost:0"  # torchrun --standalone: c10d rendezvous on a free local port
MONITOR_INTERVAL_S = 0.1  # how often the agent polls its workers (a failure stops the others this fast)
TRACEBACK_LINES = 30  # lines of a failed worker's traceback shown in the error


class WorkerFailed(RuntimeError):
    """A worker process failed; ``rank`` is the first one that failed and ``message`` its error + traceback."""

    def __init__(self, rank: int, message: str):
        super().__init__(f"worker rank {rank} failed: {message}")
        self.rank = rank
        self.message = message


# --- where am I ----------------------------------------------------------------------------------------


def is_worker(env: Mapping[str, str] | None = None) -> bool:
    """True inside a process started by a distributed launcher (LOCAL_RANK or WORLD_SIZE set)."""
    env = os.environ if env is None else env
    return any(k in env for k in WORKER_MARKERS)


def worker_rank(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    return int(env.get("RANK", 0))


def local_rank(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    return int(env.get("LOCAL_RANK", 0))


def worker_world_size(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE", 1))


def local_world_size(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    return int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1)))


def is_rank_zero(env: Mapping[str, str] | None = None) -> bool:
    """The process that writes shared outputs: rank 0 of a launch, or the only process."""
    return worker_rank(env) == 0


def launcher_topology(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(nodes, processes per node) of the world an outside launcher started (torchrun's GROUP_WORLD_SIZE and
    LOCAL_WORLD_SIZE)."""
    env = os.environ if env is None else env
    per_node = local_world_size(env)
    nodes = int(env.get("GROUP_WORLD_SIZE", max(1, worker_world_size(env) // max(1, per_node))))
    if nodes * per_node != worker_world_size(env):
        raise ValueError(f"the launcher's world is uneven: WORLD_SIZE {worker_world_size(env)} is not "
                         f"{nodes} node(s) x LOCAL_WORLD_SIZE {per_node}; start the same number of processes on "
                         "every node")
    return nodes, per_node


def not_started_by_torchrun(env: Mapping[str, str] | None = None) -> str | None:
    """Why this process cannot train as given (the PET_* variables of a TrainJob node, but no torchrun around
    it), or None."""
    env = os.environ if env is None else env
    pet = sorted(k for k in PET_VARIABLES if k in env)
    if pet and not is_worker(env):
        return (f"{', '.join(pet)} are set (a Kubeflow Trainer node) but this process was not started by torchrun: "
                f"run `{' '.join(TORCHRUN_COMMAND)}` on every node (torchrun reads the PET_* variables)")
    return None


def join_process_group(device: str) -> None:
    """Join the launcher's world (env:// rendezvous: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE); on CUDA this
    rank's GPU first. Small control messages go over gloo, the gradients over nccl on CUDA."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = backend_for(device)
    dist.init_process_group(backend=backend)
    log.info("joined the process group: rank %d of %d (backend %s, master %s:%s)", dist.get_rank(),
             dist.get_world_size(), backend, os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))


def leave_process_group() -> None:
    """Leave the world joined by ``join_process_group`` before this process exits: the process group's
    communication threads are stopped and joined here, not torn down by the interpreter's exit (where a rank
    that finished first could abort with "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share_from_rank_zero(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled over the process group; other ranks pass None)."""
    import torch
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))  # over gloo (join_process_group)
    return box[0]


def needs_launch(world_size: int, env: Mapping[str, str] | None = None) -> bool:
    """Start workers: the plan wants more than one process and this process is not one of them already."""
    return world_size > 1 and not is_worker(env)


def backend_for(device: str) -> str:
    """torch.distributed backend: nccl between CUDA GPUs, gloo between CPU processes."""
    kind = device.split(":")[0]
    if kind not in BACKENDS:
        raise ValueError(f"device {device!r}: expected 'cuda' or 'cpu'")
    return BACKENDS[kind]


def setup_worker_logging(level: str = "INFO", env: Mapping[str, str] | None = None) -> None:
    """The stage's console logging, each line marked with this worker's rank ("[rank 1/2]")."""
    from common.core.stage import RedactingFormatter, setup_logging

    setup_logging(level)
    tag = f"[rank {worker_rank(env)}/{worker_world_size(env)}]"
    fmt = RedactingFormatter(f"%(asctime)s %(levelname)-7s {tag} %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        if handler.get_name() == "asr-ft":
            handler.setFormatter(fmt)


# --- launching -----------------------------------------------------------------------------------------


def worker_env(nproc: int, cpus: int | None = None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables to add to the parent's environment for its workers (existing settings win for OMP)."""
    env = os.environ if env is None else env
    extra = dict(WORKER_ENV)
    if "OMP_NUM_THREADS" not in env:
        if cpus is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        extra["OMP_NUM_THREADS"] = str(max(1, cpus // nproc))  # the CPUs shared out (torchrun would set 1)
    return extra


def describe_failure(failure: Any) -> str:
    """A ProcessFailure as one message: the exception line, then the tail of its traceback (if recorded)."""
    msg = failure.message
    if isinstance(msg, dict):  # written by the worker's error handler: {"message", "extraInfo": {"py_callstack"}}
        text = str(msg.get("message", ""))
        stack = str(msg.get("extraInfo", {}).get("py_callstack", "")).rstrip()
        if stack:
            tail = stack.splitlines()[-TRACEBACK_LINES:]
            text += "\n" + "\n".join(tail)
        msg = text
    return f"(exit code {failure.exitcode}, pid {failure.pid}) {msg}".rstrip()


def launch_workers(fn: Callable[..., Any], args: Sequence[Any], nproc: int, *, device: str,
                   run_id: str | None = None) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nproc`` new processes (ranks 0..nproc-1 on this node); returns {rank: result}.

    ``fn`` must be importable by name (a module-level function) and ``args`` picklable. The first failing
    worker stops the others and raises WorkerFailed with its error and traceback."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    backend = backend_for(device)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=run_id or f"asrft-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d", rdzv_endpoint=RDZV_ENDPOINT, max_restarts=0, monitor_interval=MONITOR_INTERVAL_S,
        start_method="spawn",
    )
    extra = worker_env(nproc)
    log.info("launching %d worker process(es) (%s, backend %s, %s) for %s.%s", nproc, device, backend,
             " ".join(f"{k}={v}" for k, v in extra.items()), fn.__module__, fn.__qualname__)
    with environment(extra):
        try:
            results = elastic_launch(config, fn)(*args)
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            others = sorted(r for r in e.failures if r != rank)
            message = describe_failure(failure)
            if others:
                message += f"\n(ranks {others} stopped with it)"
            raise WorkerFailed(rank, message) from None
    log.info("all %d worker(s) finished", nproc)
    return dict(results)
