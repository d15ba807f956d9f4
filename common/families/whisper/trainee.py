"""What trains when a Whisper model is fine-tuned: the trainee module, its frozen and LoRA parts, final/.

    model, tokenizer, fe = load_whisper(model_dir)
    spec = ModeSpec(mode="lora", frozen_encoder_layers=3, lora_r=32)
    trainee = make_trainee(model, spec)                 # freezes / adds LoRA; a module either loop can train
    cache = encode_frozen(trainee, mels)                # once per clip: output of the frozen encoder bottom
    save_final(trainee, final_dir, tokenizer, fe, pretrained_dir, merge_alpha={"encoder": 0.8, "decoder": 0.5})

What trains (``ModeSpec``):

    full             every weight above the frozen bottom
    freeze-encoder   the decoder only (the whole encoder is the frozen bottom)
    lora             low-rank adapters (peft) on ``lora_targets`` of the encoder layers above the frozen bottom
                     and of the decoder layers; merged into plain weights in ``final/``

Frozen encoder bottom: the convolutional front-end and the lowest ``frozen_encoder_layers`` encoder layers
get no gradient. Their output depends on the clip only, so it is computed once per clip
(``encode_frozen``) and every epoch runs just the layers above it: backward stops there too. Whisper's
encoder is most of the compute on 30-s windows (each layer ≈ 14 GFLOP per clip forward on 1500 frames vs
≈ 11 GFLOP for the whole decoder on a short sentence), so with 3 of 6 layers frozen an epoch costs about half.
The result is the same function the full model computes: evaluation decodes the unchanged 30-s input.

``final/`` is a plain ``WhisperForConditionalGeneration`` folder (LoRA merged, optionally pulled back toward
the pretrained weights per part: encoder / decoder), so export and inference need no peft.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.core.files import atomic_dir
from common.families.whisper.conventions import LANGUAGE, TASK
from common.training.merge import interpolate_weights, merge_factors
from common.training.trainer import TrainError, count_params

log = logging.getLogger(__name__)

MODES = ("full", "freeze-encoder", "lora")


DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # attention + FFN linears


def load_whisper(model_dir: Path):
    """(WhisperForConditionalGeneration in float32, tokenizer, feature extractor) from a Hugging Face folder."""
    import torch
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    fe = WhisperFeatureExtractor.from_pretrained(str(model_dir))
    return model, tokenizer, fe


def _encoder(whisper):
    return whisper.model.encoder


def _layer_out(out):
    return out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple per layer


@dataclass
class ModeSpec:
    mode: str = "lora"
    frozen_encoder_layers: int = 0  # ignored for freeze-encoder (all of them)
    lora_r: int = 16
    lora_alpha: float | None = None  # None: 2 * r
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    lora_parts: tuple[str, ...] = ("encoder", "decoder")
    lora_encoder_layers: int | None = None  # LoRA only in the encoder's lowest N layers (None: all of them)
    label_smoothing: float = 0.0

    def check(self, n_encoder_layers: int) -> None:
        if self.mode not in MODES:
            raise TrainError(f"mode {self.mode!r}: expected one of {MODES}")
        if not 0 <= self.frozen_encoder_layers <= n_encoder_layers:
            raise TrainError(
                f"frozen_encoder_layers={self.frozen_encoder_layers}: this model's encoder has "
                f"{n_encoder_layers} layers; choose 0..{n_encoder_layers}"
            )
        unknown = set(self.lora_parts) - {"encoder", "decoder"}
        if unknown:
            raise TrainError(f"lora_parts {sorted(unknown)}: expected 'encoder' and/or 'decoder'")
        n = self.lora_encoder_layers
        if n is not None and not self.frozen_encoder_layers < n <= n_encoder_layers:
            raise TrainError(
                f"lora_encoder_layers={n}: this model's encoder has {n_encoder_layers} layers and the lowest "
                f"{self.frozen_encoder_layers} are frozen; choose {self.frozen_encoder_layers + 1}..{n_encoder_layers}"
            )

    def frozen_layers(self, n_encoder_layers: int) -> int:
        return n_encoder_layers if self.mode == "freeze-encoder" else self.frozen_encoder_layers


def lora_target_names(whisper, spec: ModeSpec) -> list[str]:
    """Full module names that get LoRA, in the trainable encoder layers and the decoder layers.

    A target is a linear's name or a dotted suffix of its path inside a layer, optionally led by the part:
    ``q_proj`` (every q_proj), ``encoder_attn.q_proj`` (cross-attention only), ``decoder.fc1``. With
    ``lora_encoder_layers`` = N, only the encoder's lowest N layers get LoRA."""
    n_enc = len(_encoder(whisper).layers)
    first = spec.frozen_layers(n_enc)
    last = n_enc if spec.lora_encoder_layers is None else spec.lora_encoder_layers
    pattern = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)$")
    names = []
    for name, module in whisper.named_modules():
        m = pattern.match(name)
        if not m or m.group(1) not in spec.lora_parts or not hasattr(module, "weight") or module.weight.ndim != 2:
            continue
        if m.group(1) == "encoder" and not first <= int(m.group(2)) < last:
            continue
        path = f".{m.group(1)}.{m.group(3)}"
        if any(path.endswith("." + t) for t in spec.lora_targets):
            names.append(name)
    if not names:
        raise TrainError(
            f"LoRA targets {list(spec.lora_targets)} in {list(spec.lora_parts)} match no layer above the frozen "
            f"bottom ({first} encoder layers); check lora_targets / lora_parts / frozen_encoder_layers / "
            "lora_encoder_layers"
        )
    return names


