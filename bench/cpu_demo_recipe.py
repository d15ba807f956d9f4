"""Choosing the `make demo` training recipe: candidates, their wall time on the 2-core CPU and their CER.

The demo must finish in ≤ 20 min on a 2-core laptop-class CPU and show fine-tuned CER on the espeak-ng HSK
test clips ≤ 20 % (and ≤ 1/3 of pretrained) while real human Mandarin (real-zh-dev) gets no worse than
pretrained + 3 points. This script measures candidate recipes three ways:

    # 1. quality search, any device (an H100 makes a candidate take seconds): train + decode, hypotheses out
    python bench/cpu_demo_recipe.py search --data DATA --model BASE_HF --grid grid.json --out hyps/ [--device cuda]
    # 2. score hypotheses with the project's CER (common.core.metrics)
    python bench/cpu_demo_recipe.py score hyps/*.json
    # 3. the real thing on this CPU: the finetune stage itself, then CTranslate2 int8 greedy decoding as
    #    `asr-ft evaluate` does it; wall times and CERs appended to bench/results/cpu-demo-recipe.json
    python bench/cpu_demo_recipe.py cpu --demo-data demo_data --model BASE_HF --settings '{"mode": "lora", ...}'

``DATA`` for `search` is a folder made by ``bundle`` (audio as int16 arrays + texts; no soundfile needed)::

    python bench/cpu_demo_recipe.py bundle --demo-data demo_data --out DATA

Candidates (a grid entry) are finetune settings plus ``n_train`` and optional ``alphas`` (WiSE-FT merge
factors decoded from the same training run):
``{"name": "lora-k4", "mode": "lora", "frozen_encoder_layers": 4, "lora_r": 16, "lr": 1e-3, "epochs": 4,
"batch": 8, "n_train": 200, "alphas": [1.0, 0.8]}``.

The search loop is a plain PyTorch loop with the Trainer's defaults (AdamW β=(0.9, 0.999), ε=1e-8, weight
decay 0.01, gradient clipping 1.0, cosine schedule with warm-up, reshuffled each epoch) around the same
``common.families.whisper.trainee`` model code the finetune stage uses; `cpu` runs the stage itself.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results" / "cpu-demo-recipe.json"
SAMPLE_RATE = 16_000
HELDOUT = 40  # the last clips of the bundled demo-train pool: a held-out slice of the training distribution
MAX_NEW_TOKENS = 224  # Whisper's sample_len: what the evaluate stage uses
DEFAULTS = {"mode": "lora", "frozen_encoder_layers": 0, "lora_r": 16, "lora_alpha": None, "lora_dropout": 0.05,
            "lora_targets": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
            "lora_parts": ["encoder", "decoder"], "lr": 1e-3, "epochs": 3, "batch": 8, "warmup_ratio": 0.1,
            "weight_decay": 0.01, "scheduler": "cosine", "label_smoothing": 0.0, "n_train": 200, "seed": 0,
            "alphas": [1.0], "context_s": 30, "full_context_epochs": 0, "pack": 1, "pack_gap_s": 0.3}


def real_zh_dev_dir() -> Path:
    return Path(os.environ.get("ASRFT_REAL_ZH_DEV") or REPO.parent / "shared" / "data" / "real-zh-dev")


# --- data -----------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def _wav(path: Path) -> np.ndarray:
    from common.core.audio import load_audio

    samples, _ = load_audio(path)
    return np.clip(np.round(samples * 32767), -32768, 32767).astype(np.int16)


def bundle(demo: Path, out: Path) -> None:
    """Audio of the demo train/test clips and of real-zh-dev as int16 arrays + texts, in one .npz."""
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, list[dict[str, str]]] = {}
    sets = {"train": (demo / "train.csv", demo / "audio"), "test": (demo / "answers.csv", demo / "test_audio"),
            "real": (real_zh_dev_dir() / "transcripts.csv", real_zh_dev_dir() / "audio")}
    params = json.loads((demo / "demo_data.json").read_text())["params"]
    for name, (table, folder) in sets.items():
        meta[name] = []
        rows = _read_csv(table)
        for row in _pool_order(rows, params["n_test"], params["seed"]) if name == "train" else rows:
            key = f"{name}/{row['audio_id']}"
            arrays[key] = _wav(folder / f"{row['audio_id']}.wav")
            meta[name].append({"id": row["audio_id"], "text": row["text"]})
    np.savez(out / "clips.npz", **arrays)
    (out / "clips.json").write_text(json.dumps(meta, ensure_ascii=False))


def _pool_order(rows: list[dict[str, str]], n_test: int, seed: int) -> list[dict[str, str]]:
    """Train rows in the order demo-data draws them (train.csv is sorted by id), so that the first n are
    exactly the clips `asr-ft demo-data --n-train n` makes; later rows are unseen by a run with n_train=n."""
    from common.core.demo_data import sentence_pool, split_pool

    by_id = {r["audio_id"]: r for r in rows}
    order = [s.id for s in split_pool(sentence_pool(), len(rows), n_test, seed)[0]]
    assert set(order) == set(by_id), "the demo data's demo_data.json does not match its train.csv"
    return [by_id[i] for i in order]


def load_bundle(folder: Path) -> dict[str, list[dict[str, Any]]]:
    arrays = np.load(folder / "clips.npz")
    meta = json.loads((folder / "clips.json").read_text())
    return {name: [{**r, "audio": arrays[f"{name}/{r['id']}"].astype(np.float32) / 32768.0} for r in rows]
            for name, rows in meta.items()}


# --- one candidate: train + decode ----------------------------------------------------------------------


def _mels(fe, clips: list[dict[str, Any]]) -> np.ndarray:
    return fe([c["audio"] for c in clips], sampling_rate=SAMPLE_RATE, return_tensors="np").input_features


def _targets(tokenizer, clips):
    from common.families.whisper.data import eot_id, make_target, prompt_ids, text_ids

    prompt, eot = prompt_ids(tokenizer), eot_id(tokenizer)
    return [make_target(prompt, text_ids(tokenizer, c["text"]), eot) for c in clips]


def _collate(targets, idx, pad_id, device):
    import torch

    width = max(len(targets[i][1]) for i in idx)
    dec = torch.full((len(idx), width), pad_id, dtype=torch.long)
    lab = torch.full((len(idx), width), -100, dtype=torch.long)
    for row, i in enumerate(idx):
        d, lbl = targets[i]
        dec[row, : len(d)] = torch.tensor(d)
        lab[row, : len(lbl)] = torch.tensor(lbl)
    return dec.to(device), lab.to(device)


def _pack(fe, tokenizer, clips, idx, pack, gap_s):
    """Windows of `pack` clips each: audio joined with gap_s of silence, transcripts joined."""
    import torch

    from common.families.whisper.data import eot_id, make_target, prompt_ids, text_ids

    gap = np.zeros(int(gap_s * SAMPLE_RATE), np.float32)
    audios, targets = [], []
    for w in range(0, len(idx), pack):
        group = [clips[i] for i in idx[w : w + pack]]
        audio = np.concatenate([x for c in group for x in (c["audio"], gap)])[: 30 * SAMPLE_RATE]
        audios.append(audio)
        targets.append(make_target(prompt_ids(tokenizer), text_ids(tokenizer, "".join(c["text"] for c in group)),
                                   eot_id(tokenizer)))
    mel = fe(audios, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    return torch.as_tensor(mel), targets


def _speech_frames(clips, idx, spec) -> int:
    """Mel frames covering the longest packed window + 1 s."""
    longest = max(sum(len(clips[i]["audio"]) / SAMPLE_RATE + spec["pack_gap_s"] for i in idx[w : w + spec["pack"]])
                  for w in range(0, len(idx), spec["pack"]))
    return int((longest + 1.0) * 100)


def train(spec: dict[str, Any], base: Path, clips: list[dict[str, Any]], device: str) -> tuple[Any, dict[str, Any]]:
    import torch
    from transformers import (
        AutoTokenizer,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        get_scheduler,
    )

    from common.families.whisper.trainee import (
        ModeSpec,
        encode_bottom,
        frozen_bottom_cacheable,
        make_trainee,
        merged_whisper,
    )

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    fe = WhisperFeatureExtractor.from_pretrained(str(base))
    model = WhisperForConditionalGeneration.from_pretrained(str(base), dtype=torch.float32).to(device)
    mode_spec = ModeSpec(
        mode=spec["mode"], frozen_encoder_layers=spec["frozen_encoder_layers"], lora_r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"], lora_targets=tuple(spec["lora_targets"]),
        lora_parts=tuple(spec["lora_parts"]), label_smoothing=spec["label_smoothing"],
    )
    trainee = make_trainee(model, mode_spec).to(device)
    assert spec["n_train"] <= len(clips) - HELDOUT, "n_train would reach the held-out slice"
    clips = clips[: spec["n_train"]]
    targets = _targets(tokenizer, clips)
    t0 = time.perf_counter()
    mel = torch.as_tensor(_mels(fe, clips))
    cached = frozen_bottom_cacheable(trainee)
    inputs = []
    with torch.no_grad():
        for i in range(0, len(clips), 16):
            x = mel[i : i + 16].to(device)
            inputs.append(encode_bottom(model.model.encoder, x, trainee.frozen_layers) if cached else x)
    inputs = torch.cat(inputs)
    prep_s = time.perf_counter() - t0
    params = [p for p in trainee.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec["lr"])
    per_step = spec["batch"] * spec["pack"]  # clips per optimizer step
    steps_per_epoch = math.ceil(len(clips) / per_step)
    total = math.ceil(steps_per_epoch * spec["epochs"])
    sched = get_scheduler(spec["scheduler"], opt, num_warmup_steps=math.ceil(spec["warmup_ratio"] * total),
                          num_training_steps=total)
    gen = torch.Generator().manual_seed(spec["seed"])
    key = "encoder_hidden" if cached else "input_features"
    trainee.train()
    losses, step = [], 0
    t0 = time.perf_counter()
    # context_s < 30: train on the first context_s seconds of each 30-s window (the clips are shorter), except
    # in the last full_context_epochs epochs; decoding always uses the standard 30-s window.
    frames = int(spec["context_s"] * 100) if key == "input_features" else int(spec["context_s"] * 50)
    full_from = total - math.ceil(steps_per_epoch * spec["full_context_epochs"])
    while step < total:
        order = torch.randperm(len(clips), generator=gen).tolist()
        for s in range(0, len(order), per_step):
            if step >= total:
                break
            idx = order[s : s + per_step]
            if spec["pack"] > 1:  # several clips in one window, gap of silence between, texts joined
                x, windows = _pack(fe, tokenizer, clips, idx, spec["pack"], spec["pack_gap_s"])
                dec, lab = _collate(windows, list(range(len(windows))), model.config.pad_token_id, device)
                need = min(3000, 2 * math.ceil(_speech_frames(clips, idx, spec) / 2))
                x = x[:, :, : max(int(spec["context_s"] * 100), need)].to(device)
                out = trainee(decoder_input_ids=dec, labels=lab, input_features=x)
            else:
                dec, lab = _collate(targets, idx, model.config.pad_token_id, device)
                x = inputs[idx]
                if step < full_from:
                    x = x[:, :, :frames] if key == "input_features" else x[:, :frames]
                out = trainee(decoder_input_ids=dec, labels=lab, **{key: x})
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out["loss"].item())
            step += 1
    train_s = time.perf_counter() - t0
    trainee.eval()
    merged = merged_whisper(trainee)
    info = {"steps": total, "loss_first": round(float(np.mean(losses[:5])), 4),
            "loss_last": round(float(np.mean(losses[-5:])), 4), "prep_seconds": round(prep_s, 2),
            "train_seconds": round(train_s, 2), "trainable": sum(p.numel() for p in params)}
    return merged, info


def decode(model, base: Path, clips: list[dict[str, Any]], device: str, batch: int = 16) -> list[str]:
    """Greedy decoding with the zh/transcribe/notimestamps prompt and the model's suppression lists."""
    import copy

    import torch
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    from common.families.whisper.data import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    fe = WhisperFeatureExtractor.from_pretrained(str(base))
    prompt = prompt_ids(tokenizer)
    gen = copy.deepcopy(model.generation_config)
    gen.update(max_length=None, max_new_tokens=MAX_NEW_TOKENS, num_beams=1, do_sample=False, return_timestamps=False)
    out: list[str] = []
    model.eval()
    for i in range(0, len(clips), batch):
        part = clips[i : i + batch]
        feats = torch.as_tensor(_mels(fe, part)).to(device)
        with torch.inference_mode():
            ids = model.generate(feats, decoder_input_ids=torch.tensor([prompt] * len(part), device=device),
                                 generation_config=gen)
        ids = ids.sequences if hasattr(ids, "sequences") else ids
        out += [t.strip() for t in tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]
    return out


