"""`asr-ft` — one sub-command per stage. Each runs `jobs/<stage>/__main__.py:main(argv)`, exactly what
`python -m jobs.<stage>` runs in a container.

    asr-ft demo-data --out demo_data          # Mandarin demo data made here (espeak-ng)
    asr-ft prepare --train-csv train.csv --audio-dir audio --test-ratio 0.1
    asr-ft run                                # the whole pipeline (built-in demo without --config)
    asr-ft <command> --help                   # every flag, its environment variable and examples
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo-data": ("jobs.demo_data", "make Mandarin demo speech (espeak-ng + HSK sentences) · 生成演示数据"),
    "prepare": ("jobs.prepare", "validate CSV + audio → train/test JSONL, rejected rows, stats · 数据准备"),
    "extract": ("jobs.extract", "compute model inputs once (Whisper log-mel cache) · 特征提取"),
    "pretrained": ("jobs.pretrained", "fetch/convert the base model (hf://, s3://, path, bundled:) · 预训练模型"),
    "finetune": ("jobs.finetune", "plan + train (full / freeze-encoder / LoRA) · 微调"),
    "export": ("jobs.export", "inference folders: Hugging Face + CTranslate2 · 导出"),
    "evaluate": ("jobs.evaluate", "transcribe test sets with each model and score · 评估"),
    "score": ("jobs.score", "score predictions JSONL → metrics.json + reports · 打分"),
    "run": ("jobs.run", "the pipeline: local subprocesses, compose or Kubernetes Jobs · 运行流水线"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
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
    if argv[0] not in COMMANDS:
        print(f"asr-ft: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0] + ".__main__")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
