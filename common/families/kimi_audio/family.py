"""The kimi-audio family: what each stage asks of Kimi-Audio-7B(-Instruct) (the protocol of common/families/).

    pretrained  materialize    a Kimi-Audio folder (local, s3://, hf://) + its GLM-4-Voice speech tokenizer →
                               model/, every file and safetensors header checked before any copy;
                               bundled:kimi-audio-tiny: a random stand-in built in code (its CER is meaningless)
    extract     front_end      GLM-4-Voice codes of every clip (12.5 per second), cached in the records
                data_facts     usable clips, longest clip, longest sample (instruction + codes + transcript + 8)
    finetune    planning       the planner's Kimi profile from config.json and the data facts (no weights)
                training_data  transcript ids; rejected: samples longer than the model's positions
                trainee        LoRA on the LLM's model.layers.* projections (28 × 7) or the full LLM; the audio
                               branch frozen and never computed; the Whisper encoder frozen
                datasets       both streams of every sample (common.families.kimi_audio.sample), the Whisper
                               features of every clip computed once, batches padded on the right
                save_final     the LLM with LoRA merged, in the checkpoint's dtype, beside every other file of
                               the pretrained folder (config, tokenizer, whisper-large-v3/, speech tokenizer)
    export      export         the original layout, loadable offline (common.families.kimi_audio.export)
    evaluate    open_engine    batched greedy decoding of the text stream (common.families.kimi_audio.engines)

Settings the family reads (the stage's settings as a mapping): pretrained's ``speech_tokenizer``; finetune's
``lora_*``, ``merge_alpha``, ``seed``; the instruction is 「请把这段语音转录成文本。」 in training and evaluation alike.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.core.stage import StageFailed, cache_dir
from common.families import Built, FrontEnd, Planning

if TYPE_CHECKING:
    from common.training.planner import Plan

log = logging.getLogger(__name__)

name = "kimi-audio"
SPEECH_TOKENIZER = "glm-4-voice-tokenizer"  # the speech tokenizer's subfolder inside model/
CODES_KEY = "speech_codes"  # a record's GLM-4-Voice codes, when extract cached them
CODES_META = "speech_codes.json"  # extract/: the speech tokenizer the cached codes come from
STANDIN_NAME = "kimi-audio-tiny"
STANDIN_REVISION = 1  # bump when the stand-in's construction changes (its cache folder follows)
STANDIN_NOTE = ("a random stand-in built in code (real vocabulary layout and token ids, tiny widths): every "
                "transcript and CER it produces is meaningless; it exists to run the pipeline")
DOWNLOAD_HINT = ("Download both folders on a machine with hub access (hf download moonshotai/Kimi-Audio-7B-Instruct "
                 "--local-dir Kimi-Audio-7B-Instruct; hf download THUDM/glm-4-voice-tokenizer --local-dir "
                 "glm-4-voice-tokenizer), put them where this machine reads them (a folder, a PVC, s3://), and pass "
                 "--model and --speech-tokenizer.")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # 28 layers × 7
WEIGHT_SUFFIXES = (".safetensors", ".bin")
FEATURE_DTYPE = "float16"  # cached Whisper features: (n, 5120) per clip, half the RAM of fp32


# --- pretrained -----------------------------------------------------------------------------------------


def _bundled_tiny() -> tuple[Path, dict[str, Any]]:
    from common.core.files import atomic_dir
    from common.families.kimi_audio.standin import build_standin

    folder = cache_dir() / "models" / f"{STANDIN_NAME}-r{STANDIN_REVISION}"
    if not (folder / "config.json").is_file():
        with atomic_dir(folder) as tmp:
            build_standin(tmp, seed=0)
    log.warning("bundled:%s is %s", STANDIN_NAME, STANDIN_NOTE)
    return folder, {"resolved_source": f"built in code (stand-in revision {STANDIN_REVISION}, seed 0)",
                    "license": "none: random weights", "bundled": STANDIN_NAME}


bundled = {STANDIN_NAME: _bundled_tiny}


def bundled_fingerprint(model: str) -> dict[str, Any]:
    return {"standin_revision": STANDIN_REVISION}


def _link_tree(src: Path, dest: Path) -> None:
    """Copy a folder tree, hard-linking files where the file system allows (a 20 GB model is not copied twice)."""
    for path in sorted(src.rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def materialize(source: Path, facts: dict[str, Any], dest: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check the Kimi-Audio folder ``source`` and its speech tokenizer — every missing piece listed at once,
    before any weight is copied — then write them as ``dest`` (model/ with glm-4-voice-tokenizer/ inside)."""
    from common.core.models import fetch_model
    from common.core.settings import S3Settings
    from common.families.kimi_audio.conventions import WHISPER_SUBFOLDER, KimiAudioConfig
    from common.families.kimi_audio.folder import (
        CONFIG_FILE,
        STANDIN_FILE,
        glm_problems,
        llm_problems,
        problem_report,
        read_config,
        whisper_problems,
    )
    from common.families.kimi_audio.tokenizer import find_bpe_file

    ref = settings.get("speech_tokenizer")
    s3 = settings.get("s3")
    speech = fetch_model(ref, S3Settings(**s3) if isinstance(s3, Mapping) else s3)[0] if ref else \
        source / SPEECH_TOKENIZER
    config, problems = read_config(source / CONFIG_FILE)
    problems += llm_problems(source, config) + whisper_problems(source / WHISPER_SUBFOLDER, config)
    if not (speech / CONFIG_FILE).is_file():
        problems.append(f"no GLM-4-Voice speech tokenizer: {speech} has no config.json. Pass --speech-tokenizer "
                        "with the THUDM/glm-4-voice-tokenizer folder (local, s3:// or hf://)")
    else:
        problems += glm_problems(speech, config)
    if problems:
        raise StageFailed(problem_report(f"{facts.get('ref', source)} is not a usable Kimi-Audio model", problems,
                                         DOWNLOAD_HINT), exit_code=2)
    _link_tree(source, dest)
    if speech != dest / SPEECH_TOKENIZER and speech.resolve() != (source / SPEECH_TOKENIZER).resolve():
        shutil.rmtree(dest / SPEECH_TOKENIZER, ignore_errors=True)
        _link_tree(speech, dest / SPEECH_TOKENIZER)
    bpe = find_bpe_file(dest)
    config = KimiAudioConfig.from_json(dest / "config.json")
    standin = facts.get("bundled") == STANDIN_NAME or (dest / STANDIN_FILE).is_file()
    if standin:
        log.warning("the model is %s", STANDIN_NOTE)
    return {"conversion": "none (folder checked and copied)", "source_format": "kimi-audio",
            "model": {"model_type": "kimi-audio", "hidden_size": config.hidden_size,
                      "layers": config.num_hidden_layers, "vocab_size": config.vocab_size,
                      "text_tokenizer": bpe.source, "text_tokenizer_sha256": bpe.sha256,
                      "random_standin": standin}}


