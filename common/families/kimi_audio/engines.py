"""Kimi-Audio transcription: 16-kHz clips → speech codes and Whisper features → the ASR prompt → greedy text.

    engine, used = open_engine(folder, EngineRequest(device="cuda"))  # a model folder or an export folder
    engine = KimiEngine(folder, device="cpu", dtype=torch.float32)
    engine.transcribe([clip_a, clip_b])       # ["…", "…"]
    engine.generate([clip_a, clip_b])         # [Generated(ids=[…], stopped="eos", budget=41), …]

Reads: a Kimi-Audio model folder (see :mod:`common.families.kimi_audio.folder`): config.json and the LLM
safetensors, ``whisper-large-v3/`` (only the encoder is loaded), ``glm-4-voice-tokenizer/``, and
``tiktoken.model`` when present (else the pinned stand-in BPE). The folder is checked first, every problem
listed. Decides: the dtype (bfloat16 on CUDA, float32 on CPU, unless given), each clip's new-token budget,
which clips share a batch. Writes: nothing.

How a batch is decoded (the same for every model of an evaluation; ``info["decoding"]`` records it):

1. Front ends, per clip: GLM-4-Voice codes (the tokenizer in float32, because a code is a nearest-neighbour
   choice and must equal the one ``extract`` computed for training) and the frozen Whisper encoder's stacked
   features (``model.encode_clip``); both give n = ⌈L / 1280⌉ per clip.
2. The prompt of :func:`~common.families.kimi_audio.sample.asr_prompt` with the instruction
   「请把这段语音转录成文本。」, left-padded into one batch (``collate(side="left")``) so every row's next
   token goes in the same column.
3. One forward over the prompts fills the KV cache; then one position per step for every row: the chosen
   token on the text stream, blank (151666) on the audio stream; each row counts its own positions.
4. Greedy: the arg-max of the text logits over the text ids (0 … 152063). A row stops at 151667 or when it
   has chosen its budget of tokens (151667 included): ``min(n + 16, the request's max_new_tokens, the
   positions left before max_position_embeddings)``. A stopped row is padding from then on; the batch stops
   when every row has.
5. The ids before 151667 are decoded with the text tokenizer, special tokens skipped.

Clips are sorted by length and decoded ``batch_size`` at a time; the result is in the input order. A row's
tokens do not depend on the other rows (the model's padding is exact; the tests check it).

Where this differs from upstream's ``kimia_infer`` (which decodes one clip at a time): its arg-max runs over
the whole vocabulary and drops speech-code ids afterwards (here they are never chosen); its repetition penalty
starts only once 16 tokens exist (here it covers the row's last 16 chosen tokens from the first step); its
budget is 7500 positions minus the prompt (here ⌈clip⌉-bound, see ``sample.max_new_tokens``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from common.families import EngineRequest, FamilyError
from common.families.kimi_audio import sample
from common.families.kimi_audio.conventions import POSITIONS_PER_SECOND, WHISPER_SUBFOLDER
from common.families.kimi_audio.folder import (
    GLM_SUBFOLDER,
    PREPROCESSOR_FILE,
    STANDIN_FILE,
    WHISPER_LOG_MEL,
    check_model_folder,
    llm_weight_files,
    model_folder,
    whisper_prefix,
)
from common.families.kimi_audio.tokenizer import PAD, TEXT_BLANK, TEXT_EOS, TEXT_VOCAB

log = logging.getLogger(__name__)

BACKEND = "torch"  # asr-ft's own model code (common/families/kimi_audio/model.py), plain PyTorch + SDPA
DEFAULT_BATCH_SIZE = 16  # clips decoded together; the evaluate stage hands over at most its own batch size
REPETITION_WINDOW = 16  # chosen tokens a repetition penalty looks back over (upstream's text window)


@dataclass(frozen=True)
class Generated:
    """One clip's decoding: the text ids before 151667, why it stopped, and its budget of new tokens."""

    ids: list[int]
    stopped: Literal["eos", "budget"]
    budget: int
    n_codes: int


