"""Greedy generation of a small MLA model in absorbed mode, with and without the
decode kernel; prints JSON. Run with TRITON_INTERPRET=1 on the CPU (the kernel
through Triton's interpreter) or on CUDA: ``python _model_greedy.py [cuda]``."""

import json
import sys

import torch

from mlakit import ModelConfig, Transformer
from mlakit.engine import Engine, SamplingParams, generate_batch
from mlakit.options import ForwardOptions


def run(device: str, dtype: torch.dtype, kv_lora_rank: int = 24, rope_dim: int = 8) -> dict:
    """Rank 24 + rope 8 runs the Triton kernel; rank 64 + rope 16 in bf16/fp16 the Gluon one on Hopper."""
    import mlakit.kernels as kernels
    from mlakit.kernels import mla_decode_gluon

    config = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=9, n_kv_heads=9, head_dim=16,
                         intermediate_size=96, attention="mla", kv_lora_rank=kv_lora_rank, qk_rope_head_dim=rope_dim,
                         qk_nope_head_dim=16, v_head_dim=16, latent_norm=True, max_seq_len=64)
    model = Transformer(config).init_random(seed=0, std=0.3).to(device, dtype)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]  # ragged: the prefill is right-padded
    params = SamplingParams(max_new_tokens=10, greedy=True, stop_token_ids=[])
    tokens = torch.tensor([prompts[1]], device=device)

    def run_with(kernels: bool) -> tuple[list[list[int]], torch.Tensor]:
        options = ForwardOptions(mla_path="absorbed", kernels=kernels)
        engine = Engine(model, len(prompts), 3 + 7 + params.max_new_tokens, options=options)
        out, counts = generate_batch(model, prompts, params, engine=engine)
        generated = [row[:n] for row, n in zip(out.tolist(), counts.tolist())]
        # absorbed logits: prefill 4 tokens, then 3 single-token steps
        cache = model.new_cache(1, 16)
        logits = [model(tokens[:, :4], cache=cache, options=options)]
        logits += [model(tokens[:, i:i + 1], torch.tensor([[i]], device=device), cache, options) for i in range(4, 7)]
        return generated, torch.cat(logits, 1).double()

    with torch.no_grad():
        with_kernel, logits_kernel = run_with(kernels=True)
        plain, logits_plain = run_with(kernels=False)
    probe = torch.empty(1, 1, 9, kv_lora_rank, dtype=dtype, device=device)
    gluon = mla_decode_gluon.applies(probe, torch.empty(1, 1, kv_lora_rank + rope_dim, dtype=dtype, device=device),
                                     rope_dim)
    return {"triton": kernels.HAS_TRITON and (device == "cuda" or kernels.INTERPRET), "gluon": gluon,
            "with_kernel": with_kernel, "plain": plain,
            "logits_rel_err": ((logits_kernel - logits_plain).norm() / logits_plain.norm()).item()}


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    results = {str(dtype): run(device, dtype) for dtype in (torch.float32, torch.bfloat16)}
    if device == "cuda":  # shapes the Gluon kernel takes (on Hopper)
        results.update({f"{dtype}-rank64": run(device, dtype, 64, 16) for dtype in (torch.bfloat16, torch.float16)})
    print(json.dumps(results))
