"""The CPU-runnable parts of the fast path (common/training/fast_train.py): fp32 master weights behind bf16 working
weights, fp32 gradient accumulation and clipping, data order and resume, decoder padding, and the checkpoint
format (a plain fp32 Hugging Face model + optimizer state) including an exact resume, on a tiny Whisper."""

from __future__ import annotations

import math
import os

import pytest
import torch

from common.families.whisper.profile import forward_flops as whisper_forward_flops
from common.training.fast_train import (
    IGNORE_INDEX,
    FastOptions,
    MasterWeights,
    PadDecoder,
    StepBatches,
    fast_path_applies,
    kernel_kind,
    last_checkpoint,
    train_fast,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, vocab_size=96, max_source_positions=16,
            max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
PROMPT = [3, 4, 5, 6]  # stands for <|startoftranscript|><|zh|><|transcribe|><|notimestamps|>
EOT = 2


@pytest.mark.parametrize(
    ("lr", "steps"),
    [
        (1e-4, 10),  # each update (~lr) is far below bf16's half-step at 1.0 (2**-8 = 0.0039)
        (1e-3, 3),
    ],
)
def test_master_keeps_updates_that_bf16_rounds_away(lr: float, steps: int) -> None:
    p = torch.nn.Parameter(torch.ones(64, 8))
    master = MasterWeights([("w", p)], weight_decay=0.0, dtype=torch.bfloat16, device="cpu")
    opt = torch.optim.AdamW(master.param_groups(), lr=lr, fused=True)
    pure = torch.nn.Parameter(torch.ones(64, 8, dtype=torch.bfloat16))  # the same update on bf16 weights
    pure_opt = torch.optim.AdamW([pure], lr=lr, weight_decay=0.0, fused=True)
    for _ in range(steps):
        p.grad = torch.ones_like(p)  # what autograd leaves: a bf16 gradient
        master.accumulate(first=True)
        master.clip_(0.0)
        opt.step()
        master.publish()
        pure.grad = torch.ones_like(pure)
        pure_opt.step()
    value = master.groups[0].master[0].item()
    assert value == pytest.approx(1 - steps * lr, rel=1e-3)  # Adam's first steps move by ~lr each
    assert p.dtype == torch.bfloat16 and torch.equal(p, torch.full_like(p, value).to(torch.bfloat16))
    if steps * lr < 2**-8:
        assert torch.equal(pure, torch.ones_like(pure))  # plain bf16 lost every update


def test_gradients_accumulate_in_fp32_and_clip_like_torch() -> None:
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))
    master = MasterWeights([("w", w), ("b", b)], weight_decay=0.1, dtype=torch.bfloat16, device="cpu")
    assert [g.weight_decay for g in master.groups] == [0.1, 0.0]  # 1-D tensors (biases, norms): no decay
    for g in master.groups:  # every tensor starts 64 elements apart: aligned like the buffer itself
        assert all((v.data_ptr() - g.master.data_ptr()) % (64 * 4) == 0 for v in g.views(g.master))
    micro = [(torch.randn(5, 3), torch.randn(3)) for _ in range(2)]
    for i, (gw, gb) in enumerate(micro):
        assert w.grad is None and b.grad is None  # autograd hands over fresh gradients, nothing to add into
        w.grad, b.grad = gw.to(torch.bfloat16), gb.to(torch.bfloat16)  # what autograd leaves after backward
        master.accumulate(first=i == 0)
    want = [sum(g[k].to(torch.bfloat16).float() for g in micro) for k in (0, 1)]
    got = [v for _, _, v in master.named_masters()]
    for grp, expect in zip(master.groups, want, strict=True):
        assert torch.equal(grp.master.grad[: expect.numel()], expect.reshape(-1))
    ref = [torch.nn.Parameter(g.clone()) for g in got]
    for r, expect in zip(ref, want, strict=True):
        r.grad = expect.clone()
    fp32_grads = [g.master.grad.data_ptr() for g in master.groups]
    master.publish()
    assert [g.master.grad.data_ptr() for g in master.groups] == fp32_grads  # kept: no allocation per step
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    norm = master.clip_(0.5)
    torch.testing.assert_close(norm, ref_norm)
    for grp, r in zip(master.groups, ref, strict=True):
        torch.testing.assert_close(grp.master.grad[: r.numel()], r.grad.reshape(-1))


