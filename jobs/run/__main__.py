"""asr-ft run — the pipeline: demo-data (optional) → prepare → pretrained → extract → finetune → export → evaluate.

    asr-ft run                                   # built-in demo pipeline (demo data + bundled:whisper-base)
    asr-ft run --config pipeline.yaml            # your pipeline file (see jobs/run/demo.yaml)
    asr-ft run --config pipeline.yaml --stages finetune --stages export --force

Environment: ASRFT_RUN_EXECUTOR, ASRFT_RUN_STAGES, ASRFT_RUN_DRY_RUN, ASRFT_RUN_K8S__<FIELD> (Kubernetes
executor, e.g. ASRFT_RUN_K8S__NAMESPACE), and the common ASRFT_ARTIFACTS, ASRFT_RUN_ID, ASRFT_LOG_LEVEL,
ASRFT_S3__* which every step inherits.

Each step runs as its own process with exactly the environment a container gets (``asr-ft <step>`` with
ASRFT_* variables; see common/executors/pipeline.py). A step whose manifest matches its inputs and settings skips
itself; the run stops at the first failure, shows that step's last output lines, and ends with a summary table.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.core.registry import stage
from common.core.settings import COMMON_FIELDS, SettingsError, StageSettings, build_parser, load_settings
from common.core.stage import EXIT_BAD_INPUT, EXIT_OK, MANIFEST, setup_logging
from common.core.store import open_store
from common.executors.compose import ComposeSettings
from common.executors.k8s import K8sSettings
from common.executors.pipeline import demo_config_path, load_pipeline, local_env, steps_of

log = logging.getLogger("asr-ft.run")

EXAMPLES = """examples:
  asr-ft run                                  # the built-in demo (same as `make demo`)
  asr-ft run --config my-pipeline.yaml --run-id exp1
  asr-ft run --config my-pipeline.yaml --executor k8s --dry-run > jobs.yaml
  一条命令跑完整流程: asr-ft run --config pipeline.yaml
