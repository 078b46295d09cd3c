"""Soak: many generate requests of mixed lengths through ONE engine.

Each request (a random prompt of 1..64 tokens, 1..32 new tokens, greedy or seeded
sampling) runs through the same ``Engine`` (its cache reused, CUDA graphs on a GPU);
every output is compared with the same request run alone (a fresh engine of the same
kind), and the process's resident memory (and on a GPU, the memory torch holds there) is
sampled as the requests go. Prints a table; exit 1 when an output differs or memory grows
past the allowance.

    python scripts/soak.py                # CPU, tiny GQA and MLA models, 2,000 requests each
    python scripts/soak.py --requests 200
    python scripts/soak.py --model default --device cuda --requests 10000 --workers 6

``--workers N`` runs the one-at-a-time references in N other processes while the one
engine works through the requests (on a GPU a fresh engine captures its CUDA graphs
anew for every request, which is what makes the references the slow half).
``--check-every N`` compares every Nth request only (all of them still run through the
engine, and memory is sampled over all). On an H200, 10,000 requests with every 10th
checked by 6 workers took 842 s (docs/results/soak_h200.md).
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
from mlakit.engine import Engine, SamplingParams, generate_batch  # noqa: E402

MAX_PROMPT, MAX_NEW = 64, 32
GROWTH_ALLOWANCE_MB = 32  # allocator noise; a leak of one cache per request would be far more


def tiny_model(attention: str) -> Transformer:
    base = dict(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=48,
                max_seq_len=MAX_PROMPT + MAX_NEW, eos_token_ids=[1])
    if attention == "mla":
        base.update(attention="mla", kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)
    return Transformer(ModelConfig(**base)).init_random(seed=0, std=0.3).eval()


def load_model(name: str, device: str) -> Transformer:
    """``gqa`` / ``mla``: a tiny random model; anything else: ``mlakit.loading.load`` (e.g. ``default``)."""
    if name in ("gqa", "mla"):
        return tiny_model(name).to(device)
    from mlakit.loading import load

    return load(name, device=device).model.eval()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def device_mb(model: Transformer) -> float:
    return torch.cuda.memory_allocated(model.device) / 2**20 if model.device.type == "cuda" else 0.0


def request(rng: random.Random, vocab: int) -> tuple[list[int], SamplingParams]:
    prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(1, MAX_PROMPT))]
    greedy = rng.random() < 0.5
    params = SamplingParams(max_new_tokens=rng.randint(1, MAX_NEW), greedy=greedy, temperature=0.9,
                            top_k=rng.choice([None, 20]), top_p=rng.choice([None, 0.9]),
                            seed=None if greedy else rng.randrange(10**6))
    return prompt, params


def requests_for(model: Transformer, n: int, seed: int) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    return [request(rng, model.config.vocab_size) for _ in range(n)]


def run_one(model: Transformer, engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    out, counts = generate_batch(model, [prompt], params, engine=engine)
    return out[0, : int(counts[0])].tolist()


def alone(model: Transformer, prompt: list[int], params: SamplingParams) -> list[int]:
    """The request on its own: a fresh engine of the soak engine's kind."""
    return run_one(model, Engine(model, 1, MAX_PROMPT + MAX_NEW), prompt, params)


_WORKER_MODEL: Transformer | None = None


def _worker_init(name: str, device: str) -> None:
    global _WORKER_MODEL
    torch.set_num_threads(1)
    _WORKER_MODEL = load_model(name, device)


def _worker_alone(job: tuple[int, list[int], SamplingParams]) -> tuple[int, list[int]]:
    i, prompt, params = job
    return i, alone(_WORKER_MODEL, prompt, params)


