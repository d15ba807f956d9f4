"""Batched Whisper transcription with one set of decoding settings for every model.

Two engines share the same inputs and the same settings, so a comparison between models measures the
models and nothing else:

- ``ct2`` (CPU, the default without CUDA): CTranslate2's ``Whisper.generate`` on a batch of log-mel features
  computed by the model's own ``WhisperFeatureExtractor``; the prompt tokens are given explicitly.
- ``hf`` (the default with CUDA; bf16 on GPU, fp32 on CPU): ``WhisperForConditionalGeneration.generate``
  on the same features with the same prompt (language, task, no timestamps).

Decoding settings (:class:`DecodeOptions`): greedy by default (``beam_size`` 1), language ``zh``, task
``transcribe``, no timestamps, at most ``max_new_tokens`` tokens after the prompt, and each model's own
suppression lists (``suppress_tokens`` at every step, ``begin_suppress_tokens`` — blank and end-of-text —
at the first one), which are the same list for every multilingual Whisper checkpoint.

Lengths: CTranslate2's Whisper generates at most ``min(max_length // 2, max_length - (P - 1))`` tokens
after a prompt of P tokens (openai/whisper's ``sample_len = n_text_ctx // 2`` rule, with the prompt's last
token counted as the first decoding step; measured, and checked by the tests). So ``max_new_tokens`` N is
passed to it as :func:`ct2_max_length` (N, P) and to transformers as ``max_new_tokens = N``.

Timing: ``decode_seconds`` of an utterance is its share of its batch's wall time (feature extraction,
encoder and decoder; audio file reading excluded), split in proportion to the utterances' durations.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

# ct2 is light (numpy only): the engines run where soundfile is absent.
from common.families.whisper.ct2 import SAMPLE_RATE

log = logging.getLogger(__name__)

MAX_TARGET_POSITIONS = 448  # Whisper's decoder context (tokens)
DEFAULT_MAX_NEW_TOKENS = MAX_TARGET_POSITIONS // 2  # 224: openai/whisper's sample_len, faster-whisper's default
LANGUAGES_WITH_PROMPT = "<|startoftranscript|><|{language}|><|{task}|><|notimestamps|>"

Backend = Literal["ct2", "hf"]


@dataclass(frozen=True)
class DecodeOptions:
    """Decoding settings applied identically to every model (recorded in run_info.json)."""

    language: str = "zh"
    task: Literal["transcribe", "translate"] = "transcribe"
    beam_size: int = 1  # 1 = greedy
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    suppress_blank: bool = True  # the model's begin_suppress_tokens at the first step
    suppress_tokens: str = "model"  # the model's own suppress_tokens list (config suppress_ids)
    timestamps: bool = False

    def __post_init__(self) -> None:
        assert self.beam_size >= 1 and 1 <= self.max_new_tokens <= MAX_TARGET_POSITIONS - 4

    @property
    def prompt(self) -> str:
        return LANGUAGES_WITH_PROMPT.format(language=self.language, task=self.task)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prompt": self.prompt, "search": "greedy" if self.beam_size == 1 else "beam"}


def ct2_max_length(max_new_tokens: int, prompt_length: int) -> int:
    """CTranslate2's ``max_length`` that lets Whisper decode exactly ``max_new_tokens`` after the prompt."""
    return max(2 * max_new_tokens, max_new_tokens + prompt_length - 1)


class Engine(Protocol):
    backend: Backend
    info: dict[str, Any]

    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]: ...


# ---------------------------------------------------------------------------------------------
# Feature extraction and tokenizers from a model folder
# ---------------------------------------------------------------------------------------------


