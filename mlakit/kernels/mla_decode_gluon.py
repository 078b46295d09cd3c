"""Absorbed MLA decode for Hopper written in Gluon (Triton's explicit dialect).

``mla_decode`` runs this kernel by itself on a Hopper GPU where it applies (``applies``)
and the Triton kernel (``mla_decode.py``) elsewhere. On an H200 it reads the cache at
up to 100% of the copy bandwidth (128 x 8192, decode-attn-v1) where the Triton kernel
reached 66-72% (docs/kernels.md).

Why Gluon. The Triton kernel stacks a sequence's 32 heads into the M of its dots, so
they lower to ``mma.sync`` at M = 32 and the 32 x 512 fp32 accumulator sits at the
register cap; its wgmma-shaped variants lost in plain Triton (register cap, spills,
shared memory). Here the layouts, the shared-memory buffers and the copies are explicit:

* **Keys-major dots** (no padding of 32 heads to wgmma's 64 rows): the cache tile
  (64 slots) is the M of both products,
  ``S^T [64, H] = K [64, 576] @ Q^T [576, H]`` and ``O^T [512, H] += V^T [512, 64] @ P^T [64, H]``,
  both operands in shared memory, so no query or probability sits in registers for the
  whole loop. Up to 32 rows one warpgroup does both dots (128 accumulator values per
  thread): each cache tile is then read from shared memory once per dot, and shared-memory
  bandwidth is what a tile costs besides HBM. 64 rows take two warpgroups; more rows
  (128 heads) take several programs per split, side by side, sharing tiles through L2.
* **TMA copies into a ring of shared-memory stages** with one mbarrier each: the
  next tiles stream in while the current one is multiplied.
* One split writes the output itself; several write partials in the Triton kernel's
  layout, merged by its combine kernel, launched early (programmatic dependent launch).

Limits: bf16/fp16, ``kv_lora_rank`` and ``rope_dim`` powers of two (64..512, 16..64; no
rope-less caches), a contiguous cache. Slots between a sequence's length and the end of
its tile are read (TMA cannot mask per sequence); their latent rows are zeroed in shared
memory, so whatever the cache holds there (NaN included) does not reach the output.
"""

from __future__ import annotations

import functools

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
# The merge kernel launches with programmatic dependent launch (set up while this kernel runs).
EARLY_MERGE = True

