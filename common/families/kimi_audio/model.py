"""Kimi-Audio's language model as asr-ft's own code: the released parameter names, speech features scattered
per row, text logits and loss for ASR.

    model = load_pretrained(folder, dtype=torch.bfloat16)      # config.json + safetensors, every key and shape checked
    feats = encode_clip(encoder, feature_extractor, audio)      # (n, 5120): Whisper-large-v3 features of one clip
    out = model(audio_ids, text_ids, speech_mask=speech_mask, whisper_features=[feats, …],
                attention_mask=attention_mask, labels=labels)   # out.logits (B, S, vocab), out.loss
    meta = build_on_meta(KIMI_AUDIO_7B)                         # the 9.77 B-parameter skeleton, no memory

Reads: a Kimi-Audio model folder (``config.json`` and the LLM's ``*.safetensors``; the Whisper encoder lives in
its ``whisper-large-v3/`` subfolder and is loaded with transformers). Decides: nothing; it refuses a checkpoint
whose keys or shapes differ from the configuration, listing every difference. Writes nothing.

The network (sizes of Kimi-Audio-7B; see :mod:`common.families.kimi_audio.conventions`):

    model.embed_tokens            Embedding(168448, 3584): text ids, special ids and GLM-4-Voice codes (+152064)
    model.vq_adaptor.layers.{0,3,4}  Linear(5120→3584), SiLU, Dropout, Linear(3584→3584), LayerNorm(3584)
    model.layers.{0..27}          Qwen2 decoder layers (transformers' Qwen2DecoderLayer, SDPA attention)
    model.norm, lm_head           final RMSNorm and the text head (untied): the logits ASR decodes
    model.mimo_layers.{0..5}, model.mimo_norm, mimo_output
                                  the audio-output branch (fed after trunk layer 21): frozen, never computed
                                  here, kept so an exported folder is complete

Input of one forward (both streams have the same length S; upstream's two-stream layout):

    audio_ids        (B, S)  the audio stream: special ids, blanks, and codes + 152064 at speech positions
    text_ids         (B, S)  the text stream: its embedding is added at every position
    speech_mask      (B, S)  True exactly at the code positions of each row
    whisper_features (B, T, 5120) padded, or a list of (n_b, 5120): row b's first n_b = speech_mask[b].sum()
                     frames, in order. At each speech position: (embed(code) + adaptor(frame)) × √2.
    attention_mask   (B, S)  1 for real tokens, 0 for padding (left or right); positions count real tokens only
    labels           (B, S)  the token expected at each position (the text stream where a loss is wanted),
                     -100 elsewhere; the logits at t − 1 are scored against labels[t] (causal-LM shift)

Rows never share a buffer: row b's frames go to row b's speech positions only, whatever the batch size, the
rows' lengths or the padding side (upstream's own model indexes one shared buffer by row number and fails
for batches of more than one row).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from common.families.kimi_audio.conventions import (
    IGNORE_INDEX,
    KIMI_AUDIO_7B,
    STACK,
    KimiAudioConfig,
    chunk_spans,
    stacked_frames,
)
from common.families.whisper.conventions import SAMPLE_RATE

log = logging.getLogger(__name__)

# Keys a checkpoint may carry that hold no learned values (older exports saved RoPE's inverse frequencies).
IGNORABLE_KEY_SUFFIXES = ("rotary_emb.inv_freq",)
AUDIO_BRANCH_PREFIXES = ("model.mimo_layers.", "model.mimo_norm.", "mimo_output.")


class CheckpointMismatch(ValueError):
    """A state dict that does not fit the model; the message lists every missing, unexpected and misshapen key."""


@dataclass
class KimiAudioOutput:
    logits: torch.Tensor | None  # (B, S or logits_to_keep, vocab) text logits from lm_head
    loss: torch.Tensor | None  # mean cross-entropy over the scored label tokens of the batch
    n_loss_tokens: torch.Tensor | None  # how many label tokens the loss averages (for sum-based accumulation)
    cache: Any = None  # transformers DynamicCache of the trunk layers, when asked for


# --- the network ------------------------------------------------------------------------------------------


class SpeechAdaptor(nn.Module):
    """Stacked Whisper frames (5120) → the LLM's width; indices 0, 3, 4 of ``layers`` hold the weights."""

    def __init__(self, config: KimiAudioConfig):
        super().__init__()
        h = config.hidden_size
        self.layers = nn.Sequential(
            nn.Linear(config.kimia_adaptor_input_dim, h, bias=True),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Linear(h, h, bias=True),
            nn.LayerNorm(h, eps=config.rms_norm_eps),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class KimiAudioBackbone(nn.Module):
    """The parameters under ``model.`` of the checkpoint (embeddings, trunk, audio branch, adaptor)."""

    def __init__(self, config: KimiAudioConfig):
        super().__init__()
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm

        qwen = qwen2_config(config)
        trunk = config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(qwen, layer_idx=i) for i in range(trunk))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mimo_layers = nn.ModuleList(Qwen2DecoderLayer(qwen, layer_idx=trunk + i)
                                         for i in range(config.kimia_mimo_layers))
        self.mimo_norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.vq_adaptor = SpeechAdaptor(config)
        self.rotary_emb = _rotary(qwen)  # buffers only, not in the state dict


