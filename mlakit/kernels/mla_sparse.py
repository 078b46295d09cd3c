"""Training-free top-k sparse MLA decode over the packed latent cache.

Per query token the cache is scored by a cheap index, the best ``topk`` slots are
kept together with the first ``sink`` slots and the last ``window`` ones, and exact
absorbed attention runs over those alone (DeepSeek-V3.2's sparse attention, with
the healed latent's own first channels in place of a trained indexer):

    index[n] = max_h ( q_latent[h, :r_idx] . latent[n, :r_idx] + q_rope[h] . k_rope[n] )
    out[h]   = sum_{n in selected} softmax_n(score[h, n]) * latent[n]

The index reads ``r_idx + rope_dim`` of the ``rank + rope_dim`` values of a row; the
latent's channels are ordered by importance (PCA order, elastic healing), so its first
ones carry most of the score. The head reduction is a *max*: one selection per query
token shared by all heads, so the gathered attention still reads each selected row
once for all heads (MLA's one read per sequence), and a slot that any one head wants
is kept (a sum of signed logits lets heads cancel).

Contract shared with ``mla_decode`` (``mlakit.kernels.mla_decode``): ``kv_cache
[>= batch, max_len, rank + rope]``, ``lengths [batch]`` including the ``s_q`` new tokens;
query ``i`` of the chunk sits at position ``lengths - s_q + i`` and sees slots up to it.

This file holds:
    mla_sparse_index / mla_sparse_index_reference   -- the index scores [b, s_q, max_len]
    select_positions                                -- top-k + sink + window, fixed k (torch.topk)
    mla_sparse_attend / mla_sparse_attend_reference -- attention over the selected rows
    mla_sparse_decode                               -- the three in a row
Selection is ``torch.topk`` on the scores: one library kernel, fixed output shape,
no host sync (a fused radix select is the next step where it shows in a profile).
"""

from __future__ import annotations

import torch

from mlakit.kernels.decode_common import (
    HAS_TRITON,
    LOG2E,
    check_decode_args,
    check_latent_cache,
    check_one_device,
    check_queries,
    merge_partials,
    num_sms,
    split_partials,
    use_triton,
)

if HAS_TRITON:
    import triton
    import triton.language as tl


def selection_size(topk: int, window: int, sink: int, max_len: int) -> int:
    """Slots selected per query: ``topk + window + sink``, at most ``max_len`` (fixed per cache)."""
    return min(topk + window + sink, max_len)


def _query_positions(lengths: torch.Tensor, s_q: int) -> torch.Tensor:
    """``[b, s_q]`` position of each new token: ``lengths - s_q + i``."""
    return lengths.long()[:, None] - s_q + torch.arange(s_q, device=lengths.device)


# ---------------------------------------------------------------------------
# References (plain PyTorch, fp32 math; fp64 for fp64 inputs)
# ---------------------------------------------------------------------------


def index_scores_math(q_index: torch.Tensor, q_rope: torch.Tensor, keys: torch.Tensor, k_rope: torch.Tensor,
                      visible: torch.Tensor) -> torch.Tensor:
    """``max_h (q_index . keys + q_rope . k_rope)`` ``[b, s, L]``, -inf where not ``visible [b, s, L]``.
    ``q_index [b, s, h, r_idx]``, ``keys [b, L, r_idx]``, ``q_rope [b, s, h, p]``, ``k_rope [b, L, p]``.
    (Also the masked dense path of ``MLAttention``.) One head at a time, so that a long
    eval window holds one ``[b, s, L]`` score tensor, not one per head."""
    math_dtype = torch.float64 if q_index.dtype == torch.float64 else torch.float32
    query = torch.cat([q_index, q_rope], dim=-1).to(math_dtype)  # [b, s, h, r_idx + p]
    key = torch.cat([keys, k_rope], dim=-1).to(math_dtype).transpose(1, 2)  # [b, r_idx + p, L]
    best = None
    for h in range(query.shape[2]):
        scores = torch.matmul(query[:, :, h], key)  # [b, s, L]
        best = scores if best is None else torch.maximum(best, scores)
    return best.masked_fill(~visible, float("-inf"))  # [b, s, L]


