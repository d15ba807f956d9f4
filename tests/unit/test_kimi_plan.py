"""Kimi-Audio as the planner sees it: the ASR training profile's parameter groups, LoRA's targets, and the plans
it gets on three machines, as tables of input -> expected output.

Every expected number below is derived in the comment beside it (from the published Kimi-Audio-7B shape,
common/training/memory.py's bytes per term and common/training/planner.py's rules) and cross-checked against
the model's own skeleton (common.families.kimi_audio.model.build_on_meta) where one exists.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common.families.kimi_audio.conventions import KIMI_AUDIO_7B, TINY, stacked_frames  # noqa: E402
from common.families.kimi_audio.profile import (  # noqa: E402
    FIXED_POSITIONS,
    QWEN2_LORA_TARGETS,
    lora_target_regex,
    profile_from_config,
    sequence_length,
)
from common.training.memory import GB, STRATEGIES, LoraSpec, Setup, activation_bytes, estimate  # noqa: E402
from common.training.planner import detect_resources, plan  # noqa: E402

# --- the data the plans are made for ------------------------------------------------------------------------

INSTRUCTION_IDS = 9  # 「请把这段语音转录成文本。」 in Qwen's BPE: [14880, 99360, … , 1773]
CODES_15_S = stacked_frames(15 * 16_000)  # ⌈240000 / 1280⌉ = 188 speech positions (12.5 Hz)
# Longest transcript of a 15-s clip: fast Mandarin ≤ 6 characters/s and ≤ 1 Qwen token per character → 90
# (the real dev clips run ≤ 3.3 tokens/s, so this bound is loose).
TRANSCRIPT_15_S = 90
SEQ_15_S = 295  # 9 + 188 + 90 + 8 fixed positions
SPEECH_BOUND = SEQ_15_S - FIXED_POSITIONS  # 287: the profile's bound on speech positions (features, adaptor)

H100 = 85_520_809_984  # torch.cuda.get_device_properties(0).total_memory of an H100 80GB HBM3
A100_40GB = 40 * GB


def profile_7b(seq: int = SEQ_15_S, *, train_whisper_encoder: bool = False):
    return profile_from_config(KIMI_AUDIO_7B, llm_seq_len=seq, train_whisper_encoder=train_whisper_encoder)


# --- sequence length -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "codes, transcript, instruction, expected",
    [
        (CODES_15_S, TRANSCRIPT_15_S, INSTRUCTION_IDS, SEQ_15_S),
        (1, 1, INSTRUCTION_IDS, 19),  # 9 + 1 + 1 + 8
        (375, 180, INSTRUCTION_IDS, 572),  # a 30-s clip: 9 + 375 + 180 + 8
    ],
)
def test_sequence_length_is_the_samples_length(codes, transcript, instruction, expected):
    from common.families.kimi_audio.sample import asr_sample

    assert sequence_length(codes, transcript, instruction) == expected
    sample = asr_sample([0] * codes, [100] * transcript, [200] * instruction)
    assert len(sample) == expected
    assert sample.n_codes == codes


# --- parameter groups ------------------------------------------------------------------------------------------

# Kimi-Audio-7B: hidden h = 3584, 28 trunk layers, k/v width 4 x 128 = 512, FFN f = 18944, vocab 168448.
# One Qwen2 layer: q 3584² + 3584 = 12,848,640; k and v 3584·512 + 512 = 1,835,520 each; o 3584² = 12,845,056
# → attention 29,364,736; MLP 3 · 3584 · 18944 = 203,685,888; two RMSNorms 7,168 → 233,057,792.
LAYER = 233_057_792
VOCAB_ROWS = 168_448 * 3584  # 603,717,632: embed_tokens, lm_head and mimo_output each
# Adaptor: Linear(5120→3584) + bias 18,353,664; Linear(3584→3584) + bias 12,848,640; LayerNorm weight + bias
# 7,168 → 31,209,472 (not 31,207,936: that figure is 1,536 short of these three modules).
ADAPTOR = 31_209_472
TRUNK = 28 * LAYER + 3584  # 6,525,621,760 with model.norm
MIMO = 6 * LAYER + 3584 + VOCAB_ROWS  # 1,398,346,752 + mimo_norm 3,584 + mimo_output → 2,002,067,968
TOTAL = 9_766_334_464  # TRUNK + 2 · VOCAB_ROWS + ADAPTOR + MIMO
WHISPER_ENCODER = 636_968_960  # transformers' WhisperEncoder of large-v3's shape, on meta (1,920,000 fixed positions)
# LoRA r = 16 on the 7 trunk projections of one layer: r x (in + out) for q (3584+3584), k (3584+512),
# v (3584+512), o (3584+3584), gate (3584+18944), up (3584+18944), down (18944+3584)
# = 16 x 90,112 = 1,441,792 per layer; x 28 layers = 40,370,176 (0.41 % of the model).
LORA_R16 = 40_370_176

GROUPS = [  # attribute of the 7B profile -> expected
    ("decoder_params", TRUNK),
    ("embedding_params", VOCAB_ROWS),
    ("head_params", VOCAB_ROWS),
    ("adaptor_params", ADAPTOR),
    ("inert_params", MIMO),
    ("encoder_params", 0),  # frozen by default: its features are cached before training, its weights not held
    ("fixed_params", 0),
    ("total_params", TOTAL),
    ("largest_layer_params", VOCAB_ROWS),
]


@pytest.mark.parametrize("attribute, expected", GROUPS, ids=[g[0] for g in GROUPS])
def test_7b_parameter_groups(attribute, expected):
    assert getattr(profile_7b(), attribute) == expected


def test_the_sums_behind_the_groups():
    assert LAYER == (3584**2 + 3584) + 2 * (3584 * 512 + 512) + 3584**2 + 3 * 3584 * 18944 + 2 * 3584
    assert ADAPTOR == (5120 * 3584 + 3584) + (3584 * 3584 + 3584) + 2 * 3584
    assert MIMO == 2_002_067_968
    assert TRUNK + 2 * VOCAB_ROWS + ADAPTOR + MIMO == TOTAL
    assert LORA_R16 == 28 * 16 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))


@pytest.mark.parametrize("config", [KIMI_AUDIO_7B, TINY], ids=["7b", "tiny"])
def test_groups_match_the_models_own_parameters(config):
    """The profile's groups are the parts of asr-ft's KimiAudioLM, parameter for parameter."""
    from common.families.kimi_audio.model import build_on_meta, parameter_counts

    model = build_on_meta(config)
    n = parameter_counts(model)
    p = profile_from_config(config, llm_seq_len=64)
    assert p.decoder_params == n["trunk_layers"] + n["final_norm"]
    assert p.embedding_params == n["embed_tokens"]
    assert p.head_params == n["lm_head"]
    assert p.adaptor_params == n["adaptor"]
    assert p.inert_params == n["audio_branch"]  # mimo layers + mimo_norm + mimo_output
    assert p.total_params == n["total"]
    # what trains in full mode is exactly what KimiAudioLM leaves requires_grad (the mimo branch is frozen)
    assert p.trainable_params("full") == sum(t.numel() for t in model.parameters() if t.requires_grad)
    assert p.largest_layer_params == max(t.numel() for t in model.parameters())


@pytest.mark.parametrize(
    "train_whisper_encoder, encoder, fixed, trainable_full, stacks, input_bytes",
    [
        # frozen (default): not held; the DataLoader ships cached features, 287 positions x 5120 x 2 bytes
        # + 295 positions x 33 bytes of ids and masks = 2,938,880 + 9,735
        (False, 0, 0, TOTAL - MIMO, ("decoder",), 2_948_615),  # 7,764,266,496 trainable
        # trained: held and computed (32 layers, 1500 frames per 30-s chunk); its sinusoidal positions
        # (1500 x 1280) never train; the DataLoader ships one 30-s log-mel chunk, 128 x 3000 x 4 bytes
        (True, WHISPER_ENCODER, 1_920_000, TOTAL + WHISPER_ENCODER - MIMO - 1_920_000, ("encoder", "decoder"),
         1_536_000 + 9_735),  # 8,399,315,456 trainable
    ],
)
def test_whisper_encoder_held_only_when_it_trains(train_whisper_encoder, encoder, fixed, trainable_full, stacks,
                                                   input_bytes):
    p = profile_7b(train_whisper_encoder=train_whisper_encoder)
    assert (p.encoder_params, p.fixed_params) == (encoder, fixed)
    assert p.total_params == TOTAL + encoder
    assert p.trainable_params("full") == trainable_full
    assert tuple(s.part for s in p.stacks) == stacks
    assert p.input_bytes_per_sample == input_bytes
    assert p.stacks[-1].layers == 28  # the trunk only: the 6 mimo layers are never computed
    # LoRA's default parts are the LLM's: the encoder, trained or not, gets no adapters
    assert p.lora_params(16, QWEN2_LORA_TARGETS) == LORA_R16


def test_whisper_encoder_count_matches_transformers():
    import torch
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                           num_mel_bins=128, decoder_layers=1, decoder_attention_heads=20, decoder_ffn_dim=5120)
    with torch.device("meta"):
        encoder = WhisperEncoder(config)
    assert sum(t.numel() for t in encoder.parameters()) == WHISPER_ENCODER
    assert sum(t.numel() for t in encoder.parameters() if not t.requires_grad) == 1500 * 1280


def test_training_a_whisper_encoder_needs_the_7b_adaptor_width():
    with pytest.raises(ValueError, match="Whisper-large-v3"):
        profile_from_config(TINY, llm_seq_len=64, train_whisper_encoder=True)


# --- LoRA -------------------------------------------------------------------------------------------------------

def test_lora_targets_the_trunk_only():
    p = profile_7b()
    assert p.default_lora_targets == QWEN2_LORA_TARGETS
    assert p.default_lora_parts == ("decoder",)
    targeted = [g for g in p.linears if g.name in p.default_lora_targets and g.part in p.default_lora_parts]
    assert sum(g.count for g in targeted) == 196  # 28 layers x 7 projections
    assert p.lora_params(16, QWEN2_LORA_TARGETS) == LORA_R16
    assert p.trainable_params("lora", LoraSpec(r=16, targets=QWEN2_LORA_TARGETS)) == LORA_R16


def test_peft_with_the_regex_wraps_196_trunk_modules():
    """peft on the 7B skeleton: the regex wraps the trunk's 196 projections and no mimo layer; bare names would
    also wrap the mimo layers' (shown on the tiny stand-in: 3 trunk + 2 mimo layers)."""
    from peft import LoraConfig, get_peft_model

    from common.families.kimi_audio.model import build_on_meta

    model = get_peft_model(build_on_meta(KIMI_AUDIO_7B),
                           LoraConfig(r=16, lora_alpha=32, target_modules=lora_target_regex()))
    wrapped = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    assert len(wrapped) == 196
    assert not [name for name in wrapped if ".layers." not in name or "mimo" in name]
    assert sum(t.numel() for t in model.parameters() if t.requires_grad) == LORA_R16

    def wrapped_count(target_modules):
        tiny = get_peft_model(build_on_meta(TINY), LoraConfig(r=2, target_modules=target_modules))
        return sum(1 for _, module in tiny.named_modules() if hasattr(module, "lora_A"))

    assert wrapped_count(lora_target_regex()) == 3 * 7
    assert wrapped_count(list(QWEN2_LORA_TARGETS)) == (3 + 2) * 7  # bare names reach the mimo layers


