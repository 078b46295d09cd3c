"""Fused latent RMSNorm + RoPE + append into the packed MLA cache.

One decode step of an MLA layer produces, per new token, the down-projected
latent ``c_kv`` (kv_lora_rank values) and the pre-RoPE shared key (rope_dim
values).  Both go into one row of the packed cache:

    kv_cache[b, positions[b, t], :r] = rmsnorm(latent[b, t])          (if norm_weight is given)
    kv_cache[b, positions[b, t], r:] = rope(k_rope[b, t], positions[b, t])

Unfused this is a norm kernel, several element-wise RoPE kernels and two
scatter copies per layer and step; fused it is one launch that reads each input
once and writes the cache row once.

RoPE convention (Llama "rotate_half" over the rope dims): with half = rope_dim // 2,
x1 = x[:half], x2 = x[half:], out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin),
cos/sin: float32, either [max_pos, half] tables indexed by position (any
frequencies) or [batch, s, half], one row per new token (what the model computes).

Positions outside [0, min(max_len, max_pos)) are skipped (not written) by both
the kernel and the reference, so padding tokens can carry position -1.
"""

from __future__ import annotations

from typing import Optional

import torch

from mlakit.kernels.decode_common import HAS_TRITON, INTERPRET, check_quant_buffers
from mlakit.quant import cache_format, quantize, turned

if HAS_TRITON:
    import triton
    import triton.language as tl


def _check_rope_append_args(latent, k_rope, kv_cache, positions, cos, sin, norm_weight):
    if kv_cache.dim() != 3:
        raise ValueError(
            f"kv_cache must be [max_batch, max_len, kv_lora_rank + rope_dim], got shape {tuple(kv_cache.shape)}"
        )
    rank, rope_dim = latent.shape[-1], k_rope.shape[-1]
    if kv_cache.shape[2] != rank + rope_dim:
        raise ValueError(f"kv_cache last dim {kv_cache.shape[2]} != kv_lora_rank {rank} + rope_dim {rope_dim}")
    if not kv_cache.is_floating_point():
        raise TypeError(f"kv_cache must be floating point, got {kv_cache.dtype}")
    _check_inputs(latent, k_rope, kv_cache, positions, cos, sin, norm_weight, [kv_cache])


