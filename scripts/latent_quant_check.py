"""Which latent basis quantises best (mlakit.convert.rotate), measured on an MLA checkpoint on
the CPU: each transform of the latent (none, hadamard, equalize, equalize+hadamard), each cache
format, the ppl of held-out calibration windows (never the evaluation range):

    python scripts/latent_quant_check.py CKPT [--formats bf16,int8,int4] [--protocol]

The equalisation's statistics come from calibration tokens [0, 8192) (as the converter's);
the ppl from 8 windows x 512 of calibration tokens [16384, 20480). ``--protocol`` adds
wikitext2-smollm2-v1 (the protocol's 40 windows) for every row, ``--long`` the long-window ppl
of longctx-smollm2-v1 (5 windows x 4096 of the evaluation range). ``--unturned`` adds, for each
transform, a row with the quantised RoPE key (the ``+rope`` formats) rounded as it is instead
of turned first (``mlakit.quant.cache_turn``): what the turn buys, side by side.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mlakit import attention  # noqa: E402
from mlakit import evaluate as ev  # noqa: E402
from mlakit.quant import fake_quantize  # noqa: E402
from mlakit.convert.rotate import ROTATIONS, transform_latent  # noqa: E402
from mlakit.loading import load  # noqa: E402
from mlakit.frontier import window_ppl  # noqa: E402
from mlakit.options import ForwardOptions  # noqa: E402


def ppl(model, windows, fmt: str, batch_size: int) -> float:
    return window_ppl(model, windows, batch_size, ForwardOptions.for_cache(fmt))  # kv-frontier-v1's figures, as stored


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--formats", default="bf16,int8,int4")
    parser.add_argument("--transforms", default=",".join(ROTATIONS))
    parser.add_argument("--protocol", action="store_true")
    parser.add_argument("--long", action="store_true", help="add longctx-smollm2-v1's long-window ppl")
    parser.add_argument("--unturned", action="store_true", help="also rows with the RoPE key rounded unturned")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = load(args.checkpoint, dtype=torch.float32)
    tokens = ev.protocol_tokens(base.tokenizer)
    stats = ev.calibration_tokens(base.tokenizer, 8192)[:8192].view(16, 512)
    sets = [("held-out calib", tokens[16384:20480].view(8, 512), 4)]
    if args.protocol:
        sets.append((ev.PROTOCOL, ev.eval_windows(tokens), 4))
    if args.long:
        sets.append((f"{ev.LONG_PROTOCOL} long window", ev.long_windows(tokens), 1))
    formats = args.formats.split(",")
    head = ["transform"] + [f"{f} ({name})" for name, _, _ in sets for f in formats]
    print(f"checkpoint {args.checkpoint}; ppl through the cache as stored\n")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head), flush=True)
    turned = attention.fake_quantize_turned
    for kind in args.transforms.split(","):
        model = load(args.checkpoint, dtype=torch.float32).model
        transform_latent(model, kind, stats)
        for turn in (True, False) if args.unturned else (True,):
            start = time.perf_counter()
            attention.fake_quantize_turned = turned if turn else fake_quantize  # the uncached path's rounding
            cells = [f"{ppl(model, windows, f, batch):.2f}" for _, windows, batch in sets for f in formats]
            label = kind if turn else f"{kind}, RoPE key unturned"
            print(f"| {label} | " + " | ".join(cells) + f" |   ({time.perf_counter() - start:.0f} s)", flush=True)
    attention.fake_quantize_turned = turned
    return 0


if __name__ == "__main__":
    sys.exit(main())
