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

    result, cached = cached_protocol(loaded, PROTOCOL, evaluate)
    try:
        return EvalResult(**result), cached
    except TypeError:  # a cache entry from an older version
        return evaluate(loaded), False


def cached_protocol(loaded, name: str, compute) -> tuple[dict, bool]:
    """(result dict, whether from the cache) of one protocol on the unchanged default model,
    in ``$MLAKIT_CACHE_DIR/eval``, keyed by the GGUF file itself (path, size, mtime), as the
    dequantised-model cache is."""
    from mlakit.loading import default_model_path, gguf_cache_dir

    path = (Path(os.environ.get("MLAKIT_CACHE_DIR", Path.home() / ".cache" / "mlakit")) / "eval"
            / f"{gguf_cache_dir(default_model_path()).name}-{name}.json")
    if path.exists():
        try:
            return json.loads(path.read_text()), True
        except ValueError:
            pass
    result = compute(loaded).to_dict()
    try:
        write_text(path, json.dumps(result), lock=False)
    except (OSError, MlakitError):  # a read-only cache only costs time
        pass
    return result, False


def long_context_figures(loaded, passkey: bool, original: bool) -> tuple[dict[str, dict], bool]:
    """{protocol name: result dict} of longctx-smollm2-v1 (long-window ppl; passkey-v1 if
    asked), and whether any came from the cache (the original's only)."""
    from mlakit.evaluate import LONG_PROTOCOL, evaluate_long_window
    from mlakit.passkey import PROTOCOL as PASSKEY, evaluate_passkey

    todo = [(LONG_PROTOCOL, evaluate_long_window)] + ([(PASSKEY, evaluate_passkey)] if passkey else [])
    out, any_cached = {}, False
    for name, compute in todo:
        if original:
            out[name], cached = cached_protocol(loaded, name, compute)
            any_cached |= cached
        else:
            out[name] = compute(loaded).to_dict()
    return out, any_cached


def main_job(options, out: str | None = None, prompt: str = DEMO_PROMPT, max_new_tokens: int = 24,
             passkey: bool = False, log=print) -> dict:
    from mlakit.convert.api import convert
    from mlakit.engine import SamplingParams, generate
    from mlakit.evaluate import LONG_PROTOCOL, PROTOCOL, calibration_tokens, evaluate
    from mlakit.loading import LoadedModel, load, save_checkpoint
    from mlakit.passkey import PROTOCOL as PASSKEY

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
    log(f"evaluating both on {PROTOCOL} (40 windows x 512 tokens) and {LONG_PROTOCOL} (5 x 4096"
        + (", passkey-v1: 60 generations" if passkey else "; passkey-v1 with --passkey") + ") ...")
    original_result, cached = cached_eval(loaded)
    converted_result = evaluate(converted)
    original_long, cached_long = long_context_figures(loaded, passkey, original=True)
    converted_long, _ = long_context_figures(converted, passkey, original=False)
    ids = loaded.tokenizer(prompt).input_ids
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    samples = [loaded.tokenizer.decode(generate(m.model, [ids], params)[0], skip_special_tokens=True)
               for m in (loaded, converted)]
    rows = []
    for name, m, result, long, sample in (("original", loaded, original_result, original_long, samples[0]),
                                          ("MLA", converted, converted_result, converted_long, samples[1])):
        cache = m.model.new_cache(1, 1, dtype=torch.bfloat16)
        row = {"model": name, "attention": m.model.config.gqa_variant,
               "kv_bytes_per_token_bf16": cache.bytes_per_token(),
               "kv_values_per_token_layer": result.kv_values_per_token_layer,
               "kv_saving": result.kv_saving, "ppl": result.ppl, "ppl_long": long[LONG_PROTOCOL]["ppl"],
               "sample": prompt + sample}
        if PASSKEY in long:
            row["passkey"] = {r["length_target"]: r["share"] for r in long[PASSKEY]["lengths"]}
        rows.append(row)
    log("")
    note = " (original's figures from the cache of an earlier run)" if cached or cached_long else ""
    log(f"protocols: ppl {PROTOCOL}; long ppl {LONG_PROTOCOL}" + (f"; passkey {PASSKEY}" if passkey else "") + note)
    passkey_head = "".join(f" {'pk ' + str(n):>8}" for n in rows[0].get("passkey", {}))
    header = (f"{'model':<9} {'attention':<9} {'KV bytes/token (bf16)':>22} {'values/tok/layer':>17} {'saving':>7} "
              f"{'ppl':>8} {'long ppl':>9}{passkey_head}")
    log(header)
    log("-" * len(header))
    for r in rows:
        shares = "".join(f" {100 * share:>7.0f}%" for share in r.get("passkey", {}).values())
        log(f"{r['model']:<9} {r['attention']:<9} {r['kv_bytes_per_token_bf16']:>22,} "
            f"{r['kv_values_per_token_layer']:>17g} {100 * r['kv_saving']:>6.1f}% {r['ppl']:>8.2f} "
            f"{r['ppl_long']:>9.2f}{shares}")
    log("")
    for r in rows:
        log(f"{r['model']:<9} greedy: {r['sample']!r}")
    log(f"\ntotal {time.perf_counter() - start:.0f}s")
    return {"protocol": PROTOCOL, "long_protocol": LONG_PROTOCOL, "rows": rows, "summary": summary.to_dict()}
