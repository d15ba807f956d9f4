"""Kimi-Audio's tokenizers and sample layout: the text vocabulary (pinned stand-in BPE, special ids), the ASR
sample of both streams position by position, batching, and the GLM-4-Voice speech tokenizer (code counts,
padding invariance, 30-s chunks, Whisper log-mel, the released checkpoint's parameter names) with a tiny
random stand-in."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from common.families.kimi_audio import glm_tokenizer, tokenizer
from common.families.kimi_audio.glm_tokenizer import (
    GlmConfig,
    GlmSpeechEncoder,
    GlmSpeechTokenizer,
    GlmTokenizerError,
    chunk_bounds,
    log_mel,
    n_codes,
)
from common.families.kimi_audio.sample import (
    DEFAULT_INSTRUCTION,
    IGNORE_INDEX,
    KimiSample,
    SampleError,
    asr_prompt,
    asr_sample,
    collate,
    length_grouped_batches,
    max_new_tokens,
    prompt_length,
    sample_length,
)
from common.families.kimi_audio.tokenizer import (
    PAD,
    SPECIAL_TOKENS,
    TokenizerError,
    load_text_tokenizer,
    read_bpe_ranks,
)

B = 151666  # <|im_kimia_text_blank|>
X = IGNORE_INDEX
INSTRUCTION_IDS = [14880, 99360, 107083, 105761, 46670, 23656, 12857, 108704, 1773]  # 请把这段语音转录成文本。
SR = 16_000


@pytest.fixture(scope="module")
def tok():
    return load_text_tokenizer()


@pytest.fixture(scope="module")
def glm():
    return GlmSpeechTokenizer.tiny(seed=0)


def noise(n: int, seed: int) -> np.ndarray:
    """Seeded noise with a rising envelope (so the tiny tokenizer gives varied codes)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * np.linspace(0.01, 0.6, n)).astype(np.float32)


# --- text tokenizer ---------------------------------------------------------------------------------------


def test_standin_bpe_file_is_the_pinned_qwen_vocabulary(tok):
    assert tok.bpe.source == "stand-in"
    assert tok.bpe.sha256 == "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
    assert tok.bpe.size == 2_561_218
    ranks = read_bpe_ranks(tok.bpe.path)
    assert len(ranks) == 151_643 and ranks[b"!"] == 0


@pytest.mark.parametrize(
    ("name", "token_id"),
    [
        ("[BOS]", 151643),
        ("[EOS]", 151644),
        ("<|im_msg_end|>", 151645),
        ("<|im_media_begin|>", 151661),
        ("<|im_media_end|>", 151663),
        ("<|im_kimia_text_blank|>", 151666),
        ("<|im_kimia_text_eos|>", 151667),
        ("<|im_kimia_user_msg_start|>", 151670),
        ("<|im_kimia_assistant_msg_start|>", 151671),
        ("<|im_kimia_speech_ct_id|>", 151675),
        ("<|im_kimia_speech_ctd_id|>", 151676),
        ("<|reserved_token_20|>", 151677),
        ("<|reserved_token_406|>", 152063),  # the pad token: the last of the 421
    ],
)
def test_special_ids_by_name(tok, name, token_id):
    assert tok.special_id(name) == token_id
    assert tok.special_name(token_id) == name
    assert tok.decode([token_id]) == name


def test_special_token_range():
    assert len(SPECIAL_TOKENS) == len(set(SPECIAL_TOKENS)) == 421
    assert PAD == 152063


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        (DEFAULT_INSTRUCTION, INSTRUCTION_IDS),
        ("你好", [108386]),
        ("今天天气很好。", [100644, 104307, 101243, 1773]),
        ("我爱北京天安门", [35946, 99242, 68990, 35727, 50285, 64689]),
        ("<|im_msg_end|>", [27, 91, 318, 6483, 6213, 91, 29]),  # a special token's name in text stays text
    ],
)
def test_encode_decode_chinese(tok, text, ids):
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_decode_skips_specials_and_refuses_speech_codes(tok):
    assert tok.decode([151671, 108386, 151667], skip_special=True) == "你好"
    with pytest.raises(TokenizerError, match="GLM speech codes"):
        tok.decode([152064])
    with pytest.raises(TokenizerError, match="named ones"):
        tok.special_id("<|im_kimia_speech|>")


