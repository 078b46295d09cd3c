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
from mlakit.quant import CacheFormat, cache_format, cache_turn, dequantize, quantize, turn_width, turned


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

    turn = None  # what keys and values are stored turned by (QuantKVCache); nothing here

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

    def dequantized(self, batch: int, kv_len: int | None = None,
                    turned_back: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[batch, kv_heads, kv_len, head_dim]`` as attention sees them (views;
        nothing is stored turned, so ``turned_back`` changes nothing)."""
        return self.k[:batch, :, :kv_len], self.v[:batch, :, :kv_len]

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
        self.write_rotated(latent, k_rope, positions, cos, sin, norm_weight, norm_eps)
        return self.kv[: latent.shape[0]]

    def write_rotated(self, latent: torch.Tensor, k_rope: torch.Tensor, positions: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, norm_weight: torch.Tensor | None,
                      norm_eps: float) -> None:
        """``append_rotated`` without returning the buffer."""
        from mlakit.kernels import rope_append

        self._check(positions)
        rope_append(latent, k_rope, self.kv, positions, cos, sin, norm_weight, norm_eps)
        self._advance(positions)

    def dequantized(self, batch: int, kv_len: int | None = None) -> torch.Tensor:
        """The packed rows ``[batch, kv_len, r + rope_dim]`` as attention sees them (a view)."""
        return self.kv[:batch, :kv_len]

    def bytes_per_token(self) -> int:
        return self.kv.shape[-1] * self.kv.element_size()


class QuantKVCache(_Cache):
    """``KVCache`` in a quantised format (``mlakit.quant``): keys and values quantised on write,
    per token, head and group of channels; ``dtype`` is what ``dequantized`` returns.

    Buffers ``k_values / v_values [B, kv_heads, L, stored]`` and ``k_scales / v_scales
    [B, kv_heads, L, groups]`` (float32), head-major like ``KVCache``. In an integer format both
    are stored turned by ``turn`` (``mlakit.quant.cache_turn`` of the head dim; else None) and
    turned back on reading: the key is a RoPE key over all its dims, and turning the values is what
    folding an orthogonal matrix into ``wv`` and ``wo`` would give, without changing the weights.
    """

    def __init__(self, max_batch: int, max_len: int, n_kv_heads: int, head_dim: int, fmt: CacheFormat | str,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(max_batch, max_len, device)
        self.format = cache_format(fmt)
        if not self.format.quantized:
            raise ValueError(f"QuantKVCache needs a quantised format, got {self.format.name} (use KVCache)")
        self.dtype = dtype
        self.head_dim = head_dim
        fmt = self.format
        for name in ("k", "v"):
            self.register_buffer(f"{name}_values", torch.zeros(
                max_batch, n_kv_heads, max_len, fmt.stored_channels(head_dim), dtype=fmt.storage_dtype,
                device=device), persistent=False)
            self.register_buffer(f"{name}_scales", torch.zeros(
                max_batch, n_kv_heads, max_len, fmt.groups(head_dim), dtype=fmt.scale_dtype, device=device),
                persistent=False)
        turn = cache_turn(head_dim, device, turn_width(dtype)).clone() if fmt.stores_turned else None
        self.register_buffer("turn", turn, persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """``KVCache.update``: write k, v ``[b, s, kv_heads, head_dim]`` (quantised) at ``positions [b, s]``;
        ``dequantized`` reads them back (nothing is dequantised on write)."""
        self._check(positions)
        batch = k.shape[0]
        rows = torch.arange(batch, device=positions.device)[:, None]  # [b, 1]
        for name, x in (("k", k), ("v", v)):
            x = x if self.turn is None else turned(x, self.turn)
            values, scales = quantize(x, self.format)  # [b, s, kv_heads, stored], [b, s, kv_heads, groups]
            getattr(self, f"{name}_values")[rows, :, positions] = values
            getattr(self, f"{name}_scales")[rows, :, positions] = scales
        self._advance(positions)

    def dequantized(self, batch: int, kv_len: int | None = None,
                    turned_back: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[batch, kv_heads, kv_len, head_dim]`` as attention sees them (new tensors).
        ``turned_back=False``: as stored, still turned by ``turn`` (attention then turns the query
        alike and its output back: two small products instead of two over the whole cache)."""
        back = turned_back and self.turn is not None

        def read(name: str) -> torch.Tensor:
            width = self.turn.dtype if back else self.dtype  # turned back before the cast
            x = dequantize(getattr(self, f"{name}_values")[:batch, :, :kv_len],
                           getattr(self, f"{name}_scales")[:batch, :, :kv_len], self.format, width)
            return (turned(x, self.turn, back=True) if back else x).to(self.dtype)

        return read("k"), read("v")

    def bytes_per_token(self) -> int:
        return 2 * self.k_values.shape[1] * self.format.bytes_per_token(self.head_dim)


class QuantLatentCache(_Cache):
    """``LatentCache`` in a quantised format (``mlakit.quant``): the latent quantised on write,
    per token and group of channels; the RoPE key in ``dtype`` (16-bit for a 16-bit model), or
    quantised too with ``quantize_rope``. ``dtype`` is also what ``dequantized`` returns.

    Buffers: ``values [B, L, stored(r)]`` and ``scales [B, L, groups(r)]`` (float32); ``k_rope
    [B, L, rope_dim]``, or with ``quantize_rope`` ``k_rope [B, L, stored(rope_dim)]`` in the format
    and ``rope_scales [B, L, groups(rope_dim)]`` (else None). In an integer format that RoPE key
    is stored turned by ``rope_turn`` (``mlakit.quant.cache_turn``; else None). The absorbed
    decode kernel reads the buffers as they are, with the query turned alike:
    ``mlakit.kernels.mla_decode_quant(q_latent, cache.rope_query(q_rope), *cache.kernel_operands(b),
    lengths, scale, r, cache.format)``; other paths read ``cache.dequantized(b, kv_len)`` (the key
    turned back).
    """

    def __init__(self, max_batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, fmt: CacheFormat | str,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 quantize_rope: bool = False) -> None:
        super().__init__(max_batch, max_len, device)
        self.format = cache_format(fmt)
        if not self.format.quantized:
            raise ValueError(f"QuantLatentCache needs a quantised format, got {self.format.name} (use LatentCache)")
        fmt = self.format
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.dtype = dtype
        self.quantize_rope = quantize_rope
        self.register_buffer("values", torch.zeros(max_batch, max_len, fmt.stored_channels(kv_lora_rank),
                                                   dtype=fmt.storage_dtype, device=device), persistent=False)
        self.register_buffer("scales", torch.zeros(max_batch, max_len, fmt.groups(kv_lora_rank),
                                                   dtype=fmt.scale_dtype, device=device), persistent=False)
        rope_shape = (max_batch, max_len, fmt.stored_channels(rope_dim) if quantize_rope else rope_dim)
        self.register_buffer("k_rope", torch.zeros(rope_shape, dtype=fmt.storage_dtype if quantize_rope else dtype,
                                                   device=device), persistent=False)
        rope_scales = (torch.zeros(max_batch, max_len, fmt.groups(rope_dim), dtype=fmt.scale_dtype, device=device)
                       if quantize_rope else None)
        self.register_buffer("rope_scales", rope_scales, persistent=False)
        # in the width keys and queries are turned in (float32; float64 for float64), made here, not in a step
        turns = quantize_rope and fmt.stores_turned
        self.register_buffer("rope_turn", cache_turn(rope_dim, device, turn_width(dtype)).clone() if turns else None,
                             persistent=False)

    def update(self, latent: torch.Tensor, k_rope: torch.Tensor, positions: torch.Tensor) -> None:
        """``LatentCache.update``: write latent ``[b, s, r]`` and rotated k_rope ``[b, s, rope_dim]``
        (quantised) at ``positions [b, s]``; ``dequantized`` reads them back."""
        self._check(positions)
        batch = latent.shape[0]
        rows = torch.arange(batch, device=positions.device)[:, None]  # [b, 1]
        self.values[rows, positions], self.scales[rows, positions] = quantize(latent, self.format)
        if self.quantize_rope:
            turned_key = k_rope if self.rope_turn is None else turned(k_rope, self.rope_turn)
            self.k_rope[rows, positions], self.rope_scales[rows, positions] = quantize(turned_key, self.format)
        else:
            self.k_rope[rows, positions] = k_rope.to(self.k_rope.dtype)
        self._advance(positions)

    def append_rotated(self, latent: torch.Tensor, k_rope: torch.Tensor, positions: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, norm_weight: torch.Tensor | None,
                       norm_eps: float) -> torch.Tensor:
        """``LatentCache.append_rotated``, quantising on write in the same fused kernel
        (``mlakit.kernels.rope_append_quant``); returns this batch's rows dequantised. Attention
        that runs the quantised decode kernel reads ``kernel_operands`` instead of the result."""
        self.write_rotated(latent, k_rope, positions, cos, sin, norm_weight, norm_eps)
        return self.dequantized(latent.shape[0])

    def write_rotated(self, latent: torch.Tensor, k_rope: torch.Tensor, positions: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, norm_weight: torch.Tensor | None,
                      norm_eps: float) -> None:
        """``append_rotated`` without reading anything back (the decode kernel reads the cache as
        stored: dequantising the whole cache each step would cost more than the attention)."""
        from mlakit.kernels import rope_append_quant

        self._check(positions)
        rope_append_quant(latent, k_rope, self.values, self.scales, self.k_rope, positions, cos, sin, self.format,
                          norm_weight, norm_eps, rope_scales=self.rope_scales, rope_turn=self.rope_turn)
        self._advance(positions)

    def rope_query(self, q_rope: torch.Tensor) -> torch.Tensor:
        """The RoPE query for scores against ``kernel_operands``' key: turned alike where the key is."""
        return q_rope if self.rope_turn is None else turned(q_rope, self.rope_turn).to(q_rope.dtype)

    def kernel_operands(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(values, scales, k_rope, rope_scales)`` of this batch's rows, as stored (views)."""
        rope_scales = None if self.rope_scales is None else self.rope_scales[:batch]
        return self.values[:batch], self.scales[:batch], self.k_rope[:batch], rope_scales

    def dequantized(self, batch: int, kv_len: int | None = None) -> torch.Tensor:
        """The packed rows ``[batch, kv_len, r + rope_dim]`` as attention sees them, in ``dtype`` (a new tensor)."""
        latent = dequantize(self.values[:batch, :kv_len], self.scales[:batch, :kv_len], self.format, self.dtype)
        k_rope = self.k_rope[:batch, :kv_len]
        if self.quantize_rope:
            width = self.dtype if self.rope_turn is None else self.rope_turn.dtype  # turned back before the cast
            k_rope = dequantize(k_rope, self.rope_scales[:batch, :kv_len], self.format, width)
            k_rope = k_rope if self.rope_turn is None else turned(k_rope, self.rope_turn, back=True)
        return torch.cat([latent, k_rope.to(self.dtype)], dim=-1)

    def bytes_per_token(self) -> int:
        rope = (self.format.bytes_per_token(self.rope_dim) if self.quantize_rope
                else self.rope_dim * self.k_rope.element_size())
        return self.format.bytes_per_token(self.kv_lora_rank) + rope


def make_layer_cache(config: ModelConfig, layer: int, max_batch: int, max_len: int,
                     dtype: torch.dtype, device: torch.device | str | None,
                     kv_cache_dtype: str | None = None, quantize_rope: bool = False) -> _Cache:
    """The cache of one layer. ``kv_cache_dtype`` (``mlakit.quant.KV_CACHE_DTYPES``; None or "auto":
    ``dtype``): "bf16" / "fp16" store in that dtype, "fp8" / "int8" / "int4" quantise (``dtype`` is
    then what attention reads back, and the 16-bit RoPE key's dtype unless ``quantize_rope``)."""
    fmt = cache_format(kv_cache_dtype, dtype)
    if fmt.quantized:
        if config.is_mla:
            return QuantLatentCache(max_batch, max_len, config.kv_lora_ranks()[layer], config.qk_rope_head_dim, fmt,
                                    dtype=dtype, device=device, quantize_rope=quantize_rope)
        return QuantKVCache(max_batch, max_len, config.n_kv_heads, config.head_dim, fmt, dtype=dtype, device=device)
    dtype = fmt.storage_dtype
    if config.is_mla:
        return LatentCache(max_batch, max_len, config.kv_lora_ranks()[layer], config.qk_rope_head_dim,
                           dtype=dtype, device=device)
    return KVCache(max_batch, max_len, config.n_kv_heads, config.head_dim, dtype=dtype, device=device)


class ModelCache(nn.Module):
    """One cache per layer, sized up front: ``max_batch`` sequences of ``max_len`` tokens, in the
    format ``kv_cache_dtype`` (default: unquantised in ``dtype``; see ``make_layer_cache``)."""

    def __init__(self, config: ModelConfig, max_batch: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 kv_cache_dtype: str | None = None, quantize_rope: bool = False) -> None:
        super().__init__()
        self.format = cache_format(kv_cache_dtype, dtype)  # see make_layer_cache
        if max_len > config.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {config.max_seq_len}")
        self.max_batch = max_batch
        self.max_len = max_len
        self.layers = nn.ModuleList(
            make_layer_cache(config, i, max_batch, max_len, dtype, device, kv_cache_dtype, quantize_rope)
            for i in range(config.n_layers)
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
