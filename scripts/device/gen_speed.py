#!/usr/bin/env python3
"""Where a step of the teacher's text generation goes (issue 7), on random weights.

``mlakit heal`` trains faster than the teacher writes its text (H200: 220k vs 105k
tokens/s), so the generation step decides how much distinct text a 10-minute heal sees.
This times, for the default model's shape (bf16, the engine's fast mode: fused
projections, compiled blocks, one CUDA graph per step):

- one layer's decode attention: the engine's compiled matmuls against SDPA with the same
  mask, beside a copy of the same bytes (``--attention-only`` stops after this table);
- the decode step (graph replay) at several cache lengths (``--max-lens``) and batches
  (``--step-batches``), with the KV bytes it reads;
- sampling (temperature 1, top-p 0.95, as heal's teacher text): ``sample_top_p`` (no sort)
  against sorting the logits (the former method, kept here as the reference) — their
  token frequencies are also compared on one row drawn many times;
- ``generate_batch`` end to end (tokens/s) at each ``--batch``, with span buckets
  (``Engine.decode(span=)``) and, at the first batch, with one graph over the whole cache;
- with ``--profile``: the top CUDA kernels of a few compiled steps without the graph.

    PYTHONUNBUFFERED=1 python3 scripts/device/gen_speed.py --batch 1024,4096 --step-batches 1024,4096 \
        --max-lens 512 --new-tokens 480 --profile          # --smoke: the same code on the CPU, tiny

(H200 results: docs/results/heal_h200_text2x.md.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def sort_top_p(probs: torch.Tensor, top_p: float, generator=None) -> torch.Tensor:
    """The former top-p: sort, mask the tail, draw (the reference for speed and frequencies)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.multinomial(probs.masked_fill(drop, 0.0), 1, generator=generator)[:, 0]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_ms(fn, reps: int = 20) -> float:
    """Mean milliseconds of ``fn`` (CUDA events on a GPU; the wall clock in a CPU smoke run)."""
    fn()
    sync()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    sync()
    return start.elapsed_time(end) / reps