def mla_sparse_index_reference(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                               lengths: torch.Tensor, kv_lora_rank: int, index_rank: int) -> torch.Tensor:
    """Index scores ``[b, s_q, max_len]`` float32 (float64 for float64 inputs): see the module text."""
    check_decode_args(q_latent, q_rope, kv_cache, lengths, kv_lora_rank, allow_fp64=True)
    _check_index_rank(index_rank, kv_lora_rank)
    batch, s_q = q_latent.shape[:2]
    cache = kv_cache[:batch]
    slots = torch.arange(cache.shape[1], device=cache.device)
    visible = slots[None, None, :] <= _query_positions(lengths, s_q)[:, :, None]  # [b, s, L]
    return index_scores_math(q_latent[..., :index_rank], q_rope, cache[..., :index_rank],
                             cache[..., kv_lora_rank:], visible)


def mla_sparse_attend_reference(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                                indices: torch.Tensor, softmax_scale: float, kv_lora_rank: int) -> torch.Tensor:
    """Absorbed attention of each query over its selected slots ``indices [b, s_q, k]``
    (int32/int64; -1: no slot). Rows with no slot give 0. Returns ``[b, s_q, h, rank]``."""
    _check_attend_args(q_latent, q_rope, kv_cache, indices, kv_lora_rank)
    batch, s_q, _, rank = q_latent.shape
    math_dtype = torch.float64 if q_latent.dtype == torch.float64 else torch.float32
    valid = indices >= 0  # [b, s, k]
    rows = indices.long().clamp(min=0)
    cache = kv_cache[:batch].to(math_dtype)
    gathered = cache[torch.arange(batch, device=cache.device)[:, None, None], rows]  # [b, s, k, r + p]
    latent, k_rope = gathered[..., :rank], gathered[..., rank:]
    scores = torch.einsum("bshr,bskr->bshk", q_latent.to(math_dtype), latent)
    scores = scores + torch.einsum("bshp,bskp->bshk", q_rope.to(math_dtype), k_rope)
    scores = (scores * softmax_scale).masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no slot -> 0
    return torch.einsum("bshk,bskr->bshr", probs, latent).to(q_latent.dtype)


def select_positions(scores: torch.Tensor, query_pos: torch.Tensor, topk: int, window: int,
                     sink: int) -> torch.Tensor:
    """The selected slots ``[b, s, k]`` int32, ``k = selection_size(...)``, from index scores
    ``[b, s, L]`` (-inf: not visible) of queries at ``query_pos [b, s]``: the first ``sink``
    slots and the last ``window`` ones up to the query (forced, +inf), then the best by
    score; -1 where fewer visible slots exist. Every visible slot is selected when the
    query sees at most ``k`` (then sparse == dense). Graph-safe: fixed k, no host sync."""
    length = scores.shape[-1]
    k = selection_size(topk, window, sink, length)
    slots = torch.arange(length, device=scores.device)  # [L]
    pos = query_pos[:, :, None]  # [b, s, 1]
    forced = (slots < sink) | ((slots > pos - window) & (slots <= pos))  # [b, s, L]
    visible = scores > float("-inf")
    scores = torch.where(forced & visible, torch.full_like(scores, float("inf")), scores)
    top = torch.topk(scores, k, dim=-1, sorted=False)  # values [b, s, k]
    return torch.where(top.values > float("-inf"), top.indices, -1).to(torch.int32)


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


def _check_index_rank(index_rank: int, kv_lora_rank: int) -> None:
    if not 0 < index_rank <= kv_lora_rank:
        raise ValueError(f"index_rank must be in [1, kv_lora_rank={kv_lora_rank}], got {index_rank}")


