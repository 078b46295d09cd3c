#!/usr/bin/env python3
"""GPU check of the model families at real attention shapes (issue "The models people run
today"): random transformers models (Gemma 3 with Gemma-3-270M's attention: 4 query heads,
1 KV head, head_dim 256, query_pre_attn_scalar 256, window 512; Qwen3 and Llama with
head_dim 256 and 128) loaded by mlakit on the GPU in float32, logits against transformers'
own float32 forward on the CPU, for windows shorter and longer than the sliding window and
batches of 1 and 4. Prints a table; exit 1 when a rel err exceeds 1e-4.

    python3 scripts/device/family_parity_check.py          # on the GPU machine
    python3 scripts/device/family_parity_check.py --device cpu --quick   # the CPU, small (tests)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository (mlakit is not installed there)

import torch  # noqa: E402

from mlakit import loading  # noqa: E402
from mlakit.testing.models import tiny_hf_model  # noqa: E402

CASES = {  # name: (arch, n_kv_heads, overrides)
    "gemma3 270m attention": ("gemma3", 1, dict(num_attention_heads=4, head_dim=256, query_pre_attn_scalar=256,
                                                sliding_window=512, hidden_size=640, intermediate_size=256,
                                                num_hidden_layers=6, sliding_window_pattern=6,
                                                max_position_embeddings=4096)),
    "qwen3 head_dim 256": ("qwen3", 2, dict(num_attention_heads=4, head_dim=256, hidden_size=256,
                                            max_position_embeddings=4096)),
    "llama head_dim 128": ("llama", 2, dict(num_attention_heads=4, head_dim=128, hidden_size=256,
                                            max_position_embeddings=4096)),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="short windows only (the CPU)")
    args = parser.parse_args()
    lengths = (64, 300) if args.quick else (300, 512, 1100)
    print(f"| model | tokens | batch | rel err, mlakit on {args.device} vs transformers on the CPU (float32) |")
    print("|---|---:|---:|---:|")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, (arch, kv, overrides) in CASES.items():
            hf = tiny_hf_model(arch, kv, **overrides).float()
            path = Path(tmp) / arch
            hf.save_pretrained(path)
            model = loading.load(path, dtype=torch.float32, device=args.device).model
            for s in lengths:
                for b in (1, 4):
                    ids = torch.randint(3, 211, (b, s), generator=torch.Generator().manual_seed(s + b))
                    with torch.no_grad():
                        want = hf(ids).logits
                        got = model(ids.to(args.device))
                    err = rel_err(got, want)
                    worst = max(worst, err)
                    print(f"| {name} | {s} | {b} | {err:.2e} |", flush=True)
            with torch.no_grad():  # a control: another seed's model must not agree
                other = tiny_hf_model(arch, kv, seed=1, **overrides).float()(ids).logits
            control = rel_err(got, other)
            print(f"| {name}, control: another seed | {s} | {b} | {control:.2e} |", flush=True)
            if control < 0.1:
                worst = float("inf")
            del model
    print("PASS" if worst <= 1e-4 else f"FAIL (worst {worst:.2e} > 1e-4)")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
