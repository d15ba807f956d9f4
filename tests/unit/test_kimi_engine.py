"""Kimi-Audio's stand-in folder, engine and export (common.families.kimi_audio.{standin,engines,export,folder}).

One random stand-in (the real vocabulary and token ids at toy widths) decodes in float32 on the CPU: batched
decoding equals decoding each clip alone, generation stops at 151667 or at the clip's budget, an exported
folder decodes exactly as the trained weights with the donor's front ends, with the network blocked, and a
broken folder is refused with every problem listed."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from common.core.stage import StageFailed
from common.families import EngineRequest, FamilyError
from common.families.kimi_audio.conventions import KimiAudioConfig
from common.families.kimi_audio.engines import KimiEngine, open_engine
from common.families.kimi_audio.export import VERIFY_MAX_NEW_TOKENS, export, network_blocked
from common.families.kimi_audio.folder import ModelFolderError, folder_problems
from common.families.kimi_audio.model import encode_clip, load_pretrained
from common.families.kimi_audio.standin import build_standin
from common.families.kimi_audio.tokenizer import PAD, TEXT_BLANK, TEXT_EOS

SR = 16_000
CLIP_SAMPLES = (30_000, 12_000, 50_000)  # 24, 10 and 40 codes; not in length order, so the engine must reorder
INSTRUCTION_IDS = [14880, 99360, 107083, 105761, 46670, 23656, 12857, 108704, 1773]  # 「请把这段语音转录成文本。」
SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy matrices: one thread is fastest (and not slowed by other processes on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    return build_standin(tmp_path_factory.mktemp("standin") / "model", seed=0)


@pytest.fixture(scope="module")
def engine(standin) -> KimiEngine:
    return KimiEngine(standin, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    """Seeded noise with a rising envelope (the tiny GLM tokenizer then gives varied codes)."""
    rng = np.random.default_rng(7)
    return [(rng.standard_normal(n) * np.linspace(0.01, 0.6, n)).astype(np.float32) for n in CLIP_SAMPLES]


def sha256_of(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


# --- the stand-in -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "same"), [(0, True), (1, False)])
def test_standin_weights_depend_on_the_seed_alone(standin, tmp_path, seed, same):
    again = sha256_of(build_standin(tmp_path / "again", seed=seed))
    first = sha256_of(standin)
    assert sorted(again) == sorted(first) == ["glm-4-voice-tokenizer/model.safetensors", SHARD_1, SHARD_2,
                                              "whisper-large-v3/model.safetensors"]
    assert (again == first) is same
    assert all((again[f] == first[f]) is same for f in first)


@pytest.mark.parametrize(("field", "value"), [
    ("vocab_size", 168_448), ("kimia_token_offset", 152_064), ("kimia_text_output_vocab", 152_064),
    ("kimia_media_begin", 151_661), ("kimia_media_end", 151_663), ("num_base_tokens", 151_643),
    ("hidden_size", 32), ("num_hidden_layers", 2), ("num_attention_heads", 4), ("num_key_value_heads", 2),
    ("kimia_mimo_layers", 1), ("kimia_mimo_transformer_from_layer_index", 0), ("kimia_adaptor_input_dim", 32),
])
def test_standin_has_the_real_vocabulary_at_toy_widths(standin, field, value):
    assert json.loads((standin / "config.json").read_text())[field] == value


def test_standin_layout_loads_strictly(standin):
    assert folder_problems(standin) == []
    assert not (standin / "tiktoken.model").exists()  # the pinned stand-in BPE is used
    note = (standin / "STANDIN.txt").read_text()
    assert "RANDOM STAND-IN" in note and "CER is meaningless" in note
    model = load_pretrained(standin, dtype=torch.float32)  # strict: every key and shape
    assert model.lm_head.weight.shape == (168_448, 32)
    size = sum(p.stat().st_size for p in standin.rglob("*") if p.is_file())
    assert size < 40_000_000


# --- decoding ---------------------------------------------------------------------------------------------------


def test_batched_decoding_equals_each_clip_alone(engine, clips, monkeypatch):
    batched = engine.generate(clips)
    alone = [engine.generate([clip])[0] for clip in clips]
    assert [g.n_codes for g in batched] == [24, 10, 40]  # input order kept
    assert [g.ids for g in batched] == [g.ids for g in alone]
    assert [(g.stopped, g.budget) for g in batched] == [(g.stopped, g.budget) for g in alone]
    assert all(len(g.ids) > 0 for g in batched) and len({tuple(g.ids) for g in batched}) == 3
    monkeypatch.setattr(engine, "batch_size", 2)  # one full batch and one partial one
    assert [g.ids for g in engine.generate(clips)] == [g.ids for g in alone]


@pytest.mark.parametrize(("n_codes", "cap", "budget"), [
    (10, None, 26),  # n + 16
    (40, None, 56),
    (40, 5, 5),  # the request's max_new_tokens caps it
    (40, 500, 56),
    (8_000, None, 177),  # 8192 positions − (9 instruction ids + 8000 codes + 6)
])
def test_budget_per_clip(engine, monkeypatch, n_codes, cap, budget):
    monkeypatch.setattr(engine, "max_new_tokens", cap)
    assert engine.budget(n_codes) == budget


def test_a_clip_whose_prompt_fills_the_positions_is_refused(engine):
    with pytest.raises(ValueError, match="leaves no room for a transcript in the model's 8192 positions"):
        engine.budget(8_178)


# Forced 151667 at step k for a row (None: never): the row stops there; the others run to their budget.
@pytest.mark.parametrize(("eos_at", "cap", "expected"), [
    ((3, None, 0), None, [("eos", 3), ("budget", 26), ("eos", 0)]),
    ((None, None, None), None, [("budget", 40), ("budget", 26), ("budget", 56)]),
    ((None, 2, None), 4, [("budget", 4), ("eos", 2), ("budget", 4)]),
])
def test_generation_stops_at_eos_or_budget(engine, clips, monkeypatch, eos_at, cap, expected):
    monkeypatch.setattr(engine, "max_new_tokens", cap)
    codes = engine.glm.encode(clips)
    with torch.inference_mode():
        features = [encode_clip(engine.encoder, engine.feature_extractor, c) for c in clips]
        free = engine.decode(codes, features)
    step, fed = [0], []

    def force_eos(module, args, output):
        for row, k in enumerate(eos_at):
            if k == step[0]:
                output[row, -1] = -1e9
                output[row, -1, TEXT_EOS] = 0.0
        step[0] += 1
        return output

    def record(module, args, kwargs):
        fed.append((args[0][:, -1].tolist(), args[1][:, -1].tolist()))  # (audio, text) stream tokens of the step

    hooks = [engine.model.lm_head.register_forward_hook(force_eos),
             engine.model.register_forward_pre_hook(record, with_kwargs=True)]
    try:
        with torch.inference_mode():
            got = engine.decode(codes, features)
    finally:
        for h in hooks:
            h.remove()
    assert [(g.stopped, len(g.ids)) for g in got] == expected
    assert all(len(g.ids) + (g.stopped == "eos") <= g.budget for g in got)
    assert all(g.ids == f.ids[:len(g.ids)] for g, f in zip(got, free, strict=True))  # the same tokens until then
    chosen = [len(g.ids) + (g.stopped == "eos") for g in got]  # tokens each row chose, 151667 included
    assert len(fed) == max(chosen)  # the prompt, then one forward per step that left a row running
    for k, (audio, text) in enumerate(fed[1:], start=1):  # forward k feeds each running row's token k − 1
        for row, g in enumerate(got):
            running = k < chosen[row]
            assert (audio[row], text[row]) == ((TEXT_BLANK, g.ids[k - 1]) if running else (PAD, PAD))


@pytest.mark.parametrize(("chosen", "expected"), [
    ([], [2.0, -2.0, 2.0, 1.0]),  # nothing chosen yet: nothing penalized
    ([0, 1, 0], [1.0, -4.0, 2.0, 1.0]),  # positive scores divided, negative ones multiplied, each id once
    ([0] + [2] * 16, [2.0, -2.0, 1.0, 1.0]),  # only the last 16 chosen tokens count
])
def test_repetition_penalty(engine, monkeypatch, chosen, expected):
    monkeypatch.setattr(engine, "repetition_penalty", 2.0)
    scores = engine._penalize(torch.tensor([[2.0, -2.0, 2.0, 1.0]]), [chosen])
    assert scores[0].tolist() == expected


def without_preprocessor_file(whisper: Path) -> None:  # upstream computes the log-mel itself
    (whisper / "preprocessor_config.json").unlink()


def renamed_keys(rename):
    def change(whisper: Path) -> None:
        from safetensors.torch import load_file, save

        state = load_file(str(whisper / "model.safetensors"))
        (whisper / "model.safetensors").write_bytes(save({rename(k): v for k, v in state.items() if rename(k)}))
    return change


@pytest.mark.parametrize("variant", [
    without_preprocessor_file,
    renamed_keys(lambda k: "model." + k),  # a WhisperForConditionalGeneration checkpoint: model.encoder.*
    renamed_keys(lambda k: k.removeprefix("encoder.") if k.startswith("encoder.") else None),  # the encoder alone
], ids=["no preprocessor_config.json", "model.encoder.* keys", "bare encoder keys"])
def test_whisper_folder_variants_give_the_same_transcripts(standin, engine, clips, tmp_path, variant):
    download = tmp_path / "download"
    shutil.copytree(standin, download)
    variant(download / "whisper-large-v3")
    assert folder_problems(download) == []
    assert KimiEngine(download, dtype=torch.float32).transcribe(clips) == engine.transcribe(clips)


def test_transcripts_are_text(engine, clips):
    texts = engine.transcribe(clips)
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    assert engine.transcribe([]) == []


def test_open_engine_takes_a_model_or_an_export_folder(standin, tmp_path):
    (tmp_path / "model").symlink_to(standin, target_is_directory=True)
    for folder in (standin, tmp_path):
        engine, used = open_engine(folder, EngineRequest(device="cpu"))
        assert used["folder"] == str(standin if folder == standin else tmp_path / "model")
        assert engine.info["comparable"] == {
            "instruction_ids": INSTRUCTION_IDS,
            "max_new_tokens": {"per_code": 1, "margin": 16, "cap": None, "max_positions": 8192}}
        assert engine.info["decoding"]["search"] == "greedy" and engine.info["standin"] is True


@pytest.mark.parametrize(("request_", "message"), [
    (EngineRequest(backend="ct2"), "decodes with 'torch'"),
    (EngineRequest(beam_size=4), "decodes greedily"),
])
def test_open_engine_refuses_what_it_cannot_do(standin, request_, message):
    with pytest.raises(FamilyError, match=message):
        open_engine(standin, request_)


# --- export -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A complete folder with other LLM weights (seed 1): what training changed."""
    return build_standin(tmp_path_factory.mktemp("trained") / "model", seed=1)


