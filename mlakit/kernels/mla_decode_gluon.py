"""Experimental: absorbed MLA decode for Hopper written in Gluon (Triton's explicit dialect).

Status: compiles for sm_90a (offline, triton 3.6 = the GPU machine's version) and has
not run on a GPU yet. Not used by ``mla_decode``; ``scripts/device/kernels_check.py``
is where it is to be checked against the reference and timed (docs/kernels.md).

Why Gluon. The Triton kernel (``mla_decode.py``) stacks a sequence's 32 heads into the
M of its dots, so they lower to ``mma.sync`` at M = 32 and the 32 x 512 fp32
accumulator sits at the register cap; its wgmma-shaped variants lost in plain Triton
(register cap, spills, shared memory). Here the layouts, the shared-memory buffers and
the copies are explicit:

* **Keys-major dots** (no padding of 32 heads to wgmma's 64 rows): the cache tile
  (64 slots) is the M of both products,
  ``S^T [64, H] = K [64, 576] @ Q^T [576, H]`` and ``O^T [512, H] += V^T [512, 64] @ P^T [64, H]``,
  both operands in shared memory, so no query or probability sits in registers for the
  whole loop; the 512 x H fp32 accumulator is spread over two warpgroups (64 values per
  thread at H = 32).
* **TMA copies into a ring of shared-memory stages** with one mbarrier each: the
  next tiles stream in while the current one is multiplied.
* The split-KV partials have the Triton kernel's layout, so its combine kernel merges
  them.

Limits of this version: bf16/fp16, ``kv_lora_rank`` and ``rope_dim`` powers of two
(16..512, 16..64; no rope-less caches), at most 64 query rows (s_q x heads) per
program, a contiguous cache. Slots between a sequence's length and the end of its tile
are read (TMA cannot mask per sequence) and get zero weight, so they must hold finite
values (the engine's caches are zero-initialised).
"""

from __future__ import annotations

import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # triton 3.6 (the GPU machine) names the TMA load async_copy_global_to_shared; 3.7+ async_load
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # 3.6: thread_barrier
    HAS_GLUON = True
except ImportError:  # no triton, or a triton without Gluon's Hopper API
    HAS_GLUON = False

BLOCK_N = 64  # cache slots per tile: the M of both dots (one wgmma warpgroup tile)
NUM_WARPS = 8  # two warpgroups

