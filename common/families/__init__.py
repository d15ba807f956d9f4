"""Model families: what the stages ask of a model, behind one small protocol.

    family = get_family("whisper")                 # by the name `pretrained` recorded in provenance.json
    family = family_of_run(ctx)                    # the same, read from this run's pretrained stage

A family is any object with the attributes and functions of :class:`ModelFamily` (a module, or an instance of
a small class): no base class to inherit, stages only call. ``common/families/<name>/`` holds everything one
family knows (conventions, formats, data, trainee, engines); the stages in ``jobs/`` never ask "which family?".

Which family a stage uses: ``pretrained`` takes ``--family`` (default ``whisper``; a ``bundled:`` model names
its own) and writes it to ``pretrained/provenance.json``; every later stage reads it from there. Stages run
outside a pipeline (``asr-ft evaluate --model …``, ``asr-ft export --checkpoint …``) take ``--family``.

Where families come from (first match wins):

    built in            whisper (common/families/whisper), kimi-audio (common/families/kimi_audio)
    ASRFT_FAMILIES      "name=module:attribute[,name=module:attribute]": development and tests
    entry points        group "asr_ft.families" of installed packages: a family shipped as its own package

What a stage calls (see :class:`ModelFamily` for the signatures):

| stage      | calls                                                                                      |
|------------|--------------------------------------------------------------------------------------------|
| pretrained | ``bundled`` (its ``bundled:`` models), ``materialize`` (source folder → model folder, facts) |
| extract    | ``front_end`` (features to cache, or None), ``data_facts`` (what planning needs of the data)  |
| finetune   | ``planning`` (planner profile + samples from config.json and the data facts: no weights),     |
|            | ``training_data``, ``trainee``, ``datasets``, ``save_final``                                |
| export     | ``export`` (trained folder → inference folders, verified offline)                           |
| evaluate   | ``open_engine`` (a model folder → an :class:`~common.core.transcribe.Engine`)               |

Optional: ``candidates(trainee, model_dir, settings)`` → list of :class:`Candidate`, the models finetune's
forgetting guard scores after training (trained furthest first; whisper: WiSE-FT merges per part). A family
without it offers its final model alone.

Optional: ``assumed_planning()`` → (config, data facts, note): the shape of the model a family is for, so the
Kubernetes executor can size the training pod of a pipeline that names the family before the run has any
output (kimi-audio: Kimi-Audio-7B).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the registry itself imports nothing heavy (the image's model-bundle step imports it alone)
    from common.training.planner import Plan

log = logging.getLogger(__name__)

BUILT_IN = {  # name → module implementing the protocol
    "whisper": "common.families.whisper.family",
    "kimi-audio": "common.families.kimi_audio.family",
}
ENV_FAMILIES = "ASRFT_FAMILIES"
ENTRY_POINT_GROUP = "asr_ft.families"
DEFAULT_FAMILY = "whisper"
PROVENANCE = "provenance.json"  # written by `pretrained` beside model/: {"family": …, "ref": …, …}


class FamilyError(ValueError):
    """No such family, or a model that its family cannot use; the message says what to do."""


# --- what a family hands back to the stages ------------------------------------------------------------


@dataclass
class FrontEnd:
    """Features ``extract`` computes once per clip and caches (e.g. Whisper's log-mel).

    ``params`` identify the features (the stage's input fingerprint); ``write`` computes a split's features
    into ``out_dir`` and returns the records with their cache reference added; ``bytes_per_clip`` sizes the
    cache for the ``--cache auto`` decision; clips longer than ``max_seconds`` cannot be used by the model."""

    params: dict[str, Any]
    bytes_per_clip: int
    max_seconds: float
    write: Callable[[list[dict], Path, Path, str, int], list[dict]]  # (records, run_dir, out_dir, split, shard_rows)
    write_meta: Callable[[Path, dict[str, Any]], None]  # (out_dir, extra): what finetune checks the cache against


@dataclass
class Planning:
    """What the planner needs of the model and the data (from config.json and the data facts; no weights)."""

    profile: Any  # common.training.memory.ModelProfile with this data's sequence lengths
    n_samples: int  # what one epoch iterates over (clips, or packed windows)
    # Load and keep frozen weights in fp32 (whisper: final/ merges LoRA into exact fp32 base weights); False:
    # the planner's own choice (a bf16 frozen base for LoRA on a GPU: half the memory).
    fp32_weights: bool = True
    decisions: list[tuple[str, Any, str]] = field(default_factory=list)  # (name, value, reason) for the log


@dataclass
class Built:
    """The datasets a training loop iterates and what the family decided while making them."""

    train: Any
    eval: Any | None
    collator: Callable[[list], dict]
    decisions: list[tuple[str, Any, str]] = field(default_factory=list)
    regroup_each_epoch: bool = False  # the train dataset's set_epoch(n) must be called every epoch
    group_by_length: bool = False  # batch items of similar length (each item's "input_ids" gives its length)
    fast_path_blocker: str | None = None  # why the fast loop cannot train these datasets, if it cannot


@dataclass
class Candidate:
    """A model the forgetting guard may keep (``candidates``): ``write(dest)`` saves a model folder that
    ``open_engine`` loads and ``export`` takes, and returns what to record about it."""

    name: str
    description: str
    write: Callable[[Path], dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineRequest:
    """How ``evaluate`` wants models decoded: the same for every model of one run."""

    backend: str = "auto"  # the family's engine kind ("auto": the family's default for the device)
    device: str = "cpu"
    compute_type: str = "float32"
    threads: int = 0
    beam_size: int = 1
    max_new_tokens: int | None = None  # None: the family's default


class ModelFamily(Protocol):
    """The functions a family provides (stages call nothing else of it)."""

    name: str
    bundled: Mapping[str, Callable[[], tuple[Path, dict[str, Any]]]]  # bundled:<name> → (folder, facts)

    def bundled_fingerprint(self, name: str) -> dict[str, Any]: ...

    def materialize(self, source: Path, facts: dict[str, Any], dest: Path, settings: Mapping[str, Any]
                    ) -> dict[str, Any]: ...

    def front_end(self, model_dir: Path) -> FrontEnd | None: ...

    def data_facts(self, model_dir: Path, records: Sequence[dict]) -> dict[str, Any]: ...

    def planning(self, config: Mapping[str, Any], facts: Mapping[str, Any], settings: Mapping[str, Any]) -> Planning: ...

    def training_data(self, model_dir: Path, records: Sequence[dict]) -> tuple[list, list[dict]]: ...

    def trainee(self, model_dir: Path, plan: Plan, settings: Mapping[str, Any]) -> Any: ...

    def datasets(self, model_dir: Path, trainee: Any, examples: tuple[list, list], records: Mapping[str, dict],
                 dirs: Mapping[str, Path | None], plan: Plan, settings: Mapping[str, Any]) -> Built: ...

    def save_final(self, trainee: Any, out_dir: Path, model_dir: Path, settings: Mapping[str, Any]) -> dict[str, Any]: ...

    def export(self, source: Path, out_dir: Path, donor: Path | None, settings: Mapping[str, Any],
               clip: Any) -> dict[str, Any]: ...

    def open_engine(self, folder: Path, request: EngineRequest) -> Any: ...


# --- the registry ---------------------------------------------------------------------------------------

_loaded: dict[str, Any] = {}


def _import(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


def _env_targets() -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in os.environ.get(ENV_FAMILIES, "").split(","))):
        name, sep, target = item.partition("=")
        if not sep or not target:
            raise FamilyError(f"{ENV_FAMILIES}: {item!r} is not name=module:attribute")
        out[name.strip()] = target.strip()
    return out


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def family_names() -> list[str]:
    """Every family this process can load (built in, ASRFT_FAMILIES, entry points)."""
    return sorted({*BUILT_IN, *_env_targets(), *_entry_points()})


def get_family(name: str) -> ModelFamily:
    """The family called ``name``; FamilyError listing the known ones otherwise."""
    if name in _loaded:
        return _loaded[name]
    targets = {**_entry_points(), **_env_targets(), **BUILT_IN}
    if name not in targets:
        raise FamilyError(f"unknown model family {name!r}; known: {', '.join(family_names())}")
    target = targets[name]
    family = target.load() if hasattr(target, "load") else _import(target)
    if getattr(family, "name", None) != name:
        raise FamilyError(f"{target} does not implement the model family {name!r} (its name is "
                          f"{getattr(family, 'name', None)!r})")
    _loaded[name] = family
    return family


def bundled_family(model: str) -> str | None:
    """The family that ships ``bundled:<model>``, else None."""
    for name in family_names():
        if model in get_family(name).bundled:
            return name
    return None


def read_provenance(pretrained_dir: Path) -> dict[str, Any]:
    path = Path(pretrained_dir) / PROVENANCE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise FamilyError(f"{path}: cannot read the pretrained stage's provenance ({e}); re-run "
                          "`asr-ft pretrained`") from None


def family_of_pretrained(pretrained_dir: Path) -> ModelFamily:
    """The family recorded by ``pretrained`` in ``<pretrained_dir>/provenance.json``."""
    return get_family(read_provenance(pretrained_dir).get("family") or DEFAULT_FAMILY)
