"""The decoder-only Llama-family transformer, with GQA-family or MLA attention.

One readable file in the gpt-fast/nanoGPT spirit: embeddings, pre-norm blocks of
attention + SwiGLU MLP, final norm, output head (tied or not).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mlakit.attention import GQAttention, MLAttention
from mlakit.cache import ModelCache
from mlakit.config import ModelConfig
from mlakit.fused import FusedLinears
from mlakit.norm import RMSNorm
from mlakit.rope import mla_rope_inv_freq, rope_cos_sin, rope_inv_freq


class MLP(nn.Module):
    """Gated MLP ``w2(act(w1 x) * w3 x)`` (w1 = gate, w3 = up, w2 = down): SwiGLU with
    ``act = silu`` (Llama), GeGLU with the tanh GELU (Gemma)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=config.mlp_bias)
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=config.mlp_bias)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=config.mlp_bias)
        self.gelu = config.mlp_activation == "gelu_tanh"
        self.fused_input: FusedLinears | None = None  # w1, w3 as one matmul (mlakit.engine.fuse_projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fused_input(x) if self.fused_input is not None else (self.w1(x), self.w3(x))
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.w2(gate * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = MLAttention(config, layer) if config.is_mla else GQAttention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = MLP(config)
        # Gemma's "sandwich": the attention's and the MLP's outputs are normed before the residual add
        self.post_attention_norm = RMSNorm(config.dim, config.norm_eps) if config.sandwich_norms else None
        self.post_ffn_norm = RMSNorm(config.dim, config.norm_eps) if config.sandwich_norms else None

    def forward(self, x, cos, sin, positions, mask, cache=None) -> torch.Tensor:
        h = self.attention(self.attention_norm(x), cos, sin, positions, mask, cache)
        x = x + (h if self.post_attention_norm is None else self.post_attention_norm(h))
        h = self.feed_forward(self.ffn_norm(x))
        return x + (h if self.post_ffn_norm is None else self.post_ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        # RoPE frequencies stay float32 whatever dtype the weights take, so they are
        # not a buffer (``.to(bfloat16)`` would round them); one copy per device.
        self._inv_freq: dict[tuple[torch.device, str], torch.Tensor] = {}

    def rope_frequencies(self, device: torch.device, layer_type: str = "full_attention") -> torch.Tensor:
        """``[rot / 2]`` float32 RoPE frequencies of this model's attention layers of
        ``layer_type`` (sliding layers may have their own base), on ``device``."""
        key = (torch.device(device), layer_type)
        if key not in self._inv_freq:
            with torch.device("cpu"):
                config = self.config
                inv_freq = (mla_rope_inv_freq(config, layer_type) if config.is_mla
                            else rope_inv_freq(config, config.head_dim, layer_type))
            self._inv_freq[key] = inv_freq.to(device)
        return self._inv_freq[key]

    def layer_inputs(self, positions: torch.Tensor, cache: ModelCache | None = None, kv_len: int | None = None,
                     from_zero: bool = False) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """``(cos, sin, mask)`` of every layer for ``positions [b, s]``: one RoPE table and one
        mask per layer type (full / sliding), shared by the layers of that type. ``from_zero``:
        the positions are ``0..s-1`` and there is no cache, so full layers take mask None
        (plain causal, SDPA's flash kernels)."""
        config = self.config
        per_type = {}
        for layer_type in dict.fromkeys(config.layer_type(i) for i in range(config.n_layers)):
            cos, sin = rope_cos_sin(self.rope_frequencies(positions.device, layer_type), positions)  # [b, s, rot/2]
            window = config.sliding_window if layer_type == "sliding_attention" else None
            mask = (None if from_zero and window is None
                    else self.attention_mask(positions, cache, kv_len, window))
            per_type[layer_type] = (cos, sin, mask)
        return [per_type[config.layer_type(i)] for i in range(config.n_layers)]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[b, s, dim]`` input embeddings (Gemma scales them by a constant rounded to their dtype)."""
        x = self.tok_embeddings(tokens)
        if self.config.embedding_scale is not None:
            x = x * float(torch.tensor(self.config.embedding_scale, dtype=x.dtype))
        return x

    # ---------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: ModelCache | None = None, logits_at: torch.Tensor | None = None,
                kv_len: int | None = None, block_fn: Callable | None = None) -> torch.Tensor:
        """Logits ``[b, s, vocab]`` for ``tokens [b, s]`` at ``positions [b, s]``
        (default ``0..s-1``). With a cache, the new tokens attend to everything the
        cache holds for their sequence up to their own position. ``logits_at [b]``
        picks one position per sequence (``[b, 1, vocab]``): the prefill of
        generation needs only the last prompt token's logits. ``kv_len`` (with a
        cache) fixes how many cache slots attention spans; by default the furthest
        position + 1, which reads ``positions`` on the host — a CUDA-graph step
        passes the cache's ``max_len`` instead. ``block_fn(block, x, cos, sin,
        positions, mask, layer_cache)`` runs each block in place of ``block(...)``:
        the engine passes a ``torch.compile``d one."""
        b, s = tokens.shape
        from_zero = positions is None and cache is None
        if positions is None:
            positions = torch.arange(s, device=tokens.device).expand(b, s)
        inputs = self.layer_inputs(positions, cache, kv_len, from_zero)
        x = self.embed(tokens)  # [b, s, dim]
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            cos, sin, mask = inputs[i]
            if block_fn is None:
                x = layer(x, cos, sin, positions, mask, layer_cache)
            else:
                x = block_fn(layer, x, cos, sin, positions, mask, layer_cache)
        if logits_at is not None:
            x = x[torch.arange(b, device=x.device), logits_at][:, None]  # [b, 1, dim]
        return self.head(self.norm(x))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.output is None:
            return F.linear(x, self.tok_embeddings.weight)
        return self.output(x)

    def attention_mask(self, positions: torch.Tensor, cache: ModelCache | None,
                       kv_len: int | None = None, window: int | None = None) -> torch.Tensor:
        """``[b, s, L]``: key j is visible to a query at position p iff ``j_pos <= p``
        (and ``p - j_pos < window``, for a sliding layer)."""
        if cache is None:
            key_pos = positions[:, None, :]  # [b, 1, s]: the keys are the new tokens
        else:
            # keys are cache slots 0..L-1; read only as far as the furthest position
            if kv_len is None:
                kv_len = cache.max_len if torch.compiler.is_compiling() else int(positions.max()) + 1
            key_pos = torch.arange(kv_len, device=positions.device)[None, None, :]  # [1, 1, L]
        query_pos = positions[:, :, None]  # [b, s, 1]
        mask = key_pos <= query_pos
        if window is not None:
            mask = mask & (key_pos > query_pos - window)
        return mask

    # ---------------------------------------------------------------- helpers
    def new_cache(self, max_batch: int, max_len: int, dtype: torch.dtype | None = None) -> ModelCache:
        """A cache for ``max_batch`` sequences of up to ``max_len`` tokens, on the model's device."""
        weight = self.tok_embeddings.weight
        return ModelCache(self.config, max_batch, max_len, dtype=dtype or weight.dtype, device=weight.device)

    def set_mla_mode(self, mode: str) -> None:
        """Select the MLA execution path ("naive" or "absorbed") of every layer."""
        for layer in self.layers:
            if isinstance(layer.attention, MLAttention):
                layer.attention.mode = mode

    def set_kernels(self, enabled: bool) -> None:
        """Route cached absorbed MLA attention through ``mlakit.kernels`` (the default)
        or through the plain einsum path."""
        for layer in self.layers:
            if isinstance(layer.attention, MLAttention):
                layer.attention.use_kernels = enabled

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def init_random(self, seed: int = 0, std: float = 0.02) -> "Transformer":
        """Random normal weights (benchmarks and tests): never zeros, norms at one.
        Drawn on the parameters' device (fast for big models on a GPU)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, std, generator=generator)
        return self