def apply_mode(whisper, spec: ModeSpec):
    """Freeze / wrap the model for ``spec``; returns the module that owns the trainable weights
    (a peft model for LoRA, else ``whisper`` itself). LoRA layers are injected into ``whisper`` in place."""
    enc = _encoder(whisper)
    spec.check(len(enc.layers))
    k = spec.frozen_layers(len(enc.layers))
    if spec.mode == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=spec.lora_r, lora_alpha=spec.lora_alpha or 2 * spec.lora_r, lora_dropout=spec.lora_dropout,
            target_modules=lora_target_names(whisper, spec), bias="none",
        )
        return get_peft_model(whisper, config)  # freezes every base weight
    whisper.requires_grad_(True)
    for module in bottom_modules(enc, k) if k else []:
        module.requires_grad_(False)
    enc.embed_positions.requires_grad_(False)  # Whisper's sinusoidal positions are fixed
    return whisper


def bottom_modules(enc, k: int) -> list:
    """The encoder's bottom: the conv front-end and layers[:k] (+ the final norm when k is all layers)."""
    mods = [enc.conv1, enc.conv2, enc.embed_positions, *enc.layers[:k]]
    return mods + [enc.layer_norm] if k == len(enc.layers) else mods


def encode_bottom(enc, input_features, k: int):
    """Output of the conv front-end, positions and layers[:k] (and the final norm when k is all layers)."""
    import torch.nn.functional as F

    x = F.gelu(enc.conv1(input_features))
    x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
    x = x + enc.embed_positions.weight[: x.shape[1]]
    for layer in enc.layers[:k]:
        x = _layer_out(layer(x, None))
    return enc.layer_norm(x) if k == len(enc.layers) else x


def encode_top(enc, hidden, k: int):
    """The rest of the encoder above ``encode_bottom(…, k)``."""
    if k == len(enc.layers):
        return hidden
    for layer in enc.layers[k:]:
        hidden = _layer_out(layer(hidden, None))
    return enc.layer_norm(hidden)