def decode_ct2(model, base: Path, clips: list[dict[str, Any]], work: Path) -> list[str]:
    """What `make demo` does on CPU: export to CTranslate2 with float16 storage, decode greedily with float32
    compute (the evaluate stage's default: token-for-token the transformers output)."""
    import shutil

    from transformers import AutoTokenizer, WhisperFeatureExtractor

    from common.families.whisper.ct2 import export_hf_to_ct2
    from common.families.whisper.engines import CT2Engine, DecodeOptions

    hf = work / "hf"
    shutil.rmtree(hf, ignore_errors=True)
    model.save_pretrained(hf)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(hf)
    WhisperFeatureExtractor.from_pretrained(str(base)).save_pretrained(hf)
    ct2 = export_hf_to_ct2(hf, work / "ct2", "float16")
    engine = CT2Engine(ct2, DecodeOptions(), compute_type="float32")
    out: list[str] = []
    for i in range(0, len(clips), 8):
        out += engine.transcribe([c["audio"] for c in clips[i : i + 8]])
    return out


def interpolate(model, pre: dict[str, Any], ft: dict[str, Any], alpha: float) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(pre[name] + alpha * (ft[name] - pre[name]))


def search(data: Path, base: Path, grid: list[dict[str, Any]], out: Path, device: str, limit: int = 0,
           decoder: str = "hf") -> None:
    import torch
    from transformers import WhisperForConditionalGeneration

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 like the CPU
    torch.backends.cudnn.allow_tf32 = False
    clips = load_bundle(data)
    clips["heldout"] = clips["train"][-HELDOUT:]  # demo-train clips no candidate trains on (n_train <= 360)
    if limit:  # smoke runs: a few clips per evaluation set
        clips.update({s: clips[s][:limit] for s in ("test", "real", "heldout")})
    out.mkdir(parents=True, exist_ok=True)
    def dec(model, part):
        return decode(model, base, part, device) if decoder == "hf" else decode_ct2(model, base, part, out / "work")

    pre_model = WhisperForConditionalGeneration.from_pretrained(str(base), dtype=torch.float32).to(device)
    pre = {n: p.detach().clone() for n, p in pre_model.named_parameters()}
    if not (out / "pretrained.json").exists():
        hyps = {s: dec(pre_model, clips[s]) for s in ("test", "real", "heldout")}
        _write(out / "pretrained.json", {"name": "pretrained", "spec": {}, "alpha": None, "hyps": hyps}, clips)
    del pre_model
    for entry in grid:
        spec = {**DEFAULTS, **entry}
        if all((out / f"{spec['name']}__a{a}.json").exists() for a in spec["alphas"]):
            continue
        t0 = time.perf_counter()
        model, info = train(spec, base, clips["train"], device)
        ft = {n: p.detach().clone() for n, p in model.named_parameters()}
        if spec.get("save"):  # for `mix`: other interpolations of the same run without retraining
            from safetensors.torch import save_file

            (out / "models").mkdir(exist_ok=True)
            save_file({n: t.cpu().contiguous() for n, t in ft.items()}, str(out / "models" / f"{spec['name']}.safetensors"))
        for alpha in spec["alphas"]:
            interpolate(model, pre, ft, alpha)
            t0 = time.perf_counter()
            hyps = {s: dec(model, clips[s]) for s in ("test", "real", "heldout")}
            info = {**info, "decode_seconds": round(time.perf_counter() - t0, 1), "loadavg": os.getloadavg()}
            _write(out / f"{spec['name']}__a{alpha}.json",
                   {"name": spec["name"], "spec": spec, "alpha": alpha, "info": info, "hyps": hyps}, clips)
        print(f"{spec['name']}: {info} total {time.perf_counter() - t0:.1f} s", flush=True)
        del model, ft
        if device == "cuda":
            torch.cuda.empty_cache()


