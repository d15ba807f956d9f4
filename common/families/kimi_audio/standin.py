"""A random stand-in for a Kimi-Audio-7B(-Instruct) model folder: the real layout, vocabulary and token ids at
toy widths, so every path (pretrained, finetune, export, evaluate) runs here without the 20-GB download.

    folder = build_standin(tmp / "kimi-standin", seed=0)   # ~35 MB, about a second; same seed → same bytes
    engine, used = open_engine(folder, EngineRequest())    # transcribes, but its words mean nothing

Reads: nothing (the text tokenizer is the pinned stand-in BPE, so the folder has no tiktoken.model).
Decides: the stand-in's shape (:data:`STANDIN_CONFIG`) and its random weights, drawn from ``seed`` alone.
Writes: ``folder`` in the layout of :mod:`common.families.kimi_audio.folder`:

    config.json                              every field of the published config.json, at the toy widths
    model-00001-of-00002.safetensors         trunk, audio branch, embeddings, adaptor (bfloat16, as released)
    model-00002-of-00002.safetensors         lm_head and mimo_output
    model.safetensors.index.json             the shard map, as in the download
    whisper-large-v3/                        a Hugging Face WhisperModel of width 8 (128 mels, 1500 positions)
    glm-4-voice-tokenizer/                   GlmSpeechTokenizer.tiny(seed) (32 codes)
    STANDIN.txt                              says the weights are random and the CER meaningless

What is real: the vocabulary (168448 rows: Qwen's text ids, the 421 special ids, codes at +152064), every
special id, the prompt, the 12.5-Hz geometry (4 stacked frames of a 1500-position, 128-mel encoder), the
parameter names, GQA, the audio branch and its position in the trunk. What is not: the widths and every
weight value. Weights are drawn with one seeded generator in a fixed order (parameter names sorted), so the
same seed gives byte-identical files with any torch build that draws the same normal numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from common.families.kimi_audio.conventions import (
    MAX_POSITIONS,
    RMS_NORM_EPS,
    ROPE_THETA,
    STACK,
    VOCAB_SIZE,
    WHISPER_N_MELS,
    WHISPER_SUBFOLDER,
    KimiAudioConfig,
)
from common.families.kimi_audio.folder import CONFIG_FILE, GLM_SUBFOLDER, INDEX_FILE, STANDIN_FILE
from common.families.kimi_audio.tokenizer import BOS, EOS, MSG_END
from common.families.whisper.conventions import ENCODER_FRAMES, MAX_TARGET_POSITIONS

STANDIN_WHISPER_WIDTH = 8  # the stand-in encoder's d_model: 4 stacked frames give the adaptor 32 values
STANDIN_WHISPER_VOCAB = 51_866  # Whisper-large-v3's decoder vocabulary (the decoder is never run; 1.7 MB)
STANDIN_CONFIG = KimiAudioConfig(
    vocab_size=VOCAB_SIZE,  # 168448: the real vocabulary, so real token ids work
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA 4:2, as the real 28:4 shares key/value heads
    rms_norm_eps=RMS_NORM_EPS,
    rope_theta=ROPE_THETA,
    max_position_embeddings=MAX_POSITIONS,
    kimia_mimo_layers=1,
    kimia_mimo_transformer_from_layer_index=0,
    kimia_adaptor_input_dim=STACK * STANDIN_WHISPER_WIDTH,  # 32
)
WEIGHT_DTYPE = "bfloat16"  # the released checkpoint's dtype (torch_dtype in its config.json)
# The published config.json's fields that KimiAudioConfig does not read, kept so the file looks like the real one.
PUBLISHED_EXTRA = {
    "architectures": ["MoonshotKimiaForCausalLM"],
    "model_type": "kimi_audio",
    "bos_token_id": BOS,
    "eos_token_ids": [EOS, MSG_END],
    "max_window_layers": STANDIN_CONFIG.num_hidden_layers,
    "sliding_window": 4096,
    "torch_dtype": WEIGHT_DTYPE,
    "use_cache": True,
}
HEAD_SHARD_KEYS = ("lm_head.weight", "mimo_output.weight")  # the second shard (the first holds everything else)
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
WHISPER_WEIGHTS = "model.safetensors"
NOTE = """\
RANDOM STAND-IN for Kimi-Audio-7B-Instruct, made by asr-ft (build_standin, seed {seed}).

