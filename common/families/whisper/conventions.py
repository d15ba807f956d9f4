"""Whisper's fixed conventions, each defined once with its derivation (as openai/whisper's ``audio.py``).

Every other Whisper module (data, trainee, engines, the CTranslate2 reader, validation) imports these; none
redefines them. Standard library only: the image's model-bundle step imports this with nothing else installed.
"""

from __future__ import annotations

SAMPLE_RATE = 16_000  # Hz: Whisper's input rate (also the rate `prepare` stores clips at)
CHUNK_SECONDS = 30  # Whisper's fixed input window
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples in one window
HOP_LENGTH = 160  # samples between log-mel frames: 10 ms
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 log-mel frames per window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100
ENCODER_FRAMES = N_FRAMES // 2  # 1500: the encoder's second convolution has stride 2
N_MELS = 80  # log-mel bins of every Whisper before large-v3 (large-v3 and turbo: 128, read from the model)
MAX_TARGET_POSITIONS = 448  # decoder context (tokens) of every OpenAI Whisper
DEFAULT_MAX_NEW_TOKENS = MAX_TARGET_POSITIONS // 2  # 224: openai/whisper's sample_len, faster-whisper's default

# The Chinese transcription prompt: the decoder's first tokens in training labels, in final/'s generation
# config and in every engine, so a model is trained and tested on the same task.
LANGUAGE, TASK = "zh", "transcribe"
PROMPT_TEMPLATE = "<|startoftranscript|><|{language}|><|{task}|><|notimestamps|>"
PROMPT = PROMPT_TEMPLATE.format(language=LANGUAGE, task=TASK)
PROMPT_TOKENS = ("<|startoftranscript|>", f"<|{LANGUAGE}|>", f"<|{TASK}|>", "<|notimestamps|>")
EOT_TOKEN = "<|endoftext|>"  # end of the transcript: the last label, where decoding stops
IGNORE_INDEX = -100  # label positions the loss skips (torch cross-entropy's default ignore_index)


def prompt(language: str = LANGUAGE, task: str = TASK) -> str:
    """The prompt as one string of special tokens, e.g. ``<|startoftranscript|><|zh|><|transcribe|><|notimestamps|>``."""
    return PROMPT_TEMPLATE.format(language=language, task=task)
