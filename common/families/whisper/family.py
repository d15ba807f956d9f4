"""The whisper family: what each stage asks of a Whisper model (the protocol of common/families/__init__.py).

    pretrained  materialize      bundled:whisper-base, HF, CTranslate2 or export folders → an HF Whisper folder
    extract     front_end        log-mel (float16 cache) with the model's own feature extractor
                data_facts       usable clips, longest clip and longest label sequence (what planning needs)
    finetune    planning         memory profile from config.json + the training window (no weights loaded)
                training_data    label tokens: <|sot|><|zh|><|transcribe|><|notimestamps|> text <|endoftext|>
                trainee          full / freeze-encoder / LoRA, frozen encoder bottom (common.families.whisper.trainee)
                datasets         log-mel from extract's cache or the audio, frozen-bottom cache, packed windows
                save_final       LoRA merged, per-part WiSE-FT (encoder / decoder), zh/transcribe generation config
    export      export           HF folder + CTranslate2 copy, both decoded offline once
    evaluate    open_engine      CTranslate2 (CPU) or transformers (GPU) with the same prompt and settings

The stage settings a family reads (``settings`` below is the stage's settings as a mapping): finetune's
context_seconds, pack_clips, pack_gap_seconds, encoder_cache, frozen_encoder_layers, lora_*, label_smoothing,
merge_alpha(_encoder/_decoder), seed; export's quantization.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.core.stage import StageFailed, cache_dir
from common.families import Built, Candidate, EngineRequest, FamilyError, FrontEnd, Planning
from common.families.whisper import model as folders
from common.families.whisper.conventions import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_TARGET_POSITIONS,
    N_FRAMES,
    PROMPT_TOKENS,
)

if TYPE_CHECKING:
    from common.training.planner import Plan

log = logging.getLogger(__name__)

name = "whisper"
bundled = {"whisper-base": folders.bundled_whisper_base}
bundled_fingerprint = folders.bundled_fingerprint
materialize = folders.materialize
CT2_CACHE_QUANTIZATION = "float32"  # HF → CT2 conversions for evaluation keep every weight; compute_type decides


def _processor(model_dir: Path):
    from transformers import AutoTokenizer

    from common.families.whisper.data import feature_extractor_for

    return AutoTokenizer.from_pretrained(str(model_dir)), feature_extractor_for(model_dir)


# --- extract --------------------------------------------------------------------------------------------


def front_end(model_dir: Path) -> FrontEnd:
    from common.families.whisper import data
    from common.families.whisper.conventions import CHUNK_SECONDS

    fe = data.feature_extractor_for(model_dir)
    return FrontEnd(
        params=data.feature_params(fe),
        bytes_per_clip=data.cache_bytes(1, fe.feature_size),
        max_seconds=CHUNK_SECONDS,
        write=lambda records, run_dir, out_dir, split, rows: data.write_feature_cache(records, run_dir, fe, out_dir,
                                                                                      split, rows),
        write_meta=lambda out_dir, extra: data.write_features_meta(out_dir, fe, extra),
    )


def training_data(model_dir: Path, records: Sequence[dict]) -> tuple[list, list[dict]]:
    """(examples, rejected): each record's decoder input and labels; transcripts too long for the decoder
    are rejected with the reason."""
    from common.families.whisper.data import make_examples, prompt_ids

    tokenizer, _ = _processor(model_dir)
    return make_examples(records, tokenizer, prompt_ids(tokenizer))


def data_facts(model_dir: Path, records: Sequence[dict]) -> dict[str, Any]:
    examples, rejected = training_data(model_dir, records)
    by_id = {r["id"]: r for r in records}
    return {
        "clips": len(examples),
        "longest_seconds": max((float(by_id[e.id].get("duration") or 30.0) for e in examples), default=0.0),
        "longest_labels": max((len(e.labels) for e in examples), default=0),
        "rejected": rejected,
    }


# --- finetune -------------------------------------------------------------------------------------------


def _window(facts: Mapping[str, Any], s: Mapping[str, Any]) -> tuple[int, int, int, str]:
    """(log-mel frames of the training window, samples per epoch, longest decoder sequence, why)."""
    from common.families.whisper.data import context_frames

    pack, clips = int(s.get("pack_clips") or 1), int(facts["clips"])
    if pack > 1:
        n_samples = -(-clips // pack)
        return N_FRAMES, n_samples, min(MAX_TARGET_POSITIONS, facts["longest_labels"] * pack), (
            f"full 30-s windows, each packing up to {pack} clips ({n_samples} windows per epoch for {clips} clips)")
    frames, why = context_frames(float(s.get("context_seconds") or 30.0), float(facts["longest_seconds"]))
    return frames, clips, int(facts["longest_labels"]), why


def planning(config: Mapping[str, Any], facts: Mapping[str, Any], settings: Mapping[str, Any]) -> Planning:
    from common.families.whisper.profile import profile_from_hf_config

    frames, n_samples, longest_labels, why = _window(facts, settings)
    profile = profile_from_hf_config(config, decoder_seq_len=longest_labels).with_seq_lens(encoder=frames // 2)
    return Planning(profile=profile, n_samples=n_samples,
                    decisions=[("train_context_seconds", frames / 100, why),
                               ("pack_clips", int(settings.get("pack_clips") or 1),
                                "clips joined into one 30-s window" if (settings.get("pack_clips") or 1) > 1
                                else "one clip per window")])


def trainee(model_dir: Path, plan: Plan, settings: Mapping[str, Any]) -> Any:
    """The Whisper model in float32 (master weights), frozen / wrapped as the plan's mode says."""
    import torch
    from transformers import WhisperForConditionalGeneration

    from common.families.whisper.trainee import ModeSpec, make_trainee
    from common.training.trainer import TrainError

    s, lora = settings, plan.lora
    spec = ModeSpec(
        mode=plan.mode, frozen_encoder_layers=int(s.get("frozen_encoder_layers") or 0),
        lora_r=lora.r if lora else s.get("lora_r", 16), lora_alpha=lora.alpha if lora else s.get("lora_alpha"),
        lora_dropout=float(s.get("lora_dropout", 0.05)),
        lora_targets=tuple(s.get("lora_targets") or lora.targets) if lora else (),
        lora_parts=tuple(lora.parts or ("encoder", "decoder")) if lora else (),
        lora_encoder_layers=s.get("lora_encoder_layers") if lora else None,
        label_smoothing=float(s.get("label_smoothing") or 0.0),
    )
    model = WhisperForConditionalGeneration.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    try:
        return make_trainee(model, spec)
    except TrainError as e:
        raise StageFailed(f"cannot set up the training: {e}", exit_code=2) from None