# --- extract --------------------------------------------------------------------------------------------


def _audio(rec: dict, run_dir: Path):
    from common.core.audio import load_audio
    from common.core.records import audio_location

    return load_audio(audio_location(rec, run_dir))[0]


def speech_tokenizer(model_dir: Path):
    """The model folder's GLM-4-Voice speech tokenizer."""
    from common.families.kimi_audio.glm_tokenizer import GlmSpeechTokenizer

    return GlmSpeechTokenizer.from_folder(Path(model_dir) / SPEECH_TOKENIZER)


def speech_codes(tokenizer: Any, audios: Sequence[Any], batch: int = 8) -> list[list[int]]:
    """GLM-4-Voice codes of 16 kHz clips (batched)."""
    out: list[list[int]] = []
    for start in range(0, len(audios), batch):
        out += tokenizer.encode(list(audios[start:start + batch]))
    return out


def front_end(model_dir: Path) -> FrontEnd:
    import json

    from common.core.models import folder_fingerprint
    from common.core.store import atomic_write_bytes

    folder = Path(model_dir) / SPEECH_TOKENIZER
    params = {"speech_tokenizer": folder_fingerprint(folder)[:16], "codes_per_second": 12.5}

    def write(records, run_dir, out_dir, split, rows):
        from tqdm import tqdm

        tokenizer = speech_tokenizer(model_dir)
        out = []
        for start in tqdm(range(0, len(records), rows), desc=f"GLM-4-Voice codes {split}", unit="shard"):
            chunk = records[start:start + rows]
            codes = speech_codes(tokenizer, [_audio(r, run_dir) for r in chunk])
            out += [{**r, CODES_KEY: c} for r, c in zip(chunk, codes, strict=True)]
        return out

    def write_meta(out_dir, extra):
        atomic_write_bytes(Path(out_dir) / CODES_META, json.dumps({"params": params, **extra}, indent=2,
                                                                  ensure_ascii=False).encode())

    return FrontEnd(params=params, bytes_per_clip=375 * 6, max_seconds=float("inf"), write=write,
                    write_meta=write_meta)


