"""final/ of a DeepSpeed run (no GPU): which way the stage builds it for a plan, the one-process rendezvous
DeepSpeed needs on one GPU, and the weights path itself on a ZeRO-3 checkpoint written here in DeepSpeed's
own file layout (rank partitions with padding, tied aliases, 16-bit frozen fragments), read back by
DeepSpeed's zero_to_fp32 into a fresh trainee and saved by save_final.

The real thing (the stage training under ZeRO-2/3 on a GPU) is tests/gpu/test_zero3_final_gpu.py.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common.core.settings import environment
from common.core.stage import StageFailed
from common.families.whisper.trainee import ModeSpec, make_trainee, merged_whisper, save_final
from common.training.checkpoints import REQUIRED, seal
from common.training.planner import Resources, plan
from common.training.trainer import TrainError, load_trained_weights
from jobs.finetune.loops import (
    CHECKPOINTS,
    FINAL_FROM_MODULE,
    FINAL_FROM_ZERO,
    deepspeed_rendezvous,
    final_trainee_from_zero,
    final_weights_source,
)

GB = 1024**3
TINY = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, vocab_size=50, max_source_positions=20,
            max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
STEP = 6


# --- which way final/ is built ----------------------------------------------------------------------------


def tiny_plan(gpus: int, **overrides):
    from transformers import WhisperConfig

    from common.families.whisper.profile import profile_from_hf_config

    resources = Resources(gpus=gpus, gpu_mem_bytes=80 * GB if gpus else 0, host_ram_bytes=125 * GB, cpu_count=16,
                          bf16_supported=gpus > 0)
    profile = profile_from_hf_config(WhisperConfig(**TINY), decoder_seq_len=12)
    return plan(profile, n_train=32, mode="full", resources=resources, overrides=overrides)


@pytest.mark.parametrize(
    "gpus, overrides, fast, source, why",
    [
        (0, {}, False, FINAL_FROM_MODULE, "without DeepSpeed"),
        (1, {"strategy": "plain"}, False, FINAL_FROM_MODULE, "without DeepSpeed"),
        (1, {"strategy": "plain"}, True, FINAL_FROM_MODULE, "fast loop"),
        (1, {"strategy": "zero2"}, False, FINAL_FROM_ZERO, "bf16 the module holds 16-bit copies"),
        (1, {"strategy": "zero2", "precision": "fp32"}, False, FINAL_FROM_ZERO, "ZeRO-2 keeps the fp32 master"),
        (1, {"strategy": "zero3"}, False, FINAL_FROM_ZERO, "ZeRO-3 partitions every parameter"),
        (1, {"strategy": "zero3-offload-all"}, False, FINAL_FROM_ZERO, "ZeRO-3 partitions every parameter"),
        (2, {"strategy": "zero3-offload-opt"}, False, FINAL_FROM_ZERO, "ZeRO-3 partitions every parameter"),
    ],
    ids=["cpu", "plain", "fast", "zero2-bf16", "zero2-fp32", "zero3", "zero3-offload-all", "zero3-2gpus"],
)
def test_final_weights_source(gpus, overrides, fast, source, why):
    got, reason = final_weights_source(tiny_plan(gpus, **overrides), fast)
    assert got == source
    assert why in reason
    assert ("zero_to_fp32" in reason) == (source == FINAL_FROM_ZERO)


def test_deepspeed_on_one_gpu_gets_a_one_process_group():
    env = deepspeed_rendezvous(tiny_plan(1, strategy="zero3"), env={})
    assert {k: v for k, v in env.items() if k != "MASTER_PORT"} == {
        "MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    assert 0 < int(env["MASTER_PORT"]) < 65536


@pytest.mark.parametrize(
    "gpus, overrides, env",
    [(1, {"strategy": "plain"}, {}), (0, {}, {}),
     (1, {"strategy": "zero3"}, {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})],  # a launched worker has it
    ids=["plain", "cpu", "launched-worker"],
)
def test_no_rendezvous_where_none_is_needed(gpus, overrides, env):
    assert deepspeed_rendezvous(tiny_plan(gpus, **overrides), env=env) == {}


def test_environment_is_restored_after_training(monkeypatch):
    monkeypatch.setenv("RANK", "7")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with environment({"RANK": "0", "LOCAL_RANK": "0"}):
        assert (os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("0", "0")
    assert os.environ["RANK"] == "7" and "LOCAL_RANK" not in os.environ


# --- the weights: a ZeRO-3 checkpoint in DeepSpeed's layout -> fresh trainee -> final/ -----------------------


class _NoTokenizer:
    def save_pretrained(self, path: str) -> None:  # save_final writes the tokenizer; none is needed here
        pass


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    folder = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    WhisperForConditionalGeneration(WhisperConfig(**TINY)).save_pretrained(folder)
    return folder


def family_of(spec: ModeSpec) -> SimpleNamespace:
    """A model family whose trainee is the Whisper trainee of ``spec`` (what the stage rebuilds for final/)."""
    from transformers import WhisperForConditionalGeneration

    def trainee(model_dir, plan, settings):
        return make_trainee(WhisperForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32), spec)

    return SimpleNamespace(trainee=trainee)


def stage_ctx(out: Path) -> SimpleNamespace:
    return SimpleNamespace(out=out, settings=SimpleNamespace(model_dump=dict))


def trained_trainee(pretrained: Path, spec: ModeSpec):
    """A trainee as training leaves it: every trainable weight moved from its pretrained value."""
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(pretrained, torch_dtype=torch.float32)
    trainee = make_trainee(model, spec)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainee.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return trainee


def write_zero3_checkpoint(trainee, folder: Path, world_size: int) -> Path:
    """What DeepSpeed ZeRO-3 saves for ``trainee`` on ``world_size`` ranks (as the HF Trainer names it):
    per rank a model-states file (parameter shapes, tied aliases, 16-bit fragments of the frozen parameters)
    and an optim-states file holding that rank's fp32 partition of every trainable parameter (padded)."""
    from deepspeed.checkpoint.constants import (
        BUFFER_NAMES,
        DS_VERSION,
        FP32_FLAT_GROUPS,
        FROZEN_PARAM_FRAGMENTS,
        FROZEN_PARAM_SHAPES,
        OPTIMIZER_STATE_DICT,
        PARAM_SHAPES,
        PARTITION_COUNT,
        ZERO_STAGE,
    )

    tag = f"global_step{STEP}"
    shards = folder / tag
    shards.mkdir(parents=True)
    params = dict(trainee.named_parameters())
    trainable = OrderedDict((n, p) for n, p in params.items() if p.requires_grad)
    frozen = OrderedDict((n, p) for n, p in params.items() if not p.requires_grad)

    def partition(t: torch.Tensor, rank: int) -> torch.Tensor:
        size = math.ceil(t.numel() / world_size)
        flat = torch.cat([t.detach().reshape(-1), t.new_zeros(size * world_size - t.numel())])
        return flat[rank * size:(rank + 1) * size].clone()

    tied = "model.decoder.embed_tokens.weight"  # Whisper's proj_out shares it; DeepSpeed lists the alias
    aliases = {n.removesuffix(tied) + "proj_out.weight": n for n in params if n.endswith(tied)}
    for rank in range(world_size):
        torch.save({
            BUFFER_NAMES: [], "module": {}, DS_VERSION: "0.19.8",
            PARAM_SHAPES: [OrderedDict((n, p.shape) for n, p in trainable.items())],
            "shared_params": aliases,
            FROZEN_PARAM_SHAPES: OrderedDict((n, p.shape) for n, p in frozen.items()),
            FROZEN_PARAM_FRAGMENTS: {n: partition(p.to(torch.bfloat16), rank) for n, p in frozen.items()},
        }, shards / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        flat = torch.cat([partition(p.float(), rank) for p in trainable.values()])
        torch.save({OPTIMIZER_STATE_DICT: {ZERO_STAGE: 3, PARTITION_COUNT: world_size, FP32_FLAT_GROUPS: [flat]}},
                   shards / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    (folder / "latest").write_text(tag)
    for name in REQUIRED["trainer"]:  # the stage's own files: what makes the checkpoint complete for resume
        (folder / name).write_text("{}")
    seal(folder)  # the completion marker the Trainer path writes last
    return folder


@pytest.mark.parametrize(
    "spec, world_size",
    [(ModeSpec(mode="full"), 1), (ModeSpec(mode="full"), 3), (ModeSpec(mode="freeze-encoder"), 2),
     (ModeSpec(mode="lora", lora_r=2), 2), (ModeSpec(mode="full", frozen_encoder_layers=1), 1)],
    ids=["full-1rank", "full-3ranks-padded", "freeze-encoder", "lora", "frozen-bottom"],
)
def test_final_holds_the_fp32_masters_of_the_zero3_checkpoint(tmp_path, pretrained, spec, world_size):
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    reference = trained_trainee(pretrained, spec)
    write_zero3_checkpoint(reference, tmp_path / CHECKPOINTS / f"checkpoint-{STEP}", world_size)

    fresh = final_trainee_from_zero(stage_ctx(tmp_path), family_of(spec), pretrained, None, STEP)
    ref_params = dict(reference.named_parameters())
    base = WhisperForConditionalGeneration.from_pretrained(pretrained).state_dict()
    for name, p in fresh.named_parameters():
        assert p.dtype == torch.float32, name
        if p.requires_grad:  # trained: the fp32 master, exactly
            torch.testing.assert_close(p, ref_params[name], rtol=0, atol=0, msg=name)
    assert any(p.requires_grad for p in fresh.parameters())

    save_final(fresh, tmp_path / "final", _NoTokenizer(), WhisperFeatureExtractor(feature_size=8), pretrained)
    final = WhisperForConditionalGeneration.from_pretrained(tmp_path / "final", torch_dtype="auto")
    expected = merged_whisper(reference).state_dict()  # LoRA merged in fp32 from the same values
    moved = 0
    for name, tensor in final.state_dict().items():
        assert tensor.dtype == torch.float32 and tensor.numel() > 0, name
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-7, msg=name)
        moved += not torch.equal(tensor, base[name])
    assert moved > 0
    # frozen weights are the exact fp32 pretrained values, not the checkpoint's bf16 fragments
    frozen = ["model.encoder.embed_positions.weight"]  # sinusoidal: frozen in every mode
    frozen += ["model.encoder.conv1.weight"] if spec.mode != "full" or spec.frozen_encoder_layers else []
    for name in frozen:
        assert torch.equal(final.state_dict()[name], base[name]), name
    assert torch.equal(final.proj_out.weight, final.model.decoder.embed_tokens.weight)


def test_checkpoint_of_another_mode_is_refused(tmp_path, pretrained):
    write_zero3_checkpoint(trained_trainee(pretrained, ModeSpec(mode="full")),
                           tmp_path / CHECKPOINTS / f"checkpoint-{STEP}", 1)
    with pytest.raises(StageFailed, match="do not fit this model/mode"):
        final_trainee_from_zero(stage_ctx(tmp_path), family_of(ModeSpec(mode="lora", lora_r=2)), pretrained, None,
                                STEP)


def test_load_trained_weights_refuses_a_wrong_shape(pretrained):
    trainee = trained_trainee(pretrained, ModeSpec(mode="full"))
    weights = {n: p.detach().clone() for n, p in trainee.named_parameters()}
    weights["owner.model.decoder.layers.0.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(TrainError, match="fc1.weight has shape"):
        load_trained_weights(trainee, weights)


@pytest.mark.parametrize("global_step", [STEP + 1, STEP - 1], ids=["newer", "older"])
def test_final_needs_the_checkpoint_of_the_last_step(tmp_path, pretrained, global_step):
    write_zero3_checkpoint(trained_trainee(pretrained, ModeSpec(mode="full")),
                           tmp_path / CHECKPOINTS / f"checkpoint-{STEP}", 1)
    with pytest.raises(StageFailed, match=f"checkpoint-{global_step}"):
        final_trainee_from_zero(stage_ctx(tmp_path), family_of(ModeSpec(mode="full")), pretrained, None,
                                global_step)
