"""The extract stage: prepare's records → the same records with what the model needs of each clip, computed once.

    inputs = extract_inputs(settings, store)    # fingerprints: prepare's and pretrained's manifests + the features
    summary = extract(ctx)                      # write train.jsonl, test.jsonl, data_facts.json (+ features/)

Runs after ``pretrained``: the model's family decides the features (whisper: log-mel with the model's own
feature extractor, so a 128-mel large-v3 gets 128-mel features) and how long a clip may be.

Outputs in ``<artifacts>/<run-id>/extract/``:

- ``train.jsonl``, ``test.jsonl`` — prepare's records, unchanged except for the family's cache reference on
  cached clips (whisper: ``"features": {"shard", "row"}``); ``skipped.jsonl`` lists clips longer than the
  model takes in one window.
- ``data_facts.json`` — what planning needs of the training data (usable clips, longest clip, longest label
  sequence; rejected transcripts with the reason): finetune plans from it, and so does the Kubernetes
  executor when it sizes the training pod, so both choose the same setup.
- the family's cache (whisper: ``features/<split>-NNNNN.npy``, float16 log-mel, and ``features.json``, the
  feature extractor's parameters, which finetune checks against its model's).

Which model: ``--model-dir`` (with ``--family``) if given, else the run's ``pretrained/model/`` and the family
its provenance.json records.

When caching pays (``--cache auto``): computing a clip's features costs ~20-80 ms of CPU, reading it back
<1 ms, so the cache is written when each clip will be read ``--epochs`` ≥ 2 times and fits
``--max-cache-gb``. The test split is cached only with ``--cache always`` (it is decoded once).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.core.records import read_jsonl, transcript, write_jsonl
from common.core.settings import StageSettings
from common.core.stage import StageContext, StageFailed, upstream_fingerprint
from common.core.store import Store, atomic_write_bytes
from common.core.text import TEXT_NORM_EXAMPLES, TEXT_NORM_HELP, TextNormSpec, TextPolicy, training_target
from common.families import DEFAULT_FAMILY, FamilyError, ModelFamily, family_of_pretrained, get_family

log = logging.getLogger(__name__)

STAGE = "extract"
SPLITS = ("train", "test")
DATA_FACTS = "data_facts.json"


class ExtractSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_EXTRACT_")

    cache: Literal["auto", "always", "never"] = Field(
        "auto", description="write the feature cache: auto = when each clip is read >= 2 times and it fits",
        examples=["auto", "never"],
    )
    epochs: float = Field(
        3, gt=0, description="how many times finetune will read each clip (its epochs); decides cache=auto",
        examples=[3],
    )
    max_cache_gb: float = Field(20.0, gt=0, description="largest cache cache=auto writes, GB", examples=[20])
    model_dir: Path | None = Field(
        None, description="model folder to compute features for [default: the run's pretrained/model/]",
        examples=["models/whisper-small"],
    )
    family: str = Field(DEFAULT_FAMILY, description="model family of --model-dir (the run's pretrained stage "
                        "records its own)", examples=["whisper"])
    shard_rows: int = Field(256, ge=1, description="clips per cache shard file", examples=[256])
    text_norm: TextNormSpec = Field("default", description=TEXT_NORM_HELP, examples=TEXT_NORM_EXAMPLES)


def normalized_targets(records: list[dict], policy: TextPolicy) -> list[dict]:
    """Records whose transcript is the training target of ``policy`` (common.core.text.training_target, the
    steps scoring applies); the transcript as written stays in ``raw_text`` when it differs."""
    out = []
    for rec in records:
        raw = transcript(rec)
        target = training_target(raw, policy)
        if target == raw:
            out.append(rec)
            continue
        conversation = [dict(m) for m in rec["conversation"]]
        for msg in reversed(conversation):
            if msg["role"] == "assistant" and msg["message_type"] == "text":
                msg["content"] = target
                break
        out.append({**rec, "conversation": conversation, "raw_text": raw})
    return out


def model_source(settings: ExtractSettings, ctx: StageContext) -> tuple[Path, ModelFamily, str]:
    """(model folder, its family, where they came from)."""
    try:
        if settings.model_dir is not None:
            if not settings.model_dir.is_dir():
                raise StageFailed(f"--model-dir {settings.model_dir}: no such folder", exit_code=2)
            return settings.model_dir, get_family(settings.family), f"model folder {settings.model_dir}"
        pretrained = ctx.input_dir("pretrained")
        return pretrained / "model", family_of_pretrained(pretrained), "the run's pretrained model"
    except FamilyError as e:
        raise StageFailed(str(e), exit_code=2) from None


def extract_inputs(settings: ExtractSettings, store: Store) -> dict[str, Any]:
    inputs: dict[str, Any] = {"prepare": upstream_fingerprint(store, settings.run_id, "prepare")}
    if settings.model_dir is None:
        inputs["pretrained"] = upstream_fingerprint(store, settings.run_id, "pretrained")
    else:
        inputs["model_dir"] = {"path": str(settings.model_dir), "family": settings.family}
    return inputs


def decide_cache(policy: str, n_clips: int, bytes_per_clip: int, reuse: int, max_gb: float) -> tuple[bool, str]:
    """Whether caching features pays: (decision, reason to log and record).

    Computing one clip's features costs ~20-80 ms of CPU; reading a cached row costs <1 ms. The cache is
    worth its disk when every clip is read ``reuse`` >= 2 times (epochs) and it fits ``max_gb``.
    """
    size_gb = n_clips * bytes_per_clip / 1e9
    if policy == "always":
        return True, f"cache=always ({size_gb:.2f} GB)"
    if policy == "never":
        return False, "cache=never: finetune computes features from the audio"
    if reuse < 2:
        return False, f"auto: each clip is read {reuse}x (epochs), so caching saves no computation"
    if size_gb > max_gb:
        return False, f"auto: the cache would take {size_gb:.1f} GB > max_cache_gb {max_gb:g}; computing on the fly"
    return True, f"auto: each clip is read {reuse}x (epochs); cache of {size_gb:.2f} GB ≤ max_cache_gb {max_gb:g}"


def split_too_long(records: list[dict], max_seconds: float) -> tuple[list[dict], list[dict]]:
    keep, skipped = [], []
    for rec in records:
        if float(rec.get("duration") or 0) > max_seconds:
            skipped.append({"id": rec["id"], "reason": "too_long",
                            "message": f"{rec['duration']} s > the model's {max_seconds:g}-s window; cut the clip"})
        else:
            keep.append(rec)
    return keep, skipped


def extract(ctx: StageContext) -> dict[str, Any]:
    settings: ExtractSettings = ctx.settings  # type: ignore[assignment]
    prep = ctx.input_dir("prepare")
    run_dir = prep.parent  # records' audio_path is relative to the run folder
    model_dir, family, source = model_source(settings, ctx)
    front = family.front_end(model_dir)
    max_seconds = front.max_seconds if front else float("inf")
    log.info("model family %s, %s; features: %s", family.name, source, front.params if front else "none")

    policy = TextPolicy.parse(settings.text_norm)
    splits: dict[str, list[dict]] = {}
    skipped: list[dict] = []
    for split in SPLITS:
        path = prep / f"{split}.jsonl"
        if not path.is_file():
            if split == "train":
                raise StageFailed(f"{path} missing: the prepare stage wrote no training records; re-run prepare")
            continue
        kept, dropped = split_too_long(read_jsonl(path), max_seconds)
        splits[split] = normalized_targets(kept, policy) if split == "train" else kept
        skipped += [{**s, "split": split} for s in dropped]
    if not splits["train"]:
        raise StageFailed("no training clip fits the model's window; see extract/skipped.jsonl", exit_code=2)

    summary: dict[str, Any] = {"family": family.name, "feature_source": source, "skipped": len(skipped),
                               "text_norm": policy.spec()}
    for split, records in splits.items():
        t0 = time.perf_counter()
        use, reason = False, "the model family computes no features ahead"
        if front is not None:
            policy = settings.cache if split == "train" else ("always" if settings.cache == "always" else "never")
            reuse = int(settings.epochs) if split == "train" else 1
            use, reason = decide_cache(policy, len(records), front.bytes_per_clip, reuse, settings.max_cache_gb)
            if use:
                records = front.write(records, run_dir, ctx.out, split, settings.shard_rows)
        log.info("%s: %d clips; feature cache %s — %s", split, len(records), "ON" if use else "off", reason)
        write_jsonl(ctx.out / f"{split}.jsonl", records)
        summary[split] = {"clips": len(records), "cached": use, "reason": reason,
                          "seconds": round(time.perf_counter() - t0, 2)}
    write_jsonl(ctx.out / "skipped.jsonl", skipped)
    if front is not None:
        front.write_meta(ctx.out, {"source": source, "splits": {k: summary[k] for k in splits}})
    facts = family.data_facts(model_dir, splits["train"])
    atomic_write_bytes(ctx.out / DATA_FACTS, (json.dumps(facts, indent=2, ensure_ascii=False) + "\n").encode())
    summary["data_facts"] = {k: v for k, v in facts.items() if k != "rejected"}
    for s in skipped:
        log.warning("skipped %s (%s): %s", s["id"], s["split"], s["message"])
    return summary
