"""Export check on the real default model: mlakit vs transformers (hf-deepseek) vs llama.cpp (GGUF).

    python scripts/llamacpp_check.py [--source CKPT] [--out DIR] [--types f32 f16 q8_0]
    python scripts/llamacpp_check.py --skip-transformers --types --cache-types f16 q8_0 q4_0

``--cache-types``: llama.cpp's KV cache in each type (``K`` for K and V, or ``K/V``), with
flash attention (a quantised V needs it), for the MLA export (f32 weights; exported with
``cache_block=32`` -- ``mlakit export --quantised-cache`` -- when its latent or RoPE key is
not a multiple of llama.cpp's 32-value blocks; MLA takes one type for K and V) and for the
original model's own GGUF (the default model's file) as the baseline.

Needs: the default model, the protocol text, ``pip install llama-cpp-python``.
Without ``--source`` the default model (SmolLM2-135M) is converted with mlakit's
converter at ``--kv-saving`` (default 0.5) with ``rope_frequencies="deepseek"``
(one component per source frequency, on an arithmetic progression: what
DeepSeek's RoPE ``theta'^(-2k/p) / factor`` can represent). Prints protocol perplexities (wikitext2-smollm2-v1),
logits errors, greedy continuations and file sizes; writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from mlakit.evaluate import PROTOCOL, eval_windows, protocol_tokens, window_nll
from mlakit.loading import default_model_path, load, no_hub_kernels, save_checkpoint

PROMPT = "The capital of France is"


def rel_err(out, ref) -> float:
    out, ref = torch.as_tensor(out).double(), torch.as_tensor(ref).double()
    return ((out - ref).norm() / ref.norm()).item()


def convert_default(out: Path, tokenizer, saving: float, log) -> Path:
    import mlakit.convert.api as api
    from mlakit.evaluate import calibration_tokens

    if (out / "mlakit.json").exists():
        return out
    source = load("default", dtype=torch.float32).model
    t = time.perf_counter()
    options = api.ConvertOptions(kv_saving=saving, rope_frequencies="deepseek", progress=False)
    model, summary = api.convert(source, calibration_tokens(tokenizer, options.calib_tokens), options)
    log(f"converted in {time.perf_counter() - t:.0f}s: " + "; ".join(summary.lines()[:3]))
    save_checkpoint(model, out, tokenizer, overwrite=True)
    return out


def nll_from_logits(logits: np.ndarray, targets: np.ndarray) -> float:
    x = torch.from_numpy(logits).double()
    return torch.nn.functional.cross_entropy(x, torch.from_numpy(targets), reduction="sum").item()


GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}
BLOCK_BYTES = {"f32": (1, 4), "f16": (1, 2), "q4_0": (32, 18), "q8_0": (32, 34)}  # values per block, bytes


def row_bytes(kind: str, values: int) -> int:
    per, size = BLOCK_BYTES[kind]
    return -(-values // per) * size


def llama_ppl(path: Path, windows, n_pred: int, threads, type_k: str = "f32", type_v: str = "f32",
              flash_attn: bool = False, ref0=None):
    """llama.cpp's protocol ppl (each window from an empty cache) and window 0's logits error."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                          n_threads=threads, type_k=GGML_TYPES[type_k], type_v=GGML_TYPES[type_v],
                          flash_attn=flash_attn)
    total, err = 0.0, float("nan")
    for i, window in enumerate(windows.tolist()):
        llm.reset()
        llm.eval(window[:-1])
        logits = np.array(llm.scores[: len(window) - 1], dtype=np.float64)
        total += nll_from_logits(logits, np.array(window[1:]))
        if i == 0 and ref0 is not None:
            llm.reset()
            llm.eval(window)
            err = rel_err(np.array(llm.scores[: len(window)]), ref0)
    return llm, math.exp(total / n_pred), err


