"""Kimi-Audio's LLM (common.families.kimi_audio.model): the released names and sizes on ``meta``, per-row speech
features, left and right padding, the audio branch never computed, strict loading, the front end's geometry.

Tiny fp32 models of :data:`TINY`'s shape with random weights; the sample layout is the upstream ASR layout
with toy ids (the tiny vocabulary has 224 text ids, then 32 codes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.families.kimi_audio.conventions import (
    IGNORE_INDEX,
    KIMI_AUDIO_7B,
    TINY,
    KimiAudioConfig,
    stacked_frames,
)
from common.families.kimi_audio.model import (
    CheckpointMismatch,
    KimiAudioLM,
    build_on_meta,
    check_state_dict,
    encode_clip,
    load_pretrained,
    load_weights,
    parameter_counts,
    stack_encoder_output,
)

# Toy special ids of the tiny vocabulary (the layout is the real one; see KIMI_AUDIO.md).
USER, BLANK, SPEECH_CT, MSG_END, ASSISTANT, TEXT_EOS, PAD = 201, 202, 203, 204, 205, 206, 207
MEDIA_BEGIN, MEDIA_END = TINY.kimia_media_begin, TINY.kimia_media_end
CODE0 = TINY.kimia_token_offset
FEAT = TINY.kimia_adaptor_input_dim
ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> KimiAudioLM:
    torch.manual_seed(0)
    return KimiAudioLM(TINY).eval()


def asr_sample(prompt: int, codes: int, transcript: int, seed: int) -> dict[str, torch.Tensor]:
    """One training sample in the upstream layout: audio stream, text stream, speech mask, labels, features."""
    g = torch.Generator().manual_seed(seed)
    instr = torch.randint(0, 200, (prompt,), generator=g).tolist()
    code_ids = (CODE0 + torch.randint(0, TINY.num_codes, (codes,), generator=g)).tolist()
    words = torch.randint(0, 200, (transcript,), generator=g).tolist()
    audio = ([USER] + [BLANK] * prompt + [MEDIA_BEGIN] + code_ids + [MEDIA_END, SPEECH_CT, MSG_END, ASSISTANT]
             + [BLANK] * transcript + [BLANK, MSG_END])
    text = ([BLANK] + instr + [BLANK] * (codes + 2) + [BLANK, BLANK, BLANK] + words + [TEXT_EOS, BLANK])
    start = 1 + prompt + 1
    speech = [start <= i < start + codes for i in range(len(audio))]
    first_word = len(audio) - transcript - 2
    labels = [t if first_word <= i <= first_word + transcript else IGNORE_INDEX for i, t in enumerate(text)]
    return {"audio": torch.tensor(audio), "text": torch.tensor(text), "speech": torch.tensor(speech),
            "labels": torch.tensor(labels), "features": torch.randn(codes, FEAT, generator=g)}


ROWS = [asr_sample(3, 5, 4, seed=1), asr_sample(2, 12, 3, seed=2), asr_sample(4, 2, 1, seed=3)]  # lengths 20, 25, 15


def collate(rows: list[dict], side: str) -> dict[str, torch.Tensor]:
    """Pad to the longest row on ``side``; padded feature frames hold large junk that must never be read."""
    length = max(len(r["audio"]) for r in rows)
    frames = max(len(r["features"]) for r in rows)

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        fill = torch.full((length - len(t),), value, dtype=t.dtype)
        return torch.cat([t, fill] if side == "right" else [fill, t])

    features = torch.full((len(rows), frames, FEAT), 1e3)
    for b, r in enumerate(rows):
        features[b, : len(r["features"])] = r["features"]
    return {
        "audio_ids": torch.stack([pad(r["audio"], PAD) for r in rows]),
        "text_ids": torch.stack([pad(r["text"], PAD) for r in rows]),
        "speech_mask": torch.stack([pad(r["speech"], False) for r in rows]),
        "labels": torch.stack([pad(r["labels"], IGNORE_INDEX) for r in rows]),
        "attention_mask": torch.stack([pad(torch.ones(len(r["audio"]), dtype=torch.long), 0) for r in rows]),
        "whisper_features": features,
    }


def alone(model: KimiAudioLM, row: dict):
    with torch.no_grad():
        return model(row["audio"][None], row["text"][None], row["speech"][None], [row["features"]],
                     labels=row["labels"][None])


# --- the released names, shapes and sizes, on meta ----------------------------------------------------------

LAYER_SHAPES = {  # per decoder layer (trunk and audio branch alike)
    "self_attn.q_proj.weight": (3584, 3584), "self_attn.q_proj.bias": (3584,),
    "self_attn.k_proj.weight": (512, 3584), "self_attn.k_proj.bias": (512,),
    "self_attn.v_proj.weight": (512, 3584), "self_attn.v_proj.bias": (512,),
    "self_attn.o_proj.weight": (3584, 3584),
    "mlp.gate_proj.weight": (18944, 3584), "mlp.up_proj.weight": (18944, 3584), "mlp.down_proj.weight": (3584, 18944),
    "input_layernorm.weight": (3584,), "post_attention_layernorm.weight": (3584,),
}
OTHER_SHAPES = {
    "model.embed_tokens.weight": (168448, 3584),
    "model.norm.weight": (3584,),
    "model.mimo_norm.weight": (3584,),
    "model.vq_adaptor.layers.0.weight": (3584, 5120), "model.vq_adaptor.layers.0.bias": (3584,),
    "model.vq_adaptor.layers.3.weight": (3584, 3584), "model.vq_adaptor.layers.3.bias": (3584,),
    "model.vq_adaptor.layers.4.weight": (3584,), "model.vq_adaptor.layers.4.bias": (3584,),
    "lm_head.weight": (168448, 3584),
    "mimo_output.weight": (168448, 3584),
}


@pytest.fixture(scope="module")
def meta_model() -> KimiAudioLM:
    return build_on_meta(KIMI_AUDIO_7B)


def test_real_config_has_the_released_keys_and_shapes(meta_model):
    expected = dict(OTHER_SHAPES)
    for stack, n in (("layers", 28), ("mimo_layers", 6)):
        for i in range(n):
            expected.update({f"model.{stack}.{i}.{k}": v for k, v in LAYER_SHAPES.items()})
    got = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    assert sorted(set(got) ^ set(expected)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}
    assert all(p.is_meta for p in meta_model.parameters())


@pytest.mark.parametrize(("part", "expected"), [
    ("total", 9_766_334_464),
    ("adaptor", 31_209_472),  # 5120·3584 + 3584 + 3584·3584 + 3584 + 2·3584
    ("mimo_layers", 1_398_346_752),  # 6 × 233,057,792
    ("mimo_norm", 3_584),  # the audio branch without its head: 1,398,350,336 ≈ 1.40 B
    ("audio_branch", 2_002_067_968),  # + mimo_output: what stays frozen for ASR
    ("trunk_layers", 6_525_618_176),  # 28 × 233,057,792
    ("embed_tokens", 603_717_632), ("lm_head", 603_717_632), ("mimo_output", 603_717_632),
])
def test_real_config_parameter_counts(meta_model, part, expected):
    assert parameter_counts(meta_model)[part] == expected


def test_published_config_json_reads_as_the_7b_config(tmp_path):
    published = {  # the fields of Kimi-Audio-7B's config.json (others, e.g. auto_map, are ignored)
        "architectures": ["MoonshotKimiaForCausalLM"], "model_type": "kimi_audio", "bos_token_id": 151643,
        "eos_token_ids": [151644, 151645], "hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944,
        "kimia_adaptor_input_dim": 5120, "kimia_audio_output_vocab": 16896, "kimia_media_begin": 151661,
        "kimia_media_end": 151663, "kimia_mimo_audiodelaytokens": 5, "kimia_mimo_layers": 6,
        "kimia_mimo_transformer_from_layer_index": 21, "kimia_text_output_vocab": 152064,
        "kimia_token_offset": 152064, "max_position_embeddings": 8192, "max_window_layers": 28,
        "num_attention_heads": 28, "num_audio_special_tokens": 512, "num_base_tokens": 151643,
        "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000.0, "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "use_whisper_feature": True, "vocab_size": 168448,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(published))
    assert KimiAudioConfig.from_json(path) == KIMI_AUDIO_7B


MISSING = object()


@pytest.mark.parametrize(("change", "message"), [
    ({"tie_word_embeddings": True}, "tie_word_embeddings is True; Kimi-Audio (and this implementation) uses False"),
    ({"hidden_size": MISSING}, "hidden_size: Field required"),
    ({"num_key_value_heads": 5}, "not a multiple of num_key_value_heads 5"),
    ({"kimia_mimo_transformer_from_layer_index": 28}, "is not a trunk layer index (0 … 27)"),
    ({"rope_scaling": {"type": "yarn"}}, "rope_scaling"),
])
def test_unusable_config_says_what_is_wrong(change, message):
    data = {k: v for k, v in {**KIMI_AUDIO_7B.model_dump(), **change}.items() if v is not MISSING}
    with pytest.raises(ValueError, match="config.json of a Kimi-Audio-7B") as e:
        KimiAudioConfig.from_dict(data)
    assert message in str(e.value)


# --- speech features go to their own row ---------------------------------------------------------------------


@pytest.mark.parametrize("row", [0, 1, 2])
def test_perturbing_one_clip_changes_only_its_row(model, row):
    batch = collate(ROWS, "right")
    with torch.no_grad():
        before = model(**batch).logits
        batch["whisper_features"][row, : len(ROWS[row]["features"])] += 1.0
        after = model(**batch).logits
    changed = [bool((after[b] - before[b]).abs().max() > 1e-4) for b in range(3)]
    assert changed == [b == row for b in range(3)]


def test_features_as_a_list_equal_features_padded(model):
    batch = collate(ROWS, "right")
    with torch.no_grad():
        padded = model(**batch).logits
        listed = model(**{**batch, "whisper_features": [r["features"] for r in ROWS]}).logits
    torch.testing.assert_close(listed, padded, rtol=0, atol=ATOL)


@pytest.mark.parametrize(("features", "message"), [
    ([torch.zeros(5, FEAT), torch.zeros(11, FEAT), torch.zeros(2, FEAT)],
     "row 1 has 12 speech positions and 11 frames"),
    (torch.zeros(3, 4, FEAT), "row 0 has 5 speech positions, the features 4 frames, row 1 has 12 speech positions"),
    ([torch.zeros(5, 16), torch.zeros(12, 16), torch.zeros(2, 16)], "have 16 values per frame; the adaptor takes 32"),
])
def test_features_that_do_not_fit_the_speech_positions_are_refused(model, features, message):
    batch = collate(ROWS, "right")
    with pytest.raises(ValueError) as e:
        model(**{**batch, "whisper_features": features})
    assert message in str(e.value)


def test_speech_mask_must_point_at_codes(model):
    batch = collate(ROWS, "right")
    batch["speech_mask"] = batch["speech_mask"].roll(1, dims=1)  # one late: the last onto <|im_media_end|>
    with pytest.raises(ValueError, match="3 speech_mask positions hold no audio code"):
        model(**batch)


def test_loss_scores_the_logits_before_each_label(model):
    row = ROWS[0]
    out = alone(model, row)
    expected = F.cross_entropy(out.logits[0, :-1], row["labels"][1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=ATOL)
    assert int(out.n_loss_tokens) == 4 + 1  # the transcript and <|im_kimia_text_eos|>


# --- padding: each row of a batch is computed as if it were alone ---------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_rows_equal_each_row_alone(model, side):
    batch = collate(ROWS, side)
    length = batch["audio_ids"].shape[1]
    with torch.no_grad():
        out = model(**batch)
    for b, row in enumerate(ROWS):
        single = alone(model, row)
        n = len(row["audio"])
        real = slice(0, n) if side == "right" else slice(length - n, length)
        torch.testing.assert_close(out.logits[b, real], single.logits[0], rtol=0, atol=ATOL)
        only_b = torch.full_like(batch["labels"], IGNORE_INDEX)
        only_b[b] = batch["labels"][b]
        with torch.no_grad():
            row_loss = model(**{**batch, "labels": only_b}, return_logits=False).loss
        torch.testing.assert_close(row_loss, single.loss, rtol=0, atol=ATOL)
    singles = [alone(model, r) for r in ROWS]
    token_weighted = sum(s.loss * s.n_loss_tokens for s in singles) / sum(s.n_loss_tokens for s in singles)
    torch.testing.assert_close(out.loss, token_weighted, rtol=0, atol=ATOL)


def test_left_padded_generation_with_cache_equals_the_full_forward(model):
    batch = collate(ROWS, "left")
    steps = 3  # the last tokens, fed one at a time after a cached prefill
    with torch.no_grad():
        full = model(**batch).logits
        prefix = {k: v[:, :-steps] for k, v in batch.items() if k not in ("whisper_features", "labels")}
        out = model(**prefix, whisper_features=batch["whisper_features"], use_cache=True, logits_to_keep=1)
        torch.testing.assert_close(out.logits[:, -1], full[:, -steps - 1], rtol=0, atol=ATOL)
        cache = out.cache
        for k in range(steps, 0, -1):
            end = batch["audio_ids"].shape[1] - k + 1
            out = model(batch["audio_ids"][:, end - 1: end], batch["text_ids"][:, end - 1: end],
                        attention_mask=batch["attention_mask"][:, :end], cache=cache, logits_to_keep=1)
            torch.testing.assert_close(out.logits[:, -1], full[:, end - 1], rtol=0, atol=ATOL)


# --- the audio branch is never computed and never trained -------------------------------------------------------


def test_audio_branch_is_not_computed_and_gets_no_gradient():
    torch.manual_seed(0)
    model = KimiAudioLM(TINY).train()

    def fail(module, args):
        raise AssertionError(f"the audio branch ran: {type(module).__name__}")

    branch = [*model.model.mimo_layers, model.model.mimo_norm, model.mimo_output]
    hooks = [m.register_forward_pre_hook(fail) for m in branch]
    try:
        model(**collate(ROWS, "right")).loss.backward()
    finally:
        for h in hooks:
            h.remove()
    grads = {name: p.grad is not None for name, p in model.named_parameters()}
    audio_branch = {n: g for n, g in grads.items() if n.startswith(("model.mimo_", "mimo_output"))}
    assert audio_branch and not any(audio_branch.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in audio_branch)
    assert grads["model.vq_adaptor.layers.0.weight"] and grads["lm_head.weight"]
    assert grads["model.layers.2.mlp.down_proj.weight"]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = KimiAudioLM(TINY).train()
        model.gradient_checkpointing = checkpointing
        loss = model(**collate(ROWS, "right"), return_logits=False).loss
        loss.backward()
        results.append((loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=ATOL)


# --- strict loading ----------------------------------------------------------------------------------------


def broken(state: dict, *, drop=(), reshape=(), add=()) -> dict:
    state = {k: v for k, v in state.items() if k not in drop}
    state.update({k: torch.zeros(3, 3) for k in reshape})
    state.update({k: torch.zeros(1) for k in add})
    return state


@pytest.mark.parametrize(("changes", "problems"), [
    ({"drop": ["model.norm.weight"]}, ["missing: model.norm.weight (expected shape (32,))"]),
    ({"reshape": ["lm_head.weight"]}, ["wrong shape: lm_head.weight is (3, 3), expected (256, 32)"]),
    ({"add": ["speech_encoder.conv1.weight"]}, ["unexpected: speech_encoder.conv1.weight (1,)"]),
    ({"drop": ["model.mimo_layers.1.mlp.up_proj.weight", "model.vq_adaptor.layers.4.bias"],
      "reshape": ["model.embed_tokens.weight"], "add": ["model.layers.3.self_attn.q_proj.weight"]},
     ["missing: model.mimo_layers.1.mlp.up_proj.weight (expected shape (48, 32))",
      "missing: model.vq_adaptor.layers.4.bias (expected shape (32,))",
      "wrong shape: model.embed_tokens.weight is (3, 3), expected (256, 32)",
      "unexpected: model.layers.3.self_attn.q_proj.weight (1,)"]),
])
def test_strict_loading_lists_every_problem_at_once(model, changes, problems):
    state = broken(model.state_dict(), **changes)
    assert check_state_dict(model, state) == problems
    target = build_on_meta(TINY)
    with pytest.raises(CheckpointMismatch) as e:
        load_weights(target, state, source="ckpt")
    assert f"ckpt does not fit this Kimi-Audio configuration ({len(problems)} problems)" in str(e.value)
    assert all(p in str(e.value) for p in problems)


def test_model_folder_loads_strictly_and_computes_the_same_logits(model, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    save_file({k: state[k] for k in names[:20]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in names[20:]} | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)},
              str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY.model_dump()))
    loaded = load_pretrained(tmp_path, dtype=torch.float32).eval()
    batch = collate(ROWS, "right")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if n.startswith("mimo_output"))


# --- the front end's geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("samples", "positions"), [
    (1, 1), (1279, 1), (1280, 1), (1281, 2), (480_000, 375), (480_001, 376),
])
def test_speech_positions_of_a_clip(samples, positions):
    assert stacked_frames(samples) == positions
    chunks = (samples - 1) // 480_000 + 1
    hidden = torch.randn(chunks, 1500, 8)
    assert stack_encoder_output(hidden, samples).shape == (positions, 32)


def test_long_clips_concatenate_their_30s_chunks():
    frame_id = torch.arange(1500, dtype=torch.float32)
    hidden = torch.stack([frame_id, 10_000 + frame_id])[:, :, None].expand(2, 1500, 2)  # value = chunk·10⁴ + frame
    stacked = stack_encoder_output(hidden, 480_000 + 1281)  # 375 positions + 2 from the second chunk
    assert stacked.shape == (377, 8)
    assert stacked[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert stacked[374].tolist() == [1496, 1496, 1497, 1497, 1498, 1498, 1499, 1499]
    assert stacked[375].tolist() == [10_000, 10_000, 10_001, 10_001, 10_002, 10_002, 10_003, 10_003]
    assert stacked[376].tolist() == [10_004, 10_004, 10_005, 10_005, 10_006, 10_006, 10_007, 10_007]


def test_encode_clip_runs_a_whisper_encoder_per_30s_chunk():
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    config = WhisperConfig(d_model=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=16,
                           num_mel_bins=128, max_source_positions=1500)
    encoder = WhisperEncoder(config).eval()
    extractor = WhisperFeatureExtractor(feature_size=128)
    audio = np.random.default_rng(0).standard_normal(480_000 + 1281).astype(np.float32) * 0.1
    with torch.no_grad():
        whole = encode_clip(encoder, extractor, audio)
        first = encode_clip(encoder, extractor, audio[:480_000])
        second = encode_clip(encoder, extractor, audio[480_000:])
    assert whole.shape == (377, 32) and first.shape == (375, 32) and second.shape == (2, 32)
    torch.testing.assert_close(whole, torch.cat([first, second]), rtol=0, atol=1e-5)


def test_bf16_weights_under_autocast_mix_speech_features():
    """The adaptor's LayerNorm runs in fp32 under autocast; the mixed speech embeddings go back to the
    embeddings' dtype (a bf16 LoRA base on a GPU trains this way)."""
    model = KimiAudioLM(TINY).to(torch.bfloat16)
    ids = torch.full((1, 6), 5)
    ids[0, 2:4] = TINY.kimia_token_offset + 1
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 2:4] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, ids, speech_mask=mask, whisper_features=torch.randn(1, 2, TINY.kimia_adaptor_input_dim),
                    attention_mask=torch.ones(1, 6, dtype=torch.long))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
