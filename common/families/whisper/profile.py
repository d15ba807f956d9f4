"""The fine-tune planner's view of a Whisper model: its memory profile and its FLOPs, from config.json alone.

    profile = profile_from_hf_config(config, decoder_seq_len=32).with_seq_lens(encoder=300)
    flops = train_flops_per_sample(config, decoder_len=32)

Parameter counts are exact for ``WhisperForConditionalGeneration`` (tied output projection); no weights are
loaded, so a 1.5 B large-v3 is planned in milliseconds. The encoder helpers are shared with families whose
models contain a Whisper encoder (Kimi-Audio).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.families.whisper.conventions import ENCODER_FRAMES, N_FRAMES
from common.training.memory import FP32, HALF, MATMUL_INPUT, LinearGroup, ModelProfile, Stack

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # attention + FFN linears


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _attention_params(d: int) -> int:
    """Whisper attention: q, v, out with bias; k without bias."""
    return 4 * d * d + 3 * d


def _mlp_params(d: int, f: int) -> int:
    return d * f + f + f * d + d  # fc1 + fc2 with biases


def _layer_norm_params(d: int) -> int:
    return 2 * d  # weight + bias


def encoder_params(d: int, layers: int, ffn: int, n_mels: int, positions: int) -> int:
    conv = (n_mels * d * 3 + d) + (d * d * 3 + d)  # conv1 (kernel 3) + conv2 (kernel 3)
    layer = _attention_params(d) + _mlp_params(d, ffn) + 2 * _layer_norm_params(d)
    return conv + positions * d + layers * layer + _layer_norm_params(d)


def encoder_linears(d: int, layers: int, ffn: int) -> list[LinearGroup]:
    linears = [LinearGroup(name=n, part="encoder", in_features=d, out_features=d, count=layers)
               for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
    linears.append(LinearGroup(name="fc1", part="encoder", in_features=d, out_features=ffn, count=layers))
    linears.append(LinearGroup(name="fc2", part="encoder", in_features=ffn, out_features=d, count=layers))
    return linears


def frontend_bytes(d: int, n_mels: int) -> int:
    """Per sample, bf16: mel input copy, conv1 output + GELU output (3000 frames),
    conv2 output + GELU output (1500 frames, the last one fp32 after adding positions)."""
    return (
        n_mels * N_FRAMES * MATMUL_INPUT
        + 2 * d * N_FRAMES * HALF
        + d * ENCODER_FRAMES * (HALF + FP32)
    )


def profile_from_hf_config(
    config: Any, *, name: str | None = None, decoder_seq_len: int | None = None
) -> ModelProfile:
    """Profile of a Hugging Face Whisper model from its config (object or config.json dict).

    Parameter counts are exact for `WhisperForConditionalGeneration` (tied output projection).
    `decoder_seq_len` is the longest label sequence trained on (default: max_target_positions,
    448, an upper bound; pass the data set's longest label for a tighter activation estimate).
    """
    model_type = _cfg(config, "model_type")
    if model_type != "whisper":
        raise ValueError(
            f"profile_from_hf_config supports Whisper configs (model_type 'whisper'), got {model_type!r}; "
            "for Kimi-Audio use kimi_audio_profile()"
        )
    d = int(_cfg(config, "d_model"))
    vocab = int(_cfg(config, "vocab_size"))
    n_mels = int(_cfg(config, "num_mel_bins", 80))
    enc_layers = int(_cfg(config, "encoder_layers"))
    dec_layers = int(_cfg(config, "decoder_layers"))
    enc_ffn = int(_cfg(config, "encoder_ffn_dim"))
    dec_ffn = int(_cfg(config, "decoder_ffn_dim"))
    enc_heads = int(_cfg(config, "encoder_attention_heads"))
    dec_heads = int(_cfg(config, "decoder_attention_heads"))
    src_positions = int(_cfg(config, "max_source_positions", ENCODER_FRAMES))
    tgt_positions = int(_cfg(config, "max_target_positions", 448))
    tied = bool(_cfg(config, "tie_word_embeddings", True))

    encoder = encoder_params(d, enc_layers, enc_ffn, n_mels, src_positions)
    dec_layer = 2 * _attention_params(d) + _mlp_params(d, dec_ffn) + 3 * _layer_norm_params(d)
    decoder = tgt_positions * d + dec_layers * dec_layer + _layer_norm_params(d)
    embeddings = vocab * d
    head = 0 if tied else vocab * d

    linears = encoder_linears(d, enc_layers, enc_ffn)
    # decoder self-attention and cross-attention both name their projections q/k/v/out_proj
    linears += [LinearGroup(name=n, part="decoder", in_features=d, out_features=d, count=2 * dec_layers)
                for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
    linears.append(LinearGroup(name="fc1", part="decoder", in_features=d, out_features=dec_ffn, count=dec_layers))
    linears.append(LinearGroup(name="fc2", part="decoder", in_features=dec_ffn, out_features=d, count=dec_layers))

    seq = min(decoder_seq_len or tgt_positions, tgt_positions)
    stacks = (
        Stack(part="encoder", layers=enc_layers, hidden=d, heads=enc_heads, kv_heads=enc_heads,
              ffn=enc_ffn, gated_mlp=False, seq_len=src_positions),
        Stack(part="decoder", layers=dec_layers, hidden=d, heads=dec_heads, kv_heads=dec_heads,
              ffn=dec_ffn, gated_mlp=False, seq_len=seq, cross_seq_len=src_positions),
    )
    largest = max(vocab, src_positions, tgt_positions, max(enc_ffn, dec_ffn), n_mels * 3, d * 3) * d
    return ModelProfile(
        name=name or _cfg(config, "_name_or_path") or f"whisper-d{d}-L{enc_layers}",
        family="whisper",
        encoder_params=encoder,
        decoder_params=decoder,
        embedding_params=embeddings,
        head_params=head,
        fixed_params=src_positions * d,  # sinusoidal encoder positions: requires_grad=False
        largest_layer_params=largest,
        vocab_size=vocab,
        hidden_size=d,
        stacks=stacks,
        linears=tuple(linears),
        frontend_activation_bytes=frontend_bytes(d, n_mels),
        input_bytes_per_sample=n_mels * N_FRAMES * FP32 + tgt_positions * 8,
        default_lora_targets=LORA_TARGETS,
        default_lora_parts=("encoder", "decoder"),
    )


def forward_flops(config: Any, decoder_len: int, mel_frames: int = 3000) -> int:
    """Forward FLOPs of one sample (2 per multiply-add) of a Whisper encoder-decoder: convolutions,
    projections, attention scores and weighted sums (full T x T, also for the causal decoder), FFNs,
    the decoder's cross-attention keys/values over the encoder frames, and the vocabulary projection.
    Norms, activations and softmax (< 1%) are left out."""
    d = config.d_model
    t_e = mel_frames // 2  # the second convolution has stride 2: 1500 frames for 30 s
    t_d = decoder_len
    conv = 2 * mel_frames * (config.num_mel_bins * 3) * d + 2 * t_e * (d * 3) * d
    enc_layer = 4 * 2 * t_e * d * d + 2 * 2 * t_e * t_e * d + 2 * 2 * t_e * d * config.encoder_ffn_dim
    dec_layer = (4 * 2 * t_d * d * d + 2 * 2 * t_d * t_d * d  # self-attention
                 + 2 * 2 * t_d * d * d + 2 * 2 * t_e * d * d + 2 * 2 * t_d * t_e * d  # cross-attention
                 + 2 * 2 * t_d * d * config.decoder_ffn_dim)
    head = 2 * t_d * d * config.vocab_size
    return conv + config.encoder_layers * enc_layer + config.decoder_layers * dec_layer + head


def train_flops_per_sample(config: Any, decoder_len: int, mel_frames: int = 3000) -> int:
    """Model FLOPs of one training sample: forward + backward = 3 x forward (recomputation not counted)."""
    return 3 * forward_flops(config, decoder_len, mel_frames)
