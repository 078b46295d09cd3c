#!/usr/bin/env python3
"""GPU check of the engine and decode-e2e-v1 in one call (issue 6).

Run on the GPU machine from the repository root:

    PYTHONUNBUFFERED=1 python3 scripts/device/e2e_check.py --out "$OUT"

1. environment (GPU, torch, triton, transformers);
2. CUDA correctness: ``MLAKIT_TEST_DEVICE=cuda python3 -m pytest -q tests/test_engine.py
   tests/kernels/test_kernels_model.py tests/kernels/test_kernels_cuda.py``
   (graph decode == eager decode, captured once; the kernel inside the model;
   the kernel against its reference) -> pytest.log, summary line printed;
3. decode-e2e-v1 on the llama3-8b preset (random bf16 weights): GQA-8, MLA 512+64,
   MQA, MHA, the protocol grid, the largest batch at 32768, prefill of 8192
   tokens, transformers' generate (dynamic cache), a per-kernel profile of one
   eager batch-1 step per variant -> e2e.json, e2e.md, e2e_throughput.png,
   e2e_memory.png, profile.txt; the table is printed last.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from mlakit.bench import e2e, memory, report, timing, variants  # noqa: E402

TESTS = ["tests/test_engine.py", "tests/kernels/test_kernels_model.py", "tests/kernels/test_kernels_cuda.py"]


def log(msg: str = "") -> None:
    print(msg, flush=True)


def run_tests(out: str, timeout: int) -> str:
    env = dict(os.environ, MLAKIT_TEST_DEVICE="cuda",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", *TESTS], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text, rc = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMEOUT after {timeout} s", -1
    with open(os.path.join(out, "pytest.log"), "w") as fh:
        fh.write(text)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or "error" in ln.lower()),
                   lines[-1] if lines else "(no output)")
    if rc != 0:
        log("\n".join(lines[-40:]))
    return f"{summary.strip()} (rc {rc}, {time.time() - t0:.0f} s)"


# ---------------------------------------------------------------------------
# experiments: candidate engine changes, A/B on the same model in this process
# ---------------------------------------------------------------------------


def _patched_gqa_forward(mode: str):
    """GQAttention.forward (mlakit/attention.py) with another one-token attention:
    "sdpa-efficient" / "sdpa-math": the same SDPA call pinned to that backend (the
    default picks cuDNN for a masked call on sm90); "manual": two batched matmuls and
    an fp32 softmax, the group's query heads folded into the query axis (no copy);
    "no-repeat": the default path, minus ``repeat_interleave`` when group == 1 (MHA)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mlakit.rope import apply_rope

    backend = {"sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}.get(mode)

    def forward(self, x, cos, sin, positions, mask, cache=None):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        q = apply_rope(q, cos, sin).transpose(1, 2)
        k = apply_rope(k, cos, sin)
        k, v = cache.update(k, v, positions)
        kv_len = mask.shape[-1]
        k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        group = self.n_heads // self.n_kv_heads
        assert s == 1
        qf = q.reshape(b, self.n_kv_heads, group, self.head_dim)  # [b, kv_h, group, d]
        if mode == "manual":
            scores = torch.matmul(qf, k.transpose(-1, -2)).float() * self.scale  # [b, kv_h, group, L]
            scores = scores.masked_fill(~mask[:, None], float("-inf"))
            out = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)  # [b, kv_h, group, d]
        elif backend is not None:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask[:, None], scale=self.scale)
        else:  # no-repeat
            out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask[:, None], scale=self.scale)
        return self.wo(out.reshape(b, self.n_heads, s, self.head_dim).transpose(1, 2).reshape(b, s, -1))

    return forward


def _fused_mlp_forward(self, x):
    """MLP.forward with w1 and w3 as one matmul (one GEMV of 2 x 14336 outputs)."""
    import torch.nn.functional as F

    w13 = getattr(self, "_w13", None)
    if w13 is None:
        w13 = self._w13 = torch.cat([self.w1.weight, self.w3.weight], 0)
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return self.w2(F.silu(gate) * up)


