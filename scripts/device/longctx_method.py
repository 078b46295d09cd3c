#!/usr/bin/env python3
"""Long-context method ablation on the GPU (issue "Converted models keep the original's
long-context ability"): one change at a time, measured with longctx-smollm2-v1.

    PYTHONUNBUFFERED=1 python3 scripts/device/longctx_method.py --out out/lc --export "$OUT"

Steps (each cached in --out, so a second command continues):
  original      wikitext2-smollm2-v1, long-window ppl (5 x 4096) and passkey-v1 of the original
  convert       the default model at --saving with each calibration variant of --variants:
                  short: calibration as today (8192 tokens of [0, 32768) in 512-token windows)
                  long:  all 32768 calibration tokens in 4096-token windows (the RoPE key and the
                         NoPE rotation expectations then see distances up to 4096)
  heal          `mlakit heal` of the --heal-variant at --heal-seq-len (teacher text in windows of
                that length; KL over every position), capped by --heal-minutes
  table         every model's wikitext2 / long-window / passkey, with the protocol names

The long-window ppl and passkey here follow ../shared/PROTOCOL.md; passkey runs through
mlakit.engine.generate (cache, absorbed MLA decode, the kernels on CUDA).
``--smoke`` runs a tiny random model on the CPU (tests/test_device_scripts.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

LONG_WINDOWS, LONG_LEN = 5, 4096
PASSKEY_LENGTHS = (1024, 4096, 7680)
PASSKEY_TRIALS = 20
FILLER = "The quick brown fox jumps over the lazy dog, and the day goes on. "
HEADER = "Below is a long text. Somewhere in it is a secret number.\n"
QUESTION = "\nQuestion: what is the secret number?\nAnswer: the secret number is"


def log(msg: str) -> None:
    print(msg, flush=True)


@torch.inference_mode()
def long_window_ppl(model, tokens: torch.Tensor, windows: int = LONG_WINDOWS, length: int = LONG_LEN,
                    start: int = 131072) -> tuple[float, list[float]]:
    """longctx-smollm2-v1 long-window ppl: ``windows`` x ``length`` tokens from ``start``, each
    from an empty cache; also the mean NLL per distance bucket [0,512), [512,1024), [1024,2048), [2048,L)."""
    import torch.nn.functional as F

    edges = [0, 512, 1024, 2048, length - 1]
    nll_sum, buckets = 0.0, [0.0] * (len(edges) - 1)
    for w in range(windows):
        window = tokens[start + w * length: start + (w + 1) * length].to(model.device)[None]
        logits = model(window[:, :-1]).float()[0]  # [L-1, vocab]
        nll = F.cross_entropy(logits, window[0, 1:], reduction="none").double().cpu()  # [L-1]
        nll_sum += float(nll.sum())
        for i in range(len(buckets)):
            buckets[i] += float(nll[edges[i]:edges[i + 1]].sum())
    n = windows * (length - 1)
    per_bucket = [buckets[i] / (windows * (edges[i + 1] - edges[i])) for i in range(len(buckets))]
    return float(torch.exp(torch.tensor(nll_sum / n, dtype=torch.float32))), per_bucket


def passkey_prompt(tokenizer, n_tokens: int, trial: int) -> tuple[list[int], int]:
    """passkey-v1 prompt ids of about ``n_tokens`` tokens (within 16) and its key."""
    key = random.Random(trial).randint(10000, 99999)
    depth = trial / (PASSKEY_TRIALS - 1)
    needle = f"Remember this: the secret number is {key}. "

    def build(repeats: int) -> list[int]:
        at = round(depth * repeats)
        text = HEADER + FILLER * at + needle + FILLER * (repeats - at) + QUESTION
        return tokenizer(text, add_special_tokens=False).input_ids

    per = max(1, len(tokenizer(FILLER * 8, add_special_tokens=False).input_ids) // 8)
    repeats = max(0, (n_tokens - len(build(0))) // per)
    ids = build(repeats)
    while len(ids) > n_tokens and repeats > 0:
        repeats -= 1
        ids = build(repeats)
    while len(build(repeats + 1)) <= n_tokens:
        repeats += 1
        ids = build(repeats)
    return ids, key


@torch.inference_mode()
def passkey(model, tokenizer, lengths=PASSKEY_LENGTHS, trials: int = PASSKEY_TRIALS, batch: int = 10) -> dict:
    from mlakit.engine import SamplingParams, generate

    result = {}
    for n in lengths:
        prompts = [passkey_prompt(tokenizer, n, i) for i in range(trials)]
        hits = 0
        for i in range(0, trials, batch):
            chunk = prompts[i:i + batch]
            outs = generate(model, [ids for ids, _ in chunk],
                            SamplingParams(max_new_tokens=8, greedy=True, stop_token_ids=[]))
            hits += sum(str(key) in tokenizer.decode(out) for out, (_, key) in zip(outs, chunk))
        result[n] = dict(share=hits / trials, prompt_tokens=len(prompts[0][0]))
    return result


def evaluate_all(path: str, device: str, smoke: bool) -> dict:
    from mlakit.evaluate import evaluate, protocol_tokens
    from mlakit.loading import load

    start = time.perf_counter()
    loaded = load(path, dtype=torch.float32, device=device)
    wiki = evaluate(loaded, progress=False)
    tokens = protocol_tokens(loaded.tokenizer)
    windows, length = (1, 256) if smoke else (LONG_WINDOWS, LONG_LEN)
    long_ppl, buckets = long_window_ppl(loaded.model, tokens, windows, length)
    keys = passkey(loaded.model, loaded.tokenizer, (128,) if smoke else PASSKEY_LENGTHS, 2 if smoke else PASSKEY_TRIALS)
    return dict(model=path, wikitext2=wiki.ppl, long_window=long_ppl, nll_by_distance=buckets,
                passkey={str(k): v["share"] for k, v in keys.items()},
                passkey_tokens={str(k): v["prompt_tokens"] for k, v in keys.items()},
                kv_saving=wiki.kv_saving, seconds=time.perf_counter() - start)


CALIB = {"short": dict(calib_tokens=8192, calib_seq_len=512, batch_size=4),
         "long": dict(calib_tokens=None, calib_seq_len=4096, batch_size=1)}


def convert_variant(source: str, out: Path, saving: float, variant: str, device: str, smoke: bool) -> dict:
    from mlakit.convert.api import ConvertOptions, convert_checkpoint

    calib = dict(CALIB[variant])
    if smoke:
        calib.update(calib_tokens=2048, calib_seq_len=256 if variant == "long" else 64)
    start = time.perf_counter()
    summary = convert_checkpoint(source, str(out), ConvertOptions(kv_saving=saving, progress=False, **calib),
                                 device=device, overwrite=True, log=log)
    return dict(seconds=time.perf_counter() - start, rope_freq_indices=summary.rope_freq_indices)


def heal_variant(model: Path, source: str, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "mlakit", "heal", str(model), "--teacher", source, "-o", str(out), "--overwrite",
           "--train", "all", "--seq-len", str(args.heal_seq_len), "--batch-size", str(args.heal_batch),
           "--tokens", args.heal_tokens, "--teacher-tokens", args.teacher_tokens, "--gen-batch", str(args.gen_batch),
           "--max-minutes", str(args.heal_minutes), "--no-progress", "--json"]
    if args.lr:
        cmd += ["--lr", str(args.lr)]
    if not args.smoke:
        cmd += ["--compile"]
    else:
        cmd += ["--device", "cpu"]
    log("$ " + " ".join(cmd))
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    return dict(seconds=time.perf_counter() - start, summary=json.loads(result.stdout.strip().splitlines()[-1]))


def format_table(results: dict) -> str:
    lengths = PASSKEY_LENGTHS
    lines = ["longctx-smollm2-v1 (long-window 5 x 4096, passkey-v1 20 trials) and wikitext2-smollm2-v1, "
             "default model, float32",
             "", "| model | KV saving | wikitext2 ppl | long-window ppl | passkey " + " / ".join(map(str, lengths)) +
             " | NLL by distance 0-512 / -1K / -2K / -4K | minutes |",
             "|---|---:|---:|---:|---|---|---:|"]
    for name, r in results.items():
        keys = " / ".join(f"{100 * r['passkey'].get(str(n), float('nan')):.0f}%" for n in lengths)
        buckets = " / ".join(f"{b:.3f}" for b in r["nll_by_distance"])
        lines.append(f"| {name} | {100 * r['kv_saving']:.1f}% | {r['wikitext2']:.2f} | {r['long_window']:.2f} | "
                     f"{keys} | {buckets} | {r.get('minutes', 0):.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--export", default=None, help="copy the table and JSON here (e.g. $OUT)")
    parser.add_argument("--saving", type=float, default=0.5)
    parser.add_argument("--variants", default="short,long")
    parser.add_argument("--heal-variant", default=None, help="which converted variant to heal (default: none)")
    parser.add_argument("--heal-seq-len", type=int, default=2048)
    parser.add_argument("--heal-batch", type=int, default=16)
    parser.add_argument("--heal-tokens", default="20M")
    parser.add_argument("--teacher-tokens", default="12M")
    parser.add_argument("--gen-batch", type=int, default=512)
    parser.add_argument("--heal-minutes", type=float, default=5.0)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    source = "default"
    if args.smoke:
        from mlakit.testing.models import save_tiny_with_tokenizer

        _, path = save_tiny_with_tokenizer(out / "tiny", "llama", 2)
        source = str(path)
        args.heal_seq_len, args.heal_batch, args.heal_tokens, args.teacher_tokens = 64, 4, "2k", "4k"
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def record(name: str, path: str, minutes: float, **extra) -> None:
        if name not in results:
            log(f"evaluating {name} ...")
            r = evaluate_all(path, device, args.smoke)
            r.update(minutes=minutes + r["seconds"] / 60, **extra)
            results[name] = r
            results_path.write_text(json.dumps(results, indent=1))
            log(f"{name}: wikitext2 {r['wikitext2']:.2f}, long-window {r['long_window']:.2f}, passkey {r['passkey']}")

    record("original", source, 0.0)
    for variant in args.variants.split(","):
        name = f"MLA {args.saving:g} training-free, calibration {variant}"
        path = out / f"mla-{args.saving:g}-{variant}"
        if name not in results:
            info = convert_variant(source, path, args.saving, variant, device, args.smoke)
            record(name, str(path), info["seconds"] / 60, rope_freq_indices=info["rope_freq_indices"])
    if args.heal_variant:
        name = f"MLA {args.saving:g} healed ({args.heal_variant} calibration, windows {args.heal_seq_len})"
        if name not in results:
            healed = out / f"healed-{args.saving:g}-{args.heal_variant}-{args.heal_seq_len}"
            info = heal_variant(out / f"mla-{args.saving:g}-{args.heal_variant}", source, healed, args)
            record(name, str(healed), info["seconds"] / 60, heal=info["summary"])
    table = format_table(results)
    print(table)
    (out / "table.md").write_text(table + "\n")
    if args.export:
        os.makedirs(args.export, exist_ok=True)
        shutil.copy(results_path, Path(args.export) / "longctx_method.json")
        shutil.copy(out / "table.md", Path(args.export) / "longctx_method.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
