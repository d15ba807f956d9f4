"""finetune with a forgetting guard, end to end on a tiny random Whisper: candidates scored on a guard set and a
held-aside slice of the training data, the choice in plan.json and guard.json, final/ = the chosen candidate —
and the run's test split is never read for any of it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_finetune import N_TEST, finetune_args, prepared_run, write_clips


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    for var in list(os.environ):
        if var.startswith("ASRFT_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("ASRFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_guard_chooses_without_the_test_set(tmp_path):
    from common.core.records import audio_location
    from jobs.extract.__main__ import main as extract_main
    from jobs.finetune.__main__ import main

    artifacts, common = prepared_run(tmp_path, 12, "g")
    assert extract_main([*common, "--epochs", "2"]) == 0
    run = artifacts / "g"
    test_ids = [json.loads(line)["id"] for line in (run / "prepare" / "test.jsonl").read_text().splitlines()]
    assert len(test_ids) == N_TEST
    # the test split made unreadable: its records and audio gone. Any use of it would fail the stage.
    for line in (run / "prepare" / "test.jsonl").read_text().splitlines():
        Path(audio_location(json.loads(line), run)).unlink()
    (run / "prepare" / "test.jsonl").write_text("not json\n")
    guard = write_clips(tmp_path / "general", 3)
    (guard / "train.csv").rename(guard / "transcripts.csv")

    assert main(finetune_args(common, "--max-steps", "2", "--context-seconds", "2", "--choice-holdout", "2",
                              "--guard-name", "general", "--guard-dir", str(guard), "--guard-tolerance", "100",
                              "--merge-candidates", "1/1 0.5/0.5 0/0")) == 0

    out = run / "finetune"
    result = json.loads((out / "guard.json").read_text())
    names = [c["name"] for c in result["candidates"]]
    assert names == ["merge-enc1-dec1", "merge-enc0.5-dec0.5", "merge-enc0-dec0"]
    assert result["met_tolerance"] and result["chosen"] in names
    assert len(result["guard_ids"]) == 3 and len(result["domain_slice_ids"]) == 2
    assert not set(result["domain_slice_ids"]) & set(test_ids)
    # 0/0 is the pretrained model again: exactly its errors, so its guard interval is [0, 0]
    zero = next(c for c in result["candidates"] if c["name"] == "merge-enc0-dec0")
    assert zero["guard_delta"]["low"] == zero["guard_delta"]["high"] == 0 and zero["passes"]
    plan = json.loads((out / "plan.json").read_text())
    values = {d["name"]: d for d in plan["decisions"]}
    assert values["choice_holdout"]["value"] == 2
    assert values["train_clips"]["value"] == 12 - N_TEST - 2
    assert values["guard"]["value"]["chosen"] == result["chosen"] and values["guard"]["reason"] == result["reason"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["summary"]["final"]["candidate"] == result["chosen"]
    assert (out / "final" / "model.safetensors").is_file()


def test_optional_guard_set_missing_trains_without_a_choice(tmp_path):
    from jobs.extract.__main__ import main as extract_main
    from jobs.finetune.__main__ import main

    artifacts, common = prepared_run(tmp_path, 10, "n")
    assert extract_main([*common, "--epochs", "1"]) == 0
    os.environ.pop("ASRFT_NO_SUCH_DIR", None)
    args = finetune_args(common, "--max-steps", "1", "--context-seconds", "2")
    config = tmp_path / "ft.yaml"
    config.write_text('finetune:\n  guard: {name: general, dir: "${ASRFT_NO_SUCH_DIR}", optional: true}\n')
    assert main([*args, "--config", str(config)]) == 0
    out = artifacts / "n" / "finetune"
    assert not (out / "guard.json").exists()
    values = {d["name"]: d for d in json.loads((out / "plan.json").read_text())["decisions"]}
    assert values["guard"]["value"] is None and "not found" in values["guard"]["reason"]
    assert (out / "final" / "model.safetensors").is_file()
    shutil.rmtree(out)
