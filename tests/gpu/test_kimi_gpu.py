"""Kimi-Audio's LLM on a CUDA GPU in the precision the finetune stage trains it: (1) one LoRA training step in bf16
(frozen base weights in bf16, LoRA adapters in fp32, bf16 autocast: what the Trainer runs with the planner's
frozen_dtype bfloat16) against the same step in fp32 — the loss and every LoRA gradient within the tolerances
below; (2) batch invariance in bf16: each row of a right-padded batch (the family's collator) gives the logits
and the loss it gives alone.

The model is a small Kimi-Audio configuration with the real vocabulary (168448 ids), so the batch is real:
``sample.asr_sample`` of random GLM codes for clips of 6-20 s, transcripts tokenized by the real text
tokenizer, random fp16 Whisper features. Its weights are the stand-in's draw (``standin.standin_weights``:
unit-scale activations), stored in bf16 as the released checkpoint is, and loaded through
``family.trainee`` (the stage's LoRA on the trunk's projections). Every LoRA B matrix gets the same random
values in both trainees (peft starts B at zero, where A would get no gradient).

Tolerances. bf16 keeps 8 significant bits, so one rounding moves a value by up to 2^-9 ≈ 0.2 % of it; the
weights are bf16-exact in both runs (the checkpoint is bf16), so the difference is the compute's roundings,
accumulated over 4 layers, attention and the 168448-way softmax:
- loss: |bf16 − fp32| ≤ LOSS_RTOL (0.2 %) of the fp32 loss;
- LoRA gradients: ‖g_bf16 − g_fp32‖ / ‖g_fp32‖ ≤ GRAD_RTOL (5 %) over all adapters together, and every adapter's
  gradient points the same way: cosine ≥ GRAD_MIN_COSINE (0.99);
- batch invariance: a row in the padded batch runs through other kernels than the row alone (a (B, S) matmul,
  a masked attention instead of the causal one), so it gets other roundings, never other values: its logits
  (real positions) differ from the row alone by at most ROW_FACTOR (3) x what bf16 itself changes in that row
  (the row alone, bf16 against fp32) and never more than ROW_LOGIT_MAX (0.5, logits have standard deviation
  ~1). Its loss follows from its logits: a token's cross-entropy (logsumexp − the label's logit) moves by at
  most twice the largest logit change, so the row's mean loss may differ by 2 x its logit difference (+ 1e-3
  for the reductions), never more than ROW_LOSS_MAX (0.05 of a loss of ~12.5). A row that read another row's
  features, padding or positions would be off by O(1).
  (On an H100, torch 2.11: logits 0.031 from alone — one bf16 step at |logit| 4–8 — where bf16 alone is 0.040
  from fp32; losses 0.001–0.0044 from alone. An earlier bound of 3 x the row's own bf16 loss change failed
  there by chance: that change is an average of signed roundings and can be far below the logit scale.)
The same computations with CPU bf16 autocast (torch 2.13, where they can run here) gave: loss 6e-5 relative,
gradients 0.9 %, worst cosine 0.9998; rows 0.03 from alone in logits (two bf16 steps at |logit| ~4) where bf16
alone is 0.04 from fp32, losses within 4e-4. CUDA kernels round differently, hence the margins.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common.families.kimi_audio import family
from common.families.kimi_audio.conventions import (
    IGNORE_INDEX,
    MAX_POSITIONS,
    RMS_NORM_EPS,
    ROPE_THETA,
    STACK,
    VOCAB_SIZE,
    KimiAudioConfig,
    stacked_frames,
)
from common.families.kimi_audio.sample import DEFAULT_INSTRUCTION, asr_sample
from common.families.kimi_audio.tokenizer import load_text_tokenizer
from common.training.memory import LoraSpec

pytestmark = pytest.mark.gpu

ENCODER_WIDTH = 64  # a Whisper-shaped encoder of width 64: 4 stacked frames give the adaptor 256 values
SMALL = KimiAudioConfig(  # the 7B's structure (GQA 2:1, head_dim 128, audio branch, adaptor) at small widths
    vocab_size=VOCAB_SIZE,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=RMS_NORM_EPS,
    rope_theta=ROPE_THETA,
    max_position_embeddings=MAX_POSITIONS,
    kimia_mimo_layers=1,
    kimia_mimo_transformer_from_layer_index=1,
    kimia_adaptor_input_dim=STACK * ENCODER_WIDTH,
)
CLIPS = [  # (seconds, transcript): rows of different lengths, so the batch pads
    (6.1, "今天天气很好"),
    (10.4, "我们明天早上八点在学校门口见面"),
    (14.9, "这个问题需要大家一起讨论一下才能决定"),
    (19.7, "他说自己最近工作很忙没有时间回家看看父母和孩子"),
]
PLAN = SimpleNamespace(mode="lora", lora=LoraSpec(r=16, alpha=32, targets=family.LORA_TARGETS))
PLAN_BF16 = SimpleNamespace(**vars(PLAN), precision="bf16")  # the stage's plan on a GPU: adapters see bf16 inputs
SETTINGS = {"lora_dropout": 0.0}  # no randomness between the two runs
LORA_B_STD = 0.02
LOSS_RTOL = 2e-3
GRAD_RTOL = 0.05
GRAD_MIN_COSINE = 0.99
ROW_FACTOR = 3.0
ROW_LOGIT_MAX = 0.5
ROW_LOSS_MAX = 0.05


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("kimi-small") / "model")


@pytest.fixture(scope="module")
def items(folder) -> list[dict]:
    return make_items(folder)


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA GPU (run them on the GPU machine: pytest -m gpu tests/gpu)")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is fp32
    yield "cuda"
    torch.backends.cuda.matmul.allow_tf32 = tf32


# --- building blocks (device-independent) ---------------------------------------------------------------


def write_model(folder: Path) -> Path:
    """A model folder of SMALL: config.json + bf16 weights drawn as the stand-in draws them (seed 0)."""
    from safetensors.torch import save_file

    from common.families.kimi_audio.standin import standin_weights

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(SMALL.to_json_dict(), indent=2))
    weights = standin_weights(SMALL, torch.Generator().manual_seed(0))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    return folder


def make_items(folder: Path) -> list[dict]:
    """The dataset items family.datasets makes: asr_sample + fp16 features, one per clip of CLIPS."""
    tokenizer = load_text_tokenizer(folder)
    instruction = tokenizer.encode(DEFAULT_INSTRUCTION)
    g = torch.Generator().manual_seed(0)
    out = []
    for seconds, text in CLIPS:
        n = stacked_frames(int(seconds * 16000))
        codes = torch.randint(0, SMALL.num_codes, (n,), generator=g).tolist()
        features = torch.randn(n, SMALL.kimia_adaptor_input_dim, generator=g).to(torch.float16)
        out.append({"sample": asr_sample(codes, tokenizer.encode(text), instruction), "features": features})
    return out


def make_trainee(folder: Path, device: str, bf16: bool):
    """family.trainee (fp32, as the stage loads it) with LoRA B set to the same random values every time; with
    ``bf16`` the frozen weights are cast to bf16 (exact: they are stored in bf16), the adapters stay fp32."""
    torch.manual_seed(0)  # LoRA's A matrices
    trainee = family.trainee(folder, PLAN_BF16 if bf16 else PLAN, SETTINGS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(trainee.named_parameters()):
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=g) * LORA_B_STD)
            if bf16 and not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    return trainee.to(device)


def on(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def autocast(device: str, enabled: bool):
    return torch.autocast(device, dtype=torch.bfloat16, enabled=enabled)


def lora_grads(trainee) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().cpu() for n, p in trainee.named_parameters() if p.requires_grad}


def one_step(trainee, batch: dict, device: str, bf16: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of one training step (forward + backward) on ``batch``."""
    trainee.train()
    trainee.zero_grad(set_to_none=True)
    with autocast(device, bf16):
        loss = trainee(**on(batch, device))["loss"]
    loss.backward()
    return float(loss.detach()), lora_grads(trainee)