def datasets(model_dir: Path, trainee: Any, examples: tuple[list, list], records: Mapping[str, dict],
             dirs: Mapping[str, Path | None], plan: Plan, settings: Mapping[str, Any]) -> Built:
    """Datasets of log-mel (or cached encoder-bottom output) + labels, and the collator.

    ``dirs``: ``extract`` (its cache), ``run`` (the run folder: records' audio paths are relative to it)."""
    import psutil

    from common.core.records import transcript
    from common.families.whisper.data import (
        FeatureSource,
        PackedWhisperDataset,
        WhisperCollator,
        WhisperDataset,
        cache_matches,
        clip_samples,
        prompt_ids,
    )
    from common.families.whisper.trainee import cache_pays, encode_frozen, frozen_bottom_cacheable

    s = settings
    train_ex, eval_ex = examples
    every = [*train_ex, *eval_ex]
    tokenizer, fe = _processor(model_dir)
    facts = {"clips": len(every), "longest_labels": max(len(e.labels) for e in every),
             "longest_seconds": max(float(records[e.id].get("duration") or 30.0) for e in every)}
    frames, _, _, _ = _window(facts, s)
    pack = int(s.get("pack_clips") or 1)
    ext, run_dir = dirs["extract"], dirs["run"]
    use_mel_cache, mel_reason = cache_matches(ext, fe)
    needs_audio = not use_mel_cache or any("features" not in records[e.id] for e in every)
    features = FeatureSource(fe, run_dir if needs_audio else None, ext if use_mel_cache else None)
    bytes_per_clip = frames // 2 * trainee.model.config.d_model * 4
    cache_on, cache_reason = cache_pays(
        s.get("encoder_cache", "auto"), frozen_bottom_cacheable(trainee), plan.schedule.epochs,
        len(every), bytes_per_clip, psutil.virtual_memory().available,
    )
    if pack > 1:
        cache_on, cache_reason = False, "packed windows are regrouped every epoch: nothing fixed to cache"

    def dataset(exs: list):
        def mel_of(i: int):
            return features(records[exs[i].id])[:, :frames]

        if pack > 1:
            audio = [clip_samples(records[e.id], run_dir) for e in exs]
            return PackedWhisperDataset(exs, [transcript(records[e.id]) for e in exs], audio.__getitem__, fe,
                                        tokenizer, prompt_ids(tokenizer), pack, float(s.get("pack_gap_seconds", 0.3)),
                                        int(s.get("seed") or 0))
        if not cache_on:
            return WhisperDataset(exs, mel_of, "input_features")
        hidden = encode_frozen(trainee, mel_of, len(exs), device=plan.device)
        return WhisperDataset(exs, lambda i: hidden[i], "encoder_hidden")

    return Built(
        train=dataset(train_ex), eval=dataset(eval_ex) if eval_ex else None,
        collator=WhisperCollator(trainee.model.config.pad_token_id),
        decisions=[
            ("frozen_encoder_layers", trainee.frozen_layers,
             "the whole encoder" if trainee.spec.mode == "freeze-encoder" else "requested (frozen_encoder_layers)"),
            ("log_mel_source", "extract cache" if use_mel_cache else "audio",
             ("extract's float16 cache: " if use_mel_cache else "computed from audio: ") + mel_reason),
            ("encoder_cache", cache_on, cache_reason),
        ],
        regroup_each_epoch=pack > 1,
        fast_path_blocker=("pack_clips > 1: packed windows are regrouped every epoch by a Trainer callback"
                           if pack > 1 else None),
    )