def _trainee_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class _WhisperTrainee(nn.Module):
        """What the Trainer trains: the encoder (bottom frozen, or its cached output as input), the decoder,
        and a token-mean cross-entropy with optional label smoothing over the text tokens."""

        def __init__(self, owner, whisper, frozen_layers: int, spec: ModeSpec):
            super().__init__()
            self.owner = owner  # holds the trainable weights: the peft model, or the Whisper model itself
            self._whisper = [whisper]  # plain alias, not registered twice (peft's owner already contains it)
            self.frozen_layers = frozen_layers
            self.spec = spec
            bottom = bottom_modules(_encoder(whisper), frozen_layers)
            self.bottom_trainable = any(p.requires_grad for m in bottom for p in m.parameters())

        @property
        def model(self):
            return self._whisper[0]

        @property
        def checkpoint_meta(self) -> dict[str, Any]:
            """What a checkpoint records about how this trainee was built (trainee.json)."""
            return {"spec": asdict(self.spec), "frozen_layers": self.frozen_layers}

        def attention_shape(self, batch: int) -> tuple[int, int, int, int] | None:
            """(batch, heads, frames, head dim) of the dominant attention (the encoder's self-attention): the
            fast loop times the SDPA backends on it."""
            cfg = self.model.config
            return batch, cfg.encoder_attention_heads, cfg.max_source_positions, cfg.d_model // cfg.encoder_attention_heads

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            """The Trainer calls this when the plan turns gradient checkpointing on (large models on GPU)."""
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

        def forward(self, decoder_input_ids, labels=None, input_features=None, encoder_hidden=None):
            enc = _encoder(self.model)
            if encoder_hidden is None:
                if input_features is None:
                    raise TrainError("a batch needs input_features (log-mel) or encoder_hidden (cached encoder bottom)")
                with torch.set_grad_enabled(torch.is_grad_enabled() and self.bottom_trainable):
                    encoder_hidden = encode_bottom(enc, input_features, self.frozen_layers)
            hidden = encode_top(enc, encoder_hidden.to(enc.conv1.weight.dtype), self.frozen_layers)
            out = self.model(encoder_outputs=(hidden,), decoder_input_ids=decoder_input_ids, use_cache=False)
            logits = out.logits
            loss = None
            if labels is not None:
                loss = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                    ignore_index=-100, label_smoothing=self.spec.label_smoothing,
                )
            return {"loss": loss, "logits": logits}

    return _WhisperTrainee


def make_trainee(whisper, spec: ModeSpec):
    owner = apply_mode(whisper, spec)
    k = spec.frozen_layers(len(_encoder(whisper).layers))
    trainee = _trainee_class()(owner, whisper, k, spec)
    log.info("trainable parameters: %s (mode %s, frozen encoder layers %d)", count_params(trainee), spec.mode, k)
    return trainee


def frozen_bottom_cacheable(trainee) -> bool:
    """The bottom's output is a function of the clip only when none of its weights train."""
    return not trainee.bottom_trainable


def encode_frozen(trainee, mel_of: Callable[[int], np.ndarray], n: int, batch_size: int = 8, device: str = "cpu",
                  dtype: str = "float32"):
    """Run the frozen bottom once over n clips (``mel_of(i)`` gives clip i's log-mel) → tensor (n, frames, d)."""
    import torch
    from tqdm import tqdm

    enc = _encoder(trainee.model)
    k = trainee.frozen_layers
    was_training = trainee.training
    trainee.eval()
    out = None
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc=f"encoder layers 0-{k - 1} (frozen) once per clip", unit="batch"):
            idx = range(start, min(n, start + batch_size))
            mel = torch.as_tensor(np.stack([mel_of(i) for i in idx])).to(device)
            h = encode_bottom(enc, mel, k)
            if out is None:
                out = torch.empty((n, *h.shape[1:]), dtype=getattr(torch, dtype))
            out[start : start + len(idx)] = h.to("cpu", out.dtype)
    trainee.train(was_training)
    log.info("cached the frozen encoder bottom (%d layers) for %d clips in %.1f s: %.0f MB in RAM",
             k, n, time.perf_counter() - t0, out.numel() * out.element_size() / 1e6 if out is not None else 0)
    return out