if HAS_GLUON:

    @gluon.jit
    def _mla_decode_gluon_kernel(
        lat_desc, rope_desc,  # TMA descriptors over the cache viewed as [batch * max_len, rank + rope]
        q_latent_ptr, q_rope_ptr, lengths_ptr, part_out_ptr, part_lse_ptr,
        scale_log2, num_splits, max_len,
        stride_qlb, stride_qls, stride_qlh,
        stride_qrb, stride_qrs, stride_qrh,
        stride_pb, stride_pm, stride_ps,  # part_out [b, rows, split, r]; part_lse [b, rows, split] contiguous
        num_heads, s_q,
        RANK: gl.constexpr,
        ROPE: gl.constexpr,
        BLOCK_H: gl.constexpr,  # query rows (token x head) per program: the N of both dots
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        pid_split = gl.program_id(0)
        pid_b = gl.program_id(1)
        dtype: gl.constexpr = lat_desc.dtype

        # Register layouts. Scores S^T [BLOCK_N, BLOCK_H]: one warpgroup per half of the rows' columns.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, num_warps // 4], instr_shape=[16, BLOCK_H // (num_warps // 4), 16])
        # Output O^T [RANK, BLOCK_H]: the rank rows spread over both warpgroups.
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_H, 16])
        load_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        store_layout: gl.constexpr = gl.BlockedLayout([4, 1], [32, 1], [1, num_warps], [0, 1])

        # Shared memory: the queries (once), a ring of cache tiles, the probabilities of one tile.
        ql_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, RANK], dtype)
        qr_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, ROPE], dtype)
        p_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_H], dtype)
        k_lat = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, RANK], lat_desc.layout)
        k_rope = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, ROPE], rope_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)

        # This split's slots: an equal share of the sequence's actual length, whole tiles.
        seq_len = gl.load(lengths_ptr + pid_b).to(gl.int32)
        keys_per_split = gl.cdiv(gl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        split_start = pid_split * keys_per_split
        split_end = gl.minimum(split_start + keys_per_split, seq_len)
        num_tiles = gl.maximum(gl.cdiv(split_end - split_start, BLOCK_N), 0)
        row0 = pid_b * max_len + split_start  # first cache row of this split in the 2-D view
        tile_bytes: gl.constexpr = BLOCK_N * (RANK + ROPE) * 2

        for s in gl.static_range(STAGES):  # prologue: the first STAGES tiles in flight
            pred = s < num_tiles
            mbarrier.expect(ready.index(s), tile_bytes, pred=pred)
            _tma_load(lat_desc, [row0 + s * BLOCK_N, 0], ready.index(s), k_lat.index(s), pred=pred)
            _tma_load(rope_desc, [row0 + s * BLOCK_N, RANK], ready.index(s), k_rope.index(s), pred=pred)

        # Queries of this sequence: rows m = token * num_heads + head, zero past the last row.
        num_rows = s_q * num_heads
        rows_l = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, load_layout))
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
        _cta_barrier()  # every warp's queries are in shared memory before the first dot

        # Causal within the chunk: row m (token t) sees slots [0, seq_len - s_q + t].
        rows_s = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, s_layout))
        row_last = seq_len - s_q + rows_s // num_heads  # [BLOCK_H]
        slots0 = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, gl.SliceLayout(0, s_layout))
        l_i = gl.zeros([BLOCK_H], gl.float32, gl.SliceLayout(0, s_layout))
        acc = gl.zeros([RANK, BLOCK_H], gl.float32, o_layout)  # O^T

        for j in range(num_tiles):
            stage = j % STAGES
            mbarrier.wait(ready.index(stage), (j // STAGES) & 1)
            kl = k_lat.index(stage)  # [BLOCK_N, RANK]
            scores = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, s_layout)
            scores = warpgroup_mma(kl, ql_smem.permute((1, 0)), scores, use_acc=False, is_async=True)
            scores = warpgroup_mma(k_rope.index(stage), qr_smem.permute((1, 0)), scores, is_async=True)
            scores = warpgroup_mma_wait(0, deps=[scores])
            slots = split_start + j * BLOCK_N + slots0  # [BLOCK_N]
            visible = (slots[:, None] <= row_last[None, :]) & (slots < split_end)[:, None]
            scores = gl.where(visible, scores * scale_log2, float("-inf"))

            m_new = gl.maximum(m_i, gl.max(scores, axis=0))
            m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet
            alpha = gl.exp2(m_i - m_shift)  # [BLOCK_H]
            p = gl.exp2(scores - m_shift[None, :])  # [BLOCK_N, BLOCK_H]
            l_i = l_i * alpha + gl.sum(p, axis=0)
            m_i = m_new

            p_smem.store(p.to(dtype))
            fence_async_shared()
            _cta_barrier()  # every warp's share of P is in shared memory before the dot reads it
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(0, o_layout))[None, :]
            acc = warpgroup_mma(kl.permute((1, 0)), p_smem, acc, is_async=True)  # V^T [RANK, BLOCK_N] @ P^T
            acc = warpgroup_mma_wait(0, deps=[acc])
            _cta_barrier()  # both warpgroups are done with this stage before it is refilled

            nxt = j + STAGES  # refill this stage with the tile STAGES ahead
            pred = nxt < num_tiles
            mbarrier.expect(ready.index(stage), tile_bytes, pred=pred)
            _tma_load(lat_desc, [row0 + nxt * BLOCK_N, 0], ready.index(stage), k_lat.index(stage), pred=pred)
            _tma_load(rope_desc, [row0 + nxt * BLOCK_N, RANK], ready.index(stage), k_rope.index(stage), pred=pred)

        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))

        # Partials: out = O / l per row, lse = m + log2(l) (-inf for a split that saw no slot).
        l_safe = gl.where(l_i == 0.0, 1.0, l_i)
        lse = gl.where(l_i == 0.0, float("-inf"), m_i + gl.log2(l_safe))
        out_t = acc / gl.convert_layout(l_safe, gl.SliceLayout(0, o_layout))[None, :]
        out_t = gl.convert_layout(out_t, store_layout)  # [RANK, BLOCK_H], rank contiguous per thread
        r_o = gl.arange(0, RANK, layout=gl.SliceLayout(1, store_layout))
        m_o = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, store_layout))
        part = part_out_ptr + pid_b * stride_pb + m_o[None, :] * stride_pm + pid_split * stride_ps + r_o[:, None]
        gl.store(part, out_t, mask=(m_o < num_rows)[None, :])
        gl.store(part_lse_ptr + (pid_b * num_rows + rows_s) * num_splits + pid_split, lse, mask=rows_s < num_rows)


def _descriptors(kv_cache: torch.Tensor, rank: int, rope: int):
    """TMA descriptors of the latent and RoPE columns of the cache, tiles of BLOCK_N slots."""
    flat = kv_cache.view(-1, rank + rope)  # [batch * max_len, rank + rope]
    gl_dtype = gl.bfloat16 if kv_cache.dtype == torch.bfloat16 else gl.float16
    lat_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, rank], gl_dtype)
    rope_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, rope], gl_dtype)
    lat = TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [BLOCK_N, rank], lat_layout)
    rope_desc = TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [BLOCK_N, rope], rope_layout)
    return lat, rope_desc


