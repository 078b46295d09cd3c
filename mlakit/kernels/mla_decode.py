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
    mla_decode_reference  -- plain PyTorch, fp32 math
    absorb_query / absorb_output -- the two weight absorptions as single batched matmuls
    _mla_decode_split_kernel / _mla_decode_combine_kernel -- the Triton kernels
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from mlakit.kernels import mla_decode_gluon as _gluon  # Hopper kernel; imports this module's helpers lazily

try:  # Triton is optional: without it everything falls back to the reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False

# Triton decides between compiling and interpreting when a kernel is *decorated*
# (at import of this module), so the mode is read once here and dispatch follows it.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


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
# Argument checks shared by the kernel wrapper and the reference
# ---------------------------------------------------------------------------


def _check_decode_args(q_latent, q_rope, kv_cache, lengths, kv_lora_rank, allow_fp64=False) -> int:
    """Validate shapes/dtypes/devices; return rope_dim.  float64 only for the reference."""
    if q_latent.dim() != 4:
        raise ValueError(f"q_latent must be [batch, s_q, heads, kv_lora_rank], got shape {tuple(q_latent.shape)}")
    if q_rope.dim() != 4:
        raise ValueError(f"q_rope must be [batch, s_q, heads, rope_dim], got shape {tuple(q_rope.shape)}")
    if kv_cache.dim() != 3:
        raise ValueError(
            f"kv_cache must be [max_batch, max_len, kv_lora_rank + rope_dim], got shape {tuple(kv_cache.shape)}"
        )
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be [batch], got shape {tuple(lengths.shape)}")
    batch, s_q, heads, rank = q_latent.shape
    if rank != kv_lora_rank:
        raise ValueError(f"q_latent last dim {rank} != kv_lora_rank {kv_lora_rank}")
    if tuple(q_rope.shape[:3]) != (batch, s_q, heads):
        raise ValueError(f"q_rope {tuple(q_rope.shape)} must share [batch, s_q, heads] with q_latent {tuple(q_latent.shape)}")
    rope_dim = q_rope.shape[3]
    if kv_cache.shape[2] != kv_lora_rank + rope_dim:
        raise ValueError(
            f"kv_cache last dim {kv_cache.shape[2]} != kv_lora_rank {kv_lora_rank} + rope_dim {rope_dim}"
        )
    if kv_cache.shape[0] < batch:
        raise ValueError(f"kv_cache holds {kv_cache.shape[0]} sequences, fewer than batch {batch}")
    if lengths.shape[0] != batch:
        raise ValueError(f"lengths has {lengths.shape[0]} entries, batch is {batch}")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"lengths must be int32 or int64, got {lengths.dtype}")
    supported = _SUPPORTED_DTYPES + ((torch.float64,) if allow_fp64 else ())
    for name, t in (("q_latent", q_latent), ("q_rope", q_rope), ("kv_cache", kv_cache)):
        if t.dtype not in supported:
            raise TypeError(f"{name} dtype {t.dtype} not supported ({', '.join(str(d)[6:] for d in supported)})")
    if not (q_latent.dtype == q_rope.dtype == kv_cache.dtype):
        raise TypeError(
            f"q_latent ({q_latent.dtype}), q_rope ({q_rope.dtype}) and kv_cache ({kv_cache.dtype}) must share one dtype"
        )
    devices = {t.device for t in (q_latent, q_rope, kv_cache, lengths)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    return rope_dim


# ---------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------


def mla_decode_reference(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    lengths: torch.Tensor,
    softmax_scale: float,
    kv_lora_rank: int,
) -> torch.Tensor:
    """Plain PyTorch absorbed MLA decode (fp32 math; fp64 for fp64 inputs), same contract as ``mla_decode``.

    Query i of the s_q-token chunk of sequence b sees cache slots
    [0, lengths[b] - s_q + i].  Rows that see no slot (lengths[b] < s_q) give 0.
    """
    _check_decode_args(q_latent, q_rope, kv_cache, lengths, kv_lora_rank, allow_fp64=True)
    batch, s_q, _, rank = q_latent.shape
    math_dtype = torch.float64 if q_latent.dtype == torch.float64 else torch.float32
    cache = kv_cache[:batch].to(math_dtype)  # [b, L, r + p]
    latent, k_rope = cache[..., :rank], cache[..., rank:]  # [b, L, r], [b, L, p]
    scores = torch.einsum("bshr,blr->bshl", q_latent.to(math_dtype), latent)
    scores = scores + torch.einsum("bshp,blp->bshl", q_rope.to(math_dtype), k_rope)
    scores = scores * softmax_scale  # [b, s, h, L]

    slots = torch.arange(cache.shape[1], device=cache.device)  # [L]
    last_visible = lengths.to(cache.device).long()[:, None] - s_q + torch.arange(s_q, device=cache.device)  # [b, s]
    visible = slots[None, None, :] <= last_visible[:, :, None]  # [b, s, L]
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
    out = torch.einsum("bshl,blr->bshr", probs, latent)
    return out.to(q_latent.dtype)


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

    @triton.jit
    def _mla_decode_combine_kernel(
        part_out_ptr, part_lse_ptr, out_ptr,
        num_splits,
        num_heads,
        num_rows,
        stride_pb, stride_pm, stride_ps,
        stride_ob, stride_os, stride_oh,
        RANK: tl.constexpr,
        BLOCK_SPLITS: tl.constexpr,  # next_pow2(num_splits)
        BLOCK_RC: tl.constexpr,  # slice of the rank handled by one program
        WAIT_PRIOR: tl.constexpr,  # launched early (programmatic dependent launch): wait for the split kernel
    ):
        # Grid: (rank slices, rows, batch).  out = sum_s w_s * part_out_s with
        # w_s = exp2(lse_s - max) / sum(...): the usual flash-decoding merge.
        if WAIT_PRIOR:
            tl.extra.cuda.gdc_wait()  # the partials are complete and visible past this point
        pid_rc = tl.program_id(0)
        row = tl.program_id(1)
        pid_b = tl.program_id(2).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_SPLITS)
        offs_r = pid_rc * BLOCK_RC + tl.arange(0, BLOCK_RC)
        s_mask = offs_s < num_splits
        r_mask = offs_r < RANK

        part_row = pid_b * stride_pb + row * stride_pm
        lse = tl.load(part_lse_ptr + (pid_b * num_rows + row) * num_splits + offs_s, mask=s_mask, other=float("-inf"))
        lse_max = tl.max(lse, 0)
        lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # row that saw no slot -> output 0
        weights = tl.exp2(lse - lse_max)  # [BLOCK_SPLITS], 0 for empty splits
        total = tl.sum(weights, 0)
        weights = weights / tl.where(total == 0.0, 1.0, total)

        parts = tl.load(
            part_out_ptr + part_row + offs_s[:, None] * stride_ps + offs_r[None, :],
            mask=s_mask[:, None] & r_mask[None, :], other=0.0,
        )  # [BLOCK_SPLITS, BLOCK_RC]
        merged = tl.sum(parts * weights[:, None], 0)  # [BLOCK_RC]
        tok = row // num_heads
        head = row % num_heads
        tl.store(out_ptr + pid_b * stride_ob + tok * stride_os + head * stride_oh + offs_r,
                 merged.to(out_ptr.dtype.element_ty), mask=r_mask)


