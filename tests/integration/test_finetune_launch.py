"""The finetune stage launching its own workers: 2 gloo processes on CPU (``overrides: {world_size: 2}``) train a
tiny random Whisper through ``asr-ft finetune``'s own entry point; rank 0 alone writes plan.json, checkpoints and
final/, the parent writes the one manifest, and both ranks took part in every step."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_finetune import prepared_run, save_tiny_whisper

from common.core.stage import MANIFEST

N_CLIPS = 10  # 8 train + 2 test
MAX_STEPS = 4  # 8 clips / (batch 2 x 2 ranks) = 2 steps per epoch: 2 epochs


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """artifacts folder with completed prepare, pretrained (tiny model) and extract stages of run 'r'."""
    return prepared_run(tmp_path_factory.mktemp("launch"), N_CLIPS, "r", extract_epochs=2)


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    for var in list(os.environ):
        if var.startswith("ASRFT_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("ASRFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_two_gloo_workers_train_through_the_stage(run_dirs, capfd):
    from safetensors.torch import load_file

    from jobs.finetune.__main__ import main

    artifacts, common = run_dirs
    argv = [*common, "--device", "cpu", "--threads", "1", "--mode", "lora", "--lora-r", "4", "--batch", "2",
            "--grad-accum", "1", "--lr", "1e-3", "--frozen-encoder-layers", "1", "--context-seconds", "2",
            "--max-steps", str(MAX_STEPS), "--overrides", '{"world_size": 2}', "--force"]
    assert main(argv) == 0
    err = capfd.readouterr().err
    out = artifacts / "r" / "finetune"

    plan = json.loads((out / "plan.json").read_text())
    values = {d["name"]: d["value"] for d in plan["decisions"]}
    assert values["world_size"] == 2 and values["max_steps"] == MAX_STEPS and values["device"] == "cpu"
    reasons = {d["name"]: d["reason"] for d in plan["decisions"]}
    assert values["world_size"] == 2 and values["fast_path"] is False
    assert values["processes"] == {"processes": 2, "nodes": 1, "backend": "gloo", "launched_by_stage": True}
    assert "2 worker processes started by this stage" in reasons["processes"]

    summary = json.loads((out / MANIFEST).read_text())["summary"]
    assert summary["world_size"] == 2 and summary["global_step"] == MAX_STEPS
    ranks = summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["global_step"] == MAX_STEPS for r in ranks)
    assert all(np.isfinite(r["train_loss"]) for r in ranks)
    assert "[rank 0/2]" in err and "[rank 1/2]" in err  # both workers logged
    assert "launching 2 worker process(es) (cpu, backend gloo, NCCL_NVLS_ENABLE=0" in err

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))[-1] == f"checkpoint-{MAX_STEPS}"
    final = load_file(out / "final" / "model.safetensors")
    base = load_file(artifacts / "r" / "pretrained" / "model" / "model.safetensors")
    q = "model.decoder.layers.0.self_attn.q_proj.weight"
    assert not np.allclose(final[q].numpy(), base[q].numpy())  # LoRA trained and merged


# --- export of a DeepSpeed ZeRO-3 checkpoint -----------------------------------------------------------------

ZERO_WORLD = 2  # ranks the hand-written checkpoint is sharded over
ZERO_TAG = "global_step4"


def write_zero3_checkpoint(folder, state: dict, tied: dict[str, str]) -> None:
    """DeepSpeed's ZeRO-3 layout as its engine saves it (read back by deepspeed.utils.zero_to_fp32): per rank a
    model-states file (parameter shapes, buffers, tied names) and an optimizer-states file holding that rank's
    fp32 partition of every parameter (ceil(numel / ranks) elements each, zero-padded), one flat group."""
    import math
    from collections import OrderedDict

    import torch

    shapes = OrderedDict((name, t.shape) for name, t in state.items())
    parts: list[list] = [[] for _ in range(ZERO_WORLD)]
    for t in state.values():
        n = math.ceil(t.numel() / ZERO_WORLD)
        flat = torch.nn.functional.pad(t.reshape(-1).float(), (0, n * ZERO_WORLD - t.numel()))
        for r in range(ZERO_WORLD):
            parts[r].append(flat[r * n:(r + 1) * n])
    shards = folder / ZERO_TAG
    shards.mkdir(parents=True)
    for r in range(ZERO_WORLD):
        torch.save({"module": {}, "buffer_names": [], "param_shapes": [shapes], "shared_params": tied,
                    "ds_version": "0.19.8"}, shards / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {"zero_stage": 3, "partition_count": ZERO_WORLD,
                                             "fp32_flat_groups": [torch.cat(parts[r])]}},
                   shards / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    (folder / "latest").write_text(ZERO_TAG)


def test_export_consolidates_a_zero3_checkpoint(tmp_path, capfd):
    import torch
    from safetensors.torch import load_file
    from transformers import WhisperForConditionalGeneration

    from jobs.export.__main__ import main as export_main

    ckpt = tmp_path / "checkpoint-4"
    save_tiny_whisper(ckpt)  # config, generation config, tokenizer, feature extractor (+ weights, removed below)
    model = WhisperForConditionalGeneration.from_pretrained(ckpt)
    (ckpt / "model.safetensors").unlink()
    torch.manual_seed(1)
    trained = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}  # "after training"
    tied = {"proj_out.weight": "model.decoder.embed_tokens.weight"}  # Whisper's output head is the embedding
    write_zero3_checkpoint(ckpt, trained, tied)

    assert export_main(["--checkpoint", str(ckpt), "--no-verify", "--artifacts", str(tmp_path / "runs"),
                        "--run-id", "z"]) == 0
    assert "DeepSpeed ZeRO checkpoint (tag global_step4): consolidating" in capfd.readouterr().err
    out = tmp_path / "runs" / "z" / "export"
    info = json.loads((out / "export_info.json").read_text())
    assert info["zero_consolidated"] is True and info["source"] == str(ckpt)
    exported = load_file(out / "model" / "model.safetensors")
    for name, tensor in trained.items():  # the shards' fp32 values, exactly
        assert torch.equal(exported[name], tensor), name
    assert (out / "ct2" / "model.bin").is_file()
    assert not list(out.glob(".zero-*"))  # the consolidation's working folder is gone
