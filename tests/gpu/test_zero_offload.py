"""ZeRO-3 with CPU offload, as the planner configures it, trains, resumes and exports.

For each offload strategy a small random Whisper (d_model 256, 4 + 4 layers) trains 20 steps through
Hugging Face's Seq2SeqTrainer with the planner-generated DeepSpeed config, each strategy in its own
process (tests/gpu/zero_probe.py, both side by side); a fresh Trainer then resumes from the step-10
ZeRO checkpoint. The tests check that the loss falls, that DeepSpeed really offloaded what the config
says, that the resumed run continues the step count, the LR schedule and the loss curve, and that
`consolidate_zero_checkpoint` turns the ZeRO-3 shards into a folder
`WhisperForConditionalGeneration.from_pretrained` loads with the trained weights.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
PROBE = Path(__file__).with_name("zero_probe.py")
PROBE_TIMEOUT_S = 900


STRATEGIES = ("zero3-offload-opt", "zero3-offload-all")


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> dict[str, dict]:
    """Both strategies' probes, run side by side (tiny models: the GPU has room for both)."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA GPU (run them on the GPU machine: pytest -m gpu tests/gpu)")
    running = {}
    for strategy in STRATEGIES:
        out = tmp_path_factory.mktemp(strategy) / "result.json"
        log = open(out.with_name("probe.log"), "w")  # noqa: SIM115 - closed below
        cmd = [sys.executable, str(PROBE), "--strategy", strategy, "--out", str(out)]
        running[strategy] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out, log)
    results = {}
    for strategy, (proc, out, log) in running.items():
        try:
            returncode = proc.wait(timeout=PROBE_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        assert returncode == 0, f"{strategy} probe failed:\n" + out.with_name("probe.log").read_text()[-8000:]
        r = json.loads(out.read_text())
        print("ZERO_PROBE", json.dumps({k: r[k] for k in ("strategy", "engine", "seconds_a", "seconds_b",
                                                          "peak_gpu_gb", "losses_a", "losses_b")}))
        results[strategy] = r
    return results


@pytest.fixture(params=STRATEGIES)
def probe(request, probes) -> dict:
    return probes[request.param]


def by_step(values: dict[str, float]) -> dict[int, float]:
    return {int(k): v for k, v in values.items()}


def test_deepspeed_offloads_what_the_planner_configured(probe):
    zero = probe["deepspeed"]["zero_optimization"]
    assert "scheduler" not in probe["deepspeed"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    offload_param = probe["strategy"] == "zero3-offload-all"
    assert ("offload_param" in zero) == offload_param
    assert probe["engine"] == {"zero_stage": 3, "offload_optimizer": True, "offload_param": offload_param,
                               "optimizer": "DeepSpeedCPUAdam"}


def test_loss_decreases(probe):
    losses = by_step(probe["losses_a"])
    assert probe["global_step_a"] == probe["max_steps"] == 20
    assert sorted(losses) == list(range(1, 21))
    first, last = losses[1], losses[20]
    # random labels from 32 tokens: ln(512) = 6.2 at the start, ln(32) = 3.5 once the unigram is learnt
    assert last < 0.8 * first, losses
    assert statistics.mean(losses[s] for s in range(16, 21)) < statistics.mean(losses[s] for s in range(1, 6))


def test_resume_from_zero_checkpoint_continues(probe):
    save = probe["save_steps"]
    assert {f"checkpoint-{save}", f"checkpoint-{probe['max_steps']}"} <= set(probe["checkpoints"])
    resumed = Path(probe["resumed_from"])
    assert (resumed / f"global_step{save}").is_dir()  # ZeRO shards, not only a 16-bit model
    assert probe["global_step_b"] == probe["max_steps"]
    losses_a, losses_b = by_step(probe["losses_a"]), by_step(probe["losses_b"])
    lrs_a, lrs_b = by_step(probe["lrs_a"]), by_step(probe["lrs_b"])
    assert sorted(losses_b) == list(range(save + 1, probe["max_steps"] + 1))  # counts on from step 11
    assert lrs_b == pytest.approx({s: lrs_a[s] for s in lrs_b}, rel=1e-6)  # the LR schedule resumed
    # the resumed model starts where A was (another seed's fresh model would be back at ~6.2) ...
    assert losses_b[save + 1] == pytest.approx(losses_a[save + 1], rel=0.05)
    # ... and follows A's curve (weights, Adam moments and data order restored)
    steps = range(save + 1, probe["max_steps"] + 1)
    assert statistics.mean(losses_b[s] for s in steps) == pytest.approx(
        statistics.mean(losses_a[s] for s in steps), rel=0.05)


def test_export_consolidates_zero3_shards_into_a_whisper_model(probe, tmp_path):
    from safetensors.torch import load_file
    from transformers import WhisperForConditionalGeneration

    from common.training.zero_export import consolidate_zero_checkpoint, is_zero_checkpoint

    checkpoint = Path(probe["final_checkpoint"])
    assert is_zero_checkpoint(checkpoint)
    out = consolidate_zero_checkpoint(checkpoint, tmp_path / "model")
    assert not any(out.glob("global_step*")) and not (out / "trainer_state.json").exists()
    model = WhisperForConditionalGeneration.from_pretrained(out, local_files_only=True)
    state = model.state_dict()
    reference = load_file(probe["reference_weights"])
    assert set(reference) <= set(state)
    for name, trained in reference.items():
        assert state[name].dtype == torch.float32, name
        torch.testing.assert_close(state[name], trained, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(model.proj_out.weight, model.model.decoder.embed_tokens.weight)  # tied again on load
    initial = load_file(probe["initial_weights"])
    moved = [n for n in reference if not torch.equal(initial[n], state[n])]
    frozen = {"model.encoder.embed_positions.weight"}  # sinusoidal positions: requires_grad=False
    assert set(reference) - set(moved) <= frozen  # every trained weight differs from its initial value
