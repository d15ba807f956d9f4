"""A second model family, defined here in a few dozen lines, runs every stage through `asr-ft run` with no
change to jobs/: the stages call only the family protocol (common/families/__init__.py).

The toy family: a model that reads 16 band energies of a clip and names the transcript's first character
(a linear classifier over the characters of a vocabulary file). It has no features to cache, plans with a
one-layer profile, trains through the stage's own loop, exports by copying, and decodes with its own engine.
ASRFT_FAMILIES registers it in every stage process, as a family shipped in its own package would be.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from common.families import Built, Planning

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BANDS = 16


def energies(audio: np.ndarray) -> np.ndarray:
    spectrum = np.abs(np.fft.rfft(audio[:16000], n=2 * 16000)) ** 2
    return np.log1p(np.array([b.sum() for b in np.array_split(spectrum, BANDS)], dtype=np.float32))


def toy_net(n_chars: int):
    import torch

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(BANDS, n_chars)

        def forward(self, feats, labels=None):
            logits = self.proj(feats)
            loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return {"loss": loss, "logits": logits}

    return Toy()


def _load(folder: Path):
    from safetensors.torch import load_file

    chars = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    net = toy_net(len(chars))
    net.load_state_dict(load_file(str(folder / "model.safetensors")))
    return net, chars


def _save(net, chars: list[str], folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "vocab.json").write_text(json.dumps(chars, ensure_ascii=False), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "bands": BANDS}))


def _audio(rec: dict, run_dir: Path) -> np.ndarray:
    from common.core.audio import load_audio
    from common.core.records import audio_location

    return load_audio(audio_location(rec, run_dir))[0]


class ToyEngine:
    def __init__(self, folder: Path):
        self.net, self.chars = _load(folder)
        self.info = {"backend": "toy", "comparable": {"chars": len(self.chars)}}

    def transcribe(self, audios):
        import torch

        with torch.no_grad():
            best = self.net(torch.from_numpy(np.stack([energies(a) for a in audios])))["logits"].argmax(-1)
        return [self.chars[i] for i in best.tolist()]


def _profile(n_chars: int):
    from common.training.memory import LinearGroup, ModelProfile, Stack

    return ModelProfile(
        name="toy", family="toy", encoder_params=0, decoder_params=BANDS * n_chars + n_chars, embedding_params=0,
        head_params=0, largest_layer_params=BANDS * n_chars, vocab_size=n_chars, hidden_size=BANDS,
        stacks=(Stack(part="decoder", layers=1, hidden=BANDS, heads=1, kv_heads=1, ffn=BANDS, gated_mlp=False,
                      seq_len=1),),
        linears=(LinearGroup(name="proj", part="decoder", in_features=BANDS, out_features=n_chars, count=1),),
        default_lora_targets=("proj",), default_lora_parts=("decoder",))


def _examples(model_dir: Path, records):
    from common.core.records import transcript

    chars = json.loads((model_dir / "vocab.json").read_text(encoding="utf-8"))  # chars[0]: any other character
    return [SimpleNamespace(id=r["id"], labels=[max(0, chars.index(c) if (c := transcript(r)[:1]) in chars else 0)])
            for r in records], []


def _export(source, out_dir, donor, settings, clip):
    from common.core.files import atomic_dir

    with atomic_dir(out_dir / "model") as tmp:
        for f in ("model.safetensors", "vocab.json", "config.json"):
            shutil.copy2(source / f, tmp / f)
    text = ToyEngine(out_dir / "model").transcribe([clip])[0] if clip is not None else None
    return {"model_weights": [{"file": "model.safetensors", "size": (out_dir / "model/model.safetensors").stat().st_size}],
            **({"verification": {"toy": {"text": text}}} if clip is not None else {})}


def _datasets(model_dir, trainee, examples, records, dirs, plan, settings):
    import torch

    def items(exs):
        return [{"feats": torch.from_numpy(energies(_audio(records[e.id], dirs["run"]))),
                 "labels": torch.tensor(e.labels[0])} for e in exs]

    return Built(train=items(examples[0]), eval=items(examples[1]) or None,
                 collator=lambda batch: {k: torch.stack([b[k] for b in batch]) for k in batch[0]},
                 decisions=[("toy_features", f"{BANDS} band energies", "computed from the audio each run")])


def _save_final(trainee, out_dir, model_dir, settings):
    from common.core.files import atomic_dir

    with atomic_dir(out_dir) as tmp:
        _save(trainee, json.loads((model_dir / "vocab.json").read_text(encoding="utf-8")), tmp)
    return {"path": out_dir.name}


def _materialize(source: Path, facts: dict, dest: Path, settings: dict) -> dict:
    if json.loads((source / "config.json").read_text()).get("model_type") != "toy":
        raise ValueError(f"{source} is not a toy model")
    for f in ("model.safetensors", "vocab.json", "config.json"):
        shutil.copy2(source / f, dest / f)
    return {"conversion": "none (copied)", "source_format": "toy", "model": {"model_type": "toy"}}


TOY = SimpleNamespace(
    name="toy", bundled={}, bundled_fingerprint=lambda name: {}, materialize=_materialize,
    front_end=lambda model_dir: None,
    data_facts=lambda model_dir, records: {"clips": len(_examples(model_dir, records)[0]), "longest_seconds": 0.0,
                                           "longest_labels": 1, "rejected": _examples(model_dir, records)[1]},
    planning=lambda config, facts, settings: Planning(profile=_profile(64), n_samples=facts["clips"]),
    training_data=_examples,
    trainee=lambda model_dir, plan, settings: _load(model_dir)[0],
    datasets=_datasets, save_final=_save_final, export=_export,
    open_engine=lambda folder, request: (ToyEngine(folder / "model" if (folder / "model").is_dir() else folder),
                                         {"folder": str(folder), "source_format": "toy"}),
)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    model = root / "toy-model"
    model.mkdir()
    _save(toy_net(64), ["?", *"我你他她是的了在有这那不也很都就会说要去来看想好"] + [chr(0x4E00 + i) for i in range(39)], model)  # 64 characters
    config = {
        "run_id": "toy", "artifacts": str(root / "runs"),
        "demo-data": {"out": str(root / "demo_data"), "n_train": 8, "n_test": 3, "seed": 1},
        "prepare": {"train_csv": str(root / "demo_data/train.csv"), "audio_dir": str(root / "demo_data/audio"),
                    "test_csv": str(root / "demo_data/answers.csv"),
                    "test_audio_dir": str(root / "demo_data/test_audio")},
        "pretrained": {"model": str(model), "family": "toy"},
        "extract": {},
        "finetune": {"device": "cpu", "epochs": 2, "batch": 2, "lr": 0.05},
        "export": {},
        "evaluate": {},
    }
    cfg = root / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASRFT_")}
    env |= {"ASRFT_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1", "ASRFT_FAMILIES": f"toy={Path(__file__).stem}:TOY",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "jobs.run", "--config", str(cfg)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    return root / "runs" / "toy", done


def test_every_stage_runs_a_second_family(toy_run):
    run, done = toy_run
    assert done.returncode == 0, done.stderr[-4000:]
    for stage in ("prepare", "pretrained", "extract", "finetune", "export", "evaluate"):
        assert (run / stage / "_manifest.json").is_file(), stage
    assert json.loads((run / "pretrained/provenance.json").read_text())["family"] == "toy"
    assert not (run / "extract" / "features").exists()  # the toy family computes no features ahead
    plan = {d["name"]: d["value"] for d in json.loads((run / "finetune/plan.json").read_text())["decisions"]}
    assert plan["toy_features"] == "16 band energies" and plan["mode"] == "full"  # the family's and the planner's
    assert (run / "finetune/final/model.safetensors").is_file()
    assert json.loads((run / "export/export_info.json").read_text())["family"] == "toy"
    metrics = json.loads((run / "evaluate/metrics.json").read_text())
    assert set(metrics) == {"pretrained", "finetuned"} and all(m["test"]["n"] == 3 for m in metrics.values())


def test_the_family_is_not_whisper_anywhere(toy_run):
    """No stage fell back to Whisper: the trained weights are the toy's, and jobs/ names no family."""
    from safetensors.torch import load_file

    run, _ = toy_run
    assert set(load_file(str(run / "finetune/final/model.safetensors"))) == {"proj.weight", "proj.bias"}
    jobs_text = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "jobs").rglob("*.py"))
    assert "toy" not in jobs_text.lower()