def soak(model: Transformer, requests: int, seed: int = 0, workers: int = 0, model_name: str | None = None,
         log=None, check_every: int = 1) -> dict:
    """Run ``requests`` through one engine; returns counts and memory figures. Every
    ``check_every``-th request (0, N, 2N, ...) is compared with the same request run alone.
    ``workers``: compute those references in that many processes (they load ``model_name``).
    ``log``: called with a progress line at every tenth of the requests (a run stopped early
    still says how far it got)."""
    jobs = requests_for(model, requests, seed)
    checked = range(0, requests, check_every)
    pool = results = None
    if workers:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers, _worker_init, (model_name, str(model.device)))
        results = pool.imap_unordered(_worker_alone, [(i, *jobs[i]) for i in checked], chunksize=8)
    engine = Engine(model, 1, MAX_PROMPT + MAX_NEW)
    # only the checked outputs are kept: holding all of them (a list of int objects per request,
    # ~0.5 kB at the default model's vocabulary) is itself a growth the memory samples would count
    outputs, references, samples, tokens = {}, {}, [], 0
    every = max(1, requests // 10)
    start = time.perf_counter()
    for i, (prompt, params) in enumerate(jobs):
        got = run_one(model, engine, prompt, params)
        tokens += len(got)
        if i % check_every == 0:
            outputs[i] = got
            if not workers:
                references[i] = alone(model, prompt, params)
        if i + 1 == every or (i + 1) % every == 0:
            gc.collect()
            samples.append((i + 1, rss_mb(), device_mb(model)))
            if log is not None:
                log(f"  {i + 1}/{requests} through the engine in {time.perf_counter() - start:.0f} s, "
                    f"RSS {samples[-1][1]:.1f} MB, GPU {samples[-1][2]:.1f} MB")
    engine_seconds = time.perf_counter() - start
    if workers:
        references = dict(results)
        pool.close()
        pool.join()
    mismatches = sum(outputs[i] != references[i] for i in checked)
    base = samples[0]
    return {"requests": requests, "tokens": tokens, "checked": len(checked),
            "mismatches": mismatches,
            "seconds": time.perf_counter() - start, "engine_seconds": engine_seconds,
            "rss_after_warmup_mb": base[1], "rss_end_mb": samples[-1][1],
            "growth_mb": max(s[1] for s in samples) - base[1],
            "device_growth_mb": max(s[2] for s in samples) - base[2], "samples": samples}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per model (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="gqa,mla",
                        help="comma-separated: gqa / mla (tiny random models) or a model mlakit loads, e.g. default")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--workers", type=int, default=0, help="processes for the one-at-a-time references")
    parser.add_argument("--check-every", type=int, default=1, metavar="N",
                        help="compare every Nth request with it run alone (default 1: all)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.workers < 0 or args.check_every < 1:
        parser.error("--requests and --check-every must be >= 1 and --workers >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    torch.set_num_threads(1)
    ok = True
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"soak: {args.requests} requests per model (prompts 1..{MAX_PROMPT}, 1..{MAX_NEW} new tokens, "
          f"greedy and seeded sampling), one engine each, {where}")
    print("| model | requests | tokens | checked outputs = alone | RSS after warm-up | RSS at end | max growth | "
          "GPU memory growth | engine s | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.model.split(","):
        r = soak(load_model(name, args.device), args.requests, args.seed, args.workers, name,
                 log=lambda line: print(line, file=sys.stderr, flush=True), check_every=args.check_every)
        good = (r["mismatches"] == 0 and r["growth_mb"] < GROWTH_ALLOWANCE_MB
                and r["device_growth_mb"] < GROWTH_ALLOWANCE_MB)
        ok &= good
        print(f"| {name} | {r['requests']} | {r['tokens']} | {r['checked'] - r['mismatches']}/"
              f"{r['checked']} | {r['rss_after_warmup_mb']:.1f} MB | {r['rss_end_mb']:.1f} MB | "
              f"{r['growth_mb']:+.1f} MB | {r['device_growth_mb']:+.1f} MB | {r['engine_seconds']:.0f} | "
              f"{r['seconds']:.0f} |", flush=True)
    print("PASS" if ok else f"FAIL (outputs must match; growth must stay under {GROWTH_ALLOWANCE_MB} MB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