class KimiAudioLM(nn.Module):
    """Kimi-Audio's LLM for ASR: text logits from the trunk; the audio branch is frozen and skipped."""

    def __init__(self, config: KimiAudioConfig):
        super().__init__()
        self.config = config
        self.model = KimiAudioBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mimo_output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.freeze_audio_branch()

    def freeze_audio_branch(self) -> None:
        """No gradient to the audio-output branch (ASR never computes it)."""
        for name, param in self.named_parameters():
            if name.startswith(AUDIO_BRANCH_PREFIXES):
                param.requires_grad_(False)

    def forward(
        self,
        audio_ids: torch.Tensor,
        text_ids: torch.Tensor | None = None,
        speech_mask: torch.Tensor | None = None,
        whisper_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
        logits_to_keep: int | None = None,
        return_logits: bool = True,
    ) -> KimiAudioOutput:
        """Text logits (and the loss on ``labels``) of a batch; see the module docstring for the inputs.

        Generation: pass ``use_cache=True`` for the prompt, then the new tokens with ``cache=out.cache`` and an
        ``attention_mask`` covering cached + new tokens; ``logits_to_keep=1`` computes the last position only.
        ``return_logits=False`` skips the (B, S, vocab) logits when only the loss is needed (training)."""
        embeds = self.embed(audio_ids, text_ids, speech_mask, whisper_features)
        hidden, cache = self.trunk(embeds, attention_mask, position_ids, cache, use_cache)
        loss = n_tokens = None
        if labels is not None:
            loss, n_tokens = self._loss(hidden, labels)
        logits = None
        if return_logits:
            kept = hidden if not logits_to_keep else hidden[:, -logits_to_keep:]
            logits = self.lm_head(kept)
        return KimiAudioOutput(logits=logits, loss=loss, n_loss_tokens=n_tokens, cache=cache)

    # --- input embeddings ----------------------------------------------------------------------------------

    def embed(
        self,
        audio_ids: torch.Tensor,
        text_ids: torch.Tensor | None = None,
        speech_mask: torch.Tensor | None = None,
        whisper_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B, S, hidden): the audio stream's embeddings, speech features mixed in per row, plus the text stream's."""
        if audio_ids.dim() != 2:
            raise ValueError(f"audio_ids must be (batch, length), got shape {tuple(audio_ids.shape)}")
        embeds = self.model.embed_tokens(audio_ids)
        if whisper_features is not None:
            if speech_mask is None:
                raise ValueError("whisper_features need a speech_mask (True at each row's code positions)")
            embeds = self._mix_speech(embeds, audio_ids, speech_mask, whisper_features)
        if text_ids is not None:
            if text_ids.shape != audio_ids.shape:
                raise ValueError(f"text_ids {tuple(text_ids.shape)} and audio_ids {tuple(audio_ids.shape)} must have "
                                 "the same shape: both streams hold one token per position")
            embeds = embeds + self.model.embed_tokens(text_ids)
        return embeds

    def _mix_speech(self, embeds: torch.Tensor, audio_ids: torch.Tensor, speech_mask: torch.Tensor,
                    whisper_features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if speech_mask.shape != audio_ids.shape:
            raise ValueError(f"speech_mask {tuple(speech_mask.shape)} must have the shape of audio_ids "
                             f"{tuple(audio_ids.shape)}")
        speech_mask = speech_mask.to(device=embeds.device, dtype=torch.bool)
        frames = _row_frames(whisper_features, speech_mask.sum(dim=1))  # (N, 5120): row 0's frames, row 1's, …
        if frames.shape[-1] != self.config.kimia_adaptor_input_dim:
            raise ValueError(f"whisper_features have {frames.shape[-1]} values per frame; the adaptor takes "
                             f"{self.config.kimia_adaptor_input_dim} ({STACK} stacked encoder frames, see "
                             "stack_encoder_output)")
        not_codes = audio_ids[speech_mask] < self.config.kimia_token_offset
        if bool(not_codes.any()):
            raise ValueError(f"{int(not_codes.sum())} speech_mask positions hold no audio code (ids below "
                             f"{self.config.kimia_token_offset}); the mask must be True exactly at the codes")
        adapted = self.model.vq_adaptor(frames.to(device=embeds.device, dtype=embeds.dtype))
        # √2 rounded to the compute dtype, as the released inference code computes it.
        sqrt2 = torch.tensor(2.0, dtype=embeds.dtype, device=embeds.device).sqrt()
        # Boolean indexing walks the rows in order, so the k-th speech position of row b meets the k-th frame of
        # row b: a per-row scatter with no shared buffer.
        mixed = (embeds[speech_mask] + adapted) * sqrt2
        embeds = embeds.clone()
        embeds[speech_mask] = mixed.to(embeds.dtype)  # under autocast the adaptor's LayerNorm returns fp32
        return embeds

    # --- the trunk -----------------------------------------------------------------------------------------

    def trunk(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, cache: Any = None,
              use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        """(B, S, hidden) after the 28 trunk layers and the final norm (the audio branch is not run)."""
        batch, length, _ = embeds.shape
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None:
            attention_mask = attention_mask.to(device=embeds.device, dtype=torch.bool)
            if attention_mask.shape != (batch, past + length):
                raise ValueError(f"attention_mask must be (batch, cached + new tokens) = {(batch, past + length)}, got "
                                 f"{tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = _positions(attention_mask, batch, past, length, embeds.device)
        mask = _attention_mask(attention_mask, past, length, embeds.device)
        position_embeddings = self.model.rotary_emb(embeds, position_ids)
        hidden = embeds
        cache_arg = {_cache_kwarg(): cache} if cache is not None else {}
        for layer in self.model.layers:
            kwargs = dict(attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings,
                          use_cache=cache is not None, **cache_arg)
            if self.gradient_checkpointing and self.training:
                out = torch.utils.checkpoint.checkpoint(layer, hidden, use_reentrant=False, **kwargs)
            else:
                out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.model.norm(hidden), cache

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of the inputs {tuple(hidden.shape[:2])}")
        targets = labels[:, 1:].to(hidden.device)
        scored = targets != IGNORE_INDEX
        # Only the scored positions go through the 168k-wide head: the loss never builds the full logits.
        logits = self.lm_head(hidden[:, :-1][scored]).float()
        n_tokens = scored.sum()
        total = F.cross_entropy(logits, targets[scored], reduction="sum")
        return total / n_tokens.clamp(min=1), n_tokens


# --- building and loading ---------------------------------------------------------------------------------


def qwen2_config(config: KimiAudioConfig):
    """The transformers Qwen2Config the decoder layers are built from (SDPA attention, no sliding window).

    It counts the audio branch's layers too, so every layer has its own index (and cache slot)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers + config.kimia_mimo_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.kv_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        use_sliding_window=False,
        sliding_window=None,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        attn_implementation="sdpa",
    )


