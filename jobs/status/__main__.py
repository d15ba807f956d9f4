"""asr-ft status — the runs in --artifacts, or one run's stages: done / stale / failed / running.

    asr-ft status                      # every run in runs/ (or --artifacts / ASRFT_ARTIFACTS)
    asr-ft status demo                 # the stages of run 'demo', with when they finished and why one is stale
"""

from __future__ import annotations

import sys

from common.core.settings import SettingsError, build_parser, load_settings
from common.core.stage import EXIT_BAD_INPUT, EXIT_OK
from common.core.store import StoreError, open_store
from jobs.status import StatusSettings, format_run, format_runs, list_runs, stage_states

EXAMPLES = """examples:
  asr-ft status
  asr-ft status demo --artifacts s3://bucket/asr-ft --s3-endpoint-url http://minio:9000
  查看运行状态: asr-ft status [RUN]
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(StatusSettings, prog="asr-ft status", description=__doc__.strip(), epilog=EXAMPLES)
    parser.add_argument("run", nargs="?", help="a run id (default: list the runs)")
    ns = vars(parser.parse_args(argv))
    run = ns.pop("run", None) or ns.get("run_id")  # `asr-ft status demo` or `asr-ft status --run-id demo`
    config = ns.pop("config", None)
    try:
        settings = load_settings(StatusSettings, ns, config)
        store = open_store(settings.artifacts, settings.s3)
        runs = list_runs(store)
        if run is None:
            print(format_runs(store, runs))
            return EXIT_OK
        if run not in runs:
            print(f"asr-ft status: no run {run!r} in {store.uri}; runs there: {', '.join(runs) or 'none'}",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        print(format_run(run, stage_states(store, run)))
        return EXIT_OK
    except (SettingsError, StoreError) as e:
        print(f"asr-ft status: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
