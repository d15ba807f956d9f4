"""The finetune stage under DeepSpeed on one CUDA GPU (HF Trainer, strategy forced by --overrides): final/ is a
plain fp32 Whisper holding the fp32 master weights of the last ZeRO checkpoint, not ZeRO-3's empty shards nor
the 16-bit copies the module holds under bf16.

For each case the stage runs in its own process (DeepSpeed's process group and globals stay there) on a tiny
random Whisper (tests/integration/test_finetune.py's helpers), 6 steps with a checkpoint every 3. The check
reads the checkpoint-6 shards with DeepSpeed's zero_to_fp32 (common.training.zero_export.zero_fp32_weights) and
compares final/ with them: full fine-tuning weight for weight (exactly); LoRA as pretrained + alpha/r · B·A on
the adapted linears and the exact pretrained weights elsewhere.

Run on the GPU machine: ``pytest -m gpu tests/gpu/test_zero3_final_gpu.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))  # the tiny-model run helpers of test_finetune.py

from test_finetune import prepared_run  # noqa: E402

from common.core.stage import MANIFEST  # noqa: E402

N_CLIPS = 10
MAX_STEPS = 6
SAVE_STEPS = 3
LORA_R = 4
STAGE_TIMEOUT_S = 900
TRAINEE_PREFIX = {"full": "owner.", "lora": "owner.base_model.model."}  # trainee name = prefix + Whisper name
LORA_A, LORA_B = ".lora_A.default.weight", ".lora_B.default.weight"


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """artifacts folder with completed prepare, pretrained (tiny model) and extract stages of run 'z'."""
    return prepared_run(tmp_path_factory.mktemp("gpu-zero3-final"), N_CLIPS, "z", extract_epochs=2)


def run_finetune(common: list[str], strategy: str, mode: str) -> subprocess.CompletedProcess:
    argv = [*common, "--device", "cuda", "--fast-path", "off", "--mode", mode, "--batch", "2", "--grad-accum", "1",
            "--lr", "1e-3" if mode == "lora" else "1e-4", "--lora-r", str(LORA_R), "--max-steps", str(MAX_STEPS),
            "--save-steps", str(SAVE_STEPS), "--context-seconds", "2",
            "--overrides", json.dumps({"strategy": strategy, "gradient_checkpointing": False}), "--force"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASRFT_")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "jobs.finetune", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=STAGE_TIMEOUT_S)


def expected_final(masters: dict, pretrained: dict, mode: str, scale: float) -> dict:
    """final/'s weights as they must be: the pretrained ones with the checkpoint's fp32 masters put in (full),
    or the LoRA deltas alpha/r · B·A added to the adapted linears (lora)."""
    expected = dict(pretrained)
    prefix = TRAINEE_PREFIX[mode]
    for name, value in masters.items():
        if mode == "full":
            expected[name.removeprefix(prefix)] = value
        elif name.endswith(LORA_A):
            module = name[: -len(LORA_A)]
            target = module.removeprefix(prefix) + ".weight"
            expected[target] = pretrained[target] + (masters[module + LORA_B] @ value) * scale
    return expected


@pytest.mark.parametrize(("strategy", "mode"), [("zero3", "full"), ("zero3", "lora"), ("zero2", "full")])
def test_final_holds_the_fp32_masters_of_the_last_zero_checkpoint(run_dirs, strategy, mode):
    import torch
    from transformers import WhisperForConditionalGeneration

    from common.training.zero_export import is_zero_checkpoint, zero_fp32_weights

    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA GPU (run them on the GPU machine: pytest -m gpu tests/gpu)")
    artifacts, common = run_dirs
    proc = run_finetune(common, strategy, mode)
    assert proc.returncode == 0, proc.stderr[-8000:]
    out = artifacts / "z" / "finetune"

    plan = json.loads((out / "plan.json").read_text())
    values = {d["name"]: d["value"] for d in plan["decisions"]}
    assert values["strategy"] == strategy and values["mode"] == mode and values["world_size"] == 1
    assert plan["deepspeed"]["zero_optimization"]["stage"] == int(strategy[-1])
    assert plan["finetune"]["fast_path"] is False
    summary = json.loads((out / MANIFEST).read_text())["summary"]
    assert summary["global_step"] == MAX_STEPS
    assert summary["final"]["weights_from"] == "zero checkpoint"
    assert "final/ weights 最终权重: zero checkpoint" in proc.stderr
    checkpoint = out / "checkpoints" / f"checkpoint-{MAX_STEPS}"
    assert is_zero_checkpoint(checkpoint), sorted(p.name for p in checkpoint.iterdir())

    masters = {n: t.contiguous().float() for n, t in zero_fp32_weights(checkpoint).items()}
    assert masters and all(t.numel() > 0 for t in masters.values())
    pretrained = WhisperForConditionalGeneration.from_pretrained(artifacts / "z" / "pretrained" / "model").state_dict()
    scale = values["lora"]["alpha"] / values["lora"]["r"] if mode == "lora" else 1.0
    expected = expected_final(masters, pretrained, mode, scale)

    final = WhisperForConditionalGeneration.from_pretrained(out / "final", torch_dtype="auto").state_dict()
    assert set(final) == set(pretrained)
    moved = []
    for name, tensor in final.items():
        assert tensor.dtype == torch.float32, f"{name}: {tensor.dtype} (the 16-bit copy, not the fp32 master)"
        assert tensor.shape == pretrained[name].shape, f"{name}: {tuple(tensor.shape)} (a ZeRO-3 shard?)"
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6 if mode == "lora" else 0,
                                   msg=lambda m, n=name: f"{n}: {m}")
        if not torch.equal(tensor, pretrained[name]):
            moved.append(name)
    q = "model.decoder.layers.0.self_attn.q_proj.weight"  # adapted in both modes: training moved it
    assert q in moved, moved
    # frozen in every mode, and no 16-bit rounding of it: the exact pretrained weight
    assert "model.encoder.embed_positions.weight" not in moved
    if mode == "lora":
        assert "model.encoder.conv1.weight" not in moved  # LoRA leaves the conv front-end as it was
    print("ZERO3_FINAL", json.dumps({"strategy": strategy, "mode": mode, "moved_tensors": len(moved),
                                     "train_loss": summary["train_loss"]}))