def _write(path: Path, row: dict[str, Any], clips) -> None:
    row["refs"] = {s: [c["text"] for c in clips[s]] for s in row["hyps"]}
    path.write_text(json.dumps(row, ensure_ascii=False))


def part_of(name: str) -> str:
    return "encoder" if name.startswith("model.encoder.") else "decoder"  # decoder: its layers + embeddings


def mix(data: Path, base: Path, out: Path, name: str, combos: list[list[float]], limit: int = 0,
        sets: tuple[str, ...] = ("test", "real", "heldout")) -> None:
    """Per-part WiSE-FT of a saved run: θ = θ_pre + α_enc·Δ_encoder + α_dec·Δ_decoder, decoded as `evaluate` does."""
    import torch
    from safetensors.torch import load_file
    from transformers import WhisperForConditionalGeneration

    clips = load_bundle(data)
    clips["heldout"] = clips["train"][-HELDOUT:]
    if limit:
        clips.update({s: clips[s][:limit] for s in ("test", "real", "heldout")})
    ft = load_file(str(out / "models" / f"{name}.safetensors"))
    model = WhisperForConditionalGeneration.from_pretrained(str(base), dtype=torch.float32)
    pre = {n: p.detach().clone() for n, p in model.named_parameters()}
    for a_enc, a_dec in combos:
        path = out / f"{name}__e{a_enc}_d{a_dec}.json"
        if path.exists():
            continue
        with torch.no_grad():
            for n, p in model.named_parameters():
                a = a_enc if part_of(n) == "encoder" else a_dec
                p.copy_(pre[n] + a * (ft[n] - pre[n]))
        t0 = time.perf_counter()
        hyps = {s: decode_ct2(model, base, clips[s], out / "work") for s in sets}
        _write(path, {"name": name, "alpha": f"enc {a_enc} dec {a_dec}", "hyps": hyps,
                      "info": {"decode_seconds": round(time.perf_counter() - t0, 1)}}, clips)
        print(f"{name} enc {a_enc} dec {a_dec} done", flush=True)


