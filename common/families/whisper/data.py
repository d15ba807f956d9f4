"""Whisper model inputs: log-mel features, their float16 cache, label tokens, datasets and the collator.

    fe = feature_extractor_for(model_dir)                       # the model's WhisperFeatureExtractor
    mel = log_mel(samples, fe)                                  # float32 (n_mels, 3000): 30 s, padded
    records = write_feature_cache(records, run_dir, fe, out)    # float16 shards + {"features": {...}}
    prompt = prompt_ids(tokenizer)                              # <|startoftranscript|><|zh|><|transcribe|><|notimestamps|>
    ds = WhisperDataset(records, features=FeatureSource(...), tokenizer=tok, prompt=prompt)
    batch = WhisperCollator(pad_id)(list_of_items)

Every clip is padded (or cut) to Whisper's fixed 30-s window, exactly as at inference time (faster-whisper
and CTranslate2 pad to 30 s too), so the encoder sees the same context in training and evaluation.

Targets: the decoder reads ``prompt + text`` and must predict ``text + <|endoftext|>``; the prompt positions
are masked (-100) because decoding forces them anyway:

    decoder_input_ids  <|sot|> <|zh|> <|transcribe|> <|notimestamps|>  t1  t2 ... tn
    labels              -100    -100      -100            t1           t2  t3 ... <|endoftext|>

Feature cache layout (written by ``asr-ft extract``; rows of one shard are clips of one split):

    features/train-00000.npy   float16 (rows, n_mels, 3000), 256 clips (≈ 123 MB for 80 mels) per shard
    features.json              the feature extractor's parameters (finetune checks they match its model)
    record["features"] = {"shard": "features/train-00000.npy", "row": 17}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from common.families.whisper.conventions import (
    CHUNK_SECONDS,
    ENCODER_FRAMES,
    EOT_TOKEN,
    HOP_LENGTH,
    IGNORE_INDEX,
    MAX_TARGET_POSITIONS,
    N_FRAMES,
    N_MELS,
    N_SAMPLES,
    PROMPT_TOKENS,
    SAMPLE_RATE,
)

# common.core.records / common.core.store / common.core.audio are imported where used: training code (datasets, collator,
# targets) then runs on a bare GPU image with torch + transformers only.


log = logging.getLogger(__name__)

CACHE_DTYPE = np.float16  # log-mel values lie in [-1.5, 1.5] after Whisper's scaling: fp16 keeps ~3 decimals
SHARD_ROWS = 256  # clips per cache shard: 256 * 80 * 3000 * 2 B ≈ 123 MB (large enough, still mmap-friendly)
FEATURES_META = "features.json"

# Parameters of a feature extractor that change the features (compared between extract and finetune).
FEATURE_KEYS = ("feature_size", "sampling_rate", "hop_length", "n_fft", "chunk_length", "n_samples", "padding_value")


class FeatureError(ValueError):
    """Features or labels cannot be made for a record; the message names the record and the fix."""


# --- features ------------------------------------------------------------------------------------------


def feature_extractor_for(folder: Path | None, n_mels: int | None = None):
    """The folder's WhisperFeatureExtractor (preprocessor_config.json or processor_config.json); else (no
    folder, or CTranslate2 folders made by other tools, which lack the file) Whisper's standard one with
    ``n_mels`` bins."""
    from transformers import WhisperFeatureExtractor

    folder = Path(folder) if folder is not None else None
    if folder is not None and ((folder / "preprocessor_config.json").is_file()
                               or (folder / "processor_config.json").is_file()):
        fe = WhisperFeatureExtractor.from_pretrained(folder, local_files_only=True)
        if n_mels is not None and fe.feature_size != n_mels:
            raise ValueError(f"{folder}: the feature extractor makes {fe.feature_size} mel bins but the model "
                             f"expects {n_mels}; the folder mixes files of two models")
        return fe
    if folder is not None:
        log.info("%s has no preprocessor_config.json: using Whisper's standard feature extractor (%s mel bins)",
                 folder, n_mels or N_MELS)
    return WhisperFeatureExtractor(feature_size=n_mels or N_MELS, sampling_rate=SAMPLE_RATE)



def feature_params(fe) -> dict[str, Any]:
    return {k: getattr(fe, k) for k in FEATURE_KEYS if hasattr(fe, k)}


def log_mel(samples: np.ndarray, fe) -> np.ndarray:
    """float32 (n_mels, 3000) log-mel of one 16-kHz clip padded with silence to 30 s (longer clips are cut)."""
    out = fe(samples[:N_SAMPLES], sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
    assert out.shape[-1] == N_FRAMES, out.shape
    return out.astype(np.float32, copy=False)


def clip_samples(rec: dict, run_dir: Path) -> np.ndarray:
    from common.core.audio import load_audio  # soundfile: only needed when features come from audio
    from common.core.records import audio_location

    where = audio_location(rec, run_dir)
    try:
        samples, _ = load_audio(where)
    except FileNotFoundError:
        raise FeatureError(
            f"record {rec.get('id')!r}: audio {where} not found. The records' audio_path is relative to the run "
            "folder; re-run `asr-ft prepare` for this run."
        ) from None
    return samples


def record_mel(rec: dict, run_dir: Path, fe) -> np.ndarray:
    return log_mel(clip_samples(rec, run_dir), fe)


def cache_bytes(n_clips: int, n_mels: int) -> int:
    return n_clips * n_mels * N_FRAMES * np.dtype(CACHE_DTYPE).itemsize


def write_feature_cache(
    records: Sequence[dict], run_dir: Path, fe, out_dir: Path, split: str, shard_rows: int = SHARD_ROWS
) -> list[dict]:
    """Compute each record's log-mel once into float16 shards under out_dir/features/; return the records
    with ``"features": {"shard", "row"}`` added (paths relative to out_dir)."""
    from common.core.store import atomic_path

    n_mels = fe.feature_size
    out_records: list[dict] = []
    for start in range(0, len(records), shard_rows):
        chunk = records[start : start + shard_rows]
        rel = f"features/{split}-{start // shard_rows:05d}.npy"
        block = np.empty((len(chunk), n_mels, N_FRAMES), dtype=CACHE_DTYPE)
        for row, rec in enumerate(tqdm(chunk, desc=f"log-mel {split} shard {start // shard_rows}", unit="clip")):
            block[row] = record_mel(rec, run_dir, fe)
            out_records.append({**rec, "features": {"shard": rel, "row": row}})
        with atomic_path(out_dir / rel) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, block)
    return out_records


def write_features_meta(out_dir: Path, fe, extra: dict[str, Any]) -> None:
    from common.core.store import atomic_write_bytes

    meta = {"feature_extractor": feature_params(fe), "dtype": np.dtype(CACHE_DTYPE).name, **extra}
    atomic_write_bytes(out_dir / FEATURES_META, json.dumps(meta, indent=2, ensure_ascii=False).encode())


def cache_matches(extract_dir: Path, fe) -> tuple[bool, str]:
    """Whether extract's cached features were made with the same parameters as ``fe`` (the model's)."""
    path = extract_dir / FEATURES_META
    if not path.is_file():
        return False, f"{path.name} missing"
    cached = json.loads(path.read_text())["feature_extractor"]
    want = feature_params(fe)
    diff = {k: (cached.get(k), want[k]) for k in want if cached.get(k) != want[k]}
    if diff:
        return False, f"feature parameters differ from the model's (cached, model): {diff}"
    return True, "feature parameters match the model's"


class FeatureSource:
    """log-mel of a record: from extract's cache when the record has one (and it matches), else from its audio."""

    def __init__(self, fe, run_dir: Path | None, cache_dir: Path | None = None):
        self.fe = fe
        self.run_dir = run_dir
        self.cache_dir = cache_dir
        self._shards: dict[str, np.ndarray] = {}

    def __call__(self, rec: dict) -> np.ndarray:
        ref = rec.get("features")
        if ref is not None and self.cache_dir is not None:
            shard = self._shards.get(ref["shard"])
            if shard is None:
                shard = self._shards[ref["shard"]] = np.load(self.cache_dir / ref["shard"], mmap_mode="r")
            return np.asarray(shard[ref["row"]], dtype=np.float32)
        if self.run_dir is None:
            raise FeatureError(f"record {rec.get('id')!r} has no cached features and no run folder to read audio from")
        return record_mel(rec, self.run_dir, self.fe)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers re-open the memory maps themselves
        return {**self.__dict__, "_shards": {}}


