"""One Kimi-Audio ASR sample: the two token streams the LLM reads, the speech mask and the labels.

    tok = load_text_tokenizer(model_dir)
    instruction = tok.encode(DEFAULT_INSTRUCTION)                # 「请把这段语音转录成文本。」
    sample = asr_sample(codes, tok.encode("你好"), instruction)   # training: streams + speech mask + labels
    prompt = asr_prompt(codes, instruction)                      # generation: the same up to the answer
    batch = collate([sample, ...], side="right")                 # training batch (tensors)
    batch = collate([prompt, ...], side="left")                  # generation batch: every row ends together
    order = length_grouped_batches([len(s) for s in samples], batch_size=8, seed=epoch)

Reads: GLM-4-Voice speech codes (0 … 16383, one per 80 ms of audio) and token ids of the text tokenizer.
Decides: nothing; the layout is Kimi-Audio's own (KIMI_AUDIO.md), so a model trained here reads the same
prompt the released model answers.
Writes: nothing (plain tuples; :func:`collate` makes tensors).

At every position the LLM sums the embeddings of both streams (and, on speech positions, the Whisper
feature of the same 80 ms). For I instruction ids, N codes and T transcript ids (``b`` = 151666 blank):

    position   0      1…I     I+1    I+2…I+N+1   I+N+2  I+N+3  I+N+4  I+N+5   I+N+6…   I+N+T+6  I+N+T+7
    audio    151670  b × I   151661  code+152064  151663 151675 151645 151671   b × T      b      151645
    text       b     instr     b        b × N       b      b      b      b     transcript 151667    b
    speech     .       .       .        True        .      .      .      .        .        .        .
    label      .       .       .          .         .      .      .      .     t1 …       151667   .

The generation prompt is positions 0 … I+N+5; the model then writes the text stream (feeding blank as the
audio token) until 151667. Labels follow the causal-LM convention of the model (and of Hugging Face):
``labels[p]`` is the text-stream token at p, scored against the logits at p − 1 (the model shifts); -100
elsewhere, so only the transcript and its end carry loss (no audio loss for ASR).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.families.kimi_audio.tokenizer import (
    ASSISTANT_START,
    MEDIA_BEGIN,
    MEDIA_END,
    MSG_END,
    N_REGULAR,
    N_SPEECH_CODES,
    PAD,
    SPEECH_CODE_OFFSET,
    SPEECH_CT,
    TEXT_BLANK,
    TEXT_EOS,
    USER_START,
)

DEFAULT_INSTRUCTION = "请把这段语音转录成文本。"  # Kimi-Audio-Evalkit's Chinese ASR prompt: train and evaluate with it
IGNORE_INDEX = -100  # label positions the loss skips (torch cross-entropy's default ignore_index)
PROMPT_EXTRA = 6  # prompt positions besides instruction and codes: 151670, 151661, 151663, 151675, 151645, 151671
ANSWER_EXTRA = 2  # answer positions besides the transcript: 151667 (text) and the closing 151645 (audio)
# Generation budget: one text token per speech code (12.5 tokens/s) is well above fast Mandarin (≈ 5-7
# characters/s, about one Qwen token each), plus room for the end token on very short clips. It stops a
# model that never emits 151667 (upstream users saw runaway output on long non-speech audio).
NEW_TOKENS_PER_CODE = 1
NEW_TOKENS_MARGIN = 16


class SampleError(ValueError):
    """Inputs that cannot make a Kimi-Audio sample; the message says what was expected."""


@dataclass(frozen=True)
class KimiSample:
    """Both streams of one sample, position by position; ``labels`` is None for a generation prompt."""

    audio_ids: tuple[int, ...]
    text_ids: tuple[int, ...]
    speech_mask: tuple[bool, ...]  # True exactly on the speech-code positions (where Whisper features go)
    labels: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.audio_ids)

    @property
    def n_codes(self) -> int:
        return sum(self.speech_mask)


def asr_prompt(codes: Sequence[int], instruction_ids: Sequence[int]) -> KimiSample:
    """The generation prompt for a clip's GLM ``codes``: positions 0 … I+N+5 of the table above."""
    codes, instruction_ids = _codes(codes), _text(instruction_ids, "instruction")
    n, i = len(codes), len(instruction_ids)
    rows = (  # (audio stream, text stream, speech?)
        ([USER_START], [TEXT_BLANK], False),
        ([TEXT_BLANK] * i, instruction_ids, False),
        ([MEDIA_BEGIN], [TEXT_BLANK], False),
        ([c + SPEECH_CODE_OFFSET for c in codes], [TEXT_BLANK] * n, True),
        ([MEDIA_END], [TEXT_BLANK], False),
        ([SPEECH_CT], [TEXT_BLANK], False),
        ([MSG_END], [TEXT_BLANK], False),
        ([ASSISTANT_START], [TEXT_BLANK], False),
    )
    return _join(rows)


def asr_sample(codes: Sequence[int], transcript_ids: Sequence[int], instruction_ids: Sequence[int]) -> KimiSample:
    """The training sample: :func:`asr_prompt` + the answer (transcript, 151667), with next-token labels."""
    prompt = asr_prompt(codes, instruction_ids)
    transcript_ids = _text(transcript_ids, "transcript")
    t = len(transcript_ids)
    answer = _join((
        ([TEXT_BLANK] * t, transcript_ids, False),
        ([TEXT_BLANK], [TEXT_EOS], False),
        ([MSG_END], [TEXT_BLANK], False),
    ))
    text = prompt.text_ids + answer.text_ids
    start = len(prompt)  # position of the first transcript id
    labels = [IGNORE_INDEX] * len(text)
    for q in range(start, start + t + 1):  # transcript ids and 151667 (the model predicts each from q - 1)
        labels[q] = text[q]
    return KimiSample(audio_ids=prompt.audio_ids + answer.audio_ids, text_ids=text,
                      speech_mask=prompt.speech_mask + answer.speech_mask, labels=tuple(labels))


