"""GPU check of the core (issue 2): parity with transformers on CUDA in float32 and
bfloat16, MLA naive == absorbed, and greedy generation of the default model.

Run on the GPU machine from the repo root:  PYTHONPATH=. python scripts/device/core_check.py
(the default-model rows need the `default` model; they are skipped when it is missing).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mlakit import MlakitError, Transformer  # noqa: E402
from mlakit.engine import SamplingParams, generate  # noqa: E402
from mlakit.options import ForwardOptions  # noqa: E402
from mlakit.loading import default_model_path, load, no_hub_kernels  # noqa: E402
from mlakit.testing.models import save_tiny  # noqa: E402


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def parity_rows(device: str) -> list[tuple]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, kv in [("llama", 6), ("llama", 2), ("mistral", 3), ("qwen2", 2), ("qwen2", 6)]:
            hf_model, path = save_tiny(Path(tmp), arch, kv)
            hf_model = hf_model.to(device)
            tokens = torch.randint(0, 211, (4, 64), generator=torch.Generator().manual_seed(0)).to(device)
            with torch.no_grad():
                ref = hf_model(tokens).logits
                for dtype in (torch.float32, torch.bfloat16):
                    model = load(path, dtype=dtype, device=device).model
                    full = model(tokens).float()
                    cache = model.new_cache(4, 64)
                    pre = model(tokens[:, :32], cache=cache)
                    steps = [model(tokens[:, i:i + 1], torch.full((4, 1), i, device=device), cache)
                             for i in range(32, 64)]
                    inc = torch.cat([pre, *steps], 1).float()
                    rows.append((f"{arch} kv={kv}", str(dtype).replace("torch.", ""), rel(full, ref), rel(inc, ref)))
    return rows


def mla_rows(device: str) -> list[tuple]:
    from test_attention import mla_config

    rows = []
    for case in [dict(n_heads=9, rank=16, rope=8, nope=0, v=8), dict(n_heads=16, rank=64, rope=32, nope=32, v=32,
                                                                         q_lora=48, latent_norm=True)]:
        base = Transformer(mla_config(**case)).init_random(seed=1, std=0.2)
        tokens = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            ref = base.double()(tokens)  # float64 naive on the CPU
            for dtype in (torch.float32, torch.bfloat16):
                model = Transformer(base.config).to(device)
                model.load_state_dict(base.state_dict())
                model = model.to(dtype)
                out = {}
                for mode in ("naive", "absorbed"):
                    out[mode] = model(tokens.to(device), options=ForwardOptions(mla_path=mode)).float().cpu()
                rows.append((f"MLA h={case['n_heads']} r={case['rank']}", str(dtype).replace("torch.", ""),
                             rel(out["naive"], ref), rel(out["absorbed"], ref)))
    return rows


def greedy_rows(device: str) -> list[tuple]:
    try:
        path = default_model_path()
    except MlakitError as e:
        return [("default", "-", f"skipped: {e}", "", "")]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt").to(device)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                        dtype=torch.float32, **no_hub_kernels())
        hf_model = hf_model.to(device=device, dtype=dtype).eval()
        expected = hf_model.generate(**ids, max_new_tokens=32, do_sample=False)[0, ids.input_ids.shape[1]:].tolist()
        model = load("default", dtype=dtype, device=device).model
        start = time.perf_counter()
        got = generate(model, [ids.input_ids[0].tolist()], SamplingParams(max_new_tokens=32, greedy=True))[0]
        seconds = time.perf_counter() - start
        same = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        rows.append(("default greedy", str(dtype).replace("torch.", ""), got == expected,
                     f"{same}/{len(expected)}", repr(tokenizer.decode(got))[:60]))
        del hf_model
        print(f"  {dtype}: {len(got)} tokens in {seconds:.2f} s (eager, no graphs)")
    return rows


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"mlakit core check on {name}, torch {torch.__version__}")
    print("\n| model | dtype | logits rel err (full) | logits rel err (cached decode) |\n|---|---|---|---|")
    for row in parity_rows(device):
        print("| %s | %s | %.2e | %.2e |" % row)
    print("\n| MLA model | dtype | naive vs float64 | absorbed vs float64 |\n|---|---|---|---|")
    for row in mla_rows(device):
        print("| %s | %s | %.2e | %.2e |" % row)
    print("\n| check | dtype | mlakit == transformers | tokens equal | text |\n|---|---|---|---|---|")
    for row in greedy_rows(device):
        print("| %s | %s | %s | %s | %s |" % row)


if __name__ == "__main__":
    main()
