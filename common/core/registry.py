"""The stage registry: every ``asr-ft`` command, in pipeline order, with what each executor needs to run it.

    from common.core.registry import STAGES, gpu_steps, pipeline_steps, stage

    pipeline_steps()          # ('demo-data', 'prepare', 'pretrained', 'extract', 'finetune', 'export', 'evaluate')
    stage("finetune").module  # 'jobs.finetune': `python -m jobs.finetune` = `asr-ft finetune`
    gpu_steps()               # ('finetune',)

Reads nothing: it is a table, and the one list of stages. The CLI (jobs/cli.py) lists and dispatches its
commands from it, a pipeline file's sections are its names (common/core/settings.py), and every executor
(common/executors/: local subprocesses, compose services, Kubernetes Jobs) takes the order of the steps, the
module each one runs, which one needs a GPU and the default resources of each Job from it.

Decides the pipeline order: ``demo-data`` (optional: only when the pipeline file has that section) →
``prepare`` → ``pretrained`` → ``extract`` → ``finetune`` → ``export`` → ``evaluate``. ``pretrained`` runs
before ``extract`` so that the features are computed with the model's own front-end settings. ``score``,
``run``, ``transcribe`` and ``serve`` are commands, not pipeline steps.

Writes nothing. Each stage writes ``<artifacts>/<run-id>/<name>/`` (``demo-data`` writes its own folder).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One ``asr-ft`` command. ``name`` is the sub-command, the pipeline file's section, the store folder and
    the ``ASRFT_<NAME>_`` prefix of its settings (``-`` → ``_``)."""

    name: str
    module: str  # the package whose __main__.py has main(argv): `python -m <module>`
    help: str  # one line of `asr-ft --help`
    pipeline: bool = True  # a step of `asr-ft run`; False for commands run on their own
    optional: bool = False  # a pipeline step that runs only when the pipeline file has its section
    gpu: bool = False  # CUDA image, a GPU reservation, and (Kubernetes) the fine-tune plan's resources
    # The Kubernetes Job's CPU request (no CPU limit: throttling slows a batch step without protecting anyone)
    # and memory request (= limit). Sized for whisper-base and a few thousand utterances; k8s.cpu / k8s.memory
    # override them per step, and the fine-tune plan sizes the GPU step. None: not run as a Job.
    cpu: str | None = None
    memory: str | None = None
    # "module:function" that sizes the stage's own pod from the run's outputs in the store (the fine-tune plan):
    # (environment the pod gets, store, run id, node) → (pod resources or None, chosen setup, note)
    pod_resources: str | None = None


STAGES: tuple[Stage, ...] = (
    Stage("demo-data", "jobs.demo_data", "make Mandarin demo speech (espeak-ng + HSK sentences) · 生成演示数据",
          optional=True, cpu="2", memory="2Gi"),
    Stage("prepare", "jobs.prepare", "validate CSV + audio → train/test JSONL, rejected rows, stats · 数据准备",
          cpu="1", memory="2Gi"),
    Stage("pretrained", "jobs.pretrained", "fetch/convert the base model (hf://, s3://, path, bundled:) · 预训练模型",
          cpu="1", memory="4Gi"),
    Stage("extract", "jobs.extract", "compute model inputs once (the model family's features) · 特征提取",
          cpu="2", memory="4Gi"),
    Stage("finetune", "jobs.finetune", "plan + train (full / freeze-encoder / LoRA) · 微调",
          gpu=True, cpu="4", memory="16Gi", pod_resources="jobs.finetune.plan:pod_from_store"),
    Stage("export", "jobs.export", "inference folders, checked offline (whisper: HF + CTranslate2) · 导出",
          cpu="2", memory="4Gi"),
    Stage("evaluate", "jobs.evaluate", "transcribe test sets with each model and score · 评估",
          cpu="2", memory="6Gi"),
    Stage("score", "jobs.score", "score predictions JSONL → metrics.json + reports · 打分", pipeline=False),
    Stage("run", "jobs.run", "the pipeline: local subprocesses, compose or Kubernetes Jobs · 运行流水线",
          pipeline=False),
    Stage("transcribe", "jobs.transcribe", "recordings of any length → text, JSONL, SRT, WebVTT · 转写",
          pipeline=False),
    Stage("serve", "jobs.serve", "OpenAI-compatible HTTP transcription server · 转写服务", pipeline=False),
)
_BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    """The registry entry of ``name`` (``demo-data``, ``finetune``, ``run`` …)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; the stages are {list(_BY_NAME)}") from None


def pipeline_steps(*, optional: bool = True) -> tuple[str, ...]:
    """The names of the pipeline's steps in order; ``optional=False`` leaves out the optional ones (demo-data)."""
    return tuple(s.name for s in STAGES if s.pipeline and (optional or not s.optional))


def gpu_steps() -> tuple[str, ...]:
    """The steps that run on a GPU when one is there (CUDA image, GPU reservation)."""
    return tuple(s.name for s in STAGES if s.gpu)
