"""Planning a fine-tune: the one translation from finetune settings to the planner, used by the stage and by
the Kubernetes executor when it sizes the training pod, so both choose the same setup.

    the_plan = make_plan(settings, family, config, facts, resources)     # in the stage (resources detected)
    pod, setup = training_pod(env, store, run_id, node)                  # in the executor, before the Job exists

Inputs of a plan, and only these (no weights are loaded to plan: a 10 B model's config is a few KB):

    settings   the finetune settings (built from the same ASRFT_FINETUNE_* environment the pod gets)
    family     recorded by `pretrained` in provenance.json
    config     pretrained/model/config.json
    facts      extract/data_facts.json (usable clips, longest clip and label sequence)
    resources  the machine: detected inside the pod (GPUs, cgroup memory limit, CPUs), given by the executor

``plan_request`` maps the settings onto ``common.training.planner.plan``'s requests and overrides; a setting
whose name differs from the planner's (``batch`` → ``per_device_batch``, ``num_workers`` →
``dataloader_num_workers``) is translated here and nowhere else. Weights load in fp32 when the family asks
(whisper: LoRA merges into exact fp32 base weights for final/); otherwise the planner picks their dtype.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from common.core.stage import StageFailed
from common.families import FamilyError, ModelFamily, Planning
from common.training.planner import Plan

log = logging.getLogger(__name__)

DATA_FACTS = "data_facts.json"  # written by extract
FP32_WEIGHTS = {"load_dtype": "float32", "frozen_dtype": "float32"}  # fp32 masters; LoRA merges into fp32 bases


class PlanRequest(BaseModel):
    """What the user asked of the planner (None: let it decide), under the planner's names."""

    mode: str = "auto"
    per_device_batch: int | None = None
    grad_accum: int | None = None
    epochs: float | None = None
    lr: float | None = None
    warmup_ratio: float | None = None
    scheduler: str | None = None
    weight_decay: float | None = None
    precision: str = "auto"
    save_steps: int | None = None
    save_total_limit: int | None = None
    lora_r: int = 16
    lora_alpha: int | None = None
    lora_targets: list[str] | None = None
    overrides: dict[str, Any] = {}


def plan_request(s: Any, fp32_weights: bool = True) -> PlanRequest:
    """The planner's request from finetune settings (the stage's settings object); ``fp32_weights``: the
    family keeps frozen weights in fp32 (else the planner chooses their dtype)."""
    forced = dict(s.overrides)
    if s.max_steps is not None:
        forced.setdefault("max_steps", s.max_steps)
    if s.num_workers is not None:
        forced.setdefault("dataloader_num_workers", s.num_workers)
    if s.eval_holdout is not None:
        forced.setdefault("eval_holdout", s.eval_holdout)
    if s.lora_parts is not None:
        forced.setdefault("lora", {"parts": list(s.lora_parts)})
    for key, value in FP32_WEIGHTS.items() if fp32_weights else ():
        forced.setdefault(key, value)
    if s.device == "cuda":
        forced.setdefault("device", "cuda")
    # the planner's LoRA estimate knows linears by name: "encoder_attn.q_proj" counts as "q_proj" there
    targets = sorted({t.split(".")[-1] for t in s.lora_targets}) if s.lora_targets else None
    return PlanRequest(
        mode=s.mode, per_device_batch=s.batch, grad_accum=s.grad_accum, epochs=s.epochs, lr=s.lr,
        warmup_ratio=s.warmup_ratio, scheduler=s.scheduler, weight_decay=s.weight_decay, precision=s.precision,
        save_steps=s.save_steps, save_total_limit=s.save_total_limit, lora_r=s.lora_r, lora_alpha=s.lora_alpha,
        lora_targets=targets, overrides=forced,
    )


def make_plan(s: Any, family: ModelFamily, config: Mapping[str, Any], facts: Mapping[str, Any],
              resources: Any, launcher: tuple[int, int] | None = None) -> tuple[Plan, Planning]:
    """(plan, the family's planning) for these settings, model, data and machine(s); StageFailed (exit 2) when
    nothing can be planned, with the planner's reason. ``launcher``: (nodes, processes per node) when an
    outside launcher started the ranks."""
    from common.training.planner import PlanError, plan

    if s.device == "cuda" and resources.gpus == 0:
        raise StageFailed("--device cuda but no CUDA GPU is visible; use --device auto or cpu", exit_code=2)
    if not facts.get("clips"):
        raise StageFailed("no usable training clip (extract/data_facts.json lists the rejected ones); check "
                          "extract/train.jsonl", exit_code=2)
    from jobs.finetune.guard import choice_holdout_size

    aside, aside_reason = choice_holdout_size(s, int(facts["clips"]))
    facts = {**facts, "clips": int(facts["clips"]) - aside}  # what training iterates over
    try:
        planning = family.planning(config, facts, s.model_dump())
        request = plan_request(s, planning.fp32_weights)
        the_plan = plan(planning.profile, n_train=planning.n_samples, resources=resources, launcher=launcher,
                        **request.model_dump())
    except (PlanError, FamilyError) as e:
        raise StageFailed(f"cannot plan the training: {e}", exit_code=2) from None
    for name, value, reason in planning.decisions:
        the_plan.record(name, value, reason)
    the_plan.record("choice_holdout", aside, aside_reason)
    return the_plan, planning


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise StageFailed(f"{path}: cannot read {what} ({e}); re-run the stage that writes it") from None