def final_folder(trained: Path, dest: Path) -> Path:
    """finetune's final/: the LLM shards, a config.json without the kimia_* fields, training state."""
    dest.mkdir()
    for p in trained.glob("model*"):
        shutil.copyfile(p, dest / p.name)
    config = json.loads((trained / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({k: v for k, v in config.items() if not k.startswith("kimia_")}))
    (dest / "trainer_state.json").write_text("{}")
    return dest


@pytest.mark.parametrize("layout", ["final + donor", "complete folder"])
def test_export_reloads_offline_with_identical_transcripts(standin, trained, clips, tmp_path, layout):
    donor = tmp_path / "donor"
    shutil.copytree(standin, donor)
    (donor / "tokenization_kimia.py").write_text("# the model's own tokenizer code\n")
    (donor / "tokenizer_config.json").write_text('{"tokenizer_class": "TikTokenTokenizer"}\n')
    if layout == "final + donor":
        source, front_ends = final_folder(trained, tmp_path / "final"), donor
    else:
        source, front_ends, donor = trained, trained, None
    expected_engine = KimiEngine(front_ends, dtype=torch.float32)  # the donor's front ends …
    expected_engine.model = load_pretrained(trained, dtype=torch.float32).eval()  # … with the trained LLM
    expected = expected_engine.transcribe(clips)
    checker = KimiEngine(front_ends, dtype=torch.bfloat16, max_new_tokens=VERIFY_MAX_NEW_TOKENS)  # the export's
    checker.model = load_pretrained(trained, dtype=torch.bfloat16).eval()  # check: bf16 weights stay bf16 on a CPU
    verified = checker.transcribe(clips[:1])[0]

    info = export(source, tmp_path / "out", donor, {}, clips[0])

    out = tmp_path / "out" / "model"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]  # published whole, nothing left beside
    assert info["verification"]["kimi"] == {**info["verification"]["kimi"], "text": verified, "dtype": "bfloat16"}
    with network_blocked():
        assert KimiEngine(out, dtype=torch.float32).transcribe(clips) == expected
    assert {w["file"]: w["sha256"] for w in info["model_weights"]} == {
        k: v for k, v in sha256_of(trained).items() if "/" not in k}
    config = json.loads((out / "config.json").read_text())
    assert {f for f in KimiAudioConfig.model_fields if f.startswith("kimia_")} <= set(config)
    copied = {p.name for p in out.iterdir()}
    assert {"STANDIN.txt", "whisper-large-v3", "glm-4-voice-tokenizer", "model.safetensors.index.json"} <= copied
    assert ("tokenization_kimia.py" in copied) == (donor is not None)
    assert "trainer_state.json" not in copied


