"""Absorbed MLA decode attention over the packed latent cache.

Multi-head latent attention (DeepSeek-V2/V3) caches one vector per token and
layer: the compressed latent ``c_kv`` (``kv_lora_rank`` values) followed by the
shared RoPE key (``rope_dim`` values).  In *absorbed* form the key up-projection
is folded into the query (``absorb_query``) and the value up-projection into the
output (``absorb_output``), so attention runs directly on the latent cache:

    score[h, n] = scale * (q_latent[h] . latent[n] + q_rope[h] . k_rope[n])
    out[h]      = sum_n softmax_n(score[h, :]) * latent[n]          # [rank]

Every head of one sequence attends to the *same* cache rows, so the kernel
stacks all (query token, head) rows of a sequence into the M dimension of one
tensor-core dot: a cache tile is read from memory once per sequence, not once
per head.  That is what makes MLA decode memory-bound at 32 heads instead of
compute-bound on scalar units.

Layout (fixed by the engine):
    kv_cache: [max_batch, max_len, kv_lora_rank + rope_dim]   latent first, then RoPE key
    slot index == token position; row b of the cache belongs to sequence b.

This file holds:
    mla_decode            -- dispatching wrapper (Triton on CUDA / interpreter, else reference)
    absorb_query / absorb_output -- the two weight absorptions as single batched matmuls
    _mla_decode_split_kernel -- the Triton kernel
The reference (``mla_decode_reference``), the launch configuration and the merge of the
split-KV partials are ``decode_common``'s; import them from there.
"""

from __future__ import annotations

from typing import Optional

import torch

from mlakit.kernels import mla_decode_gluon as _gluon  # Hopper kernel
from mlakit.kernels.decode_common import (
    HAS_TRITON, LAST_COMPILED, LOG2E, check_decode_args, default_config, merge_partials, mla_decode_reference,
    split_partials, triton, tl, use_triton,
)

# ---------------------------------------------------------------------------
# Weight absorption (plain PyTorch, one batched matmul each)
# ---------------------------------------------------------------------------


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """Fold the per-head key up-projection into the query.

    q_nope: [batch, s, heads, nope_dim]; w_uk: [heads, nope_dim, kv_lora_rank]
    returns q_latent: [batch, s, heads, kv_lora_rank], so that
    q_latent . latent == q_nope . (w_uk[h] @ latent)  for every head h.
    """
    if q_nope.dim() != 4 or w_uk.dim() != 3:
        raise ValueError(
            f"absorb_query expects q_nope [batch, s, heads, nope_dim] and w_uk [heads, nope_dim, rank], "
            f"got {tuple(q_nope.shape)} and {tuple(w_uk.shape)}"
        )
    if q_nope.shape[2] != w_uk.shape[0] or q_nope.shape[3] != w_uk.shape[1]:
        raise ValueError(
            f"absorb_query: q_nope {tuple(q_nope.shape)} does not match w_uk {tuple(w_uk.shape)} "
            "(heads and nope_dim must agree)"
        )
    # einsum lowers to one bmm batched over heads (no Python loop).
    return torch.einsum("bshd,hdr->bshr", q_nope, w_uk)  # [b, s, h, r]