# --- scoring ---------------------------------------------------------------------------------------------


def cer(refs: list[str], hyps: list[str]) -> float:
    from common.core.metrics import utterance_errors

    errs = [utterance_errors(r, h) for r, h in zip(refs, hyps, strict=True)]
    return sum(e["char_errors"] for e in errs) / max(1, sum(e["ref_chars"] for e in errs))


def score(paths: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for p in paths:
        r = json.loads(p.read_text())
        rows.append({"name": r["name"], "alpha": r["alpha"], **{f"cer_{s}": round(100 * cer(r["refs"][s], h), 2)
                                                              for s, h in r["hyps"].items()},
                     **{k: v for k, v in (r.get("info") or {}).items()}})
    rows.sort(key=lambda x: (x["name"], str(x["alpha"])))
    for x in rows:
        print(json.dumps(x, ensure_ascii=False))
    return rows


# --- the real stage on this CPU ------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg()}


def cpu_run(demo: Path, base: Path, settings: dict[str, Any], artifacts: Path, run_id: str,
            name: str) -> dict[str, Any]:
    """prepare → extract → pretrained (from BASE) → finetune (the stage) → CT2 int8 → greedy CER, timed."""
    from common.families.whisper.ct2 import export_hf_to_ct2

    env = {**os.environ, "PYTHONPATH": str(REPO), "ASRFT_ARTIFACTS": str(artifacts), "ASRFT_RUN_ID": run_id}
    times: dict[str, float] = {}

    def stage(*argv: str) -> None:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=REPO, env=env, check=True)
        times[argv[0]] = round(time.perf_counter() - t0, 1)

    stage("prepare", "--train-csv", str(demo / "train.csv"), "--audio-dir", str(demo / "audio"),
          "--test-csv", str(demo / "answers.csv"), "--test-audio-dir", str(demo / "test_audio"))
    stage("extract", "--epochs", str(settings.get("epochs", 3)))
    stage("pretrained", "--model", str(base))
    flags = [f"--{k.replace('_', '-')}={json.dumps(v) if isinstance(v, dict | list) else v}"
             for k, v in settings.items()]
    stage("finetune", "--device", "cpu", *flags)
    run = artifacts / run_id
    t0 = time.perf_counter()
    ct2 = export_hf_to_ct2(run / "finetune" / "final", run / "bench-ct2", "float16")
    times["export_ct2"] = round(time.perf_counter() - t0, 1)
    result = {"name": name, "settings": settings, "seconds": times, "machine": machine(),
              "finetune": json.loads((run / "finetune" / "_manifest.json").read_text())["summary"]}
    result["cer"], result["decode_seconds"] = ct2_cer(ct2, demo)
    return result


