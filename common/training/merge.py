"""WiSE-FT (weight-space ensembling): pull fine-tuned weights part of the way back to the pretrained ones.

    factors = merge_factors(1.0, encoder=0.8, decoder=0.5)
    interpolate_weights(model, pretrained_dir, factors, part_of=family_part_of)

θ = θ_pre + α·(θ_ft − θ_pre) per weight, with α chosen per part of the model (a family says which part a
weight belongs to): α = 1 keeps what training learned, 0 the pretrained model. Lower α keeps more of the
pretrained model's general skill; measured per part, the share each part can keep differs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common.training.trainer import TrainError


def merge_factors(alpha: float, **parts: float | None) -> dict[str, float]:
    """Per-part WiSE-FT factors: each part's own value when given, else ``alpha``
    (``merge_factors(1.0, encoder=0.8, decoder=None)`` → {"encoder": 0.8, "decoder": 1.0})."""
    return {part: alpha if value is None else value for part, value in parts.items()}


def interpolate_weights(model, pretrained_dir: Path, alpha: float | Mapping[str, float],
                        part_of: Callable[[str], str]) -> int:
    """WiSE-FT: θ ← θ_pre + α·(θ_ft − θ_pre), in place; α per part (``part_of(name)`` names a weight's part,
    e.g. {"encoder": a, "decoder": b}) or one for all. α=1 keeps the fine-tuned weights, 0 the pretrained.
    Returns how many tensors were interpolated."""
    import torch
    from safetensors.torch import load_file

    factors = alpha if isinstance(alpha, Mapping) else defaultdict(lambda: float(alpha))
    files = sorted(Path(pretrained_dir).glob("*.safetensors"))
    if not files:
        raise TrainError(f"merge factors {dict(factors)} need the pretrained weights as safetensors in "
                         f"{pretrained_dir}")
    pre: dict[str, Any] = {}
    for f in files:
        pre.update(load_file(str(f)))
    done = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            a = factors[part_of(name)]
            if name in pre and a != 1.0:
                ref = pre[name].to(p.dtype)
                p.copy_(ref + a * (p - ref))
                done += 1
    return done

