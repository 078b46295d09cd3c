"""Absorbed MLA decode over a quantised latent cache (int8, fp8, int4) for Hopper, in Gluon.

Why. The quantised path of ``mla_decode_quant.py`` is a plain Triton kernel: correct, but
2.2-7x slower than the bf16 Gluon kernel (``mla_decode_gluon.py``) on an H200, although it
reads 42-61% fewer bytes. At rank 512 it sits at 255 registers and spills ~1 KB per thread
(the dequantised tile goes through registers beside the fp32 accumulator) and its dots lower
to ``mma.sync`` at M = 32. A quantised cache only pays off if the kernel stays bandwidth-bound.

Design: ``_mla_decode_gluon_kernel`` (see there) with only the way a cache tile reaches shared
memory changed.

* Keys-major dots as there: ``S^T [64, H] = K [64, r + p] @ Q^T`` and ``O^T [r, H] += V^T @ P^T``,
  both wgmma operands in shared memory, one warpgroup up to 32 query rows, two at 64.
* Three TMA descriptors over the buffers as ``QuantLatentCache`` stores them, viewed as
  ``[batch * max_len, C]``: ``values`` (int8 / float8_e4m3fn / uint8 with two int4 per byte),
  ``scales`` (float32, one per group) and the 16-bit ``k_rope``. Each stage of a TMA ring holds a
  tile's values and scales (one mbarrier); the RoPE key tiles have a ring of their own.
* After the wait, the warps dequantise the tile in passes of 64 channels (one 128-byte swizzle
  row of the 16-bit tile): values from shared memory to registers, to fp32, times the broadcast
  scale of their group, to the queries' dtype, into ONE 16-bit tile ``k_deq [64, r]`` that both
  dots read. int4 bytes are unpacked in registers (channel 2j the low nibble, 2j + 1 the high,
  each stored + 8) and interleaved with ``gl.join`` + ``gl.reshape``. Slots past the split's end
  are zeroed on the way (TMA cannot mask per sequence, and a NaN scale or fp8 NaN there would
  reach the value product as 0 * NaN); their scores are masked to -inf, so the RoPE tile needs
  no zeroing.
* ``overlap`` (config; off by default, experimental): the score dot is issued pass by pass
  (64 channels each, async wgmma) so that the tensor cores work while the warps dequantise
  the next pass. Compiled with triton 3.6 it spills 250-360 bytes per thread (the in-flight
  score accumulator beside the 128-register output one); the bench measures whether it pays.
* Once the tile is in ``k_deq`` its values stage is free: it is refilled right away (before
  the dots), so the next tiles stream in while this one is multiplied; the RoPE stage is
  refilled after the score dot.
* Splits as there: one split writes the output itself; several write partials merged by
  ``decode_common.merge_partials`` (launched early: programmatic dependent launch).

Shared memory per program (rank 512, rope 64, 64-slot tiles, two stages; H query rows):
values 2 x 32 KB (int8/fp8) or 2 x 16 KB (int4), scales 2 x 2 KB or 2 x 4 KB, RoPE key
2 x 8 KB, ``k_deq`` 64 KB, queries H x 1152 B, P 64 x H x 2 B:
32 rows 188 KB (int8/fp8) / 160 KB (int4); 64 rows 228 KB (int8/fp8: over the 227 KB a
block may have, so the RoPE ring takes one stage there, 220 KB) / 200 KB (int4).
``shared_bytes`` computes it; one program per SM at rank 512.

Limits (``unsupported`` says which one applies): a Hopper GPU; bf16/fp16 queries with the RoPE
key in the same dtype (``rope_scales``, a quantised RoPE key, is not covered: the caller falls
back); rank a power of two in 64..512 and rope in 16..64; contiguous buffers. TMA needs the
inner box dimension >= 16 bytes and 16-byte aligned strides: the scales row is 4 x groups(r)
bytes (int8/fp8 at rank 512: 8 scales = 32 B; int4: 16 = 64 B), so int8/fp8 need rank >= 256
and int4 rank >= 128.

Not yet run on a GPU: compiled for sm_90a (``compile_report``), checked against
``mla_decode_quant_reference`` by tests/kernels/test_mla_decode_quant_gluon.py on a Hopper GPU,
timed by scripts/device/quant_gluon_bench.py.
"""