def attention_table(config, batches: list[int], lens: list[int], device: str) -> None:
    """One layer's GQA decode attention, the way the compiled decode step does it (two
    batched matmuls and a masked softmax, ``mlakit.attention._decode_attention_math``)
    against SDPA with the same mask (eager and compiled), beside a copy of the same bytes.
    Each variant is checked against the float32 math first."""
    import torch.nn.functional as F

    from mlakit.attention import _decode_attention_math

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kv_h, g, d = config.n_kv_heads, config.n_heads // config.n_kv_heads, config.head_dim
    scale = config.softmax_scale

    def sdpa(q, k, v, mask, scale):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    backend = "inductor" if device == "cuda" else "aot_eager"  # CPU smoke runs: no C++ toolchain needed
    variants = {"compiled matmuls (the engine now)": torch.compile(_decode_attention_math, dynamic=False,
                                                                   backend=backend),
                "SDPA with the mask, eager": sdpa,
                "SDPA with the mask, compiled": torch.compile(sdpa, dynamic=False, backend=backend)}
    print(f"\n| one layer's decode attention, q [b, {kv_h}, {g}, {d}], cache [b, {kv_h}, L, {d}] | b | L | us | "
          "GB/s (K+V) | max err vs float32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for b in batches:
        for length in lens:
            gen = torch.Generator(device=device).manual_seed(b + length)
            q, k, v = (torch.randn(shape, generator=gen, device=device).to(dtype)
                       for shape in ((b, kv_h, g, d), (b, kv_h, length, d), (b, kv_h, length, d)))
            mask = torch.arange(length, device=device) < torch.randint(1, length + 1, (b, 1, 1, 1), generator=gen,
                                                                       device=device)  # [b, 1, 1, L]
            reference = _decode_attention_math(q.float(), k.float(), v.float(), mask, scale)
            read = 2 * k.numel() * k.element_size()
            for name, fn in variants.items():
                err = (fn(q, k, v, mask, scale).float() - reference).abs().max().item()
                us = step_ms(lambda fn=fn: fn(q, k, v, mask, scale)) * 1e3
                print(f"| {name} | {b} | {length} | {us:,.1f} | {read / us / 1e3:,.0f} | {err:.1e} |")
            both = torch.cat([k, v])
            out = torch.empty_like(both)
            us = step_ms(lambda: out.copy_(both)) * 1e3
            print(f"| copy of K and V (read + write) | {b} | {length} | {us:,.1f} | {2 * read / us / 1e3:,.0f} | |")
            del q, k, v, both, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1024",
                        help="generation batch; a comma list: the generate_batch table runs each, the rest the first")
    parser.add_argument("--max-lens", default="128,512", help="cache lengths of the decode-step table")
    parser.add_argument("--step-batches", default="1024,2048", help="batches of the decode-step table")
    parser.add_argument("--new-tokens", type=int, default=256, help="generate_batch: tokens per sequence")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--attention-only", action="store_true",
                        help="only the table of one layer's decode attention (compiled matmuls vs SDPA)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model on the CPU: the same code, numbers mean nothing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("needs a CUDA GPU (or --smoke)")
        return 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.batch, args.step_batches, args.max_lens, args.new_tokens = "8,4", "4,8", "32,64", 40

    from mlakit.config import preset
    from mlakit.engine import Engine, SamplingParams, generate_batch, sample_top_p
    from mlakit.model import Transformer

    torch.manual_seed(0)
    config = preset("smollm2-135m")
    if args.smoke:
        config = config.replace(vocab_size=512, dim=64, n_layers=2, intermediate_size=128)
    model = Transformer(config).to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()
    compile = device == "cuda"  # the engine's fast mode, as heal's teacher text uses it on a GPU
    gen_batches = [int(x) for x in args.batch.split(",")]
    b = gen_batches[0]
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU smoke run"
    print(f"teacher text generation step, default model shape (random weights), batch {b}, {name}, "
          f"torch {torch.__version__}")

    attention_table(config, [int(x) for x in args.step_batches.split(",")],
                    [int(x) for x in args.max_lens.split(",")], device)
    if args.attention_only:
        return 0

    print("\n| batch | cache length (max_len) | decode step (graph replay) | per sequence | KV bytes read | GB/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    kv_per_token = model.new_cache(1, 1, dtype=torch.bfloat16).bytes_per_token()
    for sb in [int(x) for x in args.step_batches.split(",")]:
        step_tokens = torch.randint(0, config.vocab_size, (sb,), device=device)
        for max_len in [int(x) for x in args.max_lens.split(",")]:
            engine = Engine(model, sb, max_len, compile=compile)
            positions = torch.full((sb,), max_len // 2, device=device)
            ms = step_ms(lambda: engine.decode(step_tokens, positions))
            read = sb * max_len * kv_per_token
            print(f"| {sb} | {max_len} | {ms:.2f} ms | {ms / sb * 1e3:.2f} us | {read / 2 ** 30:.2f} GiB | "
                  f"{read / ms / 1e6:,.0f} |")
            del engine
            torch.cuda.empty_cache() if device == "cuda" else None
    tokens = torch.randint(0, config.vocab_size, (b,), device=device)

    logits = torch.randn(b, config.vocab_size, device=device) * 3
    probs = logits.softmax(-1)
    gen = torch.Generator(device=device).manual_seed(0)
    print("\n| sampling (temperature 1, top-p {:g}) of [{}, {}] | ms |".format(args.top_p, b, config.vocab_size))
    print("|---|---:|")
    print(f"| softmax | {step_ms(lambda: logits.float().softmax(-1)):.3f} |")
    print(f"| sort + mask + draw (former) | {step_ms(lambda: sort_top_p(probs, args.top_p, gen)):.3f} |")
    print(f"| sample_top_p (no sort) | {step_ms(lambda: sample_top_p(probs, args.top_p, gen)):.3f} |")
    print(f"| multinomial alone | {step_ms(lambda: torch.multinomial(probs, 1, generator=gen)):.3f} |")
    row = probs[:1].expand(20_000 if device == "cuda" else 2000, -1).contiguous()  # one row, 20k times (3.9 GB)
    a = torch.bincount(sample_top_p(row, args.top_p, gen), minlength=config.vocab_size).double()
    r = torch.bincount(sort_top_p(row, args.top_p, gen), minlength=config.vocab_size).double()
    print(f"frequencies over {row.shape[0]:,} draws of one row: max |sample_top_p - sort| = "
          f"{(a - r).abs().max().item() / row.shape[0]:.4f}, tokens drawn {int((a > 0).sum())} vs {int((r > 0).sum())}")

    import mlakit.engine as engine_module

    print(f"\n| generate_batch, batch x (32 + {args.new_tokens}) | batch | tokens/s | ms per step (prefill incl.) |")
    print("|---|---:|---:|---:|")
    smallest = engine_module.SPAN_BUCKET_MIN
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, top_p=args.top_p, seed=0,
                            stop_token_ids=[])
    warm = SamplingParams(max_new_tokens=args.new_tokens, top_p=args.top_p, seed=1, stop_token_ids=[])
    for gb in gen_batches:
        prompts = torch.randint(3, config.vocab_size, (gb, 32)).tolist()
        for name, bucket_min in (("span buckets (graphs of 128, 256, ... slots)", smallest),
                                 ("one graph over the whole cache", 1 << 30)):
            if bucket_min != smallest and gb != b:
                continue  # the comparison without buckets runs at the first batch only
            engine_module.SPAN_BUCKET_MIN = bucket_min
            engine = Engine(model, gb, 32 + args.new_tokens, compile=compile)
            generate_batch(model, prompts, warm, engine=engine)  # compile and capture every bucket
            sync()
            t0 = time.perf_counter()
            out, counts = generate_batch(model, prompts, params, engine=engine)
            sync()
            seconds = time.perf_counter() - t0
            print(f"| {name} | {gb} | {int(counts.sum()) / seconds:,.0f} | {seconds / args.new_tokens * 1e3:.2f} |")
            del engine
            torch.cuda.empty_cache() if device == "cuda" else None
    engine_module.SPAN_BUCKET_MIN = smallest

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        eager = Engine(model, b, 512, cuda_graph=False, compile=compile)
        positions = torch.full((b,), 256, device=device)
        for _ in range(3):
            eager.decode(tokens, positions)
        sync()
        with profile(activities=[ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                eager.decode(tokens, positions)
                sample_top_p(eager.decode(tokens, positions).float().softmax(-1), args.top_p, gen)
            sync()
        print("\nprofile: 6 compiled decode steps (no graph) at max_len 512 and 3 draws")
        key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=80))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
