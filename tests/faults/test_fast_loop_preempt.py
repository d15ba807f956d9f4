"""The fast loop (common.training.fast_train) asked to stop (SIGTERM / SIGINT under common.core.preempt):
it finishes the step, saves a sealed checkpoint at that step and returns; resuming from it gives the weights
of an uninterrupted run. (The loop runs on the CPU here; the stage uses it on one CUDA GPU.)"""

from __future__ import annotations

import signal

import pytest
import torch
from test_fast_train import TINY, _Clips, _plan, _trainee

from common.core import faults, preempt
from common.training import checkpoints as ckpts
from common.training.fast_train import FastOptions, train_fast


@pytest.fixture
def stop_at_step(monkeypatch):
    """SIGTERM at the end of optimizer step N (the injector's ``term`` at train.step_end), handled as in a stage."""
    def arm(n: int):
        monkeypatch.setattr(faults, "_hits", {})
        monkeypatch.setenv(faults.ENV, f"train.step_end:term:{n}")
    return arm


def test_sigterm_in_the_fast_loop_saves_that_step_and_resumes_exactly(tmp_path, stop_at_step, monkeypatch):
    from common.families.whisper.data import WhisperCollator

    data = _Clips(12, TINY["num_mel_bins"], 2 * TINY["max_source_positions"])
    schedule = _plan(len(data), steps=4, save_steps=2).schedule
    collate = WhisperCollator(TINY["pad_token_id"])
    options = FastOptions(progress=False, seed=3)

    model, trainee = _trainee()
    train_fast(trainee, data, collate, schedule, tmp_path / "ref", options=options)
    want = {n: p.detach().clone() for n, p in model.named_parameters()}

    stop_at_step(3)
    _, trainee = _trainee()
    with preempt.stop_signals(), preempt.deferred():
        stopped = train_fast(trainee, data, collate, schedule, tmp_path / "run", options=options)
        assert preempt.requested() == signal.SIGTERM
    assert stopped["global_step"] == 3
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert ckpts.verify(ckpt, "fast") is None

    monkeypatch.delenv(faults.ENV)
    model2, trainee2 = _trainee(seed=99)
    resumed = train_fast(trainee2, data, collate, schedule, tmp_path / "run", resume_from=ckpt, options=options)
    assert resumed["global_step"] == 4
    for n, p in model2.named_parameters():
        torch.testing.assert_close(p, want[n], rtol=1e-5, atol=1e-6, msg=n)
