"""Whisper fine-tuning glue around the Hugging Face Trainer: what trains, what is cached, checkpoints, resume.

    model, tokenizer, fe = load_whisper(model_dir)
    spec = ModeSpec(mode="lora", frozen_encoder_layers=3, lora_r=32)
    trainee = make_trainee(model, spec)                 # freezes / adds LoRA; a module the Trainer can train
    cache = encode_frozen(trainee, mels)                # once per clip: output of the frozen encoder bottom
    trainer = make_trainer(trainee, args, dataset, collator, on_save=ctx.sync)
    trainer.train(resume_from_checkpoint=last_checkpoint(ckpt_dir))
    save_final(trainee, final_dir, tokenizer, fe, pretrained_dir, merge_alpha=1.0)

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

Checkpoints hold only the trainable tensors (``trainable.safetensors``; for LoRA a few MB) plus the
Trainer's optimizer, scheduler, RNG and ``trainer_state.json``: enough to resume. ``final/`` is a plain
``WhisperForConditionalGeneration`` folder (LoRA merged), so export and inference need no peft.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MODES = ("full", "freeze-encoder", "lora")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # attention + FFN linears
TRAINABLE_WEIGHTS = "trainable.safetensors"  # what a checkpoint holds of the model
TRAINEE_META = "trainee.json"  # the ModeSpec and tensor names a checkpoint was written with
CHECKPOINT_PREFIX = "checkpoint-"  # the Trainer's folder naming: checkpoint-<global step>
CHECKPOINT_FILES = (TRAINABLE_WEIGHTS, "trainer_state.json")  # a checkpoint without these is incomplete


class TrainError(ValueError):
    """Training cannot be set up as asked; the message says why and which setting to change."""


# --- model ---------------------------------------------------------------------------------------------


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

    def frozen_layers(self, n_encoder_layers: int) -> int:
        return n_encoder_layers if self.mode == "freeze-encoder" else self.frozen_encoder_layers


def lora_target_names(whisper, spec: ModeSpec) -> list[str]:
    """Full module names that get LoRA, in the trainable encoder layers and the decoder layers.

    A target is a linear's name or a dotted suffix of its path inside a layer, optionally led by the part:
    ``q_proj`` (every q_proj), ``encoder_attn.q_proj`` (cross-attention only), ``decoder.fc1``."""
    n_enc = len(_encoder(whisper).layers)
    first = spec.frozen_layers(n_enc)
    pattern = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)$")
    names = []
    for name, module in whisper.named_modules():
        m = pattern.match(name)
        if not m or m.group(1) not in spec.lora_parts or not hasattr(module, "weight") or module.weight.ndim != 2:
            continue
        if m.group(1) == "encoder" and int(m.group(2)) < first:
            continue
        path = f".{m.group(1)}.{m.group(3)}"
        if any(path.endswith("." + t) for t in spec.lora_targets):
            names.append(name)
    if not names:
        raise TrainError(
            f"LoRA targets {list(spec.lora_targets)} in {list(spec.lora_parts)} match no layer above the frozen "
            f"bottom ({first} encoder layers); check lora_targets / lora_parts / frozen_encoder_layers"
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


def count_params(module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


# --- the encoder split: frozen bottom (cacheable) and trainable top --------------------------------------


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


# --- checkpoints ---------------------------------------------------------------------------------------


def trainable_state(trainee) -> dict[str, Any]:
    return {n: p.detach().contiguous().cpu() for n, p in trainee.named_parameters() if p.requires_grad}


def save_trainable(trainee, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = trainable_state(trainee)
    tmp = folder / f".{TRAINABLE_WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / TRAINABLE_WEIGHTS)
    meta = {"spec": asdict(trainee.spec), "frozen_layers": trainee.frozen_layers, "tensors": sorted(state)}
    (folder / TRAINEE_META).write_text(json.dumps(meta, indent=1))


def load_trainable(trainee, folder: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(folder / TRAINABLE_WEIGHTS))
    own = dict(trainee.named_parameters())
    missing = sorted(n for n, p in own.items() if p.requires_grad and n not in state)
    unknown = sorted(n for n in state if n not in own)
    if missing or unknown:
        raise TrainError(
            f"checkpoint {folder} does not fit this model/mode (missing {missing[:3]}…, unknown {unknown[:3]}…); "
            "remove the checkpoints folder or run with --force to start over"
        )
    import torch

    with torch.no_grad():
        for n, t in state.items():
            own[n].copy_(t)


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def last_checkpoint(folder: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``folder`` (incomplete ones are skipped, logged)."""
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()),
                   key=checkpoint_step, reverse=True)
    for path in found:
        if all((path / f).is_file() for f in CHECKPOINT_FILES):
            return path
        log.warning("ignoring incomplete checkpoint %s (interrupted while saving)", path)
    return None


def make_trainer(trainee, args, train_dataset, collator, on_save: Callable[[], None] | None = None,
                 eval_dataset=None, callbacks: Sequence = ()):
    """A Trainer that checkpoints only trainable tensors and calls ``on_save`` (e.g. ctx.sync) after each save."""
    from transformers import Trainer, TrainerCallback

    class _SyncAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if on_save is not None:
                on_save()

    class _Trainer(Trainer):
        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            if self.args.should_save:
                save_trainable(self.model, Path(output_dir or self.args.output_dir))

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            load_trainable(model or self.model, Path(resume_from_checkpoint))
            log.info("resumed weights from %s", resume_from_checkpoint)

    return _Trainer(
        model=trainee, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, data_collator=collator,
        callbacks=[_SyncAfterSave(), *callbacks],
    )


