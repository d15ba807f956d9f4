"""Acceptance test of the bundled whisper-base conversion (issue 3, item 1).

On every clip of real-zh-dev, 80-bin log-mel features are computed once (WhisperFeatureExtractor,
padded to 30 s) and decoded greedily with the prompt <|startoftranscript|><|zh|><|transcribe|><|notimestamps|>
by two engines:
- CTranslate2's own `Whisper` on the bundled model.bin (the reference), and
- the Hugging Face `WhisperForConditionalGeneration` that asr-ft converted from it.
The token ids must be identical on every clip.

Same decoding options on both sides:
- suppression: CT2 `suppress_tokens=[-1]` applies config.json's `suppress_ids` at every step and
  `suppress_blank=True` its `suppress_ids_begin` at the first step; HF applies
  `generation_config.suppress_tokens` / `begin_suppress_tokens` the same way, and the conversion copied
  them from that config.json (asserted below).
- length: CT2 runs at most min(max_length // 2, max_length - 3) decoding steps after the 4-token prompt
  (the end-of-text step included, not returned); HF's `max_new_tokens` counts the same steps. Each engine
  encodes once and decodes with room for every transcript (224 steps); the first batch is decoded a second
  time cut at 8 steps, so the cut is checked too.

Needs a real Mandarin dev set (the ``real_zh_dev`` fixture: $ASRFT_REAL_ZH_DEV names a folder holding
transcripts.csv + audio/; skipped when unset) and the bundled model (assembled and converted once into
$ASRFT_CACHE, else ~/.cache/asr-ft).
Run: ASRFT_REAL_ZH_DEV=/data/real-zh-dev .venv/bin/pytest tests/integration/test_whisper_base_parity.py -s
(-s shows the table)
"""

from __future__ import annotations

import csv
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ctranslate2  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from transformers import WhisperForConditionalGeneration, WhisperProcessor  # noqa: E402
from transformers.modeling_outputs import BaseModelOutput  # noqa: E402

from common.core.metrics import utterance_errors  # noqa: E402
from common.families.whisper.ct2 import (  # noqa: E402
    SAMPLE_RATE,
    bundled_whisper_base_ct2_dir,
    bundled_whisper_base_hf_dir,
    export_hf_to_ct2,
    prompt_zh_ids,
    read_ct2_model,
)

BATCH_SIZE = 8  # clips per encoder call: 8 x 30 s keeps attention memory near 1 GB
FULL_STEPS = 224  # CT2's default max_length 448 // 2; far above any transcript here (longest ~50 tokens)
CUT_STEPS = 8  # short enough that most clips are cut (checked on the first batch only: it costs a decode)
ENCODE_THREADS = 2  # the encoder's large matrix products use both cores
DECODE_THREADS = 1  # per-token steps are tiny: a second thread mostly waits at barriers (5x slower measured
#                    when other processes keep the cores busy)
MAX_CER = 0.35  # pretrained whisper-base, greedy: 28.9% measured; far above means broken features


