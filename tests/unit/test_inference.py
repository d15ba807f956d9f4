"""Which family opens a model given to `asr-ft transcribe` / `asr-ft serve` (common/core/inference.py)."""

from __future__ import annotations

import json

import pytest

from common.core.inference import model_family
from common.core.stage import StageFailed


@pytest.fixture
def run(tmp_path):
    """A run folder whose pretrained stage recorded the kimi-audio family, and a model folder outside any run."""
    run = tmp_path / "runs" / "r1"
    (run / "pretrained" / "model").mkdir(parents=True)
    (run / "pretrained" / "provenance.json").write_text(json.dumps({"family": "kimi-audio"}))
    (run / "export" / "ct2").mkdir(parents=True)
    (tmp_path / "models" / "loose").mkdir(parents=True)
    return run


@pytest.mark.parametrize("ref, family, expected", [
    ("export", None, "kimi-audio"),               # a run's stage folder: the run's pretrained provenance
    ("export/ct2", None, "kimi-audio"),           # a folder inside it
    ("pretrained/model", None, "kimi-audio"),
    ("pretrained", None, "kimi-audio"),
    ("export", "whisper", "whisper"),             # --family wins
    ("../../models/loose", None, "whisper"),      # nothing recorded: the default
])
def test_family_of_a_folder(run, ref, family, expected):
    assert model_family(str(run / ref), run / ref, family).name == expected


@pytest.mark.parametrize("ref, expected", [("bundled:whisper-base", "whisper"),
                                           ("bundled:kimi-audio-tiny", "kimi-audio")])
def test_family_of_a_bundled_model(tmp_path, ref, expected):
    assert model_family(ref, tmp_path, None).name == expected


def test_unknown_family_is_a_clear_error(tmp_path):
    with pytest.raises(StageFailed, match="unknown model family 'whisperx'; known: .*whisper"):
        model_family(str(tmp_path), tmp_path, "whisperx")
