"""KV caches as modules: preallocated buffers, a per-sequence length tensor, reset().

Slot index == token position: sequence ``b`` writes the token at position ``p``
into row ``b``, slot ``p``. Positions fill each row from 0 upwards, so every slot a
query may see (``slot <= its position``) has been written by the current
sequence; stale slots past that are masked. Nothing is reallocated while
decoding, so shapes stay fixed for CUDA graphs and ``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import nn

from mlakit.config import ModelConfig


class _Cache(nn.Module):
    """What every cache shares: the buffer bookkeeping and ``lengths``."""

    def __init__(self, max_batch: int, max_len: int, device: torch.device | str | None) -> None:
        super().__init__()
        self.max_batch = max_batch
        self.max_len = max_len
        # [max_batch] length of each sequence: last written position + 1
        self.register_buffer("lengths", torch.zeros(max_batch, dtype=torch.int32, device=device), persistent=False)

    def reset(self) -> None:
        self.lengths.zero_()

    def _check(self, positions: torch.Tensor) -> None:
        if torch.compiler.is_compiling():
            return  # host-side argument checks; a compiled step would specialise on them
        batch = positions.shape[0]
        if batch > self.max_batch:
            raise ValueError(f"batch {batch} exceeds the cache's max_batch {self.max_batch}")
        # The position bound needs the values on the host: checked on the CPU only, so a
        # GPU step never syncs (and can be captured in a CUDA graph); the engine checks there.
        if positions.device.type == "cpu" and positions.numel() and int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} exceeds the cache's max_len {self.max_len}")

    def _advance(self, positions: torch.Tensor) -> None:
        # After writing positions [b, s] (consecutive), each sequence ends at its last one.
        # Not a running max: a right-padded prefill writes past a short prompt's end, and
        # that prompt's next token (written at its true length) sets the length back.
        batch = positions.shape[0]
        self.lengths[:batch] = (positions[:, -1] + 1).to(self.lengths.dtype)

    def bytes_per_token(self) -> int:
        raise NotImplementedError


class KVCache(_Cache):
    """Per-head keys and values of one layer (MHA / GQA / MQA).

    Head-major ``[B, kv_heads, L, head_dim]``: attention reads each head's keys as one
    contiguous block, with no transpose copy per step.
    """

    def __init__(self, max_batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(max_batch, max_len, device)
        shape = (max_batch, n_kv_heads, max_len, head_dim)  # [B, kv_heads, L, head_dim]
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ``[b, s, kv_heads, head_dim]`` at ``positions [b, s]``;
        return this batch's whole buffers ``[b, kv_heads, L, head_dim]``."""
        self._check(positions)
        batch = k.shape[0]
        rows = torch.arange(batch, device=positions.device)[:, None]  # [b, 1]
        # advanced indices around a slice: the indexed view is [b, s, kv_heads, head_dim]
        self.k[rows, :, positions] = k.to(self.k.dtype)
        self.v[rows, :, positions] = v.to(self.v.dtype)
        self._advance(positions)
        return self.k[:batch], self.v[:batch]

    def bytes_per_token(self) -> int:
        return 2 * self.k.shape[1] * self.k.shape[3] * self.k.element_size()


class LatentCache(_Cache):
    """MLA cache of one layer: the latent and the shared RoPE key, nothing per head.

    One packed buffer ``kv [B, L, kv_lora_rank + rope_dim]`` (latent first) so
    that the absorbed decode reads one contiguous row per token.
    """

    def __init__(self, max_batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(max_batch, max_len, device)
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.register_buffer("kv", torch.zeros(max_batch, max_len, kv_lora_rank + rope_dim,
                                               dtype=dtype, device=device), persistent=False)

    @property
    def latent(self) -> torch.Tensor:  # [B, L, r] (a view)
        return self.kv[..., : self.kv_lora_rank]

    @property
    def k_rope(self) -> torch.Tensor:  # [B, L, rope_dim] (a view)
        return self.kv[..., self.kv_lora_rank:]

    def update(self, latent: torch.Tensor, k_rope: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Write latent ``[b, s, r]`` and rotated k_rope ``[b, s, rope_dim]`` at
        ``positions [b, s]``; return this batch's packed buffer ``[b, L, r + rope_dim]``."""
        self._check(positions)
        batch = latent.shape[0]
        rows = torch.arange(batch, device=positions.device)[:, None]  # [b, 1]
        self.kv[rows, positions] = torch.cat([latent, k_rope], dim=-1).to(self.kv.dtype)
        self._advance(positions)
        return self.kv[:batch]

    def append_rotated(self, latent: torch.Tensor, k_rope: torch.Tensor, positions: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, norm_weight: torch.Tensor | None,
                       norm_eps: float) -> torch.Tensor:
        """``update`` with the latent RMSNorm (when ``norm_weight`` is given) and the RoPE
        of the key fused in: latent ``[b, s, r]`` and the *unrotated* key ``[b, s, rope_dim]``
        at ``positions [b, s]``, angles ``cos, sin [b, s, rope_dim / 2]``. One kernel
        (``mlakit.kernels.rope_append``: Triton on CUDA, its reference elsewhere);
        returns this batch's packed buffer ``[b, L, r + rope_dim]``."""
        from mlakit.kernels import rope_append

        self._check(positions)
        rope_append(latent, k_rope, self.kv, positions, cos, sin, norm_weight, norm_eps)
        self._advance(positions)
        return self.kv[: latent.shape[0]]

    def bytes_per_token(self) -> int:
        return self.kv.shape[-1] * self.kv.element_size()


def make_layer_cache(config: ModelConfig, layer: int, max_batch: int, max_len: int,
                     dtype: torch.dtype, device: torch.device | str | None) -> _Cache:
    if config.is_mla:
        return LatentCache(max_batch, max_len, config.kv_lora_ranks()[layer], config.qk_rope_head_dim,
                           dtype=dtype, device=device)
    return KVCache(max_batch, max_len, config.n_kv_heads, config.head_dim, dtype=dtype, device=device)


class ModelCache(nn.Module):
    """One cache per layer, sized up front: ``max_batch`` sequences of ``max_len`` tokens."""

    def __init__(self, config: ModelConfig, max_batch: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if max_len > config.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {config.max_seq_len}")
        self.max_batch = max_batch
        self.max_len = max_len
        self.layers = nn.ModuleList(
            make_layer_cache(config, i, max_batch, max_len, dtype, device) for i in range(config.n_layers)
        )

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    @property
    def lengths(self) -> torch.Tensor:
        return self.layers[0].lengths

    def bytes_per_token(self) -> int:
        """Cache bytes one token takes, summed over layers."""
        return sum(layer.bytes_per_token() for layer in self.layers)
