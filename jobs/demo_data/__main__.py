"""asr-ft demo-data — Mandarin demo speech made on this machine (espeak-ng + HSK sentences).

    asr-ft demo-data --out demo_data --n-train 240 --n-test 40 --seed 0

Environment: ASRFT_DEMO_DATA_OUT, ASRFT_DEMO_DATA_N_TRAIN, ASRFT_DEMO_DATA_N_TEST, ASRFT_DEMO_DATA_SEED.
Writes a train and a test set, each a CSV + audio folder: `audio/` + `train.csv`, `test_audio/` + `answers.csv`
(columns audio_id,text), the layout `asr-ft prepare --test-csv` reads.
A folder already generated with the same settings is kept (`--force` regenerates).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.core.settings import StageSettings
from common.core.stage import EXIT_FAILED, EXIT_OK, fail, setup_logging, stage_main

log = logging.getLogger("asr-ft.demo-data")

EXAMPLES = """examples:
  asr-ft demo-data --out demo_data
  asr-ft demo-data --out /tmp/zh --n-train 60 --n-test 10 --seed 7
  生成演示数据: asr-ft demo-data --out demo_data
"""


class DemoDataSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="ASRFT_DEMO_DATA_")

    out: Path = Field(Path("demo_data"), description="output folder", examples=["demo_data"])
    n_train: int = Field(240, ge=1, le=4000, description="training clips", examples=[240])
    n_test: int = Field(40, ge=1, le=1000, description="test clips (sentences disjoint from training)", examples=[40])
    seed: int = Field(0, description="random seed: same seed → same data", examples=[0])
    workers: int | None = Field(None, ge=1, description="synthesis processes (default: CPU count)")


def main(argv: list[str] | None = None) -> int:
    settings = stage_main(DemoDataSettings, argv, __doc__, EXAMPLES)
    if settings is None:
        return 2
    setup_logging(settings.log_level)
    from common.core.demo_data import EspeakError, generate_demo_data

    try:
        summary = generate_demo_data(settings.out, settings.n_train, settings.n_test, settings.seed,
                                     workers=settings.workers, progress=True, overwrite=settings.force)
    except (EspeakError, FileExistsError, ValueError) as e:
        return fail("demo-data", str(e), EXIT_FAILED)
    if summary.get("skipped"):
        log.info("demo data in %s already matches these settings; kept (use --force to regenerate)", settings.out)
    else:
        log.info("demo data ready in %s: %d train + %d test clips, %.0f s of audio, %.1f s wall",
                 settings.out, summary["n_train"], summary["n_test"], summary["total_seconds"], summary["wall_seconds"])
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
