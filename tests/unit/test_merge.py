"""WiSE-FT merging of the final model: one factor for the whole model, or one per part (encoder / decoder)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from common.families.whisper.trainee import part_of  # noqa: E402
from common.training.merge import interpolate_weights, merge_factors  # noqa: E402


def tiny_whisper():
    config = transformers.WhisperConfig(
        vocab_size=64, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )
    torch.manual_seed(0)
    return transformers.WhisperForConditionalGeneration(config)


@pytest.mark.parametrize(("name", "part"), [
    ("model.encoder.conv1.weight", "encoder"),
    ("model.encoder.layers.0.fc1.weight", "encoder"),
    ("model.encoder.layer_norm.bias", "encoder"),
    ("model.decoder.layers.0.encoder_attn.q_proj.weight", "decoder"),  # cross-attention belongs to the decoder
    ("model.decoder.embed_tokens.weight", "decoder"),
    ("proj_out.weight", "decoder"),
])
def test_part_of(name, part):
    assert part_of(name) == part


@pytest.mark.parametrize(("alpha", "enc", "dec", "want"), [
    (0.7, None, None, {"encoder": 0.7, "decoder": 0.7}),
    (1.0, 0.6, None, {"encoder": 0.6, "decoder": 1.0}),
    (0.9, 0.6, 0.3, {"encoder": 0.6, "decoder": 0.3}),
    (1.0, None, 0.0, {"encoder": 1.0, "decoder": 0.0}),
])
def test_merge_factors(alpha, enc, dec, want):
    assert merge_factors(alpha, encoder=enc, decoder=dec) == want


@pytest.mark.parametrize("factors", [{"encoder": 0.5, "decoder": 0.0}, {"encoder": 1.0, "decoder": 0.25}, 0.4])
def test_interpolate_per_part(tmp_path, factors):
    pre = tiny_whisper()
    pre.save_pretrained(tmp_path, safe_serialization=True)
    before = {n: p.detach().clone() for n, p in pre.named_parameters()}
    model = tiny_whisper()
    with torch.no_grad():  # "fine-tuned": every weight moved by a known step
        for p in model.parameters():
            p.add_(torch.full_like(p, 0.5))
    tuned = {n: p.detach().clone() for n, p in model.named_parameters()}

    changed = interpolate_weights(model, tmp_path, factors, part_of)

    f = factors if isinstance(factors, dict) else {"encoder": factors, "decoder": factors}
    expect_changed = 0
    for n, p in model.named_parameters():
        a = f[part_of(n)]
        expect_changed += a != 1.0
        want = before[n] + a * (tuned[n] - before[n])
        torch.testing.assert_close(p.detach(), want, msg=f"{n} with factor {a}")
    assert changed == expect_changed > 0


def test_interpolate_needs_pretrained_safetensors(tmp_path):
    from common.training.trainer import TrainError

    with pytest.raises(TrainError, match="safetensors"):
        interpolate_weights(tiny_whisper(), tmp_path, 0.5, part_of)
