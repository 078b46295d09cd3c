#!/usr/bin/env python3
"""Quality of top-k sparse attention against dense on one MLA model (CPU or GPU).

    python3 scripts/sparse_quality.py MODEL [--topk 1024,256] [--windows 5] [--window-len 4096]

Long-window perplexity as in longctx-smollm2-v1 (windows of --window-len tokens from token
131072 of the wikitext2-smollm2-v1 text, each from an empty cache; --windows 5 x 4096 is the
protocol's), dense and through the sparse selection of each --topk (window 64, sink 4,
r_idx --index-rank), via the masked dense path (exact selection, not the fast path). Prints
one row per setting with the relative ppl change; the target is <= 2 % at top-k 1024.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from mlakit.evaluate import EVAL_START, protocol_tokens, window_nll  # noqa: E402
from mlakit.loading import load  # noqa: E402
from mlakit.options import ForwardOptions  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--topk", default="1024,256")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--index-rank", type=int, default=64)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--window-len", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    loaded = load(args.model, dtype=torch.float32, device=args.device)
    tokens = protocol_tokens(loaded.tokenizer)
    windows = tokens[EVAL_START:EVAL_START + args.windows * args.window_len].view(args.windows, args.window_len)
    n = windows.shape[0] * (windows.shape[1] - 1)
    settings = [("dense", ForwardOptions())] + [
        (f"top-{k} + {args.window}w + {args.sink}s, r_idx {args.index_rank}",
         ForwardOptions(sparse_topk=int(k), sparse_window=args.window, sparse_sink=args.sink,
                        sparse_index_rank=args.index_rank)) for k in args.topk.split(",")]
    print(f"[longctx-smollm2-v1 long-window ppl, {args.windows} x {args.window_len}] {loaded.source}")
    print("| attention | ppl | vs dense | seconds |\n| --- | ---: | ---: | ---: |", flush=True)
    dense = None
    for name, options in settings:
        start = time.perf_counter()
        ppl = math.exp(float(window_nll(loaded.model, windows, batch_size=1, options=options)) / n)
        dense = dense or ppl
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / dense - 1):+.2f}% | {time.perf_counter() - start:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