def test_network_is_blocked_inside_the_check():
    original = socket.create_connection
    with network_blocked():
        with pytest.raises(ConnectionRefusedError, match="network is blocked"):
            socket.create_connection(("127.0.0.1", 9))
        with pytest.raises(ConnectionRefusedError):
            socket.getaddrinfo("huggingface.co", 443)
    assert socket.create_connection is original


# --- broken folders: every problem at once ------------------------------------------------------------------------


def drop_whisper(folder: Path) -> None:
    shutil.rmtree(folder / "whisper-large-v3")


def wrong_shape(folder: Path) -> None:
    from safetensors.torch import load_file, save

    shard = load_file(str(folder / SHARD_2))
    shard["lm_head.weight"] = torch.zeros(1000, 32, dtype=torch.bfloat16)
    (folder / SHARD_2).write_bytes(save(shard))


def truncate(folder: Path) -> None:
    data = (folder / SHARD_1).read_bytes()
    (folder / SHARD_1).write_bytes(data[: len(data) // 2])


def other_mel_bins(folder: Path) -> None:
    path = folder / "whisper-large-v3" / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "feature_size": 80}))


def drop_glm_weights(folder: Path) -> None:
    (folder / "glm-4-voice-tokenizer" / "model.safetensors").unlink()


@pytest.mark.parametrize(("breaks", "problems"), [
    ([drop_whisper], ["whisper-large-v3/ is missing"]),
    ([wrong_shape], ["LLM weights: wrong shape: lm_head.weight is (1000, 32), expected (168448, 32)"]),
    ([drop_whisper, wrong_shape], ["whisper-large-v3/ is missing", "wrong shape: lm_head.weight is (1000, 32)"]),
    ([truncate, drop_glm_weights], [f"{SHARD_1}: truncated", "glm-4-voice-tokenizer/: no model*.safetensors"]),
    ([other_mel_bins], ["whisper-large-v3/preprocessor_config.json: {'feature_size': 80}"]),
])
def test_a_broken_folder_is_refused_with_every_problem(standin, tmp_path, breaks, problems):
    broken = tmp_path / "broken"
    shutil.copytree(standin, broken)
    for change in breaks:
        change(broken)
    n = f"({len(problems)} problem{'s' if len(problems) > 1 else ''})"
    with pytest.raises(ModelFolderError) as opened:
        open_engine(broken, EngineRequest())
    with pytest.raises(StageFailed) as exported:
        export(broken, tmp_path / "out", None, {}, None)
    for error in (str(opened.value), str(exported.value)):
        assert n in error and all(p in error for p in problems), error
    assert exported.value.exit_code == 2
    assert not (tmp_path / "out" / "model").exists()