def cache_sweep(model, cache_types: list[str], out: Path, windows, n_pred: int, threads, ref0, results: dict,
                log) -> None:
    """The MLA export and the original model's GGUF in llama.cpp with each cache type (flash attention on)."""
    from mlakit.export import export_gguf

    cfg = model.config
    plain = out / "model-f32.gguf"
    if not plain.exists():
        export_gguf(model, plain, qtype="f32", tokenizer_gguf=default_model_path(), overwrite=True)
    padded = out / "model-f32-block32.gguf"
    form = export_gguf(model, padded, qtype="f32", tokenizer_gguf=default_model_path(), overwrite=True,
                       cache_block=32)
    r_pad, p_pad = form.config["kv_lora_rank"], form.config["qk_rope_head_dim"]
    r, p = max(cfg.kv_lora_ranks()), max(cfg.qk_rope_head_dim, 2)
    src = load("default").model.config
    kv = src.n_kv_heads * src.head_dim
    rows = results.setdefault("cache_types", [])
    for spec in cache_types:
        type_k, _, type_v = spec.partition("/")
        type_v = type_v or type_k
        runs = [("original GGUF (" + default_model_path().name + ")", default_model_path(),
                 row_bytes(type_k, kv) + row_bytes(type_v, kv), f"{kv} K + {kv} V")]
        # MLA: one cache (K = latent + RoPE key, V a view of it; llama.cpp refuses type_k != type_v)
        fits = (r % 32 == 0 and (r + p) % 32 == 0) or {type_k, type_v} <= {"f32", "f16"}
        mla = (plain, r, p) if fits else (padded, r_pad, p_pad)
        runs.append((f"MLA export (f32 weights, rank {mla[1]} + rope {mla[2]})", mla[0],
                     row_bytes(type_k, mla[1] + mla[2]), f"{mla[1] + mla[2]} K (V = its first {mla[1]})"))
        for name, path, nbytes, layout in runs:
            t = time.perf_counter()
            try:
                llm, ppl, err = llama_ppl(path, windows, n_pred, threads, type_k, type_v, flash_attn=True,
                                          ref0=ref0 if path != default_model_path() else None)
                llm.close()
            except ValueError as e:  # llama.cpp refused the context
                rows.append({"model": name, "cache": spec, "error": str(e)})
                log(f"{name:58s} cache {spec:9s} refused: {e}")
                continue
            row = {"model": name, "cache": spec, "ppl": ppl, "logits_rel_err": err, "bytes_per_token_layer": nbytes,
                   "layout": layout, "seconds": time.perf_counter() - t}
            rows.append(row)
            log(f"{name:58s} cache {spec:9s} ppl {ppl:.4f}  {nbytes} B/token/layer ({layout})  "
                f"window-0 logits err {err:.2e}  ({row['seconds']:.0f}s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=None, help="an MLA checkpoint (default: convert the default model)")
    parser.add_argument("--out", default="/tmp/mlakit-export-check")
    parser.add_argument("--kv-saving", type=float, default=0.5, help="budget of the conversion (without --source)")
    parser.add_argument("--types", nargs="*", default=["f32", "f16", "q8_0"],
                        help="GGUF weight types to check (none: skip)")
    parser.add_argument("--cache-types", nargs="*", default=[], metavar="K[/V]",
                        help="llama.cpp cache types for the MLA export and the original GGUF, e.g. f16 q8_0 q4_0 "
                             "q8_0/q4_0 (flash attention on)")
    parser.add_argument("--windows", type=int, default=40, help="evaluation windows (protocol: 40)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-transformers", action="store_true", help="only mlakit and llama.cpp")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"protocol": PROTOCOL}

    def log(msg: str) -> None:
        print(msg, flush=True)

    tokenizer = load("default").tokenizer
    source = Path(args.source) if args.source else convert_default(out / "converted", tokenizer, args.kv_saving, log)
    model = load(source, dtype=torch.float32).model
    results["model"] = {"source": str(source), "kv_lora_rank": model.config.kv_lora_rank,
                        "qk_rope_head_dim": model.config.qk_rope_head_dim,
                        "qk_rope_freq_indices": model.config.qk_rope_freq_indices}
    windows = eval_windows(protocol_tokens(tokenizer))[: args.windows]
    log(f"protocol {PROTOCOL}: {windows.shape[0]} windows x {windows.shape[1]} tokens"
        + ("" if windows.shape[0] == 40 else " (NOT the protocol's 40 windows)"))
    results["windows"] = int(windows.shape[0])
    import llama_cpp

    results["llama_cpp_python"] = llama_cpp.__version__
    n_pred = windows.shape[0] * (windows.shape[1] - 1)
    prompt = tokenizer(PROMPT).input_ids

    from mlakit.engine import SamplingParams, generate

    t = time.perf_counter()
    ppl = math.exp(window_nll(model, windows).item() / n_pred)
    with torch.no_grad():
        ref0 = model(windows[:1])[0].double()
    greedy = generate(model, [prompt], SamplingParams(max_new_tokens=32, greedy=True))[0][-32:]
    results["mlakit"] = {"ppl": ppl, "greedy": greedy, "text": tokenizer.decode(greedy)}
    log(f"mlakit        ppl {ppl:.4f}  ({time.perf_counter() - t:.0f}s)  greedy: {tokenizer.decode(greedy)!r}")

    # ---- transformers
    import transformers

    from mlakit.export import export_gguf, export_hf_deepseek

    hf_dir = out / "hf-deepseek"
    if args.skip_transformers:
        hf_dir = Path(__import__("tempfile").mkdtemp()) / "hf-deepseek"
    form = export_hf_deepseek(model, hf_dir, tokenizer=tokenizer, overwrite=True)
    results["notes"] = form.notes
    results["linearised_bound"] = form.linearised_bound
    size = sum(p.stat().st_size for p in hf_dir.iterdir())
    if args.skip_transformers:
        __import__("shutil").rmtree(hf_dir.parent)
    hf = None
    if not args.skip_transformers:
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, **no_hub_kernels()).eval()
    t = time.perf_counter()
    with torch.no_grad():
        total = 0.0
        for i in (range(0, windows.shape[0], 4) if hf is not None else []):
            batch = windows[i:i + 4]
            logits = hf(batch[:, :-1]).logits.double()
            if i == 0:
                err = rel_err(hf(windows[:1]).logits[0], ref0)
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       batch[:, 1:].reshape(-1), reduction="sum").item()
        if hf is None:
            total, err = float("nan"), float("nan")
        hf_greedy = [] if hf is None else hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    hf_ppl = math.exp(total / n_pred) if hf is not None else float("nan")
    results["transformers"] = {"ppl": hf_ppl, "logits_rel_err": err, "greedy_equal": hf_greedy == greedy,
                               "bytes": size}
    log(f"transformers  ppl {hf_ppl:.4f}  logits rel err {err:.2e}  greedy equal {hf_greedy == greedy}  "
        f"({size / 2**20:.1f} MiB, {time.perf_counter() - t:.0f}s)")
    del hf

    # ---- llama.cpp
    import llama_cpp

    for qtype in args.types:
        path = out / f"model-{qtype}.gguf"
        export_gguf(model, path, qtype=qtype, tokenizer_gguf=default_model_path(), overwrite=True)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                              n_threads=args.threads, type_k=0, type_v=0)  # float32 KV cache
        t = time.perf_counter()
        total = 0.0
        for i, window in enumerate(windows.tolist()):
            llm.reset()
            llm.eval(window[:-1])
            logits = np.array(llm.scores[: len(window) - 1], dtype=np.float64)
            total += nll_from_logits(logits, np.array(window[1:]))
            if i == 0:
                llm.reset()
                llm.eval(window)
                err = rel_err(np.array(llm.scores[: len(window)]), ref0)
        llm.reset()
        llm.eval(prompt)
        gen = []
        for _ in range(32):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            gen.append(tok)
            llm.eval([tok])
        llm.close()
        lppl = math.exp(total / n_pred)
        results[f"llama.cpp-{qtype}"] = {"ppl": lppl, "ppl_vs_mlakit": lppl / ppl - 1, "logits_rel_err": err,
                                         "greedy_equal": gen == greedy, "greedy": gen,
                                         "bytes": path.stat().st_size}
        log(f"llama.cpp {qtype:5s} ppl {lppl:.4f} ({100 * (lppl / ppl - 1):+.3f}%)  logits rel err {err:.2e}  "
            f"greedy equal {gen == greedy}  ({path.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t:.0f}s)")
        if gen != greedy:
            log(f"    llama.cpp greedy: {tokenizer.decode(gen)!r}")
    if args.cache_types:
        cache_sweep(model, args.cache_types, out, windows, n_pred, args.threads, ref0, results, log)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
