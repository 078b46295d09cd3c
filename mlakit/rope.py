"""Rotary position embeddings (Llama "rotate_half" convention) and their frequencies."""

from __future__ import annotations

import math

import torch

from mlakit.config import ModelConfig


def rope_inv_freq(config: ModelConfig, dim: int, layer_type: str = "full_attention") -> torch.Tensor:
    """The ``dim // 2`` inverse frequencies of a rotary embedding over ``dim`` dims,
    with the config's scaling (linear or Llama-3), as transformers computes them.
    Sliding layers of a model with ``rope_local_theta`` (Gemma 3) use that base, unscaled."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    local = layer_type == "sliding_attention" and config.rope_local_theta is not None
    inv_freq = 1.0 / ((config.rope_local_theta if local else config.rope_theta) ** exponent)  # [dim // 2]
    scaling = {} if local else (config.rope_scaling or {})
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed down by `factor`, short ones kept, the band between blended
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def mla_rope_inv_freq(config: ModelConfig, layer_type: str = "full_attention") -> torch.Tensor:
    """Frequencies of MLA's shared RoPE key: a chosen subset of the source model's
    per-head frequencies (converted models) or the standard ones (native MLA)."""
    if config.qk_rope_freq_indices is not None:
        source = rope_inv_freq(config, config.head_dim, layer_type)
        return source[torch.tensor(config.qk_rope_freq_indices, dtype=torch.long)]
    return rope_inv_freq(config, config.qk_rope_head_dim, layer_type)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[b, s, dim // 2]`` in float32 for integer ``positions [b, s]``."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [b, s, ..., dim]`` by cos/sin ``[b, s, dim // 2]``: pair ``(i, i + dim/2)``
    turns by angle ``i``. Math in x's dtype, as transformers does."""
    if x.shape[-1] == 0:
        return x
    while cos.dim() < x.dim():  # broadcast over head dims
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