# ---------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=1024)  # decode calls repeat the same shapes: keep host overhead low
def default_config(batch: int, s_q: int, heads: int, rank: int, rope_dim: int, max_len: int,
                   device: torch.device, dtype: torch.dtype) -> dict:
    """Block sizes, warps, stages and split count for one call (tuned by a sweep on an H200, see docs/kernels.md)."""
    rows = s_q * heads
    # fp32 (tests only) runs the dots on FMA units with operands in registers: keep tiles small.
    block_h = min(32 if dtype == torch.float32 else 64, max(16, triton.next_power_of_2(rows)))
    block_r = max(16, triton.next_power_of_2(rank))
    row_blocks = triton.cdiv(rows, block_h)
    # Measured on an H200 (docs/kernels.md, sweep of 2026-11): latency, not bandwidth,
    # limits these tiles, so what helps is more cache bytes in flight per SM: 3 stages,
    # and two resident programs per SM (occupancy 2) where the tiles allow it.
    if dtype == torch.float32:
        block_n, num_warps, num_stages, occupancy = (16 if block_r >= 256 else 32), 4, 1, 1
    elif block_r >= 256 and block_h <= 32:
        # 32 heads x rank 512: 112 KB shared memory, two programs per SM.
        block_n, num_warps, num_stages, occupancy = 32, 4, 3, 2
    elif block_r >= 256:
        # 64-row blocks (>= 64 heads): wgmma-sized tiles, one program per SM.
        block_n, num_warps, num_stages, occupancy = 64, 8, 2, 1
    else:
        # small ranks (converted small models): small tiles, long key blocks.
        block_n, num_warps, num_stages, occupancy = 128, 4, 3, 2
    if device.type == "cuda":
        num_sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    else:
        num_sms = 4  # interpreter: a few splits so that the combine pass gets exercised
    # Flash-decoding: split the KV so that the programs fill the SMs in whole waves.
    # Rounding *down* matters: 16 sequences x 9 splits = 144 programs on 132 SMs would
    # need a second, nearly empty wave.  More splits than SMs only add combine work.
    programs = batch * row_blocks
    num_splits = max(1, min(occupancy * num_sms // programs, triton.cdiv(max_len, block_n), num_sms))
    return dict(block_h=block_h, block_n=block_n, num_warps=num_warps, num_stages=num_stages, num_splits=num_splits)


# The compiled kernels of the last launch (for diagnostics: registers, spills, shared memory).
LAST_COMPILED: dict = {}


def _use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or (INTERPRET and t.device.type == "cpu"))


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
    rope_dim = _check_decode_args(q_latent, q_rope, kv_cache, lengths, kv_lora_rank, allow_fp64=True)
    if backend == "gluon":  # forced: where the kernel cannot run (a CPU tensor included), say why
        why = _gluon.unsupported(q_latent, kv_cache, rope_dim)
        if why:
            raise ValueError(f"backend='gluon': {why}")
    if not _use_triton(q_latent) or q_latent.dtype == torch.float64:  # float64: tests, reference only
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
        softmax_scale * _LOG2E,
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


def split_partials(batch: int, rows: int, num_splits: int, rank: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-KV partials: ``part_out [batch, rows, splits, rank]`` and ``part_lse [batch, rows,
    splits]``, both fp32 and contiguous (their traffic stays mostly in L2: a few MB)."""
    return (torch.empty((batch, rows, num_splits, rank), dtype=torch.float32, device=device),
            torch.empty((batch, rows, num_splits), dtype=torch.float32, device=device))


def merge_partials(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, early_launch: bool = False) -> None:
    """``out [batch, s_q, heads, rank]`` from the splits' partials (``split_partials``' layout).

    ``early_launch``: programmatic dependent launch (Hopper): the merge grid is set up while
    the split kernel still runs (from its ``griddepcontrol.launch_dependents`` on) and waits
    in ``gdc_wait`` for its results, which hides this launch's latency."""
    batch, rows, num_splits, rank = part_out.shape
    block_splits = max(2, triton.next_power_of_2(num_splits))
    # Keep one program's tile at <= 4096 fp32 values (no register spills).
    block_rc = max(16, min(max(16, triton.next_power_of_2(rank)), 4096 // block_splits))
    LAST_COMPILED["combine"] = _mla_decode_combine_kernel[(triton.cdiv(rank, block_rc), rows, batch)](
        part_out, part_lse, out,
        num_splits, out.shape[2], rows,
        *part_out.stride()[:3],
        out.stride(0), out.stride(1), out.stride(2),
        RANK=rank,
        BLOCK_SPLITS=block_splits, BLOCK_RC=block_rc, WAIT_PRIOR=early_launch,
        num_warps=4, **({"launch_pdl": True} if early_launch else {}),
    )


@torch.library.custom_op("mlakit::mla_decode", mutates_args=())
def _mla_decode_op(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, lengths: torch.Tensor,
                   softmax_scale: float, kv_lora_rank: int) -> torch.Tensor:
    # contiguous, as the fake below says (the reference path may return another layout)
    return _mla_decode(q_latent, q_rope, kv_cache, lengths, softmax_scale, kv_lora_rank).contiguous()


@_mla_decode_op.register_fake
def _mla_decode_fake(q_latent, q_rope, kv_cache, lengths, softmax_scale, kv_lora_rank):
    return q_latent.new_empty(q_latent.shape)