def _check_inputs(latent, k_rope, kv_cache, positions, cos, sin, norm_weight, caches):
    """The checks shared by both ``rope_append`` flavours; ``kv_cache``: any buffer ``[max_batch,
    max_len, ...]``, ``caches``: all the buffers written (one device with the inputs)."""
    if latent.dim() != 3:
        raise ValueError(f"latent must be [batch, s, kv_lora_rank], got shape {tuple(latent.shape)}")
    if k_rope.dim() != 3:
        raise ValueError(f"k_rope must be [batch, s, rope_dim], got shape {tuple(k_rope.shape)}")
    if positions.dim() != 2:
        raise ValueError(f"positions must be [batch, s], got shape {tuple(positions.shape)}")
    batch, seq, rank = latent.shape
    rope_dim = k_rope.shape[2]
    if tuple(k_rope.shape[:2]) != (batch, seq) or tuple(positions.shape) != (batch, seq):
        raise ValueError(
            f"latent {tuple(latent.shape)}, k_rope {tuple(k_rope.shape)} and positions {tuple(positions.shape)} "
            "must share [batch, s]"
        )
    if kv_cache.shape[0] < batch:
        raise ValueError(f"kv_cache holds {kv_cache.shape[0]} sequences, fewer than batch {batch}")
    if rope_dim % 2:
        raise ValueError(f"rope_dim must be even, got {rope_dim}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"positions must be int32 or int64, got {positions.dtype}")
    per_token = cos.dim() == 3
    if (sin.shape != cos.shape or cos.shape[-1] != rope_dim // 2
            or not (cos.dim() == 2 or (per_token and tuple(cos.shape[:2]) == (batch, seq)))):
        raise ValueError(
            f"cos and sin must both be [max_pos, rope_dim // 2 = {rope_dim // 2}] or "
            f"[batch, s, rope_dim // 2] = {(batch, seq, rope_dim // 2)}, got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if norm_weight is not None and tuple(norm_weight.shape) != (rank,):
        raise ValueError(f"norm_weight must be [kv_lora_rank = {rank}], got {tuple(norm_weight.shape)}")
    tensors = [latent, k_rope, positions, cos, sin, *caches] + ([norm_weight] if norm_weight is not None else [])
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    for name, t in (("latent", latent), ("k_rope", k_rope)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")


def rope_append_reference(
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm_weight: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-6,
) -> None:
    """Plain PyTorch version of ``rope_append`` (fp32 math, fp64 for fp64 inputs; in place into kv_cache)."""
    _check_rope_append_args(latent, k_rope, kv_cache, positions, cos, sin, norm_weight)
    rows, seq_idx, pos, keep = _new_rows(latent, k_rope, kv_cache.shape[1], positions, cos, sin, norm_weight, norm_eps)
    kv_cache[seq_idx[keep], pos[keep]] = rows[keep].to(kv_cache.dtype)


def _new_rows(latent, k_rope, max_len, positions, cos, sin, norm_weight, norm_eps):
    """The cache rows of the new tokens, ``[b, s, r + p]`` in fp32 (fp64 for fp64 inputs), with
    where they go: sequence and position ``[b, s]`` and which are written ``keep [b, s]``."""
    batch, seq, rank = latent.shape
    half = k_rope.shape[2] // 2
    wide = torch.float64 if latent.dtype == torch.float64 else torch.float32

    x = latent.to(wide)  # [b, s, r]
    if norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps) * norm_weight.to(wide)

    pos = positions.long()  # [b, s]
    per_token = cos.dim() == 3
    limit = max_len if per_token else min(max_len, cos.shape[0])
    keep = (pos >= 0) & (pos < limit)  # [b, s]
    safe_pos = pos.clamp(0, max(limit - 1, 0))
    k = k_rope.to(wide)
    k1, k2 = k[..., :half], k[..., half:]  # [b, s, half]
    if per_token:
        c, s = cos.to(wide), sin.to(wide)  # [b, s, half]
    else:
        c, s = cos.to(wide)[safe_pos], sin.to(wide)[safe_pos]  # [b, s, half]
    rotated = torch.cat([k1 * c - k2 * s, k2 * c + k1 * s], dim=-1)  # [b, s, p]
    seq_idx = torch.arange(batch, device=latent.device)[:, None].expand(batch, seq)
    return torch.cat([x, rotated], dim=-1), seq_idx, pos, keep  # [b, s, r + p]


if HAS_TRITON:

    @triton.jit
    def _round_to_e4m3(y):
        """fp32 ``y`` (|y| <= 448) rounded to the nearest float8 e4m3 value, ties to even, in fp32
        arithmetic: the cast of the result is then exact (the triton 3.9 interpreter's own cast
        does not carry a rounded-up mantissa into the exponent: 127 -> 64)."""
        bits = y.to(tl.int32, bitcast=True)
        # keep 3 of the 23 mantissa bits, round to nearest even (a carry moves into the exponent)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
        subnormal = (y + 24576.0) - 24576.0  # below 2^-6: multiples of 2^-9 (24576 = 1.5 * 2^14)
        return tl.where(tl.abs(y) < 0.015625, subnormal, normal)

    @triton.jit
    def _quantize_store(x, values_row, scales_row, valid, BLOCK: tl.constexpr, CHANNELS: tl.constexpr,
                        GROUP: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr, QTOP: tl.constexpr):
        """Quantise one row ``x [BLOCK]`` (fp32, zero past CHANNELS) as mlakit.quant.quantize does
        and store values and per-group scales; ``valid``: [BLOCK] write mask (position in range)."""
        groups = tl.reshape(x, [BLOCK // GROUP, GROUP])
        if QUANT == 3:  # int4: the signed extreme onto -8 (positive on a tie), 16 levels
            top = tl.max(groups, 1)
            bottom = tl.min(groups, 1)
            scale = tl.math.div_rn(tl.where(top >= -bottom, top, bottom), -QMAX)  # [BLOCK // GROUP]
        else:
            scale = tl.math.div_rn(tl.max(tl.abs(groups), 1), QMAX)  # [BLOCK // GROUP]
        y = tl.math.div_rn(groups, tl.where(scale != 0, scale, 1.0)[:, None])
        y = tl.reshape(tl.where(scale[:, None] != 0, y, 0.0), [BLOCK])
        offs = tl.arange(0, BLOCK)
        offs_g = tl.arange(0, BLOCK // GROUP)
        valid_g = tl.reshape(valid, [BLOCK // GROUP, GROUP])
        valid_g = tl.max(valid_g.to(tl.int32), 1) > 0  # any channel of the group valid: all are written
        tl.store(scales_row + offs_g, scale, mask=valid_g & (offs_g * GROUP < CHANNELS))
        if QUANT == 2:  # fp8 e4m3
            y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
            tl.store(values_row + offs, _round_to_e4m3(y).to(values_row.dtype.element_ty), mask=valid)
        else:
            q = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(0.5 - y))  # round half away from zero
            q = tl.minimum(tl.maximum(q, -QMAX), QTOP)  # CacheFormat.top_level
            if QUANT == 1:  # int8
                tl.store(values_row + offs, q.to(tl.int8), mask=valid)
            else:  # int4: channel 2j in the low nibble, 2j + 1 in the high one, each + 8
                lo, hi = tl.split(tl.reshape(q.to(tl.int32) + 8, [BLOCK // 2, 2]))
                lo_valid, hi_valid = tl.split(tl.reshape(valid, [BLOCK // 2, 2]))
                offs_b = tl.arange(0, BLOCK // 2)
                tl.store(values_row + offs_b, (lo | (hi << 4)).to(tl.uint8), mask=lo_valid & hi_valid)

    @triton.jit
    def _rope_append_kernel(
        latent_ptr, k_rope_ptr, lat_dst_ptr, rope_dst_ptr, scales_ptr, positions_ptr, cos_ptr, sin_ptr,
        norm_weight_ptr, rope_scales_ptr, turn_ptr,
        seq, pos_limit, norm_eps,
        stride_lb, stride_ls,
        stride_kb, stride_ks,
        stride_pb, stride_ps,
        stride_db, stride_dn,  # latent destination: the packed cache, or the quantised values
        stride_rb, stride_rn,  # RoPE key destination: the packed cache past RANK, or the 16-bit key buffer
        stride_sb, stride_sn,  # scales (QUANT only)
        stride_rsb, stride_rsn,  # the RoPE key's scales (ROPE_QUANT only)
        stride_cb, stride_cs, stride_cn,  # cos/sin: [b, s, half] (per token) or [max_pos, half] (table)
        RANK: tl.constexpr,
        HALF: tl.constexpr,  # rope_dim // 2
        BLOCK_R: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        HAS_NORM: tl.constexpr,
        PER_TOKEN: tl.constexpr,  # cos/sin rows per token instead of a table indexed by position
        QUANT: tl.constexpr = 0,  # 0: store as is; 1 int8, 2 fp8, 3 int4 (mlakit.quant formats)
        GROUP: tl.constexpr = 1,
        QMAX: tl.constexpr = 1.0,
        QTOP: tl.constexpr = 1.0,
        ROPE_QUANT: tl.constexpr = False,  # quantise the RoPE key too (QUANT's format) into rope_dst / rope_scales
        TURN: tl.constexpr = False,  # ... after turning it: key @ turn [2 * HALF, 2 * HALF] (fp32, row-major)
        BLOCK_P: tl.constexpr = 1,  # next_pow2(2 * HALF), >= GROUP (ROPE_QUANT only)
    ):
        # One program per new token.
        pid = tl.program_id(0)
        b = pid // seq
        t = pid % seq
        raw_pos = tl.load(positions_ptr + b * stride_pb + t * stride_ps).to(tl.int64)
        # Out-of-range positions (e.g. padding with position -1) are skipped.  The check
        # is broadcast to vectors because the interpreter rejects scalar & vector masks.
        offs_r = tl.arange(0, BLOCK_R)
        pos_r = tl.zeros([BLOCK_R], tl.int64) + raw_pos
        r_mask = (offs_r < RANK) & (pos_r >= 0) & (pos_r < pos_limit)
        pos = tl.minimum(tl.maximum(raw_pos, 0), pos_limit - 1)  # a safe address when skipped

        # Latent (+ RMSNorm in fp32).
        x = tl.load(latent_ptr + b * stride_lb + t * stride_ls + offs_r, mask=offs_r < RANK, other=0.0)
        x = x.to(tl.float32)
        if HAS_NORM:
            mean_sq = tl.sum(x * x, 0) / RANK
            w = tl.load(norm_weight_ptr + offs_r, mask=offs_r < RANK, other=0.0).to(tl.float32)
            x = x * tl.rsqrt(mean_sq + norm_eps) * w
        lat_row = lat_dst_ptr + b.to(tl.int64) * stride_db + pos * stride_dn
        if QUANT == 0:
            tl.store(lat_row + offs_r, x.to(lat_dst_ptr.dtype.element_ty), mask=r_mask)
        else:
            _quantize_store(x, lat_row, scales_ptr + b.to(tl.int64) * stride_sb + pos * stride_sn, r_mask,
                            BLOCK_R, RANK, GROUP, QUANT, QMAX, QTOP)

        # RoPE key, rotate_half convention.
        if HALF > 0:
            offs_h = tl.arange(0, BLOCK_HALF)
            pos_h = tl.zeros([BLOCK_HALF], tl.int64) + raw_pos
            h_mask = (offs_h < HALF) & (pos_h >= 0) & (pos_h < pos_limit)
            k_base = k_rope_ptr + b * stride_kb + t * stride_ks
            k1 = tl.load(k_base + offs_h, mask=offs_h < HALF, other=0.0).to(tl.float32)
            k2 = tl.load(k_base + HALF + offs_h, mask=offs_h < HALF, other=0.0).to(tl.float32)
            if PER_TOKEN:
                angle_row = b * stride_cb + t * stride_cs
            else:
                angle_row = pos * stride_cn
            c = tl.load(cos_ptr + angle_row + offs_h, mask=offs_h < HALF, other=0.0).to(tl.float32)
            s = tl.load(sin_ptr + angle_row + offs_h, mask=offs_h < HALF, other=0.0).to(tl.float32)
            rope_row = rope_dst_ptr + b.to(tl.int64) * stride_rb + pos * stride_rn
            r1 = k1 * c - k2 * s
            r2 = k2 * c + k1 * s
            if ROPE_QUANT:
                # The key as one row [BLOCK_P] = [r1, r2] @ M, M = turn or the identity: the halves
                # cannot be concatenated in registers when HALF is not a power of two, and with M
                # the identity every sum adds zeros to one product, so the row is exact.
                offs_p = tl.arange(0, BLOCK_P)
                rows_ok = (offs_h < HALF)[:, None] & (offs_p < 2 * HALF)[None, :]
                if TURN:
                    m1 = tl.load(turn_ptr + offs_h[:, None] * (2 * HALF) + offs_p[None, :], mask=rows_ok, other=0.0)
                    m2 = tl.load(turn_ptr + (HALF + offs_h)[:, None] * (2 * HALF) + offs_p[None, :], mask=rows_ok,
                                 other=0.0)
                else:
                    m1 = tl.where(rows_ok & (offs_p[None, :] == offs_h[:, None]), 1.0, 0.0)
                    m2 = tl.where(rows_ok & (offs_p[None, :] == (HALF + offs_h)[:, None]), 1.0, 0.0)
                key = tl.sum(r1[:, None] * m1, 0) + tl.sum(r2[:, None] * m2, 0)  # [BLOCK_P], zero past the key
                pos_p = tl.zeros([BLOCK_P], tl.int64) + raw_pos
                p_mask = (offs_p < 2 * HALF) & (pos_p >= 0) & (pos_p < pos_limit)
                _quantize_store(key, rope_row, rope_scales_ptr + b.to(tl.int64) * stride_rsb + pos * stride_rsn,
                                p_mask, BLOCK_P, 2 * HALF, GROUP, QUANT, QMAX, QTOP)
            else:
                out_dtype = rope_dst_ptr.dtype.element_ty
                tl.store(rope_row + offs_h, r1.to(out_dtype), mask=h_mask)
                tl.store(rope_row + HALF + offs_h, r2.to(out_dtype), mask=h_mask)


def _launch_shape(rank: int, half: int, group: int = 1, quant_rope: bool = False) -> tuple[dict, int]:
    """The kernel's block constexprs for a call (and the compile report), and its warps."""
    block_r = max(triton.next_power_of_2(rank), group)
    blocks = dict(BLOCK_R=block_r, BLOCK_HALF=max(1, triton.next_power_of_2(max(half, 1))),
                  BLOCK_P=max(triton.next_power_of_2(max(2 * half, 1)), group) if quant_rope else 1)
    return blocks, 4 if block_r >= 512 else (2 if block_r >= 128 else 1)


def rope_append(
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm_weight: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-6,
) -> None:
    """Normalise the latent, rotate the RoPE key and write both into the cache, in place.

    latent: [batch, s, kv_lora_rank]; k_rope: [batch, s, rope_dim] (pre-RoPE);
    kv_cache: [>= batch, max_len, kv_lora_rank + rope_dim]; positions: [batch, s] int
    (cache slot == position, cache row b == sequence b); cos/sin: float32 tables
    [max_pos, rope_dim // 2] indexed by position, or [batch, s, rope_dim // 2] per token;
    norm_weight: optional [kv_lora_rank] RMSNorm weight.  Returns None.

    Inside ``torch.compile`` the call is the custom op ``torch.ops.mlakit.rope_append``
    (it mutates ``kv_cache``; opaque to the compiler).
    """
    if torch.compiler.is_compiling():
        torch.ops.mlakit.rope_append(latent, k_rope, kv_cache, positions, cos, sin, norm_weight, norm_eps)
        return None
    _rope_append(latent, k_rope, kv_cache, positions, cos, sin, norm_weight, norm_eps)
    return None


def _rope_append(latent, k_rope, kv_cache, positions, cos, sin, norm_weight, norm_eps) -> None:
    _check_rope_append_args(latent, k_rope, kv_cache, positions, cos, sin, norm_weight)
    use_triton = HAS_TRITON and (latent.is_cuda or (INTERPRET and latent.device.type == "cpu"))
    if not use_triton or kv_cache.dtype == torch.float64:  # float64 (tests): the kernel computes in float32
        rope_append_reference(latent, k_rope, kv_cache, positions, cos, sin, norm_weight, norm_eps)
        return None
    batch, seq, rank = latent.shape
    half = k_rope.shape[2] // 2
    if batch * seq == 0:
        return None
    if kv_cache.stride(2) != 1:
        raise ValueError("kv_cache must be contiguous in its last dim (stride(2) == 1)")
    # Inputs are one row per token: make last dims contiguous rather than fail.
    latent = latent if latent.stride(2) == 1 else latent.contiguous()
    k_rope = k_rope if (half == 0 or k_rope.stride(2) == 1) else k_rope.contiguous()
    per_token = cos.dim() == 3
    # one layout for both: contiguous [.., half] rows with the same strides
    cos, sin = cos.contiguous(), sin.contiguous()
    if norm_weight is not None and norm_weight.stride(0) != 1:
        norm_weight = norm_weight.contiguous()
    pos_limit = kv_cache.shape[1] if per_token else min(kv_cache.shape[1], cos.shape[0])
    if per_token:
        stride_cb, stride_cs, stride_cn = cos.stride(0), cos.stride(1), 0
    else:
        stride_cb, stride_cs, stride_cn = 0, 0, cos.stride(0)
    blocks, num_warps = _launch_shape(rank, half)
    _rope_append_kernel[(batch * seq,)](
        latent, k_rope, kv_cache, kv_cache[..., rank:], kv_cache, positions, cos, sin,  # kv_cache: no scales
        norm_weight if norm_weight is not None else latent,  # dummy pointer when HAS_NORM is False
        kv_cache, kv_cache,  # no RoPE-key scales, no turn
        seq, pos_limit, norm_eps,
        latent.stride(0), latent.stride(1),
        k_rope.stride(0), k_rope.stride(1),
        positions.stride(0), positions.stride(1),
        kv_cache.stride(0), kv_cache.stride(1),
        kv_cache.stride(0), kv_cache.stride(1),
        0, 0,
        0, 0,
        stride_cb, stride_cs, stride_cn,
        RANK=rank, HALF=half, **blocks,
        HAS_NORM=norm_weight is not None,
        PER_TOKEN=per_token,
        num_warps=num_warps,
    )
    return None


@torch.library.custom_op("mlakit::rope_append", mutates_args=("kv_cache",))
def _rope_append_op(latent: torch.Tensor, k_rope: torch.Tensor, kv_cache: torch.Tensor, positions: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, norm_weight: Optional[torch.Tensor],
                    norm_eps: float) -> None:
    _rope_append(latent, k_rope, kv_cache, positions, cos, sin, norm_weight, norm_eps)


@_rope_append_op.register_fake
def _rope_append_fake(latent, k_rope, kv_cache, positions, cos, sin, norm_weight, norm_eps) -> None:
    return None


# ---------------------------------------------------------------------------
# Quantise on write: the same fused kernel writing a quantised latent (mlakit.quant)
# ---------------------------------------------------------------------------

_QUANT_CODES = {"int8": 1, "fp8": 2, "int4": 3}  # the kernel's QUANT constexpr


def _check_quant_buffers(latent, k_rope, values, scales, rope_cache, rope_scales, fmt) -> None:
    if not fmt.quantized:
        raise ValueError(f"rope_append_quant needs a quantised format, got {fmt.name} (use rope_append)")
    check_quant_buffers(fmt, latent.shape[-1], k_rope.shape[-1], values, scales, rope_cache, rope_scales, "rope_cache")


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def rope_append_quant_reference(latent, k_rope, values, scales, rope_cache, positions, cos, sin, fmt,
                                norm_weight=None, norm_eps=1e-6, *, rope_scales=None, rope_turn=None) -> None:
    """Plain PyTorch version of ``rope_append_quant``: ``rope_append_reference``'s rows, quantised
    by ``mlakit.quant.quantize`` (in place)."""
    if rope_turn is not None and rope_scales is None:
        raise ValueError("rope_turn turns a quantised RoPE key: it needs rope_scales")
    fmt = cache_format(fmt)
    _check_quant_buffers(latent, k_rope, values, scales, rope_cache, rope_scales, fmt)
    caches = [values, scales, rope_cache] + ([rope_scales] if rope_scales is not None else [])
    _check_inputs(latent, k_rope, values, positions, cos, sin, norm_weight, caches)
    rows, seq_idx, pos, keep = _new_rows(latent, k_rope, values.shape[1], positions, cos, sin, norm_weight, norm_eps)
    rank = latent.shape[-1]
    if _capturing(latent):
        # a CUDA graph cannot hold the boolean mask's data-dependent shape: under capture (the
        # engine's decode step) every position is in range, so every row is written
        rows, where = rows.float(), (seq_idx, pos)
    else:
        rows, where = rows[keep].float(), (seq_idx[keep], pos[keep])  # [n, r + p]
    values[where], scales[where] = quantize(rows[..., :rank], fmt)
    if rope_scales is None:
        rope_cache[where] = rows[..., rank:].to(rope_cache.dtype)
    else:
        rope = rows[..., rank:] if rope_turn is None else turned(rows[..., rank:], rope_turn)
        rope_cache[where], rope_scales[where] = quantize(rope, fmt)


def rope_append_quant(
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    values: torch.Tensor,
    scales: torch.Tensor,
    rope_cache: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    fmt,
    norm_weight: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-6,
    *,
    rope_scales: Optional[torch.Tensor] = None,
    rope_turn: Optional[torch.Tensor] = None,
) -> None:
    """``rope_append`` into a quantised latent cache (``mlakit.cache.QuantLatentCache``'s buffers), in place:
    the normalised latent quantised on write in the same kernel (``mlakit.quant`` format ``fmt``, a
    name or CacheFormat) into ``values [>= batch, max_len, stored(r)]`` and ``scales [.., groups(r)]``,
    the rotated key into ``rope_cache [.., rope_dim]`` (16-bit). With ``rope_scales`` the key is
    quantised too (``rope_cache [.., stored(rope_dim)]``), after ``@ rope_turn [rope_dim, rope_dim]``
    where given (``mlakit.quant.cache_turn``), in the same kernel.

    One launch on CUDA (fp8 needs sm_89+) and under TRITON_INTERPRET=1, the reference elsewhere.
    Stores the same bytes as the reference (a value within float32 rounding of a rounding tie may
    land one step apart on the GPU)."""
    fmt = cache_format(fmt)
    if torch.compiler.is_compiling():
        torch.ops.mlakit.rope_append_quant(latent, k_rope, values, scales, rope_cache, positions, cos, sin,
                                           fmt.name, norm_weight, norm_eps, rope_scales, rope_turn)
        return None
    _rope_append_quant(latent, k_rope, values, scales, rope_cache, positions, cos, sin, fmt, norm_weight, norm_eps,
                       rope_scales, rope_turn)
    return None


def _rope_append_quant(latent, k_rope, values, scales, rope_cache, positions, cos, sin, fmt, norm_weight, norm_eps,
                       rope_scales, rope_turn=None) -> None:
    if rope_turn is not None and rope_scales is None:
        raise ValueError("rope_turn turns a quantised RoPE key: it needs rope_scales")
    use_triton = HAS_TRITON and (latent.is_cuda or (INTERPRET and latent.device.type == "cpu"))
    if fmt.name == "fp8" and latent.is_cuda and torch.cuda.get_device_capability(latent.device) < (8, 9):
        use_triton = False  # no e4m3 conversion before Ada / Hopper
    if not use_triton or latent.dtype == torch.float64:
        rope_append_quant_reference(latent, k_rope, values, scales, rope_cache, positions, cos, sin, fmt,
                                    norm_weight, norm_eps, rope_scales=rope_scales, rope_turn=rope_turn)
        return None
    _check_quant_buffers(latent, k_rope, values, scales, rope_cache, rope_scales, fmt)
    _check_inputs(latent, k_rope, values, positions, cos, sin, norm_weight, [values, scales, rope_cache])
    batch, seq, rank = latent.shape
    half = k_rope.shape[2] // 2
    if batch * seq == 0:
        return None
    quant_rope = rope_scales is not None and half > 0
    if values.stride(2) != 1 or scales.stride(2) != 1 or (half and rope_cache.stride(2) != 1) or (
            quant_rope and rope_scales.stride(2) != 1):
        raise ValueError("values, scales, rope_cache and rope_scales must be contiguous in their last dim")
    turn = None
    if quant_rope and rope_turn is not None:
        if tuple(rope_turn.shape) != (2 * half, 2 * half):
            raise ValueError(f"rope_turn must be [rope_dim, rope_dim] = {(2 * half, 2 * half)}, "
                             f"got {tuple(rope_turn.shape)}")
        turn = rope_turn.to(device=latent.device, dtype=torch.float32).contiguous()
    latent = latent if latent.stride(2) == 1 else latent.contiguous()
    k_rope = k_rope if (half == 0 or k_rope.stride(2) == 1) else k_rope.contiguous()
    per_token = cos.dim() == 3
    cos, sin = cos.contiguous(), sin.contiguous()
    if norm_weight is not None and norm_weight.stride(0) != 1:
        norm_weight = norm_weight.contiguous()
    pos_limit = values.shape[1] if per_token else min(values.shape[1], cos.shape[0])
    angle_strides = (cos.stride(0), cos.stride(1), 0) if per_token else (0, 0, cos.stride(0))
    group = fmt.group_size
    if group & (group - 1):
        raise ValueError(f"the kernel needs a power-of-two group size, got {group}")
    blocks, num_warps = _launch_shape(rank, half, group, quant_rope)
    _rope_append_kernel[(batch * seq,)](
        latent, k_rope, values, rope_cache, scales, positions, cos, sin,
        norm_weight if norm_weight is not None else latent,
        rope_scales if quant_rope else scales, turn if turn is not None else scales,  # dummies when unused
        seq, pos_limit, norm_eps,
        latent.stride(0), latent.stride(1),
        k_rope.stride(0), k_rope.stride(1),
        positions.stride(0), positions.stride(1),
        values.stride(0), values.stride(1),
        rope_cache.stride(0), rope_cache.stride(1),
        scales.stride(0), scales.stride(1),
        *((rope_scales.stride(0), rope_scales.stride(1)) if quant_rope else (0, 0)),
        *angle_strides,
        RANK=rank, HALF=half, **blocks,
        HAS_NORM=norm_weight is not None,
        PER_TOKEN=per_token,
        QUANT=_QUANT_CODES[fmt.name], GROUP=group, QMAX=float(fmt.qmax), QTOP=float(fmt.top_level),
        ROPE_QUANT=quant_rope, TURN=turn is not None,
        num_warps=num_warps,
    )
    return None


@torch.library.custom_op("mlakit::rope_append_quant", mutates_args=("values", "scales", "rope_cache", "rope_scales"))
def _rope_append_quant_op(latent: torch.Tensor, k_rope: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                          rope_cache: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          fmt: str, norm_weight: Optional[torch.Tensor], norm_eps: float,
                          rope_scales: Optional[torch.Tensor], rope_turn: Optional[torch.Tensor]) -> None:
    _rope_append_quant(latent, k_rope, values, scales, rope_cache, positions, cos, sin, cache_format(fmt),
                       norm_weight, norm_eps, rope_scales, rope_turn)


@_rope_append_quant_op.register_fake
def _rope_append_quant_fake(latent, k_rope, values, scales, rope_cache, positions, cos, sin, fmt, norm_weight,
                            norm_eps, rope_scales, rope_turn) -> None:
    return None


def compile_report(fmt: str | None = "int8", rank: int = 512, rope: int = 64, quant_rope: bool = True,
                   arch: int = 90) -> dict:
    """Compile the fused kernel for ``sm_{arch}`` without a GPU (bf16 inputs, per-token angles, the
    latent norm; ``fmt`` None: the 16-bit cache): shared memory and PTX size. The interpreter runs
    the numbers but not the compiler, which alone rejects some programs (tests/kernels/test_rope_append_compile.py)."""
    from mlakit.kernels.ptxas import STORAGE_TYPES, compile_offline

    f = cache_format(fmt) if fmt else None
    storage = "*bf16" if f is None else "*" + STORAGE_TYPES[f.name]
    quant_rope = bool(f) and quant_rope
    blocks, num_warps = _launch_shape(rank, rope // 2, f.group_size if f else 1, quant_rope)
    constexprs = dict(RANK=rank, HALF=rope // 2, **blocks, HAS_NORM=True, PER_TOKEN=True,
                      QUANT=_QUANT_CODES[f.name] if f else 0, GROUP=f.group_size if f else 1,
                      QMAX=float(f.qmax) if f else 1.0, QTOP=float(f.top_level) if f else 1.0,
                      ROPE_QUANT=quant_rope, TURN=quant_rope and f.stores_turned)
    pointers = {"latent_ptr": "*bf16", "k_rope_ptr": "*bf16", "lat_dst_ptr": storage,
                "rope_dst_ptr": storage if quant_rope else "*bf16", "scales_ptr": "*fp32", "positions_ptr": "*i64",
                "cos_ptr": "*fp32", "sin_ptr": "*fp32", "norm_weight_ptr": "*bf16", "rope_scales_ptr": "*fp32",
                "turn_ptr": "*fp32"}
    kernel = compile_offline(_rope_append_kernel, pointers, constexprs, dict(num_warps=num_warps), arch=arch,
                             floats=("norm_eps",))
    return {"shared_bytes": kernel.metadata.shared, "ptx_lines": kernel.asm["ptx"].count("\n")}