def test_model_folder_bpe_file_wins_and_is_checked(tok, tmp_path, caplog):
    shutil.copy(tok.bpe.path, tmp_path / "tiktoken.model")
    with caplog.at_level("INFO"):
        own = load_text_tokenizer(tmp_path)
    assert own.bpe.source == "model" and own.encode("你好") == [108386]
    assert tok.bpe.sha256 in caplog.text  # the folder's hash and the stand-in's are both logged
    lines = (tmp_path / "tiktoken.model").read_bytes().splitlines()[:1000]
    (tmp_path / "tiktoken.model").write_bytes(b"\n".join(lines))
    with pytest.raises(TokenizerError, match="1000 BPE ranks, expected 151643"):
        load_text_tokenizer(tmp_path)


def test_standin_with_another_hash_is_an_error(tmp_path, monkeypatch):
    fake = tmp_path / "qwen.tiktoken"
    fake.write_bytes(b"IQ== 0\n")
    monkeypatch.setattr(tokenizer, "standin_bpe_path", lambda: fake)
    with pytest.raises(TokenizerError, match="expected b2b1b8dfb5cc.*force-reinstall"):
        load_text_tokenizer()


# --- the ASR sample ---------------------------------------------------------------------------------------


# 「请把这段语音转录成文本。」 (9 ids), codes [0, 7, 16383], transcript 今天天气很好。 (4 ids)
SAMPLE_TABLE = [
    # audio   text    speech  label
    (151670, B, False, X),
    *[(B, i, False, X) for i in INSTRUCTION_IDS],
    (151661, B, False, X),
    (152064, B, True, X),  # code 0 + 152064
    (152071, B, True, X),  # code 7
    (168447, B, True, X),  # code 16383
    (151663, B, False, X),
    (151675, B, False, X),
    (151645, B, False, X),
    (151671, B, False, X),  # the prompt ends here; its logits predict the first transcript id
    (B, 100644, False, 100644),
    (B, 104307, False, 104307),
    (B, 101243, False, 101243),
    (B, 1773, False, 1773),
    (B, 151667, False, 151667),
    (151645, B, False, X),
]


def test_training_sample_layout_position_by_position():
    s = asr_sample([0, 7, 16383], [100644, 104307, 101243, 1773], INSTRUCTION_IDS)
    assert list(zip(s.audio_ids, s.text_ids, s.speech_mask, s.labels, strict=True)) == SAMPLE_TABLE
    assert len(s) == sample_length(9, 3, 4) == 24
    assert s.n_codes == 3


@pytest.mark.parametrize(("n_codes", "transcript"), [(1, []), (3, [108386]), (40, [35946, 99242, 68990])])
def test_sample_invariants(n_codes, transcript):
    s = asr_sample(list(range(n_codes)), transcript, INSTRUCTION_IDS)
    assert len(s.audio_ids) == len(s.text_ids) == len(s.speech_mask) == len(s.labels)
    assert [a - 152064 for a, m in zip(s.audio_ids, s.speech_mask, strict=True) if m] == list(range(n_codes))
    assert [t for t in s.labels if t != X] == [*transcript, 151667]
    p = asr_prompt(list(range(n_codes)), INSTRUCTION_IDS)
    assert len(p) == prompt_length(9, n_codes) and p.labels is None
    assert (s.audio_ids[:len(p)], s.text_ids[:len(p)]) == (p.audio_ids, p.text_ids)
    assert (p.audio_ids[-1], p.text_ids[-1]) == (151671, 151666)
    assert s.labels[len(p)] == ([*transcript, 151667])[0]  # predicted from the last prompt position


@pytest.mark.parametrize(
    ("codes", "transcript", "message"),
    [
        ([], [1], "no speech codes"),
        ([16384], [1], r"outside 0 … 16383"),
        ([3], [151667], "not plain text ids"),
    ],
)
def test_sample_refuses_bad_inputs(codes, transcript, message):
    with pytest.raises(SampleError, match=message):
        asr_sample(codes, transcript, INSTRUCTION_IDS)


def test_generation_budget_grows_with_the_clip():
    assert [max_new_tokens(n) for n in (1, 375)] == [17, 391]


# --- batching ---------------------------------------------------------------------------------------------

# instruction [1]; lengths 1+N+T+8 = 11, 12, 14
BATCH = [([5], [10]), ([5, 6, 7], []), ([5, 6], [10, 11, 12])]