# --- the training pod, sized where the Job is made ------------------------------------------------------


def training_pod(settings: Any, family: ModelFamily, config: Mapping[str, Any], facts: Mapping[str, Any],
                 node: Any) -> tuple[Any, dict[str, Any]]:
    """(PodResources, the chosen setup) of the plan the pod will make: the same ``make_plan`` on the node the
    executor describes. ``node``: common.training.planner.Resources of one training node."""
    from common.training import planner

    planner_log = logging.getLogger(planner.__name__)
    level = planner_log.level
    planner_log.setLevel(logging.WARNING)  # its full table is for plan.json; the executor logs one line
    try:
        the_plan, planning = make_plan(settings, family, config, facts, node)
    finally:
        planner_log.setLevel(level)
    return the_plan.pod, setup_of(the_plan) | {"model": planning.profile.name}


def setup_of(the_plan: Plan) -> dict[str, Any]:
    """The choices that make a training setup (compared between the executor's plan and the pod's)."""
    return {"mode": the_plan.mode, "strategy": the_plan.strategy, "world_size": the_plan.world_size,
            "nodes": the_plan.nodes, "procs_per_node": the_plan.procs_per_node,
            "per_device_batch": the_plan.per_device_batch, "grad_accum": the_plan.grad_accum,
            "gradient_checkpointing": the_plan.gradient_checkpointing, "precision": the_plan.precision,
            "lora": the_plan.value("lora"), "deepspeed": bool(the_plan.deepspeed_config)}


def pod_from_store(env: Mapping[str, str], store: Any, run_id: str, node: Mapping[str, Any],
                   family: str | None = None) -> tuple[Any, dict[str, Any], str]:
    """(PodResources or None, setup, where the inputs came from) for the Kubernetes executor: the pod's
    settings from the environment the pod will get (``env``), the model and data facts from the run's
    ``pretrained`` and ``extract`` outputs in the store. Before they exist (a dry run ahead of the run), a
    family that publishes the shape of the model it is for (``assumed_planning``: the pipeline names the
    ``family``) is planned from that shape and its worst-case data; else None: the executor gives the Job its
    default resources and says so."""
    import os

    from common.core.settings import SettingsError, load_settings
    from common.families import DEFAULT_FAMILY, PROVENANCE, get_family
    from jobs.finetune import FinetuneSettings

    def read(step: str, rel: str) -> dict[str, Any] | None:
        key = store.join(run_id, step, rel) if store is not None else None
        try:
            return store.read_json(key) if key is not None and store.exists(key) else None
        except (OSError, ValueError) as e:
            log.warning("cannot read %s (%s); sizing the pod without it", store.uri_for(key), e)
            return None

    provenance, config = read("pretrained", PROVENANCE), read("pretrained", "model/config.json")
    facts = read("extract", DATA_FACTS)
    note = "from extract/data_facts.json"
    if provenance is None or config is None or facts is None:
        missing = [n for n, v in (("pretrained/provenance.json", provenance), ("pretrained/model/config.json",
                                  config), ("extract/data_facts.json", facts)) if v is None]
        assumed = getattr(get_family(family), "assumed_planning", None) if family else None
        if assumed is None:
            return None, {}, (f"not planned: {', '.join(missing)} not in the store yet (run pretrained and extract "
                              "first)")
        config, facts, note = assumed()
        provenance = {"family": family}
        note = f"assumed: {note} ({', '.join(missing)} not in the store yet)"
    saved = {k: v for k, v in os.environ.items() if k.startswith("ASRFT_")}
    try:  # exactly the pod's environment: none of this process's own ASRFT_* variables
        for k in saved:
            del os.environ[k]
        os.environ.update({k: v for k, v in env.items() if k.startswith("ASRFT_")})
        settings = load_settings(FinetuneSettings)
    except SettingsError as e:
        raise StageFailed(f"the finetune settings of this pipeline are invalid:\n{e}", exit_code=2) from None
    finally:
        for k in [k for k in os.environ if k.startswith("ASRFT_")]:
            del os.environ[k]
        os.environ.update(saved)
    from common.training.planner import detect_resources

    machine = detect_resources(**node)  # every value given: nothing is detected on this (the executor's) machine
    pod, setup = training_pod(settings, get_family(provenance.get("family") or DEFAULT_FAMILY), config, facts,
                              machine)
    return pod, setup, f"plan for {setup['model']} ({provenance.get('family')}, {facts['clips']} training clips {note})"
