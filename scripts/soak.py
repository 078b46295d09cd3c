"""Soak: many generate requests of mixed lengths through ONE engine, on the CPU.

Each request (a random prompt of 1..64 tokens, 1..32 new tokens, greedy or seeded
sampling) runs through the same ``Engine`` (its cache reused); every output is
compared with the same request run alone (a fresh engine), and the process's
resident memory is sampled as the requests go. Prints a table; exit 1 when an
output differs or memory grows past the allowance.

    python scripts/soak.py                # 2,000 requests (a few minutes on 2 cores)
    python scripts/soak.py --requests 200
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mlakit import ModelConfig, Transformer  # noqa: E402
from mlakit.engine import Engine, SamplingParams, generate, generate_batch  # noqa: E402

MAX_PROMPT, MAX_NEW = 64, 32
GROWTH_ALLOWANCE_MB = 32  # allocator noise; a leak of one cache per request would be far more


def tiny_model(attention: str) -> Transformer:
    base = dict(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=48,
                max_seq_len=MAX_PROMPT + MAX_NEW, eos_token_ids=[1])
    if attention == "mla":
        base.update(attention="mla", kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)
    return Transformer(ModelConfig(**base)).init_random(seed=0, std=0.3).eval()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def request(rng: random.Random, vocab: int) -> tuple[list[int], SamplingParams]:
    prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(1, MAX_PROMPT))]
    greedy = rng.random() < 0.5
    params = SamplingParams(max_new_tokens=rng.randint(1, MAX_NEW), greedy=greedy, temperature=0.9,
                            top_k=rng.choice([None, 20]), top_p=rng.choice([None, 0.9]),
                            seed=None if greedy else rng.randrange(10**6))
    return prompt, params


def soak(model: Transformer, requests: int, seed: int = 0) -> dict:
    """Run ``requests`` through one engine; returns counts and memory figures."""
    rng = random.Random(seed)
    engine = Engine(model, 1, model.config.max_seq_len)
    mismatches, tokens, samples = 0, 0, []
    warmup = max(1, requests // 10)
    start = time.perf_counter()
    for i in range(requests):
        prompt, params = request(rng, model.config.vocab_size)
        out, counts = generate_batch(model, [prompt], params, engine=engine)
        got = out[0, : int(counts[0])].tolist()
        alone = generate(model, [prompt], params)[0]  # a fresh engine: the request on its own
        mismatches += got != alone
        tokens += len(got)
        if i + 1 == warmup or (i + 1) % max(1, requests // 10) == 0:
            gc.collect()
            samples.append((i + 1, rss_mb()))
    base = samples[0][1]
    return {"requests": requests, "tokens": tokens, "mismatches": mismatches, "seconds": time.perf_counter() - start,
            "rss_after_warmup_mb": base, "rss_end_mb": samples[-1][1],
            "growth_mb": max(mb for _, mb in samples) - base, "samples": samples}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ok = True
    print(f"soak: {args.requests} requests per model (prompts 1..{MAX_PROMPT}, 1..{MAX_NEW} new tokens, "
          "greedy and seeded sampling), one engine each, CPU")
    print("| model | requests | tokens | outputs = alone | RSS after warm-up | RSS at end | max growth | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for attention in ("gqa", "mla"):
        r = soak(tiny_model(attention), args.requests, args.seed)
        good = r["mismatches"] == 0 and r["growth_mb"] < GROWTH_ALLOWANCE_MB
        ok &= good
        print(f"| {attention.upper()} | {r['requests']} | {r['tokens']} | {r['requests'] - r['mismatches']}/"
              f"{r['requests']} | {r['rss_after_warmup_mb']:.1f} MB | {r['rss_end_mb']:.1f} MB | "
              f"{r['growth_mb']:+.1f} MB | {r['seconds']:.0f} |")
    print("PASS" if ok else f"FAIL (outputs must match; growth must stay under {GROWTH_ALLOWANCE_MB} MB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