if HAS_GLUON:

    @gluon.jit
    def _mla_decode_gluon_kernel(
        lat_desc, rope_desc,  # TMA descriptors over the cache viewed as [batch * max_len, rank + rope]
        q_latent_ptr, q_rope_ptr, lengths_ptr, part_out_ptr, part_lse_ptr, out_ptr,
        scale_log2, num_splits, max_len,
        stride_qlb, stride_qls, stride_qlh,
        stride_qrb, stride_qrs, stride_qrh,
        stride_pb, stride_pm, stride_ps,  # part_out [b, rows, split, r]; part_lse [b, rows, split] contiguous
        stride_ob, stride_os, stride_oh,  # out [b, s_q, h, r] (DIRECT)
        num_heads, s_q,
        RANK: gl.constexpr,
        ROPE: gl.constexpr,
        BLOCK_H: gl.constexpr,  # query rows (token x head) per program: the N of both dots
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
        ZERO_COLS: gl.constexpr,  # columns per pass when zeroing the slots past a split's end
        EARLY_MERGE: gl.constexpr,  # the merge kernel follows with programmatic dependent launch
        DIRECT: gl.constexpr,  # one split: write the output itself, no partials and no merge pass
        num_warps: gl.constexpr,
    ):
        # Grid (row blocks, splits, batch): a split's row blocks run side by side and share its
        # cache tiles through L2 (more than 64 rows: 128 heads).
        row_base = gl.program_id(0) * BLOCK_H
        pid_split = gl.program_id(1)
        pid_b = gl.program_id(2)
        dtype: gl.constexpr = lat_desc.dtype

        # Register layouts (one warpgroup, or two at 64 rows). Scores S^T [BLOCK_N, BLOCK_H]: two
        # warpgroups take half of the rows (here columns) each.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, num_warps // 4], instr_shape=[16, BLOCK_H // (num_warps // 4), 16])
        # Output O^T [RANK, BLOCK_H]: the rank rows spread over the warpgroups.
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
        if EARLY_MERGE:
            # let the merge kernel's grid launch now (it waits for this grid's results in gdc_wait)
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
        _cta_barrier()  # every warp's queries are in shared memory before the first dot

        # Causal within the chunk: row m (token t) sees slots [0, seq_len - s_q + t].
        rows_s = row_base + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, s_layout))
        row_last = seq_len - s_q + rows_s // num_heads  # [BLOCK_H]
        slots0 = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, gl.SliceLayout(0, s_layout))
        l_i = gl.zeros([BLOCK_H], gl.float32, gl.SliceLayout(0, s_layout))
        acc = gl.zeros([RANK, BLOCK_H], gl.float32, o_layout)  # O^T

        for j in range(num_tiles):
            stage = j % STAGES
            mbarrier.wait(ready.index(stage), (j // STAGES) & 1)
            kl = k_lat.index(stage)  # [BLOCK_N, RANK]
            valid = split_end - (split_start + j * BLOCK_N)  # slots of this tile inside the split
            if valid < BLOCK_N:
                # The split's last tile ends early: TMA read the slots past it too (the next
                # sequence's, or whatever the cache holds there). They get zero weight, but
                # 0 * inf or NaN is NaN in the value product, so zero their latent rows.
                zero_rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, load_layout)) >= valid
                for c in gl.static_range(RANK // ZERO_COLS):
                    chunk = kl.slice(c * ZERO_COLS, ZERO_COLS, dim=1)
                    v = chunk.load(load_layout)
                    chunk.store(gl.where(zero_rows[:, None], gl.zeros_like(v), v))
                fence_async_shared()
                _cta_barrier()
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
        m_o = row_base + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, store_layout))
        if DIRECT:
            dst = (out_ptr + pid_b * stride_ob + (m_o // num_heads)[None, :] * stride_os
                   + (m_o % num_heads)[None, :] * stride_oh + r_o[:, None])
            gl.store(dst, out_t.to(dtype), mask=(m_o < num_rows)[None, :])
        else:
            part = part_out_ptr + pid_b * stride_pb + m_o[None, :] * stride_pm + pid_split * stride_ps + r_o[:, None]
            gl.store(part, out_t, mask=(m_o < num_rows)[None, :])
            gl.store(part_lse_ptr + (pid_b * num_rows + rows_s) * num_splits + pid_split, lse,
                     mask=rows_s < num_rows)


@functools.lru_cache(maxsize=None)
def _tile_layouts(rank: int, rope: int, dtype: torch.dtype):
    """Shared-memory layouts of the latent and RoPE tiles (cached: building them costs ~20 us
    of host time each, as much as a small decode step's GPU time)."""
    gl_dtype = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return (gl.NVMMASharedLayout.get_default_for([BLOCK_N, rank], gl_dtype),
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, rope], gl_dtype))


def _descriptors(kv_cache: torch.Tensor, rank: int, rope: int):
    """TMA descriptors of the latent and RoPE columns of the cache, tiles of BLOCK_N slots."""
    flat = kv_cache.view(-1, rank + rope)  # [batch * max_len, rank + rope]
    lat_layout, rope_layout = _tile_layouts(rank, rope, kv_cache.dtype)
    shape, strides = list(flat.shape), list(flat.stride())
    return (TensorDescriptor(flat, shape, strides, [BLOCK_N, rank], lat_layout),
            TensorDescriptor(flat, shape, strides, [BLOCK_N, rope], rope_layout))