def test_lora_regex_refuses_a_name_that_is_no_trunk_linear():
    assert lora_target_regex(("q_proj", "v_proj")) == r"model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|v_proj)"
    with pytest.raises(ValueError, match="choose from"):
        lora_target_regex(("fc1",))


# --- the memory model's inert parameters --------------------------------------------------------------------


@pytest.mark.parametrize("strategy, world", [("plain", 1), ("zero2", 8), ("zero3", 1), ("zero3-offload-all", 1)])
@pytest.mark.parametrize("mode", ["full", "freeze-encoder", "lora"])
def test_inert_parameters_weigh_as_frozen_weights_only(mode, strategy, world):
    """The same model without its inert group: nothing changes but the frozen weights' bytes."""
    with_branch = profile_7b()
    without = with_branch.model_copy(update={"inert_params": 0})
    lora = LoraSpec(targets=QWEN2_LORA_TARGETS) if mode == "lora" else None
    setup = Setup(mode=mode, strategy=strategy, gradient_checkpointing=False, micro_batch=2, world_size=world,
                  lora=lora)
    assert with_branch.total_params - without.total_params == MIMO
    assert with_branch.trainable_params(mode, lora) == without.trainable_params(mode, lora)  # never trained
    assert activation_bytes(with_branch, 2, mode=mode, gradient_checkpointing=False, lora=lora) == \
        activation_bytes(without, 2, mode=mode, gradient_checkpointing=False, lora=lora)  # never computed
    a, b = estimate(with_branch, setup), estimate(without, setup)
    assert {k: a.gpu.get(k, 0) - b.gpu.get(k, 0) for k in ("gradients", "optimizer", "activations")} == \
        {"gradients": 0, "optimizer": 0, "activations": 0}
    frozen = MIMO * 2  # bf16 frozen weights
    if STRATEGIES[strategy].offload_param:
        assert a.host["model_states"] - b.host["model_states"] == pytest.approx(frozen * 1.5, abs=2)
    else:
        assert a.gpu["weights"] - b.gpu["weights"] == pytest.approx(frozen / (world if strategy == "zero3" else 1),
                                                                    abs=1)


