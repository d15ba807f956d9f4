"""A model family for the serving tests, named through ASRFT_FAMILIES=label=label_family: its engine "hears"
which test clip it is given by the clip's peak level (clip i peaks at 0.2 + 0.05·i), so a server that mixed
up the segments of concurrent requests would answer with another clip's text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

name = "label"
bundled: dict[str, Any] = {}
PEAK0, PEAK_STEP = 0.2, 0.05


def label(audio: np.ndarray) -> str:
    return f"clip{round((float(np.abs(audio).max()) - PEAK0) / PEAK_STEP)}"


class LabelEngine:
    info = {"backend": "label", "decoding": {"language": "zh"}}

    def transcribe(self, audios):
        return [label(a) for a in audios]


def open_engine(folder: Path, request: Any) -> tuple[LabelEngine, dict[str, Any]]:
    return LabelEngine(), {"folder": str(folder), "backend": "label"}
