"""Planner decisions: table tests over (model, GPUs, GPU memory, host RAM) and the seed's cases."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import types

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import WhisperConfig  # noqa: E402

from common.families.kimi_audio.profile import kimi_audio_profile
from common.families.whisper.profile import profile_from_hf_config
from common.training.memory import GB, GiB  # noqa: E402
from common.training.planner import (  # noqa: E402
    DECISIONS,
    Plan,
    PlanError,
    Resources,
    adapt_kwargs,
    cgroup_cpu_limit,
    cgroup_memory_limit,
    deepspeed_config,
    detect_resources,
    plan,
    training_arguments,
    training_arguments_kwargs,
)

TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 3}
H100 = 85_520_809_984  # torch.cuda.get_device_properties(0).total_memory on an H100 80GB HBM3


def whisper(d, layers, heads, ffn, mels=80, vocab=51865, seq=128):
    config = WhisperConfig(d_model=d, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                           decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                           num_mel_bins=mels, vocab_size=vocab, **TOKENS)
    return profile_from_hf_config(config, decoder_seq_len=seq)


PROFILES = {
    "tiny": whisper(64, 1, 2, 128, vocab=300),
    "whisper-base": whisper(512, 6, 8, 2048),
    "whisper-large-v3": whisper(1280, 32, 20, 5120, mels=128, vocab=51866),
    "kimi-10b": kimi_audio_profile(),
}


def gpus(n, mem=H100, host=125 * GB, cpus=16, nodes=1):
    return Resources(gpus=n, gpu_mem_bytes=mem, host_ram_bytes=host, cpu_count=cpus, bf16_supported=n > 0,
                     gpu_name="NVIDIA H100 80GB HBM3" if n else None, nodes=nodes)


def cpu_only(host=23 * GB, cpus=2):
    return Resources(gpus=0, host_ram_bytes=host, cpu_count=cpus)


# --- the grid ---------------------------------------------------------------------------------------

# model, resources, n_train, per-device batch (None = auto) -> world, mode, strategy, checkpointing
GRID = [
    # the seed: 9 samples on 8 GPUs -> one GPU (the 8-GPU run hung in NCCL)
    ("whisper-base", gpus(8), 9, 1, (1, "full", "plain", False)),
    # the seed: 10 B full fine-tune on one 95 GB GPU with 125 GB host RAM: plain/ZeRO OOM the GPU,
    # offload OOMs the host -> LoRA
    ("kimi-10b", gpus(1, 95 * GB, 125 * GB), 9, 1, (1, "lora", "plain", False)),
    # ... with 512 GB host RAM the optimizer offload fits
    ("kimi-10b", gpus(1, 95 * GB, 512 * GB), 9, 1, (1, "full", "zero3-offload-opt", False)),
    # whisper-base on one H100: plain bf16, no checkpointing
    ("whisper-base", gpus(1), 1000, None, (1, "full", "plain", False)),
    ("whisper-base", gpus(8, host=512 * GB), 5000, None, (8, "full", "plain", False)),
    ("whisper-base", gpus(8, host=512 * GB), 100, None, (3, "full", "plain", False)),
    # whisper-large-v3 on one H100: batch 8 fits without checkpointing (measured 48.6 GB); batch 16
    # (measured 74.5 GB + context) is over the 10% margin, so it checkpoints
    ("whisper-large-v3", gpus(1), 5000, 8, (1, "full", "plain", False)),
    ("whisper-large-v3", gpus(1), 5000, 16, (1, "full", "plain", True)),
    # two 24 GB cards: DDP replicas (22 B/param) no longer fit, ZeRO-2 partitions the optimizer
    ("whisper-large-v3", gpus(2, 24 * GiB, 64 * GB), 5000, 8, (2, "full", "zero2", True)),
    # one 16 GB card: only optimizer offload fits
    ("whisper-large-v3", gpus(1, 16 * GiB, 64 * GB), 5000, 8, (1, "full", "zero3-offload-opt", True)),
    # 10 B on 4 or 8 H100s: ZeRO-2 partitions the optimizer states enough
    ("kimi-10b", gpus(4, host=512 * GB), 10000, 1, (4, "full", "zero2", False)),
    ("kimi-10b", gpus(8, host=1000 * GB), 10000, 1, (8, "full", "zero2", False)),
    # 10 B on one H100 with 125 GB: LoRA, and a bigger automatic batch for 1000 samples
    ("kimi-10b", gpus(1), 1000, None, (1, "lora", "plain", False)),
    # CPU only: fp32, one process
    ("whisper-base", cpu_only(), 200, None, (1, "full", "plain", False)),
    ("tiny", cpu_only(), 30, None, (1, "full", "plain", False)),
]


@pytest.mark.parametrize("model, resources, n_train, batch, expected", GRID,
                         ids=[f"{g[0]}-{g[1].gpus}gpu-{g[1].host_ram_bytes // GB}GB-n{g[2]}" for g in GRID])
def test_planner_grid(model, resources, n_train, batch, expected):
    p = plan(PROFILES[model], n_train=n_train, per_device_batch=batch, resources=resources)
    assert (p.world_size, p.mode, p.strategy, p.gradient_checkpointing) == expected
    chosen = p.chosen
    assert chosen.fits and chosen.chosen
    assert chosen.host_bytes <= resources.host_ram_bytes * 0.9
    if resources.gpus:
        assert chosen.gpu_bytes <= resources.gpu_mem_bytes * 0.9
    # every candidate listed before the chosen one in its mode was rejected with a reason
    for c in p.candidates[: p.candidates.index(chosen)]:
        assert not c.fits or c.max_fitting_batch is not None
        assert c.note


# --- more than one node ------------------------------------------------------------------------------

# model, nodes x GPUs (80 GB) and host RAM per node, n_train, mode, batch -> nodes, processes per node, mode, strategy
MULTI_NODE = [
    # the small-data rule across nodes: 9 samples on 2 x 8 GPUs -> 1 node, 1 GPU
    ("whisper-base", gpus(8, nodes=2), 9, "auto", 1, (1, 1, "full", "plain")),
    # Kimi-Audio full fine-tune, 250 GB of host RAM per node: ZeRO-3 without offload on 1 x 8 and on 2 x 8
    # (ZeRO-2 would load the model once per rank: 8 x 20 GB x 1.5 of host RAM)
    ("kimi-10b", gpus(8, host=250 * GB), 10000, "full", 1, (1, 8, "full", "zero3")),
    ("kimi-10b", gpus(8, host=250 * GB, nodes=2), 10000, "full", 1, (2, 8, "full", "zero3")),
    # ... with 1000 GB per node ZeRO-2 fits on one node and on two
    ("kimi-10b", gpus(8, host=1000 * GB), 10000, "full", 1, (1, 8, "full", "zero2")),
    ("kimi-10b", gpus(8, host=1000 * GB, nodes=2), 10000, "full", 1, (2, 8, "full", "zero2")),
    # Whisper large-v3 on 2 x 8: DDP over 16 GPUs when the data feeds them ...
    ("whisper-large-v3", gpus(8, host=1000 * GB, nodes=2), 20000, "auto", None, (2, 8, "full", "plain")),
    # ... 400 samples feed 12 ranks: more than one node only in whole nodes -> one node of 8
    ("whisper-large-v3", gpus(8, host=1000 * GB, nodes=2), 400, "auto", None, (1, 8, "full", "plain")),
]


@pytest.mark.parametrize("model, resources, n_train, mode, batch, expected", MULTI_NODE,
                         ids=[f"{m[0]}-{m[1].nodes}x{m[1].gpus}-{m[1].host_ram_bytes // GB}GB-n{m[2]}" for m in MULTI_NODE])
def test_planner_plans_nodes(model, resources, n_train, mode, batch, expected):
    p = plan(PROFILES[model], n_train=n_train, mode=mode, per_device_batch=batch, resources=resources)
    assert (p.nodes, p.procs_per_node, p.mode, p.strategy) == expected
    assert p.world_size == p.nodes * p.procs_per_node
    assert p.pod.gpus == p.procs_per_node  # one pod per node, one GPU per process
    assert p.chosen.gpu_bytes <= resources.gpu_mem_bytes * 0.9 and p.chosen.host_bytes <= resources.host_ram_bytes * 0.9
    strategy = p.decision("strategy").reason
    assert f"on {p.nodes} x {p.procs_per_node} x 85.5 GB" in strategy  # the topology and ...
    offload = "offload" in p.strategy
    assert ("no offload" in strategy) is not offload  # ... the ZeRO stage and offload, with why
    assert p.decision("nodes").reason


def test_two_nodes_halve_the_partitioned_states_per_gpu_but_not_the_host_ram_per_node():
    one = plan(PROFILES["kimi-10b"], n_train=10000, mode="full", per_device_batch=1, resources=gpus(8, host=250 * GB))
    two = plan(PROFILES["kimi-10b"], n_train=10000, mode="full", per_device_batch=1,
               resources=gpus(8, host=250 * GB, nodes=2))
    assert two.chosen.gpu_breakdown["optimizer"] * 2 == pytest.approx(one.chosen.gpu_breakdown["optimizer"], rel=1e-6)
    assert two.chosen.host_bytes == one.chosen.host_bytes  # 8 processes per node either way
    assert "full fine-tune of 9.8 B parameters on 2 x 8 x 85.5 GB: ZeRO-3, no offload" in two.decision("strategy").reason
    assert "2 nodes x 8 processes" in two.decision("nodes").reason


def test_small_data_on_two_nodes_names_the_rule():
    p = plan(PROFILES["whisper-base"], n_train=9, per_device_batch=1, resources=gpus(8, nodes=2))
    assert "9 training samples on 2 nodes x 8 GPUs" in p.decision("world_size").reason
    assert "the other 1 node(s) are not used" in p.decision("nodes").reason


@pytest.mark.parametrize(
    ("launcher", "n_train", "batch", "error"),
    [((2, 1), 8, 2, None), ((2, 4), 64, 2, None),
     ((2, 4), 9, 2, "8 processes were started (2 node(s) x 4) but 9 training samples at batch 2 make only 5")],
)
def test_a_world_started_by_torchrun_is_taken_as_given_unless_the_data_cannot_feed_it(launcher, n_train, batch, error):
    """The finetune stage under torchrun (a TrainJob's nodes): the plan takes the launcher's world, on CPU too,
    but never more ranks than batches."""
    if error:
        with pytest.raises(PlanError, match=re.escape(error)):
            plan(PROFILES["tiny"], n_train=n_train, per_device_batch=batch, resources=cpu_only(), launcher=launcher)
        return
    p = plan(PROFILES["tiny"], n_train=n_train, per_device_batch=batch, resources=cpu_only(), launcher=launcher)
    assert (p.nodes, p.procs_per_node, p.world_size) == (*launcher, launcher[0] * launcher[1])
    assert "started by the launcher" in p.decision("nodes").reason


def test_seed_ten_billion_on_one_gpu_explains_the_host_ram():
    p = plan(PROFILES["kimi-10b"], n_train=9, per_device_batch=1, resources=gpus(1, 95 * GB, 125 * GB))
    rows = {c.id: c for c in p.candidates}
    assert not rows["full/zero3"].fits_gpu  # ZeRO-3 alone OOMs the 95 GB GPU (the seed's OOM)
    offload = rows["full/zero3-offload-all"]
    assert offload.fits_gpu and not offload.fits_host  # offload fits the GPU, not 125 GB of RAM
    assert offload.host_bytes > 250 * GB
    reason = p.decision("mode").reason
    assert "host RAM" in reason and "125.0 GB available" in reason and "LoRA r=16" in reason
    assert p.lora is not None and p.lora.r == 16
    assert p.load_dtype == "bfloat16"
    assert p.deepspeed is None


def test_seed_nine_samples_on_eight_gpus_names_the_nccl_hang():
    p = plan(PROFILES["whisper-base"], n_train=9, per_device_batch=1, resources=gpus(8))
    d = p.decision("world_size")
    assert d.value == 1
    assert "NCCL" in d.reason and "9 training samples on 8 GPUs" in d.reason
    assert p.pod.gpus == 1


@pytest.mark.parametrize(
    "n_train, batch, accum, epochs, requested_save, expected_steps",
    [
        (9, 1, 1, 5, 1000, 45),  # the seed's first run: 45 steps, save_steps 1000
        (9, 1, 4, 10, None, 30),  # the seed's final run: 30 steps
        (1000, 16, 2, 3, None, 96),
        (10, 4, 1, 1, 500, 3),
    ],
)
def test_save_steps_never_exceed_total_steps(n_train, batch, accum, epochs, requested_save, expected_steps):
    p = plan(PROFILES["tiny"], n_train=n_train, n_eval=0, per_device_batch=batch, grad_accum=accum, epochs=epochs,
             save_steps=requested_save, resources=gpus(1))
    assert p.max_steps == expected_steps
    assert 1 <= p.save_steps <= expected_steps
    assert p.value("save_final") is True
    if requested_save and requested_save > expected_steps:
        assert p.save_steps == expected_steps
        assert "never save" in p.decision("save_steps").reason


def test_steps_match_what_the_trainer_will_count():
    # 100 samples, batch 16 -> 7 batches; 3 ranks -> ceil(7 / 3) = 3 per rank; accumulation 2 -> 2 steps
    p = plan(PROFILES["tiny"], n_train=100, n_eval=0, per_device_batch=16, grad_accum=2, epochs=3,
             resources=gpus(3), overrides={"world_size": 3})
    assert p.max_steps == 2 * 3
    assert p.value("warmup_steps") == math.ceil(0.05 * 6)


@pytest.mark.parametrize(
    "n_train, n_eval, holdout, strategy",
    [
        (9, None, 0, "no"),  # the seed: eval_ratio 0.05 of 9 samples is nothing
        (200, None, 0, "no"),  # 10 samples would be too noisy
        (1000, None, 50, "steps"),
        (100, 3, 0, "no"),
        (100, 0, 0, "no"),
        (100, 40, 0, "steps"),
    ],
)
def test_evaluation_split(n_train, n_eval, holdout, strategy):
    p = plan(PROFILES["tiny"], n_train=n_train, n_eval=n_eval, resources=gpus(1))
    assert p.value("eval_holdout") == holdout
    assert p.value("eval_strategy") == strategy
    kwargs = training_arguments_kwargs(p, "out")
    assert kwargs["eval_strategy"] == strategy
    assert ("eval_steps" in kwargs) == (strategy == "steps")


@pytest.mark.parametrize(
    "n_train, regime, epochs, warmup, target_batch",
    [(9, "tiny", 10, 0.1, 4), (500, "small", 5, 0.05, 16), (20000, "large", 3, 0.05, 32)],
)
def test_small_data_defaults(n_train, regime, epochs, warmup, target_batch):
    p = plan(PROFILES["whisper-base"], n_train=n_train, n_eval=0, per_device_batch=1, resources=gpus(1))
    assert p.value("data_regime") == regime
    assert p.value("epochs") == epochs
    assert p.value("warmup_ratio") == warmup
    assert p.per_device_batch * p.grad_accum == min(target_batch, n_train)
    assert p.value("scheduler") == "cosine"


@pytest.mark.parametrize(
    "model, resources, mode, lr",
    [
        ("whisper-base", gpus(1), "full", 1e-5),
        ("whisper-base", gpus(1), "lora", 1e-3),
        ("whisper-large-v3", gpus(1), "full", 5e-6),
        ("kimi-10b", gpus(1, 95 * GB, 512 * GB), "full", 3e-6),
        ("kimi-10b", gpus(1, 95 * GB, 125 * GB), "lora", 2e-4),
    ],
)
def test_learning_rate_defaults(model, resources, mode, lr):
    p = plan(PROFILES[model], n_train=500, mode=mode, per_device_batch=1, resources=resources)
    assert p.value("lr") == lr


# --- precision and devices ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "resources, asked, expected",
    [
        (cpu_only(), "auto", "fp32"),
        (cpu_only(), "fp32", "fp32"),
        (gpus(1), "auto", "bf16"),
        (gpus(1), "fp32", "fp32"),
        (gpus(1), "fp16", "fp16"),
        (gpus(1).model_copy(update={"bf16_supported": False}), "auto", "fp16"),
    ],
)
def test_precision(resources, asked, expected):
    p = plan(PROFILES["tiny"], n_train=50, precision=asked, resources=resources)
    assert p.precision == expected
    assert p.device == ("cuda" if resources.gpus else "cpu")


@pytest.mark.parametrize(
    "resources, asked, message",
    [
        (cpu_only(), "bf16", "needs a CUDA GPU"),
        (gpus(1).model_copy(update={"bf16_supported": False}), "bf16", "Ampere"),
    ],
)
def test_impossible_precision_says_how_to_fix_it(resources, asked, message):
    with pytest.raises(PlanError, match=message):
        plan(PROFILES["tiny"], n_train=50, precision=asked, resources=resources)


def test_explicit_full_mode_that_cannot_fit_is_an_error_with_a_fix():
    with pytest.raises(PlanError, match="fix: use mode 'auto' or 'lora'") as err:
        plan(PROFILES["kimi-10b"], n_train=9, mode="full", per_device_batch=1,
             resources=gpus(1, 95 * GB, 125 * GB))
    assert "zero3-offload-all" in str(err.value) and "host RAM" in str(err.value)


def test_nothing_fits_on_a_small_cpu_box():
    with pytest.raises(PlanError, match="no training setup"):
        plan(PROFILES["kimi-10b"], n_train=9, resources=cpu_only(16 * GB))


def test_freeze_encoder_trains_less_and_needs_less():
    full = plan(PROFILES["whisper-large-v3"], n_train=5000, per_device_batch=8, resources=gpus(1))
    frozen = plan(PROFILES["whisper-large-v3"], n_train=5000, per_device_batch=8, mode="freeze-encoder",
                  resources=gpus(1))
    assert frozen.mode == "freeze-encoder"
    assert not full.gradient_checkpointing and not frozen.gradient_checkpointing
    assert frozen.chosen.trainable_params < full.chosen.trainable_params * 0.6  # the decoder stays
    assert frozen.chosen.gpu_bytes < full.chosen.gpu_bytes / 2  # no encoder states or activations
    assert frozen.frozen_dtype == "bfloat16" and frozen.load_dtype == "float32"


# --- overrides ------------------------------------------------------------------------------------


def test_overrides_are_honoured_and_record_what_they_replaced():
    overrides = {"world_size": 2, "save_steps": 7, "lr": 1e-4, "gradient_checkpointing": True,
                 "scheduler": "linear"}
    natural = plan(PROFILES["whisper-base"], n_train=2000, per_device_batch=8, resources=gpus(4))
    p = plan(PROFILES["whisper-base"], n_train=2000, per_device_batch=8, resources=gpus(4), overrides=overrides)
    for name, value in overrides.items():
        d = p.decision(name)
        assert d.value == value
        assert d.overridden is not None
        assert d.overridden.to == value
        assert d.overridden.from_ == natural.value(name)
        assert "overridden" in d.reason
    assert p.decision("epochs").overridden is None
    assert p.world_size == 2 and p.pod.gpus == 2
    assert p.chosen.gradient_checkpointing
    as_json = json.loads(p.to_json())
    ws = next(d for d in as_json["decisions"] if d["name"] == "world_size")
    assert ws["overridden"] == {"from": 4, "to": 2}


def test_forced_strategy_that_does_not_fit_is_kept_and_flagged(caplog):
    with caplog.at_level(logging.WARNING, logger="common.training.planner"):
        p = plan(PROFILES["kimi-10b"], n_train=9, per_device_batch=1, resources=gpus(1, 95 * GB, 125 * GB),
                 overrides={"mode": "full", "strategy": "zero3-offload-all"})
    assert (p.mode, p.strategy) == ("full", "zero3-offload-all")
    assert p.decision("strategy").overridden.from_ == "plain"
    assert p.decision("mode").overridden.from_ == "lora"
    assert not p.chosen.fits and "forced by overrides" in p.chosen.note
    assert p.deepspeed["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "does not fit" in caplog.text


def test_lora_override_changes_rank_and_is_recorded():
    p = plan(PROFILES["whisper-base"], n_train=500, mode="lora", resources=gpus(1),
             overrides={"lora": {"r": 8, "targets": ["q_proj", "v_proj"]}})
    assert p.lora.r == 8 and p.lora.targets == ("q_proj", "v_proj")
    assert p.decision("lora").overridden.from_["r"] == 16
    assert p.chosen.trainable_params == PROFILES["whisper-base"].lora_params(8, ["q_proj", "v_proj"])


def test_dtype_overrides_count_in_the_memory_estimate():
    """fp32 frozen weights (e.g. to merge LoRA into exact fp32 base weights) cost twice the bytes."""
    kwargs = dict(n_train=500, mode="lora", per_device_batch=8, resources=gpus(1))
    half = plan(PROFILES["whisper-large-v3"], **kwargs)
    full = plan(PROFILES["whisper-large-v3"], **kwargs, overrides={"frozen_dtype": "float32", "load_dtype": "float32"})
    assert full.frozen_dtype == "float32" and full.decision("frozen_dtype").overridden.from_ == "bfloat16"
    frozen = PROFILES["whisper-large-v3"].total_params - half.chosen.trainable_params
    assert full.chosen.gpu_breakdown["weights"] - half.chosen.gpu_breakdown["weights"] == 2 * frozen
    assert full.chosen.host_bytes > half.chosen.host_bytes


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"save_every": 3}, "unknown override"),
        ({"strategy": "zero4"}, "strategy override 'zero4' unknown"),
        ({"world_size": 16}, "world_size must be between 1 and 8"),
        ({"scheduler": "cosine_annealing"}, "scheduler 'cosine_annealing' unknown"),
        ({"load_dtype": "fp8"}, "load_dtype override 'fp8' unknown"),
    ],
)
def test_bad_overrides_are_rejected(overrides, message):
    with pytest.raises(PlanError, match=message):
        plan(PROFILES["whisper-base"], n_train=5000, resources=gpus(8), overrides=overrides)


# --- DeepSpeed config -----------------------------------------------------------------------------------


def zero_plan(strategy: str):
    return plan(PROFILES["whisper-base"], n_train=5000, per_device_batch=16, resources=gpus(2),
                overrides={"strategy": strategy})


@pytest.mark.parametrize(
    "strategy, stage, offload_opt, offload_param",
    [("zero2", 2, False, False), ("zero3", 3, False, False), ("zero3-offload-opt", 3, True, False),
     ("zero3-offload-all", 3, True, True)],
)
def test_deepspeed_config_comes_from_the_plan(strategy, stage, offload_opt, offload_param):
    p = zero_plan(strategy)
    ds = p.deepspeed
    assert "scheduler" not in ds  # Hugging Face builds lr_scheduler_type around DeepSpeed's optimizer
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == offload_opt
    assert ("offload_param" in zero) == offload_param
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        assert ds[key] == "auto"
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    kwargs = training_arguments_kwargs(p, "out")
    assert kwargs["deepspeed"] == ds and kwargs["deepspeed"] is not ds
    assert kwargs["lr_scheduler_type"] == "cosine"


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "zero3-offload-opt", "zero3-offload-all"])
def test_deepspeed_accepts_the_generated_config(strategy):
    """DeepSpeed's own config parser (strict pydantic models) takes the config once "auto" is filled."""
    from deepspeed.runtime.config import DeepSpeedConfig

    p = zero_plan(strategy)
    cfg = json.loads(json.dumps(p.deepspeed))
    cfg.update(train_micro_batch_size_per_gpu=p.per_device_batch, gradient_accumulation_steps=p.grad_accum,
               train_batch_size=p.per_device_batch * p.grad_accum, gradient_clipping=1.0)
    cfg["optimizer"]["params"].update(lr=1e-5, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.01)
    parsed = DeepSpeedConfig(cfg)
    assert parsed.zero_config.stage == p.deepspeed["zero_optimization"]["stage"]
    assert parsed.scheduler_name is None
    assert parsed.optimizer_name == "adamw"


def hf_scheduler_for(ds_config, args, steps):
    """What Hugging Face's DeepSpeed integration does with `ds_config`: return the LR scheduler
    the run would use (None: DeepSpeed builds its own from the config's "scheduler" section)."""
    import torch
    from transformers import Trainer
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, deepspeed_optim_sched

    trainer = types.SimpleNamespace(args=args, lr_scheduler=None)
    trainer.create_scheduler = types.MethodType(Trainer.create_scheduler, trainer)
    hf_config = HfTrainerDeepSpeedConfig(ds_config)
    params = [torch.nn.Parameter(torch.zeros(2))]
    _, scheduler = deepspeed_optim_sched(trainer, hf_config, args, steps, params)
    if scheduler.lr_scheduler_callable is None:
        return None
    return scheduler.lr_scheduler_callable(torch.optim.AdamW(params, lr=args.learning_rate))


def test_the_requested_lr_schedule_is_the_one_that_runs():
    """CPU check of the Hugging Face x DeepSpeed wiring (tests/gpu/ runs it for real): with our
    config the scheduler comes from lr_scheduler_type; with upstream's WarmupLR section it does not."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    # fp32 only so TrainingArguments can be built on a CPU machine; the wiring is the same for bf16
    p = plan(PROFILES["whisper-base"], n_train=5000, per_device_batch=16, epochs=1, resources=gpus(2),
             overrides={"strategy": "zero3-offload-opt", "precision": "fp32"})
    args = training_arguments(p, "out", use_cpu=True, tf32=None)
    assert args.lr_scheduler_type == "cosine"
    steps, warmup = p.max_steps, p.value("warmup_steps")

    ours = hf_scheduler_for(p.deepspeed, args, steps)
    reference_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=args.learning_rate)
    reference = get_cosine_schedule_with_warmup(reference_opt, warmup, steps)
    ours_lrs, reference_lrs = [], []
    for _ in range(steps):
        ours.optimizer.step()
        ours.step()
        reference_opt.step()
        reference.step()
        ours_lrs.append(ours.get_last_lr()[0])
        reference_lrs.append(reference.get_last_lr()[0])
    assert ours_lrs == pytest.approx(reference_lrs)
    assert ours_lrs[-1] < 0.01 * args.learning_rate  # cosine decays to ~0

    upstream = {**p.deepspeed, "scheduler": {"type": "WarmupLR", "params": {
        "warmup_min_lr": 0, "warmup_max_lr": "auto", "warmup_num_steps": "auto"}}}
    assert hf_scheduler_for(upstream, args, steps) is None  # DeepSpeed's WarmupLR would replace cosine


# --- TrainingArguments ------------------------------------------------------------------------------


def test_training_arguments_build_on_this_transformers(tmp_path):
    p = plan(PROFILES["tiny"], n_train=9, per_device_batch=1, save_steps=1000, resources=cpu_only())
    args = training_arguments(p, tmp_path, report_to="none", seed=3)
    assert args.per_device_train_batch_size == 1
    assert args.gradient_accumulation_steps == 4
    assert args.save_steps == p.max_steps == 30
    assert args.lr_scheduler_type == "cosine"
    assert args.warmup_steps == 3
    assert str(args.eval_strategy).endswith("no") or args.eval_strategy == "no"
    assert args.use_cpu and not args.bf16
    assert args.seed == 3


@pytest.mark.parametrize(
    "accepted, expected",
    [
        ({"eval_strategy", "use_cpu"}, {"eval_strategy": "no", "use_cpu": True}),  # transformers >= 4.41
        ({"evaluation_strategy", "no_cuda"}, {"evaluation_strategy": "no", "no_cuda": True}),  # older
        ({"eval_strategy", "use_cpu", "gradient_checkpointing"},
         {"eval_strategy": "no", "use_cpu": True, "gradient_checkpointing": True}),
        ({"eval_strategy", "use_cpu", "gradient_checkpointing", "activation_checkpointing"},
         {"eval_strategy": "no", "use_cpu": True, "activation_checkpointing": True}),  # 5.x: the new name
    ],
)
def test_adapt_kwargs_renames_moved_arguments(accepted, expected, caplog):
    wanted = {"eval_strategy": "no", "use_cpu": True, "warmup_ratio": 0.1}
    if "gradient_checkpointing" in accepted:
        wanted["gradient_checkpointing"] = True
    with caplog.at_level(logging.INFO, logger="common.training.planner"):
        out = adapt_kwargs(wanted, accepted)
    assert out == expected
    assert "no 'warmup_ratio'; dropped" in caplog.text


def test_gpu_plan_kwargs_carry_mixed_precision_and_tf32():
    p = plan(PROFILES["whisper-large-v3"], n_train=5000, per_device_batch=32, resources=gpus(1))
    kwargs = training_arguments_kwargs(p, "out")
    assert kwargs["bf16"] is True and kwargs["fp16"] is False and kwargs["tf32"] is True
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in kwargs else "gradient_checkpointing"
    assert kwargs[checkpointing] is True
    assert kwargs[f"{checkpointing}_kwargs"] == {"use_reentrant": False}
    assert kwargs["optim"] == "adamw_torch_fused"
    assert "deepspeed" not in kwargs and "use_cpu" not in kwargs


# --- plan.json and pod resources -------------------------------------------------------------------------


def test_plan_json_has_everything(tmp_path):
    p = plan(PROFILES["kimi-10b"], n_train=9, per_device_batch=1, resources=gpus(1, 95 * GB, 512 * GB))
    path = tmp_path / "plan.json"
    p.write(path)
    data = json.loads(path.read_text())
    assert set(data) >= {"inputs", "profile", "resources", "decisions", "candidates", "chosen", "deepspeed",
                         "pod", "estimates"}
    assert [d["name"] for d in data["decisions"]] == list(DECISIONS)
    assert all(set(d) == {"name", "value", "reason", "overridden"} for d in data["decisions"])
    assert data["inputs"]["n_train"] == 9
    assert data["chosen"]["strategy"] == "zero3-offload-opt"
    assert data["estimates"]["safety_margin"] == 0.1
    assert data["estimates"]["host_budget_gb"] == pytest.approx(460.8)
    assert data["estimates"]["host_headroom_gb"] > 0
    assert all("gpu_gb" in c and "host_gb" in c and "fits" in c for c in data["candidates"])
    assert "scheduler" not in data["deepspeed"]
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    assert Plan.model_validate_json(path.read_text()) == p  # the finetune stage can reload it on resume


@pytest.mark.parametrize(
    "model, resources, n_train, batch",
    [
        ("kimi-10b", gpus(1, 95 * GB, 512 * GB), 9, 1),
        ("kimi-10b", gpus(1, 95 * GB, 125 * GB), 9, 1),
        ("whisper-base", gpus(8, host=512 * GB), 5000, None),
        ("whisper-base", cpu_only(), 200, None),
    ],
)
def test_pod_resources_replan_inside_the_pod_to_the_same_setup(model, resources, n_train, batch):
    p = plan(PROFILES[model], n_train=n_train, per_device_batch=batch, resources=resources)
    pod = p.pod
    assert pod.gpus == (p.world_size if resources.gpus else 0)
    assert pod.memory_request_bytes >= p.chosen.host_bytes + pod.shm_size_bytes * 0.99
    assert pod.memory_limit_bytes >= pod.memory_request_bytes
    assert pod.shm_size_bytes >= GiB
    inside = resources.model_copy(update={"host_ram_bytes": pod.memory_limit_bytes})
    again = plan(PROFILES[model], n_train=n_train, per_device_batch=batch, resources=inside)
    assert (again.mode, again.strategy, again.per_device_batch) == (p.mode, p.strategy, p.per_device_batch)
    if resources.gpus:
        assert pod.node_selector["nvidia.com/gpu.present"] == "true"
        assert pod.tolerations[0]["key"] == "nvidia.com/gpu"
    else:
        assert pod.node_selector == {} and pod.tolerations == []


def test_offload_pod_asks_for_the_offload_host_ram():
    p = plan(PROFILES["kimi-10b"], n_train=9, per_device_batch=1, resources=gpus(1, 95 * GB, 512 * GB))
    assert p.pod.memory_request_bytes > 220 * GB
    assert p.pod.cpu == 16  # DeepSpeedCPUAdam uses every core


# --- resource detection -----------------------------------------------------------------------------------


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    "files, proc_cgroup, expected",
    [
        ({"memory.max": "max\n"}, "0::/\n", None),
        ({"memory.max": "17179869184\n"}, "0::/\n", 16 * GiB),
        # nested v2: the pod's limit sits in its own cgroup, a tighter one further down wins
        ({"memory.max": "max", "kubepods/pod1/memory.max": "8589934592",
          "kubepods/pod1/ctr/memory.max": "max"}, "0::/kubepods/pod1/ctr\n", 8 * GiB),
        ({"memory/memory.limit_in_bytes": "4294967296"}, "4:memory:/\n", 4 * GiB),
        ({"memory/memory.limit_in_bytes": "9223372036854771712"}, "4:memory:/\n", None),  # v1 "unlimited"
        ({}, "", None),
    ],
)
def test_cgroup_memory_limit(tmp_path, files, proc_cgroup, expected):
    for name, text in files.items():
        write(tmp_path / "cg" / name, text)
    write(tmp_path / "proc_cgroup", proc_cgroup)
    assert cgroup_memory_limit(tmp_path / "cg", tmp_path / "proc_cgroup") == expected


@pytest.mark.parametrize(
    "files, expected",
    [({"cpu.max": "max 100000"}, None), ({"cpu.max": "250000 100000"}, 3),
     ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, 2),
     ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None)],
)
def test_cgroup_cpu_limit(tmp_path, files, expected):
    for name, text in files.items():
        write(tmp_path / "cg" / name, text)
    write(tmp_path / "proc_cgroup", "0::/\n")
    assert cgroup_cpu_limit(tmp_path / "cg", tmp_path / "proc_cgroup") == expected


def test_detect_resources_takes_the_cgroup_limit_when_tighter(tmp_path):
    write(tmp_path / "cg" / "memory.max", str(2 * GiB))
    write(tmp_path / "proc_cgroup", "0::/\n")
    r = detect_resources(gpus=0, cgroup_root=tmp_path / "cg", proc_self_cgroup=tmp_path / "proc_cgroup")
    assert r.host_ram_bytes == 2 * GiB
    assert "cgroup limit" in r.source["host_ram"]
    assert r.gpus == 0 and r.gpu_mem_bytes == 0 and r.cpu_count >= 1


def test_detect_resources_overrides():
    r = detect_resources(gpus=8, gpu_mem_bytes=H100, host_ram_bytes=512 * GB, cpu_count=64,
                         gpu_name="NVIDIA H100 80GB HBM3", bf16_supported=True)
    assert (r.gpus, r.gpu_mem_bytes, r.host_ram_bytes, r.cpu_count) == (8, H100, 512 * GB, 64)
    assert r.source == {"gpus": "given", "host_ram": "given", "cpu_count": "given"}
    with pytest.raises(PlanError, match="gpu_mem_bytes"):
        detect_resources(gpus=2, gpu_mem_bytes=0, host_ram_bytes=GB, cpu_count=1, gpu_name="x",
                         bf16_supported=True)


def test_detect_resources_on_this_machine_sees_no_gpu_and_real_ram():
    import torch

    r = detect_resources()
    assert r.gpus == torch.cuda.device_count()
    assert 0 < r.host_ram_bytes <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_deepspeed_config_is_none_without_zero():
    from common.training.memory import STRATEGIES

    assert deepspeed_config(STRATEGIES["plain"], "bf16", PROFILES["tiny"]) is None