# --- plans ----------------------------------------------------------------------------------------------------

# Activations per sample at 295 positions (memory.py's per-term bytes; no checkpointing):
#   one trunk layer  295 x (3584 x (4+2+6+2+8 attention + 4+2 MLP) + 18944 x 8) = 74,311,680
#   28 layers 2,080,727,040 + output 4,229,120 + logits 295 x 168448 x 10 = 496,921,600
#   + (full only) adaptor 287 x (5120 x 2 + 3584 x 8) = 11,167,744; + one layer of backward workspace
#   → 2,656,189,440 per sample under LoRA, 2,667,357,184 in full fine-tuning.
# Host RAM per rank: 3 GB process + 4 loader workers x 0.5 GB = 5 GB.


def h100s(n: int, host_gb: int, cpus: int = 16):
    return detect_resources(gpus=n, gpu_mem_bytes=H100, host_ram_bytes=host_gb * GB, cpu_count=cpus,
                            gpu_name="NVIDIA H100 80GB HBM3", bf16_supported=True)


def gpus_95gb(host_gb: int):
    return detect_resources(gpus=8, gpu_mem_bytes=95 * GB, host_ram_bytes=host_gb * GB, cpu_count=64,
                            gpu_name="PPU-ZW810E", bf16_supported=True)


