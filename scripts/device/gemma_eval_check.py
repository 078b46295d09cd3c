#!/usr/bin/env python3
"""Where Gemma-3-270M's wikitext2-gemma3-270m-v1 differs between machines (issue "The models
people run today": 323.91 on an H200 against 55.54 on the CPU). Prints, for one machine, a
fingerprint of what the protocol sees (the tokenizer's ids of the protocol text, the weights
as loaded) and the perplexity of the first evaluation windows on each device asked for, so
two machines' outputs can be compared line by line.

    python3 scripts/device/gemma_eval_check.py --model /tmp/gemma/gemma-3-270m-q4_k_m.gguf --devices cpu,cuda
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository (mlakit is not installed there)

import torch  # noqa: E402

from mlakit import evaluate, loading  # noqa: E402


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--windows", type=int, default=8, help="first N of the 40 evaluation windows")
    args = parser.parse_args()
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    for device in args.devices.split(","):
        loaded = loading.load(args.model, dtype=torch.float32, device=device)
        tokens = evaluate.protocol_tokens(loaded.tokenizer)
        print(f"[{device}] tokenizer {type(loaded.tokenizer).__name__}: {tokens.numel()} ids, "
              f"sha {digest(tokens)}, first {tokens[:12].tolist()}, eval first {tokens[131072:131080].tolist()}")
        state = loaded.model.state_dict()
        print(f"[{device}] weights: {len(state)} tensors, embed sha {digest(state['tok_embeddings.weight'].float())}, "
              f"sum of sums {sum(float(v.double().sum()) for v in state.values()):.6e}")
        windows = evaluate.eval_windows(tokens)[: args.windows]
        nll = evaluate.window_nll(loaded.model, windows, batch_size=4)
        ppl = float(torch.exp(nll / (windows.shape[0] * (windows.shape[1] - 1))))
        with torch.no_grad():
            logits = loaded.model(windows[:1, :64].to(device)).float().cpu()
        print(f"[{device}] first {args.windows} windows ppl {ppl:.4f}; logits[0, :64] sha-free sum "
              f"{float(logits.double().sum()):.6e}, abs max {float(logits.abs().max()):.4f}", flush=True)
        del loaded
    return 0


if __name__ == "__main__":
    sys.exit(main())