# --- finetune -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KimiExample:
    id: str
    transcript_ids: tuple[int, ...]
    n_codes: int
    length: int  # positions of its training sample (instruction + codes + transcript + 8)


def _instruction(model_dir: Path) -> list[int]:
    from common.families.kimi_audio.sample import DEFAULT_INSTRUCTION
    from common.families.kimi_audio.tokenizer import load_text_tokenizer

    return load_text_tokenizer(model_dir).encode(DEFAULT_INSTRUCTION)


def training_data(model_dir: Path, records: Sequence[dict]) -> tuple[list, list[dict]]:
    from common.core.audio import SAMPLE_RATE
    from common.core.records import transcript
    from common.families.kimi_audio.conventions import KimiAudioConfig, stacked_frames
    from common.families.kimi_audio.sample import DEFAULT_INSTRUCTION, sample_length
    from common.families.kimi_audio.tokenizer import load_text_tokenizer

    tokenizer = load_text_tokenizer(model_dir)
    limit = KimiAudioConfig.from_json(Path(model_dir) / "config.json").max_position_embeddings
    n_instruction = len(tokenizer.encode(DEFAULT_INSTRUCTION))
    examples, rejected = [], []
    for rec in records:
        ids = tuple(tokenizer.encode(transcript(rec)))
        n = len(rec[CODES_KEY]) if CODES_KEY in rec else stacked_frames(int(float(rec.get("duration") or 30.0)
                                                                              * SAMPLE_RATE))
        length = sample_length(n_instruction, n, len(ids))
        if length > limit:
            rejected.append({"id": rec["id"], "reason": f"the sample has {length} positions; the model holds {limit}"})
            continue
        examples.append(KimiExample(rec["id"], ids, n, length))
    return examples, rejected


def data_facts(model_dir: Path, records: Sequence[dict]) -> dict[str, Any]:
    examples, rejected = training_data(model_dir, records)
    by_id = {r["id"]: r for r in records}
    return {
        "clips": len(examples),
        "longest_seconds": max((float(by_id[e.id].get("duration") or 30.0) for e in examples), default=0.0),
        "longest_labels": max((len(e.transcript_ids) + 1 for e in examples), default=0),  # + end of transcript
        "longest_sequence": max((e.length for e in examples), default=0),
        "rejected": rejected,
    }


ASSUMED_CLIPS = 1000  # the data set size a plan made before `prepare` ran assumes (the pod re-plans on the real one)


def assumed_planning() -> tuple[dict[str, Any], dict[str, Any], str]:
    """(config, data facts, what was assumed) for planning before the run has any output: Kimi-Audio-7B's
    published shape and worst-case samples (30-s clips, 128-token transcripts), so the pod is not too small."""
    from common.families.kimi_audio.conventions import KIMI_AUDIO_7B, POSITIONS_PER_CHUNK
    from common.families.kimi_audio.sample import sample_length

    longest = sample_length(9, POSITIONS_PER_CHUNK, 128)  # 9 instruction ids, a full 30-s chunk of codes
    facts = {"clips": ASSUMED_CLIPS, "longest_seconds": 30.0, "longest_labels": 129, "longest_sequence": longest,
             "rejected": []}
    return KIMI_AUDIO_7B.model_dump(), facts, (f"Kimi-Audio-7B's published shape, {ASSUMED_CLIPS} clips of up to "
                                               f"30 s ({longest} positions)")


def planning(config: Mapping[str, Any], facts: Mapping[str, Any], settings: Mapping[str, Any]) -> Planning:
    from common.families.kimi_audio.conventions import KimiAudioConfig
    from common.families.kimi_audio.profile import profile_from_config

    kimi = KimiAudioConfig.from_dict(dict(config))
    seq = int(facts["longest_sequence"])
    return Planning(profile=profile_from_config(kimi, llm_seq_len=seq), n_samples=int(facts["clips"]),
                    fp32_weights=False,  # final/ is saved in the checkpoint's dtype: a bf16 LoRA base loses nothing
                    decisions=[("llm_sequence", seq, "the longest sample: instruction + speech codes + transcript "
                                                     "+ 8 fixed positions"),
                               ("whisper_encoder", "frozen", "its features are computed once per clip before "
                                                             "training; the GLM-4-Voice tokenizer ran in extract")])


