"""kill -9 at every publish point of every stage (slow): the whole pipeline on a tiny random Whisper.

1. An uninterrupted reference run records every fault point each stage reaches (ASRFT_FAULT_TRACE).
2. For every stage, every point it reaches and the first and last time it reaches it: a copy of the reference
   run without that stage, the stage run as `asr-ft run` runs it (its module, the step's environment) with
   ASRFT_FAULT=STAGE/POINT:kill:N (SIGKILL right there), then the same command again without the fault.
3. The re-run must succeed and give the reference's outputs: same files, binary files bit-identical, JSON /
   JSONL identical but for timings and the run folder's own path. (TensorBoard event files are named by time and
   host; report.md / report.html are rendered from the compared metrics.json / predictions.jsonl.)
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from faultkit import REPO, child_env, run_module

from common.core.registry import pipeline_steps
from common.core.registry import stage as stage_info
from common.core.stage import MANIFEST
from common.core.store import sha256_file
from common.executors.pipeline import load_pipeline, section_env

STAGES = list(pipeline_steps(optional=False))
# timings, and the Trainer's train_loss (the mean over the steps of its own train() call: a resumed run's
# covers only the steps after the checkpoint; the per-step losses in log_history are compared)
VOLATILE_KEY = re.compile(r"seconds|runtime|per_second|samples_per|steps_per|_time$|^started$|^finished$|flos|"
                          r"peak_|^rss|memory_mb|^free_|^rtf$|^train_loss$", re.I)
SKIPPED_FILES = re.compile(r"^tensorboard/|^report\.(md|html)$")


def pipeline_config(root: Path, model: Path, runs: Path) -> Path:
    config = {
        "run_id": "k", "artifacts": str(runs),
        "demo-data": {"out": str(root / "demo_data"), "n_train": 6, "n_test": 2, "seed": 3},
        "prepare": {"train_csv": str(root / "demo_data/train.csv"), "audio_dir": str(root / "demo_data/audio"),
                    "test_csv": str(root / "demo_data/answers.csv"), "test_audio_dir": str(root / "demo_data/test_audio")},
        "pretrained": {"model": str(model)},
        "extract": {},
        "finetune": {"mode": "full", "device": "cpu", "max_steps": 2, "batch": 2, "grad_accum": 1, "save_steps": 1,
                     "threads": 1},
        "export": {"quantization": "float32"},
        "evaluate": {"max_new_tokens": 8},
    }
    path = runs.parent / "pipeline.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def normalized(value, roots: dict[str, str]):
    """JSON with volatile keys dropped and the run's own folders (``roots``: path → placeholder) replaced."""
    if isinstance(value, dict):
        return {k: normalized(v, roots) for k, v in value.items() if not VOLATILE_KEY.search(str(k))}
    if isinstance(value, list):
        return [normalized(v, roots) for v in value]
    if isinstance(value, str):
        for path, placeholder in roots.items():
            value = value.replace(path, placeholder)
    return value


def stage_result(stage_dir: Path, roots: dict[str, str]) -> dict[str, object]:
    """What a stage produced, comparable across run folders: path → sha256 or normalized JSON."""
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    out: dict[str, object] = {}
    for entry in manifest["outputs"]:
        rel = entry["path"]
        if SKIPPED_FILES.search(rel):
            continue
        path = stage_dir / rel
        if rel.endswith(".json"):
            out[rel] = normalized(json.loads(path.read_text()), roots)
        elif rel.endswith(".jsonl"):
            out[rel] = [normalized(json.loads(line), roots) for line in path.read_text().splitlines() if line.strip()]
        else:
            out[rel] = sha256_file(path)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from test_evaluate import save_tiny_whisper

    root = tmp_path_factory.mktemp("kills")
    model = save_tiny_whisper(root / "tiny-whisper")
    runs = root / "ref" / "runs"
    cfg = pipeline_config(root, model, runs)
    trace = root / "trace.txt"
    cache = root / "cache"  # cold, as each case's is
    done = run_module("jobs.run", ["--config", str(cfg)], ASRFT_FAULT_TRACE=str(trace), ASRFT_CACHE=str(cache))
    assert done.returncode == 0, done.stderr[-3000:]
    points = Counter(line for line in trace.read_text().splitlines() if "/" in line)
    return root, model, runs, str(cache), points


def kill_and_rerun(root: Path, model: Path, ref_runs: Path, ref_cache: str, case: Path, stage: str, name: str,
                   n: int) -> str:
    """One cell of the matrix: kill STAGE at the Nth time it reaches POINT, re-run it, compare → the outcome."""
    runs = case / "runs"
    shutil.copytree(ref_runs, runs)
    for later in STAGES[STAGES.index(stage):]:
        shutil.rmtree(runs / "k" / later)
    cfg = pipeline_config(root, model, runs)
    # the stage as `asr-ft run` starts it; a cache of its own, cold as the reference's was
    env = {"ASRFT_ARTIFACTS": str(runs), "ASRFT_RUN_ID": "k", "ASRFT_CACHE": str(case / "cache"),
           **section_env(load_pipeline(cfg), stage)}
    cmd = [sys.executable, "-m", stage_info(stage).module]
    try:
        killed = subprocess.run(cmd, cwd=REPO, env=child_env(**env, ASRFT_FAULT=f"{name}:kill:{n}"),
                                capture_output=True, text=True, timeout=600)
        if killed.returncode != -9:
            return f"not killed (exit {killed.returncode})"
        if (runs / "k" / stage / MANIFEST).exists() and "manifest" not in name:
            return "published after the kill"
        rerun = subprocess.run(cmd, cwd=REPO, env=child_env(**env), capture_output=True, text=True, timeout=600)
        if rerun.returncode != 0:
            return f"re-run failed: {rerun.stderr[-1500:]}"
        # (records copied from the reference's upstream stages name the reference's folder)
        got = stage_result(runs / "k" / stage, {str(runs): "<runs>", str(ref_runs): "<runs>",
                                                str(case / "cache"): "<cache>"})
        want = stage_result(ref_runs / "k" / stage, {str(ref_runs): "<runs>", ref_cache: "<cache>"})
        if got != want:
            return f"re-run differs from the reference in {sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))}"
        return "identical"
    finally:
        shutil.rmtree(case, ignore_errors=True)


@pytest.mark.slow
def test_kill_at_every_publish_point_of_every_stage(reference, tmp_path):
    root, model, ref_runs, ref_cache, points = reference
    cases = []
    for stage in STAGES:
        for name, count in sorted((p, c) for p, c in points.items() if p.startswith(f"{stage}/")):
            cases += [(stage, name, n) for n in sorted({1, count})]
    assert {c[0] for c in cases} == set(STAGES), f"a stage reached no publish point: {points}"
    rows, failures = [], []
    for i, (stage, name, n) in enumerate(cases):
        outcome = kill_and_rerun(root, model, ref_runs, ref_cache, tmp_path / f"case{i}", stage, name, n)
        rows.append(f"| {name} | {n} of {points[name]} | {outcome} |")
        if outcome != "identical":
            failures.append(rows[-1])
    table = "\n".join(["| point | kill at hit | outcome |", "|---|---|---|", *rows])
    print(f"\n{len(cases)} kills\n{table}")
    (Path(tmp_path) / "matrix.md").write_text(table)
    assert not failures, "\n".join(failures)
