"""Memory model: exact parameter counts, DeepSpeed's own estimators, activation behaviour."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig, WhisperForConditionalGeneration  # noqa: E402
from transformers.models.whisper.modeling_whisper import WhisperEncoder  # noqa: E402

from common.families.kimi_audio.profile import (  # noqa: E402
    KIMI_HEADS,
    KIMI_HIDDEN,
    KIMI_INTERMEDIATE,
    KIMI_KV_HEADS,
    KIMI_LAYERS,
    KIMI_VOCAB,
    kimi_audio_profile,
)
from common.families.whisper.profile import profile_from_hf_config  # noqa: E402
from common.training.memory import (  # noqa: E402
    GB,
    STRATEGIES,
    LoraSpec,
    Setup,
    activation_bytes,
    estimate,
    model_states_bytes,
)

TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 3}
WHISPER_SHAPES = {
    "tiny-test": dict(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=96, vocab_size=300,
                      num_mel_bins=80, max_source_positions=1500, max_target_positions=448),
    "whisper-base": dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                         decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                         vocab_size=51865, num_mel_bins=80),
    "whisper-large-v3": dict(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                             decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120,
                             vocab_size=51866, num_mel_bins=128),
}


def whisper_config(shape: str) -> WhisperConfig:
    return WhisperConfig(**WHISPER_SHAPES[shape], **TOKENS)


def meta_whisper(config: WhisperConfig) -> WhisperForConditionalGeneration:
    with torch.device("meta"):
        return WhisperForConditionalGeneration(config)


# --- parameter counts ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(WHISPER_SHAPES))
def test_whisper_parameter_groups_match_the_model(shape):
    config = whisper_config(shape)
    model = meta_whisper(config)
    profile = profile_from_hf_config(config)
    named = dict(model.named_parameters())
    encoder = sum(p.numel() for n, p in named.items() if n.startswith("model.encoder."))
    embeddings = model.model.decoder.embed_tokens.weight.numel()

    assert profile.total_params == sum(p.numel() for p in model.parameters())
    assert profile.encoder_params == encoder
    assert profile.embedding_params == embeddings
    assert profile.head_params == 0  # proj_out is tied to the token embeddings
    assert profile.trainable_params("full") == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert profile.trainable_params("freeze-encoder") == profile.total_params - encoder
    assert profile.largest_layer_params == max(p.numel() for p in model.parameters())


def test_whisper_base_is_the_known_size():
    assert profile_from_hf_config(whisper_config("whisper-base")).total_params == 72_593_920


def test_profile_accepts_a_config_dict_and_rejects_other_models():
    config = whisper_config("tiny-test")
    assert profile_from_hf_config(config.to_dict()).total_params == profile_from_hf_config(config).total_params
    with pytest.raises(ValueError, match="kimi_audio_profile"):
        profile_from_hf_config({"model_type": "qwen2"})


@pytest.mark.parametrize(
    "targets",
    [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), ("fc2",)],
)
def test_lora_parameter_count_matches_peft(targets):
    from peft import LoraConfig, get_peft_model

    config = whisper_config("tiny-test")
    profile = profile_from_hf_config(config)
    model = get_peft_model(meta_whisper(config), LoraConfig(r=8, lora_alpha=16, target_modules=list(targets)))
    peft_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert profile.trainable_params("lora", LoraSpec(r=8, targets=targets)) == peft_trainable


def test_unknown_lora_target_says_what_exists():
    profile = profile_from_hf_config(whisper_config("tiny-test"))
    with pytest.raises(ValueError, match="choose from"):
        profile.lora_params(16, ["gate_proj"])


def test_kimi_profile_matches_the_model_it_describes():
    """Qwen2 LLM (34 layers, untied head) + Whisper-large-v3 encoder + linear adaptor, on meta."""
    llm_config = Qwen2Config(
        hidden_size=KIMI_HIDDEN, num_hidden_layers=KIMI_LAYERS, num_attention_heads=KIMI_HEADS,
        num_key_value_heads=KIMI_KV_HEADS, intermediate_size=KIMI_INTERMEDIATE, vocab_size=KIMI_VOCAB,
        tie_word_embeddings=False,
    )
    encoder_config = whisper_config("whisper-large-v3")
    with torch.device("meta"):
        llm = Qwen2ForCausalLM(llm_config)
        encoder = WhisperEncoder(encoder_config)
        adaptor = torch.nn.Linear(4 * encoder_config.d_model, KIMI_HIDDEN)
    profile = kimi_audio_profile()
    n = {name: sum(p.numel() for p in m.parameters()) for name, m in
         (("llm", llm), ("encoder", encoder), ("adaptor", adaptor))}

    assert profile.total_params == n["llm"] + n["encoder"] + n["adaptor"]
    assert profile.encoder_params == n["encoder"]
    assert profile.adaptor_params == n["adaptor"]
    assert profile.head_params == llm.lm_head.weight.numel() == profile.embedding_params
    assert 9.5e9 < profile.total_params < 10.5e9  # "~10 B"

    from peft import LoraConfig, get_peft_model

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    small = Qwen2Config(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=96, vocab_size=100, tie_word_embeddings=False)
    with torch.device("meta"):
        peft_model = get_peft_model(Qwen2ForCausalLM(small), LoraConfig(r=16, target_modules=list(targets)))
    per_layer_peft = sum(p.numel() for p in peft_model.parameters() if p.requires_grad) // 3
    kv = 2 * 64 // 4
    per_layer_formula = 16 * (2 * (64 + 64) + 2 * (64 + kv) + 2 * (64 + 96) + (96 + 64))
    assert per_layer_peft == per_layer_formula
    h, f, kv = KIMI_HIDDEN, KIMI_INTERMEDIATE, KIMI_KV_HEADS * (KIMI_HIDDEN // KIMI_HEADS)
    expected = KIMI_LAYERS * 16 * (2 * (h + h) + 2 * (h + kv) + 2 * (h + f) + (f + h))
    assert profile.trainable_params("lora", LoraSpec(r=16, targets=targets)) == expected  # LLM only


# --- model states vs DeepSpeed's own estimators ------------------------------------------------------

# (total params, largest layer params, GPUs on one node)
DEEPSPEED_CASES = [
    (75_000_000, 26_000_000, 1),
    (1_550_000_000, 66_000_000, 1),
    (1_550_000_000, 66_000_000, 4),
    (7_000_000_000, 545_000_000, 2),
    (9_786_726_400, 603_717_632, 1),
    (9_786_726_400, 603_717_632, 8),
    (70_000_000_000, 1_050_000_000, 8),
]


def within(ours: float, theirs: float, tolerance: float = 0.10) -> bool:
    return abs(ours - theirs) <= tolerance * theirs


@pytest.mark.parametrize("params, largest, gpus", DEEPSPEED_CASES)
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_match_deepspeed(params, largest, gpus, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus, cpu_offload=offload)
    strategy = STRATEGIES["zero2-offload-opt" if offload else "zero2"]
    gpu, host = model_states_bytes(params, params, strategy=strategy, world_size=gpus,
                                   largest_layer_params=largest)
    assert within(sum(gpu.values()), ds_gpu), (gpu, ds_gpu)
    assert within(sum(host.values()), ds_cpu), (host, ds_cpu)


@pytest.mark.parametrize("params, largest, gpus", DEEPSPEED_CASES)
@pytest.mark.parametrize(
    "strategy, offload, offload_params",
    [("zero3", False, False), ("zero3-offload-opt", True, False), ("zero3-offload-all", True, True)],
)
def test_zero3_model_states_match_deepspeed(params, largest, gpus, strategy, offload, offload_params):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        params, largest, num_gpus_per_node=gpus, cpu_offload=offload, cpu_offload_params=offload_params,
    )
    gpu, host = model_states_bytes(params, params, strategy=STRATEGIES[strategy], world_size=gpus,
                                   largest_layer_params=largest)
    assert within(sum(gpu.values()), ds_gpu), (gpu, ds_gpu)
    assert within(sum(host.values()), ds_cpu), (host, ds_cpu)


def test_ten_billion_offload_needs_the_host_ram_the_seed_lacked():
    """~250-280 GB of host RAM for a 10 B full fine-tune with offload (DESIGN.md, issue 5)."""
    p = kimi_audio_profile()
    _, opt = model_states_bytes(p.total_params, p.total_params, strategy=STRATEGIES["zero3-offload-opt"],
                                largest_layer_params=p.largest_layer_params)
    _, both = model_states_bytes(p.total_params, p.total_params, strategy=STRATEGIES["zero3-offload-all"],
                                 largest_layer_params=p.largest_layer_params)
    assert 225 * GB < opt["model_states"] < 250 * GB
    assert 250 * GB < both["model_states"] < 280 * GB
    assert both["model_states"] > 125 * GB * 2  # twice what the seed's node had


@pytest.mark.parametrize(
    "strategy, per_param_gpu",
    [("plain", 18), ("zero2", 2 + 18), ("zero3", 18)],
)
def test_single_gpu_bytes_per_parameter(strategy, per_param_gpu):
    p = kimi_audio_profile()
    e = estimate(p, Setup(mode="full", strategy=strategy, gradient_checkpointing=False, micro_batch=1))
    states = e.gpu_bytes - e.gpu["activations"] - e.gpu["cuda_context"] - e.gpu.get("deepspeed_buffers", 0)
    states -= e.gpu.get("working_layer", 0) + e.gpu.get("gradient_activation_overlap", 0)
    assert states == pytest.approx(per_param_gpu * p.total_params, rel=0.01)


def test_plain_peak_holds_the_larger_of_activations_and_gradients():
    p = profile_from_hf_config(whisper_config("whisper-base"), decoder_seq_len=64)
    for batch in (1, 64):  # gradients dominate at batch 1, activations at 64
        e = estimate(p, Setup(mode="full", strategy="plain", gradient_checkpointing=False, micro_batch=batch))
        without_both = e.gpu_bytes - e.gpu["activations"] - e.gpu["gradients"] - e.gpu["gradient_activation_overlap"]
        assert e.gpu_bytes == without_both + max(e.gpu["activations"], e.gpu["gradients"])


# --- activations --------------------------------------------------------------------------------------


def test_activations_scale_with_batch_and_shrink_with_checkpointing():
    p = profile_from_hf_config(whisper_config("whisper-base"), decoder_seq_len=128)
    one = activation_bytes(p, 1, mode="full", gradient_checkpointing=False)
    assert activation_bytes(p, 8, mode="full", gradient_checkpointing=False) == 8 * one
    assert activation_bytes(p, 1, mode="full", gradient_checkpointing=True) < one / 2
    frozen = activation_bytes(p, 1, mode="freeze-encoder", gradient_checkpointing=False)
    assert frozen < one / 2  # the encoder (1500 frames) dominates; frozen it keeps only its output


def test_lora_on_the_decoder_only_keeps_no_encoder_activations():
    p = kimi_audio_profile()
    decoder_only = LoraSpec(targets=("q_proj",), parts=("decoder",))
    both = LoraSpec(targets=("q_proj",), parts=("encoder", "decoder"))
    assert activation_bytes(p, 1, mode="lora", gradient_checkpointing=False, lora=decoder_only) == \
        activation_bytes(p, 1, mode="freeze-encoder", gradient_checkpointing=False)
    assert activation_bytes(p, 1, mode="lora", gradient_checkpointing=False, lora=both) == \
        activation_bytes(p, 1, mode="full", gradient_checkpointing=False)


# Peak torch.cuda.max_memory_allocated() measured on one H100 80GB (torch 2.11, transformers 5.17):
# random Whisper models, 30-s inputs, 64-token labels, fp32 weights + bf16 autocast + fused AdamW
# (`pytest -m gpu tests/gpu/test_memory_calibration.py`, which prints these lines).
H100_MEASURED = [  # shape, mode, checkpointing, batch, GB
    ("whisper-base", "full", False, 32, 10.28),
    ("whisper-base", "full", True, 32, 3.32),
    ("whisper-base", "freeze-encoder", False, 32, 3.46),
    ("whisper-base", "lora", False, 32, 9.17),
    ("whisper-large-v3", "full", False, 8, 48.62),
    ("whisper-large-v3", "full", False, 16, 74.53),
    ("whisper-large-v3", "full", True, 16, 28.46),
]


@pytest.mark.parametrize("shape, mode, checkpointing, batch, measured_gb", H100_MEASURED)
def test_estimate_matches_h100_measurements(shape, mode, checkpointing, batch, measured_gb):
    from common.training.memory import CUDA_CONTEXT_BYTES

    p = profile_from_hf_config(whisper_config(shape), decoder_seq_len=64)
    lora = LoraSpec(targets=p.default_lora_targets) if mode == "lora" else None
    e = estimate(p, Setup(mode=mode, strategy="plain", gradient_checkpointing=checkpointing, micro_batch=batch,
                          lora=lora))
    ratio = (e.gpu_bytes - CUDA_CONTEXT_BYTES) / (measured_gb * GB)  # max_memory_allocated excludes the context
    assert 0.90 <= ratio <= 1.20


def test_with_seq_lens_changes_only_the_sequences():
    p = profile_from_hf_config(whisper_config("whisper-base"))
    q = p.with_seq_lens(decoder=64)
    assert q.total_params == p.total_params
    assert [s.seq_len for s in q.stacks] == [1500, 64]
    assert activation_bytes(q, 1, mode="full", gradient_checkpointing=False) < \
        activation_bytes(p, 1, mode="full", gradient_checkpointing=False)


def test_deepspeed_on_cpu_is_refused():
    p = profile_from_hf_config(whisper_config("tiny-test"))
    with pytest.raises(ValueError, match="CUDA"):
        estimate(p, Setup(mode="full", strategy="zero2", gradient_checkpointing=False, micro_batch=1,
                          device="cpu", precision="fp32"))


def test_cpu_training_counts_everything_as_host_memory():
    p = profile_from_hf_config(whisper_config("whisper-base"), decoder_seq_len=64)
    e = estimate(p, Setup(mode="full", strategy="plain", gradient_checkpointing=False, micro_batch=8,
                          device="cpu", precision="fp32"))
    assert e.gpu_bytes == 0
    assert e.host["train_weights"] == 4 * p.total_params
    assert e.host["train_optimizer"] == 8 * p.trainable_params("full")  # not the frozen positions
    assert "train_autocast_copies" not in e.host
