"""The main job: convert the default model, evaluate original and converted, print a table."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from mlakit.errors import MlakitError
from mlakit.io import write_text

DEMO_PROMPT = "The capital of France is"


def cached_eval(loaded):
    """The protocol result of the unchanged default model is the same every run: keep it
    (in ``$MLAKIT_CACHE_DIR/eval``)."""
    from mlakit.evaluate import PROTOCOL, EvalResult, evaluate
    from mlakit.loading import gguf_cache_dir, default_model_path

    # keyed by the GGUF file itself (path, size, mtime), as the dequantised-model cache is
    key = f"{gguf_cache_dir(default_model_path()).name}-{PROTOCOL}"
    root = Path(os.environ.get("MLAKIT_CACHE_DIR", Path.home() / ".cache" / "mlakit")) / "eval"
    path = root / f"{key}.json"
    if path.exists():
        try:
            return EvalResult(**json.loads(path.read_text())), True
        except (TypeError, ValueError):
            pass
    result = evaluate(loaded)
    try:
        write_text(path, json.dumps(result.to_dict()), lock=False)
    except (OSError, MlakitError):  # a read-only cache only costs time
        pass
    return result, False


def main_job(options, out: str | None = None, prompt: str = DEMO_PROMPT, max_new_tokens: int = 24,
             log=print) -> dict:
    from mlakit.convert.api import convert
    from mlakit.engine import SamplingParams, generate
    from mlakit.evaluate import PROTOCOL, calibration_tokens, evaluate
    from mlakit.loading import LoadedModel, load, save_checkpoint

    start = time.perf_counter()
    loaded = load("default", dtype=torch.float32)
    if loaded.tokenizer is None:
        raise MlakitError("the default model's tokenizer could not be loaded")
    tokens = calibration_tokens(loaded.tokenizer, options.calib_tokens)
    log(f"converting the default model (SmolLM2-135M, GQA-3) to MLA on {tokens.numel()} calibration tokens ...")
    mla, summary = convert(loaded.model, tokens, options)
    for line in summary.lines():
        log("  " + line)
    if out is not None:
        save_checkpoint(mla, out, loaded.tokenizer, overwrite=True)
        log(f"  saved to {out}")
    converted = LoadedModel(mla, loaded.tokenizer, "default -> MLA")
    log(f"evaluating both on {PROTOCOL} (40 windows x 512 tokens) ...")
    original_result, cached = cached_eval(loaded)
    converted_result = evaluate(converted)
    ids = loaded.tokenizer(prompt).input_ids
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    samples = [loaded.tokenizer.decode(generate(m.model, [ids], params)[0], skip_special_tokens=True)
               for m in (loaded, converted)]
    rows = []
    for name, m, result, sample in (("original", loaded, original_result, samples[0]),
                                    ("MLA", converted, converted_result, samples[1])):
        cache = m.model.new_cache(1, 1, dtype=torch.bfloat16)
        rows.append({"model": name, "attention": m.model.config.gqa_variant,
                     "kv_bytes_per_token_bf16": cache.bytes_per_token(),
                     "kv_values_per_token_layer": result.kv_values_per_token_layer,
                     "kv_saving": result.kv_saving, "ppl": result.ppl, "sample": prompt + sample})
    log("")
    log(f"protocol {PROTOCOL}" + (" (original's ppl from the cache of an earlier run)" if cached else ""))
    header = f"{'model':<9} {'attention':<9} {'KV bytes/token (bf16)':>22} {'values/tok/layer':>17} {'saving':>7} {'ppl':>8}"
    log(header)
    log("-" * len(header))
    for r in rows:
        log(f"{r['model']:<9} {r['attention']:<9} {r['kv_bytes_per_token_bf16']:>22,} "
            f"{r['kv_values_per_token_layer']:>17g} {100 * r['kv_saving']:>6.1f}% {r['ppl']:>8.2f}")
    log("")
    for r in rows:
        log(f"{r['model']:<9} greedy: {r['sample']!r}")
    log(f"\ntotal {time.perf_counter() - start:.0f}s")
    return {"protocol": PROTOCOL, "rows": rows, "summary": summary.to_dict()}
