#!/usr/bin/env python3
"""decode-attn-v1 over a quantised latent cache: the Gluon kernel (mla_decode_quant_gluon) beside
the bf16 Gluon kernel and the quantised Triton kernel, on a Hopper GPU.

    PYTHONUNBUFFERED=1 python3 scripts/device/quant_gluon_bench.py [--json PATH] [--rows 1x32768,16x8192]

32 heads, rank 512 + rope 64, bf16 queries, s_q = 1, the protocol's four (batch, context) rows;
formats int8, fp8, int4 (RoPE key bf16). Caches are random latents quantised with
``mlakit.quant.quantize`` (what ``QuantLatentCache`` stores). Each format is first checked
against ``mla_decode_quant_reference`` (relative error ||out - ref|| / ||ref||; a row FAILS
above 1e-2), then timed: CUDA graph replays, do_bench medians with L2 flushed
(``mlakit.bench.timing``, as scripts/device/quant_decode_bench.py). Bytes are counted as stored
(values + float32 scales + bf16 RoPE key; bf16: the packed cache). The new kernel runs with its
default config (one warpgroup at 32 rows), with two warpgroups (``num_warps=8``) and with the
score dot issued pass by pass (``overlap``).

This is the kernel's first run on a GPU: an error of one format or config (a compile error
included) is printed and the others go on. ``--smoke`` runs the script's code on the CPU with a
tiny shape (the references stand in; the Gluon kernel reports that it needs Hopper).
Exit status 1 when any check FAILS or errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from mlakit.kernels import mla_decode, mla_decode_quant, mla_decode_quant_reference  # noqa: E402
from mlakit.quant import FORMATS, quantize  # noqa: E402

PROTOCOL = "decode-attn-v1"
GRID = ((1, 32768), (16, 8192), (64, 4096), (128, 8192))
HEADS, RANK, ROPE = 32, 512, 64
FMTS = ("int8", "fp8", "int4")
TOL = 1e-2
GLUON = ("gluon", "gluon_8w", "gluon_ov")  # default config, two warpgroups, score dot pass by pass
WARMUP_MS, REP_MS = 25, 200


def make_inputs(batch: int, context: int, device):
    gen = torch.Generator(device=device).manual_seed(0)
    q_latent = torch.randn(batch, 1, HEADS, RANK, device=device, generator=gen).to(torch.bfloat16)
    q_rope = torch.randn(batch, 1, HEADS, ROPE, device=device, generator=gen).to(torch.bfloat16)
    kv = torch.randn(batch, context, RANK + ROPE, device=device, generator=gen).to(torch.bfloat16)
    lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
    return q_latent, q_rope, kv, lengths


def quant_cache(kv: torch.Tensor, fmt_name: str):
    """``(values, scales, k_rope)`` as ``QuantLatentCache`` stores them: the latent quantised per
    token and group, the RoPE key kept bf16."""
    values, scales = quantize(kv[..., :RANK], FORMATS[fmt_name])
    return values.contiguous(), scales.contiguous(), kv[..., RANK:].contiguous()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def time_us(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    from mlakit.bench.timing import capture_cuda_graph, do_bench_ms

    fn()  # compile and warm outside the capture
    torch.cuda.synchronize()
    return do_bench_ms(capture_cuda_graph(fn), WARMUP_MS, REP_MS) * 1e3


def make_call(name, config, q_latent, q_rope, values, scales, k_rope, lengths, scale, fmt_name):
    """One decode call of kernel ``name`` ("triton": mla_decode_quant; else the Gluon kernel with ``config``)."""
    from mlakit.kernels.mla_decode_quant_gluon import mla_decode_quant_gluon

    if name == "triton":
        return lambda: mla_decode_quant(q_latent, q_rope, values, scales, k_rope, lengths, scale, RANK, fmt_name)
    return lambda: mla_decode_quant_gluon(q_latent, q_rope, values, scales, k_rope, lengths, scale, RANK, fmt_name,
                                          config=config or None)


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return " ".join(text[-3:])[:300] if text else type(exc).__name__


def bench_row(batch: int, context: int, device, smoke: bool) -> list[dict]:
    q_latent, q_rope, kv, lengths = make_inputs(batch, context, device)
    scale = 1 / math.sqrt(128 + 64)
    bf16_bytes = batch * context * (RANK + ROPE) * 2
    try:
        bf16_us = time_us(lambda: mla_decode(q_latent, q_rope, kv, lengths, scale, RANK), device)
    except Exception as exc:  # noqa: BLE001 - report and go on
        traceback.print_exc()
        bf16_us, bf16_error = None, short_error(exc)
    else:
        bf16_error = None
    results = []
    for fmt_name in FMTS:
        row = dict(protocol=PROTOCOL, batch=batch, context=context, format=fmt_name, bf16_us=bf16_us,
                   bf16_bytes=bf16_bytes, errors={})
        if bf16_error:
            row["errors"]["bf16"] = bf16_error
        values, scales, k_rope = quant_cache(kv, fmt_name)
        row["bytes"] = values.nbytes + scales.nbytes + k_rope.nbytes
        ref = mla_decode_quant_reference(q_latent.float(), q_rope.float(), values, scales, k_rope, lengths, scale,
                                         RANK, fmt_name)
        configs = {"triton": None, "gluon": {}, "gluon_8w": {"num_warps": 8}, "gluon_ov": {"overlap": True}}
        for name, config in configs.items():
            fn = make_call(name, config, q_latent, q_rope, values, scales, k_rope, lengths, scale, fmt_name)
            try:
                out = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                row[f"{name}_rel_err"] = rel_err(out, ref)
                row[f"{name}_finite"] = bool(torch.isfinite(out).all())
                row[f"{name}_us"] = time_us(fn, device)
            except Exception as exc:  # noqa: BLE001 - a compile error of one format must not stop the rest
                if not smoke:
                    traceback.print_exc()
                print(f"[{batch}x{context} {fmt_name} {name}] ERROR {short_error(exc)}", flush=True)
                row["errors"][name] = short_error(exc)
                row[f"{name}_us"] = None
        errs = [row.get(f"{n}_rel_err") for n in GLUON]
        row["ok"] = all(e is not None and e <= TOL for e in errs) and all(row.get(f"{n}_finite") for n in GLUON)
        print(json.dumps(row), flush=True)
        results.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def cell(us, nbytes, bf16_us) -> str:
    if us is None:
        return "-"
    text = f"{us:.1f} ({nbytes / us / 1e3:.0f} GB/s"
    return text + (f", {bf16_us / us:.2f}x)" if bf16_us else ")")


def table(rows: list[dict], name: str, copy: float) -> str:
    lines = [f"{PROTOCOL} over a quantised latent ({name}, copy {copy:.0f} GB/s): 32 heads, 512 + 64, bf16 queries, "
             "CUDA graph, us (GB/s as stored, speed-up over bf16)", "",
             "| batch x ctx | format | bf16 Gluon | Triton quant | Gluon quant | Gluon quant 8 warps | "
             "Gluon quant overlap | rel. err (Gluon / 8 warps / overlap / Triton) | check |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        errs = " / ".join("-" if r.get(f"{n}_rel_err") is None else f"{r[f'{n}_rel_err']:.1e}"
                          for n in (*GLUON, "triton"))
        bf16 = "-" if r["bf16_us"] is None else f"{r['bf16_us']:.1f} ({r['bf16_bytes'] / r['bf16_us'] / 1e3:.0f} GB/s)"
        lines.append(f"| {r['batch']} x {r['context']} | {r['format']} | {bf16} | "
                     f"{cell(r.get('triton_us'), r['bytes'], r['bf16_us'])} | "
                     f"{cell(r.get('gluon_us'), r['bytes'], r['bf16_us'])} | "
                     f"{cell(r.get('gluon_8w_us'), r['bytes'], r['bf16_us'])} | "
                     f"{cell(r.get('gluon_ov_us'), r['bytes'], r['bf16_us'])} | {errs} | "
                     f"{'ok' if r['ok'] else 'FAIL'} |")
    errors = [(r, k, v) for r in rows for k, v in r["errors"].items()]
    if errors:
        lines += ["", "Errors:"] + [f"- {r['batch']} x {r['context']} {r['format']} {k}: {v}" for r, k, v in errors]
    return "\n".join(lines)


def compile_summary() -> None:
    """The kernel's offline compile report on this machine's triton (registers, spills, shared memory)."""
    try:
        from mlakit.kernels.mla_decode_quant_gluon import compile_report
    except Exception as exc:  # noqa: BLE001
        print(f"compile_report unavailable: {short_error(exc)}", flush=True)
        return
    for fmt_name in FMTS:
        for kw in (dict(), dict(num_warps=8), dict(overlap=True)):
            try:
                print(f"compile {fmt_name} {kw}: {compile_report(fmt_name, **kw)}", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"compile {fmt_name} {kw}: ERROR {short_error(exc)}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the rows here as JSON")
    parser.add_argument("--rows", default=None, help="batch x context rows, e.g. 1x32768,16x8192 (default: all four)")
    parser.add_argument("--smoke", action="store_true", help="the script's code on the CPU, tiny shape, no timing")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU: run with --smoke on a CPU", file=sys.stderr)
        return 2
    grid = ((2, 100),) if args.smoke else GRID
    if args.rows:
        grid = tuple(tuple(int(x) for x in r.split("x")) for r in args.rows.split(","))
    from mlakit.bench.timing import device_name, measure_copy_gbps

    name = device_name(device)
    import triton

    print(f"{PROTOCOL}: {name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    if not args.smoke:
        compile_summary()
    copy = measure_copy_gbps(device) if not args.smoke else float("nan")
    rows = []
    for batch, context in grid:
        try:
            rows += bench_row(batch, context, device, args.smoke)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: report the row, go on
            traceback.print_exc()
            rows.append(dict(protocol=PROTOCOL, batch=batch, context=context, format="all", bf16_us=None,
                             bf16_bytes=0, bytes=0, ok=False, errors={"row": short_error(exc)}))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(table(rows, name, copy))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(protocol=PROTOCOL, gpu=name, copy_gbps=copy, torch=torch.__version__,
                           triton=triton.__version__, rows=rows), f, indent=1)
    if args.smoke:
        return 0  # the Gluon kernel cannot run on a CPU: its errors are the expected path here
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
