"""Absorbed MLA decode over a quantised latent cache (``mlakit.quant`` formats int8, fp8, int4).

Same attention as ``mla_decode`` (see there), over the buffers of
``mlakit.cache.QuantLatentCache`` as stored:

    values:      [max_batch, max_len, stored(r)]   int8 / float8_e4m3fn / uint8 (int4, two per byte)
    scales:      [max_batch, max_len, groups(r)]    float32, one per group of channels
    k_rope:      [max_batch, max_len, rope_dim]     16-bit (or quantised, with rope_scales)
    rope_scales: [max_batch, max_len, groups(rope_dim)] or None

The split-KV kernel is ``mla_decode``'s with its cache loads replaced: each tile of
values and its scales is read as stored and dequantised in registers (value * scale, in
fp32, then the query's dtype for the tensor-core dots), so the memory traffic is the
quantised bytes. The splits are merged by ``mla_decode``'s combine kernel. No host sync:
lengths stay on the device; CUDA-graph safe like ``mla_decode``.

Not tuned on a GPU yet: compiled for sm_90a at rank 512 (``compile_report``) the kernel uses
255 registers and spills ~0.6-1 KB per thread (the dequantised tile goes through registers on
its way to shared memory, beside the [rows, 512] fp32 accumulator); small ranks do not spill.
The speed targets are for a Gluon variant (fp8 wgmma or dequantise into shared memory).

    mla_decode_quant            -- dispatching wrapper (Triton on CUDA / interpreter, else reference)
    mla_decode_quant_reference  -- dequantise (mlakit.quant) then mla_decode_reference
"""

from __future__ import annotations

from typing import Optional

import torch

from mlakit.kernels.decode_common import (
    LOG2E,
    HAS_TRITON,
    LAST_COMPILED,
    check_capacity,
    check_lengths,
    check_one_device,
    check_quant_buffers,
    check_queries,
    use_triton,
    default_config,
    merge_partials,
    mla_decode_reference,
    split_partials,
)
from mlakit.quant import CacheFormat, cache_format, dequantize

if HAS_TRITON:
    import triton
    import triton.language as tl

_QUANT_CODES = {"int8": 1, "fp8": 2, "int4": 3}  # the kernel's QUANT constexpr (0: 16-bit)


def _check_args(q_latent, q_rope, values, scales, k_rope, rope_scales, lengths, kv_lora_rank, fmt,
                allow_fp64=False) -> int:
    """Validate shapes/dtypes/devices; return rope_dim."""
    rope_dim = check_queries(q_latent, q_rope, kv_lora_rank, allow_fp64)
    if not fmt.quantized:
        raise ValueError(f"mla_decode_quant needs a quantised format, got {fmt.name} (use mla_decode)")
    check_quant_buffers(fmt, kv_lora_rank, rope_dim, values, scales, k_rope, rope_scales, "k_rope")
    batch = q_latent.shape[0]
    check_capacity(values, batch, "the cache")
    check_lengths(lengths, batch)
    check_one_device(q_latent, q_rope, values, scales, k_rope, lengths, rope_scales)
    return rope_dim


def mla_decode_quant_reference(q_latent, q_rope, values, scales, k_rope, lengths, softmax_scale, kv_lora_rank,
                               fmt, *, rope_scales=None) -> torch.Tensor:
    """Dequantise the cache (``mlakit.quant.dequantize``; slots past each length read as 0, so
    garbage there cannot reach the output) and run ``mla_decode_reference`` in fp32 (fp64 for fp64
    queries); returns q's dtype."""
    fmt = cache_format(fmt)
    _check_args(q_latent, q_rope, values, scales, k_rope, rope_scales, lengths, kv_lora_rank, fmt, allow_fp64=True)
    batch = q_latent.shape[0]
    wide = torch.float64 if q_latent.dtype == torch.float64 else torch.float32
    latent = dequantize(values[:batch], scales[:batch], fmt, wide)  # [b, L, r]
    rope = k_rope[:batch].to(wide) if rope_scales is None else dequantize(k_rope[:batch], rope_scales[:batch], fmt,
                                                                            wide)
    kv = torch.cat([latent, rope], dim=-1)  # [b, L, r + p]
    unused = torch.arange(kv.shape[1], device=kv.device)[None, :] >= lengths.to(kv.device)[:, None]  # [b, L]
    kv = kv.masked_fill(unused[..., None], 0.0)
    out = mla_decode_reference(q_latent.to(wide), q_rope.to(wide), kv, lengths, softmax_scale, kv_lora_rank)
    return out.to(q_latent.dtype)