def ct2_cer(ct2: Path, demo: Path) -> tuple[dict[str, float], dict[str, float]]:
    from common.core.transcribe import Utterance, transcribe_utterances
    from common.families.whisper.engines import CT2Engine, DecodeOptions

    engine = CT2Engine(ct2, DecodeOptions(), compute_type="float32")
    sets = {"test": (demo / "answers.csv", demo / "test_audio"),
            "real-zh-dev": (real_zh_dev_dir() / "transcripts.csv", real_zh_dev_dir() / "audio")}
    cers, secs = {}, {}
    for name, (table, folder) in sets.items():
        utts = [Utterance(r["audio_id"], r["text"], str(folder / f"{r['audio_id']}.wav")) for r in _read_csv(table)]
        t0 = time.perf_counter()
        rows = transcribe_utterances(engine, utts, batch_size=8)
        secs[name] = round(time.perf_counter() - t0, 1)
        cers[name] = round(100 * cer([r["reference"] for r in rows], [r["hypothesis"] for r in rows]), 2)
    return cers, secs


def record(paths: list[Path], label: str, device: str, note: str) -> None:
    """Add scored search rows (one per candidate x alpha) to the results file under "search"."""
    rows = score(paths)
    keep = ("mode", "frozen_encoder_layers", "lora_r", "lora_parts", "lora_targets", "lr", "epochs", "batch",
            "n_train", "context_s", "pack", "lora_dropout", "seed", "label_smoothing")
    specs = {json.loads(p.read_text())["name"]: json.loads(p.read_text()).get("spec") or {} for p in paths}
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    batch = {"label": label, "device": device, "note": note, "date": datetime.now(UTC).isoformat(timespec="seconds"),
             "rows": [{**r, "spec": {k: v for k, v in specs.get(r["name"], {}).items() if k in keep}} for r in rows]}
    data.setdefault("search", []).append(batch)
    _save(data)


