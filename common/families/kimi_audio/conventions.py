"""Kimi-Audio-7B's fixed conventions, each defined once with its derivation, and the model's configuration.

    config = KimiAudioConfig.from_json(folder / "config.json")   # a downloaded Kimi-Audio-7B(-Instruct) folder
    config = KIMI_AUDIO_7B                                        # the published shape, without any file
    config = TINY                                                 # a 66k-parameter stand-in for tests
    n = stacked_frames(len(audio))                                # speech positions of a 16 kHz clip

Reads: the ``config.json`` of a model folder (its Qwen2 fields and the ``kimia_*`` fields of upstream's
``KimiAudioConfig``; every other field is ignored). Decides: nothing beyond validation: a configuration this
implementation would compute differently (tied heads, RoPE scaling, sliding windows, no Whisper features) is
refused with what to change. Writes nothing.

Every other Kimi-Audio module (model, tokenizer, data, engines) imports these; none redefines them. The
Whisper front-end's own constants (16 kHz, 10-ms hop, 30-s window, 1500 encoder frames) come from
:mod:`common.families.whisper.conventions`. Needs pydantic and the standard library only (no torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from common.families.kimi_audio.tokenizer import (  # noqa: F401 (the special ids, re-exported for the model)
    ASSISTANT_START,
    BOS,
    EOS,
    MEDIA_BEGIN,
    MEDIA_END,
    MSG_END,
    PAD,
    SPEECH_CT,
    TEXT_BLANK,
    TEXT_EOS,
    USER_START,
)
from common.families.kimi_audio.tokenizer import N_REGULAR as NUM_BASE_TOKENS
from common.families.kimi_audio.tokenizer import N_SPECIAL as NUM_SPECIAL_TOKENS
from common.families.kimi_audio.tokenizer import N_SPEECH_CODES as NUM_CODES
from common.families.whisper.conventions import ENCODER_FRAMES, HOP_LENGTH, N_SAMPLES, SAMPLE_RATE

# --- the LLM: a Qwen2.5-7B-shaped decoder ------------------------------------------------------------------
HIDDEN_SIZE = 3584
NUM_LAYERS = 28  # the text trunk; lm_head reads its last layer
NUM_HEADS = 28
NUM_KV_HEADS = 4  # grouped-query attention: 7 query heads share one key/value head
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS  # 128
KV_DIM = NUM_KV_HEADS * HEAD_DIM  # 512: width of k_proj / v_proj
FFN_SIZE = 18944  # SiLU-gated MLP (gate, up, down)
RMS_NORM_EPS = 1e-6  # every RMSNorm, and the adaptor's LayerNorm (upstream passes rms_norm_eps to it)
ROPE_THETA = 1_000_000.0
MAX_POSITIONS = 8192

# --- the vocabulary: Qwen's text tokens, Kimi's special tokens, then the GLM-4-Voice codes ------------------
# The token ids are the text tokenizer's (common/families/kimi_audio/tokenizer.py defines each once).
CODE_OFFSET = NUM_BASE_TOKENS + NUM_SPECIAL_TOKENS  # 152064: id of GLM-4-Voice code 0 (upstream kimia_token_offset)
VOCAB_SIZE = CODE_OFFSET + NUM_CODES  # 168448: rows of embed_tokens, lm_head and mimo_output
TEXT_OUTPUT_VOCAB = CODE_OFFSET  # 152064: the ids the text head is meant to produce (kimia_text_output_vocab)
NUM_AUDIO_SPECIAL_TOKENS = 512
AUDIO_OUTPUT_VOCAB = NUM_CODES + NUM_AUDIO_SPECIAL_TOKENS  # 16896 (kimia_audio_output_vocab; TTS only)
IGNORE_INDEX = -100  # label positions the loss skips (torch cross-entropy's default ignore_index)

# --- the audio-output ("mimo") branch: kept for export, never computed for ASR ----------------------------
MIMO_LAYERS = 6
MIMO_FROM_LAYER = 21  # trunk layer index whose output feeds the branch (after the 22nd layer)
MIMO_AUDIO_DELAY = 5  # kimia_mimo_audiodelaytokens (TTS only)

# --- the speech front end: Whisper-large-v3 encoder features stacked to the code rate ----------------------
WHISPER_SUBFOLDER = "whisper-large-v3"  # a full HF WhisperModel inside the model folder (not in the LLM's weights)
WHISPER_D_MODEL = 1280  # Whisper-large-v3 encoder width
WHISPER_N_MELS = 128
ENCODER_STRIDE = 2  # the encoder's second convolution halves the 100 Hz log-mel rate
SAMPLES_PER_ENCODER_FRAME = HOP_LENGTH * ENCODER_STRIDE  # 320 samples = 20 ms (50 Hz)
STACK = 4  # consecutive encoder frames concatenated into one speech position
ADAPTOR_INPUT_DIM = STACK * WHISPER_D_MODEL  # 5120
SAMPLES_PER_POSITION = STACK * SAMPLES_PER_ENCODER_FRAME  # 1280 samples = 80 ms: one code, one stacked frame
POSITIONS_PER_SECOND = SAMPLE_RATE / SAMPLES_PER_POSITION  # 12.5 Hz (GLM-4-Voice codes run at the same rate)
POSITIONS_PER_CHUNK = ENCODER_FRAMES // STACK  # 375 for a full 30-s chunk
assert N_SAMPLES % SAMPLES_PER_POSITION == 0  # a 30-s chunk holds whole positions, so chunking never rounds twice


def chunk_spans(n_samples: int) -> list[tuple[int, int]]:
    """[start, end) sample spans of the 30-s chunks a clip is encoded in (the last one may be short)."""
    if n_samples < 1:
        raise ValueError(f"a clip needs at least one sample (got {n_samples}); drop empty clips before encoding")
    return [(start, min(start + N_SAMPLES, n_samples)) for start in range(0, n_samples, N_SAMPLES)]


def stacked_frames(n_samples: int) -> int:
    """Speech positions of a clip of ``n_samples`` at 16 kHz: ⌈L / 1280⌉ = (L − 1) // 1280 + 1.

    Per 30-s chunk the front end keeps 4·n encoder frames, n = (L_chunk − 1) // 1280 + 1; because a full chunk
    is exactly 375 positions, the sum over chunks equals the formula on the whole clip, and so does the number
    of GLM-4-Voice codes (⌈L / 1280⌉ per chunk)."""
    return sum((end - start - 1) // SAMPLES_PER_POSITION + 1 for start, end in chunk_spans(n_samples))


# --- the configuration ------------------------------------------------------------------------------------


class KimiAudioConfig(BaseModel):
    """The fields of a Kimi-Audio ``config.json`` this implementation uses (names as in the file).

    Sizes are required; the other fields default as upstream's ``KimiAudioConfig`` class does, so a file that
    omits them means what it means upstream. Unknown fields (``architectures``, ``auto_map``, token ids …) are
    ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: as many as the query heads (upstream's default)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0  # upstream's class default; the published config.json says 1e6
    max_position_embeddings: int = 32_768  # Qwen2's class default; the published config.json says 8192
    hidden_act: str = "silu"
    pad_token_id: int | None = None  # padding_idx of embed_tokens (no gradient to that row), as upstream
    tie_word_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None
    use_sliding_window: bool = False
    use_whisper_feature: bool = True
    kimia_mimo_layers: int = MIMO_LAYERS
    kimia_mimo_transformer_from_layer_index: int = MIMO_FROM_LAYER
    kimia_mimo_audiodelaytokens: int = MIMO_AUDIO_DELAY
    kimia_adaptor_input_dim: int = ADAPTOR_INPUT_DIM
    kimia_token_offset: int = CODE_OFFSET
    kimia_text_output_vocab: int = TEXT_OUTPUT_VOCAB
    kimia_audio_output_vocab: int = AUDIO_OUTPUT_VOCAB
    num_audio_special_tokens: int = NUM_AUDIO_SPECIAL_TOKENS
    num_base_tokens: int = NUM_BASE_TOKENS
    kimia_media_begin: int = MEDIA_BEGIN
    kimia_media_end: int = MEDIA_END

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_codes(self) -> int:
        return self.vocab_size - self.kimia_token_offset

    @model_validator(mode="after")
    def _computable(self) -> KimiAudioConfig:
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                            f"{self.num_attention_heads}")
        if self.num_attention_heads % self.kv_heads:
            problems.append(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads {self.kv_heads}")
        if not 0 <= self.kimia_mimo_transformer_from_layer_index < self.num_hidden_layers:
            problems.append(f"kimia_mimo_transformer_from_layer_index {self.kimia_mimo_transformer_from_layer_index} "
                            f"is not a trunk layer index (0 … {self.num_hidden_layers - 1})")
        if not 0 < self.kimia_token_offset < self.vocab_size:
            problems.append(f"kimia_token_offset {self.kimia_token_offset} leaves no audio codes in vocab_size "
                            f"{self.vocab_size}")
        unsupported = {
            "hidden_act": (self.hidden_act, "silu"),
            "tie_word_embeddings": (self.tie_word_embeddings, False),
            "rope_scaling": (self.rope_scaling, None),
            "use_sliding_window": (self.use_sliding_window, False),
            "use_whisper_feature": (self.use_whisper_feature, True),
        }
        problems += [f"{name} is {value!r}; Kimi-Audio (and this implementation) uses {expected!r}"
                     for name, (value, expected) in unsupported.items() if value != expected]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> KimiAudioConfig:
        """The configuration in ``data``; ValueError naming ``source`` and every problem otherwise."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
            raise ValueError(f"{source}: not a usable Kimi-Audio configuration ({problems}). Expected the "
                             "config.json of a Kimi-Audio-7B or -7B-Instruct folder.") from None

    @classmethod
    def from_json(cls, path: Path) -> KimiAudioConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read it as JSON ({e}); expected a Kimi-Audio model folder's "
                             "config.json") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object (a Kimi-Audio config.json)")
        return cls.from_dict(data, source=str(path))

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict, as transformers configs offer it (peft reads a model's config this way)."""
        return self.model_dump()


# The published Kimi-Audio-7B / -7B-Instruct shape (both share it).
KIMI_AUDIO_7B = KimiAudioConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN_SIZE,
    intermediate_size=FFN_SIZE,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=NUM_HEADS,
    num_key_value_heads=NUM_KV_HEADS,
    rms_norm_eps=RMS_NORM_EPS,
    rope_theta=ROPE_THETA,
    max_position_embeddings=MAX_POSITIONS,
)

# A stand-in for tests: the same structure (GQA 4:2, mimo branch, adaptor) at toy widths; 224 text ids
# (its special ids below) then 32 codes. The ids are not the real tokenizer's.
TINY = KimiAudioConfig(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=RMS_NORM_EPS,
    rope_theta=ROPE_THETA,
    max_position_embeddings=256,
    kimia_mimo_layers=2,
    kimia_mimo_transformer_from_layer_index=1,
    kimia_adaptor_input_dim=STACK * 8,  # a Whisper-shaped encoder of width 8
    kimia_token_offset=224,
    kimia_text_output_vocab=224,
    kimia_audio_output_vocab=32,
    num_base_tokens=200,
    kimia_media_begin=210,
    kimia_media_end=211,
)
