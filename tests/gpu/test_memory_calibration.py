"""The memory model's GPU estimate vs the peak PyTorch really allocates, on random Whisper models of
real shapes (30-s inputs), trained the way the Hugging Face Trainer does it without DeepSpeed: fp32
weights, bf16 autocast, SDPA attention, fused AdamW, zero_grad(set_to_none=True).

The estimate (minus the CUDA context, which max_memory_allocated does not see) must lie within
-10% / +25% of the measured peak: a little over is the safe side for a planner.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from common.families.whisper.profile import profile_from_hf_config
from common.training.memory import CUDA_CONTEXT_BYTES, GB, LoraSpec, Setup, estimate

pytestmark = pytest.mark.gpu

SHAPES = {
    "whisper-base": dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                         decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, num_mel_bins=80,
                         vocab_size=51865),
    "whisper-small": dict(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                          decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, num_mel_bins=80,
                          vocab_size=51865),
    "whisper-large-v3": dict(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                             decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120,
                             num_mel_bins=128, vocab_size=51866),
}
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 3}
LABEL_TOKENS = 64

CASES = [
    ("whisper-base", "full", False, 32),
    ("whisper-base", "full", True, 32),
    ("whisper-base", "freeze-encoder", False, 32),
    ("whisper-base", "lora", False, 32),
    ("whisper-small", "full", False, 16),
    ("whisper-large-v3", "full", False, 8),
    ("whisper-large-v3", "full", True, 16),
    ("whisper-large-v3", "full", False, 16),  # DESIGN.md's Trainer figure: 68.6 GB
]


def measure_peak(shape: str, mode: str, checkpointing: bool, batch: int) -> int:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(**SHAPES[shape], **TOKENS)
    with torch.device("cuda"):
        model = WhisperForConditionalGeneration(config)  # random weights, fp32 (the master copy)
    if mode == "freeze-encoder":
        model.model.encoder.requires_grad_(False)
        model.model.encoder.to(torch.bfloat16)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = model.to(torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(
            ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode == "lora":
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    features = torch.randn(batch, config.num_mel_bins, 3000, device="cuda")
    labels = torch.randint(4, config.vocab_size, (batch, LABEL_TOKENS), device="cuda")
    for step in range(3):
        if step == 1:  # optimizer state exists from here on: measure the steady state
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_features=features, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, optimizer, features, labels
    torch.cuda.empty_cache()
    return peak


@pytest.mark.parametrize("shape, mode, checkpointing, batch", CASES)
def test_gpu_estimate_brackets_the_measured_peak(shape, mode, checkpointing, batch, record_property):
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA GPU (run them on the GPU machine: pytest -m gpu tests/gpu)")
    from transformers import WhisperConfig

    profile = profile_from_hf_config(WhisperConfig(**SHAPES[shape], **TOKENS), decoder_seq_len=LABEL_TOKENS)
    lora = LoraSpec(targets=profile.default_lora_targets) if mode == "lora" else None
    est = estimate(profile, Setup(mode=mode, strategy="plain", gradient_checkpointing=checkpointing,
                                  micro_batch=batch, lora=lora, load_bytes=2 if mode == "lora" else 4))
    predicted = est.gpu_bytes - CUDA_CONTEXT_BYTES
    measured = measure_peak(shape, mode, checkpointing, batch)
    ratio = predicted / measured
    line = {"shape": shape, "mode": mode, "checkpointing": checkpointing, "batch": batch,
            "measured_gb": round(measured / GB, 2), "estimated_gb": round(predicted / GB, 2),
            "ratio": round(ratio, 3), "device": torch.cuda.get_device_name()}
    print("MEMORY_CALIBRATION", json.dumps(line))
    if os.environ.get("MEMORY_CALIBRATION_OUT"):
        with open(os.environ["MEMORY_CALIBRATION_OUT"], "a") as f:
            f.write(json.dumps(line) + "\n")
    record_property("calibration", line)
    assert 0.90 <= ratio <= 1.25, line


# --- Kimi-Audio shape: Whisper-large-v3 encoder -> linear adaptor -> Qwen2-style LLM (fewer layers) ---

KIMI_CASES = [  # LLM layers, mode, checkpointing, batch; the encoder is calibrated above
    (4, "freeze-encoder", False, 8),
    (4, "freeze-encoder", True, 8),
    (16, "lora", False, 8),
]


class ToyKimi(torch.nn.Module):
    """The bench's Kimi shape at reduced depth: encoder frames stacked 4x (12.5 Hz) through a linear
    adaptor and added to the first 375 token embeddings of a 512-token sequence."""

    def __init__(self, llm_layers: int):
        from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        from common.families.kimi_audio.profile import (
            KIMI_HEADS,
            KIMI_HIDDEN,
            KIMI_INTERMEDIATE,
            KIMI_KV_HEADS,
            KIMI_STACK_FRAMES,
            KIMI_VOCAB,
        )

        super().__init__()
        self.encoder = WhisperEncoder(WhisperConfig(**SHAPES["whisper-large-v3"], **TOKENS))
        self.adaptor = torch.nn.Linear(1280 * KIMI_STACK_FRAMES, KIMI_HIDDEN)
        self.llm = Qwen2ForCausalLM(Qwen2Config(
            hidden_size=KIMI_HIDDEN, num_hidden_layers=llm_layers, num_attention_heads=KIMI_HEADS,
            num_key_value_heads=KIMI_KV_HEADS, intermediate_size=KIMI_INTERMEDIATE, vocab_size=KIMI_VOCAB,
            tie_word_embeddings=False, attn_implementation="sdpa"))

    def forward(self, input_features, input_ids, labels):
        frames = self.encoder(input_features).last_hidden_state
        audio = self.adaptor(frames.reshape(frames.shape[0], -1, frames.shape[-1] * 4))
        embeds = self.llm.get_input_embeddings()(input_ids)
        n = audio.shape[1]
        embeds = torch.cat([embeds[:, :n] + audio, embeds[:, n:]], dim=1)
        return self.llm(inputs_embeds=embeds, labels=labels).loss


def measure_kimi_peak(layers: int, mode: str, checkpointing: bool, batch: int, seq: int) -> int:
    from common.families.kimi_audio.profile import KIMI_VOCAB

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = ToyKimi(layers)
    if mode == "freeze-encoder":
        model.encoder.requires_grad_(False)
        model.encoder.to(torch.bfloat16)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = model.to(torch.bfloat16)
        model.llm = get_peft_model(model.llm, LoraConfig(r=16, lora_alpha=32, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        model.encoder.requires_grad_(False)
        model.adaptor.requires_grad_(False)
    if checkpointing:
        for part in (model.encoder, model.llm) if mode == "full" else (model.llm,):
            part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    features = torch.randn(batch, 128, 3000, device="cuda")
    ids = torch.randint(0, KIMI_VOCAB, (batch, seq), device="cuda")
    for step in range(3):
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(features, ids, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, optimizer
    torch.cuda.empty_cache()
    return peak


@pytest.mark.parametrize("layers, mode, checkpointing, batch", KIMI_CASES)
def test_kimi_shape_estimate_brackets_the_measured_peak(layers, mode, checkpointing, batch):
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA GPU (run them on the GPU machine: pytest -m gpu tests/gpu)")
    from common.families.kimi_audio.profile import KIMI_LLM_SEQ, kimi_audio_profile

    profile = kimi_audio_profile(llm_layers=layers)
    lora = LoraSpec(targets=profile.default_lora_targets) if mode == "lora" else None
    est = estimate(profile, Setup(mode=mode, strategy="plain", gradient_checkpointing=checkpointing,
                                  micro_batch=batch, lora=lora, load_bytes=2 if mode == "lora" else 4))
    predicted = est.gpu_bytes - CUDA_CONTEXT_BYTES
    measured = measure_kimi_peak(layers, mode, checkpointing, batch, KIMI_LLM_SEQ)
    ratio = predicted / measured
    line = {"shape": f"kimi-{layers}L", "mode": mode, "checkpointing": checkpointing, "batch": batch,
            "measured_gb": round(measured / GB, 2), "estimated_gb": round(predicted / GB, 2),
            "ratio": round(ratio, 3), "device": torch.cuda.get_device_name()}
    print("MEMORY_CALIBRATION", json.dumps(line))
    if os.environ.get("MEMORY_CALIBRATION_OUT"):
        with open(os.environ["MEMORY_CALIBRATION_OUT"], "a") as f:
            f.write(json.dumps(line) + "\n")
    assert 0.90 <= ratio <= 1.25, line
