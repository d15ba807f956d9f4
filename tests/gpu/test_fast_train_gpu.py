"""The fast path (common/training/fast_train.py) on a CUDA GPU: a small random Whisper learns fixed transcripts of
random 30-s log-mels (loss falls), with the plan the planner makes for this GPU, in both precisions
(bf16 weights + fp32 masters with compiled layers; fp32 weights under bf16 autocast), and its checkpoint
reloads into a plain fp32 Hugging Face model equal to the weights the trainee holds afterwards."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

SMALL = dict(d_model=256, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=1024, decoder_ffn_dim=1024, num_mel_bins=80, vocab_size=1000, max_source_positions=1500,
             max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
PROMPT = [3, 4, 5, 6]
EOT = 2
N_CLIPS = 32
STEPS = 40
SENTENCES = 4


class _Clips:
    """Random 30-s log-mels (float16, as extract caches them), each with one of a few random sentences:
    learnable in a few dozen steps (a token stream with no structure would leave the loss at ln(vocab))."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.features = torch.randn(N_CLIPS, SMALL["num_mel_bins"], 3000, generator=gen).to(torch.float16)
        sentences = [torch.randint(10, 990, (8 + k,), generator=gen).tolist() for k in range(SENTENCES)]
        self.texts = [sentences[i % SENTENCES] for i in range(N_CLIPS)]

    def __len__(self) -> int:
        return N_CLIPS

    def __getitem__(self, i: int) -> dict:
        from common.families.whisper.data import make_target

        dec, lab = make_target(PROMPT, self.texts[i], EOT)
        return {"input_features": self.features[i].float().numpy(), "decoder_input_ids": dec, "labels": lab}


@pytest.mark.parametrize(("precision", "compile_layers"), [("master", "on"), ("autocast", "off")])
def test_small_whisper_learns_and_its_checkpoint_reloads_as_fp32(tmp_path, precision, compile_layers):
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA GPU (run them on the GPU machine: pytest -m gpu tests/gpu)")
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from common.families.whisper.data import WhisperCollator
    from common.families.whisper.profile import profile_from_hf_config
    from common.families.whisper.trainee import ModeSpec, make_trainee
    from common.training.fast_train import FastOptions, fast_path_applies, last_checkpoint, train_fast
    from common.training.planner import detect_resources, plan

    config = WhisperConfig(**SMALL)
    the_plan = plan(profile_from_hf_config(config, decoder_seq_len=17), n_train=N_CLIPS, mode="full", lr=1e-3,
                    per_device_batch=8, resources=detect_resources(), save_steps=STEPS // 2,
                    overrides={"max_steps": STEPS, "load_dtype": "float32", "frozen_dtype": "float32"})
    applies, why = fast_path_applies(the_plan.schedule)
    assert applies, why
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    trainee = make_trainee(model, ModeSpec(mode="full"))
    saved = []
    result = train_fast(trainee, _Clips(), WhisperCollator(config.pad_token_id), the_plan.schedule, tmp_path,
                        on_checkpoint=saved.append,
                        options=FastOptions(precision=precision, compile=compile_layers, progress=False))
    line = {k: result[k] for k in ("precision", "attention", "compiled_layers", "first_logged_loss",
                                   "last_logged_loss", "median_step_seconds", "peak_gpu_bytes")}
    print("FAST_TRAIN_GPU", json.dumps(line))
    if os.environ.get("FAST_TRAIN_GPU_OUT"):
        with open(os.environ["FAST_TRAIN_GPU_OUT"], "a") as f:
            f.write(json.dumps(line) + "\n")

    assert result["global_step"] == STEPS
    assert (result["compiled_layers"] > 0) == (compile_layers == "on")
    assert result["last_logged_loss"] < 0.5 * result["first_logged_loss"], result["log_history"]
    assert [p.name for p in saved] == [f"checkpoint-{STEPS // 2}", f"checkpoint-{STEPS}"]

    trained = {n: p.detach().cpu() for n, p in model.named_parameters()}
    assert all(t.dtype == torch.float32 for t in trained.values())
    reloaded = WhisperForConditionalGeneration.from_pretrained(str(last_checkpoint(tmp_path)))
    assert reloaded.dtype == torch.float32
    for n, p in reloaded.named_parameters():
        assert torch.equal(p, trained[n]), n