PLANS = [
    # id, resources, n_clips, requests
    #   -> (world, mode, strategy, batch, grad_accum, max_steps, save_steps, checkpointing, eval_holdout,
    #       GPU GB, pod memory request, pod memory limit)
    (
        # (a) one H100 + 125 GB RAM, 2,000 clips ≤ 15 s. Holdout 5 % = 100 (≥ 16) → 1,900 train, 'large' data.
        # Full fine-tuning: plain/ZeRO need ≥ 130 GB per GPU; ZeRO-3 + optimizer offload needs 7,764,266,496
        # trainable x 16 B x 1.5 = 186.3 GB + 5 GB host > 112.5 GB budget → LoRA r=16 (40,370,176 trainable).
        # LoRA plain: weights 40.4 M x 4 + 9.726 B frozen x 2 = 19.61 GB, grads/AdamW/copies 0.57 GB,
        # activations 16 x 2.656 GB = 42.50 GB, CUDA 1 GB, less the grads/activations overlap 0.16 GB → 63.5 GB;
        # batch 32 would need 106 GB. accum round(32 / 16) = 2; ceil(1900 / 16) = 119 batches → 60 steps x 3
        # epochs = 180; save every ceil(180 / 5) = 36. Pod: host 9,766,334,464 x 2 B x 1.5 + 5 GB = 34.3 GB
        # = 31.9 GiB + /dev/shm 2 GiB → request 34Gi; limit 34.3 GB / 0.9 = 35.5 GiB + 2 → 38Gi.
        "a-1xH100-125GB-2000clips", h100s(1, 125), 2000, {},
        (1, "lora", "plain", 16, 2, 180, 36, False, 100, 63.5, "34Gi", "38Gi"),
    ),
    (
        # (b) 8 H100 + 1 TB, 20,000 clips, full. 19,000 train → 8 ranks. ZeRO-2 at batch 8 fits: 16-bit weights
        # 9,766,334,464 x 2 = 19.53 GB (the mimo branch's 4.0 GB included) + gradients 7.76 B x 6 / 8 = 5.82 GB
        # + master/moments 7.76 B x 12 / 8 = 11.65 GB + activations 8 x 2.667 = 21.34 GB + buckets 0.12 + CUDA 1
        # + NCCL 0.5 = 60.0 GB ≤ 77.0 GB (batch 16 needs 81.3 GB). ZeRO-2 comes before ZeRO-3 in the ladder
        # (no parameter all-gathers), and ZeRO-3 fits too (45.3 GB): the planner picks ZeRO-2, not ZeRO-3.
        # accum max(1, round(32 / 64)) = 1; ceil(ceil(19000 / 8) / 8) = 297 steps x 3 = 891; save every 179.
        # Pod: every rank loads the 16-bit model: 8 x 19.53 GB x 1.5 + 8 x 5 GB = 274.4 GB = 255.5 GiB
        # + /dev/shm 7 GiB (1 + loaders 1.4 + NCCL 8 x 0.5) → 263Gi; limit 274.4 / 0.9 = 283.9 GiB + 7 → 291Gi.
        "b-8xH100-1TB-20000clips-full", h100s(8, 1000, cpus=128), 20000, {"mode": "full"},
        (8, "full", "zero2", 8, 1, 891, 179, False, 1000, 60.0, "263Gi", "291Gi"),
    ),
    (
        # (b') the same on 8 A100 40 GB: ZeRO-2's model states alone (19.53 + 5.82 + 11.65 = 37.0 GB) exceed
        # the 36 GB budget → ZeRO-3. Without checkpointing ZeRO-3 fits only batch 4 (< 8 wanted), with it
        # batch 16: weights 2.44 + gradients 3.88 + master/moments 11.65 + gathered largest layer 2.41
        # + live-parameter cache 2.07 + activations 16 x 0.631 GB (28 fp32 layer inputs 118.4 MB + logits
        # 496.9 MB + adaptor/output 15.4 MB) = 10.10 + CUDA 1 + NCCL 0.5 = 34.1 GB. ceil(1188 / 8) = 149 steps
        # x 3 = 447; save every 90. Pod: ZeRO-3 builds partitioned: 8 x 603,717,632 x 4 B x 1.5 = 29.0 GB
        # + 40 GB = 69.0 GB = 64.2 GiB + /dev/shm 8 GiB → 73Gi; limit 71.4 + 8 → 80Gi.
        "b2-8xA100-40GB-1TB-20000clips-full",
        detect_resources(gpus=8, gpu_mem_bytes=A100_40GB, host_ram_bytes=1000 * GB, cpu_count=128,
                         gpu_name="NVIDIA A100-SXM4-40GB", bf16_supported=True),
        20000, {"mode": "full"},
        (8, "full", "zero3", 16, 1, 447, 90, True, 1000, 34.1, "73Gi", "80Gi"),
    ),
    (
        # (c) 9 clips on 8 GPUs of 95 GB, 125 GB RAM: world = min(8 GPUs, 9 // 32 samples per rank → 1) = 1.
        # Holdout 5 % of 9 = 0 (< 16) → no eval split. 'tiny' data: batch ≤ min(9, 4) = 4, 10 epochs.
        # Full fine-tuning needs 191.3 GB of host RAM (see (a)) → LoRA: 19.61 + 0.57 + 4 x 2.656 + 1 = 31.6 GB.
        # ceil(9 / 4) = 3 steps x 10 epochs = 30; save every 6 (≤ 30); pod as (a) (shm 2 GiB).
        "c-9clips-8x95GB-125GB", gpus_95gb(125), 9, {},
        (1, "lora", "plain", 4, 1, 30, 6, False, 0, 31.6, "34Gi", "38Gi"),
    ),
    (
        # (c) with the run's own settings: batch 1, accumulation 1, 5 epochs, save_steps 1000 → 9 x 5 = 45 steps
        # and save_steps capped at 45, so a checkpoint is written. GPU: 19.61 + 0.57 + 2.656 + 1 = 23.7 GB.
        "c-9clips-8x95GB-125GB-save1000", gpus_95gb(125), 9,
        {"per_device_batch": 1, "grad_accum": 1, "epochs": 5, "save_steps": 1000},
        (1, "lora", "plain", 1, 1, 45, 45, False, 0, 23.7, "34Gi", "38Gi"),
    ),
    (
        # (c) with 1 TB of RAM full fine-tuning fits one 95 GB GPU with the optimizer offloaded: GPU 16-bit
        # weights 19.53 + gathered layer 2.41 + live cache 2.07 + 4 x 2.667 + 1 = 35.7 GB (plain and ZeRO-2/3
        # without offload need ≥ 130 GB); host 186.3 + 5 = 191.3 GB = 178.2 GiB + 2 → 181Gi; limit 198.0 + 2 → 201Gi.
        "c-9clips-8x95GB-1TB", gpus_95gb(1000), 9, {},
        (1, "full", "zero3-offload-opt", 4, 1, 30, 6, False, 0, 35.7, "181Gi", "201Gi"),
    ),
]


