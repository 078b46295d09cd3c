#!/usr/bin/env python3
"""Where a batch-1 decode step's time goes (decode-e2e-v1 shapes, GPU).

    PYTHONUNBUFFERED=1 python3 scripts/device/decode_profile.py --out "$OUT" [--grid 1x8192,1x32768]

For the llama3-8b preset (random bf16 weights), GQA-8 and MLA 512+64, the engine's
fast mode (fused projections, compiled blocks, one CUDA graph per step) at each
(batch, context): the step time against the bandwidth limit (weights + cache bytes
read per step / copy bandwidth), then a CUPTI profile of graph replays that splits
the step into matmuls, attention, element-wise/fused kernels, the LM head and the
gaps between kernels (step time - summed kernel time). Prints one table; writes
decode_profile.json (and the per-kernel lists) under --out.

``--smoke`` runs a tiny model on the CPU (tests/test_device_scripts.py): no
profile, just the timing path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from mlakit.bench import timing, variants  # noqa: E402
from mlakit.config import ModelConfig, preset  # noqa: E402
from mlakit.engine import Engine  # noqa: E402

PROTOCOL = "decode-e2e-v1"


def category(name: str) -> str:
    n = name.lower()
    if "mla_decode" in n or "flash" in n or "attention" in n or "fmha" in n or "sdpa" in n or "merge" in n:
        return "attention"
    if "rope_append" in n:
        return "rope_append"
    if "gemv" in n or "gemm" in n or "sm90_xmma" in n or "cutlass" in n or "matmul" in n or "nvjet" in n:
        return "matmul"
    if "triton" in n:
        return "fused (inductor)"
    if "elementwise" in n or "vectorized" in n or "copy" in n or "fill" in n:
        return "element-wise (aten)"
    if "reduce" in n or "argmax" in n or "softmax" in n:
        return "reduction"
    return "other"


def step_profile(engine: Engine, tokens, positions, steps: int = 20) -> dict:
    """Per-kernel GPU time of ``steps`` graph replays, per step."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.decode(tokens, positions)
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            per_kernel[event.name].append(event.device_time)  # us
    kernels = {name: sum(times) / steps for name, times in per_kernel.items()}
    counts = {name: len(times) / steps for name, times in per_kernel.items()}
    by_category: dict[str, float] = defaultdict(float)
    for name, us in kernels.items():
        by_category[category(name)] += us
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    return dict(kernel_us=sum(kernels.values()), launches=sum(counts.values()), by_category=dict(by_category),
                top=[dict(name=name[:120], us=round(us, 2), per_step=counts[name]) for name, us in top])


def measure(config: ModelConfig, batch: int, context: int, device, copy_gbps: float, compile: bool,
            profile: bool) -> dict:
    model = variants.build_random_model(config, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    engine = Engine(model, batch, context, compile=compile)
    variants.fill_cache_random(engine.cache, context, seed=1)
    tokens = torch.randint(0, config.vocab_size, (batch,), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.full((batch,), context - 1, dtype=torch.long, device=device)
    for _ in range(3):
        engine.decode(tokens, positions)
    timer = timing.Timer(device)
    times, _ = timer.per_call(lambda: engine.decode(tokens, positions), 50 if device.type == "cuda" else 3)
    ms = statistics.median(times)
    weight_bytes = variants.weight_bytes_per_step(model, batch)
    cache_bytes = batch * context * engine.cache.bytes_per_token()
    limit_ms = (weight_bytes + cache_bytes) / (copy_gbps * 1e9) * 1e3
    row = dict(protocol=PROTOCOL, variant=variants.variant_name(config), batch=batch, context=context,
               ms_per_step=ms, tokens_per_s=batch / ms * 1e3, weight_gb=weight_bytes / 1e9, cache_gb=cache_bytes / 1e9,
               limit_ms=limit_ms, bw_fraction=limit_ms / ms, compile=compile)
    if profile and device.type == "cuda":
        prof = step_profile(engine, tokens, positions)
        prof["gap_us"] = ms * 1e3 - prof["kernel_us"]
        head = model.output.weight if model.output is not None else model.tok_embeddings.weight
        row["lm_head_limit_us"] = head.numel() * head.element_size() / (copy_gbps * 1e9) * 1e6
        row["profile"] = prof
    del engine, model
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return row


def format_table(rows: list[dict], gpu: str, copy_gbps: float) -> str:
    lines = [f"{PROTOCOL}: where a decode step goes ({gpu}, copy {copy_gbps:.0f} GB/s, bf16, fast mode, CUDA graph)",
             "", "| variant | batch x ctx | ms/step | tok/s | limit ms | % of limit | kernels us | gaps us | launches |"
             " matmul | attention | fused | elementwise | other |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r.get("profile") or {}
        c = p.get("by_category", {})
        lines.append(
            f"| {r['variant']} | {r['batch']}x{r['context']} | {r['ms_per_step']:.3f} | {r['tokens_per_s']:.1f} | "
            f"{r['limit_ms']:.3f} | {100 * r['bw_fraction']:.1f} | {p.get('kernel_us', 0):.0f} | {p.get('gap_us', 0):.0f} | "
            f"{p.get('launches', 0):.0f} | {c.get('matmul', 0):.0f} | {c.get('attention', 0):.0f} | "
            f"{c.get('fused (inductor)', 0):.0f} | {c.get('element-wise (aten)', 0) + c.get('reduction', 0):.0f} | "
            f"{c.get('other', 0) + c.get('rope_append', 0):.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--grid", default="1x8192,1x32768,16x8192")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (tests)")
    args = parser.parse_args()
    grid = [tuple(int(v) for v in cell.split("x")) for cell in args.grid.split(",")]
    if args.smoke:
        device = torch.device("cpu")
        base = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                           intermediate_size=96, max_seq_len=256)
        grid = [(1, 64)]
    else:
        device = torch.device("cuda")
        base = preset("llama3-8b")
    copy_gbps = timing.measure_copy_gbps(device)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    rows = []
    for config in (base, variants.mla_variant_config(base, 512 if not args.smoke else 16, 64 if not args.smoke else 8)):
        for batch, context in grid:
            row = measure(config, batch, context, device, copy_gbps, compile=not args.no_compile and not args.smoke,
                          profile=not args.smoke)
            rows.append(row)
            print(f"{row['variant']} {batch}x{context}: {row['ms_per_step']:.3f} ms, "
                  f"{100 * row['bw_fraction']:.1f}% of the limit", flush=True)
            for k in (row.get("profile") or {}).get("top", [])[:12]:
                print(f"    {k['us']:8.1f} us  x{k['per_step']:.0f}  {k['name']}")
    table = format_table(rows, gpu, copy_gbps)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_profile.json"), "w") as f:
            json.dump(dict(gpu=gpu, copy_gbps=copy_gbps, rows=rows), f, indent=1)
        with open(os.path.join(args.out, "decode_profile.md"), "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