def cache_pays(policy: str, cacheable: bool, epochs: float, n_clips: int, bytes_per_clip: int,
               free_bytes: int) -> tuple[bool, str]:
    """Whether to cache the frozen encoder bottom in RAM: (decision, reason)."""
    size = n_clips * bytes_per_clip
    if policy == "never":
        return False, "encoder_cache=never"
    if not cacheable:
        return False, "the encoder front-end trains (full mode, frozen_encoder_layers=0): nothing frozen to cache"
    if policy == "memory":
        return True, f"encoder_cache=memory ({size / 1e9:.2f} GB)"
    if epochs <= 1:
        return False, f"auto: {epochs:g} epoch(s): every clip passes the frozen bottom once anyway"
    if size > free_bytes // 2:
        return False, f"auto: the cache needs {size / 1e9:.1f} GB, more than half the free RAM ({free_bytes / 1e9:.1f} GB)"
    return True, f"auto: {epochs:g} epochs reuse it; {size / 1e9:.2f} GB ≤ half the free RAM ({free_bytes / 1e9:.1f} GB)"


def merged_whisper(trainee):
    """A plain WhisperForConditionalGeneration with the trained weights (LoRA merged into the base weights)."""
    owner = trainee.owner
    if hasattr(owner, "merge_and_unload"):
        return owner.merge_and_unload()
    return trainee.model


def part_of(name: str) -> str:
    """'encoder' for the encoder's weights (conv front-end, positions, layers, final norm), else 'decoder'
    (its layers, token embeddings, which the output projection shares, and positions)."""
    return "encoder" if ".encoder." in f".{name}" else "decoder"


def set_zh_generation(model, tokenizer) -> None:
    """Decode as trained: <|startoftranscript|><|zh|><|transcribe|><|notimestamps|>, greedy by default."""
    gc = model.generation_config
    gc.language = LANGUAGE
    gc.task = TASK
    gc.forced_decoder_ids = None  # the language/task fields above set the prompt in current transformers
    gc.return_timestamps = False
    if getattr(gc, "is_multilingual", None) is None:
        gc.is_multilingual = True
    model.config.forced_decoder_ids = None


def save_final(trainee, out_dir: Path, tokenizer, fe, pretrained_dir: Path | None = None,
               merge_alpha: float | Mapping[str, float] = 1.0) -> dict[str, Any]:
    """Write ``out_dir`` atomically: safetensors weights, config, generation config, tokenizer, feature extractor.
    ``merge_alpha`` (one factor, or one per part) pulls the weights back toward the pretrained ones (WiSE-FT)."""
    model = merged_whisper(trainee)
    factors = dict(merge_alpha) if isinstance(merge_alpha, Mapping) else merge_factors(float(merge_alpha),
                                                                                       encoder=None, decoder=None)
    if any(a != 1.0 for a in factors.values()):
        assert pretrained_dir is not None
        interpolate_weights(model, pretrained_dir, factors, part_of)
    set_zh_generation(model, tokenizer)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        fe.save_pretrained(str(tmp))
    return {"path": out_dir.name, "merge_alpha": factors, "params": sum(p.numel() for p in model.parameters())}



def trained_parts(spec: ModeSpec) -> tuple[str, ...]:
    """The parts whose weights training changes: ('encoder', 'decoder') or one of them."""
    if spec.mode == "lora":
        return tuple(p for p in ("encoder", "decoder") if p in spec.lora_parts)
    return ("decoder",) if spec.mode == "freeze-encoder" else ("encoder", "decoder")


def merge_writer(trainee, tokenizer, fe, pretrained_dir: Path) -> Callable[[Mapping[str, float], Path], dict[str, Any]]:
    """``write(factors, dest)``: the trained model (LoRA merged once) pulled back toward the pretrained weights
    by ``factors`` per part, saved like ``save_final``. Every call starts from the trained weights (a copy is
    kept: one model's size in RAM)."""
    import torch

    model = merged_whisper(trainee)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    set_zh_generation(model, tokenizer)

    def write(factors: Mapping[str, float], dest: Path) -> dict[str, Any]:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(trained[n])
        if any(a != 1.0 for a in factors.values()):
            interpolate_weights(model, pretrained_dir, dict(factors), part_of)
        with atomic_dir(dest) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            fe.save_pretrained(str(tmp))
        return {"path": dest.name, "merge_alpha": dict(factors), "params": sum(p.numel() for p in model.parameters())}

    return write