def feature_extractor_for(folder: Path, n_mels: int | None = None):
    """The folder's WhisperFeatureExtractor (preprocessor_config.json or processor_config.json); else
    Whisper's standard one with ``n_mels`` bins (CTranslate2 folders made by other tools lack the file)."""
    from transformers import WhisperFeatureExtractor

    folder = Path(folder)
    if (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file():
        fe = WhisperFeatureExtractor.from_pretrained(folder, local_files_only=True)
        if n_mels is not None and fe.feature_size != n_mels:
            raise ValueError(f"{folder}: the feature extractor makes {fe.feature_size} mel bins but the model "
                             f"expects {n_mels}; the folder mixes files of two models")
        return fe
    log.info("%s has no preprocessor_config.json: using Whisper's standard feature extractor (%s mel bins)",
             folder, n_mels or 80)
    return WhisperFeatureExtractor(feature_size=n_mels or 80, sampling_rate=SAMPLE_RATE)


def features(fe: Any, audios: Sequence[np.ndarray]) -> np.ndarray:
    """Batch of log-mel features (B, n_mels, 3000), float32, each clip padded/cut to 30 s."""
    out = fe(list(audios), sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    return np.ascontiguousarray(out, dtype=np.float32)


def prompt_ids(tokenizer: Any, options: DecodeOptions) -> list[int]:
    from common.families.whisper.ct2 import prompt_token_ids

    return prompt_token_ids(tokenizer, options.prompt)


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


def cpu_threads() -> int:
    """Cores this process may use (cgroup/affinity aware when the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class CT2Engine:
    """CTranslate2 Whisper on a batch of log-mel features."""

    backend: Backend = "ct2"

    def __init__(self, ct2_dir: Path, options: DecodeOptions, *, device: str = "cpu",
                 compute_type: str = "int8", threads: int = 0):
        import ctranslate2
        from tokenizers import Tokenizer

        self.options = options
        self.model = ctranslate2.models.Whisper(
            str(ct2_dir), device=device, compute_type=compute_type, intra_threads=threads or cpu_threads()
        )
        self.fe = feature_extractor_for(ct2_dir, self.model.n_mels)
        self.tokenizer = Tokenizer.from_file(str(Path(ct2_dir) / "tokenizer.json"))
        self.prompt = prompt_ids(self.tokenizer, options)
        self.info = {"backend": "ct2", "device": device, "compute_type": compute_type,
                     "model_compute_type": self.model.compute_type, "threads": threads or cpu_threads(),
                     "prompt_ids": self.prompt, "n_mels": self.model.n_mels}

    def generate_ids(self, audios: Sequence[np.ndarray]) -> list[list[int]]:
        """Token ids decoded after the prompt, one list per clip."""
        import ctranslate2

        o = self.options
        batch = ctranslate2.StorageView.from_array(features(self.fe, audios))
        results = self.model.generate(
            batch, [self.prompt] * len(audios), beam_size=o.beam_size,
            max_length=ct2_max_length(o.max_new_tokens, len(self.prompt)),
            length_penalty=o.length_penalty, repetition_penalty=o.repetition_penalty,
            no_repeat_ngram_size=o.no_repeat_ngram_size, suppress_blank=o.suppress_blank, suppress_tokens=[-1],
        )
        return [list(r.sequences_ids[0]) for r in results]

    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]:
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in self.generate_ids(audios)]


class HFEngine:
    """transformers WhisperForConditionalGeneration.generate (bf16 on CUDA, fp32 on CPU)."""

    backend: Backend = "hf"

    def __init__(self, hf_dir: Path, options: DecodeOptions, *, device: str = "cuda"):
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast

        self.options = options
        self.device = device
        self.dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.model = WhisperForConditionalGeneration.from_pretrained(
            hf_dir, dtype=self.dtype, local_files_only=True).to(device).eval()
        self.fe = feature_extractor_for(hf_dir, self.model.config.num_mel_bins)
        self.tokenizer = WhisperTokenizerFast.from_pretrained(hf_dir, local_files_only=True)
        self.prompt = prompt_ids(self.tokenizer, options)
        self.generation_config = self._generation_config(options)
        self.info = {"backend": "hf", "device": device, "dtype": str(self.dtype).removeprefix("torch."),
                     "prompt_ids": self.prompt, "n_mels": self.model.config.num_mel_bins}

    def _generation_config(self, o: DecodeOptions):
        """The model's generation config (its suppression lists) with the shared decoding settings."""
        gen = copy.deepcopy(self.model.generation_config)
        gen.update(
            max_length=None, max_new_tokens=o.max_new_tokens, num_beams=o.beam_size, do_sample=False,
            length_penalty=o.length_penalty, repetition_penalty=o.repetition_penalty,
            no_repeat_ngram_size=o.no_repeat_ngram_size, return_timestamps=False,
            begin_suppress_tokens=list(gen.begin_suppress_tokens or []) if o.suppress_blank else None,
        )
        return gen

    def generate_ids(self, audios: Sequence[np.ndarray]) -> list[list[int]]:
        """Token ids decoded after the prompt (up to end-of-text, exclusive), one list per clip."""
        import torch

        feats = torch.from_numpy(features(self.fe, audios)).to(self.device, self.dtype)
        prompt = torch.tensor([self.prompt] * len(audios), device=self.device)
        with torch.inference_mode():
            out = self.model.generate(feats, decoder_input_ids=prompt, generation_config=self.generation_config)
        ids = (out.sequences if hasattr(out, "sequences") else out).tolist()
        eot = self.generation_config.eos_token_id
        result = []
        for seq in ids:
            if seq[:len(self.prompt)] == self.prompt:  # some transformers versions return the prompt too
                seq = seq[len(self.prompt):]
            result.append(seq[:seq.index(eot)] if eot in seq else seq)
        return result

    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(self.generate_ids(audios), skip_special_tokens=True)]


# ---------------------------------------------------------------------------------------------
# Transcribing a set of utterances
# ---------------------------------------------------------------------------------------------


@dataclass
class Utterance:
    id: str
    reference: str
    audio: str  # local path of the audio file
    duration: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _batches(items: Sequence[Utterance], size: int) -> Iterator[list[Utterance]]:
    # Longest first: clips of similar length decode similar numbers of tokens, so a batch waits less
    # for its longest hypothesis (every clip is padded to 30 s, so the encoder cost is the same).
    ordered = sorted(items, key=lambda u: -(u.duration or 0.0))
    for i in range(0, len(ordered), size):
        yield ordered[i:i + size]


def transcribe_utterances(
    engine: Engine,
    utterances: Sequence[Utterance],
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Transcribe ``utterances`` in batches; rows ``{id, reference, hypothesis, duration, decode_seconds}``
    in the input order. An audio file that cannot be read gives a row with ``error`` (and no hypothesis)."""
    from common.core.audio import AudioProblem, load_audio

    rows: dict[str, dict[str, Any]] = {}
    for batch in _batches(utterances, batch_size):
        audios, ok = [], []
        for u in batch:
            try:
                samples, _ = load_audio(u.audio)
            except (AudioProblem, OSError) as e:
                rows[u.id] = {"id": u.id, "error": f"{getattr(e, 'reason', 'unreadable')}: {e}"}
                continue
            u.duration = u.duration if u.duration is not None else round(len(samples) / SAMPLE_RATE, 4)
            audios.append(samples)
            ok.append(u)
        if ok:
            t0 = time.perf_counter()
            texts = engine.transcribe(audios)
            seconds = time.perf_counter() - t0
            total = sum(u.duration or 0.0 for u in ok) or float(len(ok))
            for u, text in zip(ok, texts, strict=True):
                share = (u.duration or 0.0) / total if total else 1 / len(ok)
                rows[u.id] = {"id": u.id, "reference": u.reference, "hypothesis": text,
                              "duration": u.duration, "decode_seconds": round(seconds * share, 6), **u.extra}
        if progress:
            progress(len(batch))
    return [rows[u.id] for u in utterances]