def _trainee_module(model, owner, spec: dict[str, Any]):
    """The module the training loops train: the LLM (LoRA-wrapped or not) and its loss."""
    import torch

    class KimiTrainee(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.owner = owner  # holds the trainable weights: the peft model, or the LLM itself
            self._llm = [model]
            self.spec = spec

        @property
        def model(self):
            return self._llm[0]

        @property
        def checkpoint_meta(self) -> dict[str, Any]:
            return {"spec": self.spec}

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.model.gradient_checkpointing = True

        def forward(self, audio_ids, text_ids, speech_mask, whisper_features, attention_mask, position_ids,
                    labels=None):
            out = self.owner(audio_ids=audio_ids, text_ids=text_ids, speech_mask=speech_mask,
                             whisper_features=whisper_features, attention_mask=attention_mask,
                             position_ids=position_ids, labels=labels, return_logits=labels is None)
            return {"loss": out.loss, "logits": out.logits}

    return KimiTrainee()


def lora_target_names(model, targets: Sequence[str] = LORA_TARGETS) -> list[str]:
    """The LLM trunk's projections named in ``targets`` (default all seven: model.layers.{i}.self_attn.{q,k,v,o}_proj,
    .mlp.{gate,up,down}_proj): never the audio branch's same-named layers, never the Whisper encoder (not part of
    the LLM). StageFailed when ``targets`` names none of them."""
    from common.families.kimi_audio.profile import lora_target_regex

    try:
        pattern = re.compile(lora_target_regex(tuple(targets)))
    except ValueError:
        pattern = None
    names = [n for n, _ in model.named_modules() if pattern is not None and pattern.fullmatch(n)]
    if not names:
        raise StageFailed(f"LoRA targets {list(targets)} name no projection of the LLM's layers; choose from "
                          f"{list(LORA_TARGETS)} (--lora-targets)", exit_code=2)
    return names


def trainee(model_dir: Path, plan: Plan, settings: Mapping[str, Any]) -> Any:
    import torch

    from common.families.kimi_audio.model import load_pretrained

    dtype = getattr(torch, getattr(plan, "load_dtype", None) or "float32")  # the plan's (bf16 base for LoRA on GPUs)
    return trainee_of(load_pretrained(model_dir, dtype=dtype), plan, settings)


def trainee_of(model: Any, plan: Plan, settings: Mapping[str, Any]) -> Any:
    """The trainee of a model already in memory (``trainee`` loads it first): LoRA on the planned trunk
    projections (or every LLM weight for a full fine-tune), the audio branch frozen."""
    dtype = next(model.parameters()).dtype
    spec: dict[str, Any] = {"mode": plan.mode, "dtype": str(dtype).removeprefix("torch.")}
    if plan.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = plan.lora
        targets = lora_target_names(model, [t.split(".")[-1] for t in (lora.targets or LORA_TARGETS)])
        spec.update(r=lora.r, alpha=lora.alpha, modules=len(targets))
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=float(settings.get("lora_dropout", 0.05)),
                            target_modules=targets, bias="none")
        owner = get_peft_model(model, config)  # freezes every base weight
        if getattr(plan, "precision", None) == "bf16":
            # the loops run under bf16 autocast: peft would cast each adapter's input to its fp32 weights' dtype
            # (a full copy of the activations per projection, 196 on the 7B, and dropout in fp32) only for
            # autocast to cast it back for the matmul
            for module in owner.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = False
            spec["adapter_input"] = "as computed (bf16 autocast)"
    else:
        model.requires_grad_(True)
        owner = model
    model.freeze_audio_branch()  # never trained for ASR, whatever the mode
    trainable = sum(p.numel() for p in owner.parameters() if p.requires_grad)
    log.info("kimi-audio trainee: mode %s, %d trainable parameters%s", plan.mode, trainable,
             f", LoRA on {spec.get('modules')} trunk projections" if plan.mode == "lora" else "")
    return _trainee_module(model, owner, spec)


def whisper_features(model_dir: Path, audios: Sequence[Any]) -> list[Any]:
    """(n, 5120) Whisper-large-v3 features of each clip with the folder's frozen encoder."""
    import torch

    from common.families.kimi_audio.conventions import WHISPER_SUBFOLDER
    from common.families.kimi_audio.engines import load_whisper_encoder
    from common.families.kimi_audio.model import encode_clip

    encoder, fe = load_whisper_encoder(Path(model_dir) / WHISPER_SUBFOLDER, "cpu", torch.float32)
    with torch.no_grad():
        return [encode_clip(encoder, fe, a).to(getattr(torch, FEATURE_DTYPE)) for a in audios]