def merge_alpha(settings: Mapping[str, Any]) -> dict[str, float]:
    from common.training.merge import merge_factors

    return merge_factors(float(settings.get("merge_alpha", 1.0)), encoder=settings.get("merge_alpha_encoder"),
                         decoder=settings.get("merge_alpha_decoder"))


def save_final(trainee: Any, out_dir: Path, model_dir: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    from common.families.whisper.trainee import save_final as save

    tokenizer, fe = _processor(model_dir)
    return save(trainee, out_dir, tokenizer, fe, model_dir, merge_alpha(settings))


# What the forgetting guard tries, by the parts that trained: (encoder, decoder) shares of the training's change
# kept, trained furthest first. The decoder holds the language model, where forgetting mostly lives, so the
# grid pulls it back harder than the encoder; few candidates keep the guard's CPU cost small.
DEFAULT_MERGE_CANDIDATES = {
    ("encoder", "decoder"): ((1.0, 1.0), (1.0, 0.5), (0.8, 0.25), (0.6, 0.0)),
    ("encoder",): ((1.0, 1.0), (0.8, 1.0), (0.6, 1.0), (0.4, 1.0)),
    ("decoder",): ((1.0, 1.0), (1.0, 0.5), (1.0, 0.25), (1.0, 0.1)),
}


def candidates(trainee: Any, model_dir: Path, settings: Mapping[str, Any]) -> list[Candidate]:
    """WiSE-FT merges of the trained model (``merge_candidates`` as ENCODER/DECODER, else the default grid for
    the parts that trained), for finetune's forgetting guard."""
    from common.families.whisper.trainee import merge_writer, trained_parts

    parts = trained_parts(trainee.spec)
    given = settings.get("merge_candidates")
    grid = ([tuple(float(x) for x in str(v).split("/")) for v in given] if given
            else DEFAULT_MERGE_CANDIDATES[parts])
    tokenizer, fe = _processor(model_dir)
    write = merge_writer(trainee, tokenizer, fe, model_dir)
    out, seen = [], set()
    for enc, dec in grid:
        key = (enc if "encoder" in parts else 1.0, dec if "decoder" in parts else 1.0)  # an untrained part: no-op
        if key in seen:
            continue
        seen.add(key)
        factors = {"encoder": key[0], "decoder": key[1]}
        out.append(Candidate(
            name=f"merge-enc{key[0]:g}-dec{key[1]:g}",
            description=f"WiSE-FT: {key[0]:.0%} of the encoder's and {key[1]:.0%} of the decoder's change kept"
                        + ("" if len(parts) == 2 else f" (only the {parts[0]} trained)"),
            write=lambda dest, f=factors: write(f, dest), params={"merge_alpha": factors}))
    return out


# --- export ---------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "normalizer.json",
                   "added_tokens.json", "special_tokens_map.json", "preprocessor_config.json", "processor_config.json")
