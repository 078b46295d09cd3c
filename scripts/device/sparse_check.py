#!/usr/bin/env python3
"""GPU check of top-k sparse MLA decode (docs/sparse.md) in one go.

    python3 scripts/device/sparse_check.py            # everything; results under $OUT (or ./sparse_out)
    python3 scripts/device/sparse_check.py --smoke    # the whole code path on tiny CPU shapes (tests)

Sections:
  1. correctness on CUDA: the sparse kernels against their references (the interpreter cases of
     mlakit/testing/sparse_cases.py, then the decode-attn-v1 shape at 32768 tokens), and
     sparse == dense when k covers the context;
  2. decode-attn-v1 extended (32 heads, rank 512 + rope 64, bf16): contexts 32768-131072 x
     batch 1-16, the dense kernel (mla_decode's pick: Gluon on Hopper) beside the sparse decode
     (index + topk + gathered attention), both as CUDA-graph replays; us and speed-up;
  3. decode-e2e-v1 whole-model decode step at (1, 32768) and (16, 32768): the Llama-3-8B shape
     as MLA (rank 512 + rope 64, random bf16 weights: speed does not depend on the values), the
     cache filled with random values (no prefill), dense vs sparse engines, CUDA graphs.
Targets (issue "Long contexts for less"): attention step >= 4x dense at 32768 / top-k 2048;
whole-model decode at (16, 32768) >= 1.3x dense.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from mlakit.kernels import mla_decode, mla_decode_reference  # noqa: E402
from mlakit.kernels import mla_sparse as S  # noqa: E402
from mlakit.options import ForwardOptions  # noqa: E402
from mlakit.testing.sparse_cases import SPARSE_CASES  # noqa: E402

PROTOCOL = "decode-attn-v1 (extended: sparse)"


def timer(device: torch.device, graphs: bool):
    """``bench(fn) -> ms``: CUDA events via triton's do_bench of a graph replay on CUDA, wall-clock
    median of a few calls on the CPU (smoke: the numbers mean nothing there)."""
    if device.type == "cuda":
        import triton.testing

        from mlakit.bench.timing import capture_cuda_graph as cuda_graph_replay

        def bench(fn):
            return float(triton.testing.do_bench(cuda_graph_replay(fn) if graphs else fn, warmup=25, rep=100,
                                                 return_mode="median"))
        return bench

    def bench(fn):
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    return bench


def check_correctness(device: torch.device, smoke: bool) -> list[dict]:
    results = []
    cases = dict(SPARSE_CASES)
    if not smoke:
        cases["bf16-h32-r512-p64-32k"] = ("bfloat16", 2, 1, 32, 512, 64, 32768, [32768, 20000], 64, 2048, 64, 4, None)
        cases["bf16-h32-r512-p64-sq2"] = ("bfloat16", 2, 2, 32, 512, 64, 4096, [4096, 700], 64, 512, 64, 4, None)
    for case_id, case in cases.items():
        dtype, b, s, h, r, p, max_len, lengths, index_rank, topk, window, sink, splits = case
        dt = getattr(torch, dtype)
        gen = torch.Generator(device=device).manual_seed(0)
        ql = torch.randn(b, s, h, r, generator=gen, device=device).to(dt)
        qr = torch.randn(b, s, h, p, generator=gen, device=device).to(dt)
        kv = torch.randn(b, max_len, r + p, generator=gen, device=device).to(dt)
        lens = torch.tensor(lengths, dtype=torch.int32, device=device)
        ref = S.mla_sparse_index_reference(ql, qr, kv, lens, r, index_rank)
        out = S.mla_sparse_index(ql, qr, kv, lens, r, index_rank)
        finite = torch.isfinite(ref)
        index_err = float((out[finite] - ref[finite]).abs().max() / ref[finite].abs().max())
        chosen = S.select_positions(ref, S._query_positions(lens, s), topk, window, sink)
        att = S.mla_sparse_attend(ql, qr, kv, chosen, 0.05, r, num_splits=splits)
        att_ref = S.mla_sparse_attend_reference(ql.float(), qr.float(), kv.float(), chosen, 0.05, r)
        rel = float((att.float() - att_ref).norm() / att_ref.norm())
        # sparse covering the whole context == dense
        full = S.mla_sparse_decode(ql, qr, kv, lens, 0.05, r, topk=max_len, index_rank=index_rank)
        dense = mla_decode_reference(ql.float(), qr.float(), kv.float(), lens, 0.05, r)
        exact = float((full.float() - dense).norm() / dense.norm())
        tol = 1e-4 if dtype == "float32" else 1e-2
        ok = bool(torch.equal(finite, torch.isfinite(out))) and index_err <= tol and rel <= tol and exact <= tol
        results.append(dict(case=case_id, index_err=index_err, attend_rel_err=rel, covering_vs_dense=exact, ok=ok))
        print(f"  {'ok  ' if ok else 'FAIL'} {case_id}: index {index_err:.1e} attend {rel:.1e} "
              f"k>=context vs dense {exact:.1e}", flush=True)
    return results


def attention_table(device: torch.device, grid, heads, rank, rope, sparse: ForwardOptions, graphs: bool) -> list[dict]:
    bench = timer(device, graphs)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for batch, context in grid:
        cache = torch.randn(batch, context, rank + rope, dtype=dtype, device=device)
        q_latent = torch.randn(batch, 1, heads, rank, dtype=dtype, device=device)
        q_rope = torch.randn(batch, 1, heads, rope, dtype=dtype, device=device)
        lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
        scale = (rank + rope) ** -0.5
        dense_ms = bench(lambda: mla_decode(q_latent, q_rope, cache, lengths, scale, rank))
        index_rank = min(sparse.sparse_index_rank or rank, rank)
        query_pos = S._query_positions(lengths, 1)

        def index():
            return S.mla_sparse_index(q_latent, q_rope, cache, lengths, rank, index_rank)

        def select():
            return S.select_positions(index(), query_pos, sparse.sparse_topk, sparse.sparse_window, sparse.sparse_sink)

        chosen = select()

        def attend():
            return S.mla_sparse_attend(q_latent, q_rope, cache, chosen, scale, rank)

        def decode():
            return S.mla_sparse_decode(q_latent, q_rope, cache, lengths, scale, rank, topk=sparse.sparse_topk,
                                       window=sparse.sparse_window, sink=sparse.sparse_sink, index_rank=index_rank)

        times = {name: bench(fn) for name, fn in (("sparse", decode), ("index", index), ("index+topk", select),
                                                  ("attend", attend))}
        row = dict(protocol=PROTOCOL, batch=batch, context=context, k=chosen.shape[-1], index_rank=index_rank,
                   dense_us=dense_ms * 1e3, **{f"{n}_us": t * 1e3 for n, t in times.items()},
                   speedup=dense_ms / times["sparse"])
        rows.append(row)
        print(f"  b={batch:<3d} ctx={context:<7d} dense {row['dense_us']:9.1f} us  sparse {row['sparse_us']:9.1f} us "
              f"({row['speedup']:.2f}x; index {row['index_us']:.1f}, +topk {row['index+topk_us']:.1f}, "
              f"attend {row['attend_us']:.1f})", flush=True)
        del cache, q_latent, q_rope
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_attention(rows: list[dict], gpu: str) -> str:
    lines = [f"{PROTOCOL} on {gpu}: one MLA layer, bf16, CUDA-graph replays", "",
             "| batch | context | k | r_idx | dense us | sparse us | speed-up | index us | index+topk us | attend us |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['context']} | {r['k']} | {r['index_rank']} | {r['dense_us']:.1f} "
                     f"| {r['sparse_us']:.1f} | {r['speedup']:.2f}x | {r['index_us']:.1f} | {r['index+topk_us']:.1f} "
                     f"| {r['attend_us']:.1f} |")
    return "\n".join(lines)


def e2e_rows(device: torch.device, shape: dict, points, sparse: ForwardOptions, steps: int) -> list[dict]:
    from mlakit import ModelConfig, Transformer
    from mlakit.engine import Engine

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = ModelConfig(**shape)
    model = Transformer(config).to(device=device, dtype=dtype).init_random(seed=0)
    rows = []
    for batch, context in points:
        result = dict(protocol="decode-e2e-v1 (sparse)", batch=batch, context=context)
        for name, options in (("dense", ForwardOptions()), ("sparse", sparse)):
            engine = Engine(model, batch, context, options=options)
            for layer in engine.cache.layers:  # a full cache without a prefill: random latents
                layer.kv.normal_()
                layer.lengths.fill_(context - 1)
            tokens = torch.zeros(batch, dtype=torch.long, device=device)
            positions = torch.full((batch,), context - 1, dtype=torch.long, device=device)
            engine.decode(tokens, positions, span=context)  # capture / warm up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                engine.decode(tokens, positions, span=context)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / steps
            result[f"{name}_ms"] = seconds * 1e3
            result[f"{name}_tok_s"] = batch / seconds
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["speedup"] = result["dense_ms"] / result["sparse_ms"]
        rows.append(result)
        print(f"  ({batch}, {context}): dense {result['dense_ms']:.2f} ms/step, sparse {result['sparse_ms']:.2f} "
              f"ms/step ({result['speedup']:.2f}x; {result['sparse_tok_s']:.0f} tok/s)", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes: the code path, not the numbers")
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--index-rank", type=int, default=64)
    parser.add_argument("--no-e2e", action="store_true", help="skip the whole-model section")
    parser.add_argument("--out", default=os.environ.get("OUT", "sparse_out"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke: numbers mean nothing)"
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        sparse = ForwardOptions(sparse_topk=16, sparse_window=4, sparse_sink=2, sparse_index_rank=8)
        grid, heads, rank, rope = [(1, 256), (2, 512)], 4, 32, 16
        shape = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, intermediate_size=96,
                     max_seq_len=512, attention="mla", kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
                     v_head_dim=16)
        points, steps = [(1, 256), (2, 256)], 2
    else:
        sparse = ForwardOptions(sparse_topk=args.topk, sparse_window=args.window, sparse_sink=args.sink,
                                sparse_index_rank=args.index_rank)
        grid = [(b, c) for c in (32768, 65536, 131072) for b in (1, 4, 16)]
        heads, rank, rope = 32, 512, 64
        shape = dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
                     intermediate_size=14336, max_seq_len=32768, attention="mla", kv_lora_rank=512,
                     qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, rope_theta=500000.0)
        points, steps = [(1, 32768), (16, 32768)], 20
    print(f"sparse check on {gpu}; torch {torch.__version__}; {sparse}", flush=True)
    print("1. correctness", flush=True)
    report = {"gpu": gpu, "options": {k: getattr(sparse, k) for k in ("sparse_topk", "sparse_window", "sparse_sink",
                                                                      "sparse_index_rank")}}
    report["correctness"] = check_correctness(device, args.smoke)
    print(f"2. {PROTOCOL}", flush=True)
    report["attention"] = attention_table(device, grid, heads, rank, rope, sparse, graphs=device.type == "cuda")
    tables = [format_attention(report["attention"], gpu)]
    if not args.no_e2e:
        print("3. decode-e2e-v1 whole-model decode step (CUDA graphs on CUDA)", flush=True)
        report["e2e"] = e2e_rows(device, shape, points, sparse, steps)
        lines = [f"decode-e2e-v1 (sparse, {sparse.sparse_topk} + {sparse.sparse_window} + {sparse.sparse_sink}) "
                 f"on {gpu}", "", "| batch | context | dense ms/step | sparse ms/step | speed-up | sparse tok/s |",
                 "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['batch']} | {r['context']} | {r['dense_ms']:.2f} | {r['sparse_ms']:.2f} | {r['speedup']:.2f}x "
                  f"| {r['sparse_tok_s']:.0f} |" for r in report["e2e"]]
        tables.append("\n".join(lines))
    print("\n\n".join(tables))
    for name, text in (("sparse.json", json.dumps(report, indent=1)), ("sparse.md", "\n\n".join(tables) + "\n")):
        path = os.path.join(args.out, name)
        with open(path + ".tmp", "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(path + ".tmp", path)
    failed = [r["case"] for r in report["correctness"] if not r["ok"]]
    print(f"correctness failures: {failed}" if failed else "all correctness cases ok")
    print("done")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