# --- the final model -----------------------------------------------------------------------------------


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


def merge_factors(alpha: float, encoder: float | None = None, decoder: float | None = None) -> dict[str, float]:
    """Per-part WiSE-FT factors: each part's own value when given, else ``alpha``."""
    return {"encoder": alpha if encoder is None else encoder, "decoder": alpha if decoder is None else decoder}


def interpolate_weights(model, pretrained_dir: Path, alpha: float | Mapping[str, float]) -> int:
    """WiSE-FT: θ ← θ_pre + α·(θ_ft − θ_pre), in place; α per part ({"encoder": a, "decoder": b}) or one for all.
    α=1 keeps the fine-tuned weights, 0 the pretrained. Returns how many tensors were interpolated."""
    import torch
    from safetensors.torch import load_file

    factors = alpha if isinstance(alpha, Mapping) else merge_factors(float(alpha))
    files = sorted(Path(pretrained_dir).glob("*.safetensors"))
    if not files:
        raise TrainError(f"merge factors {dict(factors)} need the pretrained weights as safetensors in "
                         f"{pretrained_dir}")
    pre: dict[str, Any] = {}
    for f in files:
        pre.update(load_file(str(f)))
    done = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            a = factors[part_of(name)]
            if name in pre and a != 1.0:
                ref = pre[name].to(p.dtype)
                p.copy_(ref + a * (p - ref))
                done += 1
    return done


def set_zh_generation(model, tokenizer) -> None:
    """Decode as trained: <|startoftranscript|><|zh|><|transcribe|><|notimestamps|>, greedy by default."""
    gc = model.generation_config
    gc.language = "zh"
    gc.task = "transcribe"
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
    factors = dict(merge_alpha) if isinstance(merge_alpha, Mapping) else merge_factors(float(merge_alpha))
    if any(a != 1.0 for a in factors.values()):
        assert pretrained_dir is not None
        interpolate_weights(model, pretrained_dir, factors)
    set_zh_generation(model, tokenizer)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    fe.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return {"path": out_dir.name, "merge_alpha": factors, "params": sum(p.numel() for p in model.parameters())}


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    return max(1, math.ceil(math.ceil(n_examples / (batch_size * world_size)) / grad_accum))



# --- the final model of a DeepSpeed run: the fp32 master weights of its last ZeRO checkpoint ----------------


def load_trained_weights(trainee, weights: Mapping[str, Any]) -> list[str]:
    """Copy the trainable parameters' values from ``weights`` (name → tensor, or a lazy tensor whose
    ``.contiguous()`` gives one, as DeepSpeed's zero_to_fp32 returns) into ``trainee``, cast to each
    parameter's dtype; frozen parameters and buffers keep their values. Returns the names copied.
    Raises TrainError when the names or shapes do not match this trainee (another model or mode)."""
    import torch

    params = dict(trainee.named_parameters())  # a tied weight appears once, under its first name
    wanted = [n for n, p in params.items() if p.requires_grad]
    missing = [n for n in wanted if n not in weights]
    unknown = sorted(set(weights) - set(trainee.state_dict()))  # the state dict also names tied aliases, buffers
    if missing or unknown:
        raise TrainError(
            f"the trained weights do not fit this model/mode: {len(missing)} trainable parameters missing "
            f"{missing[:3]}, {len(unknown)} unknown names {unknown[:3]}; they must come from a run of the same "
            "pretrained model, mode and LoRA settings"
        )
    with torch.no_grad():
        for name in wanted:
            value = weights[name].contiguous()
            if tuple(value.shape) != tuple(params[name].shape):
                raise TrainError(f"trained weight {name} has shape {tuple(value.shape)}, this model's "
                                 f"{tuple(params[name].shape)}: not a run of the same model")
            params[name].copy_(value)
            del value
    return wanted


def _leave_zero3_init() -> None:
    """Models loaded from now on are plain ones: while the Trainer's DeepSpeed ZeRO-3 config is registered,
    ``from_pretrained`` builds models partitioned (deepspeed.zero.Init), which needs every rank."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config
    except ImportError:  # a transformers without the DeepSpeed integration registers nothing
        return
    if is_deepspeed_zero3_enabled():
        unset_hf_deepspeed_config()


def trainee_from_zero_checkpoint(checkpoint: Path, pretrained_dir: Path, spec: ModeSpec):
    """A fresh trainee on the CPU, built from ``pretrained_dir`` as ``spec`` says, holding the fp32 master
    weights of the DeepSpeed ZeRO-2/3 ``checkpoint`` of that training (its trainable parameters; the frozen
    ones stay the exact fp32 pretrained values, where ZeRO holds only a 16-bit copy). One process, no GPU,
    no collective: rank 0 alone calls it after training. For LoRA the checkpoint's adapters are loaded
    (save_final merges them)."""
    import torch
    from transformers import WhisperForConditionalGeneration

    from common.training.zero_export import zero_fp32_weights

    _leave_zero3_init()
    model = WhisperForConditionalGeneration.from_pretrained(str(pretrained_dir), torch_dtype=torch.float32)
    trainee = make_trainee(model, spec)
    t0 = time.perf_counter()
    names = set(load_trained_weights(trainee, zero_fp32_weights(checkpoint)))
    log.info("loaded the fp32 master weights of %d trained tensors (%d values) from the ZeRO checkpoint %s "
             "in %.1f s", len(names), sum(p.numel() for n, p in trainee.named_parameters() if n in names),
             checkpoint, time.perf_counter() - t0)
    return trainee