def collator(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """The training batch of items ``{"sample": KimiSample, "features": (n, 5120) tensor}``: both streams, masks
    and labels padded on the right (sample.collate), each row's features in ``whisper_features`` (B, max n,
    5120), fp32, zeros after the row's own frames."""
    import torch

    from common.families.kimi_audio.sample import collate

    out = collate([b["sample"] for b in batch], side="right")
    width = max(b["features"].shape[0] for b in batch)
    padded = torch.zeros(len(batch), width, batch[0]["features"].shape[1])
    for row, b in enumerate(batch):
        padded[row, : b["features"].shape[0]] = b["features"].float()
    out["whisper_features"] = padded
    return out


def datasets(model_dir: Path, trainee: Any, examples: tuple[list, list], records: Mapping[str, dict],
             dirs: Mapping[str, Path | None], plan: Plan, settings: Mapping[str, Any]) -> Built:
    from common.families.kimi_audio.sample import DEFAULT_INSTRUCTION, asr_sample

    instruction = _instruction(model_dir)
    every = [*examples[0], *examples[1]]
    audios = {e.id: _audio(records[e.id], dirs["run"]) for e in every}
    cached = all(CODES_KEY in records[e.id] for e in every)
    codes = {e.id: records[e.id][CODES_KEY] for e in every} if cached else dict(
        zip([e.id for e in every], speech_codes(speech_tokenizer(model_dir), [audios[e.id] for e in every]),
            strict=True))
    feats = dict(zip([e.id for e in every], whisper_features(model_dir, [audios[e.id] for e in every]), strict=True))

    def items(exs: list) -> list[dict[str, Any]]:
        samples = [asr_sample(codes[e.id], e.transcript_ids, instruction) for e in exs]
        return [{"sample": s, "features": feats[e.id], "input_ids": s.audio_ids}  # input_ids: its length, for
                for s, e in zip(samples, exs, strict=True)]                     # the length-grouped sampler

    return Built(
        train=items(examples[0]), eval=items(examples[1]) or None, collator=collator,
        decisions=[("speech_codes_source", "extract cache" if cached else "computed here",
                    "extract cached the GLM-4-Voice codes" if cached else
                    "extract did not cache them (one epoch): computed from the audio"),
                   ("instruction", DEFAULT_INSTRUCTION, "the same prompt in training and evaluation"),
                   ("length_grouping", True, "batches of samples of similar length: little padding, any batch size")],
        group_by_length=True,
        fast_path_blocker="the fast loop trains Hugging Face encoder-decoder models; Kimi-Audio trains through "
                          "the Trainer",
    )


def save_final(trainee: Any, out_dir: Path, model_dir: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """``out_dir``: the pretrained folder with the LLM's weights replaced by the trained ones (LoRA merged;
    ``merge_alpha`` < 1 pulls them back toward the pretrained ones), in the checkpoint's own dtype."""
    import torch
    from safetensors.torch import save_file

    from common.core.files import atomic_dir
    from common.families.kimi_audio.folder import llm_weight_files, read_header
    from common.training.merge import interpolate_weights

    owner = trainee.owner
    model = owner.merge_and_unload() if hasattr(owner, "merge_and_unload") else trainee.model
    alpha = float(settings.get("merge_alpha", 1.0))
    if alpha != 1.0:
        interpolate_weights(model, model_dir, {"llm": alpha}, lambda name: "llm")
    files, _ = llm_weight_files(model_dir)
    stored = {dtype for path in files for dtype, _ in read_header(path)[0].values()}
    dtype = torch.bfloat16 if "BF16" in stored else torch.float16 if "F16" in stored else torch.float32
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
             if not k.endswith("rotary_emb.inv_freq")}
    with atomic_dir(out_dir) as tmp:
        for path in sorted(Path(model_dir).iterdir()):  # everything but the LLM's weights, as pretrained has it
            if path.name == "model.safetensors.index.json" or (path.is_file() and path.suffix in WEIGHT_SUFFIXES):
                continue
            if path.is_dir():
                _link_tree(path, tmp / path.name)
            else:
                shutil.copy2(path, tmp / path.name)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return {"path": out_dir.name, "merge_alpha": alpha, "dtype": str(dtype).removeprefix("torch."),
            "params": sum(v.numel() for v in state.values())}


# --- export and evaluate ----------------------------------------------------------------------------------


def export(source: Path, out_dir: Path, donor: Path | None, settings: Mapping[str, Any], clip: Any) -> dict[str, Any]:
    from common.families.kimi_audio import export as exporting

    return exporting.export(source, out_dir, donor, settings, clip)


def open_engine(folder: Path, request: Any) -> tuple[Any, dict[str, Any]]:
    from common.families.kimi_audio import engines

    return engines.open_engine(folder, request)