class KimiEngine:
    """Transcribes batches of 16-kHz float32 clips with a Kimi-Audio model folder (see the module docstring)."""

    backend = BACKEND

    def __init__(self, folder: Path, device: str = "cpu", dtype: Any = None, max_new_tokens: int | None = None,
                 repetition_penalty: float = 1.0, batch_size: int = DEFAULT_BATCH_SIZE,
                 instruction: str = sample.DEFAULT_INSTRUCTION):
        import torch

        from common.families.kimi_audio.glm_tokenizer import GlmSpeechTokenizer
        from common.families.kimi_audio.model import load_pretrained
        from common.families.kimi_audio.tokenizer import load_text_tokenizer

        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens}: give at least 1, or None for the clip-length budget")
        if repetition_penalty <= 0 or batch_size < 1:
            raise ValueError(f"repetition_penalty {repetition_penalty} must be > 0 (1.0 = none) and batch_size "
                             f"{batch_size} ≥ 1")
        self.folder = model_folder(folder)
        self.config = check_model_folder(self.folder)
        self.device = torch.device(device)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.max_new_tokens, self.repetition_penalty, self.batch_size = max_new_tokens, repetition_penalty, batch_size
        self.model = load_pretrained(self.folder, dtype=self.dtype, device=self.device).eval().requires_grad_(False)
        self.encoder, self.feature_extractor = load_whisper_encoder(self.folder / WHISPER_SUBFOLDER, self.device,
                                                                    self.dtype)
        self.glm = GlmSpeechTokenizer.from_folder(self.folder / GLM_SUBFOLDER, device=self.device,
                                                  dtype=torch.float32)
        self.tokenizer = load_text_tokenizer(self.folder)
        self.instruction = instruction
        self.instruction_ids = self.tokenizer.encode(instruction)
        self.text_vocab = min(self.config.kimia_text_output_vocab, TEXT_VOCAB)
        standin = (self.folder / STANDIN_FILE).is_file()
        if standin:
            log.warning("%s is a random stand-in (%s): its transcripts and CER mean nothing", self.folder,
                        STANDIN_FILE)
        decoding = {
            "search": "greedy", "instruction": instruction, "instruction_ids": self.instruction_ids,
            "max_new_tokens": self.budget_policy(), "repetition_penalty": repetition_penalty,
            "repetition_window": REPETITION_WINDOW if repetition_penalty != 1.0 else None,
            "text_ids": f"0 … {self.text_vocab - 1}", "stop": TEXT_EOS, "audio_stream_token": TEXT_BLANK,
            "padding": "left", "batch_size": batch_size,
        }
        self.info: dict[str, Any] = {
            "backend": BACKEND, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "text_tokenizer": {"source": self.tokenizer.bpe.source, "sha256": self.tokenizer.bpe.sha256},
            "glm_codebook": self.glm.config.codebook_size, "standin": standin, "decoding": decoding,
            "comparable": {"instruction_ids": self.instruction_ids, "max_new_tokens": self.budget_policy()},
        }

    def budget_policy(self) -> dict[str, Any]:
        """How each clip's budget of new tokens is set (what ``info["comparable"]`` holds)."""
        return {"per_code": sample.NEW_TOKENS_PER_CODE, "margin": sample.NEW_TOKENS_MARGIN,
                "cap": self.max_new_tokens, "max_positions": self.config.max_position_embeddings}

    def budget(self, n_codes: int) -> int:
        """New tokens (151667 included) a clip of ``n_codes`` codes may take; ValueError if its prompt alone
        does not fit the model's positions."""
        budget = sample.max_new_tokens(n_codes)
        if self.max_new_tokens is not None:
            budget = min(budget, self.max_new_tokens)
        room = self.config.max_position_embeddings - sample.prompt_length(len(self.instruction_ids), n_codes)
        if room < 1:
            seconds = n_codes / POSITIONS_PER_SECOND
            raise ValueError(f"a {seconds:.0f}-s clip ({n_codes} codes) leaves no room for a transcript in the "
                             f"model's {self.config.max_position_embeddings} positions; cut it into shorter clips")
        return min(budget, room)

    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]:
        return [self.tokenizer.decode(g.ids, skip_special=True).strip() for g in self.generate(audios)]

    def generate(self, audios: Sequence[np.ndarray]) -> list[Generated]:
        """Each clip's decoding, in the input order (see the module docstring)."""
        import torch

        from common.families.kimi_audio.model import encode_clip

        if not len(audios):
            return []
        clips = [np.ascontiguousarray(a, dtype=np.float32) for a in audios]
        codes = self.glm.encode(clips)
        out: list[Generated | None] = [None] * len(clips)
        order = sorted(range(len(clips)), key=lambda i: -len(codes[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                features = [encode_clip(self.encoder, self.feature_extractor, clips[i]) for i in rows]
                for i, generated in zip(rows, self.decode([codes[i] for i in rows], features), strict=True):
                    out[i] = generated
        return out  # type: ignore[return-value]

    def decode(self, codes: Sequence[Sequence[int]], features: Sequence[Any]) -> list[Generated]:
        """Greedy decoding of one batch: each row's GLM codes and its (n, 4·d) Whisper features."""
        import torch

        budgets = [self.budget(len(c)) for c in codes]
        batch = sample.collate([sample.asr_prompt(c, self.instruction_ids) for c in codes], side="left")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        rows = len(codes)
        out = self.model(batch["audio_ids"], batch["text_ids"], speech_mask=batch["speech_mask"],
                         whisper_features=[f.to(self.device) for f in features],
                         attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                         use_cache=True, logits_to_keep=1)
        cache, mask = out.cache, batch["attention_mask"]
        chosen: list[list[int]] = [[] for _ in range(rows)]
        stopped: list[str | None] = [None] * rows
        while True:
            scores = out.logits[:, -1, :self.text_vocab].float()
            if self.repetition_penalty != 1.0:
                scores = self._penalize(scores, chosen)
            picks = scores.argmax(dim=-1).tolist()
            for b, pick in enumerate(picks):
                if stopped[b] is None:
                    chosen[b].append(pick)
                    stopped[b] = "eos" if pick == TEXT_EOS else "budget" if len(chosen[b]) >= budgets[b] else None
            if all(s is not None for s in stopped):
                break
            live = torch.tensor([s is None for s in stopped], device=self.device)
            pad = torch.full((rows,), PAD, device=self.device)
            text = torch.where(live, torch.tensor(picks, device=self.device), pad)[:, None]
            audio = torch.where(live, torch.full_like(pad, TEXT_BLANK), pad)[:, None]
            mask = torch.cat([mask, live.long()[:, None]], dim=1)
            out = self.model(audio, text, attention_mask=mask, cache=cache, logits_to_keep=1)
            cache = out.cache
        return [Generated(ids=[t for t in ids if t != TEXT_EOS], stopped=s, budget=budget, n_codes=len(c))
                for ids, s, budget, c in zip(chosen, stopped, budgets, codes, strict=True)]

    def _penalize(self, scores, chosen: list[list[int]]):
        """Scores of each row's last REPETITION_WINDOW chosen tokens: divided by the penalty when positive,
        multiplied when negative (the usual repetition penalty; 151667 is never penalized)."""
        import torch

        p = self.repetition_penalty
        for b, ids in enumerate(chosen):
            recent = sorted(set(ids[-REPETITION_WINDOW:]) - {TEXT_EOS})
            if recent:
                index = torch.tensor(recent, device=scores.device)
                seen = scores[b, index]
                scores[b, index] = torch.where(seen < 0, seen * p, seen / p)
        return scores


def load_whisper_encoder(folder: Path, device: Any, dtype: Any) -> tuple[Any, Any]:
    """(WhisperEncoder, WhisperFeatureExtractor) of a Hugging Face Whisper folder: only the encoder's weights are
    read (see :func:`~common.families.kimi_audio.folder.whisper_prefix`), strictly, frozen, in ``dtype`` on
    ``device``."""
    import torch
    from safetensors import safe_open
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    folder = Path(folder)
    config = WhisperConfig.from_json_file(str(folder / "config.json"))
    with torch.device("meta"):
        encoder = WhisperEncoder(config)
    files, _ = llm_weight_files(folder)
    keys = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys.update(dict.fromkeys(f.keys(), path))
    prefix = whisper_prefix(keys)
    state: dict[str, Any] = {}
    for path in files:  # the encoder's tensors only (a full checkpoint also holds the decoder)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in (k for k, where in keys.items() if where == path and k.startswith(prefix)):
                state[key.removeprefix(prefix)] = f.get_tensor(key).to(device=device, dtype=dtype)
    missing = sorted(set(encoder.state_dict()) - set(state))
    if missing:  # folder.whisper_problems reports these first; this guards direct calls
        raise FamilyError(f"{folder}: the Whisper encoder lacks {len(missing)} weights ({', '.join(missing[:5])} …)")
    encoder.load_state_dict(state, strict=True, assign=True)
    if (folder / PREPROCESSOR_FILE).is_file():
        extractor = WhisperFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
    else:  # upstream computes Whisper's log-mel itself, so a downloaded folder may have no preprocessor file
        extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, **WHISPER_LOG_MEL)
        log.info("%s has no %s: Whisper's log-mel settings %s with %d mel bins", folder, PREPROCESSOR_FILE,
                 WHISPER_LOG_MEL, config.num_mel_bins)
    log.info("Whisper encoder: %s (d_model %d, %d layers, %s on %s)", folder, config.d_model, config.encoder_layers,
             dtype, device)
    return encoder.eval().requires_grad_(False), extractor


def open_engine(folder: Path, request: EngineRequest) -> tuple[KimiEngine, dict[str, Any]]:
    """(engine, what was loaded) for the evaluate stage: greedy decoding with asr-ft's own model code.

    ``request.compute_type`` is CTranslate2's setting and is not used: the dtype is bfloat16 on CUDA and
    float32 on CPU (as the whisper family's transformers engine); ``request.threads`` sets torch's CPU threads."""
    import torch

    if request.backend not in ("auto", BACKEND):
        raise FamilyError(f"backend {request.backend!r}: the kimi-audio family decodes with {BACKEND!r} (asr-ft's "
                          "own PyTorch model code); pass --backend auto")
    if request.beam_size != 1:
        raise FamilyError(f"beam_size {request.beam_size}: the kimi-audio family decodes greedily, as the model's "
                          "own inference code does; pass --beam-size 1")
    if request.threads and request.device == "cpu":
        torch.set_num_threads(request.threads)
        log.info("kimi-audio engine: %d CPU threads (request)", request.threads)
    path = model_folder(folder)
    engine = KimiEngine(path, device=request.device, max_new_tokens=request.max_new_tokens)
    used = {"folder": str(path), "backend": BACKEND, "source_format": "kimi-audio",
            "export_folder": path != Path(folder)}
    return engine, used
