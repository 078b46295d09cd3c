"""The decoder-only Llama-family transformer, with GQA-family or MLA attention.

One readable file in the gpt-fast/nanoGPT spirit: embeddings, pre-norm blocks of
attention + SwiGLU MLP, final norm, output head (tied or not).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlakit.attention import GQAttention, MLAttention
from mlakit.cache import ModelCache
from mlakit.config import ModelConfig
from mlakit.fused import FusedLinears
from mlakit.norm import RMSNorm
from mlakit.options import DEFAULT, ForwardOptions
from mlakit.rope import mla_rope_inv_freq, rope_cos_sin, rope_inv_freq


def _call_block(block, x, cos, sin, positions, mask, cache, options):
    return block(x, cos, sin, positions, mask, cache, options)


class MLP(nn.Module):
    """Gated MLP ``w2(act(w1 x) * w3 x)`` (w1 = gate, w3 = up, w2 = down): SwiGLU with
    ``act = silu`` (Llama), GeGLU with the tanh GELU (Gemma)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=config.mlp_bias)
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=config.mlp_bias)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=config.mlp_bias)
        self.gelu = config.mlp_activation == "gelu_tanh"
        self.fused_input: FusedLinears | None = None  # w1, w3 as one matmul (mlakit.speed.fuse_projections)

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

    def forward(self, x, cos, sin, positions, mask, cache=None, options: ForwardOptions = DEFAULT) -> torch.Tensor:
        h = self.attention(self.attention_norm(x), cos, sin, positions, mask, cache, options)
        x = x + (h if self.post_attention_norm is None else self.post_attention_norm(h))
        h = self.feed_forward(self.ffn_norm(x))
        return x + (h if self.post_ffn_norm is None else self.post_ffn_norm(h))


class LayerInputs(NamedTuple):
    """What the blocks of one forward pass share (``Transformer.layer_inputs``)."""

    positions: torch.Tensor  # [b, s]
    # per layer: RoPE angles cos, sin [b, s, rot/2] (float32) and the mask [b, s, L] (None:
    # causal over the new tokens, no cache); layers of one type (full / sliding) share them
    per_layer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]

    def first(self, k: int) -> "LayerInputs":
        """The first ``k`` rows (a short last batch)."""
        return LayerInputs(self.positions[:k], [(c[:k], s[:k], None if m is None else m[:k])
                                                for c, s, m in self.per_layer])