@pytest.mark.parametrize(
    ("side", "attention", "positions"),
    [
        ("right", [[1] * 11 + [0] * 3, [1] * 12 + [0] * 2, [1] * 14],
         [[*range(11), 0, 0, 0], [*range(12), 0, 0], [*range(14)]]),
        ("left", [[0] * 3 + [1] * 11, [0] * 2 + [1] * 12, [1] * 14],
         [[0, 0, 0, *range(11)], [0, 0, *range(12)], [*range(14)]]),
    ],
)
def test_collate_pads_rows_with_masks_and_positions(side, attention, positions):
    samples = [asr_sample(c, t, [1]) for c, t in BATCH]
    batch = collate(samples, side=side)
    assert batch["attention_mask"].tolist() == attention
    assert batch["position_ids"].tolist() == positions
    for row, s in enumerate(samples):
        real = batch["attention_mask"][row].bool()
        assert batch["audio_ids"][row][real].tolist() == list(s.audio_ids)
        assert batch["text_ids"][row][real].tolist() == list(s.text_ids)
        assert batch["labels"][row][real].tolist() == list(s.labels)
        assert batch["speech_mask"][row][real].tolist() == list(s.speech_mask)
        assert set(batch["audio_ids"][row][~real].tolist()) <= {PAD}
        assert set(batch["labels"][row][~real].tolist()) <= {X}
        assert not batch["speech_mask"][row][~real].any()
    assert batch["speech_mask"].sum(1).tolist() == [1, 3, 2]


def test_collate_generation_prompts_end_together():
    prompts = [asr_prompt(c, [1]) for c, _ in BATCH]
    batch = collate(prompts, side="left")
    assert "labels" not in batch
    assert batch["audio_ids"][:, -1].tolist() == [151671] * 3
    with pytest.raises(SampleError, match="separately"):
        collate([prompts[0], asr_sample([5], [10], [1])])


def test_length_grouped_batches():
    lengths = [5, 50, 7, 48, 6, 49, 8, 47]
    batches = length_grouped_batches(lengths, batch_size=2, seed=3)
    assert {frozenset(b) for b in batches} == {frozenset(p) for p in ([1, 5], [3, 7], [2, 6], [0, 4])}  # 50+49 …
    assert 1 in batches[0]  # the longest sample first: an out-of-memory batch fails at step 1
    assert batches == length_grouped_batches(lengths, batch_size=2, seed=3)
    several = length_grouped_batches(list(range(100)), batch_size=4, seed=1, window=5)  # windows of 20 samples
    assert sorted(i for b in several for i in b) == list(range(100)) and len(several) == 25


# --- GLM-4-Voice speech tokenizer -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("samples", "chunks", "codes_per_chunk"),
    [
        (1, [(0, 1)], [1]),
        (1279, [(0, 1279)], [1]),
        (1280, [(0, 1280)], [1]),
        (1281, [(0, 1281)], [2]),
        (480_000, [(0, 480_000)], [375]),
        (480_001, [(0, 480_000), (480_000, 480_001)], [375, 1]),
    ],
)
def test_code_count_equals_stacked_whisper_frames(samples, chunks, codes_per_chunk):
    assert chunk_bounds(samples) == chunks
    assert [glm_tokenizer.chunk_codes(e - s) for s, e in chunks] == codes_per_chunk
    whisper_frames = (samples - 1) // 1280 + 1  # Kimi-Audio's stacked Whisper frames = speech positions
    assert n_codes(samples) == sum(codes_per_chunk) == whisper_frames


def test_tiny_tokenizer_gives_that_many_codes(glm):
    lengths = [1, 1279, 1280, 1281, 480_000, 480_001]
    codes = glm.encode([noise(n, seed=n) for n in lengths])
    assert [len(c) for c in codes] == [1, 1, 1, 2, 375, 376]
    assert all(0 <= c < 32 for row in codes for c in row)
    assert len(set(codes[4])) > 8  # the stand-in's codebook is in use, not one code everywhere


def test_codes_do_not_depend_on_padding_or_batch(glm):
    a, b = noise(40_000, seed=1), noise(21_000, seed=2)
    alone = glm.encode([a])[0]
    padded = np.zeros((2, 90_000), np.float32)
    padded[0, :40_000], padded[1, :21_000] = a, b
    assert len(alone) == 32 and len(set(alone)) > 4
    assert glm.encode([b, a])[1] == alone  # batched with a shorter clip
    assert glm.encode([a, noise(200_000, seed=3)])[0] == alone  # batched with a longer clip
    assert glm.encode(padded, lengths=[40_000, 21_000]) == [alone, glm.encode([b])[0]]  # zero-padded array


