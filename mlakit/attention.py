"""Attention: one class for MHA/GQA/MQA, one for DeepSeek-style MLA.

Both take the same inputs from the block:
  x          [b, s, dim]      hidden states of the new tokens
  cos, sin   [b, s, rot/2]    RoPE angles of the new tokens (float32)
  positions  [b, s]           token positions (== cache slots)
  mask       [b, s, L]        True where a query may attend to a key; None: causal over
                              the new tokens, no cache (lets SDPA use its flash kernels)
  cache      a layer cache or None (then the keys are the new tokens only)
  options    how to run (mlakit.options.ForwardOptions: MLA path, kernels)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlakit.cache import KVCache, LatentCache, QuantLatentCache
from mlakit.config import ModelConfig
from mlakit.fused import FusedLinears
from mlakit.norm import RMSNorm
from mlakit.options import DEFAULT, ForwardOptions
from mlakit.quant import fake_quantize, fake_quantize_turned, turned
from mlakit.rope import apply_rope

# the parameters of MLAttention that the conversion creates (healing trains these by name)
MLA_PARAMETERS = ("wq", "wq_a", "wq_b", "q_norm", "wkv_a", "kv_norm", "wkv_b",
                  "wk", "q_head_norm", "k_head_norm", "wq_map", "wkv_a_key")  # + converted QK-norm layers


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    # half-precision scores are normalised in float32; float32/float64 stay as they are
    wide = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
    return scores.softmax(dim=-1, dtype=wide).to(scores.dtype)


def _causal(s: int, device: torch.device) -> torch.Tensor:
    return torch.ones(s, s, dtype=torch.bool, device=device).tril()[None]  # [1, s, s]


DECODE_SPLIT_LEN = 256  # cache slots per split of the compiled decode attention
DECODE_SPLIT_MAX_ROWS = 16  # batch x KV heads up to which the decode attention splits the cache


def _decode_attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """One-token attention as split-KV ("flash decoding") in plain tensor ops: ``q [b, kv_h,
    g, d]``, ``k, v [b, kv_h, L, d]``, ``mask [b, 1, 1, L]`` -> ``[b, kv_h, g, d]``.

    Used inside ``torch.compile`` (the engine's decode step). The cache is cut into splits of
    ``DECODE_SPLIT_LEN`` slots; each split's scores, softmax and values are batched matmuls
    and reductions over (batch, KV head, split), and the splits merge by their log-sum-exp.
    Without the splits a batch-1 step has only ``kv_h x g`` rows to spread over the GPU:
    measured on an H200 (llama3-8b shape, 1 x 32768) the value matmul then read the cache at
    1.5 TB/s and the softmax over 32768 keys took 18 us per layer. Eager SDPA with a mask is
    worse still (it parallelises over (batch, heads) only).
    """
    b, kv_h, g, d = q.shape
    length = k.shape[2]
    # splits only where rows are few: at batch 16 and 64 (GQA-8) the split form measured 3-6%
    # slower than one pass on an H200 (decode-e2e-v1), at batch 1 and 32768 slots 13% faster
    few_rows = b * kv_h <= DECODE_SPLIT_MAX_ROWS
    chunk = DECODE_SPLIT_LEN if few_rows and length % DECODE_SPLIT_LEN == 0 else length
    n = length // chunk
    k = k.view(b, kv_h, n, chunk, d)
    v = v.view(b, kv_h, n, chunk, d)
    scores = torch.einsum("bhgd,bhnld->bhngl", q, k) * scale  # [b, kv_h, n, g, chunk]
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = scores.to(wide).masked_fill(~mask.view(b, 1, n, 1, chunk), float("-inf"))
    top = scores.amax(-1, keepdim=True)  # [b, kv_h, n, g, 1]
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a split with no visible key
    probs = (scores - top).exp()
    total = probs.sum(-1, keepdim=True)  # [b, kv_h, n, g, 1]
    partial = torch.einsum("bhngl,bhnld->bhngd", probs.to(v.dtype), v).to(wide)  # [b, kv_h, n, g, d]
    weight = (top - top.amax(2, keepdim=True)).exp()  # [b, kv_h, n, g, 1]: rescale each split
    out = (partial * weight).sum(2) / (total * weight).sum(2)  # [b, kv_h, g, d]
    return out.to(q.dtype)


class GQAttention(nn.Module):
    """Multi-head attention with ``n_kv_heads`` key/value heads: MHA, GQA or MQA."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.softmax_scale
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=config.o_bias)
        # QK-norm (Qwen3, Gemma 3): RMSNorm over each head's query and key, before RoPE
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.fused_input: FusedLinears | None = None  # wq, wk, wv as one matmul (mlakit.speed.fuse_projections)

    def queries_keys(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head queries ``[b, s, h, d]`` and keys ``[b, s, kv_h, d]`` before RoPE from the
        projections' outputs (QK-norm applied, where the model has it)."""
        b, s, _ = q.shape
        q = q.view(b, s, self.n_heads, self.head_dim)
        k = k.view(b, s, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None = None,
                options: ForwardOptions = DEFAULT) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.fused_input(x) if self.fused_input is not None else (self.wq(x), self.wk(x), self.wv(x))
        q, k = self.queries_keys(q, k)  # [b, s, h, d], [b, s, kv_h, d]
        v = v.view(b, s, self.n_kv_heads, self.head_dim)  # [b, s, kv_h, d]
        q = apply_rope(q, cos, sin).transpose(1, 2)  # [b, h, s, d]
        k = apply_rope(k, cos, sin)
        if cache is None and options.kv_cache_dtype is not None:  # keys and values as a cache would store them
            k, v = fake_quantize_turned(k, options.kv_cache_dtype), fake_quantize_turned(v, options.kv_cache_dtype)
        turn = None  # what the cache stores k and v turned by (QuantKVCache in an integer format)
        if cache is not None:
            cache.update(k, v, positions)
            # as stored, still turned: the query is turned alike (scores unchanged) and the output back
            k, v = (t.to(q.dtype) for t in cache.dequantized(b, mask.shape[-1], turned_back=False))  # [b, kv_h, L, d]
            turn = cache.turn
            if turn is not None:
                q = turned(q, turn).to(q.dtype)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # [b, kv_h, s, d]
        group = self.n_heads // self.n_kv_heads
        if s == 1 and mask is not None:
            # one new token: a group's query heads become the query axis of their KV head,
            # so the cache is read once per KV head and never copied per query head
            q = q.reshape(b, self.n_kv_heads, group, self.head_dim)
            if torch.compiler.is_compiling():
                out = _decode_attention_math(q, k, v, mask[:, None], self.scale)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.scale)
            # [b, kv_h, group, d] == [b, h, 1, d]
        else:
            if group > 1:  # MHA (group 1) needs no copy
                k = k.repeat_interleave(group, dim=1)  # [b, h, L, d]
                v = v.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if mask is None else mask[:, None], is_causal=mask is None, scale=self.scale,
            )  # [b, h, s, d]
        if turn is not None:
            out = turned(out, turn, back=True).to(q.dtype)
        return self.wo(out.reshape(b, self.n_heads, s, self.head_dim).transpose(1, 2).reshape(b, s, -1))


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3).

    Per token the cache keeps a latent ``c_kv`` of ``kv_lora_rank`` values and one
    RoPE key of ``qk_rope_head_dim`` values shared by all heads. Per head:
    ``k = [W_uk c_kv, k_rope]`` and ``v = W_uv c_kv`` (``W_uk``, ``W_uv`` are the
    two halves of ``wkv_b``).

    The caller's ``options.mla_path`` picks the path: ``"naive"`` decompresses
    per-head keys and values and runs ordinary attention; ``"absorbed"`` folds
    ``W_uk`` into the query and ``W_uv`` into the output, so attention runs over
    the latent itself: the cache is read once per sequence instead of once per head.
    """

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.kernel_fits = config.layer_window(layer) is None  # the kernel has no sliding window
        self.n_heads = config.n_heads
        self.kv_lora_rank = config.kv_lora_ranks()[layer]
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.scale = config.softmax_scale
        qk_head_dim = self.nope_dim + self.rope_dim
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            # Converted QK-norm models (docs/convert.md): the source's per-head queries and keys
            # are normed as the source does; queries then map per head into MLA's query
            # ([h, nope + rope, d] `wq_map`), and the normed keys enter the latent through
            # `wkv_a_key` beside `wkv_a`: the cache and the absorbed path stay as they are.
            d, kv_heads = config.head_dim, config.n_kv_heads
            self.wq = nn.Linear(config.dim, self.n_heads * d, bias=config.qkv_bias)
            self.q_head_norm = RMSNorm(d, config.norm_eps)
            self.wq_map = nn.Parameter(torch.zeros(self.n_heads, qk_head_dim, d))
            self.wk = nn.Linear(config.dim, kv_heads * d, bias=config.qkv_bias)
            self.k_head_norm = RMSNorm(d, config.norm_eps)
            self.wkv_a_key = nn.Linear(kv_heads * d, self.kv_lora_rank + self.rope_dim, bias=False)
            self.source_head_dim, self.source_kv_heads = d, kv_heads
        elif config.q_lora_rank:
            self.wq_a = nn.Linear(config.dim, config.q_lora_rank, bias=config.qkv_bias)
            self.q_norm = RMSNorm(config.q_lora_rank, config.norm_eps)
            self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(config.dim, self.n_heads * qk_head_dim, bias=config.qkv_bias)
        self.wkv_a = nn.Linear(config.dim, self.kv_lora_rank + self.rope_dim, bias=config.qkv_bias)
        self.kv_norm = RMSNorm(self.kv_lora_rank, config.norm_eps) if config.latent_norm else None
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_dim, config.dim, bias=config.o_bias)
        # (wq or wq_a) and wkv_a as one matmul (mlakit.speed.fuse_projections)
        self.fused_input: FusedLinears | None = None

    def project_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two projections of ``x``: the query's first (``wq``, or ``wq_a`` with a
        low-rank query) and ``wkv_a`` (latent + RoPE key, ``[b, s, r + p]``)."""
        if self.fused_input is not None:
            q, kv = self.fused_input(x)
        else:
            q, kv = (self.wq_a(x) if hasattr(self, "wq_a") else self.wq(x)), self.wkv_a(x)
        if self.qk_norm:  # the normed source keys' share of latent and RoPE key
            b, s, _ = x.shape
            keys = self.k_head_norm(self.wk(x).view(b, s, self.source_kv_heads, self.source_head_dim))
            kv = kv + self.wkv_a_key(keys.reshape(b, s, -1))
        return q, kv

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """``[b, s, h, nope + rope]`` (RoPE not applied yet) from the query's first projection."""
        b, s, _ = q.shape
        if self.qk_norm:
            q = self.q_head_norm(q.view(b, s, self.n_heads, self.source_head_dim))  # [b, s, h, d]
            return torch.einsum("bshd,hed->bshe", q, self.wq_map)  # [b, s, h, nope + rope]
        if hasattr(self, "wq_a"):
            q = self.wq_b(self.q_norm(q))
        return q.view(b, s, self.n_heads, self.nope_dim + self.rope_dim)

    def up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_uk [h, nope, r]`` and ``W_uv [h, v, r]``: views of ``wkv_b``."""
        w = self.wkv_b.weight
        if hasattr(w, "to_local"):  # tensor parallel (mlakit.parallel): this rank's heads' rows, a plain tensor
            w = w.to_local()
        w = w.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim:]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None, cache: LatentCache | None = None,
                options: ForwardOptions = DEFAULT) -> torch.Tensor:
        b, s, _ = x.shape
        q, kv_a = self.project_input(x)
        q_nope, q_rope = self.query(q).split([self.nope_dim, self.rope_dim], dim=-1)  # [b, s, h, *]
        q_rope = apply_rope(q_rope, cos, sin)
        latent, k_rope = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)  # [b, s, r], [b, s, p]
        if options.latent_ranks is not None:
            latent = self._keep_ranks(latent, options.latent_ranks)
        absorbed = options.mla_path == "absorbed"
        sparse = options.sparse and self.kernel_fits  # (no sliding window: the selection knows none)
        if cache is None:
            latent, k_rope = self._norm_and_rotate(latent, k_rope, cos, sin)
            if options.kv_cache_dtype is not None:  # the latent (and RoPE key) as a cache would store them
                latent = fake_quantize(latent, options.kv_cache_dtype)
                if options.quantize_rope:  # else kept in the model's dtype, as QuantLatentCache keeps it
                    k_rope = fake_quantize_turned(k_rope, options.kv_cache_dtype)
        else:
            self._write_cache(latent, k_rope, positions, cos, sin, cache, options)
            if absorbed and options.kernels and self.kernel_fits:
                decode = self._decode_sparse if sparse else self._decode_absorbed
                out = decode(q_nope, q_rope, cache, options)
                return self.wo(out.reshape(b, s, self.n_heads * self.v_dim))
            kv = cache.dequantized(b, mask.shape[-1]).to(x.dtype)  # [b, L, r + p], as stored
            latent, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        if sparse:
            mask = self._sparse_mask(q_nope, q_rope, latent, k_rope, positions, mask, cache is None, options)
        if absorbed:
            out = self._attend_absorbed(q_nope, q_rope, latent, k_rope, _causal(s, x.device) if mask is None else mask)
        else:
            out = self._attend_naive(q_nope, q_rope, latent, k_rope, mask)
        return self.wo(out.reshape(b, s, self.n_heads * self.v_dim))

    def _norm_and_rotate(self, latent, k_rope, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent RMSNorm (where the model has one) and the RoPE of the shared key."""
        if self.kv_norm is not None:
            latent = self.kv_norm(latent)
        return latent, apply_rope(k_rope, cos, sin)

    def _write_cache(self, latent, k_rope, positions, cos, sin, cache: LatentCache | QuantLatentCache,
                     options: ForwardOptions) -> None:
        """Norm + RoPE of the new tokens' latent and key, written at ``positions`` (quantised on
        write for a quantised cache). With kernels: one fused kernel (mlakit.kernels.rope_append)."""
        if options.kernels:
            norm = self.kv_norm
            cache.write_rotated(latent, k_rope, positions, cos, sin,
                                None if norm is None else norm.weight, 0.0 if norm is None else norm.eps)
        else:
            cache.update(*self._norm_and_rotate(latent, k_rope, cos, sin), positions)

    def _attend_naive(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        b, length, _ = latent.shape
        h = self.n_heads
        kv = self.wkv_b(latent).view(b, length, h, self.nope_dim + self.v_dim)  # [b, L, h, nope + v]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(b, length, h, self.rope_dim)], dim=-1)  # [b, L, h, qk]
        q = torch.cat([q_nope, q_rope], dim=-1)  # [b, s, h, qk]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None], is_causal=mask is None, scale=self.scale,
        )  # [b, h, s, v]
        return out.transpose(1, 2)  # [b, s, h, v]

    def _keep_ranks(self, latent: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        """``latent [b, s, r]`` with channels ``>= ranks[i]`` of sequence ``i`` zeroed: zero
        channels add nothing to a score and give nothing to the output, so the sequence
        runs as the truncated model (``mlakit.elastic``), with the cache at full width."""
        b, _, r = latent.shape
        drop = torch.arange(r, device=latent.device)[None, :] >= ranks[:b, None].to(latent.device)  # [b, r]
        return latent.masked_fill(drop[:, None, :], 0.0)

    def _sparse_mask(self, q_nope, q_rope, latent, k_rope, positions, mask, uncached: bool,
                     options: ForwardOptions) -> torch.Tensor:
        """``mask [b, s, L]`` narrowed to each query's sparse selection (mlakit.kernels.mla_sparse:
        the same index and the same rule as the kernels). Masked dense: the reference and
        the eval path, not the fast one (that is ``_decode_sparse``)."""
        from mlakit.kernels.mla_sparse import index_scores_math, select_positions

        s, length = q_nope.shape[1], latent.shape[1]
        if uncached:  # keys are the new tokens themselves, from position 0 (eval windows)
            query_pos = torch.arange(s, device=latent.device).expand(q_nope.shape[0], s)
            mask = _causal(s, latent.device) if mask is None else mask
        else:  # keys are cache slots: slot == position
            query_pos = positions
        index_rank = min(options.sparse_index_rank or self.kv_lora_rank, self.kv_lora_rank)
        w_uk = self.up_projections()[0][..., :index_rank]  # [h, nope, r_idx]
        q_index = torch.einsum("bshn,hnr->bshr", q_nope, w_uk)  # [b, s, h, r_idx]
        visible = mask.expand(q_nope.shape[0], s, length)
        scores = index_scores_math(q_index, q_rope, latent[..., :index_rank], k_rope, visible)  # [b, s, L]
        chosen = select_positions(scores, query_pos, options.sparse_topk, options.sparse_window,
                                  options.sparse_sink)  # [b, s, k]
        hits = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
        hits.scatter_add_(-1, chosen.long().clamp(min=0), (chosen >= 0).to(torch.int32))
        return visible & (hits > 0)

    def _decode_sparse(self, q_nope, q_rope, cache: LatentCache, options: ForwardOptions) -> torch.Tensor:
        """``_decode_absorbed`` over each query's top-k selection (mlakit.kernels.mla_sparse)."""
        from mlakit.kernels import absorb_output, absorb_query
        from mlakit.kernels.mla_sparse import mla_sparse_decode

        if isinstance(cache, QuantLatentCache):
            raise ValueError("sparse decode reads a 16-bit latent cache; quantised caches are not supported yet")
        b = q_nope.shape[0]
        kv = cache.kv[:b]  # [b, L_max, r + p]
        w_uk, w_uv = self.up_projections()
        q_latent = absorb_query(q_nope, w_uk).to(kv.dtype)  # [b, s, h, r]
        out_latent = mla_sparse_decode(q_latent, q_rope.to(kv.dtype), kv, cache.lengths[:b], self.scale,
                                       self.kv_lora_rank, topk=options.sparse_topk, window=options.sparse_window,
                                       sink=options.sparse_sink, index_rank=options.sparse_index_rank)
        return absorb_output(out_latent.to(q_nope.dtype), w_uv.transpose(1, 2))  # [b, s, h, v]

    def _decode_absorbed(self, q_nope, q_rope, cache: LatentCache | QuantLatentCache,
                         options: ForwardOptions = DEFAULT) -> torch.Tensor:
        """Absorbed attention of the new tokens over the whole latent cache (already holding
        them), through the decode kernel, which reads the cache as stored. The new tokens must sit at
        consecutive positions ending at ``cache.lengths - 1`` (what generation does)."""
        from mlakit.kernels import absorb_output, absorb_query, mla_decode

        b = q_nope.shape[0]
        w_uk, w_uv = self.up_projections()
        if isinstance(cache, QuantLatentCache):  # the kernel reads values and scales as stored
            values, scales, k_rope, rope_scales = cache.kernel_operands(b)
            q_latent = absorb_query(q_nope, w_uk).to(cache.dtype)  # [b, s, h, r]
            q_rope = cache.rope_query(q_rope).to(cache.dtype)  # turned as the stored key is
            out_latent = mla_decode(q_latent, q_rope, values, cache.lengths[:b], self.scale,
                                    self.kv_lora_rank, kv_scales=scales, k_rope=k_rope, kv_format=cache.format,
                                    rope_scales=rope_scales)  # [b, s, h, r]
            return absorb_output(out_latent.to(q_nope.dtype), w_uv.transpose(1, 2))
        kv = cache.kv[:b]  # [b, L_max, r + p]
        q_latent = absorb_query(q_nope, w_uk).to(kv.dtype)  # [b, s, h, r]
        out_latent = mla_decode(q_latent, q_rope.to(kv.dtype), kv, cache.lengths[:b], self.scale,
                                self.kv_lora_rank)  # [b, s, h, r]
        return absorb_output(out_latent.to(q_nope.dtype), w_uv.transpose(1, 2))  # [b, s, h, v]

    def _attend_absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        w_uk, w_uv = self.up_projections()
        q_latent = torch.einsum("bshn,hnr->bshr", q_nope, w_uk)  # [b, s, h, r]
        # scores over latent and RoPE key: one dot per (query head, token)
        scores = (torch.einsum("bshr,blr->bhsl", q_latent, latent)
                  + torch.einsum("bshp,blp->bhsl", q_rope, k_rope)) * self.scale  # [b, h, s, L]
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        probs = _softmax(scores)
        out_latent = torch.einsum("bhsl,blr->bshr", probs, latent)  # [b, s, h, r]
        return torch.einsum("bshr,hvr->bshv", out_latent, w_uv)  # [b, s, h, v]