from __future__ import annotations

import functools

import torch

from mlakit.kernels.mla_decode_gluon import HAS_GLUON, block_h_for
from mlakit.quant import CacheFormat, cache_format

if HAS_GLUON:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # the same shims as mla_decode_gluon (triton 3.6 on the GPU machine, 3.7+ elsewhere)
    from mlakit.kernels.mla_decode_gluon import _cta_barrier, _tma_load

BLOCK_N = 64  # cache slots per tile: the M of both dots
CHUNK = 64  # channels dequantised per pass: one 128-byte swizzle row of the 16-bit tile
EARLY_MERGE = True
HOPPER_SHARED_BYTES = 232448  # 227 KB: the most one block may opt in to on sm_90
_PACK = {"int8": 1, "fp8": 1, "int4": 2}  # channels per stored byte

if HAS_GLUON:

    @gluon.jit
    def _mla_decode_quant_gluon_kernel(
        val_desc, scl_desc, rope_desc,  # TMA descriptors over [batch * max_len, stored(r) | groups(r) | rope]
        q_latent_ptr, q_rope_ptr, lengths_ptr, part_out_ptr, part_lse_ptr, out_ptr,
        scale_log2, num_splits, max_len,
        stride_qlb, stride_qls, stride_qlh,
        stride_qrb, stride_qrs, stride_qrh,
        stride_pb, stride_pm, stride_ps,  # part_out [b, rows, split, r]; part_lse [b, rows, split] contiguous
        stride_ob, stride_os, stride_oh,  # out [b, s_q, h, r] (DIRECT)
        num_heads, s_q,
        RANK: gl.constexpr,
        ROPE: gl.constexpr,
        GROUP: gl.constexpr,  # channels per scale (64 int8/fp8, 32 int4)
        PACK: gl.constexpr,  # channels per stored byte: 1 (int8, fp8) or 2 (int4)
        BLOCK_H: gl.constexpr,  # query rows (token x head) per program: the N of both dots
        BLOCK_N: gl.constexpr,
        CHUNK: gl.constexpr,
        STAGES: gl.constexpr,  # ring of values + scales tiles
        ROPE_STAGES: gl.constexpr,  # ring of RoPE key tiles (1 where shared memory is short)
        OVERLAP: gl.constexpr,  # score dot pass by pass, overlapping the next pass's dequantisation
        EARLY_MERGE: gl.constexpr,
        DIRECT: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        row_base = gl.program_id(0) * BLOCK_H
        pid_split = gl.program_id(1)
        pid_b = gl.program_id(2)
        dtype: gl.constexpr = rope_desc.dtype  # the queries' and the RoPE key's: the dots' operand type
        GROUPS: gl.constexpr = RANK // GROUP
        VCHUNK: gl.constexpr = CHUNK // PACK  # stored bytes of one pass
        GPC: gl.constexpr = CHUNK // GROUP  # groups per pass: 1 (int8, fp8) or 2 (int4)

        # Register layouts as in _mla_decode_gluon_kernel.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, num_warps // 4], instr_shape=[16, BLOCK_H // (num_warps // 4), 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_H, 16])
        load_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        store_layout: gl.constexpr = gl.BlockedLayout([4, 1], [32, 1], [1, num_warps], [0, 1])
        # Dequantisation: a pass covers [BLOCK_N, VCHUNK] stored bytes, four threads a row
        # (16 B each for 8 bits, 8 B each for int4), all warps stacked over the slots.
        dq_layout: gl.constexpr = gl.BlockedLayout([1, VCHUNK // 4], [8, 4], [num_warps, 1], [1, 0])

        # Shared memory: queries (once), the rings, the dequantised tile, the probabilities.
        ql_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, RANK], dtype)
        qr_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, ROPE], dtype)
        p_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_H], dtype)
        kd_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, RANK], dtype)
        k_val = gl.allocate_shared_memory(val_desc.dtype, [STAGES, BLOCK_N, RANK // PACK], val_desc.layout)
        k_scl = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N, GROUPS], scl_desc.layout)
        k_rope = gl.allocate_shared_memory(dtype, [ROPE_STAGES, BLOCK_N, ROPE], rope_desc.layout)
        k_deq = gl.allocate_shared_memory(dtype, [BLOCK_N, RANK], kd_smem_layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        r_ready = gl.allocate_shared_memory(gl.int64, [ROPE_STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(q_ready.index(s), count=1)
        for s in gl.static_range(ROPE_STAGES):
            mbarrier.init(r_ready.index(s), count=1)

        # This split's slots: an equal share of the sequence's actual length, whole tiles.
        seq_len = gl.load(lengths_ptr + pid_b).to(gl.int32)
        keys_per_split = gl.cdiv(gl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        split_start = pid_split * keys_per_split
        split_end = gl.minimum(split_start + keys_per_split, seq_len)
        num_tiles = gl.maximum(gl.cdiv(split_end - split_start, BLOCK_N), 0)
        row0 = pid_b * max_len + split_start  # first cache row of this split in the 2-D views
        q_bytes: gl.constexpr = BLOCK_N * (RANK // PACK + GROUPS * 4)
        r_bytes: gl.constexpr = BLOCK_N * ROPE * 2

        for s in gl.static_range(STAGES):  # prologue: the first tiles in flight
            pred = s < num_tiles
            mbarrier.expect(q_ready.index(s), q_bytes, pred=pred)
            _tma_load(val_desc, [row0 + s * BLOCK_N, 0], q_ready.index(s), k_val.index(s), pred=pred)
            _tma_load(scl_desc, [row0 + s * BLOCK_N, 0], q_ready.index(s), k_scl.index(s), pred=pred)
        for s in gl.static_range(ROPE_STAGES):
            pred = s < num_tiles
            mbarrier.expect(r_ready.index(s), r_bytes, pred=pred)
            _tma_load(rope_desc, [row0 + s * BLOCK_N, 0], r_ready.index(s), k_rope.index(s), pred=pred)
        if EARLY_MERGE:
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)

        # Queries of this sequence: rows m = token * num_heads + head, zero past the last row.
        num_rows = s_q * num_heads
        rows_l = row_base + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, load_layout))
        tok_l = rows_l // num_heads
        head_l = rows_l % num_heads
        cols_l = gl.arange(0, RANK, layout=gl.SliceLayout(0, load_layout))
        q_lat = gl.load(q_latent_ptr + pid_b * stride_qlb + tok_l[:, None] * stride_qls + head_l[:, None] * stride_qlh
                        + cols_l[None, :], mask=(rows_l < num_rows)[:, None], other=0.0)
        ql_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, RANK], ql_smem_layout, q_lat)
        cols_r = gl.arange(0, ROPE, layout=gl.SliceLayout(0, load_layout))
        q_rope = gl.load(q_rope_ptr + pid_b * stride_qrb + tok_l[:, None] * stride_qrs + head_l[:, None] * stride_qrh
                         + cols_r[None, :], mask=(rows_l < num_rows)[:, None], other=0.0)
        qr_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, ROPE], qr_smem_layout, q_rope)
        p_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_H], p_smem_layout)
        fence_async_shared()
        _cta_barrier()

        rows_s = row_base + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, s_layout))
        row_last = seq_len - s_q + rows_s // num_heads  # causal within the chunk
        slots0 = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
        dq_rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, dq_layout))
        dq_cols = gl.arange(0, VCHUNK, layout=gl.SliceLayout(0, dq_layout))
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, gl.SliceLayout(0, s_layout))
        l_i = gl.zeros([BLOCK_H], gl.float32, gl.SliceLayout(0, s_layout))
        acc = gl.zeros([RANK, BLOCK_H], gl.float32, o_layout)  # O^T

        for j in range(num_tiles):
            stage = j % STAGES
            mbarrier.wait(q_ready.index(stage), (j // STAGES) & 1)
            vals = k_val.index(stage)  # [BLOCK_N, RANK // PACK]
            scl = k_scl.index(stage)  # [BLOCK_N, GROUPS]
            # Slots past the split's end (TMA read them too: the next sequence's, or garbage) get
            # zero: a NaN scale or an fp8 NaN there would reach the value product as 0 * NaN.
            scores = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, s_layout)
            past = (dq_rows >= split_end - (split_start + j * BLOCK_N))[:, None]  # [BLOCK_N, 1]
            for c in gl.static_range(RANK // CHUNK):
                v = vals.slice(c * VCHUNK, VCHUNK, dim=1).load(dq_layout)  # [BLOCK_N, VCHUNK]
                if PACK == 2:
                    # int4: byte j holds channels 2j (low nibble) and 2j + 1 (high), both in the
                    # group of byte j; the two groups of this pass split its bytes in halves.
                    s_lo = scl.slice(c * GPC, 1, dim=1).load(dq_layout)  # [BLOCK_N, 1]
                    s_hi = scl.slice(c * GPC + 1, 1, dim=1).load(dq_layout)
                    sc = gl.where((dq_cols < GROUP // 2)[None, :], s_lo, s_hi)  # [BLOCK_N, VCHUNK]
                    sc = gl.where(past, 0.0, sc)  # nibbles are finite: a zero scale zeroes the slot
                    lo = ((v & 15).to(gl.float32) - 8.0) * sc
                    hi = ((v >> 4).to(gl.float32) - 8.0) * sc
                    deq = gl.reshape(gl.join(lo.to(dtype), hi.to(dtype)), [BLOCK_N, CHUNK])
                else:
                    sc = scl.slice(c, 1, dim=1).load(dq_layout)  # [BLOCK_N, 1]: one group per pass
                    deq = gl.where(past, 0.0, v.to(gl.float32) * sc).to(dtype)
                k_deq.slice(c * CHUNK, CHUNK, dim=1).store(deq)
                if OVERLAP:
                    # this pass's share of the scores runs on the tensor cores while the warps
                    # dequantise the next pass (the RoPE part follows after the last pass)
                    fence_async_shared()
                    _cta_barrier()
                    scores = warpgroup_mma(k_deq.slice(c * CHUNK, CHUNK, dim=1),
                                           ql_smem.slice(c * CHUNK, CHUNK, dim=1).permute((1, 0)), scores,
                                           use_acc=c > 0, is_async=True)
            fence_async_shared()  # the generic-proxy stores before wgmma (async proxy) reads them
            _cta_barrier()  # k_deq is whole, and no warp reads this values stage any more

            # Refill the values stage now: the tile lives on in k_deq.
            nxt = j + STAGES
            pred = nxt < num_tiles
            mbarrier.expect(q_ready.index(stage), q_bytes, pred=pred)
            _tma_load(val_desc, [row0 + nxt * BLOCK_N, 0], q_ready.index(stage), k_val.index(stage), pred=pred)
            _tma_load(scl_desc, [row0 + nxt * BLOCK_N, 0], q_ready.index(stage), k_scl.index(stage), pred=pred)

            rstage = j % ROPE_STAGES
            mbarrier.wait(r_ready.index(rstage), (j // ROPE_STAGES) & 1)
            if not OVERLAP:
                scores = warpgroup_mma(k_deq, ql_smem.permute((1, 0)), scores, use_acc=False, is_async=True)
            scores = warpgroup_mma(k_rope.index(rstage), qr_smem.permute((1, 0)), scores, is_async=True)
            scores = warpgroup_mma_wait(0, deps=[scores])
            slots = split_start + j * BLOCK_N + slots0
            visible = (slots[:, None] <= row_last[None, :]) & (slots < split_end)[:, None]
            scores = gl.where(visible, scores * scale_log2, float("-inf"))

            m_new = gl.maximum(m_i, gl.max(scores, axis=0))
            m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_shift)
            p = gl.exp2(scores - m_shift[None, :])
            l_i = l_i * alpha + gl.sum(p, axis=0)
            m_i = m_new

            p_smem.store(p.to(dtype))
            fence_async_shared()
            _cta_barrier()  # P is whole, and every warpgroup's score dot is done with the RoPE stage
            nxt_r = j + ROPE_STAGES
            pred_r = nxt_r < num_tiles
            mbarrier.expect(r_ready.index(rstage), r_bytes, pred=pred_r)
            _tma_load(rope_desc, [row0 + nxt_r * BLOCK_N, 0], r_ready.index(rstage), k_rope.index(rstage),
                      pred=pred_r)

            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(0, o_layout))[None, :]
            acc = warpgroup_mma(k_deq.permute((1, 0)), p_smem, acc, is_async=True)  # V^T @ P^T
            acc = warpgroup_mma_wait(0, deps=[acc])
            _cta_barrier()  # both warpgroups are done with k_deq and P before the next tile overwrites them

        for s in gl.static_range(STAGES):
            mbarrier.invalidate(q_ready.index(s))
        for s in gl.static_range(ROPE_STAGES):
            mbarrier.invalidate(r_ready.index(s))

        l_safe = gl.where(l_i == 0.0, 1.0, l_i)
        lse = gl.where(l_i == 0.0, float("-inf"), m_i + gl.log2(l_safe))
        out_t = acc / gl.convert_layout(l_safe, gl.SliceLayout(0, o_layout))[None, :]
        out_t = gl.convert_layout(out_t, store_layout)
        r_o = gl.arange(0, RANK, layout=gl.SliceLayout(1, store_layout))
        m_o = row_base + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, store_layout))
        if DIRECT:
            dst = (out_ptr + pid_b * stride_ob + (m_o // num_heads)[None, :] * stride_os
                   + (m_o % num_heads)[None, :] * stride_oh + r_o[:, None])
            gl.store(dst, out_t.to(dtype), mask=(m_o < num_rows)[None, :])
        else:
            part = part_out_ptr + pid_b * stride_pb + m_o[None, :] * stride_pm + pid_split * stride_ps + r_o[:, None]
            gl.store(part, out_t, mask=(m_o < num_rows)[None, :])
            # m_o, not rows_s: the epilogue then keeps nothing of the loop's layout alive across it
            gl.store(part_lse_ptr + (pid_b * num_rows + m_o) * num_splits + pid_split,
                     gl.convert_layout(lse, gl.SliceLayout(0, store_layout)), mask=m_o < num_rows)


def shared_bytes(fmt: CacheFormat | str, rank: int, rope: int, block_h: int, stages: int = 2,
                 rope_stages: int = 2) -> int:
    """Shared memory of the buffers one program allocates (the compiler adds a little: barriers,
    alignment; its scratch reuses buffers that are dead by then)."""
    fmt = cache_format(fmt)
    tile = BLOCK_N * (fmt.stored_channels(rank) + 4 * fmt.groups(rank))
    return (stages * tile + rope_stages * BLOCK_N * rope * 2 + BLOCK_N * rank * 2  # rings, k_deq
            + block_h * (rank + rope) * 2 + BLOCK_N * block_h * 2)  # queries, P


def _rope_stages(fmt: CacheFormat, rank: int, rope: int, block_h: int, stages: int) -> int:
    """Two RoPE stages where they fit beside everything else, else one (64 rows of int8/fp8)."""
    fits = shared_bytes(fmt, rank, rope, block_h, stages, stages) + 1024 <= HOPPER_SHARED_BYTES
    return stages if fits else 1


def check_shape(fmt: CacheFormat | str, heads: int, s_q: int, rank: int, rope: int, dtype: torch.dtype) -> None:
    """Raise ValueError for what this kernel does not cover (module docstring, Limits)."""
    if not HAS_GLUON:
        raise ValueError("needs triton with Gluon's Hopper API (triton >= 3.6)")
    fmt = cache_format(fmt)
    if fmt.name not in _PACK:
        raise ValueError(f"needs an int8, fp8 or int4 cache, got {fmt.name}")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"bf16 or fp16 queries only, got {dtype}")
    for name, value, low, high in (("kv_lora_rank", rank, 64, 512), ("rope_dim", rope, 16, 64)):
        if value & (value - 1) or not low <= value <= high:
            raise ValueError(f"{name} must be a power of two in [{low}, {high}], got {value}")
    if CHUNK % fmt.group_size:
        raise ValueError(f"group size {fmt.group_size} must divide {CHUNK}")
    scale_row = 4 * fmt.groups(rank)
    if scale_row < 16 or scale_row % 16:
        raise ValueError(f"TMA needs >= 16-byte, 16-byte aligned rows; a {fmt.name} scales row at rank {rank} "
                         f"is {scale_row} bytes (needs rank >= {4 * fmt.group_size})")
    block_h = block_h_for(s_q * heads)
    need = shared_bytes(fmt, rank, rope, block_h, 2, 1) + 1024
    if need > HOPPER_SHARED_BYTES:
        raise ValueError(f"{need} bytes of shared memory > {HOPPER_SHARED_BYTES}")


def unsupported(q_latent: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, k_rope: torch.Tensor,
                fmt: CacheFormat | str, rope_scales: torch.Tensor | None = None) -> str | None:
    """Why this kernel cannot run the call (None: it can); the caller then falls back to
    ``mla_decode_quant``."""
    if not HAS_GLUON:
        return "needs triton with Gluon's Hopper API (triton >= 3.6)"
    if rope_scales is not None:
        return "a quantised RoPE key (rope_scales) is not covered"
    if not q_latent.is_cuda or torch.cuda.get_device_capability(q_latent.device)[0] != 9:
        return "needs a Hopper GPU (sm_90)"
    if k_rope.dtype != q_latent.dtype:
        return f"the RoPE key ({k_rope.dtype}) must be in the queries' dtype ({q_latent.dtype})"
    for name, t in (("values", values), ("scales", scales), ("k_rope", k_rope)):
        if not t.is_contiguous():
            return f"needs a contiguous {name}"
        if t.data_ptr() % 16:
            return f"TMA needs {name} 16-byte aligned"
    _, s_q, heads, rank = q_latent.shape
    try:
        check_shape(fmt, heads, s_q, rank, k_rope.shape[-1], q_latent.dtype)
    except ValueError as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=1024)
def gluon_quant_config(fmt_name: str, batch: int, s_q: int, heads: int, rank: int, rope: int, max_len: int,
                       num_sms: int) -> dict:
    """Split count, pipeline depths and warps of one call (not tuned on a GPU yet).

    As ``mla_decode_gluon.gluon_config``: one warpgroup up to 32 rows, two at 64; two stages;
    splits fill the SMs once with the programs that fit on one together (shared memory, and
    registers: two programs of one warpgroup at most)."""
    fmt = cache_format(fmt_name)
    block_h = block_h_for(s_q * heads)
    num_warps = 4 if block_h <= 32 else 8
    stages = 2
    rope_stages = _rope_stages(fmt, rank, rope, block_h, stages)
    per_program = shared_bytes(fmt, rank, rope, block_h, stages, rope_stages) + 2048  # + reserved, barriers
    occupancy = max(1, min(233472 // per_program, 2 if num_warps == 4 else 1))
    programs = batch * -(-(s_q * heads) // block_h)
    num_splits = max(1, min(occupancy * num_sms // programs, -(-max_len // BLOCK_N)))
    # overlap (score dot pass by pass): compiled, not yet measured; the bench times both
    return dict(num_splits=num_splits, stages=stages, rope_stages=rope_stages, num_warps=num_warps, overlap=False)


@functools.lru_cache(maxsize=None)
def _layouts(fmt_name: str, rank: int, rope: int, dtype: torch.dtype):
    """Shared-memory layouts of the values, scales and RoPE tiles (cached: ~20 us of host time each).

    Values: a swizzle as wide as one dequantisation pass (64 B of int8/fp8, 32 B of int4), so
    that each pass's slice starts on a swizzle row. Scales: no swizzle (a pass reads one column)."""
    pack = _PACK[fmt_name]
    gl_dtype = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return (gl.NVMMASharedLayout(swizzle_byte_width=CHUNK // pack, element_bitwidth=8, rank=2),
            gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2),
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, rope], gl_dtype))


def _descriptors(values, scales, k_rope, fmt: CacheFormat, rank: int, rope: int, dtype: torch.dtype):
    val_layout, scl_layout, rope_layout = _layouts(fmt.name, rank, rope, dtype)
    descs = []
    for t, layout in ((values, val_layout), (scales, scl_layout), (k_rope, rope_layout)):
        flat = t.view(-1, t.shape[-1])  # [max_batch * max_len, C]
        descs.append(TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [BLOCK_N, flat.shape[1]], layout))
    return descs


def mla_decode_quant_gluon(q_latent, q_rope, values, scales, k_rope, lengths, softmax_scale, kv_lora_rank,
                           fmt, *, rope_scales=None, out=None, config=None) -> torch.Tensor:
    """``mla_decode_quant`` (same arguments and result) on this kernel; raises ValueError where
    ``unsupported`` gives a reason. ``config`` overrides keys of ``gluon_quant_config``."""
    from mlakit.kernels.decode_common import merge_partials, num_sms
    from mlakit.kernels.mla_decode_quant import _check_args

    fmt = cache_format(fmt)
    _check_args(q_latent, q_rope, values, scales, k_rope, rope_scales, lengths, kv_lora_rank, fmt)
    reason = unsupported(q_latent, values, scales, k_rope, fmt, rope_scales)
    if reason:
        raise ValueError(f"mla_decode_quant_gluon: {reason}")
    batch, s_q, heads, rank = q_latent.shape
    q_latent = q_latent if q_latent.stride(3) == 1 else q_latent.contiguous()
    q_rope = q_rope if q_rope.stride(3) == 1 else q_rope.contiguous()
    if out is None:
        out = torch.empty((batch, s_q, heads, rank), dtype=q_latent.dtype, device=q_latent.device)
    elif (out.shape != q_latent.shape or out.dtype != q_latent.dtype or out.device != q_latent.device
          or out.stride(3) != 1):
        raise ValueError(f"out must be a {tuple(q_latent.shape)} {q_latent.dtype} tensor on {q_latent.device} "
                         f"with a contiguous last dim, got {tuple(out.shape)} {out.dtype} on {out.device}")
    if batch == 0 or s_q == 0 or heads == 0:
        return out
    device_index = q_latent.device.index if q_latent.device.index is not None else torch.cuda.current_device()
    cfg = dict(gluon_quant_config(fmt.name, batch, s_q, heads, rank, k_rope.shape[-1], values.shape[1],
                                  num_sms(device_index)))
    if config:
        unknown = set(config) - set(cfg)
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(cfg)}")
        cfg.update(config)
    partials = _launch(q_latent, q_rope, values, scales, k_rope, lengths, softmax_scale, out, fmt, cfg)
    if partials is not None:
        merge_partials(*partials, out, early_launch=EARLY_MERGE)
    return out


def _launch(q_latent, q_rope, values, scales, k_rope, lengths, softmax_scale, out, fmt, cfg):
    """The kernel alone: writes ``out`` for one split, else returns the partials."""
    from mlakit.kernels.decode_common import LOG2E, split_partials

    batch, s_q, heads, rank = q_latent.shape
    rope = k_rope.shape[-1]
    rows = s_q * heads
    block_h = block_h_for(rows)
    num_splits = max(1, int(cfg["num_splits"]))
    direct = num_splits == 1
    part_out, part_lse = split_partials(*((1, 1, 1, 1) if direct else (batch, rows, num_splits, rank)),
                                        q_latent.device)
    val_desc, scl_desc, rope_desc = _descriptors(values, scales, k_rope, fmt, rank, rope, q_latent.dtype)
    _mla_decode_quant_gluon_kernel[(-(-rows // block_h), num_splits, batch)](
        val_desc, scl_desc, rope_desc, q_latent, q_rope, lengths, part_out, part_lse, out,
        softmax_scale * LOG2E, num_splits, values.shape[1],
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2),
        q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
        *part_out.stride()[:3],
        out.stride(0), out.stride(1), out.stride(2),
        heads, s_q,
        RANK=rank, ROPE=rope, GROUP=fmt.group_size, PACK=_PACK[fmt.name], BLOCK_H=block_h, BLOCK_N=BLOCK_N,
        CHUNK=CHUNK, STAGES=cfg["stages"], ROPE_STAGES=cfg["rope_stages"],
        OVERLAP=bool(cfg["overlap"]), EARLY_MERGE=EARLY_MERGE and not direct,
        DIRECT=direct, num_warps=cfg["num_warps"],
    )
    return None if direct else (part_out, part_lse)


def compile_report(fmt: CacheFormat | str = "int8", heads: int = 32, rank: int = 512, rope: int = 64, s_q: int = 1,
                   direct: bool = False, num_warps: int | None = None, stages: int = 2,
                   rope_stages: int | None = None, overlap: bool = False) -> dict:
    """Compile the kernel for sm_90a without a GPU (bf16 queries): wgmma and TMA instructions in
    its PTX, shared memory, and (triton's bundled ptxas) registers and spill bytes.

    Gluon has no interpreter: compiling is what a machine without a GPU can check
    (tests/kernels/test_mla_decode_quant_gluon.py)."""
    from mlakit.kernels.ptxas import STORAGE_TYPES, compile_offline, ptxas_path, ptxas_resources

    fmt = cache_format(fmt)
    check_shape(fmt, heads, s_q, rank, rope, torch.bfloat16)
    block_h = block_h_for(s_q * heads)
    num_warps = num_warps or (4 if block_h <= 32 else 8)
    rope_stages = rope_stages or _rope_stages(fmt, rank, rope, block_h, stages)
    val_layout, scl_layout, rope_layout = _layouts(fmt.name, rank, rope, torch.bfloat16)
    storage = STORAGE_TYPES[fmt.name]
    constexprs = dict(RANK=rank, ROPE=rope, GROUP=fmt.group_size, PACK=_PACK[fmt.name], BLOCK_H=block_h,
                      BLOCK_N=BLOCK_N, CHUNK=CHUNK, STAGES=stages, ROPE_STAGES=rope_stages, OVERLAP=overlap,
                      EARLY_MERGE=not direct, DIRECT=direct, num_warps=num_warps)
    pointers = {"q_latent_ptr": "*bf16", "q_rope_ptr": "*bf16", "lengths_ptr": "*i32", "part_out_ptr": "*fp32",
                "part_lse_ptr": "*fp32", "out_ptr": "*bf16",
                "val_desc": f"tensordesc<{storage}[{BLOCK_N}, {fmt.stored_channels(rank)}],{val_layout!r}>",
                "scl_desc": f"tensordesc<fp32[{BLOCK_N}, {fmt.groups(rank)}],{scl_layout!r}>",
                "rope_desc": f"tensordesc<bf16[{BLOCK_N}, {rope}],{rope_layout!r}>"}
    kernel = compile_offline(_mla_decode_quant_gluon_kernel, pointers, constexprs, dict(num_warps=num_warps),
                             gluon=True, floats=("scale_log2",))
    ptx = kernel.asm["ptx"]
    result = {"wgmma": ptx.count("wgmma.mma_async"), "tma": ptx.count("cp.async.bulk.tensor"),
              "shared_bytes": kernel.metadata.shared, "rope_stages": rope_stages, "num_warps": num_warps}
    ptxas = ptxas_path()
    if ptxas:
        result.update(ptxas_resources(ptx, ptxas))
    return result


__all__ = ["HAS_GLUON", "mla_decode_quant_gluon", "compile_report", "check_shape", "unsupported",
           "gluon_quant_config", "shared_bytes"]
