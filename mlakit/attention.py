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

from mlakit.cache import KVCache, LatentCache
from mlakit.config import ModelConfig
from mlakit.fused import FusedLinears
from mlakit.norm import RMSNorm
from mlakit.options import DEFAULT, ForwardOptions
from mlakit.rope import apply_rope

# the parameters of MLAttention that the conversion creates (healing trains these by name)
MLA_PARAMETERS = ("wq", "wq_a", "wq_b", "q_norm", "wkv_a", "kv_norm", "wkv_b")


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    # half-precision scores are normalised in float32; float32/float64 stay as they are
    wide = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
    return scores.softmax(dim=-1, dtype=wide).to(scores.dtype)


def _causal(s: int, device: torch.device) -> torch.Tensor:
    return torch.ones(s, s, dtype=torch.bool, device=device).tril()[None]  # [1, s, s]


def _decode_attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """One-token attention as two matmuls and a masked softmax: ``q [b, kv_h, g, d]``,
    ``k, v [b, kv_h, L, d]``, ``mask [b, 1, 1, L]`` -> ``[b, kv_h, g, d]``.

    Used inside ``torch.compile`` (the engine's decode step), where the mask and the
    softmax fuse into one kernel and the matmuls split the keys over all SMs. Eager
    SDPA with a mask takes a kernel that parallelises over (batch, heads) only: at
    batch 1 that leaves most of the GPU idle (measured ~210 GB/s on an H200).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [b, kv_h, g, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(_softmax(scores), v)


class GQAttention(nn.Module):
    """Multi-head attention with ``n_kv_heads`` key/value heads: MHA, GQA or MQA."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.softmax_scale
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=config.o_bias)
        self.fused_input: FusedLinears | None = None  # wq, wk, wv as one matmul (mlakit.speed.fuse_projections)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None = None,
                options: ForwardOptions = DEFAULT) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.fused_input(x) if self.fused_input is not None else (self.wq(x), self.wk(x), self.wv(x))
        q = q.view(b, s, self.n_heads, self.head_dim)  # [b, s, h, d]
        k = k.view(b, s, self.n_kv_heads, self.head_dim)  # [b, s, kv_h, d]
        v = v.view(b, s, self.n_kv_heads, self.head_dim)  # [b, s, kv_h, d]
        q = apply_rope(q, cos, sin).transpose(1, 2)  # [b, h, s, d]
        k = apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, positions)  # [b, kv_h, L_max, d]
            kv_len = mask.shape[-1]
            k, v = k[:, :, :kv_len].to(q.dtype), v[:, :, :kv_len].to(q.dtype)
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
        self.kernel_fits = config.sliding_window is None  # the kernel has no sliding window
        self.n_heads = config.n_heads
        self.kv_lora_rank = config.kv_lora_ranks()[layer]
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.scale = config.softmax_scale
        qk_head_dim = self.nope_dim + self.rope_dim
        if config.q_lora_rank:
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
            return q, kv
        return (self.wq_a(x) if hasattr(self, "wq_a") else self.wq(x)), self.wkv_a(x)

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """``[b, s, h, nope + rope]`` (RoPE not applied yet) from the query's first projection."""
        b, s, _ = q.shape
        if hasattr(self, "wq_a"):
            q = self.wq_b(self.q_norm(q))
        return q.view(b, s, self.n_heads, self.nope_dim + self.rope_dim)

    def up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_uk [h, nope, r]`` and ``W_uv [h, v, r]``: views of ``wkv_b``."""
        w = self.wkv_b.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
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
        else:
            kv = self._write_cache(latent, k_rope, positions, cos, sin, cache, options)  # [b, L_max, r + p]
            if absorbed and options.kernels and self.kernel_fits:
                decode = self._decode_sparse if sparse else self._decode_absorbed
                out = decode(q_nope, q_rope, kv, cache, options)
                return self.wo(out.reshape(b, s, self.n_heads * self.v_dim))
            kv = kv[:, : mask.shape[-1]].to(x.dtype)  # [b, L, r + p]
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

    def _write_cache(self, latent, k_rope, positions, cos, sin, cache: LatentCache,
                     options: ForwardOptions) -> torch.Tensor:
        """Norm + RoPE of the new tokens' latent and key, written at ``positions``; returns
        this batch's packed cache ``[b, L_max, r + p]``. With kernels: one fused kernel
        (mlakit.kernels.rope_append)."""
        if options.kernels:
            norm = self.kv_norm
            return cache.append_rotated(latent, k_rope, positions, cos, sin,
                                        None if norm is None else norm.weight, 0.0 if norm is None else norm.eps)
        return cache.update(*self._norm_and_rotate(latent, k_rope, cos, sin), positions)

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

    def _decode_sparse(self, q_nope, q_rope, kv: torch.Tensor, cache: LatentCache,
                       options: ForwardOptions) -> torch.Tensor:
        """``_decode_absorbed`` over each query's top-k selection (mlakit.kernels.mla_sparse)."""
        from mlakit.kernels import absorb_output, absorb_query
        from mlakit.kernels.mla_sparse import mla_sparse_decode

        b = q_nope.shape[0]
        w_uk, w_uv = self.up_projections()
        q_latent = absorb_query(q_nope, w_uk).to(kv.dtype)  # [b, s, h, r]
        out_latent = mla_sparse_decode(q_latent, q_rope.to(kv.dtype), kv, cache.lengths[:b], self.scale,
                                       self.kv_lora_rank, topk=options.sparse_topk, window=options.sparse_window,
                                       sink=options.sparse_sink, index_rank=options.sparse_index_rank)
        return absorb_output(out_latent.to(q_nope.dtype), w_uv.transpose(1, 2))  # [b, s, h, v]

    def _decode_absorbed(self, q_nope, q_rope, kv: torch.Tensor, cache: LatentCache,
                         options: ForwardOptions = DEFAULT) -> torch.Tensor:
        """Absorbed attention of the new tokens over the whole latent cache ``kv [b, L_max, r + p]``
        (already holding them), through the decode kernel. The new tokens must sit at
        consecutive positions ending at ``cache.lengths - 1`` (what generation does)."""
        from mlakit.kernels import absorb_output, absorb_query, mla_decode

        b = q_nope.shape[0]
        w_uk, w_uv = self.up_projections()
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