def run_experiments(out: str, copy_gbps: float, steps: int, deadline: float, device: str = "cuda",
                    shape: str = "llama3-8b", grid=((1, 8192), (16, 8192), (64, 8192))) -> list:
    import json

    from mlakit.attention import GQAttention
    from mlakit.model import MLP

    results = []
    dev = torch.device(device)
    opts = e2e.E2EOptions(preset=shape, device=device, dtype="bfloat16" if dev.type == "cuda" else "float32",
                          steps=steps, warmup=3, progress=False)
    bench = e2e.E2EBench(opts, log=log)
    bench.copy_gbps = copy_gbps
    base, (rank, rope), _ = variants.resolve_shape(opts.model, opts.preset)
    sdpa_modes = ["sdpa-efficient", "sdpa-math"] if dev.type == "cuda" else ["sdpa-math"]
    plan = [
        ("GQA", base, ["default", "manual", *sdpa_modes], grid, None),
        ("MHA", base.replace(n_kv_heads=base.n_heads), ["default", "no-repeat", "manual"], grid[:1], None),
        ("MLA", variants.mla_variant_config(base, rank, rope), ["default", "fused-gate-up"], [grid[0], grid[-1]], MLP),
    ]
    original_gqa, original_mlp = GQAttention.forward, MLP.forward
    for name, config, modes, grid, _ in plan:
        if time.time() > deadline:
            log(f"experiments: time budget spent before {name}")
            break
        model = variants.build_random_model(config, dev, variants.parse_dtype(opts.dtype))
        variant = variants.Variant("x", name, config)
        for batch, context in grid:
            ref = None
            for mode in modes:
                if time.time() > deadline:
                    break
                try:
                    if mode in ("manual", "sdpa-efficient", "sdpa-math", "no-repeat"):
                        GQAttention.forward = _patched_gqa_forward(mode)
                    if mode == "fused-gate-up":
                        MLP.forward = _fused_mlp_forward
                    row = bench.guard(lambda: bench._decode_row(model, variant, batch, context, steps),
                                      "experiment", f"{name} {mode}", batch, context)
                    # logits of one more step on an identically filled cache, against the default mode
                    engine = bench._engine(model, batch, context)
                    variants.fill_cache_random(engine.cache, context, seed=opts.seed + 1)
                    tokens = torch.arange(batch, device=dev) % config.vocab_size
                    positions = torch.full((batch,), context - 1, dtype=torch.long, device=dev)
                    logits = engine.decode(tokens, positions).float().clone()
                    del engine
                    if ref is None:
                        ref = logits
                    row["rel_err_vs_default"] = float((logits - ref).norm() / ref.norm())
                except Exception as exc:  # an experiment never stops the check
                    row = dict(variant=f"{name} {mode}", batch=batch, context=context, status="error",
                               note=f"{type(exc).__name__}: {str(exc)[:200]}")
                    log(f"experiment {name} {mode} b={batch} ctx={context}: {row['note']}")
                finally:
                    GQAttention.forward, MLP.forward = original_gqa, original_mlp
                    for layer in model.layers:
                        layer.feed_forward.__dict__.pop("_w13", None)
                    memory.free_memory(dev)
                row.update(mode=mode, model=name)
                results.append(row)
                log(f"experiment {name:<12s} {mode:<15s} b={batch:<3d} ctx={context}: "
                    f"{row.get('ms_per_step') or 0:.2f} ms/step, {row.get('tokens_per_s') or 0:.1f} tok/s, "
                    f"{100 * (row.get('bw_fraction') or 0):.0f}% of BW limit, rel err {row.get('rel_err_vs_default')}")
        del model
        memory.free_memory(dev)
    with open(os.path.join(out, "experiments.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    return results


def format_experiments(results: list, gpu: str) -> str:
    lines = [f"Engine experiments on {gpu} (decode step, CUDA graph, median of the timed steps)", "",
             "| model | mode | batch | context | ms/step | tok/s | % of BW limit | rel err vs default | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        err = r.get("rel_err_vs_default")
        lines.append(f"| {r.get('model')} | {r.get('mode')} | {r['batch']} | {r['context']} "
                     f"| {report.fmt(r.get('ms_per_step'), '.2f')} | {report.fmt(r.get('tokens_per_s'), '.1f')} "
                     f"| {report.fmt(None if r.get('bw_fraction') is None else 100 * r['bw_fraction'], '.0f')} "
                     f"| {report.fmt(err, '.1e')} | {r.get('status', '')} {r.get('note', '')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "e2e_out"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--test-timeout", type=int, default=200)
    parser.add_argument("--time-budget-s", type=float, default=270.0,
                        help="the bench skips (and records) what is left once this is spent")
    parser.add_argument("--hf-static", action="store_true", help="also transformers' static cache (compiles)")
    parser.add_argument("--variants", default=",".join(variants.VARIANT_KEYS))
    parser.add_argument("--no-compile", action="store_true", help="decode step without torch.compile (CUDA graph only)")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--experiments", action="store_true",
                        help="A/B candidate engine changes (GQA decode attention paths, MHA without "
                             "repeat_interleave, fused gate/up) after the bench")
    parser.add_argument("--experiments-budget-s", type=float, default=90.0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    import triton
    import transformers

    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    log(f"== environment: {props.name}, {props.multi_processor_count} SMs, {total / 2**30:.1f} GiB "
        f"({free / 2**30:.1f} free); torch {torch.__version__}, triton {triton.__version__}, "
        f"transformers {transformers.__version__}")

    tests = "skipped"
    if not args.skip_tests:
        log("== CUDA tests: MLAKIT_TEST_DEVICE=cuda pytest -q " + " ".join(TESTS))
        tests = run_tests(args.out, args.test_timeout)
        log(f"== CUDA tests: {tests}")

    if args.skip_bench:
        copy_gbps = timing.measure_copy_gbps(torch.device("cuda"))
        log(f"== copy {copy_gbps:.0f} GB/s")
        results = run_experiments(args.out, copy_gbps, args.steps, time.time() + args.experiments_budget_s)
        log(format_experiments(results, props.name))
        return 0

    opts = e2e.E2EOptions(preset="llama3-8b", device="cuda", dtype="bfloat16", steps=args.steps, warmup=3,
                          variants=[v for v in args.variants.split(",") if v], hf=True, hf_static=args.hf_static,
                          time_budget_s=args.time_budget_s, progress=True, compile=not args.no_compile,
                          profile_path=os.path.join(args.out, "profile.txt"))
    log(f"== {e2e.PROTOCOL} (time budget {args.time_budget_s:.0f} s)")
    json_path = os.path.join(args.out, "e2e.json")
    result = e2e.run_e2e(opts, log=log, partial_path=json_path)
    result["cuda_tests"] = tests
    table = report.write_outputs(result, json_path=json_path, markdown_path=os.path.join(args.out, "e2e.md"),
                                 plot_dir=args.out)
    experiments = ""
    if args.experiments:
        log("== experiments")
        results = run_experiments(args.out, result["copy_gbps"], args.steps, time.time() + args.experiments_budget_s)
        experiments = format_experiments(results, props.name)
    log(f"== done in {time.time() - t_start:.0f} s (bench {result['elapsed_s']:.0f} s)")
    log(f"CUDA tests: {tests}")
    log(table)
    if experiments:
        log("")
        log(experiments)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