def absorb_output(o_latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """Apply the per-head value up-projection to the latent-space attention output.

    o_latent: [batch, s, heads, kv_lora_rank]; w_uv: [heads, kv_lora_rank, v_dim]
    returns [batch, s, heads, v_dim].
    """
    if o_latent.dim() != 4 or w_uv.dim() != 3:
        raise ValueError(
            f"absorb_output expects o_latent [batch, s, heads, rank] and w_uv [heads, rank, v_dim], "
            f"got {tuple(o_latent.shape)} and {tuple(w_uv.shape)}"
        )
    if o_latent.shape[2] != w_uv.shape[0] or o_latent.shape[3] != w_uv.shape[1]:
        raise ValueError(
            f"absorb_output: o_latent {tuple(o_latent.shape)} does not match w_uv {tuple(w_uv.shape)} "
            "(heads and kv_lora_rank must agree)"
        )
    return torch.einsum("bshr,hrv->bshv", o_latent, w_uv)  # [b, s, h, v]


# ---------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _mla_decode_split_kernel(
        q_latent_ptr, q_rope_ptr, kv_ptr, lengths_ptr,
        out_ptr, part_out_ptr, part_lse_ptr,
        scale_log2,  # softmax_scale * log2(e): the softmax runs in base 2
        num_splits,
        stride_qlb, stride_qls, stride_qlh,
        stride_qrb, stride_qrs, stride_qrh,
        stride_kvb, stride_kvn,
        stride_ob, stride_os, stride_oh,
        stride_pb, stride_pm, stride_ps,  # part_out [b, rows, split, r]; part_lse [b, rows, split] is contiguous
        num_heads,
        s_q,
        RANK: tl.constexpr,
        ROPE: tl.constexpr,
        BLOCK_H: tl.constexpr,  # query rows (token x head) per program: the M of the dots
        BLOCK_N: tl.constexpr,  # cache slots per iteration
        BLOCK_R: tl.constexpr,  # next_pow2(RANK)
        BLOCK_P: tl.constexpr,  # next_pow2(ROPE), >= 16 for the dot
        WRITE_PARTIAL: tl.constexpr,  # True: write (out, lse) per split for the combine pass
        DOT_PRECISION: tl.constexpr,
        DOT_UPCAST: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong (triton 3.9), use fp32
    ):
        # Grid: (row blocks, splits, batch).  Row blocks of one (split, sequence) are
        # adjacent in launch order, so when heads need more than one block the second
        # read of the same cache tile tends to hit L2.
        pid_rows = tl.program_id(0)
        pid_split = tl.program_id(1)
        pid_b = tl.program_id(2).to(tl.int64)

        # Query rows m = token * num_heads + head of this sequence's chunk.
        num_rows = s_q * num_heads
        rows = pid_rows * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        row_valid = rows < num_rows
        row_tok = rows // num_heads
        row_head = rows % num_heads

        seq_len = tl.load(lengths_ptr + pid_b).to(tl.int32)
        # Causal within the chunk: token i sees slots [0, seq_len - s_q + i].
        row_last = seq_len - s_q + row_tok  # [BLOCK_H]

        # Even split of this sequence's *actual* length (no host sync on lengths),
        # rounded to whole tiles so that only the last tile of a split is partial.
        keys_per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        split_start = pid_split * keys_per_split
        split_end = tl.minimum(split_start + keys_per_split, seq_len)

        offs_r = tl.arange(0, BLOCK_R)
        offs_p = tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        r_mask = offs_r < RANK
        p_mask = offs_p < ROPE

        # Queries stay on chip for the whole loop.
        q_lat = tl.load(
            q_latent_ptr + pid_b * stride_qlb + row_tok[:, None] * stride_qls + row_head[:, None] * stride_qlh
            + offs_r[None, :],
            mask=row_valid[:, None] & r_mask[None, :], other=0.0,
        )  # [BLOCK_H, BLOCK_R]
        if ROPE > 0:
            q_rope = tl.load(
                q_rope_ptr + pid_b * stride_qrb + row_tok[:, None] * stride_qrs + row_head[:, None] * stride_qrh
                + offs_p[None, :],
                mask=row_valid[:, None] & p_mask[None, :], other=0.0,
            )  # [BLOCK_H, BLOCK_P]
            if DOT_UPCAST:
                q_rope = q_rope.to(tl.float32)
        if DOT_UPCAST:
            q_lat = q_lat.to(tl.float32)

        kv_seq = kv_ptr + pid_b * stride_kvb
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max (base-2 units)
        l_i = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp2
        acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)  # running sum of p * latent

        for start_n in range(split_start, split_end, BLOCK_N):
            slots = start_n + offs_n  # [BLOCK_N]
            slot_valid = slots < split_end
            # One tile of latent rows, used twice: as K (scores) and as V (output).
            latent = tl.load(
                kv_seq + slots[:, None] * stride_kvn + offs_r[None, :],
                mask=slot_valid[:, None] & r_mask[None, :], other=0.0,
            )  # [BLOCK_N, BLOCK_R]
            if DOT_UPCAST:
                latent = latent.to(tl.float32)
            scores = tl.dot(q_lat, tl.trans(latent), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
            if ROPE > 0:
                k_rope = tl.load(
                    kv_seq + slots[:, None] * stride_kvn + RANK + offs_p[None, :],
                    mask=slot_valid[:, None] & p_mask[None, :], other=0.0,
                )  # [BLOCK_N, BLOCK_P]
                if DOT_UPCAST:
                    k_rope = k_rope.to(tl.float32)
                scores += tl.dot(q_rope, tl.trans(k_rope), input_precision=DOT_PRECISION)
            scores = scores * scale_log2
            # Splits are whole tiles, so slots >= split_end occur only in the sequence's
            # last tile, where they are > row_last: this one mask covers both cases.
            visible = slots[None, :] <= row_last[:, None]
            scores = tl.where(visible, scores, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(scores, 1))
            # A row that has seen nothing yet keeps m = -inf; shift by 0 to avoid inf - inf.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_shift)  # [BLOCK_H]
            p = tl.exp2(scores - m_shift[:, None])  # [BLOCK_H, BLOCK_N]
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(latent.dtype), latent, input_precision=DOT_PRECISION)
            m_i = m_new

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out_tile = acc / l_safe[:, None]  # [BLOCK_H, BLOCK_R]
        store_mask = row_valid[:, None] & r_mask[None, :]
        if WRITE_PARTIAL:
            part_rows = pid_b * stride_pb + rows * stride_pm + pid_split * stride_ps  # [BLOCK_H]
            tl.store(part_out_ptr + part_rows[:, None] + offs_r[None, :], out_tile, mask=store_mask)
            # log2-sum-exp2 of this split; -inf for a split that saw no slot.
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
            lse_index = (pid_b * num_rows + rows) * num_splits + pid_split  # [BLOCK_H]
            tl.store(part_lse_ptr + lse_index, lse, mask=row_valid)
        else:
            out_rows = pid_b * stride_ob + row_tok * stride_os + row_head * stride_oh  # [BLOCK_H]
            tl.store(out_ptr + out_rows[:, None] + offs_r[None, :],
                     out_tile.to(out_ptr.dtype.element_ty), mask=store_mask)

# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    lengths: torch.Tensor,
    softmax_scale: float,
    kv_lora_rank: int,
    *,
    out: Optional[torch.Tensor] = None,
    config: Optional[dict] = None,
    backend: str = "auto",
    kv_scales: Optional[torch.Tensor] = None,
    k_rope: Optional[torch.Tensor] = None,
    kv_format=None,
    rope_scales: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Absorbed MLA decode over the packed latent cache.

    A quantised cache (``mlakit.cache.QuantLatentCache``): ``kv_cache`` its values, ``kv_scales``
    its scales, ``k_rope`` (and ``rope_scales``) its RoPE key, ``kv_format`` its format; the call
    is then ``mla_decode_quant.mla_decode_quant`` (the Triton kernel; ``backend`` must be "auto"
    or "triton").

    q_latent: [batch, s_q, heads, kv_lora_rank]   (already absorbed: q_nope @ w_uk)
    q_rope:   [batch, s_q, heads, rope_dim]       (rope_dim may be 0)
    kv_cache: [>= batch, max_len, kv_lora_rank + rope_dim]
    lengths:  [batch] int32/int64, valid slots per sequence *including* the s_q new tokens
    returns   [batch, s_q, heads, kv_lora_rank] in q's dtype (fp32 accumulation)

    Runs a kernel for CUDA tensors (and the Triton kernel for CPU tensors when
    TRITON_INTERPRET=1 was set before import), the reference otherwise. On CUDA,
    ``backend`` picks the kernel: ``"auto"`` takes the Gluon kernel (``mla_decode_gluon.py``) on a
    Hopper GPU where it applies (bf16/fp16, power-of-two rank 64-512 and rope 16-64, a
    contiguous cache) and the Triton kernel elsewhere; ``"triton"`` or ``"gluon"`` force
    one (``"gluon"`` raises ValueError where it cannot run). ``out`` (optional) receives the
    result; ``config`` overrides the kernel's launch configuration for tuning: keys of
    ``default_config`` for Triton (under ``"auto"`` a config implies Triton), of
    ``mla_decode_gluon.gluon_config`` with ``backend="gluon"``.

    Inside ``torch.compile`` the call is the custom op ``torch.ops.mlakit.mla_decode``
    (opaque to the compiler, so the wrapper's launch logic is not traced).
    """
    if backend not in ("auto", "triton", "gluon"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'gluon', got {backend!r}")
    if kv_scales is not None:
        from mlakit.kernels.mla_decode_quant import mla_decode_quant

        if backend == "gluon" or k_rope is None or kv_format is None:
            raise ValueError("a quantised cache needs k_rope and kv_format, and runs the Triton kernel")
        return mla_decode_quant(q_latent, q_rope, kv_cache, kv_scales, k_rope, lengths, softmax_scale, kv_lora_rank,
                                kv_format, rope_scales=rope_scales, out=out, config=config)
    if torch.compiler.is_compiling() and out is None and config is None and backend == "auto":
        # fixed, contiguous layouts in and out (the compiler may lay intermediates out otherwise)
        return torch.ops.mlakit.mla_decode(q_latent.contiguous(), q_rope.contiguous(), kv_cache, lengths,
                                           softmax_scale, kv_lora_rank)
    return _mla_decode(q_latent, q_rope, kv_cache, lengths, softmax_scale, kv_lora_rank, out=out, config=config,
                       backend=backend)


def _mla_decode(q_latent, q_rope, kv_cache, lengths, softmax_scale, kv_lora_rank, *, out=None, config=None,
                backend="auto"):
    rope_dim = check_decode_args(q_latent, q_rope, kv_cache, lengths, kv_lora_rank, allow_fp64=True)
    if backend == "gluon":  # forced: where the kernel cannot run (a CPU tensor included), say why
        why = _gluon.unsupported(q_latent, kv_cache, rope_dim)
        if why:
            raise ValueError(f"backend='gluon': {why}")
    if not use_triton(q_latent) or q_latent.dtype == torch.float64:  # float64: tests, reference only
        result = mla_decode_reference(q_latent, q_rope, kv_cache, lengths, softmax_scale, kv_lora_rank)
        if out is not None:
            out.copy_(result)
            return out
        return result

    batch, s_q, heads, rank = q_latent.shape
    if kv_cache.stride(2) != 1:
        raise ValueError("kv_cache must be contiguous in its last dim (stride(2) == 1)")
    # The queries are small; make their last dim contiguous rather than fail.
    if q_latent.stride(3) != 1:
        q_latent = q_latent.contiguous()
    if rope_dim > 0 and q_rope.stride(3) != 1:
        q_rope = q_rope.contiguous()
    if out is None:
        out = torch.empty((batch, s_q, heads, rank), dtype=q_latent.dtype, device=q_latent.device)
    elif out.shape != q_latent.shape or out.dtype != q_latent.dtype or out.device != q_latent.device or out.stride(3) != 1:
        raise ValueError(
            f"out must be a {tuple(q_latent.shape)} {q_latent.dtype} tensor on {q_latent.device} "
            f"with a contiguous last dim, got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if batch == 0 or s_q == 0 or heads == 0:
        return out
    if backend == "gluon" or (backend == "auto" and config is None and _gluon.applies(q_latent, kv_cache, rope_dim)):
        return _gluon.run(q_latent, q_rope, kv_cache, lengths, softmax_scale, out, config)

    cfg = dict(default_config(batch, s_q, heads, rank, rope_dim, kv_cache.shape[1], q_latent.device, q_latent.dtype))
    if config:
        unknown = set(config) - set(cfg)
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(cfg)}")
        cfg.update(config)
    rows = s_q * heads
    block_h = cfg["block_h"]
    block_r = max(16, triton.next_power_of_2(rank))
    block_p = max(16, triton.next_power_of_2(rope_dim)) if rope_dim > 0 else 16
    block_n = cfg["block_n"]
    num_splits = max(1, int(cfg["num_splits"]))
    row_blocks = triton.cdiv(rows, block_h)
    # The interpreter's bf16 dot is broken (triton 3.9): interpreted runs upcast to fp32.
    dot_upcast = q_latent.device.type == "cpu" and q_latent.dtype == torch.bfloat16
    dot_precision = "ieee" if (q_latent.dtype == torch.float32 or dot_upcast) else "tf32"

    write_partial = num_splits > 1
    if write_partial:
        part_out, part_lse = split_partials(batch, rows, num_splits, rank, q_latent.device)
    else:
        part_out = part_lse = out  # unused placeholders
    stride_pb, stride_pm, stride_ps = rows * num_splits * rank, num_splits * rank, rank

    grid = (row_blocks, num_splits, batch)
    LAST_COMPILED["split"] = _mla_decode_split_kernel[grid](
        q_latent, q_rope, kv_cache, lengths,
        out, part_out, part_lse,
        softmax_scale * LOG2E,
        num_splits,
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2),
        q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
        kv_cache.stride(0), kv_cache.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        stride_pb, stride_pm, stride_ps,
        heads, s_q,
        RANK=rank, ROPE=rope_dim,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_P=block_p,
        WRITE_PARTIAL=write_partial, DOT_PRECISION=dot_precision, DOT_UPCAST=dot_upcast,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if write_partial:
        merge_partials(part_out, part_lse, out)
    return out


def mla_decode_gluon(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, lengths: torch.Tensor,
                     softmax_scale: float, kv_lora_rank: int, *, out: torch.Tensor | None = None,
                     num_splits: int | None = None, stages: int | None = None,
                     num_warps: int | None = None) -> torch.Tensor:
    """``mla_decode(..., backend="gluon")`` (same arguments, checks and result; ValueError
    where this kernel cannot run), the keywords overriding ``gluon_config``."""
    overrides = {k: v for k, v in dict(num_splits=num_splits, stages=stages, num_warps=num_warps).items()
                 if v is not None}
    return mla_decode(q_latent, q_rope, kv_cache, lengths, softmax_scale, kv_lora_rank, out=out,
                      config=overrides or None, backend="gluon")


@torch.library.custom_op("mlakit::mla_decode", mutates_args=())
def _mla_decode_op(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, lengths: torch.Tensor,
                   softmax_scale: float, kv_lora_rank: int) -> torch.Tensor:
    # contiguous, as the fake below says (the reference path may return another layout)
    return _mla_decode(q_latent, q_rope, kv_cache, lengths, softmax_scale, kv_lora_rank).contiguous()


@_mla_decode_op.register_fake
def _mla_decode_fake(q_latent, q_rope, kv_cache, lengths, softmax_scale, kv_lora_rank):
    return q_latent.new_empty(q_latent.shape)