def build_on_meta(config: KimiAudioConfig = KIMI_AUDIO_7B) -> KimiAudioLM:
    """The model's skeleton on the ``meta`` device: every parameter's name and shape, no memory."""
    with torch.device("meta"):
        return KimiAudioLM(config)


def parameter_counts(model: KimiAudioLM) -> dict[str, int]:
    """Parameters per part: trunk layers, audio branch (layers + norm), embeddings, heads, adaptor, total."""
    parts = {
        "trunk_layers": "model.layers.", "final_norm": "model.norm.", "embed_tokens": "model.embed_tokens.",
        "lm_head": "lm_head.", "adaptor": "model.vq_adaptor.", "mimo_layers": "model.mimo_layers.",
        "mimo_norm": "model.mimo_norm.", "mimo_output": "mimo_output.",
    }
    counts = dict.fromkeys(parts, 0)
    for name, param in model.named_parameters():
        part = next(p for p, prefix in parts.items() if name.startswith(prefix))
        counts[part] += param.numel()
    counts["audio_branch"] = counts["mimo_layers"] + counts["mimo_norm"] + counts["mimo_output"]
    counts["total"] = sum(param.numel() for param in model.parameters())
    return counts


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> list[str]:
    """Every difference between ``state_dict`` and the model's parameters: missing, unexpected, wrong shape."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    given = {name: tuple(t.shape) for name, t in state_dict.items() if not name.endswith(IGNORABLE_KEY_SUFFIXES)}
    problems = [f"missing: {name} (expected shape {shape})" for name, shape in expected.items() if name not in given]
    problems += [f"wrong shape: {name} is {given[name]}, expected {shape}"
                 for name, shape in expected.items() if name in given and given[name] != shape]
    problems += [f"unexpected: {name} {shape}" for name, shape in given.items() if name not in expected]
    return problems


def load_weights(model: KimiAudioLM, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Load ``state_dict`` strictly; CheckpointMismatch listing every problem at once otherwise.

    A model built on ``meta`` takes the tensors as they are (dtype and device of the state dict)."""
    problems = check_state_dict(model, state_dict)
    if problems:
        raise CheckpointMismatch(
            f"{source} does not fit this Kimi-Audio configuration ({len(problems)} problems):\n  "
            + "\n  ".join(problems)
            + "\nExpected the LLM weights of a Kimi-Audio-7B(-Instruct) folder with the config.json beside them "
              "(the Whisper encoder belongs in the whisper-large-v3/ subfolder, not here).")
    on_meta = any(p.is_meta for p in model.parameters())
    kept = {k: v for k, v in state_dict.items() if not k.endswith(IGNORABLE_KEY_SUFFIXES)}
    model.load_state_dict(kept, strict=True, assign=on_meta)
    if on_meta:
        device = next(model.parameters()).device
        model.model.rotary_emb = _rotary(qwen2_config(model.config), device=device)
    model.freeze_audio_branch()


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's ``*.safetensors`` (sharded or not), or of ``pytorch_model*.bin``."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / name for name in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors or pytorch_model*.bin; expected the LLM weights of a "
                                "Kimi-Audio model folder")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(path), device="cpu"))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def load_pretrained(folder: Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> KimiAudioLM:
    """The LLM of a Kimi-Audio folder (its config.json and weights), strictly checked, in ``dtype`` on ``device``."""
    folder = Path(folder)
    config = KimiAudioConfig.from_json(folder / "config.json")
    model = build_on_meta(config)
    state = {name: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
             for name, t in read_state_dict(folder).items()}
    load_weights(model, state, source=str(folder))
    log.info("loaded Kimi-Audio LM from %s: %d parameters, %s on %s", folder, parameter_counts(model)["total"],
             dtype, device)
    return model


# --- speech features: Whisper-large-v3 encoder output → stacked frames --------------------------------------


def stack_encoder_output(hidden: torch.Tensor, n_samples: int) -> torch.Tensor:
    """(n, 4·d) features of one clip from the encoder output of its 30-s chunks, ``hidden`` (C, 1500, d).

    Chunk i of length L_i keeps its first 4·n_i frames, n_i = (L_i − 1) // 1280 + 1; the chunks' frames are
    concatenated and grouped by 4 consecutive frames, so n = (L − 1) // 1280 + 1 for the whole clip."""
    spans = chunk_spans(n_samples)
    if hidden.dim() != 3 or hidden.shape[0] != len(spans):
        raise ValueError(f"expected the encoder output of the clip's {len(spans)} 30-s chunk(s), shape "
                         f"({len(spans)}, frames, width); got {tuple(hidden.shape)}")
    keep = [STACK * stacked_frames(end - start) for start, end in spans]
    if max(keep) > hidden.shape[1]:
        raise ValueError(f"a chunk needs {max(keep)} encoder frames, the output has {hidden.shape[1]}: feed "
                         "30-s padded log-mel windows (3000 frames) to a Whisper encoder")
    frames = torch.cat([hidden[i, :k] for i, k in enumerate(keep)])
    return frames.reshape(len(frames) // STACK, STACK * hidden.shape[-1])


def encode_clip(encoder: nn.Module, feature_extractor: Any, audio: Any) -> torch.Tensor:
    """(n, 5120) features of one 16 kHz clip: its 30-s chunks (each padded to 30 s, log-mel by the
    transformers ``WhisperFeatureExtractor``) through the ``WhisperEncoder`` in one batch, then stacked."""
    n_samples = len(audio)
    chunks = [audio[start:end] for start, end in chunk_spans(n_samples)]
    mels = feature_extractor(chunks, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    param = next(encoder.parameters())
    hidden = encoder(mels.to(device=param.device, dtype=param.dtype)).last_hidden_state
    return stack_encoder_output(hidden, n_samples)


# --- helpers ----------------------------------------------------------------------------------------------


def _row_frames(features: torch.Tensor | Sequence[torch.Tensor], counts: torch.Tensor) -> torch.Tensor:
    """Each row's first counts[b] frames, concatenated row after row; ValueError naming rows that do not fit."""
    if isinstance(features, torch.Tensor):
        if features.dim() != 3 or features.shape[0] != len(counts):
            raise ValueError(f"whisper_features must be (batch={len(counts)}, frames, dim) or a list of (frames, dim), "
                             f"got shape {tuple(features.shape)}")
        short = [(b, int(c)) for b, c in enumerate(counts.tolist()) if c > features.shape[1]]
        if short:
            raise ValueError("speech positions without features: " + ", ".join(
                f"row {b} has {c} speech positions, the features {features.shape[1]} frames" for b, c in short))
        valid = torch.arange(features.shape[1], device=counts.device)[None, :] < counts[:, None]
        return features[valid.to(features.device)]
    rows = list(features)
    if len(rows) != len(counts):
        raise ValueError(f"whisper_features has {len(rows)} rows, the batch {len(counts)}")
    wrong = [(b, int(c), len(f)) for b, (c, f) in enumerate(zip(counts.tolist(), rows, strict=True)) if c != len(f)]
    if wrong:
        raise ValueError("speech positions and feature frames differ: " + ", ".join(
            f"row {b} has {c} speech positions and {n} frames" for b, c, n in wrong)
            + " (one stacked frame per code: n = (samples − 1) // 1280 + 1)")
    return torch.cat([f.reshape(len(f), -1) for f in rows]) if rows else torch.empty(0)


def _positions(attention_mask: torch.Tensor | None, batch: int, past: int, length: int,
               device: torch.device) -> torch.Tensor:
    """(B, length) RoPE positions: each row counts its own real tokens (left padding starts a row at 0)."""
    if attention_mask is None:
        return torch.arange(past, past + length, device=device).expand(batch, length)
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, past:]


def _attention_mask(attention_mask: torch.Tensor | None, past: int, length: int,
                    device: torch.device) -> torch.Tensor | None:
    """(B, 1, length, past + length) boolean mask (True = attend), or None when plain causal attention is exact."""
    if attention_mask is None or bool(attention_mask.all()):
        if past == 0 or length == 1:
            return None  # SDPA's own causal mask (prefill) or full attention (one new token)
        attention_mask = torch.ones(1, past + length, dtype=torch.bool, device=device)
    keys = torch.arange(past + length, device=device)
    queries = torch.arange(past, past + length, device=device)
    causal = keys[None, :] <= queries[:, None]
    mask = causal[None] & attention_mask[:, None, :]
    # A padding query would attend to nothing, and an all-masked softmax row is NaN on some SDPA kernels (a
    # NaN that would reach real positions through the next layer's keys): let it see itself. Real queries never
    # see padding keys, so this changes no real position's output.
    mask = mask | (keys[None, :] == queries[:, None])[None]
    return mask[:, None]


def _rotary(qwen_config, device: torch.device | str | None = None) -> nn.Module:
    """RoPE's inverse frequencies (non-persistent buffers) on ``device``, else on the ambient default device."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    if device is None:
        return Qwen2RotaryEmbedding(config=qwen_config)
    with torch.device(device):
        return Qwen2RotaryEmbedding(config=qwen_config)


@cache
def _cache_kwarg() -> str:
    """The decoder layer's name for its KV cache argument (it changed across transformers releases)."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    params = inspect.signature(Qwen2DecoderLayer.forward).parameters
    return next(name for name in ("cache", "past_key_values", "past_key_value") if name in params)
