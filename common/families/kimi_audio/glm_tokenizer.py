"""The GLM-4-Voice speech tokenizer: 16-kHz audio → discrete speech codes (0 … 16383, 12.5 per second).

    tok = GlmSpeechTokenizer.from_folder(folder)   # a THUDM/glm-4-voice-tokenizer folder, loaded strictly
    tok = GlmSpeechTokenizer.tiny(seed=0)          # random stand-in of the same structure (tests, bundled tiny)
    codes = tok.encode([clip_a, clip_b])           # one list of codes per clip (float arrays, 16 kHz)
    n_codes(len(clip_a))                           # (L - 1) // 1280 + 1: known before running anything
    tok.save(folder)                               # config.json, preprocessor_config.json, model.safetensors

Reads: a folder with ``config.json`` (the checkpoint's WhisperVQConfig fields) and ``model*.safetensors``
(parameter names exactly as the released checkpoint has them, so a user's download loads with strict=True),
optionally ``preprocessor_config.json`` (checked: 128 mels, hop 160, n_fft 400, 16 kHz).
Decides: how a clip is cut (30-s chunks, as upstream) and padded (per chunk, so codes never depend on the
batch), see "Chunks and padding" below.
Writes: nothing, except :meth:`GlmSpeechTokenizer.save` (a folder :meth:`from_folder` reads back).

The model: Whisper-large-v3's encoder cut after 16 of its 32 layers, with causal convolutions, a
block-causal attention mask, average pooling and a nearest-neighbour codebook:

    log-mel (128, F)                  100 frames/s: n_fft 400, hop 160, Whisper's scaling
    conv1  causal Conv1d(128→1280, k3) + GELU
    conv2  causal Conv1d(1280→1280, k3, stride 2) + GELU          50 frames/s
    + embed_positions  Embedding(1500, 1280)
    16 × pre-norm layer (self-attention 20 heads, FFN 5120, GELU): a frame sees every frame of its own 4-s
         block (200 frames) and of earlier blocks, never a later block and never a padded frame
    AvgPool1d(4)                                                  12.5 frames/s
    code = index of the nearest of 16,384 codebook vectors (squared Euclidean distance)

``embed_positions2`` (Embedding(375, 1280)) and the EMA buffers ``ema_count`` / ``ema_weight`` exist only so
the released state dict loads strictly; codes do not use them.

Chunks and padding. A clip of L samples is cut at every 480,000 samples (30 s), like upstream's
``extract_speech_token``; each chunk is encoded on its own (positions restart at 0) and the codes are
concatenated. A chunk of l samples is zero-padded to a multiple of 1280 samples (what upstream's feature
extractor does with ``pad_to_multiple_of``), its log-mel computed on that alone, and it yields ⌈l/1280⌉
codes. Batching then pads the log-mel frames after that point; the convolutions look only left and the
attention masks padded frames, so no code of a chunk can see the batch padding: a clip's codes are the
same alone, in any batch, or passed zero-padded with its true length. (Upstream pads the waveform to the
batch's longest chunk before the STFT, so the last frame of a chunk can differ slightly with the batch.)
Total codes = Σ⌈l/1280⌉ = (L - 1) // 1280 + 1, since 480,000 = 375 × 1280: the same count as Kimi-Audio's
stacked Whisper frames and speech positions.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.families.whisper.conventions import ENCODER_FRAMES, HOP_LENGTH, N_SAMPLES, SAMPLE_RATE

log = logging.getLogger(__name__)

N_FFT = 400  # 25-ms STFT window of Whisper's log-mel
N_MELS = 128  # Whisper-large-v3's mel bins, which the GLM-4-Voice tokenizer keeps
CONV_STRIDE = 2  # conv1 stride 1 × conv2 stride 2: 100 mel frames/s → 50 encoder frames/s
POOL = 4  # AvgPool1d kernel: 50 encoder frames/s → 12.5 codes/s
SAMPLES_PER_CODE = HOP_LENGTH * CONV_STRIDE * POOL  # 1280 samples = 80 ms
CHUNK_SAMPLES = N_SAMPLES  # 480000: clips are encoded in 30-s chunks, as upstream
CODES_PER_CHUNK = CHUNK_SAMPLES // SAMPLES_PER_CODE  # 375
BLOCK_FRAMES = 200  # attention block: 200 encoder frames = 4 s (the checkpoint's quantize_causal_block_size)
LOG_MEL_FLOOR = 8.0  # Whisper's dynamic range: log10 values below (max - 8) are raised to it
CONFIG_FILE, PREPROCESSOR_FILE, WEIGHTS_FILE = "config.json", "preprocessor_config.json", "model.safetensors"


class GlmTokenizerError(ValueError):
    """A folder, config or input the GLM-4-Voice tokenizer cannot use; the message says what to do."""


# --- the arithmetic of codes (no model needed) ------------------------------------------------------------


def chunk_bounds(n_samples: int) -> list[tuple[int, int]]:
    """(start, end) of each 30-s chunk of a clip of ``n_samples`` samples; the last one is shorter."""
    return [(s, min(s + CHUNK_SAMPLES, n_samples)) for s in range(0, n_samples, CHUNK_SAMPLES)]


def chunk_codes(chunk_samples: int) -> int:
    """Codes of one chunk: ⌈l / 1280⌉."""
    return -(-chunk_samples // SAMPLES_PER_CODE)


def n_codes(n_samples: int) -> int:
    """Codes of a whole clip: Σ over its chunks of ⌈l / 1280⌉, which is (L - 1) // 1280 + 1 for L > 0."""
    return sum(chunk_codes(e - s) for s, e in chunk_bounds(n_samples))


