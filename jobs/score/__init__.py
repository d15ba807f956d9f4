"""The score stage: existing prediction files → metrics.json, report.md, report.html (no model is run).

    asr-ft score --predictions F.jsonl [--predictions G.jsonl ...]

Prediction lines are ``{"id", "reference", "hypothesis", "model", "set"}`` with optional ``"duration"`` and
``"decode_seconds"`` (seconds; they give the real-time factor). ``asr-ft evaluate``'s predictions.jsonl is such
a file, so a run can be re-scored, or predictions of an outside system compared with it. A malformed line
stops the stage with every problem listed (file and line). The first model seen is the report's baseline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from common.core.settings import StageSettings
from common.core.stage import StageContext, StageFailed
from common.core.store import sha256_file
from common.core.text import TEXT_NORM_EXAMPLES, TEXT_NORM_HELP, TextNormSpec

log = logging.getLogger(__name__)

STAGE = "score"


class ScoreSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_SCORE_")

    predictions: list[str] = Field(
        ..., min_length=1,
        description='predictions JSONL: lines {"id","reference","hypothesis","model","set"} (+ duration, decode_seconds)',
        examples=["runs/demo/evaluate/predictions.jsonl", "other-system.jsonl"],
    )
    title: str = Field("ASR scoring · 语音识别打分", description="report title")
    text_norm: TextNormSpec = Field("default", description=TEXT_NORM_HELP, examples=TEXT_NORM_EXAMPLES)

    @field_validator("predictions", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


def score_inputs(settings: ScoreSettings) -> dict[str, Any]:
    inputs = {}
    for i, name in enumerate(settings.predictions):
        path = Path(name).expanduser()
        if not path.is_file():
            raise StageFailed(f"--predictions {name}: file not found; pass a predictions JSONL (e.g. "
                              f"runs/<run-id>/evaluate/predictions.jsonl)", exit_code=2)
        inputs[f"{i}:{name}"] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return inputs


def score(ctx: StageContext) -> dict[str, Any]:
    from common.core.metrics import PredictionsError, load_predictions, metrics_by_model_set, with_errors
    from common.core.report import write_report

    settings: ScoreSettings = ctx.settings
    try:
        rows = load_predictions(settings.predictions)
    except PredictionsError as e:
        raise StageFailed(str(e), exit_code=2) from None
    if not rows:
        raise StageFailed(f"no prediction lines in {', '.join(settings.predictions)}", exit_code=2)
    from common.core.text import TextPolicy

    policy = TextPolicy.parse(settings.text_norm)
    scored = [dict(with_errors(r, policy)) for r in rows]
    metrics = metrics_by_model_set(scored)
    write_report(ctx.out, metrics, scored, settings.title,
                 {"Sources · 来源": ", ".join(settings.predictions), **text_norm_extra(policy)})
    summary = {m: {s: {"cer": v["cer"], "n": v["n"]} for s, v in sets.items()} for m, sets in metrics.items()}
    for model, sets in summary.items():
        for set_name, v in sets.items():
            log.info("score: %-12s %-14s CER %s on %d utterances", model, set_name,
                     "—" if v["cer"] is None else f"{100 * v['cer']:.1f}%", v["n"])
    return {"metrics": summary, "rows": len(rows)}


def text_norm_extra(policy) -> dict[str, str]:
    """The report section naming the text normalization both sides were scored with."""
    return {"Text normalization · 文本规范化": f"text_norm = {policy.spec()}: {policy.describe()}. Training targets "
                                             "(extract) use the same steps, numbers excepted."}