def test_clips_over_30_s_are_cut_in_30_s_chunks(glm):
    clip = noise(480_000 + 20_000, seed=4)
    assert glm.encode([clip])[0] == glm.encode([clip[:480_000]])[0] + glm.encode([clip[480_000:]])[0]


@pytest.mark.parametrize("samples", [1, 1281, 40_000])
def test_log_mel_is_whisper_feature_extractor_padded_to_1280(samples):
    from transformers import WhisperFeatureExtractor

    audio = noise(samples, seed=5)
    ref = WhisperFeatureExtractor(feature_size=128)([audio], sampling_rate=SR, return_tensors="pt",
                                                    padding="longest", pad_to_multiple_of=1280)
    mel = log_mel(torch.from_numpy(audio))
    assert mel.shape == (128, 8 * n_codes(samples))
    torch.testing.assert_close(mel, ref.input_features[0], rtol=0, atol=1e-5)


def tiny_keys(layers: int) -> set[str]:
    per_layer = ["self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.out_proj.weight",
                 "self_attn.out_proj.bias", "self_attn_layer_norm.weight", "self_attn_layer_norm.bias",
                 "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "final_layer_norm.weight",
                 "final_layer_norm.bias"]
    return {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "embed_positions.weight",
            "embed_positions2.weight", "codebook.weight", "ema_count", "ema_weight",
            *(f"layers.{i}.{k}" for i in range(layers) for k in per_layer)}


def test_parameter_names_and_shapes_are_the_released_checkpoints(glm):
    assert set(glm.encoder.state_dict()) == tiny_keys(2)
    with torch.device("meta"):
        real = GlmSpeechEncoder(GlmConfig())
    shapes = {k: tuple(v.shape) for k, v in real.state_dict().items()}
    assert set(shapes) == tiny_keys(16)
    assert shapes["conv1.weight"] == (1280, 128, 3)
    assert shapes["conv2.weight"] == (1280, 1280, 3)
    assert shapes["embed_positions.weight"] == (1500, 1280)
    assert shapes["embed_positions2.weight"] == (375, 1280)
    assert shapes["codebook.weight"] == shapes["ema_weight"] == (16384, 1280)
    assert shapes["layers.15.fc1.weight"] == (5120, 1280)
    assert sum(p.numel() for p in real.parameters()) == 343_599_360  # the 0.34 B of KIMI_AUDIO.md


def test_saved_folder_loads_strictly_and_gives_the_same_codes(glm, tmp_path):
    glm.save(tmp_path)
    again = GlmSpeechTokenizer.from_folder(tmp_path)
    clip = noise(30_000, seed=6)
    assert again.encode([clip]) == glm.encode([clip])
    assert json.loads((tmp_path / "config.json").read_text())["quantize_vocab_size"] == 32


def test_folder_that_is_not_the_glm_tokenizer_is_refused(glm, tmp_path):
    from safetensors.torch import load_file, save_file

    glm.save(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["layer_norm.weight"] = state.pop("ema_count")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(GlmTokenizerError, match=r"missing \['ema_count'\], unexpected \['layer_norm.weight'\]"):
        GlmSpeechTokenizer.from_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "pooling_type": "max"}))
    with pytest.raises(GlmTokenizerError, match="pooling_type = 'max', expected 'avg'"):
        GlmSpeechTokenizer.from_folder(tmp_path)


@pytest.mark.parametrize(
    ("audio", "lengths", "message"),
    [
        ([np.zeros(0, np.float32)], None, "clip 0 is empty"),
        ([np.zeros(100, np.int16)], None, "expected 1-D float"),
        (np.zeros((2, 100), np.float32), [100], "one length per clip"),
    ],
)
def test_encode_refuses_bad_audio(glm, audio, lengths, message):
    with pytest.raises(GlmTokenizerError, match=message):
        glm.encode(audio, lengths)


def test_tiny_is_the_same_for_the_same_seed(glm):
    state = torch.get_rng_state()
    again = GlmSpeechTokenizer.tiny(seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert all(torch.equal(v, again.encoder.state_dict()[k]) for k, v in glm.encoder.state_dict().items())


def test_sample_from_tiny_codes_has_one_speech_position_per_code(glm, tok):
    codes = glm.encode([noise(25_000, seed=7)])[0]
    s = asr_sample(codes, tok.encode("你好"), tok.encode(DEFAULT_INSTRUCTION))
    assert isinstance(s, KimiSample) and s.n_codes == n_codes(25_000) == 20
