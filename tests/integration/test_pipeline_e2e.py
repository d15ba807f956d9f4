"""End to end: every stage through `asr-ft run` (each a subprocess with the container environment contract) on
a tiny random Whisper built here, then a second run that skips every stage.

    demo-data → prepare → pretrained → extract → finetune → export → evaluate
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from test_evaluate import save_tiny_whisper

from common.core.registry import pipeline_steps
from common.core.store import sha256_file

STAGES = list(pipeline_steps(optional=False))  # every step that writes a manifest (demo-data writes none)
EXPECTED = {  # stage → files that must exist in <run>/<stage>/
    "prepare": ["train.jsonl", "test.jsonl", "rejected.jsonl", "stats.json"],
    "pretrained": ["model/config.json", "model/model.safetensors", "provenance.json"],
    "extract": ["train.jsonl", "test.jsonl"],
    "finetune": ["plan.json", "final/config.json", "final/model.safetensors"],
    "export": ["model/config.json", "model/model.safetensors", "ct2/model.bin", "ct2/config.json"],
    "evaluate": ["metrics.json", "predictions.jsonl", "report.md", "report.html"],
}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model = save_tiny_whisper(root / "tiny-whisper")
    config = {
        "run_id": "e2e",
        "artifacts": str(root / "runs"),
        "demo-data": {"out": str(root / "demo_data"), "n_train": 6, "n_test": 2, "seed": 3},
        "prepare": {"train_csv": str(root / "demo_data/train.csv"), "audio_dir": str(root / "demo_data/audio"),
                    "test_csv": str(root / "demo_data/answers.csv"),
                    "test_audio_dir": str(root / "demo_data/test_audio")},
        "pretrained": {"model": str(model)},
        "extract": {},
        "finetune": {"mode": "full", "device": "cpu", "max_steps": 2, "batch": 2, "grad_accum": 1, "save_steps": 1},
        "export": {"quantization": "float32"},
        "evaluate": {"max_new_tokens": 8},
    }
    cfg = root / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASRFT_")}
    env |= {"ASRFT_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}

    def run():
        return subprocess.run([sys.executable, "-m", "jobs.run", "--config", str(cfg)], env=env, cwd=root,
                              capture_output=True, text=True, timeout=600)

    first = run()
    assert first.returncode == 0, first.stderr[-4000:]
    second = run()
    return root / "runs" / "e2e", first, second


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_wrote_its_artifacts_and_manifest(e2e, stage):
    run_dir, _, _ = e2e
    folder = run_dir / stage
    for rel in EXPECTED[stage]:
        assert (folder / rel).is_file(), f"{stage}/{rel} missing"
    manifest = json.loads((folder / "_manifest.json").read_text())
    assert manifest["stage"] == stage and manifest["fingerprint"]
    listed = {o["path"]: o for o in manifest["outputs"]}
    for rel in EXPECTED[stage]:
        assert rel in listed, f"{stage} manifest does not list {rel}"
    for rel, out in listed.items():  # every recorded output is there with the recorded content
        path = folder / rel
        assert path.stat().st_size == out["size"] and sha256_file(path) == out["sha256"], rel
    assert manifest["started"] <= manifest["finished"]


def test_evaluate_compares_pretrained_and_finetuned_on_the_test_set(e2e):
    run_dir, _, _ = e2e
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert list(metrics) == ["pretrained", "finetuned"]
    for per_set in metrics.values():
        assert per_set["test"]["n"] == 2
        assert {"cer", "wer", "exact", "similarity", "n", "audio_seconds", "rtf"} <= set(per_set["test"])
    rows = [json.loads(line) for line in (run_dir / "evaluate" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["model"] for r in rows} == {"pretrained", "finetuned"}


def test_plan_respects_the_tiny_run(e2e):
    run_dir, _, _ = e2e
    plan = json.loads((run_dir / "finetune" / "plan.json").read_text())
    text = json.dumps(plan)
    assert "save_steps" in text and "world_size" in text


def test_first_run_ran_every_stage_and_summarised(e2e):
    _, first, _ = e2e
    for stage in ["demo-data", *STAGES]:
        assert f"✓ {stage}" in first.stderr, f"{stage} not reported done:\n{first.stderr[-3000:]}"
    assert "CER" in first.stderr  # the closing metrics table


def test_second_run_skips_every_stage(e2e):
    _, _, second = e2e
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in ["demo-data", *STAGES]:
        assert f"↷ {stage}" in second.stderr, f"{stage} was not skipped:\n{second.stderr[-3000:]}"
