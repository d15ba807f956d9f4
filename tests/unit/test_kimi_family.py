"""The kimi-audio family's training pieces on the random stand-in: LoRA lands on the trunk's 28 × 7 projections
only, training leaves every frozen tensor byte-identical, the loss reads the transcript and nothing else, and
`pretrained` refuses an incomplete folder listing every problem at once."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common.core.stage import StageFailed
from common.families.kimi_audio import family
from common.families.kimi_audio.conventions import IGNORE_INDEX, KIMI_AUDIO_7B
from common.families.kimi_audio.model import build_on_meta
from common.families.kimi_audio.sample import asr_sample, collate
from common.families.kimi_audio.standin import build_standin
from common.training.memory import LoraSpec

TRUNK_PROJECTION = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$")


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    return build_standin(tmp_path_factory.mktemp("kimi") / "model", seed=0)


def plan_of(mode: str) -> SimpleNamespace:
    return SimpleNamespace(mode=mode, lora=LoraSpec(r=4, alpha=8, targets=family.LORA_TARGETS) if mode == "lora"
                           else None)


def test_lora_targets_are_the_trunks_28_x_7_projections():
    names = family.lora_target_names(build_on_meta(KIMI_AUDIO_7B))
    assert len(names) == 28 * 7 and all(TRUNK_PROJECTION.match(n) for n in names)
    assert not any("mimo" in n for n in names)  # the audio branch's same-named layers stay untouched


def test_lora_wraps_exactly_those_modules(standin):
    trainee = family.trainee(standin, plan_of("lora"), {})
    wrapped = {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in trainee.owner.named_modules()
               if n.endswith(".lora_A")}
    assert wrapped == set(family.lora_target_names(trainee.model))
    layers = trainee.model.config.num_hidden_layers
    assert len(wrapped) == layers * 7


def one_batch(trainee, standin: Path) -> dict:
    instruction = family._instruction(standin)
    samples = [asr_sample([3, 1, 4, 1], [100644, 104307], instruction), asr_sample([5, 9], [1773], instruction)]
    batch = collate(samples, side="right")
    width = trainee.model.config.kimia_adaptor_input_dim
    batch["whisper_features"] = torch.randn(2, 4, width, generator=torch.Generator().manual_seed(0))
    return batch


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_leaves_frozen_tensors_byte_identical(standin, mode):
    torch.manual_seed(0)
    trainee = family.trainee(standin, plan_of(mode), {})
    frozen = {n: p.detach().clone() for n, p in trainee.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in trainee.named_parameters() if p.requires_grad}
    assert frozen and trained
    assert all(p.requires_grad is False for n, p in trainee.model.named_parameters() if "mimo" in n)
    optimizer = torch.optim.AdamW([p for p in trainee.parameters() if p.requires_grad], lr=1e-2)
    batch = one_batch(trainee, standin)
    for _ in range(3):
        optimizer.zero_grad()
        trainee(**batch)["loss"].backward()
        optimizer.step()
    after = dict(trainee.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(after[name].detach(), before), name  # bit for bit
    assert any(not torch.equal(after[n].detach(), t) for n, t in trained.items())


def test_the_loss_reads_the_transcript_and_nothing_else(standin):
    """Only the logits that predict the transcript and its end (151667) receive gradient."""
    trainee = family.trainee(standin, plan_of("full"), {})
    batch = one_batch(trainee, standin)
    hidden = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        hidden["h"] = output

    handle = trainee.model.model.norm.register_forward_hook(keep)
    trainee(**batch)["loss"].backward()
    handle.remove()
    grad = hidden["h"].grad.abs().sum(-1)  # (batch, positions)
    scored = torch.zeros_like(batch["labels"], dtype=torch.bool)
    scored[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX  # position p predicts label p + 1
    assert torch.all(grad[~scored] == 0) and torch.all(grad[scored] > 0)
    assert int(scored.sum()) == (2 + 1) + (1 + 1)  # two transcripts of 2 and 1 ids, each + 151667


def test_pretrained_lists_every_problem_of_a_folder_at_once(standin, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(standin, broken)
    shutil.rmtree(broken / "whisper-large-v3")
    shutil.rmtree(broken / family.SPEECH_TOKENIZER)
    with pytest.raises(StageFailed) as err:
        family.materialize(broken, {"ref": str(broken)}, tmp_path / "dest", {})
    message = str(err.value)
    assert "whisper-large-v3" in message and "speech tokenizer" in message and "--speech-tokenizer" in message
    assert err.value.exit_code == 2 and not (tmp_path / "dest").exists()  # nothing copied


@pytest.mark.parametrize(("gpus", "dtype"), [(1, "bfloat16"), (0, "float32")])
def test_lora_base_dtype_is_the_planners(standin, gpus, dtype):
    """Kimi-Audio keeps no fp32 copy of its frozen base on a GPU (final/ is saved in the checkpoint's dtype): the
    planner's bf16 choice stands there, and the trainee loads it so, with fp32 adapters; fp32 on a CPU."""
    from common.training.planner import detect_resources
    from jobs.finetune import FinetuneSettings
    from jobs.finetune.plan import make_plan

    config = json.loads((standin / "config.json").read_text())
    facts = {"clips": 200, "longest_seconds": 15.0, "longest_labels": 40, "longest_sequence": 260, "rejected": []}
    node = detect_resources(gpus=gpus, gpu_mem_bytes=80 * 10**9 if gpus else 0, host_ram_bytes=125 * 10**9,
                            cpu_count=16, gpu_name="", bf16_supported=gpus > 0)
    plan, _ = make_plan(FinetuneSettings(mode="lora"), family, config, facts, node)
    assert (plan.load_dtype, plan.frozen_dtype) == (dtype, dtype)
    trainee = family.trainee(standin, SimpleNamespace(mode="lora", lora=plan.lora, load_dtype=plan.load_dtype), {})
    frozen = {p.dtype for p in trainee.parameters() if not p.requires_grad}
    trained = {p.dtype for p in trainee.parameters() if p.requires_grad}
    assert frozen == {getattr(torch, dtype)} and trained == {torch.float32}


@pytest.mark.parametrize(("targets", "per_layer"), [(("q_proj", "v_proj"), 2), (family.LORA_TARGETS, 7)])
def test_lora_follows_the_planned_targets(standin, targets, per_layer):
    plan = SimpleNamespace(mode="lora", lora=LoraSpec(r=4, alpha=8, targets=targets))
    trainee = family.trainee(standin, plan, {})
    wrapped = [n for n, _ in trainee.owner.named_modules() if n.endswith(".lora_A")]
    assert len(wrapped) == trainee.model.config.num_hidden_layers * per_layer


def test_lora_targets_naming_no_trunk_projection_are_refused(standin):
    plan = SimpleNamespace(mode="lora", lora=LoraSpec(r=4, alpha=8, targets=("fc1",)))
    with pytest.raises(StageFailed, match="name no projection"):
        family.trainee(standin, plan, {})
