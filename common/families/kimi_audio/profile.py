"""The fine-tune planner's view of Kimi-Audio-7B: its memory profile from the published configuration.

    profile = kimi_audio_profile()          # ~10 B: Qwen2.5-7B-style LLM + audio branch + Whisper-large-v3 encoder

Used by the planner tests and the GPU benchmarks to plan the model whose size drives asr-ft's memory
decisions (offload needs ~250-280 GB of host RAM; LoRA fits one 80 GB GPU). This package holds the planner's
profile only: ``kimi-audio`` is not a registered model family (common/families/__init__.py lists those).
"""

from __future__ import annotations

from common.families.whisper.conventions import ENCODER_FRAMES, N_FRAMES
from common.families.whisper.profile import encoder_linears, encoder_params, frontend_bytes
from common.training.memory import FP32, MATMUL_INPUT, LinearGroup, ModelProfile, Stack

QWEN2_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Kimi-Audio-7B shape: a Qwen2.5-7B-style LLM (28 layers) with a 6-layer audio branch, vocab 168448,
# untied output head; Whisper-large-v3 encoder features (50 Hz) stacked 4x to 12.5 Hz and fed to the
# LLM through a linear adaptor.
KIMI_HIDDEN = 3584
KIMI_LAYERS = 28 + 6  # text layers + audio branch  # 34
KIMI_HEADS = 28
KIMI_KV_HEADS = 4
KIMI_HEAD_DIM = KIMI_HIDDEN // KIMI_HEADS  # 128
KIMI_INTERMEDIATE = 18944
KIMI_VOCAB = 168448
WHISPER_LARGE_V3 = {"d_model": 1280, "layers": 32, "heads": 20, "ffn": 5120, "n_mels": 128}
KIMI_STACK_FRAMES = 4  # 50 Hz encoder frames -> 12.5 Hz LLM tokens
KIMI_AUDIO_TOKENS = ENCODER_FRAMES // KIMI_STACK_FRAMES  # 375 for 30 s
KIMI_LLM_SEQ = 512  # 375 audio tokens + prompt + transcript, rounded up


def _qwen2_layer_params(h: int, kv_dim: int, ffn: int) -> int:
    attention = (h * h + h) + 2 * (h * kv_dim + kv_dim) + h * h  # q, k, v with bias; o without
    mlp = 3 * h * ffn  # gate, up, down without bias
    return attention + mlp + 2 * h  # two RMSNorm weights


def kimi_audio_profile(
    *, llm_seq_len: int = KIMI_LLM_SEQ, output_heads: int = 1, llm_layers: int = KIMI_LAYERS
) -> ModelProfile:
    """The ~10 B Kimi-Audio-shaped model (see constants above).

    `output_heads=1` is the shape the benchmarks build (one untied head); the released checkpoint
    also has a second head for audio tokens (`output_heads=2`, +0.6 B). `llm_layers` builds shallower
    variants of the same widths (memory calibration on one GPU).
    """
    h, ffn, vocab = KIMI_HIDDEN, KIMI_INTERMEDIATE, KIMI_VOCAB
    kv_dim = KIMI_KV_HEADS * KIMI_HEAD_DIM  # 512
    w = WHISPER_LARGE_V3
    d = w["d_model"]
    encoder = encoder_params(d, w["layers"], w["ffn"], w["n_mels"], ENCODER_FRAMES)
    adaptor_in = d * KIMI_STACK_FRAMES  # 5120
    adaptor = adaptor_in * h + h
    decoder = llm_layers * _qwen2_layer_params(h, kv_dim, ffn) + h  # + final RMSNorm
    linears = encoder_linears(d, w["layers"], w["ffn"])
    linears += [
        LinearGroup(name="q_proj", part="decoder", in_features=h, out_features=h, count=llm_layers),
        LinearGroup(name="k_proj", part="decoder", in_features=h, out_features=kv_dim, count=llm_layers),
        LinearGroup(name="v_proj", part="decoder", in_features=h, out_features=kv_dim, count=llm_layers),
        LinearGroup(name="o_proj", part="decoder", in_features=h, out_features=h, count=llm_layers),
        LinearGroup(name="gate_proj", part="decoder", in_features=h, out_features=ffn, count=llm_layers),
        LinearGroup(name="up_proj", part="decoder", in_features=h, out_features=ffn, count=llm_layers),
        LinearGroup(name="down_proj", part="decoder", in_features=ffn, out_features=h, count=llm_layers),
    ]
    stacks = (
        Stack(part="encoder", layers=w["layers"], hidden=d, heads=w["heads"], kv_heads=w["heads"],
              ffn=w["ffn"], gated_mlp=False, seq_len=ENCODER_FRAMES),
        Stack(part="decoder", layers=llm_layers, hidden=h, heads=KIMI_HEADS, kv_heads=KIMI_KV_HEADS,
              ffn=ffn, gated_mlp=True, seq_len=llm_seq_len),
    )
    adaptor_activations = KIMI_AUDIO_TOKENS * (adaptor_in * MATMUL_INPUT + h * FP32)
    return ModelProfile(
        name=f"kimi-audio-shape-{llm_layers}L" + ("" if output_heads == 1 else f"-{output_heads}heads"),
        family="kimi-audio",
        encoder_params=encoder,
        decoder_params=decoder,
        embedding_params=vocab * h,
        head_params=output_heads * vocab * h,
        adaptor_params=adaptor,
        fixed_params=ENCODER_FRAMES * d,
        largest_layer_params=vocab * h,
        vocab_size=vocab,
        hidden_size=h,
        stacks=stacks,
        linears=tuple(linears),
        frontend_activation_bytes=frontend_bytes(d, w["n_mels"]) + adaptor_activations,
        input_bytes_per_sample=w["n_mels"] * N_FRAMES * FP32 + llm_seq_len * 8,
        default_lora_targets=QWEN2_LORA_TARGETS,
        default_lora_parts=("decoder",),
    )


