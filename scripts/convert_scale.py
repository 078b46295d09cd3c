"""Wall time and peak RSS of one conversion (run one per process: peak RSS is per process).

    python scripts/convert_scale.py default [--calib-tokens N] [--kv-saving F]
    python scripts/convert_scale.py llama3.2-1b [--calib-tokens N]   # random weights, random calibration ids

Prints one JSON line: model, parameters, calib tokens, seconds per stage, peak RSS (GiB).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help="'default' or a preset name (random weights)")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--kv-saving", type=float, default=0.5)
    parser.add_argument("--rank-allocation", default="uniform")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from mlakit.config import preset
    from mlakit.convert import ConvertOptions, convert
    from mlakit.evaluate import calibration_tokens
    from mlakit.loading import load
    from mlakit.model import Transformer

    start = time.perf_counter()
    if args.model == "default":
        loaded = load("default", device=args.device)
        model = loaded.model
        tokens = calibration_tokens(loaded.tokenizer, args.calib_tokens)
    else:
        config = preset(args.model)
        with torch.device(args.device):
            model = Transformer(config).init_random().eval()
        tokens = torch.randint(0, config.vocab_size, (args.calib_tokens,), generator=torch.Generator().manual_seed(0))
    load_s = time.perf_counter() - start
    rss_model = peak_rss_gib()
    with tempfile.TemporaryDirectory(prefix="mlakit-convert-") as spill:  # as `mlakit convert` does
        options = ConvertOptions(kv_saving=args.kv_saving, calib_tokens=args.calib_tokens,
                                 rank_allocation=args.rank_allocation, spill_dir=spill)
        mla, summary = convert(model, tokens, options)
    print(json.dumps({
        "model": args.model, "parameters": model.num_parameters(), "device": args.device,
        "calib_tokens": int(tokens.numel()), "kv_saving": summary.kv_saving, "load_s": round(load_s, 1),
        **{f"{k}_s": round(v, 1) for k, v in summary.seconds.items()},
        "peak_rss_gib_after_load": round(rss_model, 2), "peak_rss_gib": round(peak_rss_gib(), 2),
        "model_gib_fp32": round(model.num_parameters() * 4 / 2**30, 2),
    }))


if __name__ == "__main__":
    main()
