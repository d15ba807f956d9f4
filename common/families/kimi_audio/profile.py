"""The fine-tune planner's view of Kimi-Audio: the memory profile of the model as asr-ft trains it for ASR.

    profile = profile_from_config(KIMI_AUDIO_7B, llm_seq_len=sequence_length(188, 90, 9))   # 15-s clips
    profile = profile_from_config(KimiAudioConfig.from_json(folder / "config.json"), llm_seq_len=...)
    peft.LoraConfig(target_modules=lora_target_regex(profile.default_lora_targets), ...)    # trunk only
    profile = kimi_audio_profile()          # the GPU benchmarks' ~10 B shape (see its docstring)

Reads: a :class:`KimiAudioConfig` (the LLM's ``config.json``) and the longest training sequence of the data
(``sequence_length``: instruction + codes + transcript + 8 fixed positions). No weights are loaded.
Decides: what training holds and computes, per part of the released model:

    part                                   parameters (7B)  in training memory
    trunk: model.layers.0-27, model.norm   6,525,621,760    trained (full) or frozen under LoRA; computed
    model.embed_tokens                       603,717,632    trained (full) or frozen; a lookup
    lm_head (text head)                      603,717,632    trained (full) or frozen; computed on the scored
                                                            positions
    model.vq_adaptor                          31,209,472    trained (full) or frozen; computed on speech
                                                            positions
    mimo branch: model.mimo_layers.0-5,    2,002,067,968    frozen and never computed: weights only (kept so
      model.mimo_norm, mimo_output                          the exported folder is complete); "inert"
    Whisper-large-v3 encoder                 636,968,960    not held: frozen by default, run once per clip
      (whisper-large-v3/, not in the LLM)                   before training, its stacked features cached;
                                                            held and computed only with train_whisper_encoder
    GLM-4-Voice tokenizer                    ~0.34 B        never: it makes the speech codes at extract time

LoRA targets the trunk's q/k/v/o/gate/up/down projections only (28 x 7 = 196 modules); the mimo layers and
the Whisper encoder have linears of the same names, so a trainee selects them with ``lora_target_regex``,
never by bare name.
Writes: nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from common.families.kimi_audio.conventions import (
    FFN_SIZE,
    HEAD_DIM,
    HIDDEN_SIZE,
    MIMO_LAYERS,
    NUM_HEADS,
    NUM_KV_HEADS,
    NUM_LAYERS,
    STACK,
    VOCAB_SIZE,
    WHISPER_D_MODEL,
    WHISPER_N_MELS,
    KimiAudioConfig,
)
from common.families.kimi_audio.sample import ANSWER_EXTRA, PROMPT_EXTRA, sample_length
from common.families.whisper.conventions import ENCODER_FRAMES, N_FRAMES
from common.families.whisper.profile import encoder_linears, encoder_params, frontend_bytes
from common.training.memory import FP32, HALF, MATMUL_INPUT, NORM_SAVED, LinearGroup, ModelProfile, Stack

QWEN2_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The benchmark shape of kimi_audio_profile(): Kimi-Audio-7B's (conventions.py defines each number once), with
# the 6-layer audio branch counted as trainable layers (what a full fine-tune of every weight would hold).
KIMI_HIDDEN = HIDDEN_SIZE  # 3584
KIMI_LAYERS = NUM_LAYERS + MIMO_LAYERS  # text layers + audio branch: 34
KIMI_HEADS = NUM_HEADS  # 28
KIMI_KV_HEADS = NUM_KV_HEADS  # 4
KIMI_HEAD_DIM = HEAD_DIM  # 128
KIMI_INTERMEDIATE = FFN_SIZE  # 18944
KIMI_VOCAB = VOCAB_SIZE  # 168448
WHISPER_LARGE_V3 = {"d_model": WHISPER_D_MODEL, "layers": 32, "heads": 20, "ffn": 4 * WHISPER_D_MODEL,
                    "n_mels": WHISPER_N_MELS}
KIMI_STACK_FRAMES = STACK  # 50 Hz encoder frames -> 12.5 Hz LLM tokens
KIMI_AUDIO_TOKENS = ENCODER_FRAMES // KIMI_STACK_FRAMES  # 375 for 30 s
KIMI_LLM_SEQ = 512  # 375 audio tokens + prompt + transcript, rounded up


def _qwen2_layer_params(h: int, kv_dim: int, ffn: int) -> int:
    attention = (h * h + h) + 2 * (h * kv_dim + kv_dim) + h * h  # q, k, v with bias; o without
    mlp = 3 * h * ffn  # gate, up, down without bias
    return attention + mlp + 2 * h  # two RMSNorm weights


# --- the model as asr-ft trains it for ASR -------------------------------------------------------------------

FIXED_POSITIONS = PROMPT_EXTRA + ANSWER_EXTRA  # 8: positions of a sample besides instruction, codes, transcript
# One collated position as the DataLoader ships it: audio ids, text ids, labels and attention mask as int64,
# the speech mask as bool.
TOKEN_POSITION_BYTES = 4 * 8 + 1  # 33
# A frozen Whisper encoder runs once per clip before training; its stacked output is cached and shipped in
# 16-bit (the encoder's bf16 output), one kimia_adaptor_input_dim-wide (5120) row per speech position.
CACHED_FEATURE_BYTES = HALF
# Per speech position the adaptor keeps for backward: Linear(5120→3584)'s 16-bit input, SiLU's 16-bit input,
# Linear(3584→3584)'s 16-bit input (SiLU's output), LayerNorm's fp32 input.
ADAPTOR_SAVED_BYTES_PER_HIDDEN = HALF + MATMUL_INPUT + NORM_SAVED  # 8, besides the 5120-wide input


def profile_from_config(
    config: KimiAudioConfig, *, llm_seq_len: int, train_whisper_encoder: bool = False
) -> ModelProfile:
    """The planner's profile of Kimi-Audio as asr-ft trains it for ASR (see the module docstring's table).

    Groups: ``decoder`` = the trunk's layers + final norm, ``embeddings`` = embed_tokens, ``head`` = lm_head,
    ``adaptor`` = vq_adaptor, ``inert`` = the mimo branch (layers, norm, mimo_output: weights only, never
    trained or computed). ``encoder`` = the Whisper-large-v3 encoder only with ``train_whisper_encoder``
    (its sinusoidal positions then ``fixed``); by default it is absent: frozen, it runs once per clip before
    training and the DataLoader ships its cached stacked features instead of log-mel.

    ``llm_seq_len``: the longest training sequence (``sequence_length`` of the longest sample). Speech
    positions are bounded by it less the fixed positions (for the adaptor's activations and the cached
    features). A trained encoder is counted with one 30-s chunk (1500 frames) per sample. The memory model
    keeps text-head logits for every position: an upper bound, as KimiAudioLM's loss runs lm_head on the
    scored positions (transcript + end) only.
    LoRA (default parts: the LLM only) targets the trunk's linears; ``linears`` lists no mimo layer, so no
    LoRA estimate counts them.
    """
    if llm_seq_len < 1:
        raise ValueError(f"llm_seq_len must be >= 1 (the longest training sequence), got {llm_seq_len}")
    h, ffn, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    layers, kv_dim = config.num_hidden_layers, config.kv_heads * config.head_dim
    adaptor_in = config.kimia_adaptor_input_dim
    layer = _qwen2_layer_params(h, kv_dim, ffn)
    # Linear(adaptor_in→h) + bias, Linear(h→h) + bias, LayerNorm(h) weight + bias  # 31,209,472 for the 7B
    adaptor = (adaptor_in * h + h) + (h * h + h) + 2 * h
    mimo = config.kimia_mimo_layers * layer + h + vocab * h  # layers, mimo_norm, mimo_output
    speech_positions = max(1, llm_seq_len - FIXED_POSITIONS)
    tokens_in = llm_seq_len * TOKEN_POSITION_BYTES
    adaptor_activations = speech_positions * (adaptor_in * MATMUL_INPUT + h * ADAPTOR_SAVED_BYTES_PER_HIDDEN)

    linears = [
        LinearGroup(name=name, part="decoder", in_features=i, out_features=o, count=layers)
        for name, i, o in (("q_proj", h, h), ("k_proj", h, kv_dim), ("v_proj", h, kv_dim), ("o_proj", h, h),
                           ("gate_proj", h, ffn), ("up_proj", h, ffn), ("down_proj", ffn, h))
    ]
    stacks = [Stack(part="decoder", layers=layers, hidden=h, heads=config.num_attention_heads,
                    kv_heads=config.kv_heads, ffn=ffn, gated_mlp=True, seq_len=llm_seq_len)]
    largest = max(vocab * h, adaptor_in * h, ffn * h)
    encoder = fixed = 0
    frontend = adaptor_activations
    inputs = tokens_in + speech_positions * adaptor_in * CACHED_FEATURE_BYTES
    if train_whisper_encoder:
        w = WHISPER_LARGE_V3
        if adaptor_in != STACK * w["d_model"]:
            raise ValueError(
                f"train_whisper_encoder: the encoder is Whisper-large-v3's (width {w['d_model']}, {STACK} frames "
                f"stacked = {STACK * w['d_model']}), but this configuration's adaptor takes {adaptor_in}; "
                "train it with a Kimi-Audio-7B configuration or leave the encoder frozen"
            )
        d = w["d_model"]
        encoder = encoder_params(d, w["layers"], w["ffn"], w["n_mels"], ENCODER_FRAMES)
        fixed = ENCODER_FRAMES * d  # sinusoidal positions: requires_grad=False
        linears = encoder_linears(d, w["layers"], w["ffn"]) + linears
        stacks.insert(0, Stack(part="encoder", layers=w["layers"], hidden=d, heads=w["heads"], kv_heads=w["heads"],
                               ffn=w["ffn"], gated_mlp=False, seq_len=ENCODER_FRAMES))
        largest = max(largest, w["ffn"] * d, ENCODER_FRAMES * d, d * d * 3)
        frontend += frontend_bytes(d, w["n_mels"])
        inputs = tokens_in + w["n_mels"] * N_FRAMES * FP32  # one 30-s log-mel chunk
    return ModelProfile(
        name=f"kimi-audio-d{h}-L{layers}" + ("+whisper-encoder" if train_whisper_encoder else ""),
        family="kimi-audio",
        encoder_params=encoder,
        decoder_params=layers * layer + h,  # + final RMSNorm
        embedding_params=vocab * h,
        head_params=vocab * h,  # lm_head, untied (KimiAudioConfig refuses tied heads)
        adaptor_params=adaptor,
        fixed_params=fixed,
        inert_params=mimo,
        largest_layer_params=largest,
        vocab_size=vocab,
        hidden_size=h,
        stacks=tuple(stacks),
        linears=tuple(linears),
        frontend_activation_bytes=frontend,
        input_bytes_per_sample=inputs,
        default_lora_targets=QWEN2_LORA_TARGETS,
        default_lora_parts=("decoder",),
    )


def sequence_length(n_codes: int, n_transcript_ids: int, n_instruction_ids: int) -> int:
    """LLM positions of one ASR training sample (common.families.kimi_audio.sample's layout): instruction +
    codes + transcript + 8 fixed positions. ``n_codes`` = stacked_frames(samples) of the clip."""
    return sample_length(n_instruction_ids, n_codes, n_transcript_ids)


def lora_target_regex(targets: Sequence[str] = QWEN2_LORA_TARGETS) -> str:
    """peft ``target_modules`` (a regex peft matches against whole module names) for ``targets`` in the trunk
    only: ``model.layers.<i>.self_attn.*`` / ``model.layers.<i>.mlp.*``. Bare names would also wrap the mimo
    layers' (and a Whisper encoder's) modules of the same names."""
    unknown = sorted(set(targets) - set(QWEN2_LORA_TARGETS))
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not trunk linears of Kimi-Audio; choose from "
                         f"{list(QWEN2_LORA_TARGETS)}")
    names = "|".join(re.escape(t) for t in targets)
    return rf"model\.layers\.\d+\.(self_attn|mlp)\.({names})"


# --- the GPU benchmarks' shape ------------------------------------------------------------------------------


def kimi_audio_profile(
    *, llm_seq_len: int = KIMI_LLM_SEQ, output_heads: int = 1, llm_layers: int = KIMI_LAYERS
) -> ModelProfile:
    """The ~10 B Kimi-Audio-shaped model the GPU benchmarks build (see constants above): all 34 layers
    computed in one stack, the Whisper encoder inside the model. To plan a Kimi-Audio fine-tune use
    ``profile_from_config`` (the mimo branch frozen and not computed, the encoder's features cached).

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