def step_errors(folder: Path, items: list[dict], device: str) -> dict:
    """bf16 step against the fp32 step: loss relative error, gradient relative error, worst cosine."""
    batch = family.collator(items)
    loss32, g32 = one_step(make_trainee(folder, device, bf16=False), batch, device, bf16=False)
    loss16, g16 = one_step(make_trainee(folder, device, bf16=True), batch, device, bf16=True)
    assert sorted(g32) == sorted(g16) and len(g32) == SMALL.num_hidden_layers * 7 * 2
    diff = torch.cat([(g16[n] - g32[n]).flatten() for n in g32])
    ref = torch.cat([g32[n].flatten() for n in g32])
    cosines = {n: float(torch.nn.functional.cosine_similarity(g16[n].flatten(), g32[n].flatten(), dim=0)) for n in g32}
    worst = min(cosines, key=cosines.get)
    return {"loss_fp32": loss32, "loss_bf16": loss16, "loss_rel": abs(loss16 - loss32) / loss32,
            "grad_rel": float(diff.norm() / ref.norm()), "worst_cosine": cosines[worst], "worst_tensor": worst}


def forward(trainee, batch: dict, device: str, bf16: bool) -> tuple[torch.Tensor, float]:
    """(text logits (B, S, vocab) in fp32 on the CPU, loss) of an eval-mode forward."""
    trainee.eval()
    with torch.no_grad(), autocast(device, bf16):
        logits = trainee(**on({k: v for k, v in batch.items() if k != "labels"}, device))["logits"]
        loss = trainee(**on(batch, device))["loss"]
    return logits.float().cpu(), float(loss)