# --- the tokenizer ----------------------------------------------------------------------------------------


class GlmSpeechTokenizer:
    """Audio → codes with a :class:`GlmSpeechEncoder` (see "Chunks and padding" in the module docstring)."""

    def __init__(self, encoder: GlmSpeechEncoder, *, batch_chunks: int = 16):
        self.encoder = encoder.eval().requires_grad_(False)
        self.batch_chunks = batch_chunks  # 30-s chunks per forward pass

    @property
    def config(self) -> GlmConfig:
        return self.encoder.config

    @property
    def device(self) -> torch.device:
        return self.encoder.codebook.weight.device

    @classmethod
    def tiny(cls, seed: int = 0, config: GlmConfig | None = None) -> GlmSpeechTokenizer:
        """A random stand-in, the same for the same seed (the global RNG is left untouched). Its codebook is
        drawn from its own pooled vectors of a seeded noise signal, so different sounds get different codes
        (a purely random codebook gives nearly one code everywhere)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = GlmSpeechEncoder(config or GlmConfig.tiny()).eval()
            nn.init.normal_(encoder.embed_positions.weight, std=0.5)
            seconds = 10
            envelope = torch.linspace(0.001, 1.0, seconds * SAMPLE_RATE) ** 2  # quiet → loud
            noise = torch.randn(seconds * SAMPLE_RATE) * envelope
            mel = log_mel(noise, encoder.config.n_mels)
            with torch.no_grad():
                pooled = encoder.pooled(mel[None], torch.tensor([mel.shape[-1]]))[0][0]
                pick = torch.randint(len(pooled), (encoder.config.codebook_size,))
                spread = pooled.std(0).mean()
                encoder.codebook.weight.copy_(pooled[pick] + 0.1 * spread * torch.randn_like(pooled[pick]))
                encoder.ema_weight.copy_(encoder.codebook.weight)
        return cls(encoder)

    @classmethod
    def from_folder(cls, folder: Path | str, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> GlmSpeechTokenizer:
        """Load a THUDM/glm-4-voice-tokenizer folder (or one written by :meth:`save`) with strict key checks."""
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            cfg = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise GlmTokenizerError(f"{folder / CONFIG_FILE}: cannot read ({e}); expected the folder of "
                                    "THUDM/glm-4-voice-tokenizer (config.json + model.safetensors)") from None
        config = GlmConfig.from_hf(cfg, str(folder / CONFIG_FILE))
        _check_preprocessor(folder / PREPROCESSOR_FILE, config)
        files = sorted(folder.glob("model*.safetensors"))
        if not files:
            raise GlmTokenizerError(f"{folder}: no model*.safetensors; download the tokenizer's safetensors "
                                    f"weights into it (found: {sorted(p.name for p in folder.iterdir())[:10]})")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        with torch.device("meta"):
            encoder = GlmSpeechEncoder(config)
        wanted = set(encoder.state_dict())
        missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
        if missing or unexpected:
            raise GlmTokenizerError(f"{folder}: the weights do not match the GLM-4-Voice tokenizer: missing "
                                    f"{missing[:5]}{' …' if len(missing) > 5 else ''}, unexpected "
                                    f"{unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
        encoder.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True,
                                assign=True)
        log.info("GLM-4-Voice tokenizer: %s (%d layers, width %d, %d codes, %s)", folder, config.layers,
                 config.width, config.codebook_size, dtype)
        return cls(encoder)

    def save(self, folder: Path | str) -> None:
        """Write config.json, preprocessor_config.json and model.safetensors in the released layout."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config.to_hf(), indent=2) + "\n", encoding="utf-8")
        preprocessor = {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": self.config.n_mels,
                        "hop_length": HOP_LENGTH, "n_fft": N_FFT, "sampling_rate": SAMPLE_RATE,
                        "chunk_length": CHUNK_SAMPLES // SAMPLE_RATE, "padding_value": 0.0}
        (folder / PREPROCESSOR_FILE).write_text(json.dumps(preprocessor, indent=2) + "\n", encoding="utf-8")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()},
                  str(folder / WEIGHTS_FILE))

    @torch.inference_mode()
    def encode(self, audio: Sequence[np.ndarray] | np.ndarray, lengths: Sequence[int] | None = None) -> list[list[int]]:
        """Codes of each clip: ``audio`` is a list of 1-D float arrays at 16 kHz, or a 2-D array of clips padded
        on the right with their true ``lengths``. Returns one list of n_codes(L) codes per clip."""
        clips = _clips(audio, lengths)
        pieces = [(i, clip[s:e]) for i, clip in enumerate(clips) for s, e in chunk_bounds(len(clip))]
        codes: list[list[int]] = [[] for _ in clips]
        for start in range(0, len(pieces), self.batch_chunks):
            group = pieces[start:start + self.batch_chunks]
            mels = [log_mel(torch.as_tensor(chunk, device=self.device), self.config.n_mels) for _, chunk in group]
            frames = max(m.shape[-1] for m in mels)
            batch = torch.stack([F.pad(m, (0, frames - m.shape[-1])) for m in mels])
            real = torch.tensor([-(-len(chunk) // HOP_LENGTH) for _, chunk in group], device=self.device)
            out, valid = self.encoder(batch.to(self.encoder.codebook.weight.dtype), real)
            for row, (i, chunk) in enumerate(group):
                k = chunk_codes(len(chunk))
                assert int(valid[row].sum()) == k, (int(valid[row].sum()), k)
                codes[i] += out[row, :k].tolist()
        return codes


# --- configuration ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlmConfig:
    """The tokenizer's widths; the defaults are the released THUDM/glm-4-voice-tokenizer."""

    n_mels: int = N_MELS
    width: int = 1280  # d_model
    heads: int = 20
    ffn: int = 5120
    layers: int = 16  # quantize_position: Whisper-large-v3's 32 layers cut after the 16th
    max_positions: int = ENCODER_FRAMES  # 1500 encoder frames = 30 s
    pool: int = POOL
    block_frames: int = BLOCK_FRAMES
    codebook_size: int = 16_384

    @classmethod
    def tiny(cls) -> GlmConfig:
        """A ~170-KB stand-in with the real geometry (mels, 30-s positions, pooling, 4-s blocks)."""
        return cls(width=16, heads=2, ffn=32, layers=2, codebook_size=32)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], where: str = CONFIG_FILE) -> GlmConfig:
        """Read the checkpoint's ``config.json``; refuse variants whose codes this code would get wrong."""
        expected = {  # field: value the released tokenizer has and this implementation assumes
            "pooling_type": "avg",
            "encoder_causal_convolution": True,
            "encoder_causal_attention": False,
            "quantize_causal_encoder": False,
            "activation_function": "gelu",
        }
        for key, want in expected.items():
            if cfg.get(key, want) != want:
                raise GlmTokenizerError(f"{where}: {key} = {cfg[key]!r}, expected {want!r}: not the "
                                        "GLM-4-Voice tokenizer this code implements (THUDM/glm-4-voice-tokenizer)")
        try:
            layers, pool_at = int(cfg["quantize_position"]), int(cfg["pooling_position"])
            out = cls(n_mels=int(cfg["num_mel_bins"]), width=int(cfg["d_model"]),
                      heads=int(cfg["encoder_attention_heads"]), ffn=int(cfg["encoder_ffn_dim"]), layers=layers,
                      max_positions=int(cfg["max_source_positions"]), pool=int(cfg["pooling_kernel_size"]),
                      block_frames=int(cfg["quantize_causal_block_size"]),
                      codebook_size=int(cfg["quantize_vocab_size"]))
        except (KeyError, TypeError, ValueError) as e:
            raise GlmTokenizerError(f"{where}: missing or invalid field {e}; expected the config.json of "
                                    "THUDM/glm-4-voice-tokenizer (a WhisperVQConfig)") from None
        if pool_at != layers:
            raise GlmTokenizerError(f"{where}: pooling_position {pool_at} != quantize_position {layers}: this "
                                    "code pools right before quantizing, as the released tokenizer does")
        if out.n_mels != N_MELS or out.pool * CONV_STRIDE * HOP_LENGTH != SAMPLES_PER_CODE:
            raise GlmTokenizerError(f"{where}: num_mel_bins {out.n_mels}, pooling_kernel_size {out.pool}: expected "
                                    f"{N_MELS} and {POOL} (12.5 codes per second, what Kimi-Audio's LLM reads)")
        return out

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` fields of the released checkpoint, with these widths."""
        return {
            "architectures": ["WhisperVQEncoder"], "model_type": "whisper", "activation_function": "gelu",
            "num_mel_bins": self.n_mels, "d_model": self.width, "encoder_attention_heads": self.heads,
            "encoder_ffn_dim": self.ffn, "encoder_layers": self.layers, "max_source_positions": self.max_positions,
            "pooling_kernel_size": self.pool, "pooling_position": self.layers, "pooling_type": "avg",
            "quantize_position": self.layers, "quantize_vocab_size": self.codebook_size,
            "quantize_causal_block_size": self.block_frames, "quantize_encoder_only": True,
            "quantize_causal_encoder": False, "quantize_ema_decay": 0.99, "encoder_causal_convolution": True,
            "encoder_causal_attention": False, "torch_dtype": "float32",
        }


# --- the model (parameter names = the released state dict's) ---------------------------------------------


class CausalConv1d(nn.Conv1d):
    """Conv1d that pads only on the left (kernel - 1 frames), so output t sees inputs ≤ t."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width, bias=False)  # Whisper's key projection has no bias
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, w // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                             attn_mask=allowed)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, w))


class EncoderLayer(nn.Module):
    """Whisper's pre-norm encoder layer."""

    def __init__(self, width: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(width)
        self.self_attn = SelfAttention(width, heads)
        self.final_layer_norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, ffn)
        self.fc2 = nn.Linear(ffn, width)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), allowed)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class GlmSpeechEncoder(nn.Module):
    """Log-mel frames → speech codes; the attribute names are the checkpoint's keys (see the module docstring)."""

    def __init__(self, config: GlmConfig):
        super().__init__()
        c = self.config = config
        if c.width % c.heads:
            raise GlmTokenizerError(f"width {c.width} is not a multiple of heads {c.heads}")
        self.conv1 = CausalConv1d(c.n_mels, c.width, 3)
        self.conv2 = CausalConv1d(c.width, c.width, 3, stride=CONV_STRIDE)
        self.embed_positions = nn.Embedding(c.max_positions, c.width)
        self.layers = nn.ModuleList(EncoderLayer(c.width, c.heads, c.ffn) for _ in range(c.layers))
        self.embed_positions2 = nn.Embedding(-(-c.max_positions // c.pool), c.width)  # 375: unused by codes
        self.codebook = nn.Embedding(c.codebook_size, c.width)
        self.register_buffer("ema_count", torch.ones(c.codebook_size))  # training state of the codebook
        self.register_buffer("ema_weight", torch.zeros(c.codebook_size, c.width))

    def forward(self, mel: torch.Tensor, mel_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mel`` (B, n_mels, F) with ``mel_frames`` (B,) real frames per row → (codes (B, F/8), valid (B, F/8))."""
        pooled, valid = self.pooled(mel, mel_frames)
        codebook = self.codebook.weight.float()
        distance = (codebook * codebook).sum(-1) - 2 * pooled.float() @ codebook.T  # + |x|², equal for all codes
        return distance.argmin(-1), valid

    def pooled(self, mel: torch.Tensor, mel_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The vectors that get quantized: (B, F/8, width), and which of them are real (B, F/8)."""
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)  # (B, T, width), T = ⌈F/2⌉
        t = x.shape[1]
        if t > self.config.max_positions:
            raise GlmTokenizerError(f"{t} encoder frames exceed the {self.config.max_positions} positions (30 s); "
                                    "cut the audio in 30-s chunks (GlmSpeechTokenizer.encode does)")
        x = x + self.embed_positions.weight[:t]
        frame_valid = _prefix_mask(-(-mel_frames // CONV_STRIDE), t)  # (B, T)
        allowed = block_causal(t, self.config.block_frames, x.device)[None] & frame_valid[:, None, :]
        allowed = allowed[:, None]  # (B, 1, T, T): one mask for every head
        for layer in self.layers:
            x = layer(x, allowed)
        pool = self.config.pool
        x = F.avg_pool1d(F.pad(x.transpose(1, 2), (0, -t % pool)), pool).transpose(1, 2)  # (B, ⌈T/pool⌉, width)
        return x, _prefix_mask(-(-mel_frames // (CONV_STRIDE * pool)), x.shape[1])


def block_causal(frames: int, block: int, device: Any = None) -> torch.Tensor:
    """(frames, frames) bool: query q may attend key k iff k's block is not after q's block."""
    blocks = torch.arange(frames, device=device) // block
    return blocks[None, :] <= blocks[:, None]


def _prefix_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


# --- log-mel ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def mel_filters(n_mels: int = N_MELS) -> torch.Tensor:
    """(n_fft/2 + 1, n_mels) Slaney mel filters, 0-8 kHz: those of Hugging Face's WhisperFeatureExtractor."""
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                           max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney",
                           mel_scale="slaney")
    return torch.from_numpy(bank).float()


def log_mel(samples: torch.Tensor, n_mels: int = N_MELS) -> torch.Tensor:
    """(n_mels, l' / 160) Whisper log-mel of one chunk, zero-padded first to l' = a multiple of 1280 samples."""
    samples = F.pad(samples.float(), (0, -samples.shape[-1] % SAMPLES_PER_CODE))
    window = torch.hann_window(N_FFT, device=samples.device)
    stft = torch.stft(samples, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect",
                      return_complex=True)
    power = stft[..., :-1].abs() ** 2  # Whisper drops the STFT's last frame: l'/160 frames
    mel = mel_filters(n_mels).to(samples.device).T @ power
    logs = mel.clamp(min=1e-10).log10()
    logs = torch.maximum(logs, logs.max() - LOG_MEL_FLOOR)
    return (logs + 4.0) / 4.0


# --- helpers ----------------------------------------------------------------------------------------------


def _clips(audio: Sequence[np.ndarray] | np.ndarray, lengths: Sequence[int] | None) -> list[np.ndarray]:
    if isinstance(audio, np.ndarray) and audio.ndim == 2:
        if lengths is None or len(lengths) != audio.shape[0]:
            raise GlmTokenizerError(f"a padded (clips, samples) array {audio.shape} needs one length per clip "
                                    f"(got {None if lengths is None else len(lengths)})")
        if any(not 0 <= n <= audio.shape[1] for n in lengths):
            raise GlmTokenizerError(f"lengths {list(lengths)} must lie in 0 … {audio.shape[1]} (the array's width)")
        clips = [row[:n] for row, n in zip(audio, lengths, strict=True)]
    elif lengths is not None:
        raise GlmTokenizerError("lengths are for a padded 2-D array; a list of clips carries its own lengths")
    else:
        clips = [np.asarray(a) for a in ([audio] if isinstance(audio, np.ndarray) and audio.ndim == 1 else audio)]
    for i, clip in enumerate(clips):
        if clip.ndim != 1 or not np.issubdtype(clip.dtype, np.floating):
            raise GlmTokenizerError(f"clip {i}: {clip.dtype} array of shape {clip.shape}; expected 1-D float "
                                    f"samples in [-1, 1] at {SAMPLE_RATE} Hz (mono)")
        if len(clip) == 0:
            raise GlmTokenizerError(f"clip {i} is empty: a clip needs at least one sample")
    return [np.ascontiguousarray(c, dtype=np.float32) for c in clips]


def _check_preprocessor(path: Path, config: GlmConfig) -> None:
    if not path.is_file():
        return
    pre = json.loads(path.read_text(encoding="utf-8"))
    expected = {"feature_size": config.n_mels, "hop_length": HOP_LENGTH, "n_fft": N_FFT, "sampling_rate": SAMPLE_RATE}
    wrong = {k: pre[k] for k, v in expected.items() if k in pre and pre[k] != v}
    if wrong:
        raise GlmTokenizerError(f"{path}: {wrong}, expected {expected}: this tokenizer computes Whisper-large-v3's "
                                "log-mel and cannot follow other feature settings")