@pytest.mark.parametrize(
    ("n", "batch", "accum", "sizes"),
    [
        (12, 4, 1, [1, 1, 1]),
        (16, 4, 2, [2, 2]),
        (10, 4, 2, [2, 1]),  # 3 micro-batches per epoch: the second step gets the last one alone
        (9, 2, 4, [4, 1]),
    ],
)
def test_step_batches_cover_each_epoch_and_resume_exactly(n: int, batch: int, accum: int, sizes: list[int]) -> None:
    epochs = 3
    full = StepBatches(n, batch, accum, seed=7, start_step=0, end_step=len(sizes) * epochs)
    assert list(full.group_sizes()) == sizes * epochs
    steps = list(full.steps())
    for e in range(epochs):
        seen = [i for _, micro in steps[e * len(sizes) : (e + 1) * len(sizes)] for mb in micro for i in mb]
        assert sorted(seen) == list(range(n))  # every sample once per epoch
    cut = len(sizes) + 1
    resumed = StepBatches(n, batch, accum, seed=7, start_step=cut, end_step=len(sizes) * epochs)
    assert list(resumed) == [mb for _, micro in steps[cut:] for mb in micro]


@pytest.mark.parametrize(("width", "multiple", "padded"), [(5, 8, 8), (8, 8, 8), (9, 8, 16), (5, 1, 5)])
def test_pad_decoder_pads_after_the_text(width: int, multiple: int, padded: int) -> None:
    def collate(items: list) -> dict:
        return {"decoder_input_ids": torch.ones(len(items), width, dtype=torch.long),
                "labels": torch.full((len(items), width), 7)}

    out = PadDecoder(collate, pad_id=0, multiple=multiple)([{}, {}])
    assert out["labels"].shape == out["decoder_input_ids"].shape == (2, padded)
    assert torch.all(out["labels"][:, width:] == IGNORE_INDEX) and torch.all(out["decoder_input_ids"][:, width:] == 0)
    assert torch.all(out["labels"][:, :width] == 7)


def test_forward_flops_of_whisper_large_v3() -> None:
    from transformers import WhisperConfig

    cfg = WhisperConfig(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                        decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=128,
                        vocab_size=51866)
    flops = whisper_forward_flops(cfg, decoder_len=44)
    # encoder ~ 2 x 0.63 B params x 1500 frames + attention scores; decoder adds ~ 0.3 TFLOP of cross-attention K/V
    assert 2.6e12 < flops < 2.75e12
    assert whisper_forward_flops(cfg, decoder_len=88) > flops


# --- a tiny Whisper through the real loop ------------------------------------------------------------


class _Clips:
    def __init__(self, n: int, mels: int, frames: int):
        gen = torch.Generator().manual_seed(1)
        self.features = torch.randn(n, mels, frames, generator=gen).to(torch.float16)  # as extract caches them
        self.texts = [torch.randint(10, 90, (3 + i % 4,), generator=gen).tolist() for i in range(n)]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        from common.families.whisper.data import make_target

        dec, lab = make_target(PROMPT, self.texts[i], EOT)
        return {"input_features": self.features[i].float().numpy(), "decoder_input_ids": dec, "labels": lab}


def _trainee(seed: int = 0):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from common.families.whisper.trainee import ModeSpec, make_trainee

    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(WhisperConfig(**TINY))
    return model, make_trainee(model, ModeSpec(mode="full"))


def _plan(n_train: int, steps: int, save_steps: int):
    from transformers import WhisperConfig

    from common.families.whisper.profile import profile_from_hf_config
    from common.training.planner import Resources, plan

    resources = Resources(gpus=0, host_ram_bytes=16 * 2**30, cpu_count=2)
    profile = profile_from_hf_config(WhisperConfig(**TINY), decoder_seq_len=12)
    return plan(profile, n_train=n_train, mode="full", per_device_batch=4, grad_accum=2, lr=3e-3, save_steps=save_steps,
                resources=resources, overrides={"max_steps": steps})


