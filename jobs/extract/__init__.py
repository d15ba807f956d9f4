"""The extract stage: prepare's records → the same records, plus cached Whisper log-mel features when it pays.

    inputs = extract_inputs(settings, store)    # fingerprints: prepare's manifest (+ the feature extractor's)
    summary = extract(ctx)                      # write train.jsonl, test.jsonl (+ features/, features.json)

Outputs in ``<artifacts>/<run-id>/extract/``:

- ``train.jsonl``, ``test.jsonl`` — prepare's records, unchanged except for ``"features": {"shard", "row"}``
  on cached clips; ``skipped.jsonl`` lists clips that cannot train Whisper (longer than its 30-s window).
- ``features/<split>-NNNNN.npy`` — float16 log-mel, (rows, n_mels, 3000) per shard; ``features.json`` — the
  feature extractor's parameters (finetune uses the cache only if they match its model's) and why the cache
  was (not) written.

Which feature extractor: the one of ``--model-dir`` if given, else the run's ``pretrained/model/`` when that
stage has completed, else Whisper's standard one with ``--n-mels`` bins (80; 128 for large-v3).

When caching pays (``--cache auto``): computing a clip's log-mel costs ~20-80 ms of CPU, reading it back
<1 ms, so the cache is written when each clip will be read ``--epochs`` ≥ 2 times and fits
``--max-cache-gb``. The test split is cached only with ``--cache always`` (it is decoded once).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.core.records import read_jsonl, write_jsonl
from common.core.settings import StageSettings
from common.core.stage import MANIFEST, StageContext, StageFailed, upstream_fingerprint
from common.core.store import Store
from common.families.whisper.data import (
    CHUNK_SECONDS,
    decide_cache,
    feature_extractor_for,
    feature_params,
    write_feature_cache,
    write_features_meta,
)

log = logging.getLogger(__name__)

STAGE = "extract"
SPLITS = ("train", "test")


class ExtractSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_EXTRACT_")

    cache: Literal["auto", "always", "never"] = Field(
        "auto", description="write the log-mel cache: auto = when each clip is read >= 2 times and it fits",
        examples=["auto", "never"],
    )
    epochs: float = Field(
        3, gt=0, description="how many times finetune will read each clip (its epochs); decides cache=auto",
        examples=[3],
    )
    max_cache_gb: float = Field(20.0, gt=0, description="largest cache cache=auto writes, GB", examples=[20])
    model_dir: Path | None = Field(
        None, description="folder with the model's preprocessor_config.json [default: the run's pretrained/model/]",
        examples=["models/whisper-small"],
    )
    n_mels: int = Field(
        80, description="mel bins when no model folder is known (80; 128 for whisper-large-v3)", examples=[80, 128]
    )
    shard_rows: int = Field(256, ge=1, description="clips per cache shard file", examples=[256])


def pretrained_model_dir(store: Store, run_id: str) -> Path | None:
    """The run's pretrained/model/ folder when that stage has completed and is local, else None."""
    local = store.local_path(store.join(run_id, "pretrained"))
    if local is not None and (local / MANIFEST).is_file() and (local / "model").is_dir():
        return local / "model"
    return None


def feature_source(settings: ExtractSettings, store: Store) -> tuple[Path | None, str]:
    if settings.model_dir is not None:
        if not (settings.model_dir / "preprocessor_config.json").is_file():
            raise StageFailed(
                f"--model-dir {settings.model_dir} has no preprocessor_config.json; point it at a Hugging Face "
                "Whisper folder or leave it unset", exit_code=2,
            )
        return settings.model_dir, f"model folder {settings.model_dir}"
    pre = pretrained_model_dir(store, settings.run_id)
    if pre is not None and (pre / "preprocessor_config.json").is_file():
        return pre, "the run's pretrained model"
    return None, f"Whisper's standard feature extractor with {settings.n_mels} mel bins (no model folder yet)"


def extract_inputs(settings: ExtractSettings, store: Store) -> dict[str, Any]:
    inputs: dict[str, Any] = {"prepare": upstream_fingerprint(store, settings.run_id, "prepare")}
    model_dir, _ = feature_source(settings, store)
    fe = feature_extractor_for(model_dir, settings.n_mels)
    # The parameters, not where they came from: a re-run after `pretrained` completed must still skip.
    inputs["feature_extractor"] = feature_params(fe)
    return inputs


def split_too_long(records: list[dict]) -> tuple[list[dict], list[dict]]:
    keep, skipped = [], []
    for rec in records:
        if float(rec.get("duration") or 0) > CHUNK_SECONDS:
            skipped.append({"id": rec["id"], "reason": "too_long",
                            "message": f"{rec['duration']} s > Whisper's {CHUNK_SECONDS}-s window; cut the clip"})
        else:
            keep.append(rec)
    return keep, skipped


def extract(ctx: StageContext) -> dict[str, Any]:
    settings: ExtractSettings = ctx.settings  # type: ignore[assignment]
    prep = ctx.input_dir("prepare")
    run_dir = prep.parent  # records' audio_path is relative to the run folder
    model_dir, source = feature_source(settings, ctx.store)
    fe = feature_extractor_for(model_dir, settings.n_mels)
    log.info("feature extractor: %s (%s)", source, feature_params(fe))

    splits: dict[str, list[dict]] = {}
    skipped: list[dict] = []
    for split in SPLITS:
        path = prep / f"{split}.jsonl"
        if not path.is_file():
            if split == "train":
                raise StageFailed(f"{path} missing: the prepare stage wrote no training records; re-run prepare")
            continue
        kept, dropped = split_too_long(read_jsonl(path))
        splits[split] = kept
        skipped += [{**s, "split": split} for s in dropped]
    if not splits["train"]:
        raise StageFailed("no training clip fits Whisper's 30-s window; see extract/skipped.jsonl", exit_code=2)

    summary: dict[str, Any] = {"feature_source": source, "skipped": len(skipped)}
    for split, records in splits.items():
        policy = settings.cache if split == "train" else ("always" if settings.cache == "always" else "never")
        reuse = int(settings.epochs) if split == "train" else 1
        use, reason = decide_cache(policy, len(records), fe.feature_size, reuse, settings.max_cache_gb)
        log.info("%s: %d clips; log-mel cache %s — %s", split, len(records), "ON" if use else "off", reason)
        t0 = time.perf_counter()
        if use:
            records = write_feature_cache(records, run_dir, fe, ctx.out, split, settings.shard_rows)
        write_jsonl(ctx.out / f"{split}.jsonl", records)
        summary[split] = {"clips": len(records), "cached": use, "reason": reason,
                          "seconds": round(time.perf_counter() - t0, 2)}
    write_jsonl(ctx.out / "skipped.jsonl", skipped)
    write_features_meta(ctx.out, fe, {"source": source, "splits": {k: summary[k] for k in splits}})
    for s in skipped:
        log.warning("skipped %s (%s): %s", s["id"], s["split"], s["message"])
    return summary
