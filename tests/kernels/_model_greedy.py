"""Greedy generation of a small MLA model in absorbed mode, with and without the
decode kernel; prints JSON. Run with TRITON_INTERPRET=1 on the CPU (the kernel
through Triton's interpreter) or on CUDA: ``python _model_greedy.py [cuda]``."""

import json
import sys

import torch

from mlakit import ModelConfig, Transformer
from mlakit.engine import SamplingParams, generate


def run(device: str, dtype: torch.dtype) -> dict:
    import mlakit.kernels as kernels

    config = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=9, n_kv_heads=9, head_dim=16,
                         intermediate_size=96, attention="mla", kv_lora_rank=24, qk_rope_head_dim=8,
                         qk_nope_head_dim=16, v_head_dim=16, latent_norm=True, max_seq_len=64)
    model = Transformer(config).init_random(seed=0, std=0.3).to(device, dtype)
    model.set_mla_mode("absorbed")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]  # ragged: the prefill is right-padded
    params = SamplingParams(max_new_tokens=10, greedy=True, stop_token_ids=[])
    tokens = torch.tensor([prompts[1]], device=device)

    def decode_logits() -> torch.Tensor:  # prefill 4 tokens, then 3 single-token steps
        cache = model.new_cache(1, 16)
        out = [model(tokens[:, :4], cache=cache)]
        out += [model(tokens[:, i:i + 1], torch.tensor([[i]], device=device), cache) for i in range(4, 7)]
        return torch.cat(out, 1).double()

    with torch.no_grad():
        model.set_kernels(True)
        with_kernel, logits_kernel = generate(model, prompts, params), decode_logits()
        model.set_kernels(False)
        plain, logits_plain = generate(model, prompts, params), decode_logits()
    return {"triton": kernels.HAS_TRITON and (device == "cuda" or kernels.INTERPRET),
            "with_kernel": with_kernel, "plain": plain,
            "logits_rel_err": ((logits_kernel - logits_plain).norm() / logits_plain.norm()).item()}


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    print(json.dumps({str(dtype): run(device, dtype) for dtype in (torch.float32, torch.bfloat16)}))
