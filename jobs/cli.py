"""`asr-ft` — one sub-command per stage of the stage registry (common/core/registry.py). Each runs
`jobs/<stage>/__main__.py:main(argv)`, exactly what `python -m jobs.<stage>` runs in a container.

    asr-ft demo-data --out demo_data          # Mandarin demo data made here (espeak-ng)
    asr-ft prepare --train-csv train.csv --audio-dir audio --test-ratio 0.1
    asr-ft run                                # the whole pipeline (built-in demo without --config)
    asr-ft status [RUN]                       # runs and each stage's state
    asr-ft <command> --help                   # every flag, its environment variable and examples
"""

from __future__ import annotations

import importlib
import sys

from common.core.registry import STAGES, stage

# Commands that are not stages (no settings section, no artifacts of their own): name → (module, help)
TOOLS = {"status": ("jobs.status", "list runs and each stage's state: done / stale / failed / running · 运行状态")}


def usage() -> str:
    commands = [(s.name, s.help) for s in STAGES] + [(name, h) for name, (_, h) in TOOLS.items()]
    width = max(len(name) for name, _ in commands)
    rows = "\n".join(f"  {name:<{width}}  {h}" for name, h in commands)
    return f"usage: asr-ft <command> [flags]\n\ncommands:\n{rows}\n\n`asr-ft <command> --help` shows each command's flags."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from common.core.stage import code_version

        print(code_version())
        return 0
    if argv[0] in TOOLS:
        return importlib.import_module(TOOLS[argv[0]][0] + ".__main__").main(argv[1:])
    if argv[0] not in {s.name for s in STAGES}:
        print(f"asr-ft: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(stage(argv[0]).module + ".__main__")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