def ct2_max_length(steps: int) -> int:
    """CT2 `max_length` giving `steps` decoding steps after a 4-token prompt: min(L // 2, L - 3) = steps."""
    return 2 * steps


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clips(real_zh_dev: Path) -> list[tuple[str, str, np.ndarray]]:
    with open(real_zh_dev / "transcripts.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    out = []
    for row in rows:
        audio, rate = sf.read(real_zh_dev / "audio" / f"{row['audio_id']}.wav", dtype="float32", always_2d=True)
        assert rate == SAMPLE_RATE, f"{row['audio_id']}: {rate} Hz, the dev set is 16 kHz"
        out.append((row["audio_id"], row["text"], audio.mean(axis=1)))
    assert len(out) >= 30, f"expected the 33 clips of real-zh-dev, found {len(out)}"
    return out


@pytest.fixture(scope="module")
def bundled_dirs() -> tuple[Path, Path]:
    started = time.monotonic()
    ct2_dir, hf_dir = bundled_whisper_base_ct2_dir(), bundled_whisper_base_hf_dir()
    print(f"\nbundled whisper-base ready in {time.monotonic() - started:.1f} s (CT2 {ct2_dir}, HF {hf_dir})")
    return ct2_dir, hf_dir


def _batches(features: np.ndarray):
    """(batch, decoding step limits to run on it): every batch in full, the first one cut as well."""
    for start in range(0, len(features), BATCH_SIZE):
        limits = (FULL_STEPS, CUT_STEPS) if start == 0 else (FULL_STEPS,)
        yield np.ascontiguousarray(features[start : start + BATCH_SIZE]), limits


def decode_ct2(ct2_dir: Path, features: np.ndarray, prompt: list[int]) -> dict[int, list[list[int]]]:
    encoder = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", intra_threads=ENCODE_THREADS)
    decoder = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", intra_threads=DECODE_THREADS)
    assert encoder.compute_type == "float32"  # float16 weights, computed in float32 on CPU (as HF below)
    out: dict[int, list[list[int]]] = {FULL_STEPS: [], CUT_STEPS: []}
    for batch, limits in _batches(features):
        encoded = encoder.encode(ctranslate2.StorageView.from_array(batch), to_cpu=True)
        for steps in limits:
            results = decoder.generate(
                encoded, [prompt] * len(batch), beam_size=1, max_length=ct2_max_length(steps),
                suppress_blank=True, suppress_tokens=[-1], return_scores=False,
            )
            out[steps] += [list(r.sequences_ids[0]) for r in results]
    return out


def _strip_end(ids: list[int], eot: int) -> list[int]:
    """HF returns the new tokens, the end-of-text token and batch padding; CT2 returns the text tokens only."""
    return ids[: ids.index(eot)] if eot in ids else ids


def decode_hf(model: WhisperForConditionalGeneration, features: np.ndarray, prompt: list[int]
              ) -> dict[int, list[list[int]]]:
    assert model.dtype == torch.float32
    eot = model.generation_config.eos_token_id
    out: dict[int, list[list[int]]] = {FULL_STEPS: [], CUT_STEPS: []}
    with torch.inference_mode():
        for batch, limits in _batches(features):
            with torch_threads(ENCODE_THREADS):
                encoded = model.model.encoder(torch.from_numpy(batch)).last_hidden_state
            for steps in limits:
                with torch_threads(DECODE_THREADS):
                    sequences = model.generate(
                        encoder_outputs=BaseModelOutput(last_hidden_state=encoded),
                        decoder_input_ids=torch.tensor([prompt] * len(batch)),
                        language="zh", task="transcribe", return_timestamps=False,  # = the prompt: no detection
                        num_beams=1, do_sample=False, max_new_tokens=steps,
                    )
                out[steps] += [_strip_end(ids, eot) for ids in sequences.tolist()]
    return out


def test_converted_whisper_base_decodes_exactly_like_ctranslate2(clips, bundled_dirs) -> None:
    ct2_dir, hf_dir = bundled_dirs
    processor = WhisperProcessor.from_pretrained(hf_dir)
    assert processor.feature_extractor.feature_size == 80
    ct2_config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))
    model = WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()
    generation = model.generation_config
    assert generation.suppress_tokens == ct2_config["suppress_ids"]
    assert generation.begin_suppress_tokens == ct2_config["suppress_ids_begin"]
    prompt = prompt_zh_ids(processor.tokenizer)
    assert processor.tokenizer.convert_ids_to_tokens(prompt) == [
        "<|startoftranscript|>", "<|zh|>", "<|transcribe|>", "<|notimestamps|>"]

    started, cpu_started = time.monotonic(), time.process_time()
    features = processor.feature_extractor(
        [audio for _, _, audio in clips], sampling_rate=SAMPLE_RATE, return_tensors="np"
    ).input_features
    assert features.shape == (len(clips), 80, 3000) and features.dtype == np.float32
    t_features = time.monotonic()
    ct2 = decode_ct2(ct2_dir, features, prompt)
    t_ct2 = time.monotonic()
    hf = decode_hf(model, features, prompt)
    t_hf = time.monotonic()
    print(f"\nfeatures {t_features - started:.1f} s, CTranslate2 {t_ct2 - t_features:.1f} s, "
          f"Hugging Face {t_hf - t_ct2:.1f} s for {len(clips)} clips (wall); CPU {time.process_time() - cpu_started:.0f} s")

    errors = chars = 0
    print(f"{'clip':<22} {'same':<5} {'CER':>5}  decoded | reference")
    for (clip_id, reference, _), ct2_ids, hf_ids in zip(clips, ct2[FULL_STEPS], hf[FULL_STEPS], strict=True):
        text = processor.tokenizer.decode(ct2_ids, skip_special_tokens=True)
        scored = utterance_errors(reference, text)
        errors, chars = errors + scored["char_errors"], chars + scored["ref_chars"]
        print(f"{clip_id:<22} {'yes' if ct2_ids == hf_ids else 'NO':<5} {scored['cer']:>5.0%}  {text} | {reference}")
    print(f"CER 字错率 (pretrained whisper-base, greedy, CTranslate2 = converted): {errors / chars:.1%}")

    for steps in (FULL_STEPS, CUT_STEPS):
        assert len(ct2[steps]) == len(hf[steps]) == (len(clips) if steps == FULL_STEPS else BATCH_SIZE)
        differ = [(clip[0], a, b) for clip, a, b in zip(clips, ct2[steps], hf[steps], strict=False) if a != b]
        assert not differ, f"{len(differ)} clips decode differently with {steps} steps: {differ[:3]}"
    assert all(len(ids) < FULL_STEPS for ids in ct2[FULL_STEPS]), "a transcript hit the length limit"
    assert sum(len(ids) == CUT_STEPS for ids in ct2[CUT_STEPS]) >= BATCH_SIZE // 2, "the cut run cut too little"
    assert errors / chars < MAX_CER


def test_bundled_whisper_base_exports_back_to_the_same_ctranslate2_weights(bundled_dirs, tmp_path: Path) -> None:
    """HF -> CT2 float16 with CTranslate2's own converter gives back every variable of the bundled model.bin
    bit for bit: the conversion lost nothing and put nothing in the wrong place."""
    ct2_dir, hf_dir = bundled_dirs
    exported = export_hf_to_ct2(hf_dir, tmp_path / "ct2", "float16")
    original, again = read_ct2_model(ct2_dir), read_ct2_model(exported)
    assert (again.spec_name, again.revision, again.aliases) == (original.spec_name, original.revision, original.aliases)
    assert set(original.variables) <= set(again.variables)
    differ = [name for name, value in original.variables.items()
              if value.dtype != again.variables[name].dtype or not np.array_equal(value, again.variables[name])]
    assert not differ, f"{len(differ)} variables changed in the round trip: {differ[:5]}"
    config, config_again = (json.loads((d / "config.json").read_text(encoding="utf-8")) for d in (ct2_dir, exported))
    assert config_again == config