def check_shape(heads: int, s_q: int, rank: int, rope: int, dtype: torch.dtype) -> None:
    """Raise ValueError for what this version does not cover."""
    if not HAS_GLUON:
        raise ValueError("needs triton with Gluon's Hopper API (triton >= 3.6)")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"bf16 or fp16 only, got {dtype}")
    for name, value, low, high in (("kv_lora_rank", rank, 64, 512), ("rope_dim", rope, 16, 64)):
        if value & (value - 1) or not low <= value <= high:
            raise ValueError(f"{name} must be a power of two in [{low}, {high}], got {value}")


def block_h_for(rows: int) -> int:
    """The N of both dots: the rows padded to a power of two, at least 16, at most 64 (more
    rows take several programs)."""
    return min(64, max(16, 1 << (rows - 1).bit_length()))


def unsupported(q_latent: torch.Tensor, kv_cache: torch.Tensor, rope: int) -> str | None:
    """Why this kernel cannot run the call (None: it can): it needs a Hopper GPU, a call
    inside what ``check_shape`` covers, and a contiguous cache."""
    if not HAS_GLUON:
        return "needs triton with Gluon's Hopper API (triton >= 3.6)"
    if not q_latent.is_cuda or torch.cuda.get_device_capability(q_latent.device)[0] != 9:
        return "needs a Hopper GPU (sm_90)"
    if not kv_cache.is_contiguous():
        return "needs a contiguous kv_cache"
    batch, s_q, heads, rank = q_latent.shape
    try:
        check_shape(heads, s_q, rank, rope, q_latent.dtype)
    except ValueError as exc:
        return str(exc)
    return None


def applies(q_latent: torch.Tensor, kv_cache: torch.Tensor, rope: int) -> bool:
    """Whether ``mla_decode``'s automatic choice takes this kernel (``unsupported`` says why not)."""
    return unsupported(q_latent, kv_cache, rope) is None