@pytest.mark.parametrize("resources, n_clips, requests, expected", [row[1:] for row in PLANS],
                         ids=[row[0] for row in PLANS])
def test_plans(resources, n_clips, requests, expected):
    p = plan(profile_7b(), n_train=n_clips, resources=resources, **requests)
    got = (p.world_size, p.mode, p.strategy, p.per_device_batch, p.grad_accum, p.max_steps, p.save_steps,
           p.gradient_checkpointing, p.eval_holdout, p.chosen.gpu_gb, p.pod.memory_request, p.pod.memory_limit)
    assert got == expected
    assert p.pod.gpus == p.world_size
    assert p.save_steps <= p.max_steps
    assert p.value("save_final") is True
    assert p.chosen.fits


def test_a_full_fine_tuning_is_refused_for_host_ram():
    p = plan(profile_7b(), n_train=2000, resources=h100s(1, 125))
    full = {c.id: c for c in p.candidates if c.mode == "full"}
    assert full and not any(c.fits for c in full.values())
    for name in ("full/zero3-offload-opt", "full/zero3-offload-all"):  # offload fits the GPU, not the host
        assert full[name].fits_gpu and not full[name].fits_host
    assert full["full/zero3-offload-opt"].host_gb == 191.3  # 186.3 GB pinned optimizer state + 5 GB processes
    assert full["full/zero3-offload-all"].host_gb == 220.6  # + 16-bit weights 19.53 GB x 1.5
    reason = p.decision("mode").reason
    assert "host RAM" in reason and "125.0 GB available" in reason and "LoRA r=16" in reason
    assert p.lora == LoraSpec(r=16, alpha=32, targets=QWEN2_LORA_TARGETS, parts=("decoder",))
    assert p.chosen.trainable_params == LORA_R16


