#!/usr/bin/env python3
"""GPU check of mlakit.kernels in one go: correctness, tuning sweep, decode-attn-v1 table.

Run on the GPU machine from the repository root:

    python3 scripts/device/kernels_check.py            # everything, results under $OUT (or ./kernels_out)
    python3 scripts/device/kernels_check.py --no-sweep # correctness + tables only

Sections (each prints as it goes; the decode-attn-v1 table comes last):
  1. environment (GPU, torch, triton, flash_mla)
  2. correctness of every kernel against its PyTorch reference on CUDA: the test
     suite's CUDA cases (mlakit/testing/kernel_cases.py), each in bf16, fp16 and fp32
     (fresh random inputs, output poisoned with NaN, relative error bounds
     bf16/fp16 <= 1e-2, fp32 <= 1e-4)
  3. sweep of launch configurations on the benchmark shapes (median us, GB/s,
     registers / spills / shared memory of the compiled kernel)
  4. decode-attn-v1 (32 heads, rank 512 + rope 64) with the default configuration,
     then the shapes FlashMLA cannot run (9 heads rank 64/128 + rope 32) and 128 heads.
  --gluon instead: only the Gluon kernel for Hopper (mlakit/kernels/mla_decode_gluon.py),
     its correctness on the cases it covers, then its times beside the Triton kernel's.
Writes check.json, sweep.json, bench.json and tables.md under the output folder.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import traceback
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from mlakit.bench.attention import format_table, run_attention_bench  # noqa: E402
from mlakit.bench.timing import capture_cuda_graph, do_bench_ms, measure_copy_gbps  # noqa: E402
from mlakit.kernels import decode_common, mla_decode, mla_decode_reference  # noqa: E402
from mlakit.testing import kernel_cases as cases  # noqa: E402
from mlakit.testing.kernel_cases import rel_err  # noqa: E402




def log(msg=""):
    print(msg, flush=True)


# ---------------------------------------------------------------------------
# 2. correctness
# ---------------------------------------------------------------------------

CHECK_DTYPES = ("bfloat16", "float16", "float32")


def check_correctness(decode_cases=None, rope_cases=None, device="cuda", dtypes=CHECK_DTYPES, gluon=False):
    """The test suite's CUDA cases (mlakit/testing/kernel_cases.py, one list for both), each
    in every dtype of ``dtypes``: kernel vs reference on fresh random inputs, output
    poisoned with NaN, relative error within the dtype's bound. ``gluon``: the decode cases
    through the Gluon kernel instead of the Triton kernel."""
    results, failures = [], 0
    decode_cases = cases.CUDA_DECODE_CASES if decode_cases is None else decode_cases
    rope_cases = cases.CUDA_ROPE_CASES if rope_cases is None else rope_cases
    decode_runner = functools.partial(cases.run_decode_case, backend="gluon" if gluon else "triton")
    for kind, table, runner in (("gluon" if gluon else "mla_decode", decode_cases, decode_runner),
                                ("rope_append", rope_cases, cases.run_rope_case)):
        for case_id, case in table.items():
            for dtype in dtypes:
                name = f"{kind} {case_id} as {dtype}"
                try:
                    res = runner((dtype, *case[1:]), device=device)
                    err, ok = res["rel_err"], res["finite"] and res["rel_err"] <= res["tol"]
                except Exception as exc:  # report and go on
                    err, ok = None, False
                    name += f" EXC {type(exc).__name__}: {exc}"
                    traceback.print_exc()
                failures += not ok
                results.append(dict(case=name, rel_err=err, ok=ok))
                log(f"  {'ok  ' if ok else 'FAIL'} {name}: rel_err={err}")
    return results, failures


# ---------------------------------------------------------------------------
# 3. sweep
# ---------------------------------------------------------------------------


def bench_ms(fn, rep=40):
    return do_bench_ms(fn, warmup_ms=10, rep_ms=rep)


def graph_timing(fn, nbytes, copy_gbps) -> dict:
    """``fn``'s GPU time (CUDA-graph replay, no launch overhead) as us, GB/s of ``nbytes`` read and
    percent of the copy bandwidth."""
    us = bench_ms(capture_cuda_graph(fn)) * 1e3
    gbps = nbytes / (us * 1e-6) / 1e9
    return dict(us=us, gbps=gbps, pct_copy=100 * gbps / copy_gbps)


def error_text(exc, limit=160) -> str:
    """One line for a failed launch in a table row."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:limit] if str(exc) else ''}"