"""
TAIL_BYTES = 6000  # how much of a failed step's output to show again


class RunSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_RUN_")

    executor: Literal["local", "compose", "k8s"] = Field("local", description="where steps run")
    stages: list[str] | None = Field(None, description="run only these steps (default: all)", examples=["finetune"])
    dry_run: bool = Field(False, description="print what would run; run nothing")
    k8s: K8sSettings = Field(default_factory=K8sSettings, description="Kubernetes executor (--executor k8s)")
    compose: ComposeSettings = Field(default_factory=ComposeSettings, description="compose executor (--executor compose)")


@dataclass
class StepResult:
    step: str
    status: str  # done | skipped | failed | not run
    seconds: float = 0.0
    note: str = ""
    code: int = 0


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
    log.info("pipeline %s: run '%s' in %s, steps %s, executor %s", config, settings.run_id, settings.artifacts,
             " → ".join(steps), settings.executor)
    if settings.executor == "local":
        results = run_local(steps, pipeline, common, settings)
    elif settings.executor == "compose":
        from common.executors.compose import run_compose

        return run_compose(steps, pipeline, common, settings)
    else:
        from common.executors.k8s import run_k8s

        return run_k8s(steps, pipeline, common, settings)
    if settings.dry_run:
        return EXIT_OK
    print_summary(results, settings)
    failed = [r for r in results if r.status == "failed"]
    return failed[0].code if failed else EXIT_OK


def _manifest_finished(settings: RunSettings, step: str, pipeline: dict) -> str | None:
    """A stamp that changes when the step really ran (its manifest's finish time)."""
    if step == "demo-data":  # no manifest: the data folder's summary file is rewritten when it is regenerated
        section = pipeline.get("demo-data") or pipeline.get("demo_data") or {}
        summary = Path(section.get("out", "demo_data")) / "demo_data.json"
        return str(summary.stat().st_mtime_ns) if summary.exists() else None
    store = open_store(settings.artifacts, settings.s3)
    key = store.join(settings.run_id, step, MANIFEST)
    return store.read_json(key).get("finished") if store.exists(key) else None


def run_local(steps: list[str], pipeline: dict, common: dict, settings: RunSettings) -> list[StepResult]:
    results = [StepResult(s, "not run") for s in steps]
    for result in results:
        step = result.step
        env = local_env(common, pipeline, step)
        cmd = [sys.executable, "-m", stage(step).module]
        if settings.dry_run:
            shown = {k: v for k, v in sorted(env.items()) if k.startswith("ASRFT_") and "SECRET" not in k and "KEY" not in k}
            print(f"# {step}\n" + " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in shown.items())
                  + f" asr-ft {step}\n")
            continue
        print(f"\n━━ {step} ━━", file=sys.stderr, flush=True)
        before = _manifest_finished(settings, step, pipeline)
        t0 = time.perf_counter()
        code, tail = _run_streaming(cmd, env)
        result.seconds = time.perf_counter() - t0
        if code != 0:
            result.status, result.note, result.code = "failed", f"(exit {code})", code
            print(f"\n✗ {step} failed (exit {code}). Its last output lines:\n" + "─" * 60 + f"\n{tail.rstrip()}\n"
                  + "─" * 60, file=sys.stderr)
            break
        after = _manifest_finished(settings, step, pipeline)
        result.status = "skipped" if (before is not None and before == after) else "done"
        result.note = _note(settings, step)
    return results


def _run_streaming(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run a step, passing its output through live (progress bars included) and keeping the tail."""
    tail: deque[bytes] = deque()
    size = 0
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail.append(chunk)
            size += len(chunk)
            while size - len(tail[0]) > TAIL_BYTES:
                size -= len(tail.popleft())
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    text = b"".join(tail).decode("utf-8", "replace").replace("\r", "\n")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return code, "\n".join(lines[-25:])


def _note(settings: RunSettings, step: str) -> str:
    if step == "demo-data":
        return ""
    store = open_store(settings.artifacts, settings.s3)
    summary = store.read_json(store.join(settings.run_id, step, MANIFEST)).get("summary") or {}
    keys = [k for k, v in summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)][:4]
    return ", ".join(f"{k}={_fmt(summary[k])}" for k in keys)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)[:40]


def print_summary(results: list[StepResult], settings: RunSettings) -> None:
    icon = {"done": "✓", "skipped": "↷", "failed": "✗", "not run": "·"}
    rows = [f"{icon[r.status]} {r.step:<11} {r.status:<8} {r.seconds:7.1f}s  {r.note}" for r in results]
    total = sum(r.seconds for r in results)
    out = ["", f"Run '{settings.run_id}' in {settings.artifacts} · 运行汇总", *rows, f"  {'total':<20} {total:7.1f}s"]
    metrics = _metrics_table(settings) if results and results[-1].step == "evaluate" and results[-1].status != "failed" else ""
    print("\n".join(out) + ("\n\n" + metrics if metrics else ""), file=sys.stderr)


def _metrics_table(settings: RunSettings) -> str:
    store = open_store(settings.artifacts, settings.s3)
    key = store.join(settings.run_id, "evaluate", "metrics.json")
    if not store.exists(key):
        return ""
    metrics = store.read_json(key)
    sets = sorted({s for per_set in metrics.values() for s in per_set})
    head = f"{'CER 字错率':<14}" + "".join(f"{s:>14}" for s in sets)
    lines = [head]
    for model, per_set in metrics.items():
        cells = "".join(
            f"{per_set[s]['cer'] * 100:13.1f}%" if s in per_set and per_set[s].get("cer") is not None else f"{'—':>14}"
            for s in sets
        )
        lines.append(f"{model:<14}{cells}")
    report = store.uri_for(store.join(settings.run_id, "evaluate", "report.html"))
    return "\n".join(lines) + f"\nreport: {report}"


if __name__ == "__main__":
    sys.exit(main())
