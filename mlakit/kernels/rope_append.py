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

from mlakit.kernels.mla_decode import HAS_TRITON, INTERPRET

if HAS_TRITON:
    import triton
    import triton.language as tl


def _check_rope_append_args(latent, k_rope, kv_cache, positions, cos, sin, norm_weight):
    if latent.dim() != 3:
        raise ValueError(f"latent must be [batch, s, kv_lora_rank], got shape {tuple(latent.shape)}")
    if k_rope.dim() != 3:
        raise ValueError(f"k_rope must be [batch, s, rope_dim], got shape {tuple(k_rope.shape)}")
    if kv_cache.dim() != 3:
        raise ValueError(
            f"kv_cache must be [max_batch, max_len, kv_lora_rank + rope_dim], got shape {tuple(kv_cache.shape)}"
        )
    if positions.dim() != 2:
        raise ValueError(f"positions must be [batch, s], got shape {tuple(positions.shape)}")
    batch, seq, rank = latent.shape
    rope_dim = k_rope.shape[2]
    if tuple(k_rope.shape[:2]) != (batch, seq) or tuple(positions.shape) != (batch, seq):
        raise ValueError(
            f"latent {tuple(latent.shape)}, k_rope {tuple(k_rope.shape)} and positions {tuple(positions.shape)} "
            "must share [batch, s]"
        )
    if kv_cache.shape[2] != rank + rope_dim:
        raise ValueError(f"kv_cache last dim {kv_cache.shape[2]} != kv_lora_rank {rank} + rope_dim {rope_dim}")
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
    tensors = [latent, k_rope, kv_cache, positions, cos, sin] + ([norm_weight] if norm_weight is not None else [])
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    for name, t in (("latent", latent), ("k_rope", k_rope), ("kv_cache", kv_cache)):
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
    batch, seq, rank = latent.shape
    half = k_rope.shape[2] // 2
    wide = torch.float64 if latent.dtype == torch.float64 else torch.float32

    x = latent.to(wide)  # [b, s, r]
    if norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps) * norm_weight.to(wide)

    pos = positions.long()  # [b, s]
    per_token = cos.dim() == 3
    limit = kv_cache.shape[1] if per_token else min(kv_cache.shape[1], cos.shape[0])
    keep = (pos >= 0) & (pos < limit)  # [b, s]
    safe_pos = pos.clamp(0, max(limit - 1, 0))
    k = k_rope.to(wide)
    k1, k2 = k[..., :half], k[..., half:]  # [b, s, half]
    if per_token:
        c, s = cos.to(wide), sin.to(wide)  # [b, s, half]
    else:
        c, s = cos.to(wide)[safe_pos], sin.to(wide)[safe_pos]  # [b, s, half]
    rotated = torch.cat([k1 * c - k2 * s, k2 * c + k1 * s], dim=-1)  # [b, s, p]

    new_rows = torch.cat([x, rotated], dim=-1).to(kv_cache.dtype)  # [b, s, r + p]
    seq_idx = torch.arange(batch, device=latent.device)[:, None].expand(batch, seq)
    kv_cache[seq_idx[keep], pos[keep]] = new_rows[keep]


if HAS_TRITON:

    @triton.jit
    def _rope_append_kernel(
        latent_ptr, k_rope_ptr, kv_ptr, positions_ptr, cos_ptr, sin_ptr, norm_weight_ptr,
        seq, pos_limit, norm_eps,
        stride_lb, stride_ls,
        stride_kb, stride_ks,
        stride_pb, stride_ps,
        stride_kvb, stride_kvn,
        stride_cb, stride_cs, stride_cn,  # cos/sin: [b, s, half] (per token) or [max_pos, half] (table)
        RANK: tl.constexpr,
        HALF: tl.constexpr,  # rope_dim // 2
        BLOCK_R: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        HAS_NORM: tl.constexpr,
        PER_TOKEN: tl.constexpr,  # cos/sin rows per token instead of a table indexed by position
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
        cache_row = kv_ptr + b.to(tl.int64) * stride_kvb + pos * stride_kvn

        # Latent (+ RMSNorm in fp32).
        x = tl.load(latent_ptr + b * stride_lb + t * stride_ls + offs_r, mask=offs_r < RANK, other=0.0)
        x = x.to(tl.float32)
        if HAS_NORM:
            mean_sq = tl.sum(x * x, 0) / RANK
            w = tl.load(norm_weight_ptr + offs_r, mask=offs_r < RANK, other=0.0).to(tl.float32)
            x = x * tl.rsqrt(mean_sq + norm_eps) * w
        tl.store(cache_row + offs_r, x.to(kv_ptr.dtype.element_ty), mask=r_mask)

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
            out_dtype = kv_ptr.dtype.element_ty
            tl.store(cache_row + RANK + offs_h, (k1 * c - k2 * s).to(out_dtype), mask=h_mask)
            tl.store(cache_row + RANK + HALF + offs_h, (k2 * c + k1 * s).to(out_dtype), mask=h_mask)


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
    block_r = triton.next_power_of_2(rank)
    _rope_append_kernel[(batch * seq,)](
        latent, k_rope, kv_cache, positions, cos, sin,
        norm_weight if norm_weight is not None else latent,  # dummy pointer when HAS_NORM is False
        seq, pos_limit, norm_eps,
        latent.stride(0), latent.stride(1),
        k_rope.stride(0), k_rope.stride(1),
        positions.stride(0), positions.stride(1),
        kv_cache.stride(0), kv_cache.stride(1),
        stride_cb, stride_cs, stride_cn,
        RANK=rank, HALF=half,
        BLOCK_R=block_r, BLOCK_HALF=max(1, triton.next_power_of_2(max(half, 1))),
        HAS_NORM=norm_weight is not None,
        PER_TOKEN=per_token,
        num_warps=4 if block_r >= 512 else (2 if block_r >= 128 else 1),
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