def decode_inputs(batch, context, heads, rank, rope) -> SimpleNamespace:
    """Random bf16 decode inputs of one benchmark shape (one new token per sequence, full
    caches), the fp32 reference of the first sequence and the cache's bytes."""
    dev, dtype = torch.device("cuda"), torch.bfloat16
    x = SimpleNamespace(cache=torch.randn(batch, context, rank + rope, dtype=dtype, device=dev),
                        q_latent=torch.randn(batch, 1, heads, rank, dtype=dtype, device=dev),
                        q_rope=torch.randn(batch, 1, heads, rope, dtype=dtype, device=dev),
                        lengths=torch.full((batch,), context, dtype=torch.int32, device=dev),
                        scale=1.0 / math.sqrt(rank + rope))
    x.out = torch.empty_like(x.q_latent)
    x.ref = mla_decode_reference(x.q_latent[:1], x.q_rope[:1], x.cache[:1], x.lengths[:1], x.scale, rank)
    x.nbytes = x.cache.numel() * x.cache.element_size()
    return x


def sweep_shape(batch, context, heads, rank, rope, kernel_cfgs, num_sms, copy_gbps, occupancies=(), split_counts=()):
    """Split counts tried per config: ``split_counts`` as given, and one per entry of
    ``occupancies`` (programs per SM) that fills the SMs with this config's programs."""
    x = decode_inputs(batch, context, heads, rank, rope)
    flops = 2 * batch * heads * context * (2 * rank + rope)
    rows = []
    for block_h, block_n, warps, stages in kernel_cfgs:
        row_blocks = -(-heads // block_h)
        programs = batch * row_blocks
        wanted = [*split_counts, *(num_sms * occ // programs for occ in occupancies)]
        split_opts = sorted({max(1, min(n, context // block_n, 256)) for n in wanted})
        for splits in split_opts:
            cfg = dict(block_h=block_h, block_n=block_n, num_warps=warps, num_stages=stages, num_splits=splits)
            rec = dict(batch=batch, context=context, heads=heads, rank=rank, rope=rope, **cfg)
            try:
                fn = lambda: mla_decode(x.q_latent, x.q_rope, x.cache, x.lengths, x.scale, rank,  # noqa: E731
                                        out=x.out, config=cfg)
                fn()
                torch.cuda.synchronize()
                err = rel_err(x.out[:1], x.ref)
                kern = decode_common.LAST_COMPILED.get("split")
                rec.update(graph_timing(fn, x.nbytes, copy_gbps))
                rec.update(tflops=flops / (rec["us"] * 1e-6) / 1e12, rel_err=err,
                           regs=getattr(kern, "n_regs", None), spills=getattr(kern, "n_spills", None),
                           smem=getattr(getattr(kern, "metadata", None), "shared", None))
                log(f"    h{block_h:<3d} n{block_n:<4d} w{warps} st{stages} sp{splits:<4d} {rec['us']:8.1f} us "
                    f"{rec['gbps']:6.0f} GB/s {rec['pct_copy']:5.1f}% {rec['tflops']:6.1f} TF  err {err:.1e} "
                    f"regs {rec['regs']} spills {rec['spills']} smem {rec['smem']}")
            except Exception as exc:
                rec.update(error=error_text(exc))
                log(f"    h{block_h:<3d} n{block_n:<4d} w{warps} st{stages} sp{splits:<4d} ERROR {rec['error']}")
            rows.append(rec)
    del x
    torch.cuda.empty_cache()
    return rows


# block_h, block_n, num_warps, num_stages.  Sweep of 2026-11 (docs/kernels.md); the
# wgmma-shaped variants tried since (scores as K Q^T, 64-row blocks at 32 heads) lost and
# were removed.
BIG_RANK_CFGS = [
    (32, 64, 8, 2), (32, 64, 4, 2), (32, 64, 8, 3), (32, 32, 4, 2), (32, 32, 4, 3), (32, 32, 8, 3),
    (32, 32, 8, 4), (32, 16, 4, 4), (64, 64, 8, 2), (64, 32, 4, 3), (64, 32, 8, 3), (64, 64, 4, 2),
]
SHORT_CFGS = [(32, 32, 4, 3), (32, 64, 8, 3)]
SMALL_RANK_CFGS = [
    (16, 64, 4, 3), (16, 128, 4, 3), (16, 128, 4, 4), (16, 256, 4, 3), (16, 64, 2, 4), (16, 128, 8, 3),
]
HEADS128_CFGS = [(64, 64, 8, 2), (64, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2), (32, 64, 8, 2)]


# ---------------------------------------------------------------------------
# 5. the Gluon kernel (Hopper)
# ---------------------------------------------------------------------------

GLUON_SHAPES = [  # (batch, context, heads, rank, rope): decode-attn-v1, then converted small models
    (1, 32768, 32, 512, 64), (16, 8192, 32, 512, 64), (64, 4096, 32, 512, 64), (128, 8192, 32, 512, 64),
    (16, 8192, 9, 64, 32), (128, 8192, 9, 64, 32), (16, 8192, 9, 128, 32), (128, 8192, 9, 128, 32),
    (16, 8192, 128, 512, 64), (64, 4096, 128, 512, 64), (128, 8192, 128, 512, 64),  # compute-bound
]


def gluon_section(num_sms, copy_gbps):
    """mlakit/kernels/mla_decode_gluon.py: its correctness on
    the CUDA cases it covers (bf16 and fp16), then its time beside the default Triton kernel's on
    the same inputs (CUDA-graph replay), for a few split counts and pipeline depths."""
    from mlakit.kernels.mla_decode_gluon import HAS_GLUON, mla_decode_gluon

    if not HAS_GLUON or torch.cuda.get_device_capability()[0] != 9:
        log("  skipped: needs a Hopper GPU and triton with Gluon")
        return {"skipped": True}
    covered = {k: c for k, c in cases.CUDA_DECODE_CASES.items() if cases.gluon_covers(c)}
    checks, failures = check_correctness(covered, {}, dtypes=("bfloat16", "float16"), gluon=True)
    log(f"  correctness: {len(checks) - failures}/{len(checks)} ok")
    rows = []
    if failures:
        log("  timings skipped: the kernel is wrong somewhere")
        return {"checks": checks, "failures": failures, "rows": rows}
    for batch, context, heads, rank, rope in GLUON_SHAPES:
        x = decode_inputs(batch, context, heads, rank, rope)
        triton_us = bench_ms(capture_cuda_graph(
            lambda: mla_decode(x.q_latent, x.q_rope, x.cache, x.lengths, x.scale, rank, out=x.out,
                               backend="triton"))) * 1e3
        # (stages, warps): one warpgroup reads each cache tile once per dot, two split the heads
        # (1, 4): one stage in 115 KB of shared memory, so two programs share an SM
        launch_opts = ([(2, 8)] if heads > 32 else [(2, 4), (2, 8), (1, 4)] if rank == 512 else [(2, 4), (3, 4)])
        programs = batch * -(-heads // 64)
        split_opts = sorted({max(1, min(context // 64, num_sms * occ // programs)) for occ in (1, 2, 4)})
        for stages, warps in launch_opts:
            for splits in split_opts:
                rec = dict(batch=batch, context=context, heads=heads, rank=rank, rope=rope, stages=stages,
                           num_warps=warps, num_splits=splits, triton_us=triton_us)
                try:
                    fn = lambda: mla_decode_gluon(x.q_latent, x.q_rope, x.cache, x.lengths, x.scale,  # noqa: E731
                                                  rank, num_splits=splits, stages=stages, num_warps=warps)
                    rec.update(rel_err=rel_err(fn()[:1], x.ref), **graph_timing(fn, x.nbytes, copy_gbps))
                    log(f"  {batch}x{context} h{heads} r{rank}+{rope} st{stages} w{warps} sp{splits:<4d} gluon "
                        f"{rec['us']:8.1f} us ({rec['gbps']:5.0f} GB/s, {rec['pct_copy']:5.1f}% of copy)  "
                        f"triton {triton_us:8.1f} us  err {rec['rel_err']:.1e}")
                except Exception as exc:
                    rec.update(error=error_text(exc, limit=200))
                    log(f"  {batch}x{context} h{heads} r{rank}+{rope} st{stages} w{warps} sp{splits} ERROR {rec['error']}")
                rows.append(rec)
        del x
        torch.cuda.empty_cache()
    return {"checks": checks, "failures": failures, "rows": rows}


def events_us(fn, reps=50) -> float:
    """Mean GPU time of ``reps`` back-to-back calls between two CUDA events (L2 not flushed)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def gluon_without_early_merge(fn):
    """``fn()`` with the Gluon path's merge launched the plain way (no programmatic dependent launch)."""
    from mlakit.kernels import mla_decode_gluon as gluon_mod

    gluon_mod.EARLY_MERGE = False
    try:
        return fn()
    finally:
        gluon_mod.EARLY_MERGE = True


GLUON_PARTS_SPLITS = {(1, 32768): (33, 66, 132), (16, 8192): (4, 8), (64, 4096): (1, 2), (128, 8192): (1, 2)}


def gluon_parts(copy_gbps):
    """Where the Gluon kernel's time goes on decode-attn-v1: the whole call, the decode kernel
    alone, the merge pass alone, the call on 1-slot sequences (fixed costs: launch, queries,
    epilogue), FlashMLA on the same cache, and an empty graph (the timing method's floor); each
    with do_bench (L2 flushed, the protocol's method) and back to back (no flush)."""
    from mlakit.bench.attention import _flash_mla_runner
    from mlakit.kernels.decode_common import merge_partials
    from mlakit.kernels.mla_decode_gluon import _launch, mla_decode_gluon

    tiny = torch.zeros(1, device="cuda")
    floor = dict(flushed=bench_ms(capture_cuda_graph(lambda: tiny.add_(1))) * 1e3,
                 back_to_back=events_us(capture_cuda_graph(lambda: tiny.add_(1))))
    log(f"  floor (one tiny kernel in a graph): {floor['flushed']:.1f} us flushed, {floor['back_to_back']:.1f} us back to back")
    rows = []
    for (batch, context), split_opts in GLUON_PARTS_SPLITS.items():
        x = decode_inputs(batch, context, 32, 512, 64)
        ones = torch.ones_like(x.lengths)
        fm, _ = _flash_mla_runner(x.q_latent[:, 0], x.q_rope[:, 0], x.cache, x.scale, 512)
        for splits in split_opts:
            parts = _launch(x.q_latent, x.q_rope, x.cache, x.lengths, x.scale, x.out, splits, 2, 4)
            calls = {
                "call": lambda: mla_decode_gluon(x.q_latent, x.q_rope, x.cache, x.lengths, x.scale, 512,  # noqa: E731
                                                 num_splits=splits),
                "kernel": lambda: _launch(x.q_latent, x.q_rope, x.cache, x.lengths, x.scale, x.out, splits, 2, 4),  # noqa: E731
                "merge": (lambda: merge_partials(*parts, x.out)) if parts else None,  # noqa: E731
                "call, plain merge launch": functools.partial(gluon_without_early_merge, lambda: mla_decode_gluon(
                    x.q_latent, x.q_rope, x.cache, x.lengths, x.scale, 512, num_splits=splits)),
                "1-slot": lambda: mla_decode_gluon(x.q_latent, x.q_rope, x.cache, ones, x.scale, 512,  # noqa: E731
                                                   num_splits=splits),
                "flash_mla": fm,
            }
            rec = dict(batch=batch, context=context, num_splits=splits)
            for name, fn in calls.items():
                if fn is None:
                    continue
                graph = capture_cuda_graph(fn)
                rec[name] = dict(flushed=bench_ms(graph) * 1e3, back_to_back=events_us(graph))
            log(f"  {batch}x{context} sp{splits:<4d} " + "  ".join(
                f"{k} {v['flushed']:.1f}/{v['back_to_back']:.1f}" for k, v in rec.items() if isinstance(v, dict))
                + "  (us, flushed/back to back)")
            rows.append(rec)
        del x
        torch.cuda.empty_cache()
    return {"floor": floor, "rows": rows}


def host_profile(calls=300):
    """Where the host time of eager mla_decode calls goes (cProfile, 16 x 8192, both kernels)."""
    import cProfile
    import io
    import pstats

    x = decode_inputs(16, 8192, 32, 512, 64)
    for backend in ("auto", "triton"):
        fn = lambda: mla_decode(x.q_latent, x.q_rope, x.cache, x.lengths, x.scale, 512, out=x.out,  # noqa: E731
                                backend=backend)
        fn()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        host_us = (time.perf_counter() - t0) / calls * 1e6
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
        log(f"  backend={backend}: {host_us:.1f} us per call (under cProfile)")
        log("\n".join(line for line in text.getvalue().splitlines() if line.strip())[-3000:])


def launch_overhead_study():
    """Default config on the protocol grid: eager vs CUDA-graph time, host time per call."""
    dev, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    for batch, context in ((1, 32768), (16, 8192), (64, 4096), (128, 8192)):
        cache = torch.randn(batch, context, 576, dtype=dtype, device=dev)
        q_latent = torch.randn(batch, 1, 32, 512, dtype=dtype, device=dev)
        q_rope = torch.randn(batch, 1, 32, 64, dtype=dtype, device=dev)
        lengths = torch.full((batch,), context, dtype=torch.int32, device=dev)
        out = torch.empty_like(q_latent)
        fn = lambda: mla_decode(q_latent, q_rope, cache, lengths, 0.04, 512, out=out)  # noqa: E731
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        host_us = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
        eager, graph = bench_ms(fn) * 1e3, bench_ms(capture_cuda_graph(fn)) * 1e3
        cfg = decode_common.default_config(batch, 1, 32, 512, 64, context, dev, dtype)
        log(f"  b={batch} ctx={context} eager {eager:.1f} us, graph {graph:.1f} us, host enqueue {host_us:.1f} us/call, cfg {cfg}")
        rows.append(dict(batch=batch, context=context, eager_us=eager, graph_us=graph, host_us=host_us, cfg=cfg))
        del cache
    torch.cuda.empty_cache()
    return rows


def run_sweep(num_sms, copy_gbps, quick=False):
    rows = []
    plan = [
        # (batch, context, heads, rank, rope, configs, how the split counts are chosen)
        (1, 32768, 32, 512, 64, BIG_RANK_CFGS, dict(split_counts=(66, 132, 256))),
        # batch 1 at a short context (the e2e decode step): how many splits pay off
        (1, 8192, 32, 512, 64, SHORT_CFGS, dict(split_counts=(8, 16, 33, 66, 132))),
        (16, 8192, 32, 512, 64, BIG_RANK_CFGS, dict(occupancies=(1, 2))),
        (64, 4096, 32, 512, 64, BIG_RANK_CFGS, dict(occupancies=(1, 2))),
        (128, 8192, 32, 512, 64, BIG_RANK_CFGS, dict(occupancies=(0, 1, 2))),
        (16, 8192, 9, 64, 32, SMALL_RANK_CFGS, dict(occupancies=(1, 2, 4))),
        (64, 8192, 9, 64, 32, SMALL_RANK_CFGS, dict(occupancies=(1, 2, 4))),
        (128, 8192, 9, 128, 32, SMALL_RANK_CFGS, dict(occupancies=(0, 1, 2, 4))),
        (64, 4096, 128, 512, 64, HEADS128_CFGS, dict(occupancies=(1, 2))),
    ]
    if quick:
        plan = plan[:1]
    for batch, context, heads, rank, rope, cfgs, splits in plan:
        log(f"  sweep b={batch} ctx={context} heads={heads} rank={rank} rope={rope}")
        t0 = time.time()
        shape_rows = sweep_shape(batch, context, heads, rank, rope, cfgs, num_sms, copy_gbps, **splits)
        rows += shape_rows
        good = sorted((r for r in shape_rows if "us" in r), key=lambda r: r["us"])
        for r in good[:3]:
            log(f"   best: h{r['block_h']} n{r['block_n']} w{r['num_warps']} st{r['num_stages']} sp{r['num_splits']}"
                f" {r['us']:.1f} us {r['gbps']:.0f} GB/s {r['pct_copy']:.1f}% ({time.time() - t0:.0f} s)")
    return rows


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "kernels_out"))
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--quick-sweep", action="store_true")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--no-extra", action="store_true", help="skip the small-rank and 128-head tables")
    parser.add_argument("--no-table", action="store_true", help="skip the decode-attn-v1 tables")
    parser.add_argument("--gluon", action="store_true",
                        help="only the Gluon kernel: its correctness, then its times beside the "
                             "Triton kernel's (gluon.json)")
    parser.add_argument("--host-profile", action="store_true",
                        help="with --gluon: also profile the host time of eager calls (host_profile)")
    parser.add_argument("--gluon-parts", action="store_true",
                        help="with --gluon: also where its time goes on decode-attn-v1 (gluon_parts)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    import triton

    props = torch.cuda.get_device_properties(0)
    try:
        import flash_mla

        fm = f"flash_mla {getattr(flash_mla, '__version__', '?')} legacy={flash_mla.has_legacy()}"
    except Exception as exc:
        fm = f"flash_mla not importable ({type(exc).__name__}: {str(exc)[:100]})"
    env = dict(gpu=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__, flash_mla=fm)
    log(f"== environment: {env}")

    summary = {"env": env}
    if args.gluon:
        copy_gbps = measure_copy_gbps(torch.device("cuda"))
        log(f"== copy bandwidth {copy_gbps:.0f} GB/s")
        log("== Gluon kernel")
        result = gluon_section(props.multi_processor_count, copy_gbps)
        if args.gluon_parts and not result.get("failures"):
            log("== where the Gluon kernel's time goes")
            result["parts"] = gluon_parts(copy_gbps)
        if args.host_profile:
            log("== host time of eager calls")
            host_profile()
        json.dump({"env": env, "copy_gbps": copy_gbps, **result}, open(os.path.join(args.out, "gluon.json"), "w"),
                  indent=1)
        log(f"== total {time.time() - t_start:.0f} s")
        return 1 if result.get("failures") else 0
    if not args.no_check:
        log("== correctness (CUDA, kernel vs reference)")
        results, failures = check_correctness()
        summary["check_failures"] = failures
        json.dump(results, open(os.path.join(args.out, "check.json"), "w"), indent=1)
        log(f"== correctness: {len(results) - failures}/{len(results)} ok ({time.time() - t_start:.0f} s)")

    copy_gbps = measure_copy_gbps(torch.device("cuda"))
    log(f"== copy bandwidth {copy_gbps:.0f} GB/s")
    log("== launch overhead (default config)")
    summary["overhead"] = launch_overhead_study()
    if not args.no_sweep:
        log("== sweep (CUDA-graph replay timing)")
        sweep = run_sweep(props.multi_processor_count, copy_gbps, quick=args.quick_sweep)
        json.dump(sweep, open(os.path.join(args.out, "sweep.json"), "w"), indent=1)
        log(f"== sweep done ({time.time() - t_start:.0f} s)")

    tables = []
    if args.no_table:
        json.dump(summary, open(os.path.join(args.out, "summary.json"), "w"), indent=1)
        log(f"== total {time.time() - t_start:.0f} s")
        return 1 if summary.get("check_failures") else 0
    log("== decode-attn-v1")
    rows = run_attention_bench(log=log)
    tables.append(format_table(rows))
    all_rows = list(rows)
    if not args.no_extra:
        log("== shapes FlashMLA cannot run: converted small models (9 heads)")
        for shape in ((9, 64, 32), (9, 128, 32)):
            extra = run_attention_bench(grid=((16, 8192), (64, 8192), (128, 8192), (16, 32768)), heads=shape[0],
                                        head_dim=64, kv_lora_rank=shape[1], rope_dim=shape[2], kv_head_counts=[3],
                                        include_flash_mla=False, log=log)
            tables.append(format_table(extra))
            all_rows += extra
        log("== 128 heads (compute-bound)")
        extra = run_attention_bench(grid=((16, 8192), (64, 4096), (128, 8192)), heads=128, include_baselines=False, log=log)
        tables.append(format_table(extra))
        all_rows += extra
    json.dump(all_rows, open(os.path.join(args.out, "bench.json"), "w"), indent=1)
    json.dump(summary, open(os.path.join(args.out, "summary.json"), "w"), indent=1)
    text = "\n\n".join(tables)
    open(os.path.join(args.out, "tables.md"), "w").write(text + "\n")
    log(f"== total {time.time() - t_start:.0f} s; correctness failures: {summary.get('check_failures')}")
    log(text)
    return 1 if summary.get("check_failures") else 0


if __name__ == "__main__":
    raise SystemExit(main())