def _save(data: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(RESULTS)


def append_result(row: dict[str, Any]) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    row["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    data.setdefault("pipeline_runs", []).append(row)
    _save(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bundle")
    b.add_argument("--demo-data", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("search")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--model", type=Path, required=True)
    s.add_argument("--grid", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--device", default="cpu")
    s.add_argument("--limit", type=int, default=0, help="evaluate on the first N clips of each set (smoke)")
    s.add_argument("--decoder", choices=("hf", "ct2"), default="hf",
                   help="hf: transformers greedy (any device); ct2: CTranslate2 int8 as `asr-ft evaluate` (CPU)")
    r = sub.add_parser("record")
    r.add_argument("paths", type=Path, nargs="+")
    r.add_argument("--label", required=True)
    r.add_argument("--device", required=True)
    r.add_argument("--note", default="")
    m = sub.add_parser("mix")
    m.add_argument("--data", type=Path, required=True)
    m.add_argument("--model", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--name", required=True)
    m.add_argument("--combos", required=True, help='JSON [[alpha_encoder, alpha_decoder], ...]')
    m.add_argument("--limit", type=int, default=0)
    m.add_argument("--sets", default="test,real,heldout", help="which sets to decode (comma-separated)")
    sc = sub.add_parser("score")
    sc.add_argument("paths", type=Path, nargs="+")
    c = sub.add_parser("cpu")
    c.add_argument("--demo-data", type=Path, required=True)
    c.add_argument("--model", type=Path, required=True)
    c.add_argument("--settings", default="{}")
    c.add_argument("--name", required=True)
    c.add_argument("--artifacts", type=Path, default=REPO / "runs")
    c.add_argument("--run-id", default="bench-recipe")
    a = p.parse_args(argv)
    if a.cmd == "bundle":
        bundle(a.demo_data, a.out)
    elif a.cmd == "search":
        search(a.data, a.model, json.loads(a.grid.read_text()), a.out, a.device, a.limit, a.decoder)
    elif a.cmd == "record":
        record(a.paths, a.label, a.device, a.note)
    elif a.cmd == "mix":
        mix(a.data, a.model, a.out, a.name, json.loads(a.combos), a.limit, tuple(a.sets.split(",")))
    elif a.cmd == "score":
        score(a.paths)
    else:
        row = cpu_run(a.demo_data, a.model, json.loads(a.settings), a.artifacts, a.run_id, a.name)
        print(json.dumps(row, ensure_ascii=False, indent=1))
        append_result(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