def context_frames(seconds: float, longest_clip_s: float, margin_s: float = 1.0) -> tuple[int, str]:
    """Mel frames of the training window and why: Whisper's full 30-s window, or its first ``seconds``.

    A shorter window makes every encoder layer proportionally cheaper (attention quadratically), which is
    what makes CPU fine-tuning affordable; it is never shorter than the longest clip + ``margin_s``, so no
    speech is cut. Evaluation and inference always use the standard 30-s window: that the weights learned
    on the short window work there is measured, not assumed (bench/cpu_demo_recipe.py).
    """
    if seconds >= CHUNK_SECONDS:
        return N_FRAMES, f"the standard {CHUNK_SECONDS}-s window, as in evaluation"
    need = longest_clip_s + margin_s
    chosen = min(float(CHUNK_SECONDS), max(seconds, need))
    frames = min(N_FRAMES, 2 * -(-int(round(chosen * SAMPLE_RATE / HOP_LENGTH)) // 2))  # even: conv2 has stride 2
    why = (f"the first {frames / 100:g} s of each 30-s window ({frames // 2} of {ENCODER_FRAMES} encoder frames)"
           + (f"; {seconds:g} s requested, widened to the longest clip {longest_clip_s:.2f} s + {margin_s:g} s"
              if chosen > seconds else f"; every clip is shorter ({longest_clip_s:.2f} s)")
           + "; decoding still uses the full 30-s window")
    return frames, why


# --- labels --------------------------------------------------------------------------------------------


def prompt_ids(tokenizer) -> list[int]:
    """Token ids of <|startoftranscript|><|zh|><|transcribe|><|notimestamps|> in this tokenizer (the ids every
    engine decodes after, from the same function)."""
    from common.families.whisper.ct2 import prompt_zh_ids

    try:
        return prompt_zh_ids(tokenizer)
    except ValueError as e:
        raise FeatureError(f"{e}; a multilingual Whisper tokenizer is needed") from None


def eot_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(EOT_TOKEN)


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def make_target(prompt: Sequence[int], text: Sequence[int], eot: int) -> tuple[list[int], list[int]]:
    """(decoder_input_ids, labels) for one clip; see the module docstring for the alignment."""
    decoder_input = [*prompt, *text]
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + [*text, eot]
    assert len(decoder_input) == len(labels)
    return decoder_input, labels


def max_text_tokens(n_prompt: int = len(PROMPT_TOKENS)) -> int:
    return MAX_TARGET_POSITIONS - n_prompt  # 444: the decoder's positions hold prompt + text


# --- dataset and collator ------------------------------------------------------------------------------


@dataclass
class Example:
    id: str
    decoder_input_ids: list[int]
    labels: list[int]


def make_examples(records: Iterable[dict], tokenizer, prompt: Sequence[int]) -> tuple[list[Example], list[dict]]:
    """Tokenize transcripts; records whose tokens do not fit the decoder are returned as rejected."""
    from common.core.records import transcript

    eot, limit = eot_id(tokenizer), max_text_tokens(len(prompt))
    examples, rejected = [], []
    for rec in records:
        ids = text_ids(tokenizer, transcript(rec))
        if len(ids) + 1 > limit:
            rejected.append({"id": rec["id"], "reason": f"transcript has {len(ids)} tokens; the decoder holds {limit - 1}"})
            continue
        examples.append(Example(rec["id"], *make_target(prompt, ids, eot)))
    return examples, rejected


class WhisperDataset:
    """Map-style dataset of {"input_features" | "encoder_hidden", "decoder_input_ids", "labels"}.

    ``inputs(i)`` gives the encoder-side tensor of example i: a log-mel (float32 n_mels x frames) from a
    FeatureSource, or the cached output of the frozen bottom of the encoder (see common.families.whisper.trainee)."""

    def __init__(self, examples: Sequence[Example], inputs, input_key: str = "input_features"):
        self.examples = list(examples)
        self.inputs = inputs
        self.input_key = input_key

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.examples[i]
        return {self.input_key: self.inputs(i), "decoder_input_ids": ex.decoder_input_ids, "labels": ex.labels}


class PackedWhisperDataset:
    """Windows of up to ``pack`` clips: their audio joined with ``gap_s`` of silence, their transcripts joined.

    Whisper's encoder always runs on a 30-s window; a 2-5 s clip leaves most of it padding. Packing several
    clips into one window trains on the same full-length context with ``pack``-times fewer encoder passes
    per epoch (the encoder is ~90 % of a step on CPU). The grouping is reshuffled every epoch
    (``set_epoch``, called by the training loop), so a clip meets different neighbours. Clips whose joined
    audio would pass 30 s start a new window."""

    def __init__(self, examples: Sequence[Example], texts: Sequence[str], audio_of, fe, tokenizer,
                 prompt: Sequence[int], pack: int, gap_s: float = 0.3, seed: int = 0):
        self.examples, self.texts, self.audio_of = list(examples), list(texts), audio_of
        self.fe, self.tokenizer, self.prompt, self.eot = fe, tokenizer, list(prompt), eot_id(tokenizer)
        self.pack, self.gap, self.seed = pack, np.zeros(int(gap_s * SAMPLE_RATE), np.float32), seed
        self._lengths = [len(audio_of(i)) for i in range(len(self.examples))]
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)).tolist()
        self.windows: list[list[int]] = []
        for i in order:
            last = self.windows[-1] if self.windows else None
            size = sum(self._lengths[j] + len(self.gap) for j in last) if last else 0
            if last is None or len(last) >= self.pack or size + self._lengths[i] > N_SAMPLES:
                self.windows.append([i])
            else:
                last.append(i)

    def __len__(self) -> int:
        return -(-len(self.examples) // self.pack)  # the Trainer plans with this; set_epoch keeps it (± 1)

    def __getitem__(self, w: int) -> dict[str, Any]:
        group = self.windows[w % len(self.windows)]
        audio = np.concatenate([a for i in group for a in (self.audio_of(i), self.gap)])[:N_SAMPLES]
        ids = text_ids(self.tokenizer, "".join(self.texts[i] for i in group))[: max_text_tokens(len(self.prompt)) - 1]
        decoder_input, labels = make_target(self.prompt, ids, self.eot)
        return {"input_features": log_mel(audio, self.fe), "decoder_input_ids": decoder_input, "labels": labels}


class WhisperCollator:
    """Stack encoder inputs; right-pad decoder inputs with ``pad_id`` (the model's pad token; the padded
    positions come after each clip's text, so the causal decoder never reads them) and labels with -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        key = "encoder_hidden" if "encoder_hidden" in items[0] else "input_features"
        width = max(len(it["labels"]) for it in items)
        dec = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        lab = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["labels"])
            dec[row, :n] = torch.as_tensor(it["decoder_input_ids"])
            lab[row, :n] = torch.as_tensor(it["labels"])
        enc = torch.stack([torch.as_tensor(it[key]) for it in items])
        return {key: enc, "decoder_input_ids": dec, "labels": lab}