@functools.lru_cache(maxsize=1024)
def gluon_config(batch: int, s_q: int, heads: int, rank: int, max_len: int, num_sms: int) -> dict:
    """Split count, pipeline depth and warps of one call (measured on an H200, docs/kernels.md).

    One warpgroup when the rows fit its 32-wide N: each dot then reads a cache tile from
    shared memory once (two warpgroups splitting the heads read it twice, and shared-memory
    bandwidth is what a tile costs besides HBM): 288 us against 310 us at 128 x 8192.
    Splits fill the SMs once with the programs that fit on an SM together (shared memory:
    one at rank 512, two at rank 128-256, four below)."""
    block_h = block_h_for(s_q * heads)
    num_warps = 4 if block_h <= 32 else 8
    occupancy = 1 if rank >= 512 else 2 if rank >= 128 else 4
    programs = batch * -(-(s_q * heads) // block_h)
    num_splits = max(1, min(occupancy * num_sms // programs, -(-max_len // BLOCK_N)))
    return dict(num_splits=num_splits, stages=2, num_warps=num_warps)


def run(q_latent, q_rope, kv_cache, lengths, softmax_scale, out, config: dict | None = None):
    """The Gluon path of ``mla_decode`` (arguments already checked there): fills ``out``.
    ``config`` overrides keys of ``gluon_config``."""
    from mlakit.kernels.decode_common import merge_partials, num_sms

    batch, s_q, heads, rank = q_latent.shape
    device_index = q_latent.device.index if q_latent.device.index is not None else torch.cuda.current_device()
    cfg = dict(gluon_config(batch, s_q, heads, rank, kv_cache.shape[1], num_sms(device_index)))
    if config:
        unknown = set(config) - set(cfg)
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(cfg)}")
        cfg.update(config)
    num_splits = max(1, int(cfg["num_splits"]))
    partials = _launch(q_latent, q_rope, kv_cache, lengths, softmax_scale, out, num_splits, cfg["stages"],
                       cfg["num_warps"])
    if partials is not None:
        merge_partials(*partials, out, early_launch=EARLY_MERGE)
    return out


def _launch(q_latent, q_rope, kv_cache, lengths, softmax_scale, out, num_splits, stages, num_warps):
    """The kernel alone (checked arguments): writes ``out`` itself for one split, else returns
    the partials (``split_partials``' layout) for ``merge_partials``."""
    from mlakit.kernels.decode_common import LOG2E, split_partials

    batch, s_q, heads, rank = q_latent.shape
    rope = q_rope.shape[-1]
    rows = s_q * heads
    block_h = block_h_for(rows)
    direct = num_splits == 1
    # one split writes no partials: a one-element placeholder keeps the signature
    part_out, part_lse = split_partials(*((1, 1, 1, 1) if direct else (batch, rows, num_splits, rank)),
                                        q_latent.device)
    lat_desc, rope_desc = _descriptors(kv_cache, rank, rope)
    _mla_decode_gluon_kernel[(-(-rows // block_h), num_splits, batch)](
        lat_desc, rope_desc, q_latent, q_rope, lengths, part_out, part_lse, out,
        softmax_scale * LOG2E, num_splits, kv_cache.shape[1],
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2),
        q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
        *part_out.stride()[:3],
        out.stride(0), out.stride(1), out.stride(2),
        heads, s_q,
        RANK=rank, ROPE=rope, BLOCK_H=block_h, BLOCK_N=BLOCK_N, STAGES=stages, DIRECT=direct,
        ZERO_COLS=min(64, rank), EARLY_MERGE=EARLY_MERGE and not direct, num_warps=num_warps,
    )
    return None if direct else (part_out, part_lse)


def compile_report(heads: int = 32, rank: int = 512, rope: int = 64, stages: int = 2, s_q: int = 1,
                   direct: bool = False, num_warps: int | None = None) -> dict:
    """Compile the kernel for sm_90a without a GPU; its PTX's wgmma count, registers, spills, shared memory.

    The offline check of this file (tests/kernels/test_mla_decode_gluon.py): Gluon has no
    interpreter, so compiling is what a machine without a GPU can verify."""
    from mlakit.kernels.ptxas import compile_offline, ptxas_path, ptxas_resources

    check_shape(heads, s_q, rank, rope, torch.bfloat16)
    block_h = block_h_for(s_q * heads)
    num_warps = num_warps or gluon_config(1, s_q, heads, rank, BLOCK_N, 1)["num_warps"]
    lat_layout, rope_layout = _tile_layouts(rank, rope, torch.bfloat16)
    constexprs = dict(RANK=rank, ROPE=rope, BLOCK_H=block_h, BLOCK_N=BLOCK_N, STAGES=stages, DIRECT=direct,
                      ZERO_COLS=min(64, rank), EARLY_MERGE=not direct, num_warps=num_warps)
    pointers = {"q_latent_ptr": "*bf16", "q_rope_ptr": "*bf16", "lengths_ptr": "*i32", "part_out_ptr": "*fp32",
                "part_lse_ptr": "*fp32", "out_ptr": "*bf16",
                "lat_desc": f"tensordesc<bf16[{BLOCK_N}, {rank}],{lat_layout!r}>",
                "rope_desc": f"tensordesc<bf16[{BLOCK_N}, {rope}],{rope_layout!r}>"}
    kernel = compile_offline(_mla_decode_gluon_kernel, pointers, constexprs, dict(num_warps=num_warps), gluon=True,
                             floats=("scale_log2",))
    ptx = kernel.asm["ptx"]
    result = {"wgmma": ptx.count("wgmma.mma_async"), "tma": ptx.count("cp.async.bulk.tensor"),
              "shared_bytes": kernel.metadata.shared}
    ptxas = ptxas_path()
    if ptxas:
        result.update(ptxas_resources(ptx, ptxas))
    return result


__all__ = ["HAS_GLUON", "mla_decode_gluon", "compile_report", "check_shape", "applies", "unsupported",
           "gluon_config"]
