"""The training pod the Kubernetes executor sizes, and the plan the finetune stage makes inside that pod, choose
the same setup: one translation from settings to the planner (jobs/finetune/plan.py), fed on both sides with
the same settings, model config and data facts, on the machine each side sees."""

from __future__ import annotations

import os

import pytest
from test_k8s_jobs import WHISPER_BASE, demo, run_store

from common.core.settings import load_settings
from common.executors.k8s import finetune_resources, step_env
from common.families import get_family
from common.training.planner import detect_resources
from jobs.finetune import FinetuneSettings
from jobs.finetune.plan import make_plan, setup_of

LARGE_V3 = {**WHISPER_BASE, "d_model": 1280, "encoder_layers": 32, "decoder_layers": 32, "encoder_attention_heads": 20,
            "decoder_attention_heads": 20, "encoder_ffn_dim": 5120, "decoder_ffn_dim": 5120, "num_mel_bins": 128,
            "vocab_size": 51866}
FACTS = {"clips": 2000, "longest_seconds": 14.5, "longest_labels": 64, "rejected": []}


def plan_inside_the_pod(pipeline, common, k8s, res, config, monkeypatch):
    """What the stage plans in the pod: its settings from the pod's environment, the machine as the pod sees it
    (the GPUs the Job requested, the cgroup memory limit the Job set, the node's CPUs: no CPU limit)."""
    for var in [v for v in os.environ if v.startswith("ASRFT_")]:
        monkeypatch.delenv(var)
    for key, value in step_env("finetune", pipeline, common, k8s).items():
        monkeypatch.setenv(key, value)
    settings = load_settings(FinetuneSettings)
    gib = int(res.memory_limit.removesuffix("Gi")) * 2**30
    pod = detect_resources(gpus=res.gpus, gpu_mem_bytes=int(k8s.gpu_memory_gb * 1e9) if res.gpus else 0,
                           host_ram_bytes=gib, cpu_count=k8s.gpu_node_cpus, gpu_name=k8s.gpu_product or "",
                           bf16_supported=res.gpus > 0)
    the_plan, _ = make_plan(settings, get_family("whisper"), config, FACTS, pod)
    return the_plan


@pytest.mark.parametrize(
    ("case", "cli", "section", "config", "deepspeed"),
    [
        ("full", {"k8s.gpus": "1", "k8s.gpu_memory_gb": "80"}, {"mode": "full"}, WHISPER_BASE, False),
        ("lora", {"k8s.gpus": "1", "k8s.gpu_memory_gb": "80"}, {"mode": "lora", "batch": 8}, LARGE_V3, False),
        ("deepspeed", {"k8s.gpus": "2", "k8s.gpu_memory_gb": "24", "k8s.gpu_node_memory_gb": "250"},
         {"mode": "full"}, LARGE_V3, True),
    ],
)
def test_executor_and_pod_choose_the_same_setup(tmp_path, monkeypatch, case, cli, section, config, deepspeed):
    pipeline, common, k8s = demo(**cli)
    pipeline["finetune"] = section
    store = run_store(tmp_path / "pvc", config, FACTS)
    res = finetune_resources(pipeline, common, k8s, store)  # the executor, before the Job exists
    assert res.setup, res.source
    assert res.setup["deepspeed"] is deepspeed, res.setup  # the cases cover a plain and a DeepSpeed plan

    inside = plan_inside_the_pod(pipeline, common, k8s, res, store.read_json("demo/pretrained/model/config.json"),
                                 monkeypatch)
    assert setup_of(inside) == {k: v for k, v in res.setup.items() if k != "model"}
    pod = inside.pod
    assert (pod.gpus, pod.memory_request, pod.memory_limit, pod.shm_size) == \
        (res.gpus, res.memory_request, res.memory_limit, res.shm_size)