if HAS_TRITON:

    @triton.jit
    def _dequant_tile(values_ptr, scales_ptr, slots, slot_valid, stride_vn, stride_sn,
                      CHANNELS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                      GROUP: tl.constexpr, QUANT: tl.constexpr):
        """Cache rows ``slots [BLOCK_N]`` of one sequence as fp32 ``[BLOCK_N, BLOCK_C]`` (0 where masked)."""
        offs_c = tl.arange(0, BLOCK_C)
        if QUANT == 3:  # int4: byte j holds channel 2j (low nibble) and 2j + 1 (high), each + 8
            offs_b = tl.arange(0, BLOCK_C // 2)
            packed = tl.load(values_ptr + slots[:, None] * stride_vn + offs_b[None, :],
                             mask=slot_valid[:, None] & (offs_b < CHANNELS // 2)[None, :], other=0x88)
            packed = packed.to(tl.int32)
            q = tl.reshape(tl.join((packed & 15) - 8, (packed >> 4) - 8), [BLOCK_N, BLOCK_C]).to(tl.float32)
        else:
            c_mask = slot_valid[:, None] & (offs_c < CHANNELS)[None, :]
            # no `other`: the interpreter cannot cast one to fp8; masked lanes are zeroed here
            q = tl.load(values_ptr + slots[:, None] * stride_vn + offs_c[None, :], mask=c_mask)
            q = tl.where(c_mask, q.to(tl.float32), 0.0)
        if QUANT != 0:
            offs_g = tl.arange(0, BLOCK_C // GROUP)
            s = tl.load(scales_ptr + slots[:, None] * stride_sn + offs_g[None, :],
                        mask=slot_valid[:, None] & (offs_g * GROUP < CHANNELS)[None, :], other=0.0)  # [N, G]
            q = tl.reshape(tl.reshape(q, [BLOCK_N, BLOCK_C // GROUP, GROUP]) * s[:, :, None], [BLOCK_N, BLOCK_C])
        return q

    @triton.jit
    def _mla_decode_quant_split_kernel(
        q_latent_ptr, q_rope_ptr, values_ptr, scales_ptr, rope_ptr, rope_scales_ptr, lengths_ptr,
        out_ptr, part_out_ptr, part_lse_ptr,
        scale_log2,
        num_splits,
        stride_qlb, stride_qls, stride_qlh,
        stride_qrb, stride_qrs, stride_qrh,
        stride_vb, stride_vn, stride_sb, stride_sn,
        stride_rb, stride_rn, stride_rsb, stride_rsn,
        stride_ob, stride_os, stride_oh,
        stride_pb, stride_pm, stride_ps,
        num_heads,
        s_q,
        RANK: tl.constexpr,
        ROPE: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,  # next_pow2(RANK), >= GROUP
        BLOCK_P: tl.constexpr,  # next_pow2(ROPE), >= 16 and >= GROUP when the key is quantised
        GROUP: tl.constexpr,
        QUANT: tl.constexpr,  # the latent's format: 1 int8, 2 fp8, 3 int4
        ROPE_QUANT: tl.constexpr,  # the RoPE key's: 0 (16-bit) or QUANT
        WRITE_PARTIAL: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        DOT_UPCAST: tl.constexpr,
    ):
        # mla_decode's _mla_decode_split_kernel, the cache read through _dequant_tile.
        pid_rows = tl.program_id(0)
        pid_split = tl.program_id(1)
        pid_b = tl.program_id(2).to(tl.int64)

        num_rows = s_q * num_heads
        rows = pid_rows * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        row_valid = rows < num_rows
        row_tok = rows // num_heads
        row_head = rows % num_heads
        seq_len = tl.load(lengths_ptr + pid_b).to(tl.int32)
        row_last = seq_len - s_q + row_tok  # [BLOCK_H] token i sees slots [0, seq_len - s_q + i]
        keys_per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        split_start = pid_split * keys_per_split
        split_end = tl.minimum(split_start + keys_per_split, seq_len)

        offs_r = tl.arange(0, BLOCK_R)
        offs_p = tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        q_lat = tl.load(
            q_latent_ptr + pid_b * stride_qlb + row_tok[:, None] * stride_qls + row_head[:, None] * stride_qlh
            + offs_r[None, :],
            mask=row_valid[:, None] & (offs_r < RANK)[None, :], other=0.0,
        )  # [BLOCK_H, BLOCK_R]
        dot_dtype = tl.float32 if DOT_UPCAST else q_lat.dtype
        q_lat = q_lat.to(dot_dtype)
        if ROPE > 0:
            q_rope = tl.load(
                q_rope_ptr + pid_b * stride_qrb + row_tok[:, None] * stride_qrs + row_head[:, None] * stride_qrh
                + offs_p[None, :],
                mask=row_valid[:, None] & (offs_p < ROPE)[None, :], other=0.0,
            ).to(dot_dtype)  # [BLOCK_H, BLOCK_P]

        values_seq = values_ptr + pid_b * stride_vb
        scales_seq = scales_ptr + pid_b * stride_sb
        rope_seq = rope_ptr + pid_b * stride_rb
        rope_scales_seq = rope_scales_ptr + pid_b * stride_rsb
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)

        for start_n in range(split_start, split_end, BLOCK_N):
            slots = start_n + offs_n  # [BLOCK_N]
            slot_valid = slots < split_end
            latent = _dequant_tile(values_seq, scales_seq, slots, slot_valid, stride_vn, stride_sn,
                                   RANK, BLOCK_R, BLOCK_N, GROUP, QUANT).to(dot_dtype)  # [BLOCK_N, BLOCK_R]
            scores = tl.dot(q_lat, tl.trans(latent), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
            if ROPE > 0:
                k_rope = _dequant_tile(rope_seq, rope_scales_seq, slots, slot_valid, stride_rn, stride_rsn,
                                       ROPE, BLOCK_P, BLOCK_N, GROUP, ROPE_QUANT).to(dot_dtype)
                scores += tl.dot(q_rope, tl.trans(k_rope), input_precision=DOT_PRECISION)
            scores = scores * scale_log2
            visible = slots[None, :] <= row_last[:, None]
            scores = tl.where(visible, scores, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_shift)
            p = tl.exp2(scores - m_shift[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), latent, input_precision=DOT_PRECISION)
            m_i = m_new

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out_tile = acc / l_safe[:, None]
        store_mask = row_valid[:, None] & (offs_r < RANK)[None, :]
        if WRITE_PARTIAL:
            part_rows = pid_b * stride_pb + rows * stride_pm + pid_split * stride_ps
            tl.store(part_out_ptr + part_rows[:, None] + offs_r[None, :], out_tile, mask=store_mask)
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
            tl.store(part_lse_ptr + (pid_b * num_rows + rows) * num_splits + pid_split, lse, mask=row_valid)
        else:
            out_rows = pid_b * stride_ob + row_tok * stride_os + row_head * stride_oh
            tl.store(out_ptr + out_rows[:, None] + offs_r[None, :],
                     out_tile.to(out_ptr.dtype.element_ty), mask=store_mask)


def mla_decode_quant(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    values: torch.Tensor,
    scales: torch.Tensor,
    k_rope: torch.Tensor,
    lengths: torch.Tensor,
    softmax_scale: float,
    kv_lora_rank: int,
    fmt: CacheFormat | str,
    *,
    rope_scales: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """Absorbed MLA decode over a quantised latent cache (the buffers of the module docstring;
    ``QuantLatentCache.kernel_operands``). Queries as for ``mla_decode`` (bf16, fp16 or fp32;
    fp64 runs the reference); returns ``[batch, s_q, heads, kv_lora_rank]`` in q's dtype.

    Runs the Triton kernel for CUDA tensors (fp8 needs sm_89+) and for CPU tensors under
    TRITON_INTERPRET=1, the reference otherwise. ``config``: keys of ``decode_common.default_config``."""
    fmt = cache_format(fmt)
    if torch.compiler.is_compiling() and out is None and config is None:
        return torch.ops.mlakit.mla_decode_quant(q_latent.contiguous(), q_rope.contiguous(), values, scales, k_rope,
                                                 rope_scales, lengths, softmax_scale, kv_lora_rank, fmt.name)
    return _mla_decode_quant(q_latent, q_rope, values, scales, k_rope, rope_scales, lengths, softmax_scale,
                             kv_lora_rank, fmt, out, config)


def _mla_decode_quant(q_latent, q_rope, values, scales, k_rope, rope_scales, lengths, softmax_scale, kv_lora_rank,
                      fmt, out=None, config=None):
    rope_dim = _check_args(q_latent, q_rope, values, scales, k_rope, rope_scales, lengths, kv_lora_rank, fmt,
                           allow_fp64=True)
    use_kernel = use_triton(q_latent) and q_latent.dtype != torch.float64
    if use_kernel and fmt.name == "fp8" and q_latent.is_cuda:
        use_kernel = torch.cuda.get_device_capability(q_latent.device) >= (8, 9)  # e4m3 loads
    if not use_kernel:
        result = mla_decode_quant_reference(q_latent, q_rope, values, scales, k_rope, lengths, softmax_scale,
                                            kv_lora_rank, fmt, rope_scales=rope_scales)
        return out.copy_(result) if out is not None else result

    batch, s_q, heads, rank = q_latent.shape
    if values.stride(2) != 1 or scales.stride(2) != 1 or (rope_dim and k_rope.stride(2) != 1):
        raise ValueError("values, scales and k_rope must be contiguous in their last dim")
    q_latent = q_latent if q_latent.stride(3) == 1 else q_latent.contiguous()
    q_rope = q_rope if (rope_dim == 0 or q_rope.stride(3) == 1) else q_rope.contiguous()
    if out is None:
        out = torch.empty((batch, s_q, heads, rank), dtype=q_latent.dtype, device=q_latent.device)
    elif out.shape != q_latent.shape or out.dtype != q_latent.dtype or out.device != q_latent.device or out.stride(3) != 1:
        raise ValueError(f"out must be a {tuple(q_latent.shape)} {q_latent.dtype} tensor on {q_latent.device} "
                         f"with a contiguous last dim, got {tuple(out.shape)} {out.dtype} on {out.device}")
    if batch == 0 or s_q == 0 or heads == 0:
        return out
    cfg = dict(default_config(batch, s_q, heads, rank, rope_dim, values.shape[1], q_latent.device, q_latent.dtype))
    if config:
        unknown = set(config) - set(cfg)
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(cfg)}")
        cfg.update(config)
    group = fmt.group_size
    if group & (group - 1):
        raise ValueError(f"the kernel needs a power-of-two group size, got {group}")
    rows = s_q * heads
    block_r = max(16, group, triton.next_power_of_2(rank))
    block_p = max(16, triton.next_power_of_2(max(rope_dim, 1)), group if rope_scales is not None else 16)
    num_splits = max(1, int(cfg["num_splits"]))
    dot_upcast = q_latent.device.type == "cpu" and q_latent.dtype == torch.bfloat16  # interpreter's bf16 dot
    dot_precision = "ieee" if (q_latent.dtype == torch.float32 or dot_upcast) else "tf32"
    write_partial = num_splits > 1
    if write_partial:
        part_out, part_lse = split_partials(batch, rows, num_splits, rank, q_latent.device)
    else:
        part_out = part_lse = out  # unused placeholders
    quant_rope = rope_scales is not None
    rope_scales_arg = rope_scales if quant_rope else scales  # a dummy pointer for a 16-bit key
    LAST_COMPILED["split_quant"] = _mla_decode_quant_split_kernel[(triton.cdiv(rows, cfg["block_h"]), num_splits,
                                                                   batch)](
        q_latent, q_rope, values, scales, k_rope, rope_scales_arg, lengths,
        out, part_out, part_lse,
        softmax_scale * LOG2E,
        num_splits,
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2),
        q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
        values.stride(0), values.stride(1), scales.stride(0), scales.stride(1),
        k_rope.stride(0), k_rope.stride(1), rope_scales_arg.stride(0), rope_scales_arg.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        rows * num_splits * rank, num_splits * rank, rank,
        heads, s_q,
        RANK=rank, ROPE=rope_dim,
        BLOCK_H=cfg["block_h"], BLOCK_N=cfg["block_n"], BLOCK_R=block_r, BLOCK_P=block_p,
        GROUP=group, QUANT=_QUANT_CODES[fmt.name], ROPE_QUANT=_QUANT_CODES[fmt.name] if quant_rope else 0,
        WRITE_PARTIAL=write_partial, DOT_PRECISION=dot_precision, DOT_UPCAST=dot_upcast,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if write_partial:
        merge_partials(part_out, part_lse, out)
    return out


@torch.library.custom_op("mlakit::mla_decode_quant", mutates_args=())
def _mla_decode_quant_op(q_latent: torch.Tensor, q_rope: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                         k_rope: torch.Tensor, rope_scales: Optional[torch.Tensor], lengths: torch.Tensor,
                         softmax_scale: float, kv_lora_rank: int, fmt: str) -> torch.Tensor:
    return _mla_decode_quant(q_latent, q_rope, values, scales, k_rope, rope_scales, lengths, softmax_scale,
                             kv_lora_rank, cache_format(fmt)).contiguous()


@_mla_decode_quant_op.register_fake
def _mla_decode_quant_fake(q_latent, q_rope, values, scales, k_rope, rope_scales, lengths, softmax_scale,
                           kv_lora_rank, fmt):
    return q_latent.new_empty(q_latent.shape)


def compile_report(fmt: str = "int8", heads: int = 32, rank: int = 512, rope: int = 64, s_q: int = 1,
                   num_splits: int = 2, quant_rope: bool = False, arch: int = 90) -> dict:
    """Compile the split kernel for ``sm_{arch}`` without a GPU (bf16 queries, ``default_config``'s
    tiles for an H200-sized launch): registers, spills and shared memory, what a machine without a
    GPU can check (tests/kernels/test_mla_decode_quant_compile.py)."""
    from mlakit.kernels.ptxas import STORAGE_TYPES, compile_offline, ptxas_path, ptxas_resources

    fmt_ = cache_format(fmt)
    cfg = default_config(1, s_q, heads, rank, rope, 4096, torch.device("cuda"), torch.bfloat16) \
        if torch.cuda.is_available() else _offline_config(s_q * heads, rank)
    storage = "*" + STORAGE_TYPES[fmt_.name]
    pointers = {"q_latent_ptr": "*bf16", "q_rope_ptr": "*bf16", "values_ptr": storage, "scales_ptr": "*fp32",
                "rope_ptr": storage if quant_rope else "*bf16", "rope_scales_ptr": "*fp32", "lengths_ptr": "*i64",
                "out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}
    constexprs = dict(RANK=rank, ROPE=rope, BLOCK_H=cfg["block_h"], BLOCK_N=cfg["block_n"],
                      BLOCK_R=max(16, fmt_.group_size, triton.next_power_of_2(rank)),
                      BLOCK_P=max(16, triton.next_power_of_2(max(rope, 1)), fmt_.group_size if quant_rope else 16),
                      GROUP=fmt_.group_size, QUANT=_QUANT_CODES[fmt_.name],
                      ROPE_QUANT=_QUANT_CODES[fmt_.name] if quant_rope else 0, WRITE_PARTIAL=num_splits > 1,
                      DOT_PRECISION="tf32", DOT_UPCAST=False)
    kernel = compile_offline(_mla_decode_quant_split_kernel, pointers, constexprs,
                             dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]), arch=arch,
                             floats=("scale_log2",))
    result = {"shared_bytes": kernel.metadata.shared, "config": cfg}
    ptxas = ptxas_path()
    if ptxas:
        result.update(ptxas_resources(kernel.asm["ptx"], ptxas))
    return result


def _offline_config(rows: int, rank: int) -> dict:
    """``default_config``'s tiles for one H200 (132 SMs) launch, computed without a GPU."""
    block_h = min(64, max(16, triton.next_power_of_2(rows)))
    if rank >= 256 and block_h <= 32:
        return dict(block_h=block_h, block_n=32, num_warps=4, num_stages=3)
    if rank >= 256:
        return dict(block_h=block_h, block_n=64, num_warps=8, num_stages=2)
    return dict(block_h=block_h, block_n=128, num_warps=4, num_stages=3)