# ``block_fn(block, x, cos, sin, positions, mask, cache, options)`` runs a block in place of
# ``block(...)``: mlakit.speed.compiled_block_call gives a torch.compile'd one.
BlockFn = Callable[..., torch.Tensor]


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

    def layer_inputs(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                     cache: ModelCache | None = None, kv_len: int | None = None) -> LayerInputs:
        """Positions, RoPE angles and masks of a forward over ``tokens [b, s]`` (positions
        default ``0..s-1``): the one place that prepares them, for the forward, calibration,
        distillation and the layer-wise fit alike. One RoPE table and one mask per layer type
        (full / sliding), shared by the layers of that type; without positions and cache, full
        layers take mask None (plain causal, SDPA's flash kernels)."""
        b, s = tokens.shape
        from_zero = positions is None and cache is None
        if positions is None:
            positions = torch.arange(s, device=tokens.device).expand(b, s)
        config = self.config
        per_type = {}
        for layer_type in dict.fromkeys(config.layer_type(i) for i in range(config.n_layers)):
            cos, sin = rope_cos_sin(self.rope_frequencies(positions.device, layer_type), positions)  # [b, s, rot/2]
            window = config.sliding_window if layer_type == "sliding_attention" else None
            mask = (None if from_zero and window is None
                    else self.attention_mask(positions, cache, kv_len, window))
            per_type[layer_type] = (cos, sin, mask)
        return LayerInputs(positions, [per_type[config.layer_type(i)] for i in range(config.n_layers)])

    def run_layers(self, x: torch.Tensor, inputs: LayerInputs, cache: ModelCache | None = None,
                   options: ForwardOptions = DEFAULT, *, layers: range | None = None,
                   block_fn: BlockFn | None = None, grad_checkpoint: bool = False,
                   collect: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The layer loop: hidden states ``x [b, s, dim]`` through the blocks in ``layers``
        (default all). ``grad_checkpoint`` recomputes each block in backward (when grad
        is on); ``collect`` receives each block's output."""
        call = block_fn or _call_block
        for i in layers if layers is not None else range(len(self.layers)):
            cos, sin, mask = inputs.per_layer[i]
            layer_cache = None if cache is None else cache.layers[i]
            args = (self.layers[i], x, cos, sin, inputs.positions, mask, layer_cache, options)
            if grad_checkpoint and torch.is_grad_enabled():
                x = checkpoint(call, *args, use_reentrant=False)
            else:
                x = call(*args)
            if collect is not None:
                collect.append(x)
        return x

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[b, s, dim]`` input embeddings (Gemma scales them by a constant rounded to their dtype)."""
        x = self.tok_embeddings(tokens)
        if self.config.embedding_scale is not None:
            x = x * float(torch.tensor(self.config.embedding_scale, dtype=x.dtype))
        return x

    # ---------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: ModelCache | None = None, options: ForwardOptions = DEFAULT,
                logits_at: torch.Tensor | None = None, kv_len: int | None = None,
                block_fn: BlockFn | None = None) -> torch.Tensor:
        """Logits ``[b, s, vocab]`` for ``tokens [b, s]`` at ``positions [b, s]``
        (default ``0..s-1``). With a cache, the new tokens attend to everything the
        cache holds for their sequence up to their own position. ``options`` says how
        to run (MLA path, kernels, cache format; ``mlakit.options``). ``logits_at [b]``
        picks one position per sequence (``[b, 1, vocab]``): the prefill of generation
        needs only the last prompt token's logits. ``kv_len`` (with a cache) fixes how
        many cache slots attention spans; by default the furthest position + 1, which
        reads ``positions`` on the host — a CUDA-graph step passes a fixed span instead.
        ``block_fn`` runs each block (the engine passes a compiled one)."""
        inputs = self.layer_inputs(tokens, positions, cache, kv_len)
        x = self.run_layers(self.embed(tokens), inputs, cache, options, block_fn=block_fn)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at][:, None]  # [b, 1, dim]
        return self.head(self.norm(x))

    def hidden_states(self, tokens: torch.Tensor, options: ForwardOptions = DEFAULT, *,
                      block_fn: BlockFn | None = None, grad_checkpoint: bool = False,
                      collect: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Final normed hidden states ``[b, s, dim]`` of cache-less windows ``tokens [b, s]`` from
        position 0 (what ``head`` turns into ``model(tokens, options=options)``'s logits):
        distillation's forward. A method of the model, so that FSDP2 can gather the root's
        weights around it (``mlakit.parallel.shard_for_training``)."""
        x = self.run_layers(self.embed(tokens), self.layer_inputs(tokens), options=options, block_fn=block_fn,
                            grad_checkpoint=grad_checkpoint, collect=collect)
        return self.norm(x)

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
    def new_cache(self, max_batch: int, max_len: int, dtype: torch.dtype | None = None,
                  kv_cache_dtype: str | None = None, quantize_rope: bool = False) -> ModelCache:
        """A cache for ``max_batch`` sequences of up to ``max_len`` tokens, on the model's device,
        in the format ``kv_cache_dtype`` (``mlakit.quant``; None: unquantised in ``dtype``, by
        default the model's)."""
        weight = self.tok_embeddings.weight
        return ModelCache(self.config, max_batch, max_len, dtype=dtype or weight.dtype, device=weight.device,
                          kv_cache_dtype=kv_cache_dtype, quantize_rope=quantize_rope)

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
