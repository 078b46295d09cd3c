#!/usr/bin/env python3
"""Every cache format through the generation engine on the GPU: GQA and MLA models of the
default model's converted shape (2 layers, random weights), float32 and bf16 weights, each
cache format (and MLA's +rope), greedy tokens with CUDA graphs against the same engine
without them, prompts of two lengths (two span buckets, so two graph captures).

    PYTHONUNBUFFERED=1 python3 scripts/device/engine_formats_check.py

Each case runs in its own process, so a CUDA error in one (which spoils its process's
context) shows as that case's one-line error and the others still run. ``--smoke``: CPU,
without graphs (tests/test_device_scripts.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

FORMATS = ("auto", "bf16", "fp16", "fp8", "int8", "int4", "fp8+rope", "int8+rope", "int4+rope")


def model(attention: str, dtype: str, device: str):
    import torch

    from mlakit import ModelConfig, Transformer

    shape = dict(vocab_size=512, dim=576, n_layers=2, n_heads=9, n_kv_heads=3, head_dim=64, intermediate_size=256,
                 max_seq_len=4096)
    if attention == "mla":
        shape.update(attention="mla", kv_lora_rank=160, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64)
    return Transformer(ModelConfig(**shape)).to(device).init_random(seed=0, std=0.05).to(getattr(torch, dtype))


def run_case(attention: str, dtype: str, fmt: str, device: str) -> str:
    import torch

    from mlakit.engine import Engine, SamplingParams, generate_batch
    from mlakit.options import ForwardOptions

    name, rope = fmt.removesuffix("+rope"), fmt.endswith("+rope")
    options = ForwardOptions(kv_cache_dtype=None if name == "auto" else name, quantize_rope=rope)
    m = model(attention, dtype, device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (700, 1500)]
    params = SamplingParams(max_new_tokens=8, greedy=True, stop_token_ids=[])
    out = {}
    for graphs in ((False, True) if device == "cuda" else (False,)):
        engine = Engine(m, 1, 1600, cuda_graph=graphs, options=options)
        out[graphs] = [generate_batch(m, [p], params, engine=engine)[0][0].tolist() for p in prompts]
    if device == "cuda":
        torch.cuda.synchronize()
        return "ok" if out[True] == out[False] else f"DIFFER graphs {out[True]} eager {out[False]}"
    return "ok (eager)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # attention,dtype,format (child)
    parser.add_argument("--weights", default="float32,bfloat16", help="weight dtypes to run (comma-separated)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if args.case:
        try:
            print("RESULT " + run_case(*args.case.split(","), device), flush=True)
        except Exception as e:  # the one line the table shows; the traceback for the log
            traceback.print_exc()
            print(f"RESULT ERROR {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        return 0
    cases = [(a, d, f) for a in ("gqa", "mla") for d in args.weights.split(",") for f in FORMATS
             if not (a == "gqa" and f.endswith("+rope"))]
    if args.smoke:
        cases = [c for c in cases if c[2] in ("auto", "int8", "int4+rope") and c[1] == "float32"]
    print("| attention | weights | cache | graphs vs eager |\n|---|---|---|---|")
    for case in cases:
        done = subprocess.run([sys.executable, __file__, "--case", ",".join(case), *(["--smoke"] * args.smoke)],
                              capture_output=True, text=True, timeout=300)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        result = lines[-1][7:] if lines else f"crashed (rc {done.returncode}): {done.stderr.strip()[-300:]}"
        if not result.startswith("ok"):
            sys.stderr.write(f"--- {case}\n{done.stderr[-2500:]}\n")
        print(f"| {case[0]} | {case[1]} | {case[2]} | {result} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
