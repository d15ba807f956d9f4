"""asr-ft run — the pipeline: demo-data (optional) → prepare → pretrained → extract → finetune → export → evaluate.

    asr-ft run                                   # built-in demo pipeline (demo data + bundled:whisper-base)
    asr-ft run --config pipeline.yaml            # your pipeline file (see jobs/run/demo.yaml)
    asr-ft run --config pipeline.yaml --stages finetune --stages export --force

Environment: ASRFT_RUN_EXECUTOR, ASRFT_RUN_STAGES, ASRFT_RUN_DRY_RUN, ASRFT_RUN_K8S__<FIELD> (Kubernetes
executor, e.g. ASRFT_RUN_K8S__NAMESPACE), and the common ASRFT_ARTIFACTS, ASRFT_RUN_ID, ASRFT_LOG_LEVEL,
ASRFT_S3__* which every step inherits.

The executor (common/executors/) runs the steps: ``local`` (the default, local.py) each as its own process
with exactly the environment a container gets (``asr-ft <step>`` with ASRFT_* variables; see
common/executors/pipeline.py), ``compose`` and ``k8s`` each in a container. A step whose manifest matches its
inputs and settings skips itself; the run stops at the first failure, shows that step's last output lines, and
ends with a summary table. Before the first step starts (and with --dry-run), every step's section of the
pipeline file is checked with that step's settings; all problems are listed at once, each with the file,
the section and the key.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.core.runlock import RunLocked
from common.core.settings import COMMON_FIELDS, SettingsError, StageSettings, build_parser, load_settings
from common.core.stage import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, setup_logging
from common.core.store import StoreError
from common.executors.compose import ComposeSettings, run_compose
from common.executors.k8s import K8sSettings, run_k8s
from common.executors.local import exit_code, print_summary, run_local
from common.executors.pipeline import demo_config_path, load_pipeline, steps_of, validate_pipeline

log = logging.getLogger("asr-ft.run")

EXAMPLES = """examples:
  asr-ft run                                  # the built-in demo (same as `make demo`)
  asr-ft run --config my-pipeline.yaml --run-id exp1
  asr-ft run --config my-pipeline.yaml --executor k8s --dry-run > jobs.yaml
  一条命令跑完整流程: asr-ft run --config pipeline.yaml
"""


class RunSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_RUN_")

    executor: Literal["local", "compose", "k8s"] = Field("local", description="where steps run")
    stages: list[str] | None = Field(None, description="run only these steps (default: all)", examples=["finetune"])
    dry_run: bool = Field(False, description="print what would run; run nothing")
    k8s: K8sSettings = Field(default_factory=K8sSettings, description="Kubernetes executor (--executor k8s)")
    compose: ComposeSettings = Field(default_factory=ComposeSettings, description="compose executor (--executor compose)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(RunSettings, prog="asr-ft run", description=__doc__.strip(), epilog=EXAMPLES)
    parser.add_argument("--namespace", dest="k8s.namespace", metavar="NS", help="same as --k8s-namespace")
    ns = vars(parser.parse_args(argv))
    config = ns.pop("config", None) or demo_config_path()
    try:
        settings = load_settings(RunSettings, ns, config)
        pipeline = load_pipeline(config)
        steps = steps_of(pipeline, settings.stages)
    except SettingsError as e:
        print(f"asr-ft run: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    setup_logging(settings.log_level)
    common = {k: getattr(settings, k) for k in COMMON_FIELDS if k != "s3"}
    common["force"] = settings.force or None  # only passed on when asked for
    common["s3"] = dict(settings.s3)
    problems = validate_pipeline(pipeline, config, steps, common)
    if problems:  # every section is checked before the first step starts
        print(f"asr-ft run: {len(problems)} problem(s) in the pipeline file; nothing was run:\n  - "
              + "\n  - ".join(problems), file=sys.stderr)
        return EXIT_BAD_INPUT
    log.info("pipeline %s: run '%s' in %s, steps %s, executor %s", config, settings.run_id, settings.artifacts,
             " → ".join(steps), settings.executor)
    if settings.executor == "compose":  # prints its own summary
        return run_compose(steps, pipeline, common, settings)
    if settings.executor == "k8s":  # prints its own summary
        return run_k8s(steps, pipeline, common, settings)
    try:
        results = run_local(steps, pipeline, common, settings)
    except (RunLocked, StoreError) as e:
        log.error("run failed: %s", e)
        return EXIT_FAILED
    if settings.dry_run:
        return EXIT_OK
    print_summary(results, settings)
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
