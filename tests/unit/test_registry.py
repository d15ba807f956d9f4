"""The stage registry (common/core/registry.py): the pipeline order, what each stage runs and needs, and the
commands `asr-ft` offers from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common.core.registry import STAGES, gpu_steps, pipeline_steps, stage
from common.executors.pipeline import steps_of

REPO = Path(__file__).resolve().parents[2]
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Mi|Gi)?$")


def test_pipeline_order():
    assert pipeline_steps() == ("demo-data", "prepare", "pretrained", "extract", "finetune", "export", "evaluate")
    assert pipeline_steps(optional=False) == ("prepare", "pretrained", "extract", "finetune", "export", "evaluate")
    assert gpu_steps() == ("finetune",)


@pytest.mark.parametrize("name, module, pipeline, optional, gpu", [
    ("demo-data", "jobs.demo_data", True, True, False),
    ("prepare", "jobs.prepare", True, False, False),
    ("pretrained", "jobs.pretrained", True, False, False),
    ("extract", "jobs.extract", True, False, False),
    ("finetune", "jobs.finetune", True, False, True),
    ("export", "jobs.export", True, False, False),
    ("evaluate", "jobs.evaluate", True, False, False),
    ("score", "jobs.score", False, False, False),
    ("run", "jobs.run", False, False, False),
    ("transcribe", "jobs.transcribe", False, False, False),
    ("serve", "jobs.serve", False, False, False),
])
def test_stage_table(name, module, pipeline, optional, gpu):
    s = stage(name)
    assert (s.module, s.pipeline, s.optional, s.gpu) == (module, pipeline, optional, gpu)
    assert (REPO / module.replace(".", "/") / "__main__.py").is_file()  # `python -m <module>` runs it
    assert s.help and "\n" not in s.help
    if pipeline:  # run as a Job: a CPU and a memory request
        assert QUANTITY.match(s.cpu) and QUANTITY.match(s.memory), (s.cpu, s.memory)
    else:
        assert (s.cpu, s.memory) == (None, None)


def test_unknown_stage_names_the_known_ones():
    with pytest.raises(KeyError, match=r"unknown stage 'extrct'.*'extract'"):
        stage("extrct")


@pytest.mark.parametrize("sections, expected", [
    (["prepare", "extract", "pretrained", "finetune", "export", "evaluate"],  # file order does not matter
     ["prepare", "pretrained", "extract", "finetune", "export", "evaluate"]),
    (["demo-data", "prepare"], list(pipeline_steps())),
    (["demo_data", "run"], list(pipeline_steps())),
])
def test_steps_of_a_pipeline_follow_the_registry(sections, expected):
    assert steps_of(dict.fromkeys(sections, {})) == expected


def test_cli_lists_every_command_in_registry_order(capsys):
    from jobs.cli import main

    assert main(["--help"]) == 0
    listed = re.findall(r"^  (\S+)  ", capsys.readouterr().out, flags=re.M)
    assert listed == [s.name for s in STAGES] + ["status"]  # then the tools
    assert main(["extrct"]) == 2
    assert "unknown command 'extrct'" in capsys.readouterr().err