def _check_attend_args(q_latent, q_rope, kv_cache, indices, kv_lora_rank) -> None:
    """``check_decode_args`` with the selected slots ``indices [batch, s_q, k]`` in place of the lengths."""
    check_queries(q_latent, q_rope, kv_lora_rank, allow_fp64=True)
    check_latent_cache(kv_cache, q_latent, q_rope, kv_lora_rank)
    if indices.dim() != 3 or tuple(indices.shape[:2]) != tuple(q_latent.shape[:2]):
        raise ValueError(f"indices must be [batch, s_q, k] matching q_latent {tuple(q_latent.shape)}, "
                         f"got {tuple(indices.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    check_one_device(q_latent, q_rope, kv_cache, indices)


# ---------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _mla_sparse_index_kernel(
        q_latent_ptr, q_rope_ptr, kv_ptr, lengths_ptr, scores_ptr,
        stride_qlb, stride_qls, stride_qlh,
        stride_qrb, stride_qrs, stride_qrh,
        stride_kvb, stride_kvn,
        stride_sb, stride_ss,
        num_heads, s_q, max_len,
        RANK: tl.constexpr,  # where the RoPE key starts in a cache row
        INDEX_RANK: tl.constexpr,
        ROPE: tl.constexpr,
        BLOCK_H: tl.constexpr,  # next_pow2(heads), >= 16: the M of the dots
        BLOCK_N: tl.constexpr,
        BLOCK_I: tl.constexpr,  # next_pow2(INDEX_RANK), >= 16
        BLOCK_P: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        DOT_UPCAST: tl.constexpr,
    ):
        # Grid: (slot blocks, query tokens, batch). One program scores BLOCK_N slots for
        # all heads of one query token and keeps the max over heads.
        pid_n = tl.program_id(0)
        tok = tl.program_id(1)
        pid_b = tl.program_id(2).to(tl.int64)
        seq_len = tl.load(lengths_ptr + pid_b).to(tl.int32)
        last = seq_len - s_q + tok  # the query's position: it sees slots [0, last]
        slots = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        out_ptrs = scores_ptr + pid_b * stride_sb + tok * stride_ss + slots
        in_bounds = slots < max_len
        if pid_n * BLOCK_N > last:  # nothing visible in this block: no cache read
            tl.store(out_ptrs, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=in_bounds)
            return
        heads = tl.arange(0, BLOCK_H)
        h_mask = heads < num_heads
        offs_i = tl.arange(0, BLOCK_I)
        i_mask = offs_i < INDEX_RANK
        visible = slots <= last
        q = tl.load(q_latent_ptr + pid_b * stride_qlb + tok * stride_qls + heads[:, None] * stride_qlh
                    + offs_i[None, :], mask=h_mask[:, None] & i_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_I]
        kv_seq = kv_ptr + pid_b * stride_kvb
        keys = tl.load(kv_seq + slots[:, None] * stride_kvn + offs_i[None, :],
                       mask=visible[:, None] & i_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_I]
        if DOT_UPCAST:
            q = q.to(tl.float32)
            keys = keys.to(tl.float32)
        scores = tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
        if ROPE > 0:
            offs_p = tl.arange(0, BLOCK_P)
            p_mask = offs_p < ROPE
            q_r = tl.load(q_rope_ptr + pid_b * stride_qrb + tok * stride_qrs + heads[:, None] * stride_qrh
                          + offs_p[None, :], mask=h_mask[:, None] & p_mask[None, :], other=0.0)
            k_r = tl.load(kv_seq + slots[:, None] * stride_kvn + RANK + offs_p[None, :],
                          mask=visible[:, None] & p_mask[None, :], other=0.0)
            if DOT_UPCAST:
                q_r = q_r.to(tl.float32)
                k_r = k_r.to(tl.float32)
            scores += tl.dot(q_r, tl.trans(k_r), input_precision=DOT_PRECISION)
        scores = tl.where(h_mask[:, None], scores, float("-inf"))
        best = tl.max(scores, 0)  # [BLOCK_N]
        tl.store(out_ptrs, tl.where(visible, best, float("-inf")), mask=in_bounds)

    @triton.jit
    def _mla_sparse_attend_kernel(
        q_latent_ptr, q_rope_ptr, kv_ptr, idx_ptr,
        out_ptr, part_out_ptr, part_lse_ptr,
        scale_log2, num_splits, num_sel,
        stride_qlb, stride_qls, stride_qlh,
        stride_qrb, stride_qrs, stride_qrh,
        stride_kvb, stride_kvn,
        stride_ib, stride_is,
        stride_ob, stride_os, stride_oh,
        stride_pb, stride_pm, stride_ps,
        num_heads,
        RANK: tl.constexpr,
        ROPE: tl.constexpr,
        BLOCK_H: tl.constexpr,  # next_pow2(heads), >= 16
        BLOCK_N: tl.constexpr,  # selected rows per iteration
        BLOCK_R: tl.constexpr,
        BLOCK_P: tl.constexpr,
        WRITE_PARTIAL: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        DOT_UPCAST: tl.constexpr,
    ):
        # Grid: (splits, query tokens, batch). All heads of one query token attend to the
        # same selected rows: each gathered row is read once for all of them.
        pid_split = tl.program_id(0)
        tok = tl.program_id(1)
        pid_b = tl.program_id(2).to(tl.int64)
        heads = tl.arange(0, BLOCK_H)
        h_mask = heads < num_heads
        offs_r = tl.arange(0, BLOCK_R)
        offs_p = tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        r_mask = offs_r < RANK
        p_mask = offs_p < ROPE
        q_lat = tl.load(q_latent_ptr + pid_b * stride_qlb + tok * stride_qls + heads[:, None] * stride_qlh
                        + offs_r[None, :], mask=h_mask[:, None] & r_mask[None, :], other=0.0)
        if ROPE > 0:
            q_rope = tl.load(q_rope_ptr + pid_b * stride_qrb + tok * stride_qrs + heads[:, None] * stride_qrh
                             + offs_p[None, :], mask=h_mask[:, None] & p_mask[None, :], other=0.0)
            if DOT_UPCAST:
                q_rope = q_rope.to(tl.float32)
        if DOT_UPCAST:
            q_lat = q_lat.to(tl.float32)

        per_split = tl.cdiv(tl.cdiv(num_sel, num_splits), BLOCK_N) * BLOCK_N
        start = pid_split * per_split
        end = tl.minimum(start + per_split, num_sel)
        kv_seq = kv_ptr + pid_b * stride_kvb
        idx_row = idx_ptr + pid_b * stride_ib + tok * stride_is
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
        for start_n in range(start, end, BLOCK_N):
            sel = start_n + offs_n
            slot = tl.load(idx_row + sel, mask=sel < end, other=-1).to(tl.int64)  # [BLOCK_N]
            valid = slot >= 0
            latent = tl.load(kv_seq + slot[:, None] * stride_kvn + offs_r[None, :],
                             mask=valid[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
            if DOT_UPCAST:
                latent = latent.to(tl.float32)
            scores = tl.dot(q_lat, tl.trans(latent), input_precision=DOT_PRECISION)
            if ROPE > 0:
                k_rope = tl.load(kv_seq + slot[:, None] * stride_kvn + RANK + offs_p[None, :],
                                 mask=valid[:, None] & p_mask[None, :], other=0.0)
                if DOT_UPCAST:
                    k_rope = k_rope.to(tl.float32)
                scores += tl.dot(q_rope, tl.trans(k_rope), input_precision=DOT_PRECISION)
            scores = tl.where(valid[None, :], scores * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_shift)
            p = tl.exp2(scores - m_shift[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(latent.dtype), latent, input_precision=DOT_PRECISION)
            m_i = m_new

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out_tile = acc / l_safe[:, None]
        store_mask = h_mask[:, None] & r_mask[None, :]
        rows = tok * num_heads + heads  # merge_partials' row order: token * heads + head
        if WRITE_PARTIAL:
            part = pid_b * stride_pb + rows * stride_pm + pid_split * stride_ps
            tl.store(part_out_ptr + part[:, None] + offs_r[None, :], out_tile, mask=store_mask)
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
            num_rows = tl.num_programs(1) * num_heads  # part_lse [b, rows, splits] is contiguous
            tl.store(part_lse_ptr + (pid_b * num_rows + rows) * num_splits + pid_split, lse, mask=h_mask)
        else:
            out_rows = pid_b * stride_ob + tok * stride_os + heads * stride_oh
            tl.store(out_ptr + out_rows[:, None] + offs_r[None, :], out_tile.to(out_ptr.dtype.element_ty),
                     mask=store_mask)


# ---------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------


def _dot_flags(t: torch.Tensor) -> tuple[bool, str]:
    # The interpreter's bf16 dot is wrong (triton 3.9): interpreted runs upcast to fp32.
    upcast = t.device.type == "cpu" and t.dtype == torch.bfloat16
    return upcast, ("ieee" if (t.dtype == torch.float32 or upcast) else "tf32")


def mla_sparse_index(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, lengths: torch.Tensor,
                     kv_lora_rank: int, index_rank: int) -> torch.Tensor:
    """Index scores ``[b, s_q, max_len]`` float32: Triton on CUDA (and under
    TRITON_INTERPRET=1), the reference elsewhere and for float64."""
    if torch.compiler.is_compiling():
        return torch.ops.mlakit.mla_sparse_index(q_latent.contiguous(), q_rope.contiguous(), kv_cache, lengths,
                                                 kv_lora_rank, index_rank)
    return _mla_sparse_index(q_latent, q_rope, kv_cache, lengths, kv_lora_rank, index_rank)


def _mla_sparse_index(q_latent, q_rope, kv_cache, lengths, kv_lora_rank, index_rank):
    if not use_triton(q_latent) or q_latent.dtype == torch.float64:
        return mla_sparse_index_reference(q_latent, q_rope, kv_cache, lengths, kv_lora_rank, index_rank)
    rope = check_decode_args(q_latent, q_rope, kv_cache, lengths, kv_lora_rank)
    _check_index_rank(index_rank, kv_lora_rank)
    if kv_cache.stride(2) != 1:
        raise ValueError("kv_cache must be contiguous in its last dim (stride(2) == 1)")
    q_latent, q_rope = q_latent.contiguous(), q_rope.contiguous()
    batch, s_q, heads, _ = q_latent.shape
    max_len = kv_cache.shape[1]
    scores = torch.empty((batch, s_q, max_len), dtype=torch.float32, device=q_latent.device)
    if scores.numel() == 0:
        return scores
    block_n = 64
    upcast, precision = _dot_flags(q_latent)
    _mla_sparse_index_kernel[(triton.cdiv(max_len, block_n), s_q, batch)](
        q_latent, q_rope, kv_cache, lengths, scores,
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2),
        q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
        kv_cache.stride(0), kv_cache.stride(1),
        scores.stride(0), scores.stride(1),
        heads, s_q, max_len,
        RANK=kv_lora_rank, INDEX_RANK=index_rank, ROPE=rope,
        BLOCK_H=max(16, triton.next_power_of_2(heads)), BLOCK_N=block_n,
        BLOCK_I=max(16, triton.next_power_of_2(index_rank)),
        BLOCK_P=max(16, triton.next_power_of_2(rope)) if rope else 16,
        DOT_PRECISION=precision, DOT_UPCAST=upcast, num_warps=4,
    )
    return scores


def mla_sparse_attend(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor,
                      softmax_scale: float, kv_lora_rank: int, num_splits: int | None = None) -> torch.Tensor:
    """Absorbed attention over the selected slots (``mla_sparse_attend_reference``'s contract):
    Triton on CUDA (and under TRITON_INTERPRET=1), the reference elsewhere and for float64.
    ``num_splits`` (tests, tuning) overrides the split count of the selected rows."""
    if torch.compiler.is_compiling() and num_splits is None:
        return torch.ops.mlakit.mla_sparse_attend(q_latent.contiguous(), q_rope.contiguous(), kv_cache, indices,
                                                  softmax_scale, kv_lora_rank)
    return _mla_sparse_attend(q_latent, q_rope, kv_cache, indices, softmax_scale, kv_lora_rank, num_splits)


def _mla_sparse_attend(q_latent, q_rope, kv_cache, indices, softmax_scale, kv_lora_rank, num_splits=None):
    if not use_triton(q_latent) or q_latent.dtype == torch.float64:
        return mla_sparse_attend_reference(q_latent, q_rope, kv_cache, indices, softmax_scale, kv_lora_rank)
    _check_attend_args(q_latent, q_rope, kv_cache, indices, kv_lora_rank)
    if kv_cache.stride(2) != 1:
        raise ValueError("kv_cache must be contiguous in its last dim (stride(2) == 1)")
    q_latent, q_rope, indices = q_latent.contiguous(), q_rope.contiguous(), indices.contiguous()
    batch, s_q, heads, rank = q_latent.shape
    rope = q_rope.shape[3]
    num_sel = indices.shape[2]
    out = torch.empty_like(q_latent)
    if out.numel() == 0:
        return out
    block_r = max(16, triton.next_power_of_2(rank))
    block_n = 16 if (block_r >= 256 or q_latent.dtype == torch.float32) else 32
    if num_splits is None:
        sms = num_sms(q_latent.device.index or 0) if q_latent.is_cuda else 4
        # one wave of programs (two per SM): the splits cover what batch x tokens leave free
        num_splits = max(1, min(2 * sms // (batch * s_q), triton.cdiv(num_sel, block_n)))
    rows = s_q * heads
    write_partial = num_splits > 1
    if write_partial:
        part_out, part_lse = split_partials(batch, rows, num_splits, rank, q_latent.device)
    else:
        part_out = part_lse = out
    upcast, precision = _dot_flags(q_latent)
    _mla_sparse_attend_kernel[(num_splits, s_q, batch)](
        q_latent, q_rope, kv_cache, indices,
        out, part_out, part_lse,
        softmax_scale * LOG2E, num_splits, num_sel,
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2),
        q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
        kv_cache.stride(0), kv_cache.stride(1),
        indices.stride(0), indices.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        rows * num_splits * rank, num_splits * rank, rank,
        heads,
        RANK=rank, ROPE=rope,
        BLOCK_H=max(16, triton.next_power_of_2(heads)), BLOCK_N=block_n, BLOCK_R=block_r,
        BLOCK_P=max(16, triton.next_power_of_2(rope)) if rope else 16,
        WRITE_PARTIAL=write_partial, DOT_PRECISION=precision, DOT_UPCAST=upcast,
        num_warps=4, num_stages=2,
    )
    if write_partial:
        merge_partials(part_out, part_lse, out)
    return out


def mla_sparse_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, lengths: torch.Tensor,
                      softmax_scale: float, kv_lora_rank: int, *, topk: int, window: int = 0, sink: int = 0,
                      index_rank: int | None = None, kernels: bool = True) -> torch.Tensor:
    """Sparse absorbed decode: index, select, attend (``mla_decode``'s contract plus the
    selection). ``kernels=False`` runs the references (the check for the kernels)."""
    index_rank = kv_lora_rank if index_rank is None else min(index_rank, kv_lora_rank)
    index, attend = ((mla_sparse_index, mla_sparse_attend) if kernels
                     else (mla_sparse_index_reference, mla_sparse_attend_reference))
    scores = index(q_latent, q_rope, kv_cache, lengths, kv_lora_rank, index_rank)  # [b, s, L]
    chosen = select_positions(scores, _query_positions(lengths, q_latent.shape[1]), topk, window, sink)
    return attend(q_latent, q_rope, kv_cache, chosen, softmax_scale, kv_lora_rank)


# ---------------------------------------------------------------------------
# Custom ops (opaque to torch.compile; fixed shapes, so CUDA-graph safe)
# ---------------------------------------------------------------------------


@torch.library.custom_op("mlakit::mla_sparse_index", mutates_args=())
def _mla_sparse_index_op(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                         lengths: torch.Tensor, kv_lora_rank: int, index_rank: int) -> torch.Tensor:
    return _mla_sparse_index(q_latent, q_rope, kv_cache, lengths, kv_lora_rank, index_rank).contiguous()


@_mla_sparse_index_op.register_fake
def _mla_sparse_index_fake(q_latent, q_rope, kv_cache, lengths, kv_lora_rank, index_rank):
    b, s = q_latent.shape[:2]
    return q_latent.new_empty((b, s, kv_cache.shape[1]), dtype=torch.float32)


@torch.library.custom_op("mlakit::mla_sparse_attend", mutates_args=())
def _mla_sparse_attend_op(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                          indices: torch.Tensor, softmax_scale: float, kv_lora_rank: int) -> torch.Tensor:
    return _mla_sparse_attend(q_latent, q_rope, kv_cache, indices, softmax_scale, kv_lora_rank).contiguous()


@_mla_sparse_attend_op.register_fake
def _mla_sparse_attend_fake(q_latent, q_rope, kv_cache, indices, softmax_scale, kv_lora_rank):
    return q_latent.new_empty(q_latent.shape)
