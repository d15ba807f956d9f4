#!/usr/bin/env python3
"""Check a real Kimi-Audio checkpoint with asr-ft's own code, on a machine that has the weights.

    python scripts/check_kimi_checkpoint.py --model Kimi-Audio-7B-Instruct --speech-tokenizer glm-4-voice-tokenizer \\
        [--example asr_example.wav --expect "这并不是告别，这是一个篇章的结束，也是新篇章的开始。"] \\
        [--test-csv test/transcripts.csv --test-audio test/audio [--finetuned runs/exp/export]] [--device cuda]

Reads: the downloaded model folder (moonshotai/Kimi-Audio-7B-Instruct: config.json, the LLM safetensors,
tiktoken.model, whisper-large-v3/) and the GLM-4-Voice tokenizer folder (THUDM/glm-4-voice-tokenizer); an
optional example clip with its expected transcript (upstream's README ASR example); an optional public test set
(a CSV of audio_id,text and its audio folder, e.g. AISHELL-1 test) and an optional fine-tuned export folder.

Does, in order, stopping at the first failure with what to fix:
1. strict checks of every file against the configuration from the safetensors headers, then a strict load of
   the LLM (every key and shape), the Whisper encoder and the speech tokenizer;
2. the text tokenizer: the folder's tiktoken.model and its sha256 beside the pinned stand-in's;
3. the example clip transcribed with the evaluation prompt 「请把这段语音转录成文本。」, and its CER to --expect;
4. with a test set: `asr-ft evaluate` of the pretrained model (and --finetuned) on it: CER before and after.

Writes: ``<artifacts>/kimi-check/model/`` (the checked folder with the speech tokenizer inside, hard-linked
where possible, so step 4 evaluates exactly what was checked) and `asr-ft evaluate`'s run under --artifacts.
Needs no network: set HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", type=Path, required=True, help="the Kimi-Audio-7B(-Instruct) folder")
    parser.add_argument("--speech-tokenizer", type=Path, required=True, help="the glm-4-voice-tokenizer folder")
    parser.add_argument("--example", type=Path, help="a clip to transcribe (e.g. upstream's asr_example.wav)")
    parser.add_argument("--expect", help="its expected transcript")
    parser.add_argument("--test-csv", type=Path, help="a test set's transcripts (audio_id,text)")
    parser.add_argument("--test-audio", type=Path, help="the test set's audio folder")
    parser.add_argument("--finetuned", type=Path, help="an `asr-ft export` folder to compare with")
    parser.add_argument("--device", default="cuda", help="cuda (bf16) or cpu (fp32; slow for 10 B)")
    parser.add_argument("--artifacts", type=Path, default=Path("runs"), help="where step 4's evaluate run goes")
    args = parser.parse_args(argv)

    from common.core.audio import load_audio
    from common.core.metrics import utterance_errors
    from common.core.models import resolve_model_ref
    from common.families.kimi_audio.engines import KimiEngine
    from common.families.kimi_audio.tokenizer import STANDIN_SHA256, find_bpe_file

    folder = args.artifacts / "kimi-check" / "model"
    print("1. checking every file and loading strictly …", flush=True)
    provenance = resolve_model_ref(str(args.model), "kimi-audio", folder,
                                   settings={"speech_tokenizer": str(args.speech_tokenizer)})
    engine = KimiEngine(folder, device=args.device)
    print(f"   ok: {provenance['model']}")
    bpe = find_bpe_file(folder)
    print(f"2. text tokenizer: {bpe.source} sha256 {bpe.sha256} (pinned stand-in {STANDIN_SHA256}: "
          f"{'identical' if bpe.sha256 == STANDIN_SHA256 else 'different'})")
    if args.example:
        text = engine.transcribe([load_audio(args.example)[0]])[0]
        print(f"3. {args.example.name}: {text}")
        if args.expect:
            print(f"   CER to the expected transcript: {100 * utterance_errors(args.expect, text)['cer']:.1f} %")
    del engine
    if args.test_csv:
        models = [f"pretrained={folder}"] + ([f"finetuned={args.finetuned}"] if args.finetuned else [])
        cmd = [sys.executable, "-m", "jobs.evaluate", "--family", "kimi-audio", "--artifacts", str(args.artifacts),
               "--run-id", "kimi-check", "--test-csv", str(args.test_csv), "--test-audio-dir", str(args.test_audio),
               "--set-name", "test", "--device", args.device, "--force"]
        for m in models:
            cmd += ["--model", m]
        print("4. " + " ".join(cmd), flush=True)
        if subprocess.call(cmd) != 0:
            return 1
        metrics = json.loads((args.artifacts / "kimi-check" / "evaluate" / "metrics.json").read_text())
        for name, sets in metrics.items():
            print(f"   {name}: CER {100 * sets['test']['cer']:.2f} % on {sets['test']['n']} utterances")
    return 0


if __name__ == "__main__":
    sys.exit(main())