def test_train_fast_checkpoints_reload_as_fp32_and_resume_exactly(tmp_path) -> None:
    from transformers import WhisperForConditionalGeneration

    from common.families.whisper.data import WhisperCollator

    data = _Clips(12, TINY["num_mel_bins"], 2 * TINY["max_source_positions"])
    the_plan = _plan(len(data), steps=4, save_steps=2)
    assert not fast_path_applies(the_plan.schedule)[0]  # CPU plan: the stage keeps the Trainer; the loop itself runs anywhere
    collate = WhisperCollator(TINY["pad_token_id"])
    options = FastOptions(progress=False, seed=3)

    model, trainee = _trainee()
    seen: list[str] = []
    result = train_fast(trainee, data, collate, the_plan.schedule, tmp_path / "a", on_checkpoint=lambda p: seen.append(p.name),
                        options=options)
    assert result["global_step"] == 4 and seen == ["checkpoint-2", "checkpoint-4"] == result["checkpoints"]
    assert all(math.isfinite(h["loss"]) for h in result["log_history"] if "loss" in h)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(p.dtype == torch.float32 for p in trained.values())  # the trainee holds the fp32 masters again

    last = last_checkpoint(tmp_path / "a")
    assert last is not None and last.name == "checkpoint-4"
    reloaded = WhisperForConditionalGeneration.from_pretrained(str(last))  # dtype "auto": the config says fp32
    assert reloaded.dtype == torch.float32
    for n, p in reloaded.named_parameters():
        assert torch.equal(p, trained[n]), n

    model2, trainee2 = _trainee(seed=99)  # other initial weights: everything must come from the checkpoint
    resumed = train_fast(trainee2, data, collate, the_plan.schedule, tmp_path / "b",
                         resume_from=tmp_path / "a" / "checkpoint-2", options=options)
    assert resumed["resumed_from"] == "checkpoint-2" and resumed["global_step"] == 4
    for n, p in model2.named_parameters():
        torch.testing.assert_close(p, trained[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize(("limit", "groups"), [(2**30, 2), (128, 3)])
def test_large_groups_split_into_several_flat_buffers(monkeypatch, limit: int, groups: int) -> None:
    import common.training.fast_train as ft

    monkeypatch.setattr(ft, "MAX_FLAT_ELEMENTS", limit)
    params = [torch.nn.Parameter(torch.full((8, 8), float(i))) for i in range(3)] + [torch.nn.Parameter(torch.ones(8))]
    master = MasterWeights([(f"p{i}", p) for i, p in enumerate(params)], weight_decay=0.1, dtype=torch.bfloat16,
                           device="cpu")
    assert len(master.groups) == groups  # 3 x 64 elements over 128-element buffers: 2 decay buffers + 1 no-decay
    assert [n for n, _, _ in master.named_masters()] == ["p0", "p1", "p2", "p3"]
    for i, (_, p, m) in enumerate(master.named_masters()):
        assert torch.equal(m, torch.full_like(m, float(i) if i < 3 else 1.0)) and p.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("name", "kind"),
    [  # kernel names seen in the H100 profile of the large-v3 run
        ("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NNT", "gemm"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1x1x1_kernel0_0",
         "attention"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>, false>", "attention"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "gemm"),
        ("triton_red_fused_add_native_layer_norm_backward_view_8", "other"),
        ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>", "other"),
    ],
)
def test_profile_kernel_kinds(name: str, kind: str) -> None:
    assert kernel_kind(name) == kind


@pytest.mark.parametrize("skipped", [False, True])
def test_first_micro_batch_overwrites_the_fp32_gradients(skipped: bool) -> None:
    """A step starts from the micro-batch's own gradients; a parameter it did not reach contributes zero."""
    w, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    master = MasterWeights([("w", w), ("b", b)], weight_decay=0.0, dtype=torch.bfloat16, device="cpu")
    w.grad, b.grad = torch.full_like(w, 3.0), torch.full_like(b, 5.0)
    master.accumulate(first=True)  # the previous step's gradients
    w.grad = torch.full_like(w, 2.0)
    b.grad = None if skipped else torch.full_like(b, 1.0)
    master.accumulate(first=True)
    views = master.groups[0].grad_views
    assert torch.equal(views[0], torch.full((4, 4), 2.0))
    assert torch.equal(views[1], torch.zeros(4, 4) if skipped else torch.ones(4, 4))


def test_host_decoder_positions_change_no_number_and_pass_host_positions() -> None:
    """With HostDecoderPositions installed the decoder receives host position ids (the packed-sequence check
    runs on the CPU) and loss and gradients are exactly those of the plain model; removed, nothing remains."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from common.training.fast_train import HostDecoderPositions

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**TINY)).train()
    feats = torch.randn(3, TINY["num_mel_bins"], 2 * TINY["max_source_positions"])
    dec = torch.randint(4, TINY["vocab_size"], (3, 7))

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = model(input_features=feats, decoder_input_ids=dec, labels=dec, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads()
    seen: list[object] = []
    spy = model.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("position_ids")), with_kwargs=True)
    with HostDecoderPositions(model) as hooks:
        assert hooks.active
        spy.remove()  # registered first: sees what the caller passed; re-register after ours to see ours
        spy = model.get_decoder().register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw.get("position_ids")), with_kwargs=True)
        loss, grads = loss_and_grads()
    spy.remove()
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    for n, g in grads.items():
        assert torch.equal(g, plain_grads[n]), n
    assert len(seen) == 1 and torch.equal(seen[0], torch.arange(7).expand(3, 7))
    assert not model.get_decoder()._forward_pre_hooks and not model.get_decoder().embed_positions._forward_pre_hooks