VERIFY_MAX_NEW_TOKENS = 16  # enough to show the model says something; the point is "loads and decodes"


def _with_tokenizer(src: Path, donor: Path | None, work: Path) -> Path:
    """``src``, or a linked copy completed with the donor model's tokenizer/feature-extractor files."""
    if (src / "tokenizer_config.json").is_file() and any(
            (src / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")):
        return src
    if donor is None:
        raise StageFailed(f"{src} has no tokenizer/feature-extractor files and the run has no pretrained model to "
                          f"take them from; save them next to the weights (processor.save_pretrained).",
                          exit_code=2)
    staged = work / "source"
    staged.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (staged / p.name).symlink_to(p.resolve())
    for file in TOKENIZER_FILES:
        if (donor / file).is_file() and not (staged / file).exists():
            (staged / file).symlink_to((donor / file).resolve())
    log.info("export: %s lacks tokenizer files; using those of %s", src, donor)
    return staged


def check_trained_folder(src: Path) -> None:
    """StageFailed unless ``src`` is a Hugging Face Whisper folder export can take."""
    if folders.folder_format_or_none(src) != "hf":
        raise StageFailed(
            f"{src}: not a Hugging Face Whisper folder ({folders.describe_folder_problem(src)}). Export takes "
            f"finetune's final/ or a merged checkpoint folder; a LoRA adapter alone must be merged first "
            f"(finetune does).", exit_code=2,
        )


def export(source: Path, out_dir: Path, donor: Path | None, settings: Mapping[str, Any], clip: Any) -> dict[str, Any]:
    """``out_dir/model`` (Hugging Face) and ``out_dir/ct2`` (CTranslate2, ``settings["quantization"]``), both
    published whole; with a ``clip``, both are loaded with the network off and decode it."""
    from common.core.files import atomic_dir
    from common.core.models import weight_digests
    from common.families.whisper.ct2 import export_hf_to_ct2

    check_trained_folder(source)
    model_dir, ct2_dir = out_dir / "model", out_dir / "ct2"
    with tempfile.TemporaryDirectory(prefix="asrft-export-") as work:
        src = _with_tokenizer(source, donor, Path(work))
        with atomic_dir(model_dir) as staged:
            folders.copy_hf_folder(src, staged)
            facts = folders.validate_hf_folder(staged)
    t0 = time.perf_counter()
    export_hf_to_ct2(model_dir, ct2_dir, settings["quantization"])
    info: dict[str, Any] = {"quantization": settings["quantization"], "model": facts,
                            "hf_weights": weight_digests(model_dir), "ct2_weights": weight_digests(ct2_dir),
                            "ct2_convert_seconds": round(time.perf_counter() - t0, 2)}
    if clip is not None:
        info["verification"] = verify_offline(model_dir, ct2_dir, clip)
    return info


def verify_offline(model_dir: Path, ct2_dir: Path, clip: Any) -> dict[str, Any]:
    """Load both folders with the hub switched off and decode ``clip``; StageFailed when either fails."""
    from faster_whisper import WhisperModel

    from common.core.settings import environment
    from common.families.whisper.engines import DecodeOptions, HFEngine

    out: dict[str, Any] = {}
    with environment({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}):
        try:
            t0 = time.perf_counter()  # transformers, with the prompt tokens given explicitly (as evaluate does)
            engine = HFEngine(model_dir, DecodeOptions(max_new_tokens=VERIFY_MAX_NEW_TOKENS), device="cpu")
            out["hf"] = {"text": engine.transcribe([clip])[0], "seconds": round(time.perf_counter() - t0, 3)}
            del engine
            t0 = time.perf_counter()
            fw = WhisperModel(str(ct2_dir), device="cpu", compute_type="default", local_files_only=True)
            segments, _ = fw.transcribe(clip, language="zh", task="transcribe", beam_size=1, temperature=0.0,
                                        without_timestamps=True, condition_on_previous_text=False,
                                        max_new_tokens=VERIFY_MAX_NEW_TOKENS)
            out["ct2"] = {"text": "".join(s.text for s in segments).strip(),
                          "seconds": round(time.perf_counter() - t0, 3)}
        except Exception as e:  # any failure to load or decode offline is the export's failure
            raise StageFailed(f"export verification failed: the exported folders do not load/decode offline "
                              f"({type(e).__name__}: {e})") from e
    return out


# --- evaluate -------------------------------------------------------------------------------------------


def _cached(kind: str, source: Path, build) -> Path:
    """A conversion of ``source`` kept in the cache, keyed by the source's content."""
    from common.core.models import folder_fingerprint

    dest = cache_dir() / "evaluate" / f"{kind}-{folder_fingerprint(source)[:20]}"
    if not folders.folder_format_or_none(dest):
        log.info("evaluate: converting %s → %s (%s; cached for later runs)", source, dest, kind)
        build(source, dest)
    return dest


def _hf_to_ct2(source: Path, dest: Path) -> None:
    from common.families.whisper.ct2 import export_hf_to_ct2

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "hf"  # never modify the user's folder: add preprocessor_config.json to a copy of links
        staged.mkdir()
        for p in source.iterdir():
            if p.is_file():
                (staged / p.name).symlink_to(p.resolve())
        folders.ensure_preprocessor_config(staged)
        dest.parent.mkdir(parents=True, exist_ok=True)
        export_hf_to_ct2(staged, dest, CT2_CACHE_QUANTIZATION)


def open_engine(folder: Path, request: EngineRequest) -> tuple[Any, dict[str, Any]]:
    """(engine, what was loaded): CTranslate2 (``ct2``, the CPU default) or transformers (``hf``, the GPU
    default), converting the folder in the cache when it is in the other format."""
    from common.families.whisper.engines import CT2Engine, DecodeOptions, HFEngine

    backend = request.backend if request.backend != "auto" else ("hf" if request.device == "cuda" else "ct2")
    if backend not in ("ct2", "hf"):
        raise FamilyError(f"backend {backend!r}: the whisper family decodes with ct2 (CTranslate2) or hf "
                          "(transformers)")
    max_new = request.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if not 1 <= max_new <= MAX_TARGET_POSITIONS - len(PROMPT_TOKENS):
        raise FamilyError(f"max_new_tokens {max_new}: a Whisper decoder holds at most "
                          f"{MAX_TARGET_POSITIONS - len(PROMPT_TOKENS)} tokens after its prompt")
    path, fmt = folders.inference_folder(folder, prefer=backend)
    used: dict[str, Any] = {"source_format": fmt, "backend": backend}
    if backend == "ct2" and fmt == "hf":
        path = _cached("ct2", path, _hf_to_ct2)
        used["conversion"] = f"Hugging Face → CTranslate2 ({CT2_CACHE_QUANTIZATION}, cached)"
    elif backend == "hf" and fmt == "ct2":
        path = _cached("hf", path, folders.convert_ct2_to_hf)
        used["conversion"] = "CTranslate2 → Hugging Face (cached)"
    used["folder"] = str(path)
    options = DecodeOptions(beam_size=request.beam_size, max_new_tokens=max_new)
    if backend == "ct2":
        engine = CT2Engine(path, options, device=request.device, compute_type=request.compute_type,
                           threads=request.threads)
    else:
        engine = HFEngine(path, options, device=request.device)
    engine.info["decoding"] = options.as_dict()
    return engine, used

