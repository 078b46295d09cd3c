"""Tiny in-memory models for the healing tests (no files, no tokenizer)."""

from __future__ import annotations

import torch

from mlakit import ModelConfig, Transformer

VOCAB = 64


def gqa_config(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=48,
                max_seq_len=128)
    return ModelConfig(**{**base, **kw})


def mla_config(rank=12, rope=4, nope=8, v=8, q_lora=None, latent_norm=False, bias=False, **kw) -> ModelConfig:
    return gqa_config(attention="mla", kv_lora_rank=rank, qk_rope_head_dim=rope, qk_nope_head_dim=nope,
                      v_head_dim=v, q_lora_rank=q_lora, latent_norm=latent_norm, qkv_bias=bias, o_bias=bias, **kw)


def random_model(config: ModelConfig, seed: int = 0, std: float = 0.2, dtype=torch.float32) -> Transformer:
    return Transformer(config).init_random(seed=seed, std=std).to(dtype).eval()


def perturbed(model: Transformer, seed: int = 1, scale: float = 0.3) -> Transformer:
    """A copy of ``model`` whose attention weights carry relative noise: a student to heal."""
    copy = Transformer(model.config)
    copy.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in copy.named_parameters():
            if ".attention." in name and param.dim() == 2:
                param.add_(scale * param.std() * torch.randn(param.shape, generator=generator))
    return copy.to(model.dtype).eval()


def random_windows(n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))