The layout, the vocabulary (168448 ids: text, the special tokens, GLM-4-Voice codes at +152064), the token ids
and the prompt are the real model's; the widths are tiny (hidden {hidden}, {layers} trunk layers, Whisper
encoder width {whisper}, GLM tokenizer with {codes} codes) and every weight is random.

It transcribes nonsense. Its CER is meaningless: use it to test the pipeline, never to judge a model.
For real transcripts use a Kimi-Audio-7B-Instruct folder.
"""


def build_standin(folder: Path, seed: int = 0) -> Path:
    """Write the stand-in model folder into ``folder`` (created; files already there are replaced) and return it."""
    import torch

    from common.families.kimi_audio.glm_tokenizer import GlmSpeechTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = STANDIN_CONFIG
    data = {**PUBLISHED_EXTRA, **config.to_json_dict()}
    (folder / CONFIG_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _write_llm(folder, config, torch.Generator().manual_seed(seed))
    _write_whisper(folder / WHISPER_SUBFOLDER, seed)
    glm = GlmSpeechTokenizer.tiny(seed=seed)
    glm.save(folder / GLM_SUBFOLDER)
    (folder / STANDIN_FILE).write_text(NOTE.format(seed=seed, hidden=config.hidden_size,
                                                   layers=config.num_hidden_layers, whisper=STANDIN_WHISPER_WIDTH,
                                                   codes=glm.config.codebook_size), encoding="utf-8")
    return folder


def standin_weights(config: KimiAudioConfig, generator) -> dict:
    """Random weights for every parameter of ``config``'s LLM (fp32), drawn in sorted-name order:
    norms 1, biases 0, embeddings N(0, 1), every other matrix N(0, 1/fan_in) (unit-scale activations, so
    the audio, not only the last token, sways the logits)."""
    import torch

    from common.families.kimi_audio.model import build_on_meta

    shapes = {name: tuple(t.shape) for name, t in build_on_meta(config).state_dict().items()}
    weights = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if len(shape) == 1:
            is_norm = name.endswith(("norm.weight", "layernorm.weight")) or name == "model.vq_adaptor.layers.4.weight"
            weights[name] = torch.ones(shape) if is_norm else torch.zeros(shape)
        else:
            std = 1.0 if name == "model.embed_tokens.weight" else 1 / math.sqrt(shape[1])
            weights[name] = torch.randn(shape, generator=generator) * std
    return weights


def _write_llm(folder: Path, config: KimiAudioConfig, generator) -> None:
    import torch
    from safetensors.torch import save

    weights = {k: v.to(getattr(torch, WEIGHT_DTYPE)).contiguous() for k, v in standin_weights(config, generator).items()}
    shards = ({k: v for k, v in weights.items() if k not in HEAD_SHARD_KEYS},
              {k: weights[k] for k in HEAD_SHARD_KEYS})
    for name, shard in zip(SHARDS, shards, strict=True):
        (folder / name).write_bytes(save(shard, metadata={"format": "pt"}))  # not save_file: it makes files 0600
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in weights.values())},
             "weight_map": {k: SHARDS[0] if k in shards[0] else SHARDS[1] for k in sorted(weights)}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _write_whisper(folder: Path, seed: int) -> None:
    """A Hugging Face WhisperModel folder of width 8 with Whisper-large-v3's input geometry."""
    import torch
    from safetensors.torch import save
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    config = WhisperConfig(
        vocab_size=STANDIN_WHISPER_VOCAB, num_mel_bins=WHISPER_N_MELS, d_model=STANDIN_WHISPER_WIDTH,
        encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=16,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=16,
        max_source_positions=ENCODER_FRAMES, max_target_positions=MAX_TARGET_POSITIONS,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WhisperModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    config.architectures = ["WhisperModel"]
    config.to_json_file(str(folder / CONFIG_FILE))
    (folder / WHISPER_WEIGHTS).write_bytes(save({k: v.contiguous() for k, v in model.state_dict().items()},
                                                 metadata={"format": "pt"}))
    WhisperFeatureExtractor(feature_size=WHISPER_N_MELS).save_pretrained(str(folder))
