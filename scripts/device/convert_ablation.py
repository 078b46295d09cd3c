"""Where the conversion loses (default model, wikitext2-smollm2-v1): one calibration, many budgets
and method variants, each evaluated on the protocol's 40 windows. Fast on a GPU (~5 s a row).

    python scripts/device/convert_ablation.py [--device cuda] [--out DIR]

Rows: RoPE-only loss (latent at full rank), the RoPE / latent split of each budget, the key
weight alpha, value fit, calibration size. Prints one Markdown table; writes ablation.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from mlakit.convert import ConvertOptions, analyse, convert_model
from mlakit.evaluate import PROTOCOL, calibration_tokens, evaluate
from mlakit.loading import LoadedModel, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="a few rows only")
    args = parser.parse_args()
    loaded = load("default", dtype=torch.float32, device=args.device)
    base = ConvertOptions(progress=False)
    grid: list[tuple[str, dict]] = []
    rope_dims = {0.667: (16, 24, 32, 48), 0.75: (8, 16, 24, 32, 48), 0.833: (8, 16, 24, 32)}
    for saving, values in ((0.667, 128), (0.75, 96), (0.833, 64)):
        for p in rope_dims[saving]:
            grid.append((f"{saving:g}", dict(kv_lora_rank=values - p, rope_dim=p)))
    for p in (16, 24):  # RoPE choice alone: latent at full rank (= the original's budget)
        grid.append(("rope only", dict(kv_lora_rank=2 * (96 - p // 2) + 192, rope_dim=p)))
    for alpha in (10.0, 100.0):
        grid.append(("0.75 alpha", dict(kv_saving=0.75, alpha=alpha)))
    grid.append(("0.75 no rho", dict(kv_saving=0.75, nope_rotation="none")))
    if args.quick:
        grid = grid[:3]
    analyses = {}
    rows = []
    print(f"protocol {PROTOCOL}, device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}")
    print("| group | budget / variant | rope dim | latent rank | ppl | s |")
    print("|---|---|---|---|---|---|")
    for group, kw in grid + [("0.75 calib 32768", dict(kv_saving=0.75, calib_tokens=32768))]:
        options = dataclasses.replace(base, **kw)
        key = options.calib_tokens
        if key not in analyses:
            analyses[key] = analyse(loaded.model, calibration_tokens(loaded.tokenizer, key), options)
        t = time.perf_counter()
        model, summary = convert_model(loaded.model, analyses[key], options)
        ppl = evaluate(LoadedModel(model, loaded.tokenizer, group), progress=False).ppl
        del model
        row = {"group": group, **kw, "rope_dim": summary.rope_dim, "rank": summary.ranks[0], "ppl": ppl,
               "seconds": time.perf_counter() - t}
        rows.append(row)
        detail = ", ".join(f"{k}={v}" for k, v in kw.items())
        print(f"| {group} | {detail} | {summary.rope_dim} | {summary.ranks[0]} | {ppl:.2f} | {row['seconds']:.0f} |",
              flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "ablation.json").write_text(json.dumps({"protocol": PROTOCOL, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