def check_shape(heads: int, s_q: int, rank: int, rope: int, dtype: torch.dtype) -> None:
    """Raise ValueError for what this version does not cover."""
    if not HAS_GLUON:
        raise ValueError("needs triton with Gluon's Hopper API (triton >= 3.6)")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"bf16 or fp16 only, got {dtype}")
    for name, value, low, high in (("kv_lora_rank", rank, 16, 512), ("rope_dim", rope, 16, 64)):
        if value & (value - 1) or not low <= value <= high:
            raise ValueError(f"{name} must be a power of two in [{low}, {high}], got {value}")
    if s_q * heads > 64:
        raise ValueError(f"at most 64 query rows (s_q x heads), got {s_q * heads}")


def block_h_for(rows: int) -> int:
    """The N of both dots: the rows padded to a power of two, at least 16."""
    return max(16, 1 << (rows - 1).bit_length())


def mla_decode_gluon(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, lengths: torch.Tensor,
                     softmax_scale: float, kv_lora_rank: int, *, num_splits: int | None = None,
                     stages: int = 2) -> torch.Tensor:
    """``mla_decode`` (same arguments and result) through the Gluon kernel; CUDA (sm_90) only."""
    from mlakit.kernels.mla_decode import _LOG2E, _check_decode_args, default_config, merge_partials, split_partials

    rope = _check_decode_args(q_latent, q_rope, kv_cache, lengths, kv_lora_rank)  # shapes, dtypes, devices
    batch, s_q, heads, rank = q_latent.shape
    check_shape(heads, s_q, rank, rope, q_latent.dtype)
    if not kv_cache.is_cuda or not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be a contiguous CUDA tensor")
    q_latent, q_rope = (q if q.stride(3) == 1 else q.contiguous() for q in (q_latent, q_rope))
    rows = s_q * heads
    if num_splits is None:
        num_splits = default_config(batch, s_q, heads, rank, rope, kv_cache.shape[1], q_latent.device,
                                    q_latent.dtype)["num_splits"]
    num_splits = max(1, int(num_splits))
    out = torch.empty((batch, s_q, heads, rank), dtype=q_latent.dtype, device=q_latent.device)
    part_out, part_lse = split_partials(batch, rows, num_splits, rank, q_latent.device)
    lat_desc, rope_desc = _descriptors(kv_cache, rank, rope)
    _mla_decode_gluon_kernel[(num_splits, batch)](
        lat_desc, rope_desc, q_latent, q_rope, lengths, part_out, part_lse,
        softmax_scale * _LOG2E, num_splits, kv_cache.shape[1],
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2),
        q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
        *part_out.stride()[:3],
        heads, s_q,
        RANK=rank, ROPE=rope, BLOCK_H=block_h_for(rows), BLOCK_N=BLOCK_N, STAGES=stages,
        num_warps=NUM_WARPS,
    )
    merge_partials(part_out, part_lse, out)
    return out


def compile_report(heads: int = 32, rank: int = 512, rope: int = 64, stages: int = 2, s_q: int = 1) -> dict:
    """Compile the kernel for sm_90a without a GPU; its PTX's wgmma count, registers, spills, shared memory.

    The offline check of this file (tests/kernels/test_mla_decode_gluon.py): Gluon has no
    interpreter, so compiling is what a machine without a GPU can verify."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from mlakit.kernels.ptxas import ptxas_path, ptxas_resources

    check_shape(heads, s_q, rank, rope, torch.bfloat16)
    fn = _mla_decode_gluon_kernel
    names = fn.arg_names
    block_h = block_h_for(s_q * heads)
    lat_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, rank], gl.bfloat16)
    rope_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, rope], gl.bfloat16)
    constexprs = dict(RANK=rank, ROPE=rope, BLOCK_H=block_h, BLOCK_N=BLOCK_N, STAGES=stages, num_warps=NUM_WARPS)
    pointers = {"q_latent_ptr": "*bf16", "q_rope_ptr": "*bf16", "lengths_ptr": "*i32", "part_out_ptr": "*fp32",
                "part_lse_ptr": "*fp32",
                "lat_desc": f"tensordesc<bf16[{BLOCK_N}, {rank}],{lat_layout!r}>",
                "rope_desc": f"tensordesc<bf16[{BLOCK_N}, {rope}],{rope_layout!r}>"}
    signature = {n: pointers.get(n) or ("constexpr" if n in constexprs else "fp32" if n == "scale_log2" else "i32")
                 for n in names}
    source = GluonASTSource(fn=fn, signature=signature,
                            constexprs={(names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=NUM_WARPS))
    ptx = kernel.asm["ptx"]
    result = {"wgmma": ptx.count("wgmma.mma_async"), "tma": ptx.count("cp.async.bulk.tensor"),
              "shared_bytes": kernel.metadata.shared}
    ptxas = ptxas_path()
    if ptxas:
        result.update(ptxas_resources(ptx, ptxas))
    return result


__all__ = ["HAS_GLUON", "mla_decode_gluon", "compile_report", "check_shape"]