def prompt_length(n_instruction: int, n_codes: int) -> int:
    """Positions of :func:`asr_prompt` (I + N + 6), without building it."""
    return n_instruction + n_codes + PROMPT_EXTRA


def sample_length(n_instruction: int, n_codes: int, n_transcript: int) -> int:
    """Positions of :func:`asr_sample` (I + N + T + 8), without building it: what planning sizes batches by."""
    return prompt_length(n_instruction, n_codes) + n_transcript + ANSWER_EXTRA


def max_new_tokens(n_codes: int) -> int:
    """Upper bound on generated text tokens for a clip of ``n_codes`` codes (see NEW_TOKENS_PER_CODE)."""
    return n_codes * NEW_TOKENS_PER_CODE + NEW_TOKENS_MARGIN


def collate(samples: Sequence[KimiSample], *, side: str = "right", pad_id: int = PAD) -> dict[str, Any]:
    """Pad samples of different lengths into one batch of tensors.

    ``side="right"`` (training): each row starts at column 0; ``side="left"`` (generation): each row ends in
    the last column, so the next token of every row is appended at the same place. Padded positions hold
    ``pad_id`` in both streams, False in ``speech_mask`` and ``attention_mask``, -100 in ``labels`` and 0 in
    ``position_ids``; real positions count 0, 1, 2 … from each row's own first token, wherever it sits.
    ``labels`` is in the batch when every sample has labels (mixing prompts and training samples is an error).
    """
    import torch

    if side not in ("right", "left"):
        raise SampleError(f"side={side!r}: expected 'right' (training) or 'left' (generation)")
    if not samples:
        raise SampleError("collate needs at least one sample")
    with_labels = [s.labels is not None for s in samples]
    if any(with_labels) and not all(with_labels):
        raise SampleError("collate got training samples and generation prompts together; batch them separately")
    rows, width = len(samples), max(len(s) for s in samples)
    batch = {
        "audio_ids": torch.full((rows, width), pad_id, dtype=torch.long),
        "text_ids": torch.full((rows, width), pad_id, dtype=torch.long),
        "speech_mask": torch.zeros((rows, width), dtype=torch.bool),
        "attention_mask": torch.zeros((rows, width), dtype=torch.long),
        "position_ids": torch.zeros((rows, width), dtype=torch.long),
    }
    if all(with_labels):
        batch["labels"] = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s)
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        batch["audio_ids"][row, cols] = torch.tensor(s.audio_ids)
        batch["text_ids"][row, cols] = torch.tensor(s.text_ids)
        batch["speech_mask"][row, cols] = torch.tensor(s.speech_mask)
        batch["attention_mask"][row, cols] = 1
        batch["position_ids"][row, cols] = torch.arange(n)
        if "labels" in batch:
            batch["labels"][row, cols] = torch.tensor(s.labels)
    return batch


def length_grouped_batches(lengths: Sequence[int], batch_size: int, *, seed: int = 0,
                           window: int = 50) -> list[list[int]]:
    """Batches of sample indices that group similar lengths (less padding), still shuffled.

    Indices are shuffled with ``seed`` (pass a new one each epoch), cut into windows of ``window`` batches,
    sorted by length inside each window and split into batches; the batches are then shuffled, except that
    the batch holding the longest sample goes first, so a batch that does not fit in memory fails at step 1.
    Every index appears exactly once.
    """
    if batch_size < 1 or window < 1:
        raise SampleError(f"batch_size={batch_size}, window={window}: both must be at least 1")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * window
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        group = sorted(order[start:start + span], key=lambda i: lengths[i], reverse=True)
        batches += [group[b:b + batch_size] for b in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


# --- helpers ----------------------------------------------------------------------------------------------


def _join(rows: Sequence[tuple[Sequence[int], Sequence[int], bool]]) -> KimiSample:
    audio: list[int] = []
    text: list[int] = []
    speech: list[bool] = []
    for a, t, is_speech in rows:
        assert len(a) == len(t), (a, t)
        audio += a
        text += t
        speech += [is_speech] * len(a)
    return KimiSample(audio_ids=tuple(audio), text_ids=tuple(text), speech_mask=tuple(speech))


def _codes(codes: Sequence[int]) -> list[int]:
    codes = [int(c) for c in codes]
    if not codes:
        raise SampleError("no speech codes: a clip gives at least one GLM code (one per 80 ms); is the audio empty?")
    bad = [c for c in codes if not 0 <= c < N_SPEECH_CODES]
    if bad:
        raise SampleError(f"speech codes {bad[:5]} outside 0 … {N_SPEECH_CODES - 1}: pass the GLM tokenizer's codes "
                          f"as they come (the {SPEECH_CODE_OFFSET} offset is added here)")
    return codes


def _text(ids: Sequence[int], what: str) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < N_REGULAR]
    if bad:
        raise SampleError(f"{what} ids {bad[:5]} are not plain text ids (0 … {N_REGULAR - 1}); encode the "
                          "text with TextTokenizer.encode, which never yields special tokens")
    return ids