def row_errors(folder: Path, items: list[dict], device: str) -> list[dict]:
    """Per row: how far the row in the padded bf16 batch is from the row alone in bf16 (logits on its real
    positions, its loss), and how far bf16 alone is from fp32 alone (the scale of bf16's own roundings)."""
    low = make_trainee(folder, device, bf16=True)
    ref = make_trainee(folder, device, bf16=False)
    batch = family.collator(items)
    logits, _ = forward(low, batch, device, bf16=True)
    out = []
    for b, item in enumerate(items):
        n = len(item["sample"])
        alone = family.collator([item])
        alone16, loss16 = forward(low, alone, device, bf16=True)
        alone32, loss32 = forward(ref, alone, device, bf16=False)
        only_b = torch.full_like(batch["labels"], IGNORE_INDEX)
        only_b[b] = batch["labels"][b]
        _, row_loss = forward(low, {**batch, "labels": only_b}, device, bf16=True)
        out.append({
            "row": b, "positions": n, "padding": batch["audio_ids"].shape[1] - n,
            "logit_diff": float((logits[b, :n] - alone16[0]).abs().max()),
            "loss_diff": abs(row_loss - loss16),
            "bf16_logit_dev": float((alone16[0] - alone32[0]).abs().max()),
            "bf16_loss_dev": abs(loss16 - loss32),
        })
    return out


# --- the tests ----------------------------------------------------------------------------------------------


def test_one_lora_step_in_bf16_matches_fp32(cuda, folder, items):
    e = step_errors(folder, items, cuda)
    print(json.dumps(e, indent=1))
    assert e["loss_rel"] <= LOSS_RTOL, e
    assert e["grad_rel"] <= GRAD_RTOL, e
    assert e["worst_cosine"] >= GRAD_MIN_COSINE, e


def test_each_row_of_a_padded_bf16_batch_equals_the_row_alone(cuda, folder, items):
    rows = row_errors(folder, items, cuda)
    print(json.dumps(rows, indent=1))  # shown with -rA: the measured margins
    assert sum(r["padding"] > 0 for r in rows) == len(rows) - 1  # every row but the longest is padded
    for r in rows:
        assert r["logit_diff"] <= min(ROW_LOGIT_MAX, ROW_FACTOR * r["bf16_logit_dev"]), r
        assert r["loss_diff"] <= min(ROW_LOSS_MAX, 2 * r["logit_diff"] + 1e-3), r