def test_b_deepspeed_config_follows_the_strategy():
    p = plan(profile_7b(), n_train=20000, mode="full", resources=h100s(8, 1000, cpus=128))
    assert p.deepspeed_config["zero_optimization"]["stage"] == 2
    assert "scheduler" not in p.deepspeed_config
    rows = {c.id: c for c in p.candidates}
    assert rows["full/zero3"].fits  # ZeRO-3 would fit too; ZeRO-2 is faster and comes first
    forced = plan(profile_7b(), n_train=20000, mode="full", resources=h100s(8, 1000, cpus=128),
                  overrides={"strategy": "zero3"})
    assert forced.strategy == "zero3" and forced.deepspeed_config["zero_optimization"]["stage"] == 3
    assert forced.decision("strategy").overridden is not None


def test_c_nine_clips_on_eight_gpus_train_on_one():
    p = plan(profile_7b(), n_train=9, resources=gpus_95gb(125), per_device_batch=1, grad_accum=1, epochs=5,
             save_steps=1000)
    world = p.decision("world_size")
    assert world.value == 1 and "NCCL" in world.reason and "9 training samples on 8 GPUs" in world.reason
    assert p.value("eval_strategy") == "no" and p.eval_holdout == 0
    assert "1000 > 45 total steps" in p.decision("save_steps").reason
    assert p.value("save_final") is True
