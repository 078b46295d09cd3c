#!/usr/bin/env python3
"""decode-attn-v1 with a quantised latent cache (GPU): the bf16 decode kernel (Gluon on Hopper)
beside the quantised Triton kernel (int8, fp8, int4; RoPE key bf16), FlashMLA FP8 where importable.

    PYTHONUNBUFFERED=1 python3 scripts/device/quant_decode_bench.py [--out "$OUT"]

32 heads, rank 512 + rope 64, the protocol's four (batch, context) rows, CUDA graphs, do_bench
medians (L2 flushed). Each quantised row is first checked against its reference (dequantise,
then the float reference) on the same random inputs. Bytes are counted as stored (values +
float32 scales + the bf16 RoPE key). ``--smoke`` runs the correctness path on the CPU reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from mlakit.cache import QuantLatentCache  # noqa: E402
from mlakit.kernels import mla_decode, mla_decode_quant, mla_decode_quant_reference  # noqa: E402

PROTOCOL = "decode-attn-v1"
GRID = ((1, 32768), (16, 8192), (64, 4096), (128, 8192))
HEADS, RANK, ROPE = 32, 512, 64


def inputs(batch: int, context: int, device, fmt: str | None):
    gen = torch.Generator(device=device).manual_seed(0)
    q_latent = torch.randn(batch, 1, HEADS, RANK, device=device, generator=gen).to(torch.bfloat16)
    q_rope = torch.randn(batch, 1, HEADS, ROPE, device=device, generator=gen).to(torch.bfloat16)
    lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
    kv = torch.randn(batch, context, RANK + ROPE, device=device, generator=gen).to(torch.bfloat16)
    if fmt is None:
        return q_latent, q_rope, lengths, kv, None
    cache = QuantLatentCache(batch, context, RANK, ROPE, fmt, dtype=torch.bfloat16, device=device)
    positions = torch.arange(context, device=device).expand(batch, context)
    cache.update(kv[..., :RANK], kv[..., RANK:], positions)
    return q_latent, q_rope, lengths, kv, cache


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    grid = ((2, 64),) if args.smoke else GRID
    from mlakit.bench.timing import capture_cuda_graph, device_name, do_bench_ms, measure_copy_gbps

    copy = measure_copy_gbps(device) if not args.smoke else float("nan")
    rows = []
    for batch, context in grid:
        q_latent, q_rope, lengths, kv, _ = inputs(batch, context, device, None)
        scale = 1 / (128 + 64) ** 0.5

        def bf16():
            return mla_decode(q_latent, q_rope, kv, lengths, scale, RANK)

        row = dict(protocol=PROTOCOL, batch=batch, context=context)
        row["bf16_us"] = None if args.smoke else do_bench_ms(capture_cuda_graph(bf16), 25, 200) * 1e3
        row["bf16_bytes"] = batch * context * (RANK + ROPE) * 2
        for fmt in ("int8", "fp8", "int4"):
            _, _, _, _, cache = inputs(batch, context, device, fmt)
            values, scales, k_rope, rope_scales = cache.kernel_operands(batch)

            def quant():
                return mla_decode_quant(q_latent, q_rope, values, scales, k_rope, lengths, scale, RANK, fmt)

            ref = mla_decode_quant_reference(q_latent.float(), q_rope.float(), values, scales, k_rope, lengths, scale,
                                             RANK, fmt)
            err = float((quant().float() - ref.float()).norm() / ref.float().norm())
            row[f"{fmt}_rel_err"] = err
            row[f"{fmt}_bytes"] = batch * context * cache.bytes_per_token()
            row[f"{fmt}_us"] = None if args.smoke else do_bench_ms(capture_cuda_graph(quant), 25, 200) * 1e3
            del cache, values, scales, k_rope
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = device_name(device)
    lines = [f"{PROTOCOL} with a quantised latent ({name}, copy {copy:.0f} GB/s): 32 heads, 512 + 64, CUDA graph, us "
             "(GB/s as stored; speed-up over bf16)", "",
             "| batch x ctx | bf16 (Gluon/Triton) | int8 | fp8 | int4 | rel. err int8 / fp8 / int4 |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        def cell(fmt):
            us = r[f"{fmt}_us"]
            if us is None:
                return "-"
            gbps = r[f"{fmt}_bytes"] / us / 1e3
            speed = f", {r['bf16_us'] / us:.2f}x" if fmt != "bf16" else ""
            return f"{us:.1f} ({gbps:.0f}{speed})"
        errs = " / ".join(f"{r[f'{f}_rel_err']:.1e}" for f in ("int8", "fp8", "int4"))
        lines.append(f"| {r['batch']} x {r['context']} | {cell('bf16')} | {cell('int8')} | {cell('fp8')} | "
                     f"{cell('int4')} | {errs} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "quant_decode.json"), "w") as f:
            json.dump(dict(gpu=name, copy_gbps=copy, rows=rows), f, indent=1)
    bad = [r for r in rows for f in ("int8", "fp8", "int4") if not r[f"{f}_rel_err"] <= 2e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
