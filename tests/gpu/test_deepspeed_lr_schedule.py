"""With the planner's DeepSpeed config the LR schedule that runs is the requested cosine.

Each case trains a tiny random Whisper with Hugging Face's Seq2SeqTrainer + DeepSpeed in its own
process (tests/gpu/lr_probe.py) and compares the learning rate the optimizer used at every step
with transformers' cosine-with-warmup formula. The negative control adds the upstream recipe's
WarmupLR section and must NOT follow cosine (it holds the peak LR after warmup): that is the bug
the planner avoids.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
PROBE = Path(__file__).with_name("lr_probe.py")


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """transformers.get_cosine_schedule_with_warmup's multiplier after `step` scheduler steps."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def run_probe(tmp_path: Path, strategy: str, upstream: bool = False) -> dict:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA GPU (run them on the GPU machine: pytest -m gpu tests/gpu)")
    out = tmp_path / f"{strategy}{'-upstream' if upstream else ''}.json"
    cmd = [sys.executable, str(PROBE), "--strategy", strategy, "--out", str(out)]
    if upstream:
        cmd.append("--upstream-scheduler")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "zero3-offload-opt"])
def test_requested_cosine_schedule_runs_under_deepspeed(tmp_path, strategy):
    r = run_probe(tmp_path, strategy)
    assert "scheduler" not in r["deepspeed"]
    assert r["global_step"] == r["max_steps"] == len(r["optimizer_lrs"])
    expected = [r["lr"] * cosine_with_warmup(k, r["warmup_steps"], r["max_steps"])
                for k in range(1, r["max_steps"] + 1)]
    assert r["optimizer_lrs"] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert r["losses"][-1] < r["losses"][0]  # it trains


def test_upstream_warmuplr_section_replaces_cosine(tmp_path):
    r = run_probe(tmp_path, "zero2", upstream=True)
    expected = [r["lr"] * cosine_with_warmup(k, r["warmup_steps"], r["max_steps"])
                for k in range(1, r["max_steps"] + 1)]
    assert r["optimizer_lrs"] != pytest.approx(expected, rel=1e-3)
    assert r["optimizer_lrs"][-1] == pytest.approx(r["lr"], rel=1e-3)  # WarmupLR holds the peak: no decay
