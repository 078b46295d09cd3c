"""Per-kernel GPU time of one eager decode step (torch.profiler), by category."""

from __future__ import annotations

from typing import Any, Dict

import torch


def kernel_category(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("mla_decode", "_mla", "flash", "fmha", "attention", "efficient_attention", "cudnn")):
        return "attention"
    if any(k in low for k in ("gemm", "gemv", "cutlass", "nvjet", "xmma", "matmul", "sm90_", "splitk", "cublas")):
        return "matmul"
    if any(k in low for k in ("memcpy", "memset", "copy")):
        return "copy"
    return "other (elementwise, norms, rope, index)"


def profile_decode_step(engine, tokens: torch.Tensor, positions: torch.Tensor, title: str, path: str) -> Dict[str, Any]:
    """Profile one ``engine.decode(tokens, positions)`` after two warm-up steps; append a
    section headed ``title`` (the summary and torch's table) to ``path``. Returns
    dict(kernels, kernel_ms, by_category_ms, summary)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        engine.decode(tokens, positions)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.decode(tokens, positions)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    cats: Dict[str, float] = {}
    total, kernels = 0.0, 0
    for ev in averages:
        us = getattr(ev, "self_device_time_total", None)
        if us is None:
            us = getattr(ev, "self_cuda_time_total", 0.0)
        if not us or getattr(ev, "device_type", None) is not None and "CUDA" not in str(ev.device_type):
            continue
        cat = kernel_category(ev.key)
        cats[cat] = cats.get(cat, 0.0) + us
        total += us
        kernels += int(getattr(ev, "count", 0) or 0)
    try:
        table = averages.table(sort_by="self_device_time_total", row_limit=25)
    except Exception:  # older names
        table = averages.table(sort_by="self_cuda_time_total", row_limit=25)
    summary = ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in sorted(cats.items(), key=lambda kv: -kv[1]))
    with open(path, "a") as fh:
        fh.write(f"\n## {title}\n")
        fh.write(f"GPU kernel time {total / 1e3:.2f} ms in {kernels} kernels: {summary}\n\n{table}\n")
    return dict(kernels=kernels, kernel_ms=total / 1e3, by_category_ms={k: v / 1e3 for k, v in cats.items()},
                summary=summary)
