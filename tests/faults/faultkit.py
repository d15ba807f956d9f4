"""Shared pieces of the fault-matrix suite, imported as ``faultkit`` (a second module named ``conftest`` would
replace tests/conftest.py in sys.modules for the test files collected after it): a tiny prepared run
(tests/integration/test_finetune.py), stage subprocesses with an injected fault (common/core/faults.py), and a
clean ASRFT_* environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))  # the tiny-model helpers of the integration tests
sys.path.insert(1, str(REPO / "tests" / "unit"))  # ... and of the unit tests


@pytest.fixture(autouse=True)
def _clean_asrft_env(monkeypatch, tmp_path):
    for var in [v for v in os.environ if v.startswith("ASRFT_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("ASRFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASRFT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["ASRFT_CACHE"] = os.environ.get("ASRFT_CACHE", "")
    env["HF_HUB_OFFLINE"] = "1"
    return {**env, **extra}


def run_module(module: str, argv: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """``python -m <module> argv`` (a stage or jobs.run) in a fresh process; its output captured."""
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=child_env(**env),
                          capture_output=True, text=True, timeout=timeout)
